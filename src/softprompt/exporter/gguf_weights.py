"""`--precision gguf`: a GGUF model's weights in its own quantization, every block as the file stores it.

transformers dequantizes a GGUF to float32 (gguf-py's `dequantize`), which is what the fp32 graph holds. Here each
constant matrix product of that graph is traced back to the GGUF rows it was made of, by value: a column of the
graph's weight is a row of some tensor, perhaps permuted (Llama's query/key rows, reordered for rotary
embeddings), packed beside others (query/key/value, gate/up), or scaled by a power of two (queries pre-scaled by
1/sqrt(head size)). So no table of tensor names per architecture is needed, and nothing that was not exactly a
GGUF row is taken for one. The matched rows' blocks are then stored as onnxruntime holds them exactly
(`blocked.py`):

| GGUF | stored | values |
|---|---|---|
| Q4_0, Q3_K | 4-bit codes, integer zero point | d (q - 8); d sc (q - 4) in blocks of 16 |
| Q4_1, Q4_K, Q2_K | 4-bit codes, float minimum | d q + m; d sc q - dmin m (Q2_K: blocks of 16) |
| Q5_0, Q8_0, Q6_K | 8-bit codes, integer zero point | d (q - 16); d q; d sc (q - 32) in blocks of 16 |
| Q5_1, Q5_K | 8-bit codes, float minimum | d q + m; d sc q - dmin m |

Every value comes back bit for bit as gguf-py computes it (`Blocks.dequantize`, checked per weight). A weight whose
columns are not all found, or whose type has no such form (IQ*, TQ*, float16), stays float32, and the export
says how many did.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from softprompt.formats.embedding_table import ScaledRows, equal_rows, exact_int8, row_slices

from .blocked import Blocks, merge, product
from .errors import ExportError
from .lazy_weights import release, view
from .tied_table import table_scale

QK_K = 256
CHUNK_ROWS = 8192  # rows dequantized at once while indexing (a 150k-row table would be 0.5 GB at once)
VALUES_AT_ONCE = 1 << 22  # values decoded into blocks at once


def _q4_0(blocks, n):
    d = _f16(blocks[:, :2])
    return _nibbles(blocks[:, 2:]), d, None, 8, 4, 32


def _q4_1(blocks, n):
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return _nibbles(blocks[:, 4:]), d, m, None, 4, 32


def _q5_0(blocks, n):
    d = _f16(blocks[:, :2])
    return _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4), d, None, 16, 8, 32


def _q5_1(blocks, n):
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4), d, m, None, 8, 32


def _q8_0(blocks, n):
    d = _f16(blocks[:, :2])
    return (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, None, 128, 8, 32


def _q2_k(blocks, n):
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = d * (scales & 0xF).astype(np.float32)
    ml = dmin * (scales >> 4).astype(np.float32)
    codes = (qs.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    return codes.reshape(n, QK_K), dl, -ml, None, 4, 16


def _q3_k(blocks, n):
    hmask, qs, packed, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
    low = (packed[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    high = (packed[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    scales = ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.int8) - np.int8(32)
    dl = d * scales.astype(np.float32)
    ql = (qs.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)).reshape(n, 16, 16) & 1
    codes = ql + ((qh & 1) << 2)  # q = ql - 4 (1 - h): code q + 4 = ql + 4 h, in 0..7
    return codes.reshape(n, QK_K).astype(np.uint8), dl, None, 4, 4, 16


def _k_scales(blocks, n):
    """Q4_K/Q5_K's d x 6-bit scale and dmin x 6-bit minimum per sub-block of 32 (gguf-py's get_scale_min)."""
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    packed = blocks[:, 4:16].reshape(n, 3, 4)
    dd, mm, md = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = np.concatenate([dd & 0x3F, (md & 0x0F) | ((dd >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([mm & 0x3F, (md >> 4) | ((mm >> 2) & 0x30)], axis=-1)
    return d * sc.astype(np.float32), -(dmin * mins.astype(np.float32))


def _q4_k(blocks, n):
    scales, mins = _k_scales(blocks, n)
    codes = blocks[:, 16:].reshape(n, -1, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (codes & 0x0F).reshape(n, QK_K), scales, mins, None, 4, 32


def _q5_k(blocks, n):
    scales, mins = _k_scales(blocks, n)
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    low = (qs.reshape(n, -1, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)).reshape(n, 8, 32) & 0x0F
    high = (qh.reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)).reshape(n, 8, 32) & 1
    return (low | (high << 4)).reshape(n, QK_K), scales, mins, None, 8, 32


def _q6_k(blocks, n):
    ql, qh, sc, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], _f16(blocks[:, 208:210])
    scales = d * sc.view(np.int8).astype(np.float32)
    low = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)).reshape(n, -1, 32) & 0x0F
    high = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)).reshape(n, -1, 32) & 3
    return (low | (high << 4)).reshape(n, QK_K), scales, None, 32, 8, 16


# type name -> (bytes of one block -> codes [blocks, values], scales [blocks, sub], mins or None, zero point or
# None, bits stored, values per scale)
DECODERS: dict[str, Callable] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def _f16(pair: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pair).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: the low nibbles are values 0-15, the high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian uint32) -> the fifth bit of each of 32 values."""
    bits = np.ascontiguousarray(qh).view(np.uint32) >> np.arange(32, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def decode(data: np.ndarray, kind: str) -> Blocks:
    """A GGUF tensor's rows (uint8 [rows, bytes per row]) as `Blocks` (N = rows, K = values per row), decoded a slice
    of rows at a time (a decoder's temporaries are several times its codes: a whole 150k-row table's were 1.2 GB)."""
    if kind not in DECODERS:
        raise ExportError(f"GGUF type {kind} has no blocked form here; expected one of {', '.join(DECODERS)}")
    import gguf

    rows = data.shape[0]
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    width = data.shape[1] // block_bytes * block_values
    step = max(1, VALUES_AT_ONCE // width)
    out: Blocks | None = None
    for start in range(0, rows, step):
        part = slice(start, start + step)
        blocks = np.ascontiguousarray(data[part], dtype=np.uint8).reshape(-1, block_bytes)
        codes, scales, mins, zero_point, bits, block = DECODERS[kind](blocks, blocks.shape[0])
        if out is None:
            shape = (rows, width // block)
            out = Blocks(
                np.empty((rows, width), np.uint8),
                np.empty(shape, np.float32),
                None if mins is None else np.empty(shape, np.float32),
                None if zero_point is None else np.full(shape, zero_point, np.uint8),
                bits,
                block,
            )
        n = len(out.codes[part])
        out.codes[part] = codes.reshape(n, width)
        out.scales[part] = scales.reshape(n, -1)
        if out.mins is not None:
            out.mins[part] = mins.reshape(n, -1)
    assert out is not None, "a GGUF tensor has rows"
    return out


def _rows(blocks: Blocks, index: np.ndarray, shift: np.ndarray) -> Blocks:
    """Rows `index` of `blocks`, each scaled by 2**shift (exact)."""
    factor = np.ldexp(np.float32(1), shift.astype(np.int32))[:, None].astype(np.float32)
    taken = blocks.take(index)
    taken.scales = taken.scales * factor
    if taken.mins is not None:
        taken.mins = taken.mins * factor
    return taken


def _keys(rows: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Each row's hash after scaling it so its largest magnitude lies in [0.5, 1), and that power of two: rows
    equal up to a power-of-two factor get one key."""
    _, exponents = np.frexp(np.abs(rows).max(axis=1))
    normal = np.ldexp(rows, -exponents[:, None])
    return [hash(row.tobytes()) for row in normal], exponents


@dataclasses.dataclass
class GGUFRows:
    """Where each distinct row of a GGUF file's blocked tensors is: key -> (tensor, row, power of two)."""

    path: Path
    index: dict[int, tuple[str, int, int]]
    kinds: dict[str, str]  # tensor -> type name, for every 2-D tensor
    places: dict[str, tuple[int, int, int]]  # blocked tensor -> (offset in the file, rows, bytes per row)

    def data(self, name: str) -> np.ndarray:
        """The tensor's bytes [rows, bytes per row], mapped from the file."""
        offset, rows, row_bytes = self.places[name]
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(rows, row_bytes))

    def blocks(self, name: str) -> Blocks:
        return decode(self.data(name), self.kinds[name])


def _data(tensor) -> np.ndarray:
    """A 2-D GGUF tensor's bytes as [rows, bytes per row] (its shape lists the row length first)."""
    return np.asarray(tensor.data).reshape(int(tensor.shape[1]), -1)


def index_rows(path: Path, progress=lambda items, total: items) -> GGUFRows:
    """Hash every row of every 2-D tensor stored in a type `decode` knows. gguf-py's reader is not kept: it holds
    every field's parts as arrays (a 150k-token vocabulary's: 0.5 GB)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    index: dict[int, tuple[str, int, int]] = {}
    places: dict[str, tuple[int, int, int]] = {}
    tensors = [t for t in reader.tensors if kinds.get(t.name) in DECODERS]
    for tensor in progress(tensors, len(tensors)):
        data = _data(tensor)
        places[tensor.name] = (int(tensor.data_offset), *map(int, data.shape))
        for start in range(0, data.shape[0], CHUNK_ROWS):
            values = gguf.quants.dequantize(data[start : start + CHUNK_ROWS], tensor.tensor_type)
            keys, exponents = _keys(values.reshape(values.shape[0], -1))
            for row, (key, exponent) in enumerate(zip(keys, exponents), start):
                index.setdefault(key, (tensor.name, row, int(exponent)))
    return GGUFRows(Path(path), index, kinds, places)


def keep_gguf_blocks(model, rows: GGUFRows, skip: set[str] = frozenset(), base: Path | None = None) -> dict[str, int]:
    """Replace each constant MatMul of `model` (but `skip`) whose weight is made of GGUF rows by its blocks, in place;
    returns counts: products per stored form ("q4" 4-bit, "q8" 8-bit, "+min" with float minimums) and those left
    float32 ("fp32_kept": not made of rows of the file's blocked tensors)."""

    from .graph_rewrites import drop_unused_initializers, use_contrib_ops

    initializers = {t.name: t for t in model.graph.initializer}
    readers = Counter(i for n in model.graph.node for i in n.input)
    counts: Counter = Counter()
    cache: dict[str, Blocks] = {}
    nodes, added = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers or node.name in skip:
            nodes.append(node)
            continue
        tensor = initializers[node.input[1]]
        weight = view(tensor, base)
        blocks = _match(weight, rows, cache) if weight.ndim == 2 else "fp32_kept"
        if isinstance(blocks, str):
            counts[blocks] += 1
            nodes.append(node)
            continue
        more, weights = product(node, node.input[1], blocks)
        nodes += more
        added += weights
        counts[f"q{blocks.bits}{'+min' if blocks.mins is not None else ''}"] += 1
        del weight, blocks
        if readers[node.input[1]] == 1:  # its float32 bytes go now, not after the last product (a 0.5B model: 1.9 GB)
            release(tensor)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(added)
    drop_unused_initializers(model)
    use_contrib_ops(model)
    return dict(sorted(counts.items()))


def _match(weight: np.ndarray, rows: GGUFRows, cache: dict[str, Blocks]) -> Blocks | str:
    """`weight` [K, N] as blocks of the GGUF rows its columns are, or why not (a count's name)."""
    found: list = []
    exponents = []
    for start in range(0, weight.shape[1], CHUNK_ROWS):  # in slices: a lm_head's columns are a vocabulary
        keys, shifts = _keys(np.ascontiguousarray(weight[:, start : start + CHUNK_ROWS].T, dtype=np.float32))
        found += [rows.index.get(key) for key in keys]
        exponents.append(shifts)
    if any(f is None for f in found):
        return "fp32_kept"
    exponent = np.concatenate(exponents)
    parts, start = [], 0
    for end in range(1, len(found) + 1):
        if end < len(found) and found[end][0] == found[start][0]:
            continue
        name = found[start][0]
        if name not in cache:
            if len(cache) >= 4:  # a product packs a few tensors at most (query, key, value); keep memory to those
                cache.pop(next(iter(cache)))
            cache[name] = rows.blocks(name)
        index = np.array([f[1] for f in found[start:end]])
        shift = exponent[start:end] - np.array([f[2] for f in found[start:end]])
        parts.append(_rows(cache[name], index, shift))
        start = end
    blocks = merge(parts)
    for start in range(0, weight.shape[1], CHUNK_ROWS):  # a hash that collided, or a scale that over/underflowed
        part = slice(start, start + CHUNK_ROWS)
        if not np.array_equal(blocks.take(part).dequantize(), weight[:, part]):
            return "fp32_kept"
    return blocks


def gguf_table(table: np.ndarray, rows: GGUFRows) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(dtype, stored rows, scales or None): the smallest form of the embedding table that gives it back: int8 as the
    exporter makes it (a Q8_0 table), int8 from the file's own blocks (Q4_0, Q5_0, Q3_K, Q6_K), those blocks times the
    model's embedding scale (Gemma's sqrt(width), to float32 rounding), float16, or float32; all but the scaled blocks
    exactly."""
    found = exact_int8(table) or table_rows(table, rows) or scaled_table_rows(table, rows)
    if found is not None:
        return "int8", *found
    half = table.astype(np.float16)
    if np.array_equal(half.astype(np.float32), table):
        return "fp16", half, None
    return "fp32", np.ascontiguousarray(table, dtype=np.float32), None


def _int8_codes(blocks: Blocks) -> np.ndarray | None:
    """Blocks with integer zero points as the int8 table's codes (code - zero point), where they fit int8's range."""
    if blocks.mins is not None:
        return None
    codes = np.empty(blocks.codes.shape, np.int8)
    for part in row_slices(len(codes)):  # in slices: int16 temporaries of a whole table were 4x its codes
        wide = blocks.codes[part].astype(np.int16) - np.repeat(blocks.zero_points[part], blocks.block, axis=1)
        if wide.min() < -127 or wide.max() > 127:
            return None
        codes[part] = wide
    return codes


def _largest_at(table: np.ndarray) -> tuple[int, int]:
    """(row, column) of `table`'s largest magnitude, a slice of rows at a time."""
    best, at = -1.0, (0, 0)
    for part in row_slices(len(table)):
        magnitude = np.abs(table[part])
        flat = int(np.argmax(magnitude))
        if magnitude.flat[flat] > best:
            best, at = float(magnitude.flat[flat]), (part.start + flat // table.shape[1], flat % table.shape[1])
    return at


def _largest_diff(rows, table: np.ndarray) -> float:
    """max |rows[:] - table|, read a slice of rows at a time (`rows` dequantizes what is asked: a whole table's
    float32 temporaries were 3x its size); NaN where any difference is."""
    worst = 0.0
    for part in row_slices(len(table)):
        diff = float(np.abs(rows[part] - table[part]).max())
        if np.isnan(diff):
            return diff
        worst = max(worst, diff)
    return worst


def table_rows(table: np.ndarray, rows: GGUFRows) -> tuple[np.ndarray, np.ndarray] | None:
    """The embedding table as int8 codes and a scale per block taken from the GGUF's own blocks (Q4_0, Q5_0, Q8_0:
    blocks of 32; Q3_K, Q6_K: of 16; code - zero point), when they give `table` exactly; None otherwise (types with
    float minimums, which the int8 table has no place for)."""
    blocks = _match(table.T, rows, {})
    codes = None if isinstance(blocks, str) else _int8_codes(blocks)
    if codes is None or not equal_rows(ScaledRows(codes, blocks.scales), table):
        return None
    return codes, blocks.scales


def _token_embd_codes(rows: GGUFRows, shape: tuple[int, int], kinds: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """The file's `token_embd` as int8 codes (code - zero point) and the file's scales, where its type is one of
    `kinds` and it has the table's `shape`; None otherwise."""
    name = "token_embd.weight"
    if rows.kinds.get(name) not in kinds:
        return None
    blocks = rows.blocks(name)
    codes = _int8_codes(blocks) if blocks.codes.shape == tuple(shape) else None
    return None if codes is None else (codes, blocks.scales)


def factored_table_rows(table, rows: GGUFRows) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(codes, scales, factor): a table that is exactly the file's `token_embd` blocks of 32 (Q4_0, Q5_0, Q8_0) times
    one float32 factor, in float32 as PyTorch computes it ((q d) c: Gemma's sqrt(width)); None otherwise. A tied
    lm_head made of those blocks then holds the table (`tied_table.share_table` with the factor), exactly."""
    found = _token_embd_codes(rows, table.shape, ("Q4_0", "Q5_0", "Q8_0"))  # blocks of 32, the shared table's
    if found is None:
        return None
    codes, scales = found
    factor = table_scale(ScaledRows(codes, scales), table)
    return None if factor is None else (codes, scales, factor)


def scaled_table_rows(table: np.ndarray, rows: GGUFRows) -> tuple[np.ndarray, np.ndarray] | None:
    """A table that is the file's `token_embd` times one factor c (Gemma scales its embeddings by sqrt(width), which
    llama.cpp applies after the lookup): int8 codes q - zero point with scales d x c, within float32 rounding of
    (q d) c, as PyTorch computes it; None where no such c gives the table to 1e-6 of its largest value."""
    found = _token_embd_codes(rows, table.shape, ("Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q6_K"))
    if found is None:
        return None
    codes, file_scales = found
    row, column = _largest_at(table)  # where the factor is read most precisely
    largest = ScaledRows(codes, file_scales)[row][column]
    if largest == 0:
        return None
    scales = (file_scales * np.float32(table[row, column] / largest)).astype(np.float32)
    if not _largest_diff(ScaledRows(codes, scales), table) <= 1e-6 * abs(float(table[row, column])):  # NaN too
        return None
    return codes, scales
