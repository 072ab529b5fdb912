"""Atomic writes leave ordinary files and folders behind, and nothing half-written."""

from __future__ import annotations

import os
import stat

import pytest

from potluck.fileio import _UMASK, atomic_folder, atomic_write_json


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
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "model") as folder:
        (folder / "v").write_text("2")
        raise RuntimeError("killed half-way")
    assert (tmp_path / "model" / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
