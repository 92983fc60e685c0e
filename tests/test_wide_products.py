"""A wide MatMulNBits split into slices along N (exporter/wide_products.py): the same outputs bit for bit, its
slices stored one after another, and a split tied lm_head still read by the runtime as the one table it is."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from softprompt.exporter import export_model, wide_products
from softprompt.exporter.errors import ExportError
from softprompt.exporter.tied_table import TABLE_CODES, TABLE_SCALES, table_in_graph
from softprompt.runtime import load

from conftest import TEXTS, TINY_INT4_TOLERANCE


def quantized_product(bits: int, symmetric: bool, columns: int = 200, width: int = 64, bias: bool = False):
    """x [3, width] @ a random [width, columns] weight as onnxruntime's quantizer writes it (MatMulNBits)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as quantizer

    weight = np.random.default_rng(bits).standard_normal((width, columns)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="product")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, columns])],
        [numpy_helper.from_array(weight, "w")],
    )
    config = quantizer.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, bits=bits)
    model = quantizer.MatMulNBitsQuantizer(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), algo_config=config
    )
    model.process()
    model = model.model.model
    if bias:  # MatMulNBits' sixth input, [N]
        node = model.graph.node[0]
        node.input.extend([""] * (5 - len(node.input)) + ["bias"])
        model.graph.initializer.append(numpy_helper.from_array(np.linspace(-1, 1, columns, dtype=np.float32), "bias"))
    return model


def run(model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def scales_behind_a_cast(model) -> None:
    """The scales stored float16 behind a Cast, as the exporter stores scales that float16 holds."""
    graph = model.graph
    product = next(n for n in graph.node if n.op_type == "MatMulNBits")
    scales = next(t for t in graph.initializer if t.name == product.input[2])
    half = numpy_helper.from_array(numpy_helper.to_array(scales).astype(np.float16), scales.name + "16")
    graph.initializer.remove(scales)
    graph.initializer.append(half)
    graph.node.insert(0, helper.make_node("Cast", [half.name], [scales.name], name="cast", to=TensorProto.FLOAT))


@pytest.mark.parametrize(
    ("bits", "symmetric", "bias", "cast"),
    [(8, True, False, False), (4, False, False, False), (4, True, True, False), (8, True, False, True), (4, False, True, True)],
)
def test_a_split_product_gives_the_same_outputs_bit_for_bit(bits, symmetric, bias, cast):
    model = quantized_product(bits, symmetric, bias=bias)
    if cast:
        scales_behind_a_cast(model)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    whole = run(model, x)
    weight = next(n for n in model.graph.node if n.op_type == "MatMulNBits").input[1]
    size = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == weight)).nbytes
    assert wide_products.split_wide_products(model, limit=size // 3) == 1
    products = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(products) == 4  # 200 columns over 3 slices of at most a third: 64, 64, 64 (whole tiles) and 8
    assert [next(a.i for a in n.attribute if a.name == "N") for n in products] == [64, 64, 64, 8]
    assert [n.op_type for n in model.graph.node][-1] == "Concat" and not any(n.name == "cast" for n in model.graph.node)
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(run(model, x), whole)
    # each input's slices follow one another, in column order, and nothing of the whole weight is left
    names = [t.name for t in model.graph.initializer]
    slices = [name for name in names if name.startswith(weight + ".")]
    assert slices == [f"{weight}.{part}" for part in range(4)] and names.index(slices[-1]) - names.index(slices[0]) == 3
    assert weight not in names


def test_a_narrow_product_or_one_whose_weight_is_read_twice_or_not_loaded_stays_whole():
    model = quantized_product(8, True)
    assert wide_products.split_wide_products(model) == 0  # 200 x 64 codes: far under SPLIT_BYTES
    product = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    model.graph.node.append(helper.make_node("Identity", [product.input[1]], ["codes"]))
    assert wide_products.split_wide_products(model, limit=1) == 0
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "Identity"]
    model.graph.node.pop()
    weight = next(t for t in model.graph.initializer if t.name == product.input[1])
    weight.data_location = TensorProto.EXTERNAL  # bytes in a data file the graph was loaded without
    assert wide_products.split_wide_products(model, limit=1) == 0


def test_a_split_tied_lm_head_is_still_the_table_and_gives_the_same_logits(tied_dir, tmp_path, monkeypatch):
    """A tied lm_head stored as the int8 table, split into slices: the runtime reads the same rows from the data file
    and the logits are those of the whole product, exactly; slices out of order are refused at export."""
    from softprompt.formats.export_folder import open_export

    precision = "int4"  # the default recipe: its lm_head kept at 8 bits, as the table
    whole = export_model(
        str(tied_dir), tmp_path / "whole", precision=precision, tolerance=TINY_INT4_TOLERANCE, log=lambda m: None
    )
    assert "matmuls_split" not in whole.validation["changes"]["model"]
    vocab, width = open_export(tmp_path / "whole").table.shape
    monkeypatch.setattr(wide_products, "SPLIT_BYTES", vocab * width // 2)  # the table's codes in 2 slices at least
    split = export_model(
        str(tied_dir), tmp_path / "split", precision=precision, tolerance=TINY_INT4_TOLERANCE, log=lambda m: None
    )
    assert split.validation["changes"]["model"]["matmuls_split"] >= 1  # the lm_head, and the tiny model's wider layers
    graph = onnx.load(str(tmp_path / "split" / "model.onnx"), load_external_data=False).graph
    concat = next(n for n in graph.node if n.op_type == "Concat" and n.output[0] == "logits")
    assert sum(t.name.startswith(TABLE_CODES + ".") for t in graph.initializer) == len(concat.input) >= 2
    np.testing.assert_array_equal(open_export(tmp_path / "split").table[:], open_export(tmp_path / "whole").table[:])
    for text in TEXTS[:2]:
        np.testing.assert_array_equal(load(tmp_path / "split").logits(text), load(tmp_path / "whole").logits(text))

    model = onnx.load(str(tmp_path / "split" / "model.onnx"), load_external_data=False)
    second = next(t for t in model.graph.initializer if t.name == TABLE_SCALES + ".1")
    for entry in second.external_data:
        if entry.key == "offset":
            entry.value = str(int(entry.value) + 2)
    onnx.save_model(model, str(tmp_path / "split" / "model.onnx"))
    with pytest.raises(ExportError, match=r"slice 1 of embeddings\.scales is at byte \d+ of the data file, not right after"):
        table_in_graph(tmp_path / "split" / "model.onnx")
