"""Atomic file writes: a reader (or a runtime watching the folder) never sees half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Yield a handle on a hidden temporary file beside `path`, renamed over it on success.

    The temporary name starts with a dot so that folder scanners (the bank) ignore it, and it
    lives in the same folder so that `os.replace` is a rename, not a copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file owner-only; give it the mode a plain open() would (or the replaced file's).
        os.chmod(tmp, _mode_for(path))
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _mode_for(path: Path) -> int:
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is put back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_atomic(path: Path, write: Callable[[IO], object], mode: str = "wb") -> None:
    """Call `write(handle)` on a temporary file and rename it to `path` once complete."""
    with atomic_writer(path, mode) as handle:
        write(handle)
