"""The benchmarks' own counting and worker protocol (bench.harness, bench/speed/generate.py and serve.py):
figures in docs/BENCHMARKS.md are only as good as these."""

from __future__ import annotations

import argparse

import pytest

from bench.harness import new_steps
from bench.speed import generate, serve
from softprompt.runtime import load

TEXT = "Review: a gorgeous film. Sentiment:"


def test_one_step_per_generated_token(llama_export):
    """The runtime yields once per generated token, the last yield final; a yield that brought no new token
    (an engine that yields the finished rows again) is never counted as a step."""
    model = load(llama_export)
    ids = [model.encode(TEXT)]
    yields = list(model.steps(ids, max_new_tokens=5, min_new_tokens=5))
    steps = new_steps(model.steps(ids, max_new_tokens=5, min_new_tokens=5))
    made = [len(states[0].ids) for states in steps]
    assert len(yields) == 5 and made == [1, 2, 3, 4, 5]


def test_worker_process_measures_on_request_and_reports_failures(llama_export, tmp_path):
    args = argparse.Namespace(
        export=llama_export, model="unused", threads=1, input_tokens=4, new_tokens=6, inner=1, prompt_length=0, bank=tmp_path
    )
    command, env = generate.side_command("onnx", args, 1)
    worker = serve.Worker([*command, "--serve"], env=env, settle=0)
    try:
        first, second = worker.run(), worker.run()
    finally:
        worker.close()
    for result in (first, second):
        assert result["decode_tokens_per_s"] > 0 and len(result["tokens"][0]) == 6
    assert first["tokens"] == second["tokens"]

    args.export = tmp_path / "no-such-export"
    with pytest.raises(SystemExit, match="no-such-export"):  # the side's own error, from its stderr
        serve.Worker([*generate.side_command("onnx", args, 1)[0], "--serve"], env=env)


def test_rounds_rotate_which_side_goes_first_and_keep_each_sides_values_apart():
    """A side always measured first (or right after another's spinning threads) would be favoured."""
    calls: list[str] = []

    def side(name: str, value: float):
        return lambda: calls.append(name) or value

    rounds = serve.rounds_of(3, side("a", 1.0), side("b", 2.0), side("c", 3.0))
    assert rounds == [(1.0, 2.0, 3.0)] * 3
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_genai_comparison_starts_fresh_processes_for_each_set(llama_export, tmp_path):
    """Identical processes keep different speeds for life here, so one set of processes is one draw:
    each set must be new processes, kept through its rounds. The runtime's own side stands in for genai."""
    args = argparse.Namespace(
        export=llama_export,
        model="unused",
        threads=1,
        input_tokens=4,
        new_tokens=5,
        inner=1,
        prompt_length=0,
        bank=tmp_path,
        genai_rounds=2,
        genai_processes=2,
    )
    stand_in = [*generate.side_command("onnx", args, 1)[0], "--serve"]
    sets = serve.against_genai(args, stand_in)
    assert [len(rounds) for rounds in sets] == [2, 2]
    pids = [{name: {results[name]["pid"] for results in rounds} for name in ("ours", "genai")} for rounds in sets]
    for per_set in pids:
        assert all(len(ids) == 1 for ids in per_set.values())  # kept alive through the set's rounds
        assert len(set.union(*per_set.values())) == 2  # two processes
    assert not set.union(*pids[0].values()) & set.union(*pids[1].values())  # the second set is new processes
    for rounds in sets:
        for results in rounds:
            assert results["ours"]["decode_tokens_per_s"] > 0 and results["ours"]["tokens"] == results["genai"]["tokens"]
