"""Blocked weights as onnxruntime runs them (exporter/blocked.py): codes, scales, minimums or zero points."""

from __future__ import annotations

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from softprompt.exporter.blocked import Blocks, merge, product
from softprompt.exporter.graph_rewrites import offset_int4


def matmul_model(weight: np.ndarray):
    """x [rows, K] @ weight [K, N]: one constant product, as the exporter's graphs hold them."""
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="product")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_identity(model, k: int) -> np.ndarray:
    """The weight onnxruntime computes with: the product of the identity (float compute, no int8 activations)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(k, dtype=np.float32)})[0]


def stored_types(model) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


def q4_1_grid(k: int, n: int, seed: int = 0) -> np.ndarray:
    """A [K, N] weight as a Q4_1 GGUF file holds it: float16 step and minimum per block of 32 along K."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    blocks = gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q4_1)
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1).T.copy()


def test_offset_int4_stores_a_float16_grid_in_float16_and_changes_no_weight():
    weight = q4_1_grid(128, 48)
    model = matmul_model(weight)
    offset_int4(model, ["product"], 32)
    types = stored_types(model)
    assert types["w.scales16"] == types["w.mins16"] == TensorProto.FLOAT16
    assert np.array_equal(run_identity(model, 128), weight)  # the grid exactly, the offsets folded from float16


def test_offset_int4_keeps_float32_scales_where_float16_would_move_a_weight():
    weight = np.random.default_rng(1).normal(0, 0.05, (128, 48)).astype(np.float32)
    model = matmul_model(weight)
    offset_int4(model, ["product"], 32)
    types = stored_types(model)
    assert types["w.scales"] == types["w.offsets"] == TensorProto.FLOAT
    assert "w.scales16" not in types and "w.mins16" not in types
    assert np.abs(run_identity(model, 128) - weight).max() <= np.abs(weight).max() / 15  # half a step at most, and some


def test_integer_zero_points_and_merged_parts_run_as_they_dequantize():
    """Rows with integer zero points (4 and 8 bits) and with float minimums (blocks of 32 and 16), merged into one
    product as a packed QKV is: onnxruntime computes the weight Blocks.dequantize describes."""
    rng = np.random.default_rng(2)
    k = 64

    def part(n, bits, block, floats):
        codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.01, (n, k // block)).astype(np.float16).astype(np.float32)
        if floats:
            return Blocks(codes, scales, -rng.uniform(0, 0.05, scales.shape).astype(np.float32), None, bits, block)
        points = np.full(scales.shape, {4: 8, 8: 32}[bits], np.uint8)
        return Blocks(codes, scales, None, points, bits, block)

    for parts in ([part(8, 4, 32, False)], [part(8, 8, 16, False)], [part(8, 4, 32, False), part(4, 8, 16, False)],
                  [part(8, 4, 32, True), part(8, 8, 16, False)]):  # fmt: skip
        blocks = merge(parts)
        assert blocks.codes.shape == (sum(p.codes.shape[0] for p in parts), k)
        expected = np.concatenate([p.dequantize() for p in parts], axis=1)
        assert np.array_equal(blocks.dequantize(), expected)
        model = matmul_model(np.zeros_like(expected))
        nodes, initializers = product(model.graph.node[0], "w", blocks)
        del model.graph.node[:], model.graph.initializer[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(initializers)
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        onnx.checker.check_model(model)
        assert np.allclose(run_identity(model, k), expected, rtol=1e-6, atol=1e-7), [p.bits for p in parts]


@pytest.mark.parametrize("bits", [4, 8])
def test_the_default_zero_point_is_not_stored(bits):
    codes = np.zeros((4, 32), np.uint8)
    blocks = Blocks(codes, np.ones((4, 1), np.float32), None, np.full((4, 1), 1 << (bits - 1), np.uint8), bits, 32)
    _, initializers = product(helper.make_node("MatMul", ["x", "w"], ["y"], name="p"), "w", blocks)
    assert "w.zero_points" not in {t.name for t in initializers}
