"""The decoding loop over a KV-cached ONNX decoder, and the per-row text bookkeeping around it.

One graph serves every step: the first step feeds the whole (prompt + text) embeddings with an
empty past, later steps feed one token's embedding with the past returned by the step before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from softprompt.prompt_bank.task import TaskSpec

from .batch import position_ids
from .errors import RequestError
from .tasks import tasks_for

# forward(inputs_embeds [B,S,E], attention_mask [B,T], position_ids [B,S], past) -> (last logits [B,V], present)
Forward = Callable[[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]
Chooser = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class Completion:
    """One row's result: the generated text and ids, and why it stopped ("eos", "stop" or "length")."""

    input: str
    task: str | None
    text: str
    token_ids: list[int]
    finish_reason: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def check_request(rows: int, max_new_tokens: int, min_new_tokens: int) -> None:
    if not rows:
        raise RequestError("no input given")
    if max_new_tokens < 1:
        raise RequestError(f"max_new_tokens {max_new_tokens}; expected at least 1")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise RequestError(f"min_new_tokens {min_new_tokens}; expected 0..max_new_tokens ({max_new_tokens})")


def decode_steps(
    forward: Forward,
    table: np.ndarray,
    embeds: np.ndarray,
    mask: np.ndarray,
    past: list[np.ndarray],
    choose: Chooser,
    max_new_tokens: int,
) -> Iterator[np.ndarray]:
    """Yield the [B] token ids chosen at each step, at most `max_new_tokens` times.

    `past` is empty, or holds cached prompt keys/values whose mask columns lead `mask`.
    The caller stops iterating when every row is done; rows that finish early keep decoding
    (their extra tokens are dropped) so the batch stays rectangular.
    """
    # Step 1: the whole first input against the given past.
    positions = position_ids(mask, mask.shape[1] - embeds.shape[1])
    logits, past = forward(embeds, mask, positions, past)
    new_column = np.ones((mask.shape[0], 1), dtype=mask.dtype)
    for step in range(max_new_tokens):
        tokens = choose(logits)
        yield tokens
        if step + 1 == max_new_tokens:
            return
        # Later steps: one new token per row; its mask column is 1 and its position follows the last
        # (rows are left-padded, so every row's last column is a real one).
        mask = np.concatenate([mask, new_column], axis=1)
        positions = positions[:, -1:] + 1
        step_embeds = np.asarray(table[tokens], dtype=np.float32)[:, None, :]
        logits, past = forward(step_embeds, mask, positions, past)


class RowText:
    """Tracks one row's ids and text: end-of-sequence, stop strings, and text safe to show so far.

    The text is decoded when it is read, or every step only when stop strings must be looked for:
    decoding all the ids again each step cost about 1% of a decode step.
    """

    def __init__(self, decode: Callable[[list[int]], str], eos_ids: set[int], stops: Sequence[str]):
        self._decode = decode
        self._eos = eos_ids
        self._stops = [s for s in stops if s]
        self.ids: list[int] = []
        self._text = ""
        self._decoded = 0  # how many ids `_text` covers
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        if self._decoded != len(self.ids):
            self._text = self._decode(self.ids)
            self._decoded = len(self.ids)
        return self._text

    def add(self, token: int) -> None:
        if self.done:
            return
        if token in self._eos:
            self._text = self.text  # the text stops before the end-of-sequence token
            self.ids.append(int(token))
            self._decoded = len(self.ids)
            self.finish_reason = "eos"
            return
        self.ids.append(int(token))
        if not self._stops:
            return
        text = self.text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._text = text[:cut]
            self.finish_reason = "stop"

    def finish(self) -> None:
        if not self.done:
            self.finish_reason = "length"

    def stable_text(self) -> str:
        """Text that later tokens cannot change: no half-decoded character, no possible stop-string start."""
        if self.done:
            return self.text
        text = self.text.rstrip("\ufffd")  # a multi-byte character whose remaining bytes are still to come
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        return text[: len(text) - hold]


def as_texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise RequestError("texts must be a string or a list of strings")
    return texts


def spec_of(task) -> TaskSpec:
    """A task's template and labels; no task: the text as it is."""
    return TaskSpec() if task is None else task.spec


class GeneratesText:
    """`complete`, `generate` and `stream` for a model (decoder or encoder-decoder) that provides
    `_run(ids, tasks, **settings)`, yielding the rows' `RowText` states after every step (the last
    yield final), besides `_resolve` (ServesTasks), `backbone` and `decode`.
    """

    backbone: Any
    _resolve: Callable
    _run: Callable[..., Iterator[list[RowText]]]

    def complete(self, texts: str | Sequence[str], task=None, **settings) -> list[Completion]:
        """Generate for each text (one batch, rows may have different tasks); a `Completion` per text.

        Settings: max_new_tokens=64, min_new_tokens=0, temperature=0 (greedy), top_k, top_p,
        seed, stop (a string or a list of strings; the text is cut before it).
        """
        texts = as_texts(texts)
        found = self._resolve(tasks_for(task, len(texts)))
        ids = [self.backbone.encode(spec_of(t).apply(text)) for text, t in zip(texts, found)]
        return self._complete(ids, found, texts, settings)

    def generate(self, text: str | Sequence[str], task=None, **settings) -> str | list[str]:
        """Generated text for one text (a str) or for each of a list of texts (a list, one batch)."""
        results = [c.text for c in self.complete(text, task, **settings)]
        return results[0] if isinstance(text, str) else results

    def stream(self, text: str, task: str | None = None, **settings) -> Iterator[str]:
        """Yield pieces of the generated text as they are made (complete characters, stop strings held back)."""
        if not isinstance(text, str):
            raise RequestError("stream takes one text; use generate() or complete() for a batch")
        found = self._resolve([task])
        shown = 0
        for rows in self._run([self.backbone.encode(spec_of(found[0]).apply(text))], found, **settings):
            stable = rows[0].stable_text()
            if len(stable) > shown:
                yield stable[shown:]
                shown = len(stable)

    def _complete(self, ids: Sequence[Sequence[int]], found: Sequence, inputs: Sequence[str], settings: dict) -> list[Completion]:
        rows = list(self._run(ids, found, **settings))[-1]
        return [Completion(inputs[i], None if found[i] is None else found[i].name, r.text, r.ids, r.finish_reason or "length")
                for i, r in enumerate(rows)]

