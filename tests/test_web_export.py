"""export-model --web: quantized weights as DequantizeLinear + MatMul (exporter/qdq.py), what onnxruntime-web folds into
float weights when a page loads; the same products as MatMulNBits, served by the Python runtime too."""

from __future__ import annotations

import numpy as np
import pytest
from test_precision import nbits, ops

from softprompt.exporter.cli import main as export_main
from softprompt.formats.export_folder import read_config
from softprompt.runtime import load

from conftest import TEXTS


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False)])
def test_dequantize_matmul_computes_what_matmulnbits_computes(bits, symmetric):
    """The --web form of a MatMulNBits (the same bytes under DequantizeLinear + MatMul) gives its outputs, for zero
    points packed per row over an odd number of blocks, without zero points, and at 8 bits."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from softprompt.exporter.precision import _nbits_quantizer
    from softprompt.exporter.qdq import as_dequantize_matmul

    rng = np.random.default_rng(bits)
    K, N = 48, 24  # three blocks of 16 along K
    weight = rng.standard_normal((K, N)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="product")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    quantizer = _nbits_quantizer()
    config = quantizer.DefaultWeightOnlyQuantConfig(block_size=16, is_symmetric=symmetric, accuracy_level=0, bits=bits)
    q = quantizer.MatMulNBitsQuantizer(model, algo_config=config)
    q.process()
    quantized = q.model.model
    assert [n.op_type for n in quantized.graph.node] == ["MatMulNBits"]
    x = rng.standard_normal((2, K)).astype(np.float32)

    def run(m, fold=False):
        options = ort.SessionOptions()
        if fold:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    want = run(quantized)
    assert as_dequantize_matmul(quantized) == 1
    assert [n.op_type for n in quantized.graph.node] == ["DequantizeLinear", "Transpose", "MatMul"]
    for fold in (False, True):
        np.testing.assert_allclose(run(quantized, fold), want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - x @ weight).max() > 1e-3  # (the quantized product, not the float one)


def test_a_web_export_stores_dequantize_matmul_and_serves_what_the_plain_export_serves(llama_dir, tied_dir, tmp_path):
    """export-model --web: no MatMulNBits left, recorded, and the runtime (folding the weights) gives the logits of
    the plain export computed in float (accuracy level 0), at int4 and int8; a tied lm_head stays the table."""
    for source, name in ((llama_dir, "int4"), (llama_dir, "int8"), (tied_dir, "int4")):
        web, plain = tmp_path / f"{source.name}-{name}-web", tmp_path / f"{source.name}-{name}"
        assert export_main([str(source), str(web), "--precision", name, "--web", "-q"]) == 0
        assert export_main([str(source), str(plain), "--precision", name, "--accuracy-level", "0", "-q"]) == 0
        assert (read_config(web).table_in_graph is not None) == (source == tied_dir)  # the tied lm_head is the table
        assert read_config(web).quantization["web"] is True and "web" not in read_config(plain).quantization
        counts = ops(web / "model.onnx")
        assert counts["MatMulNBits"] == 0 and counts["DequantizeLinear"] == sum(nbits(plain / "model.onnx").values()) > 0
        got = load(web).logits(TEXTS[:2])
        want = load(plain).logits(TEXTS[:2])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with pytest.raises(SystemExit):
        export_main([str(llama_dir), str(tmp_path / "x"), "--web"])
