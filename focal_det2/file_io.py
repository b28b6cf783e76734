"""Crash-safe file writes, shared by the checkpointer and the dataset validation."""

import os
import tempfile
from typing import IO, Any, Callable

__all__ = ["atomic_write"]


def atomic_write(path: str, write: Callable[[IO], Any], mode: str) -> None:
    """
    Write ``path`` through a temporary file in its folder, flushed and renamed into place: a
    reader, or a crash at any moment, sees the old file or the complete new one, never a
    partial one, and processes writing the same content at once cannot interleave.

    Args:
        path: the file to write; its folder must exist.
        write: called with the open temporary file.
        mode: the open mode, "w" or "wb".
    """
    folder, name = os.path.split(path)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise
