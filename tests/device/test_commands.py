"""What every command does when something goes wrong: Ctrl-C is one line and exit 130, a closed pipe ends quietly,
a missing file is one line without Python's errno text, and an option typed with underscores is named as meant.

Torch-free: run-model and prompt-bank on the committed tiny export."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from softprompt.formats.command import CLOSED_PIPE, INTERRUPTED, run_command
from softprompt.prompt_bank.cli import main as bank_main
from softprompt.runtime.cli import main as run_main

FIXTURE = Path(__file__).resolve().parents[1] / "fixture"
EXPORT = FIXTURE / "export"
RUN_MODEL = [sys.executable, "-m", "softprompt.runtime.cli"]


def test_a_missing_input_file_is_one_line_without_errno(tmp_path, capsys):
    missing = tmp_path / "words.jsonl"
    assert run_main([str(EXPORT), "--input", str(missing), "--output", str(tmp_path / "out.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {missing}: no such file or directory"


@pytest.mark.parametrize(
    ("main", "argv", "meant"),
    [
        (run_main, [str(EXPORT), "--max_new_tokens", "3", "hi"], "--max-new-tokens"),
        (run_main, [str(EXPORT), "hi", "--top_p=0.5"], "--top-p"),
        (bank_main, ["verify", str(FIXTURE / "bank"), "--model_dir", "x"], None),
    ],
)
def test_an_option_with_underscores_is_named_as_meant(capsys, main, argv, meant):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    if meant:
        assert f"did you mean {meant}?" in err
    else:  # no option of that name with dashes either: argparse's own words
        assert "did you mean" not in err and "unrecognized arguments" in err


def test_ctrl_c_and_sigterm_end_with_one_line_and_130():
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_command(interrupted) == INTERRUPTED


def test_ctrl_c_during_a_batch_file_is_one_line_and_130(tmp_path):
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"text": f"input number {i}"}) + "\n" for i in range(4000)))
    out = tmp_path / "out.jsonl"
    command = [*RUN_MODEL, str(EXPORT), "--input", str(rows), "--output", str(out), "--batch-size", "4", "--quiet"]
    # A shell's background job ignores SIGINT, and a child inherits that (CI may run so): restore it, as a terminal has it.
    running = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
    deadline = time.time() + 120
    while (not out.exists() or not out.read_text()) and time.time() < deadline and running.poll() is None:
        time.sleep(0.1)  # generating: some rows are written
    assert running.poll() is None, "the run ended before it could be interrupted"
    running.send_signal(signal.SIGINT)
    err = running.communicate(timeout=60)[1]
    assert running.returncode == INTERRUPTED, err
    assert err.strip() == "interrupted", err
    written = out.read_text().splitlines()
    assert written and all(json.loads(line)["text"].startswith("input number") for line in written)  # whole lines


def test_a_closed_pipe_ends_quietly():
    texts = "".join(f"text {i}\n" for i in range(3000))
    command = " ".join([*RUN_MODEL, str(EXPORT), "--json", "--max-new-tokens", "1"]) + " | head -n 1"
    ran = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], input=texts, capture_output=True, text=True, timeout=300)
    assert json.loads(ran.stdout)["input"] == "text 0"
    assert ran.stderr == "" and ran.returncode == CLOSED_PIPE


def test_chat_in_a_terminal_on_a_model_without_a_chat_template_is_one_error_line(capsys):
    """The conversation refuses to start (rather than failing every turn) when the export has no chat template."""
    from softprompt.runtime import load
    from softprompt.runtime.repl import chat_repl

    def never(prompt: str) -> str:
        raise AssertionError("asked for input before checking the model can chat")

    assert run_command(lambda: chat_repl(load(EXPORT), task=None, system=None, settings={}, read=never)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
