"""Read an unlabelled corpus for tokenizer training and pre-training, and pack it into blocks.

    from potluck.corpus import read_corpus
    corpus = read_corpus(["texts/", "emails.jsonl"])            # folders, plain text, JSONL/CSV/TSV/Parquet
    corpus = read_corpus("mails/", per_file=True)               # one document per file instead of per line

Plain-text files (.txt, .text, .md or no suffix) hold one document per non-blank line, or one per file
with `per_file=True`. JSONL, CSV, TSV and Parquet files are read through `potluck.data.read_texts` with
its checks, so the text column of a labelled file works too (labels are ignored: task-adaptive
pre-training). Folders are walked recursively in sorted order; hidden files and files of other types are
skipped (and logged). A missing path, an empty file or corpus, and binary content are `DataError`s.
"""

from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from potluck.data import FORMATS, DataError, LabelledData, _read_text, read_texts

logger = logging.getLogger(__name__)

PLAIN_SUFFIXES = {".txt", ".text", ".md", ""}
SNIFF_BYTES = 8192


@dataclass
class Corpus:
    """Documents (each a string) and the files they came from, with how many documents each gave."""

    documents: list[str]
    files: list[tuple[str, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.documents)

    def fingerprint(self) -> str:
        """sha256 hex of the documents in order (the same digest as unlabelled `LabelledData`)."""
        return LabelledData(self.documents, None).fingerprint()

    def n_characters(self) -> int:
        return sum(len(doc) for doc in self.documents)

    def split(self, fraction: float, *, seed: int = 0) -> tuple[Corpus, Corpus]:
        """(train, held-out): a seeded random share of whole documents, at least one, held out."""
        n = len(self.documents)
        if n < 2:
            raise DataError("the corpus has a single document: nothing can be held out for evaluation",
                            hint="add more text, or split it into one document per line")
        held = max(1, round(fraction * n))
        order = np.random.default_rng(seed).permutation(n)
        held_idx, train_idx = sorted(order[:held].tolist()), sorted(order[held:].tolist())
        return (Corpus([self.documents[i] for i in train_idx], self.files),
                Corpus([self.documents[i] for i in held_idx], self.files))


def read_corpus(paths: str | os.PathLike | Sequence[str | os.PathLike], *, text_column: str = "text",
                per_file: bool = False) -> Corpus:
    """Read every document under `paths` (files or folders). Raises DataError for unusable input."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise DataError("no corpus given", hint="pass --corpus with a file or a folder of text")
    documents: list[str] = []
    files: list[tuple[str, int]] = []
    for path in map(Path, paths):
        for file in _files_of(path):
            if path.is_dir() and file.stat().st_size == 0:
                logger.warning("%s: skipped, the file is empty", file)
                continue
            docs = _read_file(file, text_column, per_file)
            documents.extend(docs)
            files.append((str(file), len(docs)))
    if not documents:
        raise DataError("the corpus has no text", path=paths[0], hint="check that the files hold text")
    logger.info("read %d documents (%d characters) from %d file(s)", len(documents),
                sum(len(d) for d in documents), len(files))
    return Corpus(documents, files)


def _files_of(path: Path) -> list[Path]:
    """The readable files a path stands for; a folder is walked recursively, skipping hidden entries."""
    if not path.exists():
        shown = "" if path.is_absolute() else f": {path.absolute()}"
        raise DataError(f"no such file or folder{shown}", path=path, hint="check the path")
    if path.is_file():
        if _kind(path) is None:
            raise DataError(f"unsupported file type {path.suffix!r}", path=path,
                            hint=f"use plain text (.txt) or one of {', '.join(FORMATS)}")
        return [path]
    found, skipped = [], []
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        (found if _kind(file) is not None else skipped).append(file)
    if skipped:
        logger.warning("%s: skipped %d file(s) of other types (e.g. %s)", path, len(skipped), skipped[0].name)
    if not found:
        raise DataError("the folder holds no text files", path=path,
                        hint=f"put .txt files (or {', '.join(FORMATS)}) in it")
    return found


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in PLAIN_SUFFIXES:
        return "plain"
    return FORMATS.get(suffix)


def _read_file(path: Path, text_column: str, per_file: bool) -> list[str]:
    _check_not_binary(path)
    if _kind(path) != "plain":
        return read_texts(path, text_column).texts
    text = _read_text(path)  # strict UTF-8 with line and column of a bad byte; empty files refused
    if per_file:
        return [text.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_not_binary(path: Path) -> None:
    """Refuse files whose first bytes hold NUL bytes or mostly control characters (images, archives...)."""
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as err:
        raise DataError(f"cannot read the file ({err.strerror})", path=path, hint="check its permissions") from None
    if path.suffix.lower() == ".parquet" or head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return  # Parquet is binary by design; UTF-16 gets its own message from the UTF-8 check
    controls = sum(b < 32 and b not in (9, 10, 12, 13) for b in head)
    if b"\x00" in head or (head and controls / len(head) > 0.1):
        raise DataError("this is a binary file, not text", path=path,
                        hint="give plain text (UTF-8), JSONL, CSV, TSV or Parquet files")


def pack_blocks(documents: Sequence[Sequence[int]], block_size: int, *, cls_id: int, sep_id: int) -> np.ndarray:
    """Pack tokenised documents into full blocks, with no padding: (N, block_size) int64.

    The documents are joined into one stream, each followed by [SEP]; the stream is cut into pieces of
    block_size - 2 tokens and each becomes `[CLS] piece [SEP]`. The tail shorter than a piece is dropped.
    """
    if block_size < 8:
        raise ValueError("block_size must be at least 8")
    lengths = np.fromiter((len(doc) + 1 for doc in documents), dtype=np.int64, count=len(documents))
    stream = np.full(int(lengths.sum()), sep_id, dtype=np.int64)  # (S,) every document's [SEP] pre-filled
    ends = np.cumsum(lengths)
    for doc, end, length in zip(documents, ends, lengths, strict=True):
        stream[end - length:end - 1] = doc
    piece = block_size - 2
    n = len(stream) // piece
    blocks = np.empty((n, block_size), dtype=np.int64)  # (N, block_size)
    blocks[:, 0] = cls_id
    blocks[:, 1:-1] = stream[:n * piece].reshape(n, piece)
    blocks[:, -1] = sep_id
    return blocks
