"""A weight stored in blocks of codes, each with a scale and a minimum or an integer zero point, as onnxruntime runs it.

Two ways to quantize reach this form: the int4 "offset" recipe (`graph_rewrites.offset_int4`), which computes
codes, scales and float minimums from float weights, and `--precision gguf` (`gguf_weights.py`), which reads them
from a GGUF file's own blocks. Either way `product` writes the matrix product for onnxruntime:

- integer zero points only (GGUF's Q4_0, Q5_0, Q8_0, Q3_K, Q6_K): one `MatMulNBits`;
- float minimums (the offset recipe, Q4_1, Q5_1, Q2_K, Q4_K, Q5_K): `MatMulNBits` on the codes with its default
  zero point, plus one small float product of the input's block sums by (minimum + zero point x scale), since
  MatMulNBits' fast kernels take integer zero points only.

Scales and minimums are stored in float16 where that changes no weight (GGUF's Q4_0/Q4_1/Q5/Q8_0 keep theirs in
float16; the default model's Q4_1 grid comes back exactly at float16 too), behind a `Cast` that onnxruntime folds
into float32 constants when the session starts: the file is smaller (a quarter of an int4 export's bytes were
float32 scales and offsets), the run is the same.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Blocks:
    """A [K, N] weight as N rows of K codes in blocks of `block` along K.

    Row n's values in block b are `scales[n, b] * codes[n, k] + mins[n, b]`, or with integer zero points
    `(codes[n, k] - zero_points[n, b]) * scales[n, b]`; exactly one of `mins` and `zero_points` is set.
    """

    codes: np.ndarray  # uint8 [N, K], each below 2**bits
    scales: np.ndarray  # float32 [N, K // block]
    mins: np.ndarray | None
    zero_points: np.ndarray | None  # uint8 [N, K // block]
    bits: int  # 4 or 8: what MatMulNBits stores
    block: int

    def take(self, rows) -> Blocks:
        """These rows only (an index array or a slice)."""
        return Blocks(
            self.codes[rows],
            self.scales[rows],
            None if self.mins is None else self.mins[rows],
            None if self.zero_points is None else self.zero_points[rows],
            self.bits,
            self.block,
        )

    def dequantize(self) -> np.ndarray:
        """The float32 [K, N] weight, computed as the GGUF reference does (scale x code + minimum)."""
        rows, width = self.codes.shape
        codes = self.codes.reshape(rows, -1, self.block).astype(np.float32)
        if self.mins is not None:
            values = self.scales[..., None] * codes + self.mins[..., None]
        else:
            values = (codes - self.zero_points[..., None].astype(np.float32)) * self.scales[..., None]
        return np.ascontiguousarray(values.reshape(rows, width).T)


def merge(parts: list[Blocks]) -> Blocks:
    """Rows of several weights as one (a packed QKV or gate/up product whose parts a GGUF stores in different
    types): the most bits, the smallest block, float minimums if any part has them. Exact: a block splits into
    halves with its own scale, and an integer zero point z becomes the minimum -z x scale (every GGUF zero point
    is a power of two, so the product is exact)."""
    if len(parts) == 1:
        return parts[0]
    bits, block = max(p.bits for p in parts), min(p.block for p in parts)
    floats = any(p.mins is not None for p in parts)
    codes, scales, mins, points = [], [], [], []
    for part in parts:
        repeat = part.block // block
        scale = np.repeat(part.scales, repeat, axis=1)
        codes.append(part.codes)
        scales.append(scale)
        if floats:
            mins.append(
                np.repeat(part.mins, repeat, axis=1)
                if part.mins is not None
                else -np.repeat(part.zero_points, repeat, axis=1).astype(np.float32) * scale
            )
        else:
            points.append(np.repeat(part.zero_points, repeat, axis=1))
    return Blocks(
        np.concatenate(codes),
        np.concatenate(scales),
        np.concatenate(mins) if floats else None,
        None if floats else np.concatenate(points),
        bits,
        block,
    )


def product(node, name: str, blocks: Blocks) -> tuple[list, list]:
    """The nodes and initializers that compute `node` (a MatMul of its input 0 by a constant [K, N]) from `blocks`."""
    from onnx import helper, numpy_helper

    rows, width = blocks.codes.shape
    n_blocks = width // blocks.block
    x, out = node.input[0], node.output[0]
    middle = 1 << (blocks.bits - 1)  # MatMulNBits' zero point when none is given
    initializers = [numpy_helper.from_array(_packed(blocks.codes, blocks.bits).reshape(rows, n_blocks, -1), f"{name}.codes")]
    nodes: list = []
    scales, scales16 = _stored(blocks.scales, f"{name}.scales", initializers, nodes)
    inputs = [x, f"{name}.codes", scales]
    if blocks.zero_points is not None and np.any(blocks.zero_points != middle):
        per_row = _packed(blocks.zero_points, blocks.bits) if blocks.bits == 8 else _packed_rows(blocks.zero_points)
        initializers.append(numpy_helper.from_array(per_row.reshape(-1), f"{name}.zero_points"))
        inputs.append(f"{name}.zero_points")
    attrs = {"K": width, "N": rows, "bits": blocks.bits, "block_size": blocks.block}
    if blocks.mins is None:
        nodes.append(helper.make_node("MatMulNBits", inputs, [out], name=node.name, domain="com.microsoft", **attrs))
        return nodes, initializers
    nodes.append(
        helper.make_node("MatMulNBits", inputs, [f"{out}.codes"], name=f"{node.name}.codes", domain="com.microsoft", **attrs)
    )
    # offsets [blocks, N] = minimum + middle x scale: what the default zero point takes away, put back per block sum
    offsets = f"{name}.offsets"
    if scales16 and holds_in_float16(blocks.mins):  # computed by onnxruntime at load (constant folding), from float16 files
        mins, _ = _stored(blocks.mins, f"{name}.mins", initializers, nodes)
        initializers.append(numpy_helper.from_array(np.array(middle, np.float32), f"{name}.middle"))
        nodes += [
            helper.make_node("Mul", [scales, f"{name}.middle"], [f"{name}.shift"], name=f"{node.name}.shift"),
            helper.make_node("Add", [mins, f"{name}.shift"], [f"{name}.offsets_nb"], name=f"{node.name}.offsets_nb"),
            helper.make_node("Transpose", [f"{name}.offsets_nb"], [offsets], perm=[1, 0], name=f"{node.name}.offsets_t"),
        ]
    else:
        values = (blocks.mins + np.float32(middle) * blocks.scales).astype(np.float32)
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(values.T), offsets))
    initializers += [
        numpy_helper.from_array(np.array([-1, n_blocks, blocks.block], np.int64), f"{name}.blocks"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{name}.last_axis"),
    ]
    nodes += [
        helper.make_node("Reshape", [x, f"{name}.blocks"], [f"{out}.blocks"], name=f"{node.name}.blocks"),
        helper.make_node(
            "ReduceSum", [f"{out}.blocks", f"{name}.last_axis"], [f"{out}.sums"], keepdims=0, name=f"{node.name}.sums"
        ),
        helper.make_node("MatMul", [f"{out}.sums", offsets], [f"{out}.flat"], name=f"{node.name}.offsets"),
        helper.make_node("Shape", [f"{out}.codes"], [f"{out}.shape"], name=f"{node.name}.shape"),
        helper.make_node("Reshape", [f"{out}.flat", f"{out}.shape"], [f"{out}.offset"], name=f"{node.name}.offset"),
        helper.make_node("Add", [f"{out}.codes", f"{out}.offset"], [out], name=f"{node.name}.add"),
    ]
    return nodes, initializers


def holds_in_float16(values: np.ndarray) -> bool:
    """Whether float16 holds every one of `values` exactly."""
    half = values.astype(np.float16)
    return bool(np.all(np.isfinite(half)) and np.array_equal(half.astype(np.float32), values))


def _stored(values: np.ndarray, name: str, initializers: list, nodes: list) -> tuple[str, bool]:
    """Store float32 `values` as float16 behind a Cast where float16 holds every one exactly, else as they are;
    returns the float32 value's name and whether it went to float16."""
    from onnx import TensorProto, helper, numpy_helper

    if holds_in_float16(values):
        initializers.append(numpy_helper.from_array(values.astype(np.float16), f"{name}16"))
        nodes.append(helper.make_node("Cast", [f"{name}16"], [name], to=TensorProto.FLOAT, name=f"{name}.cast"))
        return name, True
    initializers.append(numpy_helper.from_array(np.ascontiguousarray(values, dtype=np.float32), name))
    return name, False


def _packed(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, K] codes as MatMulNBits stores them: 8-bit as they are, 4-bit two a byte, low nibble first."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _packed_rows(points: np.ndarray) -> np.ndarray:
    """4-bit zero points [N, blocks]: each row packed in ceil(blocks / 2) bytes, low nibble first."""
    rows, n = points.shape
    if n % 2:
        points = np.concatenate([points, np.zeros((rows, 1), np.uint8)], axis=1)
    return _packed(points, 4)
