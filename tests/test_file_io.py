"""Atomic writes: complete or absent, with the mode a plain open() would give."""

import os
import stat

import pytest

from focal_det2.file_io import atomic_open, atomic_write


def test_atomic_write_gives_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a.json"), lambda f: f.write("{}"), "w")
        with open(tmp_path / "b.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
    assert os.stat(tmp_path / "a.json").st_mode == os.stat(tmp_path / "b.json").st_mode


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_open(str(path), "wb") as f:
            f.write(b"new, partial")
            raise OSError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.pth"]
