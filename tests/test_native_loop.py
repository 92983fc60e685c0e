"""`load(..., loop="genai")`: onnxruntime-genai's native loop gives the runtime's own tokens for what it serves
(one text, greedy, no task or a prompt task), and everything else runs on the runtime's loop, unchanged."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from softprompt.prompt_bank import save_prompt
from softprompt.runtime import load
from softprompt.runtime.errors import ExportFormatError, RequestError

from conftest import TEXTS, random_prompt


@pytest.fixture(scope="module")
def bank(llama_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("native-bank")
    config = json.loads((llama_export / "softprompt.json").read_text())
    width, fingerprint = config["hidden_size"], config["fingerprint"]
    save_prompt(folder, "soft", random_prompt(4, width, seed=5), fingerprint=fingerprint)
    save_prompt(folder, "stops", random_prompt(3, width, seed=6), fingerprint=fingerprint, extra={"template": "Q: {text} A:"})
    return folder


@pytest.fixture
def sessions(monkeypatch):
    """How many onnxruntime sessions the runtime's own loop has created (through runtime/model.py)."""
    from softprompt.runtime import model as model_module

    made = []
    create = model_module.create_session
    monkeypatch.setattr(model_module, "create_session", lambda *a, **k: made.append(a) or create(*a, **k))
    return made


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_one_greedy_text_gives_the_runtimes_tokens_on_genais_loop(which, llama_export, gpt2_export, bank, tmp_path, sessions):
    export = {"llama": llama_export, "gpt2": gpt2_export}[which]
    if which == "gpt2":  # its own bank: another model's prompts are refused
        config = json.loads((export / "softprompt.json").read_text())
        bank = tmp_path / "bank"
        save_prompt(bank, "soft", random_prompt(4, config["hidden_size"], seed=5), fingerprint=config["fingerprint"])
        save_prompt(bank, "stops", random_prompt(3, config["hidden_size"], seed=6), fingerprint=config["fingerprint"])
    native = load(export, bank=bank, loop="genai")
    assert native.loop == "genai" and not sessions  # nothing of the runtime's loop yet
    runtime = load(export, bank=bank)
    sessions.clear()
    for task in (None, "soft", "stops"):
        for text in TEXTS[:3]:
            for settings in ({"max_new_tokens": 12}, {"max_new_tokens": 9, "min_new_tokens": 9}):
                got, want = native.complete(text, task=task, **settings)[0], runtime.complete(text, task=task, **settings)[0]
                assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        assert "".join(native.stream(TEXTS[1], task=task, max_new_tokens=10)) == runtime.generate(
            TEXTS[1], task=task, max_new_tokens=10
        )
    written = runtime.generate(TEXTS[0], max_new_tokens=12)
    stop = next(written[i : i + 3] for i in range(1, len(written) - 3) if written[i : i + 3].strip())  # one it meets
    got, want = (
        native.complete(TEXTS[0], max_new_tokens=12, stop=stop)[0],
        runtime.complete(TEXTS[0], max_new_tokens=12, stop=stop)[0],
    )
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
    assert not sessions  # all of it on genai's loop


def test_what_genais_loop_does_not_serve_runs_on_the_runtimes_loop(llama_export, bank, sessions):
    native = load(llama_export, bank=bank, loop="genai")
    runtime = load(llama_export, bank=bank)
    sampled = {"max_new_tokens": 8, "temperature": 0.9, "seed": 3}
    assert [c.token_ids for c in native.complete(TEXTS[:2], task="soft", max_new_tokens=6)] == [
        c.token_ids for c in runtime.complete(TEXTS[:2], task="soft", max_new_tokens=6)
    ]
    assert len(sessions) == 2  # the runtime's own, and the native model's, made for the batch
    assert native.complete(TEXTS[0], **sampled)[0].token_ids == runtime.complete(TEXTS[0], **sampled)[0].token_ids
    assert native.complete(TEXTS[0], max_new_tokens=5)[0].token_ids == runtime.complete(TEXTS[0], max_new_tokens=5)[0].token_ids
    assert len(sessions) == 2


def test_a_loop_that_cannot_run_is_refused_with_what_would(llama_export, tmp_path, monkeypatch):
    with pytest.raises(RequestError, match="loop 'fast'; expected one of runtime, genai"):
        load(llama_export, loop="fast")
    old = tmp_path / "old"
    shutil.copytree(llama_export, old)
    (old / "genai_config.json").unlink()
    with pytest.raises(ExportFormatError, match="has no genai_config.json: it was exported before .* write_genai_layout"):
        load(old, loop="genai")
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # the extra not installed
    with pytest.raises(RequestError, match=r"needs onnxruntime-genai: pip install 'softprompt-onnx\[genai\]'"):
        load(llama_export, loop="genai")
    assert load(llama_export).complete(TEXTS[0], max_new_tokens=2)[0].token_ids  # the runtime's loop needs none of it


def test_run_model_takes_the_loop(llama_export, bank, capsys):
    from softprompt.runtime.cli import main

    outputs = []
    for loop in ("runtime", "genai"):
        assert (
            main(
                [
                    str(llama_export),
                    "--bank",
                    str(bank),
                    "--task",
                    "soft",
                    "--max-new-tokens",
                    "7",
                    "--json",
                    "--loop",
                    loop,
                    TEXTS[2],
                ]
            )
            == 0
        )
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and len(outputs[0]["token_ids"]) == 7
    with pytest.raises(SystemExit) as stopped:
        main([str(llama_export), "--loop", "fast", TEXTS[2]])
    assert stopped.value.code == 2 and "argument --loop: invalid choice: 'fast'" in capsys.readouterr().err
