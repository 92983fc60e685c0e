"""Serving many tasks from one model: cached prompts, mixed-task batches, ensembles, hot swap, threads."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time

import numpy as np
import pytest

from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import UnknownTaskError, load_prompt, remove_prompt, save_prompt
from softprompt.runtime import RequestError, load, read_config

from conftest import TEXTS, random_prompt

SENTIMENT = TaskSpec(template="Review: {text}\nSentiment:", labels={"positive": " good", "negative": " bad mess"})
LENGTHS = {"one": 1, "three": 3, "seven": 7}


def make_bank(export, folder):
    config = read_config(export)
    for seed, (name, length) in enumerate(LENGTHS.items(), 1):
        save_prompt(folder, name, random_prompt(length, config.hidden_size, seed=seed), fingerprint=config.fingerprint)
    for seed, name in enumerate(["s1", "s2", "s3"], 10):
        save_prompt(
            folder,
            name,
            random_prompt(4, config.hidden_size, seed=seed),
            fingerprint=config.fingerprint,
            extra=SENTIMENT.to_extra(),
        )
    return folder


@pytest.fixture
def served(arch, tmp_path):
    _, export = arch
    bank = make_bank(export, tmp_path / "bank")
    return load(export, bank=bank, providers="cpu"), load(export, bank=bank, providers="cpu", cache_prompts=False)


MIXED = ["seven", None, "one", "three", "seven", "s2"]
INPUTS = [TEXTS[0], TEXTS[1], "x", TEXTS[2], TEXTS[1] + " and more words here", TEXTS[0]]


def test_cached_prompts_give_the_uncached_results(served):
    """Rows with different cached prefixes and rows with none, inputs of different lengths (llama and GPT-2 positions)."""
    cached, uncached = served
    fast = cached.complete(INPUTS, task=MIXED, max_new_tokens=8)
    slow = uncached.complete(INPUTS, task=MIXED, max_new_tokens=8)
    assert [r.token_ids for r in fast] == [r.token_ids for r in slow]
    ids = [cached.encode(text, task) for text, task in zip(INPUTS, MIXED)]
    last_cached = cached.logits_of_ids(ids, MIXED)[:, -1]
    last_full = uncached.logits_of_ids(ids, MIXED)[:, -1]
    scale = np.abs(last_full).max()
    np.testing.assert_allclose(last_cached, last_full, rtol=0, atol=1e-4 * max(scale, 1.0))
    # The cached prefix really is used: the first step feeds only the input's tokens, no prompt row.
    embeds, mask, past = cached.first_step([ids[0]], "seven", 1)
    assert embeds.shape[1] == len(ids[0]) and past[0].shape[2] == 7 and mask.shape[1] == 7 + len(ids[0])


def test_cached_prompts_with_an_empty_input(served):
    """An empty input has no token to take logits from: it feeds the prompt's last vector on top of the
    rest of the cache, alone and in a batch beside rows that use the whole cache (a one-vector prompt
    then has no cache at all)."""
    cached, uncached = served
    tasks = ["seven", "seven", "three", None, "one"]
    ids = [[], cached.encode(TEXTS[0]), [], cached.encode("x"), []]
    fast = cached.complete_ids(ids, task=tasks, max_new_tokens=6)
    assert [r.token_ids for r in fast] == [r.token_ids for r in uncached.complete_ids(ids, task=tasks, max_new_tokens=6)]
    assert cached.complete_ids([[]], task="seven", max_new_tokens=6)[0].token_ids == fast[0].token_ids
    full = uncached.logits_of_ids(ids, tasks)[:, -1]
    np.testing.assert_allclose(
        cached.logits_of_ids(ids, tasks)[:, -1], full, rtol=0, atol=1e-4 * max(1.0, float(np.abs(full).max()))
    )


def test_io_binding_path_gives_the_cpu_path_results(served):
    """CUDA sessions keep the cache on the GPU through I/O binding; on the CPU the runtime passes onnxruntime
    values directly. The binding path, forced here on the CPU, must give the same tokens and logits."""
    cached, _ = served
    expected = cached.complete(INPUTS, task=MIXED, max_new_tokens=6)
    ids = [cached.encode(text, task) for text, task in zip(INPUTS, MIXED)]
    logits = cached.logits_of_ids(ids, MIXED)
    cached.graph.binds = True
    assert [r.token_ids for r in cached.complete(INPUTS, task=MIXED, max_new_tokens=6)] == [r.token_ids for r in expected]
    np.testing.assert_array_equal(cached.logits_of_ids(ids, MIXED), logits)


def test_each_row_of_a_mixed_batch_equals_the_row_alone(served):
    cached, _ = served
    batch = cached.complete(INPUTS, task=MIXED, max_new_tokens=8)
    for text, task, row in zip(INPUTS, MIXED, batch):
        alone = cached.complete(text, task=task, max_new_tokens=8)[0]
        assert (row.token_ids, row.task) == (alone.token_ids, task)


def test_classify_rows_with_different_tasks(served):
    cached, uncached = served
    tasks = ["s1", "s3", "s2", "s1"]
    texts = ["a gorgeous film", "dull", "far too long, a tedious mess", "fine"]
    batch = cached.classify(texts, task=tasks)
    for text, task, result in zip(texts, tasks, batch):
        for model in (cached, uncached):
            alone = model.classify(text, task=task)[0]
            assert alone["label"] == result["label"]
            assert alone["scores"] == pytest.approx(result["scores"], abs=1e-4)


def test_a_zero_shot_task_classifies_with_its_template_alone(served, caplog):
    """A Task with no vectors (a template and labels: what a prompt is measured against) has no prompt to cache and
    scores as an input that holds its template, in a batch with trained tasks or alone."""
    from softprompt.runtime.tasks import Task

    cached, uncached = served
    zero_shot = Task("zero-shot", np.zeros((0, cached.config.hidden_size), np.float32), SENTIMENT)
    texts = ["a gorgeous film", "dull"]
    with caplog.at_level(logging.ERROR):
        mixed = cached.classify(texts + texts, task=[zero_shot, zero_shot, "s1", "s2"])
        for text, row in zip(texts, mixed):
            alone = uncached.classify(text, task=zero_shot)[0]
            assert alone["label"] == row["label"] and alone["scores"] == pytest.approx(row["scores"], abs=1e-4)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("how", ["vote", "mean"])
def test_ensemble_combines_the_members(served, how):
    cached, _ = served
    texts = ["a gorgeous film", "dull and slow", "fine"]
    members = ["s1", "s2", "s3"]
    results = cached.classify(texts, task=members, ensemble=how)
    for text, result in zip(texts, results):
        singles = [cached.classify(text, task=m)[0] for m in members]
        assert result["members"] == {m: s["label"] for m, s in zip(members, singles)}
        mean = {label: np.mean([s["scores"][label] for s in singles]) for label in SENTIMENT.labels}
        assert result["scores"] == pytest.approx(mean, abs=1e-6)
        votes = {label: sum(s["label"] == label for s in singles) for label in SENTIMENT.labels}
        assert result["votes"] == votes
        if how == "mean":
            assert result["label"] == max(mean, key=mean.get)
        else:
            top = max(votes.values())
            tied = [label for label, v in votes.items() if v == top]
            assert result["label"] == max(tied, key=mean.get)


def test_ensemble_refusals(served):
    cached, _ = served
    with pytest.raises(RequestError, match="at least two different tasks"):
        cached.classify("x", task=["s1"], ensemble="vote")
    with pytest.raises(RequestError, match="expected 'vote' or 'mean'"):
        cached.classify("x", task=["s1", "s2"], ensemble="median")
    with pytest.raises(RequestError, match="'one' is a generation task with no labels"):
        cached.classify("x", task=["s1", "one"], ensemble="vote")
    config = read_config(cached.backbone.folder)
    save_prompt(
        cached.bank,
        "topic",
        random_prompt(2, config.hidden_size),
        fingerprint=config.fingerprint,
        extra=TaskSpec(labels={"sport": " sport", "politics": " politics"}).to_extra(),
    )
    with pytest.raises(RequestError, match=r"members \['topic'\] have labels other than 's1'"):
        cached.classify("x", task=["s1", "topic"], ensemble="vote")


def test_hot_swap_add_replace_remove_and_dot_files(llama_export, tmp_path):
    config = read_config(llama_export)
    bank = make_bank(llama_export, tmp_path / "bank")
    model = load(llama_export, bank=bank)
    before = model.generate(TEXTS[0], task="three", max_new_tokens=6)
    # Replace: served from the next request on, without a restart.
    save_prompt(bank, "three", random_prompt(3, config.hidden_size, seed=99), fingerprint=config.fingerprint)
    after = model.generate(TEXTS[0], task="three", max_new_tokens=6)
    fresh = load(llama_export, bank=bank).generate(TEXTS[0], task="three", max_new_tokens=6)
    assert after == fresh and after != before
    # Served at once; its cached keys/values arrive from a background thread, with the same results.
    assert model.wait_for_prompt_cache(timeout=60) and model.is_cached("three")
    assert model.generate(TEXTS[0], task="three", max_new_tokens=6) == after
    model.reload()  # on demand: synchronous, caches included
    assert all(model.is_cached(name) for name in ("three", "seven"))
    # Add by copying files in; a copy tool's dot-named temporary file is not a task.
    other = tmp_path / "other"
    save_prompt(other, "new", random_prompt(5, config.hidden_size, seed=5), fingerprint=config.fingerprint)
    (vectors,) = other.glob("new.*.npy")
    shutil.copy(vectors, bank / ".new.npy.tmp1")
    shutil.copy(other / "new.json", bank / ".hidden.json")
    assert "hidden" not in model.tasks and ".hidden" not in model.tasks
    shutil.copy(other / "new.json", bank / "new.json")  # the record before its vectors: not served yet
    assert "new" not in model.tasks
    shutil.copy(vectors, bank / vectors.name)  # served once they arrive
    assert "new" in model.tasks
    assert model.generate(TEXTS[1], task="new", max_new_tokens=4) == load(llama_export, bank=other).generate(
        TEXTS[1], task="new", max_new_tokens=4
    )
    # Remove.
    remove_prompt(bank, "one")
    with pytest.raises(UnknownTaskError, match="no task 'one'"):
        model.generate(TEXTS[0], task="one")


def test_a_resolved_task_keeps_its_version_through_a_swap(llama_export, tmp_path):
    """A request templated and run in separate calls (a server, a batch file's chats) holds the Task it resolved:
    a swap between the calls reaches the next request, never the rest of this one."""
    config = read_config(llama_export)
    bank = make_bank(llama_export, tmp_path / "bank")
    model = load(llama_export, bank=bank)
    before = model.complete(TEXTS[0], task="s1", max_new_tokens=6)[0]
    held = model.resolve_tasks(["s1", None])
    swapped = TaskSpec(template="Tweet: {text} =>", labels=SENTIMENT.labels)
    save_prompt(
        bank, "s1", random_prompt(4, config.hidden_size, seed=77), fingerprint=config.fingerprint, extra=swapped.to_extra()
    )
    ids = model.encode(TEXTS[0], held[0])
    assert ids == model.encode(SENTIMENT.apply(TEXTS[0]))  # the held template, not the swapped one
    again = model.complete_ids([ids], task=held[:1], max_new_tokens=6)[0]
    assert (again.token_ids, again.task) == (before.token_ids, "s1")
    assert model.complete(TEXTS[0], task=held[0], max_new_tokens=6)[0].token_ids == before.token_ids
    assert model.complete(TEXTS[0], task="s1", max_new_tokens=6)[0].token_ids != before.token_ids  # by name: the new one


def test_a_bad_new_file_never_replaces_a_working_prompt(llama_export, tmp_path, caplog):
    bank = make_bank(llama_export, tmp_path / "bank")
    model = load(llama_export, bank=bank)
    good = model.generate(TEXTS[0], task="seven", max_new_tokens=6)
    (vectors,) = bank.glob("seven.*.npy")
    data = vectors.read_bytes()
    record = json.loads((bank / "seven.json").read_text())
    with caplog.at_level(logging.ERROR, logger="softprompt.runtime"):
        vectors.write_bytes(data[: len(data) // 2])  # truncated in place
        assert model.generate(TEXTS[0], task="seven", max_new_tokens=6) == good
        assert model.generate(TEXTS[0], task="seven", max_new_tokens=6) == good  # (logged once, not per request)
        np.save(bank / "seven.npy", np.ones((7, 3), np.float32))  # a schema-1 copy of the wrong width
        (bank / "seven.json").write_text(json.dumps({**record, "schema_version": 1, "vectors": None, "vectors_sha256": None}))
        assert model.generate(TEXTS[0], task="seven", max_new_tokens=6) == good
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all("seven" in e and "keeping the version already loaded" in e for e in errors)
    assert "sha256" in errors[0] and "array is 7x3" in errors[1]
    # A bad file for a new name is simply not served.
    (bank / "broken.npy").write_bytes(b"not numpy")
    assert "broken" not in model.tasks
    # Fixing the file is picked up.
    (bank / "seven.npy").write_bytes(data)
    assert model.generate(TEXTS[0], task="seven", max_new_tokens=6) == good
    assert model.reload() == ["one", "s1", "s2", "s3", "seven", "three"]


def test_swapping_under_concurrent_requests(llama_export, tmp_path):
    """8 threads generate while another swaps a task between two prompts: no failure, never a mix."""
    config = read_config(llama_export)
    bank, versions = tmp_path / "bank", tmp_path / "versions"
    for seed, name in ((1, "a"), (2, "b")):
        save_prompt(versions / name, "task", random_prompt(6, config.hidden_size, seed=seed), fingerprint=config.fingerprint)
    save_prompt(bank, "task", load_prompt(versions / "a", "task").vectors, fingerprint=config.fingerprint)
    model = load(llama_export, bank=bank)
    expected = {
        name: load(llama_export, bank=versions / name).generate(TEXTS, task="task", max_new_tokens=6) for name in ("a", "b")
    }
    assert expected["a"] != expected["b"]
    stop, enough = threading.Event(), threading.Event()
    outputs, failures = [], []

    def serve():
        while not stop.is_set():
            try:
                outputs.append(model.generate(TEXTS, task="task", max_new_tokens=6))
            except Exception as exc:  # noqa: BLE001 - any failure fails the test
                failures.append(exc)
                enough.set()
            if len(outputs) >= 16 and len({tuple(o) for o in outputs}) == 2:
                enough.set()  # both versions served, often enough

    def swap():
        flip = 0
        while not stop.is_set():
            flip ^= 1
            (vectors,) = (versions / "ab"[flip]).glob("task.*.npy")
            for source in (vectors, versions / "ab"[flip] / "task.json"):  # the vectors, then the record that names them
                temporary = bank / f".{source.name}.partial"  # as a copy tool does: temporary file, then rename
                shutil.copyfile(source, temporary)
                temporary.replace(bank / source.name)
            time.sleep(0.005)

    threads = [threading.Thread(target=serve) for _ in range(8)] + [threading.Thread(target=swap)]
    for thread in threads:
        thread.start()
    enough.wait(timeout=120)
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    assert len(outputs) >= 16
    seen = {tuple(o) for o in outputs}
    assert seen <= {tuple(expected["a"]), tuple(expected["b"])}
    assert len(seen) == 2  # both versions were served


def test_run_model_ensemble_cli(llama_export, tmp_path, capsys):
    import json

    from softprompt.runtime.cli import main as run_main

    bank = make_bank(llama_export, tmp_path / "bank")
    texts = ["a gorgeous film", "dull and slow"]
    args = [str(llama_export), "--bank", str(bank), "--classify", "--task", "s1,s2,s3", "--ensemble", "mean"]
    assert run_main([*args, "--json", *texts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = load(llama_export, bank=bank).classify(texts, task=["s1", "s2", "s3"], ensemble="mean")
    assert [{k: v for k, v in line.items() if k not in ("input", "task")} for line in lines] == expected
    assert run_main([*args, texts[0]]) == 0
    assert "votes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_main([str(llama_export), "--bank", str(bank), "--classify", "--task", "s1,s2", texts[0]])
    assert "needs --ensemble" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_main([str(llama_export), "--bank", str(bank), "--task", "s1,s2", "--ensemble", "vote", texts[0]])
    assert "--ensemble needs --classify" in capsys.readouterr().err


def test_fused_export_serves_the_same_tokens(arch, tmp_path):
    """A traced graph with --fuse (contrib ops for norms, rotary and attention) against the default export
    (built for Llama, traced for GPT-2): padded, mixed-task and cached-prompt batches give the same tokens."""
    from softprompt.exporter.export import export_model

    hf_dir, export = arch
    config = export_model(str(hf_dir), tmp_path / "fused", fuse=True, graph="traced", log=lambda m: None)
    assert config.validation["fusions"]  # something was fused (the validation above it passed)
    bank = make_bank(export, tmp_path / "bank")
    fused = load(tmp_path / "fused", bank=bank, providers="cpu")
    plain = load(export, bank=bank, providers="cpu")
    assert [r.token_ids for r in fused.complete(INPUTS, task=MIXED, max_new_tokens=8)] == [
        r.token_ids for r in plain.complete(INPUTS, task=MIXED, max_new_tokens=8)
    ]
    ids = [plain.encode(text, task) for text, task in zip(INPUTS, MIXED)]
    a, b = fused.logits_of_ids(ids, MIXED)[:, -1], plain.logits_of_ids(ids, MIXED)[:, -1]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(np.abs(b).max(), 1.0))


def test_a_missing_bank_folder_is_refused_at_load(llama_export, tmp_path):
    from softprompt.prompt_bank import InvalidPromptError

    with pytest.raises(InvalidPromptError, match="is not a folder"):
        load(llama_export, bank=tmp_path / "no-such-bank")


EXIT_AFTER_SWAP = """
import sys, time
import numpy as np
from softprompt.formats.export_folder import read_config
from softprompt.prompt_bank import save_prompt
from softprompt.runtime import load, prompt_cache

real = prompt_cache.prefill

def slow_prefill(graph, vectors):  # a prompt that takes a while: onnxruntime is busy when the process exits
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        prefix = real(graph, vectors)
    print("prefill finished", flush=True)
    return prefix

prompt_cache.prefill = slow_prefill
export, bank = sys.argv[1], sys.argv[2]
config = read_config(export)
save_prompt(bank, "t", np.full((4, config.hidden_size), 0.01, np.float32), fingerprint=config.fingerprint)
model = load(export, bank=bank)
save_prompt(bank, "t", np.full((4, config.hidden_size), 0.02, np.float32), fingerprint=config.fingerprint)
model.generate("hello", task="t", max_new_tokens=1)  # served uncached; its cache is computed in the background
print("exiting", flush=True)
"""


def test_a_process_may_exit_while_a_swapped_prompt_is_cached(llama_export, tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", EXIT_AFTER_SWAP, str(llama_export), str(tmp_path / "bank")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["exiting", "prefill", "finished"]  # the computation ran to its end, then the exit
