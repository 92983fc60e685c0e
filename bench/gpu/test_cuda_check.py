"""bench/gpu/cuda_check.py: the export skeleton that travels to a GPU machine, its refilling, and the check itself
(run here on the CPU provider with the CUDA code path, I/O binding, forced)."""

from __future__ import annotations

import json

import onnx

from bench.gpu import cuda_check
from softprompt.runtime import load


def test_skeleton_drops_the_weights_and_fill_restores_a_runnable_export(llama_export, tmp_path):
    skeleton = tmp_path / "skeleton"
    cuda_check.skeleton(llama_export, skeleton, keep_below=256)
    assert not (skeleton / "embeddings.npy").exists() and not (skeleton / cuda_check.WEIGHTS).exists()
    moved = json.loads((skeleton / "skeleton.json").read_text())["weights"]
    original = onnx.load(str(llama_export / "model.onnx"))
    big = [
        t.name
        for t in original.graph.initializer
        if len(t.dims) == 2 and t.dims[0] * t.dims[1] > 256 and not t.name.startswith(("cos", "sin"))
    ]
    assert sorted(entry["name"] for entry in moved) == sorted(big) and big
    assert (skeleton / "model.onnx").stat().st_size < (llama_export / "model.onnx").stat().st_size / 2

    filled = cuda_check.fill(skeleton, tmp_path / "filled")
    model = onnx.load(str(filled / "model.onnx"))
    assert [(t.name, list(t.dims)) for t in model.graph.initializer] == [
        (t.name, list(t.dims)) for t in original.graph.initializer
    ]
    result = load(filled, providers="cpu").complete("hello there", max_new_tokens=4)[0]
    assert len(result.token_ids) == 4


def test_the_check_passes_on_the_cpu_with_the_binding_path(llama_export, tmp_path, capsys):
    skeleton = tmp_path / "skeleton"
    cuda_check.skeleton(llama_export, skeleton, keep_below=256)
    assert cuda_check.run(skeleton, new_tokens=4, repeats=1, dry_run=True, prompt_lengths=(5, 9, 3)) == 0
    out = capsys.readouterr().out
    assert "CUDA batch == CPU batch per row [True, True, True, True]" in out and out.rstrip().endswith("PASS")
