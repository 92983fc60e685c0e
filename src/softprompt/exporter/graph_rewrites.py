"""Rewrites of an ONNX graph that quantization needs around onnxruntime's own quantizers (precision.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np


def offset_int4(model, names: list[str], block_size: int, base: Path | None = None) -> None:
    """int4 codes with a float minimum per block: w = d * q + m, q in 0..15, d and m floats.

    MatMulNBits takes integer zero points only, so a block's minimum m is off the 4-bit grid by up
    to half a step, the same way for the whole block: a bias that adds up along every dot product
    (8% of the weights' norm on the default model, whose weights come from a Q4_1 GGUF, exactly a
    float minimum plus 4-bit steps). Here the codes run on MatMulNBits' fast integer kernel with
    its default zero point 8, and the rest, sum over blocks of (m + 8d) times the block's sum of
    x, is one small float matrix product of x's block sums ([K/block, N], a sixteenth of the
    weights' size): error 0.1% of the norm instead of 8% on those weights (`blocked.product`).

    d and m are rounded to float16 where that changes no weight (a grid that came from a GGUF file,
    as the default model's, is float16 already), and stored so. Weights the graph was loaded without are read
    from the data file in `base` one at a time (`lazy_weights`).
    """
    from .blocked import Blocks, product
    from .lazy_weights import release, view

    wanted = set(names)
    initializers = {t.name: t for t in model.graph.initializer}
    readers = Counter(i for n in model.graph.node for i in n.input)
    nodes, added = [], []
    for node in model.graph.node:
        if node.name not in wanted:
            nodes.append(node)
            continue
        weight = np.array(view(initializers[node.input[1]], base), dtype=np.float32)
        rows, cols = weight.shape
        grouped = weight.reshape(rows // block_size, block_size, cols)
        low = grouped.min(axis=1)
        step = (grouped.max(axis=1) - low) / np.float32(15.0)
        step[step == 0] = 1.0
        codes = np.clip(np.rint((grouped - low[:, None]) / step[:, None]), 0, 15).astype(np.uint8)
        blocks = Blocks(codes.transpose(2, 0, 1).reshape(cols, rows), step.T.copy(), low.T.copy(), None, 4, block_size)
        half = Blocks(blocks.codes, _half(blocks.scales), _half(blocks.mins), None, 4, block_size)
        if np.array_equal(half.dequantize(), blocks.dequantize()):
            blocks = half
        more, weights = product(node, node.input[1], blocks)
        nodes += more
        added += weights
        if readers[node.input[1]] == 1:
            release(initializers[node.input[1]])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(added)
    drop_unused_initializers(model)
    use_contrib_ops(model)


def _half(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def gemm_as_matmul(model) -> None:
    """Gemm by a constant weight (what a traced Conv1D or 2-D Linear becomes) as MatMul (+ Add), which
    MatMulNBits replaces; a transposed weight is stored transposed once, here."""
    import onnx
    from onnx import numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm"
            or node.input[1] not in weights
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            transposed = numpy_helper.to_array(weights[weight]).T.copy()
            weight = f"{weight}.transposed"
            model.graph.initializer.append(numpy_helper.from_array(transposed, weight))
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + ".product" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + ".bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_unused_initializers(model)  # a weight stored transposed is not kept twice


def drop_unused_initializers(model) -> None:
    """Remove the weights no node reads any more (those a rewrite replaced).

    In place: the graph rebuilt from a list of the kept ones copies each into the protobuf again, and
    protobuf frees the old copies only with the whole model (+0.2 GB for Gemma-3-270m's quantized lm_head)."""
    used = {i for n in model.graph.node for i in n.input}
    initializers = model.graph.initializer
    for index in reversed(range(len(initializers))):
        if initializers[index].name not in used:
            del initializers[index]


def use_contrib_ops(model) -> None:
    """Declare onnxruntime's com.microsoft domain (MatMulNBits) where the graph does not yet."""
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
