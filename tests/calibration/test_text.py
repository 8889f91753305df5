"""Reading texts from files as they are, not as their suffix promises: the real STS-B files
(tab-separated under a ``.csv`` name, no header, unmatched quotes) and the ways a table can
silently cut or merge texts."""

from __future__ import annotations

from pathlib import Path

import pytest

from spectrim.calibration.text import read_text_column, read_texts


def _fields(path: Path, j: int) -> list[str]:
    """Brute force: field ``j`` of every tab-separated line, split by hand."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[j].strip() for line in lines if line.strip()]


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_the_real_sts_files_give_their_sentences(data_root: Path, split: str) -> None:
    path = data_root / "stsbenchmark" / f"sts-{split}.csv"
    found = read_text_column(path)
    # the longest texts are the sentences (column 5 of 7), every line's, none merged by a
    # stray quote and none cut at a comma; before, each text was a whole line up to its
    # first comma, the first line dropped as a header
    assert found.delimiter == "\t" and not found.header and found.chosen
    assert found.columns == ("5",) and len(found.available) == 7
    assert found.texts == _fields(path, 5)
    assert any('"' in t for t in found.texts) and any("," in t for t in found.texts)
    pairs = read_texts(path, column=[5, 6])
    assert pairs[0::2] == _fields(path, 5) and pairs[1::2] == _fields(path, 6)
    assert found.describe() == "column 5 of 7 (tab-separated, no header; the longest texts)"


def test_a_header_is_a_first_row_without_numbers(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("id,label,sentence\n1,0,A man plays.\n2,1,Dogs run far away.\n")
    found = read_text_column(path)
    assert found.header and found.columns == ("sentence",) and found.chosen
    assert found.texts == ["A man plays.", "Dogs run far away."]
    assert read_texts(path, column="id") == ["1", "2"]
    path.write_text("7,A man plays.\n8,Dogs run.\n")  # no header: the first row is data
    assert read_texts(path) == ["A man plays.", "Dogs run."]
    with pytest.raises(ValueError, match=r"'sentence' is a name, but the first row is data"):
        read_texts(path, column="sentence")
    path.write_text("text,title\nshort one,a much longer title than the text\n")
    assert read_texts(path) == ["short one"]  # a column named text wins
    assert read_texts(path, header=False) == ["title", "a much longer title than the text"]


def test_a_comma_in_an_unquoted_text_is_an_error_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('id,sentence\n1,"Quoted, fine."\n2,Not quoted, cut in two.\n')
    with pytest.raises(ValueError, match=r"t.csv, line 3: 3 fields where the header has 2"):
        read_texts(path)
    path.write_text('id,sentence\n1,"Quoted, fine."\n2,"He said ""hi"", twice."\n')
    assert read_texts(path) == ["Quoted, fine.", 'He said "hi", twice.']


def test_tab_separated_text_is_read_verbatim(tmp_path: Path) -> None:
    """TSV has no quoting: a text opening with a quote that is never closed stays one
    field of one line (the csv module's default would run it into the next lines)."""
    path = tmp_path / "t.tsv"
    path.write_text('0\t"Unclosed quote\n1\tnext line\n2\tlast, with a comma\n')
    assert read_texts(path) == ['"Unclosed quote', "next line", "last, with a comma"]
    path.write_text("0\tonly\n1\n")
    with pytest.raises(ValueError, match=r"line 2: 1 fields, column '1' needs 2"):
        read_texts(path, column=1)


def test_a_table_without_text_says_so(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(ValueError, match="no column holds text"):
        read_texts(path)
