"""Text as calibration data: read texts from a file, tokenise them into dict batches.

Users of language models hold text, not tensors.  :func:`read_texts` reads a ``.txt``
file (one text per non-empty line), a ``.csv`` / ``.tsv`` column (by name or number) or a
``.jsonl`` field; :func:`text_batches` tokenises them with the model's own tokenizer into
padded dict batches (``input_ids``, ``attention_mask``, ...), the form
:func:`spectrim.compress` takes for Hugging Face models.  Padded positions never enter the
statistics (the attention mask), so the batch size changes nothing but speed.

Example::

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = path.write_text("id,sentence\\n1,A man plays a flute.\\n2,Dogs run.\\n")
    >>> read_texts(path, column="sentence")
    ['A man plays a flute.', 'Dogs run.']
"""

from __future__ import annotations

import copy
import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["TEXT_SUFFIXES", "read_texts", "text_batches"]

#: file suffixes read as text data
TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")


def read_texts(
    path: str | os.PathLike[str], column: str | int | None = None, limit: int | None = None
) -> list[str]:
    """The non-empty texts of ``path``, in file order (at most ``limit``).

    Args:
        path: ``.txt`` (one text per line), ``.csv`` / ``.tsv`` (with a header row), or
            ``.jsonl`` (one JSON object per line).
        column: the CSV column (header name, or 0-based number) or JSON field; default:
            ``"text"`` if present, else the first column (CSV) / the only string field.
        limit: read no more texts than this.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown suffix or column, or no text in the file (the message names
            the file and the columns it has).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} not found")
    suffix = p.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise ValueError(f"{p}: text data must be one of {', '.join(TEXT_SUFFIXES)}")
    out: list[str] = []
    with p.open(encoding="utf-8", newline="") as f:
        if suffix == ".txt":
            if column is not None:
                raise ValueError(f"{p}: a .txt file has no columns (column={column!r})")
            out = [line.strip() for line in f if line.strip()]
        elif suffix in (".csv", ".tsv"):
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{p}: empty file")
            j = _column_index(p, header, column)
            out = [row[j].strip() for row in reader if len(row) > j and row[j].strip()]
        else:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}, line {n}: not JSON ({exc.msg})") from None
                out.append(_field(p, n, record, column))
    if not out:
        raise ValueError(f"{p}: no text found")
    return out[:limit] if limit is not None else out


def _column_index(p: Path, header: list[str], column: str | int | None) -> int:
    names = [h.strip() for h in header]
    if column is None:
        return names.index("text") if "text" in names else 0
    if isinstance(column, int) or (isinstance(column, str) and column.isdigit()):
        j = int(column)
        if not 0 <= j < len(names):
            raise ValueError(f"{p}: column {j} out of range (it has {len(names)} columns)")
        return j
    if column not in names:
        raise ValueError(f"{p}: no column {column!r} (columns: {', '.join(names)})")
    return names.index(column)


def _field(p: Path, n: int, record: Any, column: str | int | None) -> str:
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
    return value.strip()


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
