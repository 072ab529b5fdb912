"""Atomic writes: nothing half-written is ever left where a reader looks.

Files go to a temporary name in the same folder, are fsynced, then renamed over the target (rename is
atomic on POSIX). Folders are built under a temporary name and renamed into place the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from potluck.errors import UserError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: umask is process-wide, setting it later would race threads


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a written file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def check_output(path: str | os.PathLike, *, overwrite: bool = False, folder: bool = True,
                 option: str = "--out") -> Path:
    """Refuse, before any work, an output that would replace what the user did not ask to replace: an
    existing file, or a non-empty folder, needs `overwrite`; a folder path that is a file (or the
    reverse) and a place that cannot be written are refused either way. Returns the path."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise UserError(f"{option} {path} is a file, not a folder", hint=f"choose a folder for {option}")
        if not folder and path.is_dir():
            raise UserError(f"{option} {path} is a folder, not a file", hint=f"choose a file name for {option}")
        if not overwrite and (not folder or any(path.iterdir())):
            what = "already exists and is not empty" if folder else "already exists"
            raise UserError(f"{option} {path} {what}", hint="choose another path, or add --overwrite to replace it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {option} {path}: {parent} is not a writable folder",
                        hint="choose a path you can write to")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `path`, on error it is removed.

    An existing non-empty folder at `path` is replaced only with `overwrite` (else a UserError before
    anything is written); it is moved aside first and deleted only after the new one is in place.
    Temporary folders left by a killed writer (its process gone) are removed on the next write.
    """
    path = Path(path)
    check_output(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; the finished folder gets the usual mode
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.pid{os.getpid()}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_orphans(path: Path) -> None:
    """Clean up after a writer of `path` that was killed (its process N gone): its temporary folders
    `.{name}.pidN.*.tmp` are removed; a folder it had set aside, `.{name}.pidN.old`, is put back if
    nothing took its place, else removed."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.pid(\d+)\.")
    for sibling in sorted(path.parent.iterdir()):
        match = pattern.match(sibling.name)
        if not match or not sibling.is_dir() or _alive(int(match.group(1))):
            continue
        if sibling.name.endswith(".old") and not path.exists():
            os.replace(sibling, path)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
