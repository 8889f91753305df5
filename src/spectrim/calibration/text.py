"""Text as calibration data: read texts from a file, tokenise them into dict batches.

Users of language models hold text, not tensors.  :func:`read_texts` reads a ``.txt``
file (one text per non-empty line), a ``.csv`` / ``.tsv`` column (by name or number) or a
``.jsonl`` field; :func:`text_batches` tokenises them with the model's own tokenizer into
padded dict batches (``input_ids``, ``attention_mask``, ...), the form
:func:`spectrim.compress` takes for Hugging Face models.  Padded positions never enter the
statistics (the attention mask), so the batch size changes nothing but speed.

Tables are read as they are found, not as their suffix promises: the delimiter is
sniffed (the STS-B files are tab-separated under a ``.csv`` name), a first row holding a
number is data, not a header, and without a ``column`` the one with the longest texts is
read (:func:`read_text_column` says which).  A comma-separated row with more or fewer
fields than the header, where an unquoted comma would have cut a text in two, is an
error that names its line.

Example::

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = path.write_text("id,sentence\\n1,A man plays a flute.\\n2,Dogs run.\\n")
    >>> read_texts(path)
    ['A man plays a flute.', 'Dogs run.']
    >>> tsv = path.with_name("pairs.csv")  # tab-separated, no header: the STS-B layout
    >>> _ = tsv.write_text("news\\t4.2\\tA cat sat.\\tThe cat sat.\\n")
    >>> found = read_text_column(tsv, column=[2, 3])
    >>> found.texts, found.delimiter, found.header
    (['A cat sat.', 'The cat sat.'], '\\t', False)
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["TEXT_SUFFIXES", "TextColumn", "read_text_column", "read_texts", "text_batches"]

#: file suffixes read as text data
TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")

_SNIFF_BYTES = 1 << 16
_DELIMITERS = ",\t;|"
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class TextColumn:
    """What :func:`read_text_column` read.

    Attributes:
        texts: the non-empty texts, in file order (with several columns, each row's in
            column order).
        columns: the columns read, by header name or (without a header) number; empty
            for ``.txt``, the field name for ``.jsonl``.
        available: every column of the table (names or numbers), empty for ``.txt`` and
            ``.jsonl``.
        chosen: whether the columns were chosen by :func:`read_text_column` (no
            ``column`` given) rather than by the caller.
        delimiter: the field delimiter found (``None`` for ``.txt`` and ``.jsonl``).
        header: whether the first row was read as a header.
    """

    texts: list[str]
    columns: tuple[str, ...] = ()
    available: tuple[str, ...] = ()
    chosen: bool = False
    delimiter: str | None = None
    header: bool = False

    def describe(self) -> str:
        """One line for a user: which column(s) of what kind of table.

        >>> TextColumn(["a"], ("5",), ("0", "1", "2", "3", "4", "5", "6"), True, "\\t").describe()
        'column 5 of 7 (tab-separated, no header; the longest texts)'
        """
        if self.delimiter is None:
            return f"field {self.columns[0]!r}" if self.columns else "one text per line"
        kind = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}[self.delimiter]
        which = ", ".join(self.columns)
        head = "header" if self.header else "no header"
        why = "; the longest texts" if self.chosen else ""
        word = "columns" if len(self.columns) > 1 else "column"
        return f"{word} {which} of {len(self.available)} ({kind}-separated, {head}{why})"


def read_texts(
    path: str | os.PathLike[str],
    column: str | int | Sequence[str | int] | None = None,
    limit: int | None = None,
    header: bool | None = None,
) -> list[str]:
    """The non-empty texts of ``path``, in file order (at most ``limit``): the
    :attr:`~TextColumn.texts` of :func:`read_text_column`."""
    return read_text_column(path, column=column, limit=limit, header=header).texts


def read_text_column(
    path: str | os.PathLike[str],
    column: str | int | Sequence[str | int] | None = None,
    limit: int | None = None,
    header: bool | None = None,
) -> TextColumn:
    """Read the texts of a file and say where they came from.

    Args:
        path: ``.txt`` (one text per line), ``.csv`` / ``.tsv`` (a table), or ``.jsonl``
            (one JSON object per line).
        column: the table column (header name, or 0-based number), several of them (each
            row gives one text per column, in order: sentence pairs), or the JSON field.
            Default: ``"text"`` if the header has it, else the column whose values are
            longest on average among those that are not all numbers (a table) / the only
            string field (JSON).
        limit: read no more texts than this.
        header: whether a table's first row names its columns; ``None`` (default): it does
            unless one of its fields is a number.  A column name needs a header.

    The delimiter of a table is sniffed from its first 64 KiB (comma, tab, semicolon or
    pipe; the suffix's when that fails).  Tab-separated tables are read without quoting
    (IANA TSV: a field holds no tab or line break; STS-B's sentences hold unmatched
    ``"``), the others as RFC 4180 CSV, where every row has the header's number of fields.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown suffix or column, a row that does not fit the table (its
            line), or no text in the file (the message names the file and its columns).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} not found")
    suffix = p.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise ValueError(f"{p}: text data must be one of {', '.join(TEXT_SUFFIXES)}")
    with p.open(encoding="utf-8", newline="") as f:
        if suffix == ".txt":
            if column is not None:
                raise ValueError(f"{p}: a .txt file has no columns (column={column!r})")
            found = TextColumn([line.strip() for line in f if line.strip()])
        elif suffix in (".csv", ".tsv"):
            found = _read_table(p, f, column, header)
        else:
            if not (column is None or isinstance(column, (str, int))):
                raise ValueError(f"{p}: a .jsonl file gives one field (column={column!r})")
            texts, key = [], ""
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}, line {n}: not JSON ({exc.msg})") from None
                key, text = _field(p, n, record, column)
                texts.append(text)
            found = TextColumn(texts, (key,) if key else ())
    texts = [t for t in found.texts if t]
    if not texts:
        raise ValueError(f"{p}: no text found")
    return dataclasses.replace(found, texts=texts[:limit] if limit is not None else texts)


def _read_table(
    p: Path, f: io.TextIOBase, column: str | int | Sequence[str | int] | None, header: bool | None
) -> TextColumn:
    sample = f.read(_SNIFF_BYTES)
    f.seek(0)
    fallback = "\t" if p.suffix.lower() == ".tsv" else ","
    try:
        delimiter = csv.Sniffer().sniff(sample, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        delimiter = fallback
    if delimiter == "\t":
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(f, delimiter=delimiter)
    rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    if not rows:
        raise ValueError(f"{p}: empty file")
    first = [c.strip() for c in rows[0][1]]
    if header is None:
        header = not any(_is_number(c) for c in first)
    names = first if header else [str(j) for j in range(len(first))]
    body = rows[1:] if header else rows
    if delimiter != "\t":
        for line, row in body:
            if len(row) != len(names):
                raise ValueError(
                    f"{p}, line {line}: {len(row)} fields where the "
                    f"{'header' if header else 'first row'} has {len(names)} (is a comma "
                    "inside an unquoted text? quote such fields)"
                )
    chosen = column is None
    if column is None:
        indices = [names.index("text")] if "text" in names else [_longest(p, names, body)]
    elif isinstance(column, (str, int)):
        indices = [_column_index(p, names, header, column)]
    else:
        indices = [_column_index(p, names, header, c) for c in column]
        if not indices:
            raise ValueError(f"{p}: no column given (column={column!r})")
    need = max(indices) + 1
    texts = []
    for line, row in body:
        if len(row) < need:
            raise ValueError(
                f"{p}, line {line}: {len(row)} fields, column {names[need - 1]!r} needs {need}"
            )
        texts += [row[j].strip() for j in indices]
    return TextColumn(
        texts, tuple(names[j] for j in indices), tuple(names), chosen, delimiter, header
    )


def _is_number(text: str) -> bool:
    """A decimal number, as a data row holds and a header does not ("nan" is a name)."""
    return _NUMBER.fullmatch(text.strip()) is not None


def _longest(p: Path, names: list[str], body: list[tuple[int, list[str]]]) -> int:
    """The column with the longest values on average, among those not all numbers."""
    best, best_len = -1, -1.0
    for j in range(len(names)):
        values = [row[j].strip() for _, row in body if len(row) > j]
        if not values or all(_is_number(v) or not v for v in values):
            continue
        mean = sum(map(len, values)) / len(values)
        if mean > best_len:
            best, best_len = j, mean
    if best < 0:
        raise ValueError(f"{p}: no column holds text (columns: {', '.join(names)})")
    return best


def _column_index(p: Path, names: list[str], header: bool, column: str | int) -> int:
    if isinstance(column, int) or (isinstance(column, str) and column.isdigit()):
        j = int(column)
        if not 0 <= j < len(names):
            raise ValueError(f"{p}: column {j} out of range (it has {len(names)} columns)")
        return j
    if not header:
        raise ValueError(
            f"{p}: column {column!r} is a name, but the first row is data (it holds a "
            f"number), not a header: pass the column's number (0 to {len(names) - 1})"
        )
    if column not in names:
        raise ValueError(f"{p}: no column {column!r} (columns: {', '.join(names)})")
    return names.index(column)


def _field(p: Path, n: int, record: Any, column: str | int | None) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise ValueError(f"{p}, line {n}: expected a JSON object")
    if column is None:
        strings = [k for k, v in record.items() if isinstance(v, str)]
        key = "text" if "text" in record else (strings[0] if len(strings) == 1 else None)
        if key is None:
            raise ValueError(f"{p}, line {n}: which field? pass column= (fields: {list(record)})")
    else:
        key = str(column)
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{p}, line {n}: field {key!r} is not a string")
    return key, value.strip()


def text_batches(
    texts: Sequence[str], tokenizer: Any, batch_size: int = 32, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Tokenise ``texts`` into padded dict batches of ``batch_size`` (truncated to
    ``max_length`` tokens), in order.  A tokenizer without a padding token (GPT-2) pads
    with its end-of-text token; the attention mask marks the padding either way."""
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be positive")
    if getattr(tokenizer, "pad_token", "") is None:
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None:
            raise ValueError("the tokenizer has neither a padding nor an end-of-text token")
        tokenizer = copy.copy(tokenizer)  # the caller's tokenizer keeps its settings
        tokenizer.pad_token = eos
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
    return out
