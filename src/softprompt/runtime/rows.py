"""A request's rows, for every kind of model: one task per row, the checks every row must pass, and the
padded batch of `inputs_embeds` (soft prompt rows, then the token embeddings).

Pure functions over arrays, so that training (which must build the very same `inputs_embeds`) and
tests can call them without a session. Decoders pad on the left (the last column of every row is
a real token, where generation continues); encoders and encoder-decoders pad on the right, as
they are trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from softprompt.formats.embedding_table import ScaledRows

from .errors import RequestError, RequestTypeError
from .tasks import Task


def as_texts(texts: str | Sequence[str]) -> list[str]:
    """A text or a list of texts as a list, refusing anything else."""
    if isinstance(texts, str):
        texts = [texts]
    elif not isinstance(texts, Sequence):
        raise RequestTypeError(f"texts {texts!r}; expected a string or a list of strings")
    texts = list(texts)
    if not texts:
        raise RequestError("no input given")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestTypeError(f"input {i} is {text!r}; expected a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: what invalid UTF-8 in argv becomes
            raise RequestError(f"input {i} is not valid Unicode text ({exc.reason} at character {exc.start})") from None
    return texts


def tasks_for(task, count: int) -> list:
    """One task per row: a single task (a name, a resolved Task, or None) applies to every row; a list gives one per row."""
    if task is None or isinstance(task, (str, Task)):
        return [task] * count
    if not isinstance(task, Sequence):
        raise RequestTypeError(f"task {task!r}; expected a task name, None, or one of those per input")
    tasks = list(task)
    if len(tasks) != count:
        raise RequestError(f"{len(tasks)} tasks for {count} inputs; give one task, or one per input")
    return tasks


def check_rows(
    ids: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    *,
    vocab_size: int,
    limit: int | None,
    new_tokens: int = 0,
    what: str = "positions",
    need_tokens: bool = False,
    slots: Sequence[int] | None = None,
) -> None:
    """Refuse a row before anything runs: no tokens and no prompt, longer than the model, ids out of range.

    `new_tokens` counts against the same positions (decoders); `need_tokens` refuses a row without
    tokens even under a prompt (encoders pool over the text's tokens). `slots[i]` is how many of
    row i's task's vectors its negative ids may name (a P-tuning pattern's, after the lead).
    """
    if not ids:
        raise RequestError("no input given")
    for i, (row, prompt) in enumerate(zip(ids, prompt_lengths)):
        if need_tokens and not row:
            raise RequestError(f"input {i} has no tokens")
        if prompt + len(row) == 0:
            raise RequestError(f"input {i} is empty and has no task prompt: nothing to continue from")
        total = prompt + len(row) + new_tokens
        if limit is not None and total > limit:
            new = f" + {new_tokens} new" if new_tokens else ""
            raise RequestError(f"input {i} needs {prompt} prompt + {len(row)} input{new} = {total} {what}; the model has {limit}")
        if isinstance(row, (str, bytes)) or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in row):
            raise RequestTypeError(f"input {i} is {row!r:.80}; expected a list of token ids (whole numbers)")
        low = -(slots[i] if slots is not None else 0)
        bad = [t for t in row if not low <= t < vocab_size]
        if bad:
            where = f"[{low}, {vocab_size}) (negative ids: the task's slot vectors)" if low else f"[0, {vocab_size})"
            raise RequestError(f"input {i} has token ids {bad[:5]} outside {where}")


def embed_row(
    table: np.ndarray | ScaledRows, ids: Sequence[int], prompt: np.ndarray | None, inner: np.ndarray | None = None
) -> np.ndarray:
    """[P + n, E] float32: the task's prompt rows, then the embeddings of `ids` from the table, where a negative
    id -k is row k - 1 of `inner` (a P-tuning pattern's vectors after the text begins)."""
    index = np.asarray(ids, dtype=np.int64)
    slots = index < 0
    if slots.any():
        if inner is None or -index.min() > len(inner):
            raise RequestError(f"token ids {index[slots][:5].tolist()} name slot vectors the task does not have")
        tokens = np.asarray(table[np.where(slots, 0, index)], dtype=np.float32)
        tokens[slots] = inner[-index[slots] - 1]
    else:
        tokens = np.asarray(table[index], dtype=np.float32)
    if prompt is None:
        return tokens
    return np.concatenate([np.asarray(prompt, dtype=np.float32), tokens], axis=0)


def pad(rows: Sequence[np.ndarray], side: str) -> tuple[np.ndarray, np.ndarray]:
    """Stack [T_i, E] rows into [B, T, E] padded on `side` ("left" or "right"), and the [B, T] int64 mask."""
    width = rows[0].shape[1]
    length = max(row.shape[0] for row in rows)
    embeds = np.zeros((len(rows), length, width), dtype=np.float32)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(length - row.shape[0], length) if side == "left" else slice(0, row.shape[0])
        embeds[i, span] = row
        mask[i, span] = 1
    return embeds, mask


def position_ids(mask: np.ndarray, past_length: int = 0) -> np.ndarray:
    """Positions counted over real tokens only, so a left-padded row sees 0, 1, 2, ... like alone.

    `mask` covers past and new tokens; the result covers the new ones (its last columns).
    Padding gets position 1, as transformers does, which the mask makes irrelevant.
    """
    positions = np.cumsum(mask, axis=-1) - 1
    positions = np.where(mask == 0, 1, positions)
    return positions[:, past_length:].astype(np.int64)
