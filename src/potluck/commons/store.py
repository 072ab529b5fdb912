"""A content-addressed blob store: every blob is named by the sha256 of its bytes.

    store = BlobStore("commons/blobs")
    with store.begin(max_bytes=2**30) as pending:     # an upload, streamed
        for chunk in chunks:
            pending.write(chunk)                        # hashed while it is written
        sha = pending.commit()                          # fsync, then rename into place
    path = store.verify(sha)                            # re-hashed on every read

Layout: `sha256/ab/abcdef…` holds complete, verified blobs only; `tmp/<pid>-<random>.part` holds
uploads in flight. A blob appears under its name only by an atomic rename after its bytes were fsynced
and hashed, so a process killed mid-upload leaves at most a temp file, never a half-written blob, and
`sweep()` removes the temp files of processes that are gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
_SHA = re.compile(r"^[0-9a-f]{64}$")


class BlobError(Exception):
    """A blob problem: missing, corrupted on disk, or an upload over its size limit."""


class BlobMissing(BlobError):
    pass


class BlobCorrupted(BlobError):
    pass


class BlobTooLarge(BlobError):
    def __init__(self, limit: int):
        super().__init__(f"larger than the limit of {limit} bytes")
        self.limit = limit


def check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA.match(sha):
        raise BlobMissing(f"not a sha256 hex digest: {sha!r}")
    return sha


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PendingBlob:
    """A blob being written: bytes go to a temp file and into the hash as they arrive."""

    def __init__(self, store: BlobStore, max_bytes: int | None, suffix: str):
        self.store, self.max_bytes = store, max_bytes
        self.path = store.tmp / f"{os.getpid()}-{secrets.token_hex(8)}.part{suffix}"
        self._file = open(self.path, "xb")  # noqa: SIM115 (closed in finish/discard)
        self._digest = hashlib.sha256()
        self.size = 0
        self.sha256: str | None = None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise BlobTooLarge(self.max_bytes)
        self._digest.update(chunk)
        self._file.write(chunk)

    def finish(self) -> str:
        """Flush and fsync the temp file; return its sha256. It can now be read at `self.path`."""
        if self.sha256 is None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.sha256 = self._digest.hexdigest()
        return self.sha256

    def commit(self, expected: str | None = None) -> str:
        """Rename the finished temp file to its content address (after checking `expected`, if given)."""
        sha = self.finish()
        if expected is not None and expected != sha:
            raise BlobCorrupted(f"the bytes received hash to {sha}, not the declared {expected}")
        target = self.store.path(sha)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # the same bytes are already stored
            self.discard()
        else:
            os.replace(self.path, target)
            _fsync_dir(target.parent)
        logger.debug("stored blob %s (%d bytes)", sha, self.size)
        return sha

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> PendingBlob:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.path.exists():  # not committed: leave nothing behind
            self.discard()


class BlobStore:
    """Blobs named by sha256 under `root`; writes are atomic, reads are verified."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs = self.root / "sha256"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        sha = check_sha(sha)
        return self.blobs / sha[:2] / sha

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def size(self, sha: str) -> int:
        return self.path(sha).stat().st_size

    def begin(self, max_bytes: int | None = None, suffix: str = "") -> PendingBlob:
        """Start writing a blob; use as a context manager so a failure leaves nothing behind."""
        return PendingBlob(self, max_bytes, suffix)

    def put_chunks(self, chunks: Iterable[bytes], max_bytes: int | None = None) -> str:
        with self.begin(max_bytes) as pending:
            for chunk in chunks:
                pending.write(chunk)
            return pending.commit()

    def put_bytes(self, data: bytes) -> str:
        return self.put_chunks([data])

    def put_file(self, path: str | os.PathLike) -> str:
        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
        return self.put_chunks(chunks())

    def verify(self, sha: str) -> Path:
        """Re-hash the stored blob; raise BlobMissing or BlobCorrupted, else return its path."""
        path = self.path(sha)
        if not path.is_file():
            raise BlobMissing(f"blob {sha} is not in the store")
        actual = sha256_file(path)
        if actual != sha:
            raise BlobCorrupted(f"blob {sha} is corrupted on disk (its bytes hash to {actual})")
        return path

    def read_bytes(self, sha: str) -> bytes:
        """The blob's bytes, checked against its name."""
        data = self.path(sha).read_bytes() if self.exists(sha) else None
        if data is None:
            raise BlobMissing(f"blob {sha} is not in the store")
        if hashlib.sha256(data).hexdigest() != sha:
            raise BlobCorrupted(f"blob {sha} is corrupted on disk")
        return data

    def list(self) -> list[str]:
        """Every stored blob's sha256 (temp files are never listed)."""
        return sorted(p.name for p in self.blobs.glob("*/*") if _SHA.match(p.name))

    def sweep(self) -> int:
        """Remove temp files left by processes that no longer run (a killed upload); return how many."""
        removed = 0
        for path in self.tmp.iterdir():
            owner = path.name.split("-", 1)[0]
            if owner.isdigit() and (int(owner) == os.getpid() or _alive(int(owner))):
                continue  # an upload still in progress
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        if removed:
            logger.info("removed %d unfinished upload(s) from %s", removed, self.tmp)
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
