"""onnxruntime-genai's layout of a decoder export (exporter/genai_layout.py), checked through onnxruntime itself:
ids in, the decoder's own logits out, bit for bit, with prompt rows picked by ids at and above the vocabulary."""

from __future__ import annotations

import json
import shutil

import pytest

from softprompt.exporter import export_model
from softprompt.exporter.errors import ExportError
from softprompt.exporter.genai_layout import write_genai_layout
from softprompt.runtime import load

from conftest import genai_layout_matches, ort_session


@pytest.fixture(scope="module")
def tied_int8(tied_dir, tmp_path_factory):
    """int8 with the tied lm_head as the table: rows read from model.onnx.data, codes around 128."""
    out = tmp_path_factory.mktemp("genai") / "tied-int8"
    export_model(str(tied_dir), out, precision="int8", log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def gemma_int8(tmp_path_factory):
    """Gemma's tied lm_head is its table times sqrt(width): the int8 table in model.onnx.data, the logits divided
    (a GGUF's, whose rows are the head's and the table a factor of them, is tests/test_gguf_precision.py's)."""
    from architectures import build

    folder = tmp_path_factory.mktemp("genai-gemma")
    build("gemma3_text", folder / "hf")
    export_model(str(folder / "hf"), folder / "int8", precision="int8", log=lambda m: None)
    return folder / "int8"


@pytest.mark.parametrize("which", ["llama", "gpt2", "tied-int8", "gemma-int8"])
def test_ids_give_the_logits_of_the_rows_the_runtime_feeds(which, request):
    export = request.getfixturevalue({"llama": "llama_export", "gpt2": "gpt2_export"}.get(which, which.replace("-", "_")))
    assert (export / "model.genai.onnx").is_file()  # export-model writes it for every decoder
    assert genai_layout_matches(export)


def test_genai_config_names_the_graph_and_its_cache(llama_export, gpt2_export):
    for export in (llama_export, gpt2_export):
        config = load(export).config
        described = json.loads((export / "genai_config.json").read_text())
        decoder = described["model"]["decoder"]
        graph = ort_session(export / decoder["filename"])
        inputs = {i.name for i in graph.get_inputs()}
        assert set(decoder["inputs"].values()) - {"past_key_values.%d.key", "past_key_values.%d.value"} <= inputs
        assert {decoder["inputs"]["past_key_names"] % i for i in range(config.num_layers)} <= inputs
        assert {decoder["outputs"]["present_value_names"] % i for i in range(config.num_layers)} <= {
            o.name for o in graph.get_outputs()
        }
        assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (
            config.num_layers,
            config.num_kv_heads,
            config.head_size,
        )
        assert described["model"]["vocab_size"] == config.vocab_size
        assert described["search"]["past_present_share_buffer"] == (config.kv_cache == "shared")


def test_an_export_that_is_no_decoder_is_refused(llama_export, tmp_path):
    """onnxruntime-genai generates with decoders only: an encoder's folder gets no layout, and says why."""
    folder = tmp_path / "copy"
    shutil.copytree(llama_export, folder)
    (folder / "model.genai.onnx").unlink()
    config = json.loads((folder / "softprompt.json").read_text())
    config |= {"kind": "encoder", "input_names": ["inputs_embeds", "attention_mask"], "output_names": ["last_hidden_state"]}
    (folder / "softprompt.json").write_text(json.dumps({**config, "pooling": "mean"}))
    with pytest.raises(ExportError, match="kind 'encoder'; onnxruntime-genai's layout is written for decoder-only"):
        write_genai_layout(folder)
    assert not (folder / "model.genai.onnx").exists()
