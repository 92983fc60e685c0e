"""A tied lm_head stored once as the int8 embedding table inside the graph (exporter/tied_table.py): the table itself,
a float32 multiple of it (Gemma), a Q8_0 table's float16 scales, and a head kept at fp32."""

from __future__ import annotations

import shutil

import numpy as np
import onnx

from softprompt.exporter import export_model
from softprompt.exporter.precision import Precision
from softprompt.prompt_bank import save_prompt
from softprompt.runtime import load

from conftest import TEXTS, TINY_INT4_TOLERANCE, random_prompt


def test_a_tied_lm_head_is_the_int8_table_stored_once(tied_dir, tmp_path):
    from softprompt.formats.embedding_table import quantize_rows
    from softprompt.formats.export_folder import open_export

    fp32 = export_model(str(tied_dir), tmp_path / "fp32", log=lambda m: None)
    table = np.load(tmp_path / "fp32" / "embeddings.npy")
    codes, scales = quantize_rows(table, "int8")
    want = (codes.reshape(len(codes), -1, 32) * scales[..., None]).reshape(table.shape)
    save_prompt(tmp_path / "bank", "t", random_prompt(3, fp32.hidden_size), fingerprint=fp32.fingerprint)
    for name, tolerance in (("int8", None), ("int4", TINY_INT4_TOLERANCE)):
        out = tmp_path / name
        config = export_model(str(tied_dir), out, precision=name, tolerance=tolerance, log=lambda m: None)
        assert config.files["embeddings"] == "model.onnx.data" and "embedding_scales" not in config.files
        assert not (out / "embeddings.npy").exists() and not (out / "embedding_scales.npy").exists()
        assert config.validation["changes"]["model"]["lm_head_is_the_table"] == 1
        np.testing.assert_array_equal(open_export(out).table[:], want)  # the runtime's rows: the int8 table exactly
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        assert not [t.name for t in graph.initializer if sorted(t.dims) == sorted(table.shape)]  # no other copy of it
        model = load(out, bank=tmp_path / "bank")
        logits = model.logits(TEXTS[0], task="t")
        reference = load(tmp_path / "fp32", bank=tmp_path / "bank").logits(TEXTS[0], task="t")
        assert np.abs(logits - reference).max() < (tolerance or 0.25) * np.abs(reference).max()
    assert (tmp_path / "int8" / "model.onnx.data").stat().st_size < 0.3 * (tmp_path / "fp32" / "model.onnx.data").stat().st_size


def test_a_head_the_table_is_a_multiple_of_is_found_exactly():
    """`table_scale`: 1 for a tied head, the factor for a table that is the head times one (Gemma's sqrt(width)),
    None for a head that differs anywhere, even in one value of its last row."""
    from softprompt.exporter.tied_table import table_scale
    from softprompt.formats import embedding_table

    rng = np.random.default_rng(0)
    head = rng.standard_normal((9000, 64)).astype(np.float32)  # three slices of rows
    factor = np.float32(np.sqrt(640))
    assert table_scale(head, head.copy()) == 1.0
    assert table_scale(head, head * factor) == float(factor)
    off = head * factor
    off[-1, -1] = np.nextafter(off[-1, -1], np.float32(np.inf))
    assert table_scale(head, off) is None
    assert table_scale(head, rng.standard_normal(head.shape).astype(np.float32)) is None
    assert embedding_table.ROWS_AT_ONCE < len(head)


def test_a_scaled_tied_table_is_stored_once_and_divides_the_logits(tmp_path):
    """Gemma scales the embedding rows its lm_head shares by sqrt(width): the int8 table in the graph is the lm_head
    too, the logits divided by the factor, and the export serves what its fp32 export serves."""
    from softprompt.formats.embedding_table import quantize_rows
    from softprompt.formats.export_folder import open_export

    from architectures import build

    build("gemma3_text", tmp_path / "gemma")
    export_model(str(tmp_path / "gemma"), tmp_path / "fp32", log=lambda m: None)
    config = export_model(str(tmp_path / "gemma"), tmp_path / "int8", precision="int8", log=lambda m: None)
    assert config.files["embeddings"] == "model.onnx.data" and config.validation["changes"]["model"]["lm_head_is_the_table"]
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx"), load_external_data=False).graph
    divide = [n for n in graph.node if n.op_type == "Div" and "logits" in n.output]
    factor = next(onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name == divide[0].input[1])
    assert factor == np.float32(np.sqrt(64))  # the tiny model's width
    table = np.load(tmp_path / "fp32" / "embeddings.npy")
    codes, scales = quantize_rows(table, "int8")
    want = (codes.reshape(len(codes), -1, 32) * scales[..., None]).reshape(table.shape)
    np.testing.assert_array_equal(open_export(tmp_path / "int8").table[:], want)
    logits, reference = (load(tmp_path / name).logits(TEXTS[0]) for name in ("int8", "fp32"))
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()


def test_a_tied_q8_0_table_keeps_its_float16_scales_in_the_graph(tied_dir, tmp_path):
    """A table on GGUF's Q8_0 grid (symmetric int8, a float16 scale per block of 32, as the default model's) is stored
    with float16 scales behind a Cast, and read back by the runtime exactly."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from softprompt.formats.export_folder import open_export

    model = AutoModelForCausalLM.from_pretrained(tied_dir)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        blocks = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
        weight.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)))
    model.save_pretrained(tmp_path / "q8_0")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tied_dir / name).exists():
            shutil.copy(tied_dir / name, tmp_path / "q8_0" / name)
    config = export_model(str(tmp_path / "q8_0"), tmp_path / "int8", precision="int8", log=lambda m: None)
    assert config.table_in_graph["scales_dtype"] == "float16"
    table = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(open_export(tmp_path / "int8").table[:], table)
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx"), load_external_data=False).graph
    assert next(t for t in graph.initializer if t.name == "embeddings.scales").data_type == onnx.TensorProto.FLOAT16


def test_a_tied_lm_head_kept_at_fp32_leaves_the_table_its_own_file(tied_dir, tmp_path):
    config = export_model(str(tied_dir), tmp_path / "kept", precision=Precision("int8", keep=("lm_head",)), log=lambda m: None)
    assert config.files["embeddings"] == "embeddings.npy" and config.table_in_graph is None
    assert "lm_head_is_the_table" not in config.validation["changes"]["model"]
