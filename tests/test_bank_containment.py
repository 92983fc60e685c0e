"""One bad bank entry harms nothing else: whatever it holds, other tasks serve, its old version keeps serving,
the error is one line naming the file (logged once per change), and nothing hangs or allocates what a header claims."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest

from softprompt.formats.errors import PromptBankError
from softprompt.formats.export_folder import read_config
from softprompt.prompt_bank import load_prompt, save_prompt
from softprompt.prompt_bank.cli import main as bank_main
from softprompt.runtime import load

from conftest import TEXTS, random_prompt


def record(name: str, **changes) -> str:
    base = {"schema_version": 1, "name": name, "length": 2, "width": 64, "dtype": "float32", "fingerprint": None}
    return json.dumps({**base, **changes})


def write_legacy(bank, name, array=None, **changes):
    np.save(bank / f"{name}.npy", np.ones((2, 64), np.float32) if array is None else array)
    (bank / f"{name}.json").write_text(record(name, **changes))


def huge_header(bank, name):
    """A .npy whose header declares 10^8 x 576 float32 (215 GiB) over a few bytes of data."""
    header = np.lib.format.header_data_from_array_1_0(np.ones((2, 64), np.float32))
    header["shape"] = (10**8, 576)
    with open(bank / f"{name}.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\0" * 64)
    (bank / f"{name}.json").write_text(record(name))


BAD = {
    "extra is null": lambda bank: write_legacy(bank, "bad", extra=None),
    "extra is a list": lambda bank: write_legacy(bank, "bad", extra=["template"]),
    "numeric fingerprint": lambda bank: write_legacy(bank, "bad", fingerprint=5),
    "JSON nested 100,000 deep": lambda bank: (
        np.save(bank / "bad.npy", np.ones((2, 64), np.float32)),
        (bank / "bad.json").write_text("[" * 100_000 + "]" * 100_000),
    ),
    "header declaring 215 GiB": lambda bank: huge_header(bank, "bad"),
    "symlink loop": lambda bank: os.symlink("bad.json", bank / "bad.json"),
    "record linked to /dev/zero": lambda bank: (
        np.save(bank / "bad.npy", np.ones((2, 64), np.float32)),
        os.symlink("/dev/zero", bank / "bad.json"),
    ),
    "FIFO as the vectors": lambda bank: (os.mkfifo(bank / "bad.npy"), (bank / "bad.json").write_text(record("bad"))),
    "FIFO as the record": lambda bank: os.mkfifo(bank / "bad.json"),
    "dangling symlink": lambda bank: os.symlink("nowhere.json", bank / "bad.json"),
    "text file as the vectors": lambda bank: write_legacy(bank, "bad") or (bank / "bad.npy").write_text("hello"),
}


@pytest.fixture
def bank(llama_export, tmp_path):
    config = read_config(llama_export)
    folder = tmp_path / "bank"
    save_prompt(folder, "good", random_prompt(3, config.hidden_size), fingerprint=config.fingerprint)
    return folder


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_entry_is_refused_alone(llama_export, bank, case, caplog, capsys):
    model = load(llama_export, bank=bank)
    want = model.generate(TEXTS[0], task="good", max_new_tokens=4)
    BAD[case](bank)
    with caplog.at_level(logging.ERROR, logger="softprompt.runtime"):
        for _ in range(3):  # every request serves the good task; the bad one is read (and logged) once
            assert model.generate(TEXTS[0], task="good", max_new_tokens=4) == want
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "bad" in errors[0] and "\n" not in errors[0]
    assert "bad" not in model.tasks
    with pytest.raises(PromptBankError, match="bad"):
        load_prompt(bank, "bad")
    assert bank_main(["verify", str(bank)]) == 1
    out = capsys.readouterr().out
    assert "ok    good" in out and "FAIL  bad" in out and "Traceback" not in out


def test_a_bad_new_version_keeps_the_old_one_serving(llama_export, bank, caplog):
    model = load(llama_export, bank=bank)
    want = model.generate(TEXTS[0], task="good", max_new_tokens=4)
    (vectors,) = bank.glob("good.*.npy")
    good = json.loads((bank / "good.json").read_text())
    with caplog.at_level(logging.ERROR, logger="softprompt.runtime"):
        (bank / "good.json").write_text(json.dumps({**good, "extra": None}))
        assert model.generate(TEXTS[0], task="good", max_new_tokens=4) == want
    assert "keeping the version already loaded" in caplog.records[-1].getMessage()
    assert vectors.exists()


RECORD_ERRORS = {
    "template without {text}": ({"template": "Review:"}, "must contain {text} exactly once"),
    "template not a string": ({"template": 5}, "expected a string and an object"),
    "labels not an object": ({"labels": ["a", "b"]}, "expected a string and an object"),
    "empty verbalizer": ({"labels": {"a": ""}}, "expected two non-empty strings"),
    "two labels, one verbalizer": ({"labels": {"a": " x", "b": " x"}}, "share the verbalizer ' x'"),
    "broken head": ({"labels": {"a": " a"}, "head": {"labels": ["a"], "weight": [[1.0]], "bias": [0.0]}}, "head weight"),
    "unknown kind": ({"kind": "regression"}, "kind 'regression'"),
}


@pytest.mark.parametrize("case", list(RECORD_ERRORS))
def test_verify_refuses_what_the_runtime_cannot_serve(llama_export, bank, case, capsys):
    extra, message = RECORD_ERRORS[case]
    config = read_config(llama_export)
    save_prompt(bank, "bad", random_prompt(2, config.hidden_size), fingerprint=config.fingerprint)
    good = json.loads((bank / "bad.json").read_text())
    (bank / "bad.json").write_text(json.dumps({**good, "extra": extra}))
    assert bank_main(["verify", str(bank), "--model", str(llama_export)]) == 1
    assert message in capsys.readouterr().out
    model = load(llama_export, bank=bank)  # the other tasks serve; only a request for the bad one is refused
    assert model.tasks == ["good"] and message in model.unserved["bad"]
    assert model.generate(TEXTS[0], task="good", max_new_tokens=2)
    with pytest.raises(PromptBankError, match=f"task 'bad' is in the bank but cannot be served: .*{re.escape(message)}"):
        model.generate(TEXTS[0], task="bad", max_new_tokens=2)


def test_a_prompt_longer_than_the_models_positions_is_refused_everywhere(llama_export, bank, capsys, caplog):
    config = read_config(llama_export)
    model = load(llama_export, bank=bank)
    want = model.generate(TEXTS[0], task="good", max_new_tokens=4)
    long = random_prompt(config.max_positions, config.hidden_size)
    with caplog.at_level(logging.ERROR, logger="softprompt.runtime"):
        save_prompt(bank, "good", long, fingerprint=config.fingerprint)  # replaces a working task
        assert model.generate(TEXTS[0], task="good", max_new_tokens=4) == want
    assert f"leaves no room for text in the model's {config.max_positions} positions" in caplog.records[-1].getMessage()
    assert bank_main(["verify", str(bank), "--model", str(llama_export)]) == 1
    assert "leaves no room" in capsys.readouterr().out


def test_a_task_that_fails_at_load_harms_only_itself(llama_export, bank, capsys):
    """Another model's width at load: the model loads, the good task serves, a warning names the bad one, and only a
    request for it is refused, by the library, run-model and serve-model's routes alike."""
    from softprompt.runtime.cli import main as run_main

    save_prompt(bank, "other-width", random_prompt(2, 8), fingerprint=read_config(llama_export).fingerprint)
    model = load(llama_export, bank=bank)
    assert model.tasks == ["good"] and "embedding width" in model.unserved["other-width"]
    assert model.complete(TEXTS[0], task="good", max_new_tokens=2)[0].token_ids
    with pytest.raises(PromptBankError, match="task 'other-width' is in the bank but cannot be served: .*embedding width"):
        model.complete(TEXTS[0], task="other-width", max_new_tokens=2)
    capsys.readouterr()
    assert run_main([str(llama_export), "--bank", str(bank), "--task", "good", "--max-new-tokens", "2", "--json", "hi"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["task"] == "good"
    (warning,) = captured.err.strip().splitlines()
    assert warning.startswith("warning: task 'other-width' failed to load") and "good" not in warning.split(":")[1]
    assert run_main([str(llama_export), "--bank", str(bank), "--task", "other-width", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: task 'other-width' is in the bank but cannot be served")
