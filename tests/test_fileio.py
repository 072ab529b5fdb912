"""Atomic writes leave ordinary files and folders behind, and nothing half-written."""

from __future__ import annotations

import os
import stat

import pytest

from potluck.errors import UserError
from potluck.fileio import _UMASK, atomic_folder, atomic_write_json, check_output


def test_written_files_and_folders_get_the_usual_modes(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    with atomic_folder(tmp_path / "model") as folder:
        (folder / "config.json").write_text("{}")
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o666 & ~_UMASK
    assert stat.S_IMODE(os.stat(tmp_path / "model").st_mode) == 0o777 & ~_UMASK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "model"]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    with atomic_folder(tmp_path / "model") as folder:
        (folder / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "model", overwrite=True) as folder:
        (folder / "v").write_text("2")
        raise RuntimeError("killed half-way")
    assert (tmp_path / "model" / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_nothing_is_replaced_without_overwrite(tmp_path):
    keep = tmp_path / "out" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("x")
    with pytest.raises(UserError, match="already exists and is not empty"), atomic_folder(tmp_path / "out"):
        pytest.fail("nothing may be written")
    assert keep.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_folder(tmp_path / "out", overwrite=True) as folder:
        (folder / "new.txt").write_text("y")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    (tmp_path / "empty").mkdir()
    with atomic_folder(tmp_path / "empty") as folder:  # an empty folder holds nothing to lose
        (folder / "a").write_text("1")
    (tmp_path / "a-file").write_text("data")
    with pytest.raises(UserError, match="is a file, not a folder"), atomic_folder(tmp_path / "a-file", overwrite=True):
        pass
    assert (tmp_path / "a-file").read_text() == "data"


def test_check_output_for_files_and_unwritable_places(tmp_path):
    (tmp_path / "scored.csv").write_text("x")
    with pytest.raises(UserError, match="--output .* already exists"):
        check_output(tmp_path / "scored.csv", folder=False, option="--output")
    assert check_output(tmp_path / "scored.csv", folder=False, overwrite=True) == tmp_path / "scored.csv"
    with pytest.raises(UserError, match="is a folder, not a file"):
        check_output(tmp_path, folder=False, overwrite=True)
    with pytest.raises(UserError, match="not a writable folder"):
        check_output(tmp_path / "scored.csv" / "deeper" / "x")  # its nearest existing parent is a file
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="not a writable folder"):
            check_output(locked / "out")


def test_a_killed_writers_leftovers_are_cleaned_up_and_a_set_aside_folder_restored(tmp_path):
    dead = 2 ** 22 + 12345  # above pid_max on Linux: no such process
    (tmp_path / f".model.pid{dead}.abcd.tmp").mkdir()  # killed while writing
    (tmp_path / f".other.pid{dead}.abcd.tmp").mkdir()  # another folder's: not ours to touch
    (tmp_path / f".model.pid{dead}.old").mkdir()  # killed between moving the old folder aside and the rename
    (tmp_path / f".model.pid{dead}.old" / "v").write_text("old")
    with atomic_folder(tmp_path / "model", overwrite=True) as folder:
        assert (tmp_path / "model" / "v").read_text() == "old"  # put back before anything else
        (folder / "v").write_text("new")
    assert (tmp_path / "model" / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.pid{dead}.abcd.tmp", "model"]
