"""Chat: messages rendered with the export's chat template give the ids transformers' apply_chat_template gives."""

from __future__ import annotations

import json

import pytest

from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import save_prompt
from softprompt.runtime import RequestError, load
from softprompt.runtime.cli import main as run_main
from softprompt.runtime.errors import RequestTypeError

from conftest import CONVERSATION, random_prompt


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:2], CONVERSATION[:3]])
def test_rendered_ids_are_transformers_apply_chat_template(chat_export, messages):
    from transformers import AutoTokenizer

    folder, export = chat_export
    model = load(export, providers="cpu")
    want = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) else list(want)
    text = model.render_chat(messages)
    assert model.backbone.encode(text, add_special_tokens=False) == want
    answer = model.chat(messages, max_new_tokens=5)
    assert answer.token_ids == model.complete_ids([want], max_new_tokens=5)[0].token_ids
    assert answer.input == text


def test_a_task_prompts_the_chat_and_its_template_wraps_the_last_user_message(chat_export, tmp_path):
    _, export = chat_export
    model = load(export, providers="cpu")
    fingerprint = model.config.fingerprint
    save_prompt(
        tmp_path, "polite", random_prompt(3, 64), fingerprint=fingerprint, extra=TaskSpec(template="Q: {text}").to_extra()
    )
    save_prompt(
        tmp_path,
        "pattern",
        random_prompt(4, 64),
        fingerprint=fingerprint,
        extra=TaskSpec(template="{soft:2}A {text}{soft:2}").to_extra(),
    )
    model = load(export, bank=tmp_path, providers="cpu")
    text = model.render_chat(CONVERSATION, task="polite")
    assert "<|user|>\nQ: Ok" in text and "<|user|>\nHi?" in text  # the last user message only
    ids = model.backbone.encode(text, add_special_tokens=False)
    answer = model.chat(CONVERSATION, task="polite", max_new_tokens=5)
    assert answer.token_ids == model.complete_ids([ids], task="polite", max_new_tokens=5)[0].token_ids
    assert answer.task == "polite"
    with pytest.raises(RequestError, match="'pattern' places vectors inside its template"):
        model.chat(CONVERSATION, task="pattern")
    with pytest.raises(RequestError, match="chat template refused the messages: unknown role tool"):
        model.chat([{"role": "tool", "content": "x"}])
    with pytest.raises(RequestTypeError, match="message 0's content is 3; expected a string"):
        model.chat([{"role": "user", "content": 3}])
    with pytest.raises(RequestTypeError, match="expected a non-empty list"):
        model.chat("hello")


def test_chat_needs_a_template_and_the_cli_says_so(llama_export, chat_export, capsys):
    model = load(llama_export, providers="cpu")
    with pytest.raises(RequestError, match="has no chat template"):
        model.chat([{"role": "user", "content": "hi"}])
    assert run_main([str(llama_export), "--chat", "hi"]) == 1
    assert "has no chat template" in capsys.readouterr().err
    _, export = chat_export
    assert run_main([str(export), "--chat", "--system", "Be brief.", "hi", "--max-new-tokens", "3", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"message": "hi"' in out and "<|system|>\\nBe brief." in out
    with pytest.raises(SystemExit) as exit_info:
        run_main([str(export), "--system", "Be brief.", "hi"])
    assert exit_info.value.code == 2 and "--system needs --chat" in capsys.readouterr().err


def test_a_chat_file_answers_each_row_as_chat_does(chat_export, tmp_path):
    import json

    _, export = chat_export
    rows = [{"text": "Hi?"}, {"messages": CONVERSATION[:2]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [str(export), "--chat", "--system", "Be brief.", "--max-new-tokens", "3", "--quiet"]
    assert run_main([*args, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    model = load(export, providers="cpu")
    want = [
        model.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], max_new_tokens=3),
        model.chat(CONVERSATION[:2], max_new_tokens=3),  # a row's own messages keep their own system message
    ]
    assert [r["token_ids"] for r in out] == [w.token_ids for w in want]


def test_chat_in_a_terminal_is_a_conversation(chat_export, tmp_path):
    """run-model --chat with no text in a terminal: a prompt, answers that stream and join the history, /clear,
    /exit; what it answers is what the Python API answers for the same conversation."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    from softprompt.runtime import load

    _, export = chat_export
    model = load(export)
    first = model.chat([{"role": "user", "content": "hello there"}], max_new_tokens=6).text
    second = model.chat(
        [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "and again"},
        ],
        max_new_tokens=6,
    ).text
    controller, terminal = pty.openpty()
    command = [sys.executable, "-m", "softprompt.runtime.cli", str(export), "--chat", "--max-new-tokens", "6"]
    process = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=subprocess.PIPE, text=True)
    os.close(terminal)
    screen = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal screen
        deadline = time.time() + 60
        while screen.count(marker) < count and time.time() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                screen += os.read(controller, 4096)

    try:
        read_until(b">>> ", 1)
        for count, line in enumerate((b"hello there\n", b"and again\n", b"/clear\n", b"hello there\n"), start=2):
            os.write(controller, line)
            read_until(b">>> ", count)
        os.write(controller, b"/exit\n")
        err = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    assert process.returncode == 0, err
    text = screen.decode("utf-8", "replace").replace("\r\n", "\n")
    turns = text.split(">>> ")
    # The terminal echoes each line typed; the answer follows it.
    assert turns[1] == f"hello there\n{first}\n" and turns[2] == f"and again\n{second}\n"
    assert turns[4] == f"hello there\n{first}\n"  # after /clear the conversation starts over
    assert "chatting with" in err and "/exit" in err and "starts over" in err


def test_from_text_on_a_chat_model_says_to_run_the_task_in_its_chat_format(chat_export, tmp_path, capsys):
    """An instruct model under a text prompt answers in its chat format; plain generation after it often says
    nothing. prompt-bank from-text says so, and the task then answers under --chat."""
    from softprompt.prompt_bank.cli import main as bank_main
    from softprompt.runtime.cli import main as run_main

    _, export = chat_export
    bank = tmp_path / "bank"
    assert bank_main(["from-text", str(export), str(bank), "--task", "polite", "Answer politely and briefly."]) == 0
    err = capsys.readouterr().err
    assert f"run-model {export} --bank {bank} --task polite --chat" in err
    argv = [
        str(export),
        "--bank",
        str(bank),
        "--task",
        "polite",
        "--chat",
        "--max-new-tokens",
        "4",
        "--json",
        "Where is my order?",
    ]
    assert run_main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) > 0
