"""The exporter: what an export folder holds, validation that catches a wrong graph, and safe overwrites."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from softprompt.exporter import ExportError, ExportValidationError, export_model
from softprompt.exporter.graph import CachedDecoder, probe_cache
from softprompt.exporter.metadata import embedding_table
from softprompt.exporter.validate import reference, validate
from softprompt.prompt_bank import backbone_fingerprint
from softprompt.runtime import read_config

from conftest import random_prompt


def test_export_folder_contents_and_config(arch):
    from transformers import AutoModelForCausalLM

    hf_dir, export = arch
    assert {"model.onnx", "embeddings.npy", "tokenizer.json", "softprompt.json"} <= {p.name for p in export.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert export.stat().st_mode & 0o777 == 0o777 & ~umask  # not the staging folder's owner-only mode
    config = read_config(export)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir)
    layers = reference.config.num_hidden_layers
    assert config.num_layers == layers and config.kind == "decoder" and config.dtype == "float32"
    assert config.input_names[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    built = config.validation["graph"] == "built"  # the Llama export; GPT-2's is traced
    pasts = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert config.input_names[3:] == pasts + (["logits_to_keep"] if built else [])
    assert config.output_names == ["logits", *[f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]]
    assert config.eos_token_ids == [2] and config.max_positions == reference.config.max_position_embeddings
    assert config.opset == (23 if built else 18)
    session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == config.input_names
    # The table is the embedding module's output, and the fingerprint is over exactly that table.
    table = np.load(export / "embeddings.npy")
    with torch.no_grad():
        expected = reference.get_input_embeddings()(torch.arange(table.shape[0])).numpy()
    np.testing.assert_array_equal(table, expected)
    facts = {k: getattr(config, k) for k in ("architecture", "hidden_size", "vocab_size", "num_layers")}
    assert config.fingerprint == backbone_fingerprint(table, facts)
    assert set(config.validation["max_relative_diff"]) == {
        "first step, no past",
        "1 new token(s), past of 6",
        "3 new token(s), past of 6",
    }
    assert max(config.validation["max_relative_diff"].values()) < 1e-4


def test_scaled_embedding_module_is_captured(tmp_path, monkeypatch):
    """Gemma-style models scale inside the embedding module; the table must hold the scaled rows, whether it is made
    in memory or written to a file as it is made and stored from there a slice at a time."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    model = Gemma3ForCausalLM(config)
    table = embedding_table(model, chunk=10)
    np.testing.assert_allclose(table, model.model.embed_tokens.weight.detach().numpy() * 32**0.5, rtol=1e-6)
    # written to a file as it is made (chunks of 10 rows, the last one part), the same table comes back mapped
    from softprompt.formats import embedding_table as table_module
    from softprompt.formats.embedding_table import TableFile, quantize_rows

    monkeypatch.setattr(table_module, "ROWS_AT_ONCE", 7)
    mapped = embedding_table(model, tmp_path / "table.npy", chunk=10)
    assert isinstance(mapped, np.memmap) and np.array_equal(np.load(tmp_path / "table.npy"), table)
    assert np.array_equal(TableFile(tmp_path / "table.npy")[7:33], table[7:33])  # read by slices, not mapped
    for dtype in ("int8", "fp16"):
        by_slices, whole = quantize_rows(TableFile(tmp_path / "table.npy"), dtype), quantize_rows(table, dtype)
        assert all(np.array_equal(a, b) for a, b in zip(by_slices, whole) if a is not None)


def test_validation_reports_every_mismatch(llama_dir, llama_export):
    """A graph that no longer matches its model fails validation with a line per mismatching output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)  # changes layer 1's output, so the logits
    wrapper = CachedDecoder(model, probe_cache(model))
    table = np.load(llama_export / "embeddings.npy")
    with pytest.raises(ExportValidationError) as info:
        validate(llama_export / "model.onnx", reference(wrapper, table))
    report = str(info.value)
    assert report.count("logits max |diff| / max |ref|") == 3  # one per case
    assert "first step, no past" in report and "3 new token(s), past of 6" in report


def test_existing_output_is_refused_then_replaced_with_force(llama_dir, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="exists and is not empty.*--force"):
        export_model(str(llama_dir), out, log=lambda m: None)
    assert (out / "keep.txt").read_text() == "user data"
    export_model(str(llama_dir), out, overwrite=True, log=lambda m: None)
    assert (out / "softprompt.json").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging or backup folders left


def test_failed_export_leaves_the_old_folder_intact(llama_dir, tmp_path, monkeypatch):
    from softprompt.exporter import graph_writers

    out = tmp_path / "export"
    out.mkdir()
    (out / "softprompt.json").write_text("{}")

    def broken(*args, **kwargs):
        raise ExportValidationError("simulated mismatch")

    monkeypatch.setattr(graph_writers, "validate", broken)
    with pytest.raises(ExportValidationError, match="simulated"):
        export_model(str(llama_dir), out, overwrite=True, log=lambda m: None)
    assert json.loads((out / "softprompt.json").read_text()) == {}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("no-such-model", "neither a built-in name"), ("missing.gguf", "GGUF file not found")],
)
def test_unknown_sources_are_refused(tmp_path, spec, message):
    with pytest.raises(ExportError, match=message):
        export_model(str(tmp_path / spec) if spec.endswith(".gguf") else spec, tmp_path / "out", log=lambda m: None)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        export_model(str(tmp_path / "model"), tmp_path / "out", log=lambda m: None)


def test_bank_of_another_backbone_is_refused_at_load(llama_export, gpt2_export, tmp_path):
    from softprompt.prompt_bank import BackboneMismatchError, save_prompt
    from softprompt.runtime import load, read_config

    config = read_config(llama_export)
    save_prompt(tmp_path, "foreign", random_prompt(3, config.hidden_size), fingerprint="sha256:" + "0" * 64)
    model = load(llama_export, bank=tmp_path)  # loads; the task is not served, and asking for it says why
    assert model.tasks == [] and "foreign.json: made for backbone" in model.unserved["foreign"]
    with pytest.raises(BackboneMismatchError, match="task 'foreign' is .* cannot be served: .*foreign.json: made for backbone"):
        model.complete("hello", task="foreign", max_new_tokens=2)
    with pytest.raises(BackboneMismatchError, match="E=64; the backbone's embedding width is 48"):
        load(gpt2_export, bank=tmp_path).complete("hello", task="foreign", max_new_tokens=2)


def test_the_greedy_check_sees_each_text_as_the_runtime_serves_it(llama_dir, tmp_path, monkeypatch):
    """The export's greedy check starts from what the runtime feeds for the same text: its special tokens (a BOS
    where the tokenizer adds one) and all of its tokens, not texts cut to the shortest one."""
    from softprompt.exporter import conversion, export_model, graph_writers
    from softprompt.runtime import load

    seen: list[list[int]] = []
    real = conversion.greedy_agreement

    def spy(graph, want):
        seen.extend(want.starts)
        return real(graph, want)

    monkeypatch.setattr(conversion, "greedy_agreement", spy)
    export_model(str(llama_dir), tmp_path / "out", precision="int8", tolerance=1.0, log=lambda m: None)  # (checks quantized)
    served = load(tmp_path / "out").backbone
    assert seen == [served.encode(text) for text in graph_writers.GREEDY_TEXTS]
    assert len({len(row) for row in seen}) > 1  # the texts' own lengths


def test_a_gguf_s_control_and_user_defined_tokens_are_matched_whole(llama_dir, tmp_path):
    """Tokens a GGUF marks as control or user-defined are one token in any text, with their vocabulary ids, as
    llama.cpp reads them (transformers' conversion kept 3 of Qwen's 22; `<tool_call>` came out in pieces)."""
    import gguf
    from transformers import AutoTokenizer

    from softprompt.exporter.gguf_tokenizer import gguf_fields
    from softprompt.exporter.sources import apply_gguf_tokenizer_metadata

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    tokens = [token for token, _ in vocab]
    # Two multi-character pieces of the vocabulary made whole tokens: one control, one user-defined.
    pieces = [token for token in tokens if len(token) >= 3 and token.isascii() and token.isalpha()][:2]
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    types[tokenizer.convert_tokens_to_ids(pieces[0])] = int(gguf.TokenType.CONTROL)
    types[tokenizer.convert_tokens_to_ids(pieces[1])] = int(gguf.TokenType.USER_DEFINED)
    writer = gguf.GGUFWriter(str(tmp_path / "tokens.gguf"), "llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    text = f"x{pieces[0]}y{pieces[1]}z"
    apply_gguf_tokenizer_metadata(tokenizer, gguf_fields(tmp_path / "tokens.gguf"))
    after = tokenizer.encode(text, add_special_tokens=False)
    ids = [tokenizer.convert_tokens_to_ids(piece) for piece in pieces]
    assert all(i in after for i in ids) and len(tokenizer) == len(tokens)  # whole, at their own ids
    assert pieces[0] not in tokenizer.decode(after, skip_special_tokens=True)  # control: special
    assert pieces[1] in tokenizer.decode(after, skip_special_tokens=True)


@pytest.mark.parametrize("graph", ["built", "traced"])
def test_a_decoder_s_pytorch_model_is_gone_before_onnxruntime_loads_a_graph(llama_dir, tmp_path, monkeypatch, graph):
    """PyTorch's answers to every check are computed first and the model released, so its weights and onnxruntime's
    are never held together (what set the peak memory of a big model's export), and the checks still run."""
    import weakref
    from pathlib import Path

    from softprompt.exporter import conversion, graph_writers
    from softprompt.exporter import export as export_module
    from softprompt.exporter import validate as validate_module

    models: list[weakref.ref] = []
    alive: list[bool] = []
    real_describe, real_session = export_module.describe, validate_module.cpu_session

    def describe(source, *args):
        backbone = real_describe(source, *args)
        models.append(weakref.ref(backbone.model))
        return backbone

    def mapped() -> list[str]:
        """Files mapped that should not be: the model's own weights, or a graph data file replaced since (what
        onnxscript's rewrite rules held through the last graph they matched)."""
        lines = Path("/proc/self/maps").read_text().splitlines() if Path("/proc/self/maps").exists() else []
        return [line for line in lines if str(llama_dir) in line or (str(tmp_path) in line and "(deleted)" in line)]

    prepacked: list[bool] = []

    def session(graph_or_session, **options):
        if not isinstance(graph_or_session, ort.InferenceSession):
            alive.append(models[0]() is not None or bool(mapped()))
            made = real_session(graph_or_session, **options)
            try:
                disabled = made.get_session_options().get_session_config_entry("session.disable_prepacking")
            except RuntimeError:  # not set
                disabled = "0"
            prepacked.append(disabled != "1")
            return made
        return real_session(graph_or_session, **options)

    monkeypatch.setattr(export_module, "describe", describe)
    monkeypatch.setattr(graph_writers, "cpu_session", session)
    monkeypatch.setattr(conversion, "cpu_session", session)
    monkeypatch.setattr(validate_module, "cpu_session", session)
    config = export_model(str(llama_dir), tmp_path / "out", precision="int8", graph=graph, log=lambda m: None)
    assert alive == [False, False]  # the fp32 graph's validation, then the int8 graph's checks
    # the fp32 check without onnxruntime's packed copies of its weights; the int8 one runs as the runtime will
    assert prepacked == [False, True]
    # the float32 table the checks read (mapped from a scratch file beside the int8 one) is not left in the folder
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert set(config.files.values()) <= names and not [name for name in names if name.startswith(".")]
    assert config.validation["graph"] == graph and config.validation["greedy_agreement"]
    assert config.validation["quality"]["positions"] > 0
