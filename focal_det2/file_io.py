"""Crash-safe file writes, shared by the checkpointer, the dataset validation and the reports."""

import contextlib
import os
import tempfile
from typing import IO, Any, Callable, Iterator

__all__ = ["atomic_open", "atomic_write"]


@contextlib.contextmanager
def atomic_open(path: str, mode: str) -> Iterator[IO]:
    """
    Open ``path`` for writing through a temporary file in its folder, flushed and renamed into
    place when the block ends without an exception (and removed when it raises): a reader, or a
    crash at any moment, sees the old file or the complete new one, never a partial one, and
    processes writing the same content at once cannot interleave.

    Args:
        path: the file to write; its folder must exist.
        mode: the open mode, "w" or "wb".
    """
    folder, name = os.path.split(path)
    fd, tmp_path = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.", suffix=".tmp")
    try:
        # mkstemp's file is private (0600); the result gets the mode open() would give it.
        os.chmod(tmp_path, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[IO], Any], mode: str) -> None:
    """
    Write ``path`` atomically (see :func:`atomic_open`).

    Args:
        path: the file to write; its folder must exist.
        write: called with the open temporary file.
        mode: the open mode, "w" or "wb".
    """
    with atomic_open(path, mode) as f:
        write(f)
