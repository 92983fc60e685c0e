"""bench/gpu/cuda_check.py: the export skeleton that travels to a GPU machine, its refilling, and the check itself
(run here on the CPU provider with the CUDA code path, I/O binding, forced)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest

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


def fp16_export(export, out):
    """`export` at fp16 the way export-model --precision fp16 stores it: the graph converted, the table float16."""
    from softprompt.exporter.precision import Precision, apply_precision

    shutil.copytree(export, out)
    apply_precision(out / "model.onnx", Precision("fp16"))
    np.save(out / "embeddings.npy", np.load(out / "embeddings.npy").astype(np.float16))
    config = json.loads((out / "softprompt.json").read_text())
    (out / "softprompt.json").write_text(json.dumps({**config, "precision": "fp16"}))
    return out


def test_fp16_skeleton_fills_with_the_fp32_skeletons_weights_rounded(llama_export, tmp_path):
    cuda_check.skeleton(llama_export, tmp_path / "s32", keep_below=256)
    cuda_check.skeleton(fp16_export(llama_export, tmp_path / "e16"), tmp_path / "s16", keep_below=256)
    full = cuda_check.fill(tmp_path / "s32", tmp_path / "f32")
    half = cuda_check.fill(tmp_path / "s16", tmp_path / "f16")
    assert (tmp_path / "e16" / "model.onnx.data").exists() and not (tmp_path / "s16" / "model.onnx.data").exists()
    entries = json.loads((tmp_path / "s16" / "skeleton.json").read_text())["weights"]
    assert entries and {entry["dtype"] for entry in entries} == {"<f2"}
    for entry, entry32 in zip(entries, json.loads((tmp_path / "s32" / "skeleton.json").read_text())["weights"]):
        read = [
            np.fromfile(folder / cuda_check.WEIGHTS, np.dtype(e["dtype"]), int(np.prod(e["shape"])), offset=e["offset"])
            for folder, e in ((half, entry), (full, entry32))
        ]
        assert np.array_equal(read[0], read[1].astype(np.float16)), entry["name"]
    assert np.array_equal(np.load(half / "embeddings.npy"), np.load(full / "embeddings.npy").astype(np.float16))


def test_the_fp16_check_counts_each_rows_tokens_equal_to_fp32(llama_export, tmp_path, capsys):
    cuda_check.skeleton(llama_export, tmp_path / "s32", keep_below=256)
    cuda_check.skeleton(fp16_export(llama_export, tmp_path / "e16"), tmp_path / "s16", keep_below=256)
    code = cuda_check.run(tmp_path / "s32", 4, 1, dry_run=True, prompt_lengths=(5, 9, 3), fp16_skeleton=tmp_path / "s16")
    out = capsys.readouterr().out
    found = re.search(r"fp16 parity: .* per row \[([\d, ]+)\] of (\d+)", out)
    assert found, out
    counts, wanted = [int(n) for n in found.group(1).split(",")], int(found.group(2))
    assert len(counts) == 4 and wanted == cuda_check.FP16_TOKENS and all(0 <= n <= wanted for n in counts)
    assert code == (0 if all(n == wanted for n in counts) else 1)
    assert "fp16" in out.split("fp16 parity")[1] and "tokens/s" in out.split("fp16 parity")[1]


def test_the_fp16_check_refuses_a_skeleton_that_is_not_fp16(llama_export, tmp_path):
    cuda_check.skeleton(llama_export, tmp_path / "s32", keep_below=256)
    with pytest.raises(SystemExit, match="precision fp32; expected an fp16 export's skeleton"):
        cuda_check.run(tmp_path / "s32", 4, 1, dry_run=True, prompt_lengths=(5, 9, 3), fp16_skeleton=tmp_path / "s32")


def test_leading_counts_tokens_before_the_first_difference():
    assert cuda_check.leading([1, 2, 3], [1, 2, 4]) == 2
    assert cuda_check.leading([1, 2, 3], [1, 2, 3]) == 3
    assert cuda_check.leading([5], [6, 5]) == 0
