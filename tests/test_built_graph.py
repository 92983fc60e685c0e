"""The decoder graph built op by op (src/softprompt/exporter/llama_graph.py) against transformers and the traced graph."""

from __future__ import annotations

import pytest

from softprompt.exporter import ExportError, export_model
from softprompt.exporter.errors import ExportValidationError

from architectures import build, greedy_matches
from conftest import TEXTS


@pytest.mark.parametrize("name", ["llama-variant", "qwen2", "mistral"])
def test_built_graph_matches_transformers(name, tmp_path):
    """Greedy tokens equal transformers' for each text alone and in a left-padded batch."""
    build(name, tmp_path)
    config = export_model(str(tmp_path), tmp_path / "export", graph="built", log=lambda m: None)
    assert config.validation["graph"] == "built"
    alone, batched = greedy_matches(tmp_path, tmp_path / "export", TEXTS)
    assert alone, f"{name}: greedy tokens differ from transformers"
    assert batched, f"{name}: a left-padded batch differs from single rows"


def test_auto_builds_llama_and_traces_the_rest(llama_export, gpt2_export):
    from softprompt.formats.export_folder import read_config

    assert read_config(llama_export).validation["graph"] == "built"
    assert read_config(gpt2_export).validation["graph"] == "traced"


def test_graph_built_refuses_an_unsupported_architecture(gpt2_dir, tmp_path, capsys):
    from softprompt.exporter.cli import main

    with pytest.raises(ExportError, match=r"cannot build GPT2LMHeadModel: model type 'gpt2'.*--graph traced"):
        export_model(str(gpt2_dir), tmp_path / "out", graph="built", log=lambda m: None)
    assert main([str(gpt2_dir), str(tmp_path / "out"), "--graph", "built", "-q"]) == 1
    assert "cannot build GPT2LMHeadModel" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_built_graph_that_does_not_validate_is_replaced_by_the_traced_one(llama_dir, tmp_path, monkeypatch):
    """A wrong built graph never ships: auto traces instead (and says so); --graph built fails."""
    from softprompt.exporter import graph_writers

    real_build = graph_writers.build

    def wrong_build(weights, path, external_data=False, kv_cache="shared"):
        weights.final_norm = weights.final_norm * 1.5
        real_build(weights, path, external_data, kv_cache)

    monkeypatch.setattr(graph_writers, "build", wrong_build)
    messages: list[str] = []
    config = export_model(str(llama_dir), tmp_path / "auto", log=messages.append)
    assert config.validation["graph"] == "traced"
    assert any("does not match PyTorch, so it is traced instead" in m for m in messages)
    assert [m for m in messages if m.startswith("[")][-1].startswith("[8/8]")  # the fallback adds two counted steps
    with pytest.raises(ExportValidationError, match="logits max"):
        export_model(str(llama_dir), tmp_path / "built", graph="built", log=lambda m: None)
    assert not (tmp_path / "built").exists()


def test_built_graph_has_a_few_fused_nodes_per_layer(llama_export):
    """The point of building: far fewer nodes than tracing, through onnxruntime's fused norms and rotary."""
    import onnx

    graph = onnx.load(str(llama_export / "model.onnx"), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    layers = 2
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    # GroupQueryAttention takes the packed QKV and applies the rotary embedding (this model's heads are 16 wide):
    # no Split or RotaryEmbedding; the cache written in place (kv_cache "shared", the default)
    assert ops.count("GroupQueryAttention") == layers and "RotaryEmbedding" not in ops and "Split" in ops  # (the MLP's)
    assert ops.count("Split") == layers
    assert len(ops) <= 12 * layers + 35  # (plus once per call: the mask and row lengths) the traced graph has about 75 a layer


def test_built_graph_names_no_output_that_nothing_reads(llama_export):
    """An op's named optional output is computed and written on every call (the norms' mean and
    inverse deviation doubled their cost in a decode step): every named output feeds a node or the graph."""
    import onnx

    graph = onnx.load(str(llama_export / "model.onnx"), load_external_data=False).graph
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    unread = [(node.op_type, name) for node in graph.node for name in node.output if name and name not in read]
    assert unread == []


def test_fused_traced_graph_uses_contrib_ops_and_keeps_greedy_tokens(llama_dir, tmp_path):
    """--fuse rewrites a traced graph into onnxruntime's fused ops; it still validates and decodes like transformers."""
    from collections import Counter

    import onnx

    from softprompt.formats.export_folder import read_config

    config = export_model(str(llama_dir), tmp_path / "fused", graph="traced", fuse=True, log=lambda m: None)
    nodes = onnx.load(tmp_path / "fused" / "model.onnx").graph.node
    contrib = Counter(node.op_type for node in nodes if node.domain == "com.microsoft")
    assert config.validation["fusions"] == dict(contrib)  # the report says what the graph holds
    layers = read_config(tmp_path / "fused").num_layers
    assert contrib["MultiHeadAttention"] == layers and contrib["SkipSimplifiedLayerNormalization"] >= layers
    alone, batched = greedy_matches(llama_dir, tmp_path / "fused", TEXTS)
    assert alone and batched
