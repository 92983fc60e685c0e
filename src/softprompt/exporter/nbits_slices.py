"""onnxruntime's round-to-nearest MatMulNBits quantization, a slice of a weight's rows at a time.

`DefaultWeightOnlyQuantizer.quantize_matmul` takes the weight whole: it reads it into the graph's
protobuf, copies it again as onnx_ir bytes and quantizes the copy. For a large weight that is three
copies of it at once: Gemma-3-270m's 8-bit lm_head (0.67 GB float32) added 1.4 GB to the export's
peak. Each block of MatMulNBits (`block_size` rows of one column) has its own scale and zero point, so a
slice of whole blocks' rows gives exactly the bytes the whole weight would. Here the weight is read
from the data file a slice of rows at a time (`lazy_weights.rows`: contiguous, not mapped),
quantized by the quantizer's own kernel (`qbits_block_quant`), and the node is made as
`quantize_matmul` makes it: same names, attributes and bytes (tests compare the two).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import lazy_weights

SLICE_BYTES = 64 << 20  # float32 bytes of a weight quantized at once


def sliceable(weight, config) -> bool:
    """Whether `quantize` makes this weight (a 2-D float32 one, MatMulNBits' own format); others go to onnxruntime."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import QuantFormat

    return weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2 and config.quant_format == QuantFormat.QOperator


def quantize(node, weight, quantizer, base: Path | None) -> tuple[list, list]:
    """The MatMulNBits node that replaces MatMul `node` and its initializers, `weight` quantized by `quantizer` (a
    `DefaultWeightOnlyQuantizer`) a slice of rows at a time; `base`: the folder of its data file, if external."""
    from onnx import helper, numpy_helper

    config = quantizer.config
    bits, block = config.bits, config.block_size
    rows, cols = (int(d) for d in weight.dims)
    per_byte = 8 // bits  # 4 bits: two blocks' zero points share a byte, so a slice starts at an even block
    blocks = -(-rows // block)
    packed = np.empty((cols, blocks, -(-block // per_byte)), np.uint8)
    scales = np.empty((cols, blocks), np.float32)
    zero_points = np.empty((cols, -(-blocks // per_byte)), np.uint8)
    unit = block * per_byte
    step = max(unit, SLICE_BYTES // (4 * cols) // unit * unit)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        values = np.ascontiguousarray(lazy_weights.rows(weight, start, stop, base))
        part_packed, part_scales, part_zero_points = quantizer.qbits_block_quant(values)
        first, count = start // block, part_scales.shape[1]
        packed[:, first : first + count] = part_packed
        scales[:, first : first + count] = part_scales
        zero_points[:, first // per_byte : first // per_byte + part_zero_points.shape[1]] = part_zero_points
    tensors = [
        numpy_helper.from_array(packed, f"{weight.name}_Q{bits}"),
        numpy_helper.from_array(scales, f"{weight.name}_scales"),
    ]
    if not config.is_symmetric:
        tensors.append(numpy_helper.from_array(zero_points, f"{weight.name}_zero_points"))
    levels = {"accuracy_level": config.accuracy_level} if config.accuracy_level else {}
    matmul = helper.make_node(
        "MatMulNBits",
        inputs=[node.input[0], *(t.name for t in tensors)],
        outputs=[node.output[0]],
        name=f"{node.name}_Q{bits}" if node.name else "",
        domain="com.microsoft",
        K=rows,
        N=cols,
        bits=bits,
        block_size=block,
        **levels,
    )
    return [matmul], tensors
