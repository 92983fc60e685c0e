"""Batch files: run-model --input/--output, rows in input order, batches of mixed tasks, a rerun continues."""

from __future__ import annotations

import json

import pytest

from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import save_prompt
from softprompt.runtime import load
from softprompt.runtime.cli import main as run_main

from conftest import TEXTS, random_prompt

SPEC = TaskSpec(template="Review: {text} Sentiment:", labels={"positive": " good", "negative": " bad"})


@pytest.fixture()
def bank(llama_export, tmp_path):
    fingerprint = json.loads((llama_export / "softprompt.json").read_text())["fingerprint"]
    save_prompt(tmp_path / "bank", "a", random_prompt(3, 64, seed=1), fingerprint=fingerprint, extra=SPEC.to_extra())
    save_prompt(tmp_path / "bank", "b", random_prompt(2, 64, seed=2), fingerprint=fingerprint, extra=SPEC.to_extra())
    return tmp_path / "bank"


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_file_runs_in_order_in_batches_and_a_rerun_continues(llama_export, bank, tmp_path, capsys):
    rows = [{"text": text, "id": i} for i, text in enumerate(TEXTS * 2)]
    rows[3]["task"] = "b"  # a row's own task beside --task's
    write_rows(tmp_path / "in.jsonl", rows)
    args = [str(llama_export), "--bank", str(bank), "--task", "a", "--max-new-tokens", "4", "--quiet"]
    args += ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--batch-size", "3"]
    assert run_main(args) == 0
    out = read_rows(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == list(range(len(rows))) and [r["line"] for r in out] == list(range(1, len(rows) + 1))
    model = load(llama_export, bank=bank, providers="cpu")
    for row, got in zip(rows, out):
        task = row.get("task", "a")
        want = model.complete(row["text"], task=task, max_new_tokens=4)[0]
        assert (got["task"], got["output"], got["token_ids"], got["text"]) == (task, want.text, want.token_ids, row["text"])
    # Stopped mid-write: the cut line is dropped and the rest run again; complete lines are kept as they are.
    whole = (tmp_path / "out.jsonl").read_text()
    kept = whole.splitlines(keepends=True)[:5]
    (tmp_path / "out.jsonl").write_text("".join(kept) + kept[-1][:10])
    capsys.readouterr()
    assert run_main(args) == 0
    assert (tmp_path / "out.jsonl").read_text() == whole
    assert "5 of 8 rows already done" in capsys.readouterr().err
    assert run_main(args) == 0  # nothing left to do
    assert (tmp_path / "out.jsonl").read_text() == whole


def test_classify_file_and_bad_rows(llama_export, bank, tmp_path, capsys):
    write_rows(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    args = [str(llama_export), "--bank", str(bank), "--task", "a", "--classify", "--quiet"]
    assert run_main([*args, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]) == 0
    want = load(llama_export, bank=bank, providers="cpu").classify(TEXTS, task="a")
    assert [(r["label"], r["scores"]) for r in read_rows(tmp_path / "out.jsonl")] == [(w["label"], w["scores"]) for w in want]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n["not", "an", "object"]\n')
    assert run_main([*args, "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o2.jsonl")]) == 1
    assert "bad.jsonl:3: a JSON list; expected an object" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"txt": "typo"}\n')
    assert run_main([*args, "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o2.jsonl")]) == 1
    assert 'bad.jsonl:1: no "text" string' in capsys.readouterr().err
    assert not (tmp_path / "o2.jsonl").exists()  # nothing ran, nothing written
    with pytest.raises(SystemExit) as exit_info:
        run_main([str(llama_export), "--input", str(tmp_path / "in.jsonl")])
    assert exit_info.value.code == 2 and "--input and --output go together" in capsys.readouterr().err
