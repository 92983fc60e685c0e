"""A task's vectors file: what an array must be to be a task's vectors, and reading a `.npy` file safely.

Bank folders are written by other tools and people, so nothing here trusts a file: reads are
bounded and never block (a FIFO or a device is refused), a `.npy` header's shape is checked
against the bytes that follow before anything is allocated, and nothing is ever unpickled.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np

from .errors import InvalidPromptError

MAX_VECTORS_BYTES = 256 * 2**20
HASH_DIGITS = 16  # of a vectors file's sha256, in its name and in messages
ALLOWED_DTYPES = ("float32", "float16")
NPY_MAGIC = b"\x93NUMPY"
EXPECTED = "expected a float32/float16 array saved by numpy"
SHAPES = {2: "2 ([prompt length, embedding width])", 4: "4 ([2 * layers, kv heads, prefix length, head size])"}


def validate_vectors(vectors: np.ndarray, where: str, ndim: tuple[int, ...] = (2,)) -> None:
    """Check that an array can be a task's vectors: 2-D (a prompt; 4-D, a prefix, where `ndim` allows it),
    float32/float16, finite, non-empty."""
    if not isinstance(vectors, np.ndarray):
        raise InvalidPromptError(f"{where}: expected a numpy array, got {type(vectors).__name__}")
    if vectors.dtype == object:
        raise InvalidPromptError(f"{where}: object array; expected float32 or float16")
    if vectors.ndim not in ndim:
        expected = " or ".join(SHAPES[n] for n in ndim)
        raise InvalidPromptError(f"{where}: shape {vectors.shape} has {vectors.ndim} dimensions; expected {expected}")
    if vectors.dtype.name not in ALLOWED_DTYPES:
        raise InvalidPromptError(f"{where}: dtype {vectors.dtype}; expected one of {ALLOWED_DTYPES}")
    if 0 in vectors.shape:
        raise InvalidPromptError(f"{where}: empty array of shape {vectors.shape}")
    bad = ~np.isfinite(vectors)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        at = f"row {first[0]}, column {first[1]}" if len(first) == 2 else f"index {list(first)}"
        raise InvalidPromptError(
            f"{where}: {int(bad.sum())} non-finite values (first: {vectors[first]} at {at}); expected finite numbers"
        )


def read_bounded(path: Path, limit: int, what: str, real: Path | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, opened without blocking (a FIFO or a device in a
    bank is refused, never waited on). `real` is `path` with its links resolved and checked (a bank's reader
    confines them): it is what is opened, and a link put there since is refused; messages name `path`."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if real is not None:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(real if real is not None else path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise InvalidPromptError(f"{path}: cannot open {what} ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidPromptError(f"{path}: not a regular file; expected {what}")
        if info.st_size > limit:
            raise InvalidPromptError(f"{path}: {info.st_size} bytes; {what} is at most {limit}")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise InvalidPromptError(f"{path}: grew past {limit} bytes while read; expected {what}")
    return data


def parse_vectors(data: bytes, where: str) -> np.ndarray:
    """A `.npy` prompt from its bytes: the header's shape and dtype are checked against the data's size before
    anything is allocated, and nothing is ever unpickled."""
    if not data.startswith(NPY_MAGIC):
        raise InvalidPromptError(f"{where}: not a .npy file (it does not start with numpy's magic bytes); {EXPECTED}")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
    except Exception:  # numpy parses the header as Python literals: SyntaxError, TokenError, ... on garbage
        # numpy's own text is not passed on: it quotes the file's bytes and advises allow_pickle=True.
        raise InvalidPromptError(
            f"{where}: its .npy header cannot be read (damaged, truncated, or longer than numpy's 10,000-byte limit); {EXPECTED}"
        ) from None
    if dtype.hasobject:
        raise InvalidPromptError(
            f"{where}: holds a pickled or object array; expected a plain float32/float16 array (pickles are never loaded)"
        )
    if dtype.name not in ALLOWED_DTYPES:
        raise InvalidPromptError(f"{where}: dtype {dtype}; expected one of {ALLOWED_DTYPES}")
    count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    size = count * dtype.itemsize
    remaining = len(data) - stream.tell()
    if size != remaining:
        raise InvalidPromptError(
            f"{where}: its header says {shape} {dtype} ({size} bytes) but {remaining} bytes follow; the file is truncated or damaged"
        )
    vectors = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell()).reshape(shape, order="F" if fortran else "C")
    validate_vectors(vectors, where, ndim=(2, 4))
    return vectors


def sha256_hex(data: bytes) -> str:
    """The sha256 of `data` in hex. hashlib is imported here, not with the module: it loads OpenSSL (3.6 MB of a
    process's memory), which a runtime that never reads or writes a task's vectors has no use for."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


def read_vectors(path: Path, sha256: str | None = None, real: Path | None = None) -> np.ndarray:
    """Read a `.npy` prompt, checked against `sha256` (its record's) where given (`real`: as for read_bounded)."""
    try:
        data = read_bounded(path, MAX_VECTORS_BYTES, "a .npy prompt", real=real)
    except FileNotFoundError:
        raise InvalidPromptError(f"{path}: file not found") from None
    if sha256 is not None and sha256_hex(data) != sha256:
        raise InvalidPromptError(
            f"{path}: its sha256 is not the {sha256[:HASH_DIGITS]}... its record names; the file was changed after it was written"
        )
    vectors = np.array(parse_vectors(data, str(path)))  # a copy of its own, not a view of the bytes
    vectors.setflags(write=False)
    return vectors
