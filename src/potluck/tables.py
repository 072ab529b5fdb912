"""Rows out to CSV, TSV, JSONL or Parquet (predictions, results), and a data file's every column back in.

    write_rows("scored.csv", rows)          # atomically; the format by suffix
    records = read_records("new.csv")       # each row with all its columns, in read_texts' order
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from potluck.data import _DELIMITERS, FORMATS, DataError, PathLike, _format_of, _read_text, _text_lines
from potluck.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)


def read_records(path: PathLike, text_column: str = "text") -> list[dict]:
    """Every row of a data file with all its columns, in the order `read_texts` gives its texts (blank
    lines skipped alike): what `potluck predict --output` writes back beside its own columns."""
    p = Path(path)
    fmt = _format_of(p, allow_txt=True)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    text = _read_text(p)
    if fmt == "txt":
        return [{text_column: line} for _, line in _text_lines(text)]
    if fmt == "jsonl":
        return [json.loads(line) for _, line in _text_lines(text)]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_DELIMITERS[fmt], strict=True)
    records = [row for row in reader if any(field.strip() for field in row)]
    header = [name.strip() for name in records[0]]
    return [dict(zip(header, row, strict=True)) for row in records[1:]]


def fresh_names(wanted: Sequence[str], taken: Iterable[str]) -> dict[str, str]:
    """Each wanted column name, or `potluck_<name>` (then `potluck_<name>_2`, ...) where it is taken."""
    taken = set(taken)
    names = {}
    for name in wanted:
        new, n = (name, 1) if name not in taken else (f"potluck_{name}", 1)
        while new in taken:
            n += 1
            new = f"potluck_{name}_{n}"
        names[name] = new
        taken.add(new)
    return names


def _plain(value: Any) -> Any:
    """numpy scalars and arrays to plain Python values."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        return value.tolist()
    return value


def check_writable_format(path: PathLike, fmt: str | None = None) -> str:
    """The format `write_rows` writes `path` in (by suffix, or `fmt`); a DataError for one it cannot."""
    fmt = fmt or FORMATS.get(Path(path).suffix.lower())
    if fmt not in set(FORMATS.values()):
        raise DataError(f"cannot write file type {Path(path).suffix or '(no suffix)'!r}", path=path,
                        hint=f"Use one of {', '.join(FORMATS)}")
    return fmt


def write_rows(path: PathLike, rows: list[dict], *, fmt: str | None = None) -> None:
    """Write rows as CSV, TSV, JSONL or Parquet (by suffix, or `fmt`) atomically: temp file, fsync, rename.

    Columns are the keys in order of first appearance; in CSV/TSV, lists and dicts are written as JSON.
    """
    fmt = check_writable_format(path, fmt)
    rows = [{key: _plain(value) for key, value in row.items()} for row in rows]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
                       if rows else pa.table({}), sink)
        payload = sink.getvalue().to_pybytes()
    elif fmt == "jsonl":
        payload = "".join(json.dumps(row, ensure_ascii=False, default=_plain) + "\n" for row in rows).encode()
    else:
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, delimiter=_DELIMITERS[fmt], lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: json.dumps(v, ensure_ascii=False, default=_plain) if isinstance(v, list | dict)
                          else v for k, v in row.items()} for row in rows)
        payload = out.getvalue().encode("utf-8")
    try:
        atomic_write_bytes(path, payload)
    except OSError as err:
        raise DataError(f"cannot write here ({err.strerror or err})", path=path,
                        hint="Check that the folder exists and is writable") from None
    logger.debug("wrote %d rows to %s", len(rows), path)
