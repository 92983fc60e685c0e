"""bench/speed/graph_step.py on the committed tiny export: inputs made from the graph's names, timed in child processes."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from bench.harness import ROOT, decoder_feeds
from bench.speed import graph_step


def test_a_graph_against_itself_runs_each_round_in_its_own_process(llama_export):
    graph = str(llama_export / "model.onnx")
    command = [sys.executable, "-m", "bench.speed.graph_step", graph, graph, "--rounds", "2", "--calls", "2", "--past", "5"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    rows = [line for line in result.stdout.splitlines() if line.rstrip().endswith(graph)]
    assert len(rows) == 2 and rows[0].split()[1] == "1.00x"
    assert float(rows[0].split()[0]) > 0 and int(rows[0].split()[2]) >= 0


def test_the_past_takes_the_head_size_from_the_config_where_the_graph_leaves_it_symbolic(llama_export, tmp_path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(llama_export / "model.onnx"), providers=["CPUExecutionProvider"])
    made = decoder_feeds(session, past=7, head_size=graph_step.head_size(llama_export / "model.onnx"))
    past = [value for name, value in made.items() if name.startswith("past")]
    assert past and all(value.shape[2] == 7 for value in past)
    assert made["attention_mask"].shape == (1, 8)
    session.run(None, made)  # the graph takes them

    model = onnx.load(str(llama_export / "model.onnx"))
    model.graph.input.append(onnx.helper.make_tensor_value_info("mystery", onnx.TensorProto.FLOAT, [1]))
    onnx.save(model, str(tmp_path / "model.onnx"))
    odd = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(SystemExit, match="mystery: an input this benchmark does not know how to fill"):
        decoder_feeds(odd, past=7)
