"""The embedding table in an export's precision: float32, float16, or int8 rows with one scale per row.

The runtime gathers a few rows per step (the new tokens) and never needs the table whole, so a
smaller table costs nothing at run time and saves disk and page cache: int8 is a quarter of
float32 (28 MB instead of 113 MB for the default model). Rows always come back float32, which is
what the graphs and the prompts are, so a prompt is never quantized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ExportFormatError

TABLE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}


class ScaledRows:
    """int8 (or float16) rows read as float32: `table[ids]` dequantizes only the rows asked for."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray | None):
        self.codes = codes
        self.scales = scales
        self.shape = codes.shape
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = np.asarray(self.codes[index], dtype=np.float32)
        if self.scales is None:
            return rows
        return rows * np.asarray(self.scales[index], dtype=np.float32)[..., None]


def quantize_rows(table: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored rows, per-row scales or None) of a float32 [V, E] table; int8 is symmetric, absmax / 127 a row."""
    if dtype == "fp32":
        return np.ascontiguousarray(table, dtype=np.float32), None
    if dtype == "fp16":
        return table.astype(np.float16), None
    if dtype != "int8":
        raise ValueError(f"table dtype {dtype!r}; expected one of {', '.join(TABLE_DTYPES)}")
    scales = np.abs(table).max(axis=1).astype(np.float32) / 127.0
    scales[scales == 0] = 1.0  # an all-zero row (padding) stays zero
    codes = np.clip(np.rint(table / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def open_table(path: Path, scales_path: Path | None, shape: tuple[int, int]) -> np.ndarray | ScaledRows:
    """Map the stored table read-only and check it against `shape`; float32 comes back as a plain array."""
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ExportFormatError(f"{path}: not a readable .npy table ({exc})") from None
    if table.shape != shape or table.dtype not in (np.float32, np.float16, np.int8):
        raise ExportFormatError(
            f"{path}: {table.dtype} {table.shape}; softprompt.json expects {shape} of float32, float16 or int8"
        )
    # A plain ndarray over the same mapping: numpy.memmap's Python-level indexing costs ~30 us a decode step.
    table = table.view(np.ndarray)
    if table.dtype == np.float32:
        return table
    if table.dtype == np.float16:
        return ScaledRows(table, None)
    if scales_path is None or not scales_path.is_file():
        raise ExportFormatError(f"{path}: int8 rows need their scales (files.embedding_scales in softprompt.json)")
    scales = np.load(scales_path, allow_pickle=False)
    if scales.shape != shape[:1] or scales.dtype != np.float32:
        raise ExportFormatError(f"{scales_path}: {scales.dtype} {scales.shape}; expected float32 ({shape[0]},), a scale per row")
    return ScaledRows(table, scales)
