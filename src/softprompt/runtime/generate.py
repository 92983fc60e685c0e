"""Generating text, below any model: each row's text bookkeeping (end-of-sequence, stop strings, labels) and the
result a row gives (`Completion`). The decoder's loop is batch.py's; an encoder-decoder's, seq2seq.py's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


@dataclasses.dataclass
class Completion:
    """One row's result: the generated text and ids, and why it stopped: "stop" (end of sequence or a stop
    string, as OpenAI's API and llama.cpp say) or "length" (max_new_tokens)."""

    input: str
    task: str | None
    text: str
    token_ids: list[int]
    finish_reason: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class RowText:
    """Tracks one row's ids and text: end-of-sequence, stop strings, and text safe to show so far.

    The text is decoded when it is read, or every step only when stop strings must be looked for:
    decoding all the ids again each step cost about 1% of a decode step.

    `labels` (a classification task's verbalizers, as token ids) end the row once it has written one
    (and no longer label goes on from it), or as many tokens as the longest: a classification prompt
    asked to generate answers with a label, not with the label repeated until max_new_tokens.
    `limit` (max_new_tokens) ends it with "length" at that many tokens, whichever loop adds them.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        eos_ids: set[int],
        stops: Sequence[str],
        labels: Sequence[Sequence[int]] = (),
        limit: int | None = None,
    ):
        self._decode = decode
        self._limit = limit
        self._eos = eos_ids
        self._stops = [s for s in stops if s]
        self._labels = {tuple(label) for label in labels if len(label)}
        self._longest = max(map(len, self._labels), default=0)
        self._going_on = {label[:k] for label in self._labels for k in range(1, len(label))}  # starts of longer labels
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
        self._add(token)
        if not self.done and self._limit is not None and len(self.ids) >= self._limit:
            self.finish_reason = "length"

    def _add(self, token: int) -> None:
        if token in self._eos:
            self._text = self.text  # the text stops before the end-of-sequence token
            self.ids.append(int(token))
            self._decoded = len(self.ids)
            self.finish_reason = "stop"
            return
        self.ids.append(int(token))
        if self._labels:
            written = tuple(self.ids)
            if len(written) >= self._longest or (written in self._labels and written not in self._going_on):
                self.finish_reason = "stop"
                return
        if not self._stops:
            return
        text = self.text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._text = text[:cut]
            self.finish_reason = "stop"

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
