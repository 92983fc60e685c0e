"""Quantized weights as `DequantizeLinear` + `MatMul`: the form onnxruntime-web runs fast.

onnxruntime-web's WebAssembly kernels for `MatMulNBits` decode the default model's int4 export at
about 4 tokens/s (91 natively). The same bytes written as a blocked `DequantizeLinear` (opset 21,
4- or 8-bit, a scale and zero point per block) before a `MatMul` are folded into float weights when
the session starts with `session.disable_quant_qdq` (softprompt-web sets it): the page downloads
int4's bytes and decodes at fp32's speed (55 tokens/s). Natively, without that option, onnxruntime
dequantizes at every call instead: this form is for pages; devices keep `MatMulNBits`.

A `MatMulNBits` weight [N, K] is stored as N rows of K codes (two 4-bit codes a byte, low nibble
first), exactly a UINT4/UINT8 tensor [N, K], so the bytes are kept as they are (a tied lm_head that
is the embedding table stays where `table_in_graph` finds it): dequantized along K, then transposed.
"""

from __future__ import annotations

import numpy as np

QDQ_OPSET = 21  # blocked DequantizeLinear and 4-bit integer tensors


def as_dequantize_matmul(model) -> int:
    """Rewrite every `MatMulNBits` with integer (or no) zero points and whole blocks, in place; returns how many."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    _float_scales(model)
    initializers = {t.name: t for t in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input) + [""] * (6 - len(node.input))
        zero_points = initializers.get(inputs[3]) if inputs[3] else None
        if (
            node.op_type != "MatMulNBits"
            or attrs.get("bits") not in (4, 8)
            or attrs["K"] % attrs["block_size"]
            or inputs[1] not in initializers
            or inputs[2] not in initializers
            or (inputs[3] and (zero_points is None or zero_points.data_type != TensorProto.UINT8))
            or inputs[4]  # g_idx: a permuted order of K
        ):
            nodes.append(node)
            continue
        bits, K, N, block = attrs["bits"], attrs["K"], attrs["N"], attrs["block_size"]
        blocks = K // block
        kind = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8
        weight = initializers[inputs[1]]
        codes = numpy_helper.to_array(weight)
        weight.CopyFrom(helper.make_tensor(weight.name, kind, [N, K], codes.tobytes(), raw=True))
        scales = initializers[inputs[2]]
        scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales).reshape(N, blocks), scales.name))
        points = _zero_points(None if zero_points is None else numpy_helper.to_array(zero_points), bits, N, blocks)
        name = f"{node.name or node.output[0]}.zero_points"
        graph.initializer.append(helper.make_tensor(name, kind, [N, blocks], _pack(points, bits), raw=True))
        dequantized, transposed = f"{name}.weight", f"{name}.weight_t"
        product = node.output[0] if not inputs[5] else f"{node.output[0]}.product"
        nodes += [
            helper.make_node("DequantizeLinear", [inputs[1], inputs[2], name], [dequantized], axis=1, block_size=block),
            helper.make_node("Transpose", [dequantized], [transposed], perm=[1, 0]),
            helper.make_node("MatMul", [inputs[0], transposed], [product], name=node.name),
        ]
        if inputs[5]:
            nodes.append(helper.make_node("Add", [product, inputs[5]], [node.output[0]]))
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version < QDQ_OPSET:
                opset.version = QDQ_OPSET
    return rewritten


def _float_scales(model) -> None:
    """Scales stored in float16 behind a Cast (`blocked._stored`) as float32 initializers again: DequantizeLinear
    gives its scale's type, and the MatMul after it takes float32."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    scales = {n.input[2] for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) > 2}
    casts = [
        n
        for n in graph.node
        if n.op_type == "Cast"
        and n.output[0] in scales
        and n.input[0] in initializers
        and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)
    ]
    for cast in casts:
        values = numpy_helper.to_array(initializers[cast.input[0]]).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(values, cast.output[0]))
        graph.node.remove(cast)
    used = {i for n in graph.node for i in n.input}
    for name in {c.input[0] for c in casts} - used:
        graph.initializer.remove(initializers[name])


def _zero_points(packed: np.ndarray | None, bits: int, rows: int, blocks: int) -> np.ndarray:
    """Each block's zero point [rows, blocks]: MatMulNBits' own (4-bit: each row's packed in ceil(blocks / 2) bytes)
    or its default, the middle of the range."""
    if packed is None:
        return np.full((rows, blocks), 1 << (bits - 1), np.uint8)
    if bits == 8:
        return packed.reshape(rows, blocks)
    per_row = packed.reshape(rows, -1)
    return np.stack([per_row & 0x0F, per_row >> 4], axis=-1).reshape(rows, -1)[:, :blocks]


def _pack(values: np.ndarray, bits: int) -> bytes:
    """A tensor's bytes: 8-bit as they are, 4-bit two a byte over the flattened tensor, low nibble first."""
    flat = values.astype(np.uint8).reshape(-1)
    if bits == 8:
        return flat.tobytes()
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
