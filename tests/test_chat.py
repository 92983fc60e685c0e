"""Chat: messages rendered with the export's chat template give the ids transformers' apply_chat_template gives."""

from __future__ import annotations

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
