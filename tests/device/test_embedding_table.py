"""The embedding table stored small (int8 with a scale per row, or float16) and read back as float32 rows.

Torch-free: the committed tiny export's table is re-stored in each dtype and served by the runtime.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from softprompt.formats.embedding_table import ScaledRows, quantize_rows
from softprompt.formats.errors import ExportFormatError
from softprompt.formats.export_folder import open_export
from softprompt.runtime import load

from conftest import TEXTS

FIXTURE = Path(__file__).resolve().parents[1] / "fixture" / "export"


def restored(tmp_path: Path, dtype: str) -> Path:
    """The fixture export with its table stored in `dtype`, as export-model --precision writes it."""
    folder = tmp_path / dtype
    shutil.copytree(FIXTURE, folder)
    rows, scales = quantize_rows(np.load(FIXTURE / "embeddings.npy"), dtype)
    np.save(folder / "embeddings.npy", rows)
    config = json.loads((folder / "softprompt.json").read_text())
    if scales is not None:
        np.save(folder / "embedding_scales.npy", scales)
        config["files"]["embedding_scales"] = "embedding_scales.npy"
    (folder / "softprompt.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("dtype", "bound"), [("int8", 0.5 / 127), ("fp16", 2.0**-11)])
def test_rows_come_back_float32_within_the_dtypes_step(tmp_path, dtype, bound):
    table = np.load(FIXTURE / "embeddings.npy")
    stored = open_export(restored(tmp_path, dtype)).table
    assert isinstance(stored, ScaledRows) and stored.shape == table.shape
    ids = np.array([[0, 5, 7], [3, 3, 1]])
    rows = stored[ids]
    assert rows.dtype == np.float32 and rows.shape == (2, 3, table.shape[1])
    width = table.shape[1]
    block = 32 if width % 32 == 0 else width
    grouped = table[ids].reshape(2, 3, width // block, block)
    scale = np.repeat(np.abs(grouped).max(axis=-1), block, axis=-1)  # int8: a step of absmax / 127 per block
    assert (np.abs(rows - table[ids]) <= bound * scale * 1.0001).all()
    np.testing.assert_array_equal(stored[5], rows[0, 1])  # one id, a list of ids and a 2-D array agree
    np.testing.assert_array_equal(stored[[5, 7]], rows[0, 1:])


def test_int8_is_a_quarter_of_float32_and_serves_the_same_tokens(tmp_path):
    folder = restored(tmp_path, "int8")
    size = (folder / "embeddings.npy").stat().st_size + (folder / "embedding_scales.npy").stat().st_size
    assert size < 0.3 * (FIXTURE / "embeddings.npy").stat().st_size
    fp32, int8 = load(FIXTURE), load(folder)
    want = fp32.logits(TEXTS[0])
    got = int8.logits(TEXTS[0])
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert [c.token_ids for c in int8.complete(TEXTS, max_new_tokens=4)] == [
        c.token_ids for c in fp32.complete(TEXTS, max_new_tokens=4)
    ]


def test_an_all_zero_row_stays_zero():  # and a width that is no multiple of 32 gets one scale a row
    codes, scales = quantize_rows(np.array([[0.0, 0.0], [1.0, -2.0]], np.float32), "int8")
    np.testing.assert_array_equal(ScaledRows(codes, scales)[0], [0.0, 0.0])
    np.testing.assert_allclose(ScaledRows(codes, scales)[1], [1.0, -2.0], rtol=0.01)


def test_int8_rows_without_their_scales_are_refused(tmp_path):
    folder = restored(tmp_path, "int8")
    config = json.loads((folder / "softprompt.json").read_text())
    del config["files"]["embedding_scales"]
    (folder / "softprompt.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError, match="int8 rows need their scales"):
        open_export(folder)
    config["files"]["embedding_scales"] = "embedding_scales.npy"
    (folder / "softprompt.json").write_text(json.dumps(config))
    np.save(folder / "embedding_scales.npy", np.ones(3, np.float32))
    with pytest.raises(ExportFormatError, match=r"float32 \(3,\); expected float32 \(\d+, blocks\), a scale per block"):
        open_export(folder)


def test_a_table_on_a_q8_0_grid_is_stored_exactly():
    """GGUF's Q8_0 stores blocks of 32 as int8 times absmax / 127: such a table comes back bit for bit."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (10, 64)).astype(np.float32)
    codes[:, ::32] = 127  # each block reaches its absmax
    table = (codes.reshape(10, 2, 32) * rng.uniform(0.001, 0.01, (10, 2, 1)).astype(np.float32)).reshape(10, 64)
    stored, scales = quantize_rows(table, "int8")
    assert scales.shape == (10, 2)
    np.testing.assert_allclose(ScaledRows(stored, scales)[np.arange(10)], table, rtol=1e-6, atol=0)


@pytest.mark.parametrize("off", [None, 0, -1])
def test_exact_int8_finds_a_q8_0_table_and_refuses_one_off_by_a_single_value(off, monkeypatch):
    """`exact_int8` gives the int8 rows of a table on a Q8_0 grid, checked a slice at a time (slices of 4 rows
    here), and None once any value, in the first slice or the last row, is off the grid."""
    from softprompt.formats import embedding_table
    from softprompt.formats.embedding_table import exact_int8

    monkeypatch.setattr(embedding_table, "ROWS_AT_ONCE", 4)
    rng = np.random.default_rng(1)
    codes = rng.integers(-127, 128, (10, 64)).astype(np.float32)
    codes[:, ::32] = 127
    scale = (np.float32(2) ** rng.integers(-9, -5, (10, 2, 1))).astype(np.float32)  # powers of two: exact products
    table = (codes.reshape(10, 2, 32) * scale).reshape(10, 64)
    if off is not None:
        table[off, 5] += scale[off, 0, 0] / 2  # half a step: no int8 code holds it
    found = exact_int8(table)
    if off is not None:
        assert found is None
        return
    assert found is not None
    assert np.array_equal(found[0], codes.astype(np.int8)) and np.array_equal(ScaledRows(*found)[:], table)


def test_rows_read_from_the_file_index_as_numpy_does(tmp_path):
    """FileRows is what a quantized table's codes and scales are at run time: every index the runtime or a user
    gives it (an id, ids of any shape, negative ids, slices) gives numpy's answer, and a copy reads the same file."""
    import pickle

    from softprompt.formats.embedding_table import FileRows

    array = np.random.default_rng(2).integers(-128, 128, (11, 3, 4)).astype(np.int8)
    np.save(tmp_path / "rows.npy", array)
    header = np.load(tmp_path / "rows.npy", mmap_mode="r").offset
    rows = FileRows(tmp_path / "rows.npy", np.int8, header, array.shape)
    indexes = [0, 10, -1, -11, np.int64(4), [3], [2, 2, 9], np.array([[0, 5], [7, 10]]), np.array([], np.int64), []]
    indexes += [slice(None), slice(2, 7), slice(7, 2), slice(None, None, 3), slice(None, None, -2), range(1, 4)]
    for index in indexes:
        got, want = rows[index], array[list(index) if isinstance(index, range) else index]
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), index
    for bad in (11, -12, [0, 11]):
        with pytest.raises(IndexError, match="out of bounds for axis 0 with size 11"):
            rows[bad]
    for bad in (np.array([0.5]), np.array([True] * 11), (1, 0)):
        with pytest.raises(IndexError, match="integer index or slice"):
            rows[bad]
    assert np.array_equal(pickle.loads(pickle.dumps(rows))[[4, 1]], array[[4, 1]])


def test_a_table_read_by_rows_is_not_mapped_and_a_file_cut_short_is_named(tmp_path):
    """A mapping keeps every page a row touched resident while it is open, so the process's memory grew with the
    tokens it had seen: the int8 table and its scales are read by rows and nothing of them stays mapped."""
    from softprompt.formats.embedding_table import FileRows

    folder = restored(tmp_path, "int8")
    table = open_export(folder).table
    assert isinstance(table.codes, FileRows) and isinstance(table.scales, FileRows)
    table[np.arange(len(table))]
    maps = Path("/proc/self/maps").read_text()
    assert str(folder / "embeddings.npy") not in maps and str(folder / "embedding_scales.npy") not in maps
    with open(folder / "embeddings.npy", "r+b") as cut:  # the file shortened under the open table
        cut.truncate(table.codes.offset + 2 * table.shape[1])
    assert table[[0, 1]].shape == (2, table.shape[1])
    with pytest.raises(ExportFormatError, match=r"embeddings\.npy: ends inside the table \(\d+, \d+\) it holds"):
        table[[2]]
