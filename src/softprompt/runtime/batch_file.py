"""A file of inputs in, a file of outputs out: `run-model EXPORT --input in.jsonl --output out.jsonl`.

One JSON object a line each way. An input line has `text` (or, for chat, `messages`, a list of
{"role", "content"}; a `text` is then one user message) and may name its own `task` (null: the default); the output line
repeats the input's fields and adds `line` (the input's line number), `task` and the result: a
generation's `output`, `token_ids` and `finish_reason`; or `label` and `scores`; or `embedding`. Rows run in batches of
`batch_size` (rows of different tasks share a batch) and are written in input order, a batch at a
time, so a run that is stopped keeps every finished batch: run again and it continues after the
last complete line already in the output (a line cut short by the stop is dropped first).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .chat import user_turn
from .errors import RequestError

MODES = ("generate", "classify", "chat", "embed")


def read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error naming it."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise RequestError(f"{path}:{number}: not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise RequestError(f'{path}:{number}: a JSON {type(row).__name__}; expected an object such as {{"text": ...}}')
            yield number, row


def lines_done(path: Path) -> int:
    """How many complete result lines `path` already holds; a last line cut short (no newline, or not JSON) is
    removed, so the run that wrote it can be continued."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a line cut short
    lines = data[:keep].splitlines()
    while lines:
        try:
            json.loads(lines[-1])
            break
        except ValueError:
            lines.pop()
    good = sum(len(line) + 1 for line in lines)
    if good != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(good)
    return len(lines)


def run_file(
    model,
    source: Path,
    target: Path,
    *,
    mode: str,
    task: str | None = None,
    batch_size: int = 16,
    settings: dict[str, Any] | None = None,
    system: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> int:
    """Run every row of `source` and append its result to `target`; returns how many rows ran this time."""
    if mode not in MODES:
        raise RequestError(f"mode {mode!r}; expected one of {', '.join(MODES)}")
    if batch_size < 1:
        raise RequestError(f"batch size {batch_size}; expected at least 1")
    rows = list(read_rows(source))
    for number, row in rows:
        check_row(row, mode, f"{source}:{number}")
    done = lines_done(target)
    if done > len(rows):
        raise RequestError(f"{target} has {done} result lines; {source} has only {len(rows)} inputs: another file's results?")
    if done:
        log(f"{target}: {done} of {len(rows)} rows already done; continuing")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), initial=done, unit="row", desc=mode, disable=not progress, dynamic_ncols=True)
    ran = 0
    with open(target, "a", encoding="utf-8") as out:
        for start in range(done, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            results = run_batch(model, [row for _, row in chunk], mode, task, settings or {}, system)
            out.write(
                "".join(json.dumps({"line": n, **row, **r}, ensure_ascii=False) + "\n" for (n, row), r in zip(chunk, results))
            )
            out.flush()
            os.fsync(out.fileno())
            ran += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return ran


def check_row(row: dict, mode: str, where: str) -> None:
    """Refuse a row this mode cannot run, naming it by `where` (a file and line, or the row itself)."""
    if mode == "chat" and "messages" in row:
        if not isinstance(row["messages"], list):
            raise RequestError(f'{where}: messages is {row["messages"]!r:.60}; expected a list of {{"role", "content"}}')
    elif not isinstance(row.get("text"), str):
        wanted = '"text" (or "messages")' if mode == "chat" else '"text"'
        raise RequestError(f"{where}: no {wanted} string in {json.dumps(row)[:80]}")
    if row.get("task") is not None and not isinstance(row["task"], str):
        raise RequestError(f"{where}: task is {row['task']!r:.60}; expected a task name")


def run_batch(model, rows: list[dict], mode: str, task: str | None, settings: dict, system: str | None) -> list[dict]:
    """One result object per row (rows of different tasks in one batch): what a batch file's output line adds."""
    tasks = [task if row.get("task") is None else row["task"] for row in rows]  # null: the default, as in columnar files
    if mode == "classify":
        return [{"task": t, **r} for t, r in zip(tasks, model.classify([row["text"] for row in rows], task=tasks))]
    if mode == "embed":
        vectors = model.embed([row["text"] for row in rows], task=tasks)
        return [{"task": t, "embedding": [round(float(x), 6) for x in v]} for t, v in zip(tasks, vectors)]
    if mode == "chat":
        found = model.resolve_tasks(tasks)  # one version of each task renders and runs its rows
        texts = [
            model.render_chat(row["messages"] if "messages" in row else user_turn(row["text"], system), t)
            for row, t in zip(rows, found)
        ]
        ids = [model.backbone.encode(text, add_special_tokens=False) for text in texts]
        completions = model.complete_ids(ids, task=found, **settings)
    else:
        completions = model.complete([row["text"] for row in rows], task=tasks, **settings)
    return [{"task": c.task, "output": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason} for c in completions]
