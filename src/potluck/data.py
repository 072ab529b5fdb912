"""Read and check labelled text data for fine-tuning, prediction and evaluation.

    from potluck.data import read_data, check_training_data
    train = read_data("train.csv")                  # CSV, TSV, JSONL or Parquet, by suffix
    train, valid = stratified_split(train, 0.1)
    warnings = check_training_data(train, valid)    # raises DataError, returns warnings

Every problem with the user's file is a `DataError` whose `str()` is one line:
``path:line:column: what is wrong. what to do``.
Labels are always strings: JSON/Parquet integers become "0", "1"; booleans "true"/"false";
surrounding whitespace of a label is dropped. Texts are kept exactly as written.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import io
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potluck.errors import UserError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
TEXT_ONLY_FORMATS = {".txt": "txt"}  # one text per line; read_texts / require_labels=False only
_DELIMITERS = {"csv": ",", "tsv": "\t"}


class DataError(UserError, ValueError):
    """A problem with the user's data. ``str(err)`` is one line: 'path:line:column: what is wrong. what to do'.

    Attributes: path, line (1-based or None), column (1-based int for CSV/TSV, a field name for JSONL/Parquet,
    or None), hint (what to do), message (what is wrong). A `UserError`, so the CLI prints it without a traceback.
    """

    def __init__(self, message: str, *, path: PathLike | None = None, line: int | None = None,
                 column: int | str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.line, self.column = line, column
        self.path = None if path is None else os.fspath(path)
        self.args = (self._format(),)

    def _format(self) -> str:
        where = [self.path] if self.path else (["line"] if self.line is not None else [])
        if self.line is not None:
            where.append(str(self.line) + (f":{self.column}" if isinstance(self.column, int) else ""))
        text = (":" if self.path else " ").join(where) + ": " if where else ""
        text += self.message.rstrip(". ")
        text += ". " + self.hint if self.hint else ""
        return " ".join(text.splitlines())

    def __reduce__(self):  # keyword-only __init__: needed to survive pickling (multiprocessing)
        return _rebuild_error, (self.message, self.path, self.line, self.column, self.hint)


def _rebuild_error(message, path, line, column, hint) -> DataError:
    return DataError(message, path=path, line=line, column=column, hint=hint)


def _show(value: Any, limit: int = 40) -> str:
    """A short, one-line repr of a user's value for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


@dataclass
class LabelledData:
    """Texts with their labels (None when unlabelled), the file they came from and each one's line."""

    texts: list[str]
    labels: list[str] | None
    path: str | None = None
    lines: list[int] | None = None  # source line (JSONL/CSV/TXT) or row (Parquet) of each example

    def __post_init__(self) -> None:
        for name in ("labels", "lines"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.texts):
                raise ValueError(f"{name} has {len(values)} items but texts has {len(self.texts)}")

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """sha256 hex of the texts and labels in order; stable across runs and machines."""
        digest = hashlib.sha256(b"potluck-data-v1\n")
        labels = self.labels if self.labels is not None else [None] * len(self.texts)
        for text, label in zip(self.texts, labels, strict=True):
            digest.update(json.dumps([text, label], ensure_ascii=False).encode("utf-8") + b"\n")
        return digest.hexdigest()

    def label_counts(self) -> dict[str, int]:
        """Examples per label, sorted by label; empty when unlabelled."""
        return dict(sorted(Counter(self.labels or []).items()))

    def select(self, indices: Iterable[int]) -> LabelledData:
        """A new LabelledData with the examples at `indices`, in that order."""
        idx = list(indices)

        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in idx]

        return LabelledData(pick(self.texts), pick(self.labels), self.path, pick(self.lines))

    def where(self, i: int) -> int | None:
        """The source line of example `i`, or None when unknown."""
        return None if self.lines is None else self.lines[i]


# ---------------------------------------------------------------- reading


def read_data(path: PathLike, text_column: str = "text", label_column: str | None = "label", *,
              require_labels: bool = True) -> LabelledData:
    """Read labelled examples from a CSV (with header), TSV, JSONL or Parquet file, chosen by suffix.

    With ``label_column=None`` labels are not read. With ``require_labels=False`` a missing label column
    gives ``labels=None`` (and .txt files, one text per non-empty line, are accepted). Raises DataError.
    """
    require_labels = require_labels and label_column is not None
    fmt = _format_of(path, allow_txt=not require_labels)
    p = Path(path)
    if fmt == "parquet":
        rows, columns = _read_parquet(p, text_column, label_column, require_labels)
    elif fmt == "txt":
        rows, columns = [(n, line, None) for n, line in _text_lines(_read_text(p))], (text_column, None)
    elif fmt == "jsonl":
        rows, columns = _read_jsonl(p, _read_text(p), text_column, label_column, require_labels)
    else:
        rows, columns = _read_csv(p, _read_text(p), _DELIMITERS[fmt], text_column, label_column, require_labels)
    if not rows:
        raise DataError("no examples in the file", path=path, hint="Add rows below the header or pick another file")
    data = _build(rows, columns, (text_column, label_column), path)
    logger.debug("read %d examples from %s (%s)", len(data), path, "labelled" if data.labels else "unlabelled")
    return data


def read_texts(path: PathLike, text_column: str = "text", *, label_column: str | None = None) -> LabelledData:
    """Read texts to predict on (labels not required; read only when `label_column` is given and present)."""
    return read_data(path, text_column, label_column, require_labels=False)


def _format_of(path: PathLike, *, allow_txt: bool) -> str:
    """The format of `path` by suffix, after checking the file exists and is a file."""
    p = Path(path)
    if not p.exists():
        shown = "" if p.is_absolute() else f": {p.absolute()}"  # say where a relative path was looked for
        raise DataError(f"no such file{shown}", path=path, hint="Check the path")
    if p.is_dir():
        raise DataError("this is a folder, not a file", path=path, hint="Give the path of a data file inside it")
    known = dict(FORMATS, **(TEXT_ONLY_FORMATS if allow_txt else {}))
    fmt = known.get(p.suffix.lower())
    if fmt is None:
        hint = f"Use one of {', '.join(known)}"
        if p.suffix.lower() in TEXT_ONLY_FORMATS:
            hint = f"A .txt file holds texts without labels; for labelled data use one of {', '.join(known)}"
        raise DataError(f"unsupported file type {p.suffix or '(no suffix)'!r}", path=path, hint=hint)
    return fmt


def _read_text(path: Path) -> str:
    """The file's text, decoded strictly as UTF-8 (a BOM is accepted); DataError names the first bad byte."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read the file ({err.strerror})", path=path, hint="Check its permissions") from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError("the file is UTF-16, not UTF-8", path=path, line=1, hint="Re-save the file as UTF-8")
    body = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        before = body[: err.start]
        line_start = before.rfind(b"\n") + 1
        column = len(before[line_start:].decode("utf-8")) + 1
        raise DataError(f"not UTF-8 at byte 0x{body[err.start]:02x}", path=path, line=before.count(b"\n") + 1,
                        column=column, hint="Re-save the file as UTF-8 (it may be Latin-1 or Windows-1252)") from None
    if not text.strip():
        raise DataError("the file is empty", path=path, hint="Check that it was written completely")
    return text


def _text_lines(text: str) -> Iterable[tuple[int, str]]:
    """(line number, line) for each non-blank line; splits on '\\n' only, like editors count lines."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


Row = tuple[int, Any, Any]  # (line, text value, label value)
Columns = tuple[int | str, int | str | None]  # where the text and the label come from (None: no labels)


def _missing_column(kind: str, name: str, present: Sequence[str], path: PathLike, line: int | None) -> DataError:
    """The error for a column/field that is not there, naming those that are and a likely match."""
    option = "--text-column" if kind == "text" else "--label-column"
    close = difflib.get_close_matches(name, present, n=1, cutoff=0.6)
    close = close or [c for c in present if c.lower() == name.lower()]
    guess = f"Did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(repr(c) for c in present[:20]) + (", ..." if len(present) > 20 else "")
    return DataError(f"no {kind} column {name!r} (the columns are: {shown or 'none'})", path=path, line=line,
                     hint=f"{guess}Pass {option} with the name of the {kind} column")


def _read_csv(path: Path, text: str, delimiter: str, text_column: str, label_column: str | None,
              need_labels: bool) -> tuple[list[Row], Columns]:
    """Rows of a CSV/TSV with a header; line numbers are physical lines (quoted fields may span lines)."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents exceed the 128 KiB default
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[Row] = []
    text_at = label_at = None
    end = 0  # the last physical line read so far
    while True:
        start = end + 1
        try:
            record = next(reader, None)
        except csv.Error as err:
            if "unexpected end of data" in str(err):
                raise DataError("a quoted field that starts here is never closed", path=path, line=start,
                                hint='Close the quote, or double quotes inside a quoted field ("")') from None
            raise DataError(f"malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {err}", path=path,
                            line=reader.line_num, hint='Quote fields that contain quotes, doubling inner ones ("")') from None
        end = reader.line_num
        if record is None:
            break
        if not any(field.strip() for field in record):
            continue  # blank line, or a row of empty fields (spreadsheets export these)
        if header is None:
            header = [name.strip() for name in record]
            text_at = _column_index(header, text_column, "text", path, start)
            label_at = _column_index(header, label_column, "label", path, start) \
                if label_column is not None and (need_labels or label_column in header) else None
            continue
        if len(record) != len(header):
            raise DataError(f"{len(record)} fields where the header has {len(header)}", path=path, line=start,
                            hint="Quote fields that contain the delimiter, and give every row the same columns")
        rows.append((start, record[text_at], None if label_at is None else record[label_at]))
    if header is None:
        raise DataError("the file is empty", path=path, hint="Check that it was written completely")
    return rows, (text_at + 1, None if label_at is None else label_at + 1)


def _column_index(header: list[str], name: str, kind: str, path: Path, line: int) -> int:
    """Index of column `name` in the header; DataError when missing or repeated."""
    if name not in header:
        raise _missing_column(kind, name, header, path, line)
    if header.count(name) > 1:
        raise DataError(f"the header names column {name!r} twice", path=path, line=line,
                        hint="Rename one of them so each column name is unique")
    return header.index(name)


def _read_jsonl(path: Path, text: str, text_column: str, label_column: str | None,
                need_labels: bool) -> tuple[list[Row], Columns]:
    """Rows of a JSONL file: one JSON object per non-blank line."""
    rows: list[Row] = []
    has_labels = False
    for number, line in _text_lines(text):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"malformed JSON: {err.msg}", path=path, line=number, column=err.colno,
                            hint='Write one JSON object per line, like {"text": "...", "label": "..."}') from None
        if not isinstance(obj, dict):
            raise DataError(f"this line is {_kind(obj)}, not a JSON object", path=path, line=number,
                            hint='Write one JSON object per line, like {"text": "...", "label": "..."}')
        if not rows:
            has_labels = label_column is not None and (need_labels or label_column in obj)
        for kind, name, needed in (("text", text_column, True), ("label", label_column, has_labels)):
            if needed and name not in obj:
                raise _missing_column(kind, name, list(obj), path, number)
        rows.append((number, obj[text_column], obj[label_column] if has_labels else None))
    return rows, (text_column, label_column if has_labels else None)


def _read_parquet(path: Path, text_column: str, label_column: str | None,
                  need_labels: bool) -> tuple[list[Row], Columns]:
    """Rows of a Parquet file; the 'line' of each is its 1-based row number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        for kind, name, needed in (("text", text_column, True), ("label", label_column, need_labels)):
            if needed and name not in names:
                raise _missing_column(kind, name, names, path, None)
        label = label_column if label_column is not None and label_column in names else None
        table = pq.read_table(path, columns=[text_column] + ([label] if label else []))
    except (pa.ArrowException, OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot read this Parquet file: {reason}", path=path,
                        hint="Check that it is a complete Parquet file (re-export it, e.g. with pandas.to_parquet)") from None
    texts = table.column(text_column).to_pylist()
    labels = table.column(label).to_pylist() if label else [None] * len(texts)
    return [(i + 1, t, lab) for i, (t, lab) in enumerate(zip(texts, labels, strict=True))], (text_column, label)


def _build(rows: list[Row], columns: Columns, names: tuple[str, str | None], path: PathLike) -> LabelledData:
    """Check each text and label value and gather them into a LabelledData."""
    (text_col, label_col), (text_name, label_name) = columns, names
    texts = [_text_value(value, (path, line, text_col, text_name)) for line, value, _ in rows]
    labels = None if label_col is None else \
        [_label_value(value, (path, line, label_col, label_name)) for line, _, value in rows]
    return LabelledData(texts, labels, os.fspath(path), [line for line, _, _ in rows])


def _value_error(template: str, where: tuple, hint: str, kind: str = "") -> DataError:
    """A DataError about one value; `where` is (path, line, column, column name), `template` has {place}."""
    path, line, column, name = where
    place = f"column {column} ({name!r})" if isinstance(column, int) else f"field {name!r}"
    return DataError(template.format(place=place, kind=kind), path=path, line=line, column=column, hint=hint)


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    kinds = {bool: "true/false", int: "number", float: "number", str: "string", list: "list", dict: "object"}
    return f"a {kinds.get(type(value), type(value).__name__)} ({_show(value)})"


def _text_value(value: Any, where: tuple) -> str:
    """A text as written; DataError when it is missing, empty or not a string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _value_error("empty text in {place}", where, "Fill in the text or remove this example")
    if not isinstance(value, str):
        raise _value_error("the text in {place} is {kind}, not a string", where,
                           "Write the text as a string, or pass --text-column if this is the wrong column", _kind(value))
    return value


def _label_value(value: Any, where: tuple) -> str:
    """A label as a string: whole numbers as digits, booleans as 'true'/'false', whitespace stripped."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # pandas turns integer columns with gaps into floats
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    if value is None or isinstance(value, str) or value != value:  # value != value: NaN, pandas' missing value
        raise _value_error("empty label in {place}", where, "Give every example a label, or remove it")
    raise _value_error("the label in {place} is {kind}", where, "Write each label as a string or a whole number",
                       _kind(value))


# ---------------------------------------------------------------- checks


def _labels_of(data: LabelledData, role: str) -> list[str]:
    """The labels of `data`; DataError when it has none."""
    if data.labels is None:
        raise DataError(f"the {role} data has no labels", path=data.path,
                        hint="Add a label column, or pass --label-column with its name")
    return data.labels


def check_training_data(train: LabelledData, valid: LabelledData | None = None, *,
                        min_per_class: int = 8) -> list[str]:
    """Raise DataError for data a classifier cannot learn from; return (and log) warnings for weak data."""
    labels = _labels_of(train, "training")
    counts = Counter(labels)
    if len(counts) < 2:
        only = f"only one class {next(iter(counts))!r}" if counts else "no examples"
        raise DataError(f"{only} in the training data: a classifier needs at least two labels", path=train.path,
                        hint="Add examples of other classes, or check --label-column")
    small = sorted(((n, name) for name, n in counts.items() if n < min_per_class), key=lambda c: (c[0], c[1]))
    warnings = []
    if small:  # one line however many classes are small; each is listed on --verbose
        shown = ", ".join(f"{name!r} {n}" for n, name in small[:3]) + (", ..." if len(small) > 3 else "")
        warnings.append(f"{train.path or 'train'}: {len(small)} of {len(counts)} classes have fewer than "
                        f"{min_per_class} examples ({shown}): their predictions will be unreliable; add more "
                        "examples" + (" (each is listed with --verbose)" if len(small) > 3 else ""))
        for n, name in small:
            logger.info("class %r has %d example%s", name, n, "s" * (n != 1))
    warnings += _duplicate_warnings(train)
    if valid is not None:
        for i, label in enumerate(_labels_of(valid, "validation")):
            if label not in counts:
                raise DataError(f"label {label!r} in the validation data never appears in the training data",
                                path=valid.path, line=valid.where(i),
                                hint="Add training examples of it, or fix the label")
        seen = set(train.texts)
        leaked = sum(text in seen for text in valid.texts)
        if leaked:
            warnings.append(f"{valid.path or 'valid'}: {leaked} validation text(s) also appear in the training "
                            "data: validation scores will be optimistic")
    for warning in warnings:
        logger.warning("%s", warning)
    return warnings


def _duplicate_warnings(data: LabelledData) -> list[str]:
    """Warnings for texts repeated with conflicting labels, and for exact duplicates."""
    firsts: dict[str, dict[str, int]] = defaultdict(dict)  # text -> label -> first index
    duplicates, conflicts = 0, []
    for i, (text, label) in enumerate(zip(data.texts, data.labels or [], strict=True)):
        seen = firsts[text]
        if label in seen:
            duplicates += 1
        elif seen:
            conflicts.append((next(iter(seen.items())), (label, i)))
        seen.setdefault(label, i)
    name, out = data.path or "data", []
    if conflicts:
        shown = "; ".join(f"lines {data.where(a)} and {data.where(b)} ({la!r} vs {lb!r})"
                          for (la, a), (lb, b) in conflicts[:3])
        out.append(f"{name}: {len(conflicts)} text(s) appear with conflicting labels: {shown}"
                   + ("; ..." if len(conflicts) > 3 else "") + ". Decide on one label for each")
    if duplicates:
        out.append(f"{name}: {duplicates} example(s) are exact duplicates of earlier ones (same text and label)")
    return out


def check_known_labels(data: LabelledData, classes: Sequence[str], *, role: str = "test") -> None:
    """Raise DataError naming the file and line of the first label that is not one of `classes`."""
    known = set(classes)
    for i, label in enumerate(_labels_of(data, role)):
        if label not in known:
            shown = ", ".join(repr(c) for c in list(classes)[:10]) + (", ..." if len(classes) > 10 else "")
            raise DataError(f"label {label!r} in the {role} data is not one of the model's classes", path=data.path,
                            line=data.where(i), hint=f"The model knows {shown}; fix the label or remove the example")


# ---------------------------------------------------------------- splitting


def as_labelled(texts, labels=None) -> LabelledData:
    """texts and labels, a (texts, labels) tuple or a LabelledData, as a LabelledData (labels as strings)."""
    if isinstance(texts, LabelledData):
        return texts
    if isinstance(texts, tuple) and labels is None:
        texts, labels = texts
    return LabelledData(list(texts), [str(y) for y in labels])
