"""The KV cache kept in buffers that each step writes in place (runtime/shared_cache.py) against a past that grows.

The same export is run both ways: rows of different lengths, settings and tasks that join a running batch
(wider and narrower than it) and leave it at different steps must write the same tokens either way, and a
growing past is what the parity tests check against PyTorch.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from softprompt.exporter import export_model
from softprompt.runtime import GenerationSettings, load
from softprompt.runtime.engine import Job
from softprompt.runtime.graph import numpy_value

from conftest import TEXTS, random_prompt


@pytest.fixture(scope="module")
def model(llama_export, tmp_path_factory):
    from softprompt.formats.bank import save_prefix, save_prompt

    bank = tmp_path_factory.mktemp("shared-bank") / "bank"
    config = load(llama_export, providers="cpu").config
    for seed, (name, length) in enumerate({"short": 3, "long": 9}.items()):
        save_prompt(bank, name, random_prompt(length, config.hidden_size, seed=seed), fingerprint=config.fingerprint)
    keys_values = np.random.default_rng(5).normal(0, 0.5, (2 * config.num_layers, config.num_kv_heads, 4, config.head_size))
    save_prefix(bank, "prefix", keys_values.astype(np.float32), fingerprint=config.fingerprint)
    return load(llama_export, bank=bank, providers="cpu")


def batch_of(model, shared: bool):
    """An empty DecodeBatch of `model` whose cache is shared or grows (the graph's flag is read when a batch is made)."""
    was, model.graph.shares_cache = model.graph.shares_cache, shared
    try:
        batch = model.batch()
    finally:
        model.graph.shares_cache = was
    assert (batch.cache is not None) == shared
    return batch


def run(model, plan, shared: bool) -> dict[str, list[int]]:
    """Drive one DecodeBatch: `plan` is [(step at which they join, [(name, text, task, settings)])]."""
    batch = batch_of(model, shared)
    results: dict[str, list[int]] = {}
    waiting = sorted(plan, key=lambda entry: entry[0])
    step = 0
    while waiting or batch.rows:
        while waiting and waiting[0][0] <= step:
            _, rows = waiting.pop(0)
            jobs = [
                Job(model.encode(text, task), task, settings, on_done=lambda s, name=name: results.update({name: s.ids}))
                for name, text, task, settings in rows
            ]
            batch.admit(jobs)
        if batch.rows:
            batch.step()
        step += 1
    return results


def test_a_built_export_shares_its_cache_and_growing_keeps_onnx_attention(llama_dir, llama_export, tmp_path):
    """The default built graph says its cache may be shared (GroupQueryAttention); export-model --kv-cache growing
    keeps ONNX's Attention and the runtime grows its past; both give the same tokens."""
    shared = load(llama_export, providers="cpu")
    assert shared.graph.shares_cache and shared.config.kv_cache == "shared"
    from softprompt.exporter.cli import main

    assert main([str(llama_dir), str(tmp_path / "growing"), "--kv-cache", "growing", "-q"]) == 0
    ops = {node.op_type for node in onnx.load(str(tmp_path / "growing" / "model.onnx"), load_external_data=False).graph.node}
    assert "Attention" in ops and "GroupQueryAttention" not in ops
    growing = load(tmp_path / "growing", providers="cpu")
    assert growing.config.kv_cache == "growing"
    assert not growing.graph.shares_cache and growing.batch().cache is None
    settings = GenerationSettings(max_new_tokens=12, min_new_tokens=12)
    assert [c.token_ids for c in shared.complete(TEXTS, settings=settings)] == [
        c.token_ids for c in growing.complete(TEXTS, settings=settings)
    ]


def test_rows_joining_and_leaving_write_what_a_growing_past_writes(model):
    greedy = GenerationSettings(max_new_tokens=20, min_new_tokens=20)
    short = GenerationSettings(max_new_tokens=3, temperature=0.9, seed=3)
    sampled = GenerationSettings(max_new_tokens=14, temperature=0.7, top_k=20, seed=11)
    plan = [
        (0, [("a", TEXTS[0], "short", greedy), ("b", TEXTS[1], None, short)]),
        (2, [("c", TEXTS[2] + " and a much longer input than the rows running", "long", sampled)]),  # wider than the batch
        (5, [("d", "hi", "prefix", short), ("e", TEXTS[1], "long", greedy)]),  # narrower
        (30, [("f", TEXTS[0], "short", sampled)]),  # into an empty batch after all left
    ]
    growing = run(model, plan, shared=False)
    assert set(growing) == set("abcdef")
    assert run(model, plan, shared=True) == growing


def test_a_buffer_out_of_room_grows_and_keeps_the_rows(model, monkeypatch):
    """With room for 2 more steps at a time the buffers are made again every other step: nothing is lost."""
    from softprompt.runtime import shared_cache

    monkeypatch.setattr(shared_cache, "ROOM", 2)
    settings = GenerationSettings(max_new_tokens=16, min_new_tokens=16)
    plan = [(0, [("a", TEXTS[0], "long", settings)]), (3, [("b", TEXTS[1], None, settings)])]
    assert run(model, plan, shared=True) == run(model, plan, shared=False)


def test_a_cancelled_row_leaves_and_the_others_go_on(model):
    settings = GenerationSettings(max_new_tokens=10, min_new_tokens=10)
    for shared in (False, True):
        batch = batch_of(model, shared)
        done: dict[str, list[int]] = {}
        jobs = [
            Job(model.encode(text), None, settings, on_done=lambda s, n=n, done=done: done.update({n: s.ids}))
            for n, text in (("a", TEXTS[0]), ("b", TEXTS[1]))
        ]
        batch.admit(jobs)
        batch.step()
        jobs[0].cancelled = True
        batch.step()
        assert [row.job for row in batch.rows] == [jobs[1]]
        while batch.rows:
            batch.step()
        assert "a" not in done and len(done["b"]) == 10
        alone = model.complete(TEXTS[1], settings=settings)[0].token_ids
        assert done["b"] == alone


def test_the_buffers_hold_the_cache_a_growing_past_would(model):
    """Column for column: after the same steps, the in-place buffers equal the growing past (up to the mask's width)."""
    settings = GenerationSettings(max_new_tokens=8, min_new_tokens=8)
    batches = {}
    for shared in (False, True):
        batch = batches[shared] = batch_of(model, shared)
        batch.admit([Job(model.encode(text), None, settings) for text in TEXTS[:2]])
        for _ in range(4):
            batch.step()
    growing, shared_batch = batches[False], batches[True]
    np.testing.assert_array_equal(growing.mask, shared_batch.mask)
    width = growing.mask.shape[1]
    assert shared_batch.cache.length == width
    for past, buffer in zip(growing.past, shared_batch.cache.buffers):
        np.testing.assert_allclose(buffer[:, :, :width], numpy_value(past), rtol=0, atol=1e-6)


def test_fp16_keeps_onnx_attention_and_cuda_hears_which_export_to_use(llama_dir, llama_export, tmp_path):
    """onnxruntime's CUDA GroupQueryAttention is fp16 only: fp16 exports keep ONNX's Attention, and a session on CUDA
    of an fp32-activation export whose attention shares its cache is told to export with --kv-cache growing."""
    from softprompt.runtime.session import CUDA, warn_if_slow

    config = export_model(str(llama_dir), tmp_path / "fp16", precision="fp16", log=lambda m: None)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "fp16" / "model.onnx"), load_external_data=False).graph.node}
    assert "Attention" in ops and "GroupQueryAttention" not in ops and config.kv_cache == "growing"

    model = load(llama_export, providers="cpu")

    class OnCuda:  # the session's answer as onnxruntime-gpu gives it, without a GPU
        def get_providers(self):
            return [CUDA, "CPUExecutionProvider"]

    assert model.config.kv_cache == "shared"
    with pytest.warns(RuntimeWarning, match="--kv-cache growing"):
        warn_if_slow(model.config, OnCuda())


def test_an_onnxruntime_without_the_shared_cache_s_attention_is_told_what_to_do(llama_export):
    """onnxruntime before 1.32 (onnxruntime-gpu and -web included, for now) has no query_seqlens: a clear error, not
    the schema error it would give; growing exports and older ones without the field load anywhere."""
    import dataclasses

    from softprompt.runtime.errors import ExportFormatError
    from softprompt.runtime.session import check_onnxruntime

    config = load(llama_export, providers="cpu").config
    with pytest.raises(
        ExportFormatError, match=r"needs onnxruntime 1\.32 or later; this is onnxruntime 1\.31\.1.*--kv-cache growing"
    ):
        check_onnxruntime(config, "1.31.1")
    check_onnxruntime(config, "1.32.0")
    check_onnxruntime(config, "1.40.0.dev20270101")
    for kv_cache in ("growing", None):
        check_onnxruntime(dataclasses.replace(config, kv_cache=kv_cache), "1.18.0")
