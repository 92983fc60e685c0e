"""`run-model EXPORT --chat` in a terminal: a conversation, as llama-cli and `ollama run` hold one.

Each answer streams as it is made and joins the history, so the model sees the whole conversation
(under the task's soft prompt, if one is given) in its own chat format. `/clear` starts over, `/exit`
or Ctrl-D ends; Ctrl-C ends too (the command's one `interrupted` line). A turn the model cannot take
(the conversation has outgrown its positions, say) is refused alone, and the conversation goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from softprompt.formats.errors import SoftpromptError

HELP = "/clear starts the conversation over, /exit (or Ctrl-D) ends it"


def chat_repl(
    model,
    *,
    task: str | None,
    system: str | None,
    settings: dict,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> int:
    """Hold a conversation with `model` on the terminal until /exit or end of input; returns the exit status."""
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  # line editing and history for input(), where the platform has it
    except ImportError:
        pass
    start = [{"role": "system", "content": system}] if system is not None else []
    model.render_chat([*start, {"role": "user", "content": "hello"}], task)  # no chat template, a bad task: say so now
    history = list(start)
    print(f"chatting with {model.backbone.folder}{f' under task {task}' if task else ''}: {HELP}", file=sys.stderr)
    while True:
        try:
            line = read(">>> ").strip()
        except EOFError:
            out.write("\n")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            return 0
        if line == "/clear":
            history = list(start)
            print("(the conversation starts over)", file=sys.stderr)
            continue
        if line.startswith("/") and " " not in line:
            print(f"unknown command {line}: {HELP}", file=sys.stderr)
            continue
        turn = [*history, {"role": "user", "content": line}]
        answer = []
        try:
            for piece in model.stream_chat(turn, task=task, **settings):
                answer.append(piece)
                out.write(piece)
                out.flush()
        except SoftpromptError as exc:  # this turn only: the conversation so far stays as it was
            print(f"error: {exc} (/clear starts over)", file=sys.stderr)
            continue
        out.write("\n")
        history = [*turn, {"role": "assistant", "content": "".join(answer)}]
