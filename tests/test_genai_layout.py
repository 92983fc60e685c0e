"""onnxruntime-genai's layout of a decoder export (exporter/genai_layout.py), checked through onnxruntime itself:
ids in, the decoder's own logits out, bit for bit, with prompt rows picked by ids at and above the vocabulary."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from softprompt.exporter import export_model
from softprompt.exporter.errors import ExportError
from softprompt.exporter.genai_layout import write_genai_layout
from softprompt.runtime import load

from conftest import TEXTS, random_prompt


@pytest.fixture(scope="module")
def tied_int8(tied_dir, tmp_path_factory):
    """int8 with the tied lm_head as the table: rows read from model.onnx.data, codes around 128."""
    out = tmp_path_factory.mktemp("genai") / "tied-int8"
    export_model(str(tied_dir), out, precision="int8", log=lambda m: None)
    return out


def session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(graph, model, feeds: dict) -> np.ndarray:
    """Logits of every position, for the prefill `feeds` (empty past)."""
    config = model.config
    length = feeds["attention_mask"].shape[1]
    feeds = {**feeds, **{name: np.zeros((1, config.num_kv_heads, 0, config.head_size), np.float32) for name in config.past_names}}
    names = {i.name for i in graph.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(length)[None]
    if "logits_to_keep" in names:
        feeds["logits_to_keep"] = np.array([0])
    return graph.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]


@pytest.mark.parametrize("which", ["llama", "gpt2", "tied-int8"])
def test_ids_give_the_logits_of_the_rows_the_runtime_feeds(which, llama_export, gpt2_export, tied_int8):
    export = {"llama": llama_export, "gpt2": gpt2_export, "tied-int8": tied_int8}[which]
    assert (export / "model.genai.onnx").is_file()  # export-model writes it for every decoder
    model = load(export)
    config = model.config
    genai, own = session(export / "model.genai.onnx"), session(export / "model.onnx")
    ids = model.encode(TEXTS[0])
    prompt = random_prompt(4, config.hidden_size, seed=3)
    with_prompt = [config.vocab_size + i for i in (0, 1, 2, 3)] + ids
    mask = np.ones((1, len(with_prompt)), np.int64)
    got = run(genai, model, {"input_ids": np.array([with_prompt]), "attention_mask": mask, "soft_prompts": prompt})
    rows = np.concatenate([prompt, np.asarray(model.table[ids], np.float32)])[None]
    want = run(own, model, {"inputs_embeds": rows, "attention_mask": mask})
    assert got.shape == want.shape and np.array_equal(got, want)
    # no task: one zero row that no id picks, and the table's rows alone
    none = np.zeros((1, config.hidden_size), np.float32)
    plain = run(genai, model, {"input_ids": np.array([ids]), "attention_mask": mask[:, 4:], "soft_prompts": none})
    alone = run(own, model, {"inputs_embeds": rows[:, 4:], "attention_mask": mask[:, 4:]})
    assert np.array_equal(plain, alone)


def test_genai_config_names_the_graph_and_its_cache(llama_export, gpt2_export):
    for export in (llama_export, gpt2_export):
        config = load(export).config
        described = json.loads((export / "genai_config.json").read_text())
        decoder = described["model"]["decoder"]
        graph = session(export / decoder["filename"])
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
