"""The commons' blob store and tokens: content addressing, atomic writes, verified reads, names."""

import hashlib
import os
import subprocess
import sys

import pytest

from potluck.commons.auth import check_name, hash_token, new_token, role_allows
from potluck.commons.store import BlobCorrupted, BlobMissing, BlobStore, BlobTooLarge


def test_blobs_are_named_by_their_sha256_and_stored_once(tmp_path):
    store = BlobStore(tmp_path)
    sha = store.put_bytes(b"hello commons")
    assert sha == hashlib.sha256(b"hello commons").hexdigest()
    assert store.path(sha) == tmp_path / "sha256" / sha[:2] / sha
    assert store.read_bytes(sha) == b"hello commons"
    assert store.put_chunks([b"hello ", b"commons"]) == sha  # the same bytes: the same blob
    assert store.list() == [sha]
    assert list(store.tmp.iterdir()) == []


def test_a_corrupted_blob_is_caught_on_read(tmp_path):
    store = BlobStore(tmp_path)
    sha = store.put_bytes(b"x" * 1000)
    store.path(sha).write_bytes(b"y" * 1000)  # bit rot, or someone editing the store
    with pytest.raises(BlobCorrupted):
        store.verify(sha)
    with pytest.raises(BlobCorrupted):
        store.read_bytes(sha)
    with pytest.raises(BlobMissing):
        store.verify("0" * 64)
    with pytest.raises(BlobMissing):
        store.path("../../etc/passwd")


def test_a_failed_or_oversized_write_leaves_nothing(tmp_path):
    store = BlobStore(tmp_path)
    with pytest.raises(BlobTooLarge):
        store.put_chunks([b"a" * 600, b"b" * 600], max_bytes=1000)
    with pytest.raises(RuntimeError), store.begin() as pending:
        pending.write(b"half")
        raise RuntimeError("the client went away")
    with pytest.raises(BlobCorrupted), store.begin() as pending:  # the client declared another hash
        pending.write(b"data")
        pending.commit(expected="0" * 64)
    assert store.list() == [] and list(store.tmp.iterdir()) == []


def test_sweep_removes_uploads_of_dead_processes_only(tmp_path):
    store = BlobStore(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (store.tmp / f"{dead}-abc.part").write_bytes(b"left by a killed server")
    (store.tmp / "junk.part").write_bytes(b"no owner")
    with store.begin() as mine:  # an upload of this (live) process survives the sweep
        mine.write(b"in flight")
        assert store.sweep() == 2
        assert mine.path.exists()
        mine.commit()
    assert list(store.tmp.iterdir()) == [] and len(store.list()) == 1


def test_tokens_are_random_and_stored_hashed():
    a, b = new_token(), new_token()
    assert a != b and a.startswith("pk_") and len(a) > 40
    assert hash_token(a) == hashlib.sha256(a.encode()).hexdigest() != a


def test_names_and_roles():
    assert check_name("acme-urgency") == "acme-urgency"
    for bad in ("Acme", "a", "-acme", "acme_urgency", "x" * 64, "acme/../x", "ac me", ""):
        with pytest.raises(ValueError, match="not allowed"):
            check_name(bad)
    assert role_allows("admin", "contributor") and role_allows("contributor", "reader")
    assert not role_allows("reader", "contributor") and not role_allows("contributor", "admin")


def test_temp_files_are_not_blobs(tmp_path):
    store = BlobStore(tmp_path)
    pending = store.begin()
    pending.write(b"partial")
    assert store.list() == []
    assert os.path.dirname(pending.path) == str(store.tmp)
    pending.discard()
