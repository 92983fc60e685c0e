"""The embedding table in an export's precision: float32, float16, or int8 with a scale per block of 32 values.

The runtime gathers a few rows per step (the new tokens) and never needs the table whole, so a
smaller table costs nothing at run time and saves disk and page cache: int8 is a quarter of
float32 (28 MB, plus 3.5 MB of scales, instead of 113 MB for the default model). Blocks of 32 along
a row, each with its own absmax / 127 scale, as GGUF's Q8_0: a table that came from such a file is
stored exactly, and one outlier costs only its block. Rows always come back float32, which is what
the graphs and the prompts are, so a prompt is never quantized.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportFormatError

TABLE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}


BLOCK = 32
# A table stored as an 8-bit MatMulNBits weight (a tied lm_head's, see FORMAT.md) holds code + 128 as uint8.
TABLE_ZERO_POINT = 128


class ScaledRows:
    """int8 (or float16) rows read as float32: `table[ids]` dequantizes only the rows asked for.

    `scales` is [V, blocks]: row r's values in block b are (codes - zero_point) * scales[r, b], times `factor` where
    it is not 1 (in float32, in that order: a tied lm_head's rows whose table is a multiple of them, as Gemma's).
    """

    def __init__(
        self, codes: np.ndarray | FileRows, scales: np.ndarray | FileRows | None, zero_point: int = 0, factor: float = 1.0
    ):
        self.codes = codes
        self.scales = scales
        self.zero_point = zero_point
        self.factor = np.float32(factor)
        self.shape = codes.shape
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = np.asarray(self.codes[index], dtype=np.float32)
        if self.zero_point:
            rows -= self.zero_point
        if self.scales is None:
            return rows
        scales = np.asarray(self.scales[index], dtype=np.float32)
        blocks = rows.reshape(*rows.shape[:-1], scales.shape[-1], -1) * scales[..., None]
        if self.factor != 1:
            blocks *= self.factor
        return blocks.reshape(rows.shape)


class FileRows:
    """A row-major array [rows, *row] at byte `offset` of a file, whose `[index]` reads only the rows asked for.

    What the runtime gathers a few rows of at every step. Read with pread rather than mapped: a mapping
    keeps every page a row touched resident for as long as it is open (and a freshly written file maps
    in folios of up to 2 MB), so a process's memory grew with the distinct tokens it had seen, up to the
    whole table; read, it holds only the rows of the step. Indexing is numpy's for what the runtime
    uses: an integer, integer arrays of any shape (negative counts from the end) and slices."""

    def __init__(self, path: Path, dtype, offset: int, shape: tuple[int, ...]):
        self.path, self.dtype, self.offset, self.shape = Path(path), np.dtype(dtype), int(offset), tuple(shape)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        weakref.finalize(self, os.close, self._fd)

    def __len__(self) -> int:
        return self.shape[0]

    def __reduce__(self):  # a copy opens the file again (an open descriptor does not travel)
        return FileRows, (self.path, self.dtype, self.offset, self.shape)

    def __getitem__(self, index) -> np.ndarray:
        count = self.shape[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(count)
            if step == 1:
                out = np.empty((max(0, stop - start), *self.shape[1:]), self.dtype)
                self._read(out, start)
                return out
            index = range(start, stop, step)
        shape: tuple[int, ...]
        if isinstance(index, (int, np.integer)):
            shape, rows = (), [int(index)]
        elif isinstance(index, (list, range)) and all(type(i) is int for i in index):
            shape, rows = (len(index),), list(index)
        elif isinstance(index, tuple):  # numpy would index the row's own axes too: nothing here needs that
            raise IndexError(f"rows are read by integer index or slice, one axis only, not {index!r}")
        else:
            ids = np.asarray(index)
            if ids.dtype == np.bool_ or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
                raise IndexError(f"rows are read by integer index or slice, not {ids.dtype} {index!r}")
            shape, rows = ids.shape, ids.reshape(-1).tolist()
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for i, row in enumerate(rows):
            if not -count <= row < count:
                raise IndexError(f"index {row} is out of bounds for axis 0 with size {count}")
            self._read(out[i], row % count)
        return out.reshape(*shape, *self.shape[1:])

    def _read(self, out: np.ndarray, row: int) -> None:
        """Fill `out` (contiguous rows) from row `row` on."""
        if out.nbytes and os.preadv(self._fd, [out.data], self.offset + row * self._row_bytes) != out.nbytes:
            raise ExportFormatError(f"{self.path}: ends inside the table {self.shape} it holds (at row {row} or after)")


ROWS_AT_ONCE = 4096  # rows converted or compared at once: the float temporaries of a whole big table were 3x its size


def row_slices(count: int) -> Iterator[slice]:
    """Slices of ROWS_AT_ONCE rows covering `count` rows, in order."""
    return (slice(start, start + ROWS_AT_ONCE) for start in range(0, count, ROWS_AT_ONCE))


def read_rows(path: Path, dtype, offset: int, width: int, start: int, stop: int) -> np.ndarray:
    """Rows `start:stop` of a row-major [*, width] array at byte `offset` of the file at `path`, by a plain read: not
    mapped, since a mapping keeps every page it touched resident until it is closed."""
    dtype = np.dtype(dtype)
    found = np.fromfile(path, dtype, max(0, stop - start) * width, offset=offset + start * width * dtype.itemsize)
    return found.reshape(-1, width)


class TableFile:
    """A float32 [V, E] table in a .npy file, read a slice of rows at a time (`table[start:stop]`) by plain reads.

    For a pass over a whole large table beside everything else an export holds: through a mapping,
    every page the pass touched stays resident while the mapping is open (the whole table, 0.64 GB
    for a 262k vocabulary); read, a pass holds one slice."""

    def __init__(self, path: Path):
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)  # the header: shape, dtype, where the rows start
        self.path, self.shape, self.dtype, self.offset = Path(path), mapped.shape, mapped.dtype, mapped.offset
        del mapped

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, part: slice) -> np.ndarray:
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise TypeError(f"TableFile reads contiguous slices of rows, not {part!r}")
        start, stop, _ = part.indices(self.shape[0])
        return read_rows(self.path, self.dtype, self.offset, self.shape[1], start, stop)


def equal_rows(rows, table: np.ndarray) -> bool:
    """Whether `rows` (an array, or ScaledRows, which dequantizes what is read) equal `table` exactly, compared a
    slice of rows at a time."""
    return all(np.array_equal(rows[part], table[part]) for part in row_slices(len(table)))


def quantize_rows(table: np.ndarray | TableFile, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored rows, scales or None) of a float32 [V, E] table (an array, or a TableFile at fp16 and int8, which
    are made a slice of rows at a time); int8 is symmetric, absmax / 127 per block of 32 (of the whole row where E is
    not a multiple of 32)."""
    if dtype == "fp32":
        return np.ascontiguousarray(table, dtype=np.float32), None
    if dtype == "fp16":
        half = np.empty(table.shape, np.float16)
        for part in row_slices(len(table)):
            half[part] = table[part]
        return half, None
    if dtype != "int8":
        raise ValueError(f"table dtype {dtype!r}; expected one of {', '.join(TABLE_DTYPES)}")
    vocab, width = table.shape
    block = BLOCK if width % BLOCK == 0 else width
    codes = np.empty((vocab, width), np.int8)
    scales = np.empty((vocab, width // block), np.float32)
    for part in row_slices(vocab):
        blocks = np.asarray(table[part], dtype=np.float32).reshape(-1, width // block, block)
        scale = np.abs(blocks).max(axis=2) / np.float32(127.0)
        scale[scale == 0] = 1.0  # an all-zero block (padding) stays zero
        scales[part] = scale
        codes[part] = np.clip(np.rint(blocks / scale[..., None]), -127, 127).reshape(-1, width)
    return codes, scales


def exact_int8(table: np.ndarray | TableFile) -> tuple[np.ndarray, np.ndarray] | None:
    """`quantize_rows(table, "int8")` where those rows give `table` back exactly (a table from a Q8_0 GGUF tensor,
    whose blocks are symmetric int8 over 32 values), else None."""
    vocab, width = table.shape
    if width % BLOCK:
        return None
    codes = np.empty((vocab, width), np.int8)
    scales = np.empty((vocab, width // BLOCK), np.float32)
    for part in row_slices(vocab):  # stopping at the first slice that is not exact: most tables are not, from row 0
        rows = np.asarray(table[part], dtype=np.float32)
        made = quantize_rows(rows, "int8")
        if not np.array_equal(ScaledRows(*made)[:], rows):
            return None
        codes[part], scales[part] = made
    return codes, scales


def open_table(
    path: Path, scales_path: Path | None, shape: tuple[int, int], in_graph: dict[str, Any] | None = None
) -> np.ndarray | ScaledRows:
    """Open the stored table read-only and check it against `shape`: float32 comes back as a plain array over a
    mapping of the file, the smaller precisions as ScaledRows over rows read from the file (FileRows).

    `in_graph` (softprompt.json's `table_in_graph`) says the rows are a tied lm_head's weights inside
    the graph's data file `path`: uint8 codes and float32 (or, with `scales_dtype`, float16) scales at the offsets it
    gives, times its `factor` where it has one."""
    if in_graph is not None:
        return _open_in_graph(path, shape, in_graph)
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ExportFormatError(f"{path}: not a readable .npy table ({exc})") from None
    if table.shape != shape or table.dtype not in (np.float32, np.float16, np.int8):
        raise ExportFormatError(
            f"{path}: {table.dtype} {table.shape}; softprompt.json expects {shape} of float32, float16 or int8"
        )
    if table.dtype == np.float32:
        # A plain ndarray over the same mapping: numpy.memmap's Python-level indexing costs ~30 us a decode step.
        return table.view(np.ndarray)
    if table.dtype == np.float16:
        return ScaledRows(_rows(table), None)
    if scales_path is None or not scales_path.is_file():
        raise ExportFormatError(f"{path}: int8 rows need their scales (files.embedding_scales in softprompt.json)")
    try:
        scales = np.load(scales_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ExportFormatError(f"{scales_path}: not a readable .npy file ({exc})") from None
    if scales.ndim != 2 or scales.shape[0] != shape[0] or shape[1] % scales.shape[1] or scales.dtype != np.float32:
        raise ExportFormatError(
            f"{scales_path}: {scales.dtype} {scales.shape}; expected float32 ({shape[0]}, blocks), a scale per block of a row"
        )
    return ScaledRows(_rows(table), _rows(scales))


def _rows(mapped: np.memmap) -> FileRows | np.ndarray:
    """A mapped .npy array read by rows (`file_rows`); one in Fortran order stays the mapping."""
    if not mapped.flags.c_contiguous or mapped.filename is None:
        return mapped.view(np.ndarray)
    return file_rows(Path(mapped.filename), mapped.dtype, mapped.offset, mapped.shape)


def file_rows(path: Path, dtype, offset: int, shape: tuple[int, ...]) -> FileRows | np.ndarray:
    """Rows read from the file where the system has pread (every POSIX system); elsewhere a mapping of them."""
    if hasattr(os, "preadv"):
        return FileRows(path, dtype, offset, shape)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape).view(np.ndarray)


def _open_in_graph(path: Path, shape: tuple[int, int], in_graph: dict[str, Any]) -> ScaledRows:
    vocab, width = shape
    if width % BLOCK:
        raise ExportFormatError(f"{path}: a table inside the graph has blocks of {BLOCK}; the width {width} is no multiple")
    size = path.stat().st_size
    codes_at, scales_at = in_graph["codes_offset"], in_graph["scales_offset"]
    scale_type = np.dtype(str(in_graph.get("scales_dtype", "float32")))
    codes_end, scales_end = codes_at + vocab * width, scales_at + vocab * (width // BLOCK) * scale_type.itemsize
    if codes_end > size or scales_end > size or (codes_at < scales_end and scales_at < codes_end):
        raise ExportFormatError(
            f"{path}: table_in_graph puts {vocab}x{width} codes at {codes_at} and their scales at {scales_at}, "
            f"which do not fit apart in its {size} bytes; the file is not the one the export wrote"
        )
    codes = file_rows(path, np.uint8, codes_at, (vocab, width))
    scales = file_rows(path, scale_type, scales_at, (vocab, width // BLOCK))
    return ScaledRows(codes, scales, in_graph["zero_point"], in_graph.get("factor", 1.0))
