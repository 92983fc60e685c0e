"""Generating text: the decoding loop over a KV-cached graph, the per-row text bookkeeping, and the
`complete` / `generate` / `stream` front shared by decoders and encoder-decoders.

A request reads top to bottom: settings are checked once (GenerationSettings), the tasks resolved
once (one version of each for the whole request), the rows encoded and checked, then the model's
`_steps` runs the batch and yields every row's state after each token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property

import numpy as np

from softprompt.formats.embedding_table import ScaledRows
from softprompt.formats.task import PLACEHOLDER

from .chat import ChatTemplate, check_messages, read_chat_template
from .classify import classify_ensemble, classify_rows, ensemble_members, label_probabilities
from .errors import RequestError, RequestTypeError
from .rows import as_texts, position_ids, tasks_for
from .served import ServedExport, spec_of
from .settings import GenerationSettings
from .tasks import Task

# forward(inputs_embeds [B,S,E], attention_mask [B,T], position_ids [B,S], past) -> (last logits [B,V], present)
Forward = Callable[[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]
Chooser = Callable[[np.ndarray], np.ndarray]


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


def decode_steps(
    forward: Forward,
    table: np.ndarray | ScaledRows,
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

    `labels` (a classification task's verbalizers, as token ids) end the row once it has written one
    (and no longer label goes on from it), or as many tokens as the longest: a classification prompt
    asked to generate answers with a label, not with the label repeated until max_new_tokens.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        eos_ids: set[int],
        stops: Sequence[str],
        labels: Sequence[Sequence[int]] = (),
    ):
        self._decode = decode
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


class TextModel(ServedExport):
    """`complete`, `generate`, `stream` and `classify` for a model that generates text.

    A subclass provides `_steps(ids, tasks, settings)`, yielding the rows' `RowText` states after
    every step (the last yield final), and `_label_logprobs(inputs, verbalizers, tasks)`, each
    row's summed log-probability of each of its labels' verbalizer ids.
    """

    _eos: set[int]  # the model's end-of-sequence ids

    def complete(
        self, texts: str | Sequence[str], task=None, settings: GenerationSettings | None = None, **overrides
    ) -> list[Completion]:
        """Generate for each text (one batch, rows may have different tasks); a `Completion` per text.

        Settings (GenerationSettings, or its fields as keywords): max_new_tokens=64, min_new_tokens=0,
        temperature=0 (greedy), top_k, top_p, seed, stop (a string or a list of strings; the text is
        cut before it).
        """
        settings = GenerationSettings.of(settings, **overrides)
        texts = as_texts(texts)
        found = self._store.resolve(tasks_for(task, len(texts)))
        return self._complete(self._encode_rows(texts, found), found, texts, settings)

    def complete_ids(
        self, ids: Sequence[Sequence[int]], task=None, settings: GenerationSettings | None = None, **overrides
    ) -> list[Completion]:
        """`complete` for inputs that are already token ids (no template is applied; `input` is their decoded text)."""
        settings = GenerationSettings.of(settings, **overrides)
        found = self._store.resolve(tasks_for(task, len(ids)))
        return self._complete(ids, found, [self.decode(row) for row in ids], settings)

    def generate(
        self, text: str | Sequence[str], task=None, settings: GenerationSettings | None = None, **overrides
    ) -> str | list[str]:
        """Generated text for one text (a str) or for each of a list of texts (a list, one batch)."""
        results = [c.text for c in self.complete(text, task, settings, **overrides)]
        return results[0] if isinstance(text, str) else results

    def stream(
        self, text: str, task: str | None = None, settings: GenerationSettings | None = None, **overrides
    ) -> Iterator[str]:
        """Yield pieces of the generated text as they are made (complete characters, stop strings held back)."""
        if not isinstance(text, str):
            raise RequestTypeError(f"stream takes one text, not {text!r:.60}; use generate() or complete() for a batch")
        settings = GenerationSettings.of(settings, **overrides)
        found = self._store.resolve([task])
        return self._stream(self._encode_rows([text], found)[0], found, settings)

    def stream_chat(
        self, messages: Sequence[dict], task: str | None = None, settings: GenerationSettings | None = None, **overrides
    ) -> Iterator[str]:
        """`chat`'s answer in pieces as they are made, as `stream` gives them."""
        settings = GenerationSettings.of(settings, **overrides)
        found = self._store.resolve([task])
        text = self._render_chat(messages, found[0])
        return self._stream(self.backbone.encode(text, add_special_tokens=False), found, settings)

    def _stream(self, ids: Sequence[int], found: Sequence[Task | None], settings: GenerationSettings) -> Iterator[str]:
        shown = 0
        for rows in self._steps([ids], found, settings):
            stable = rows[0].stable_text()
            if len(stable) > shown:
                yield stable[shown:]
                shown = len(stable)

    def steps(
        self, ids: Sequence[Sequence[int]], task=None, settings: GenerationSettings | None = None, **overrides
    ) -> Iterator[list[RowText]]:
        """Every row's state after each generated token, for token-id inputs (the last yield is final):
        the step-by-step form of `complete_ids`, for callers that time or drive the loop themselves."""
        settings = GenerationSettings.of(settings, **overrides)
        return self._steps(ids, self._store.resolve(tasks_for(task, len(ids))), settings)

    def chat(
        self, messages: Sequence[dict], task: str | None = None, settings: GenerationSettings | None = None, **overrides
    ) -> Completion:
        """Answer a conversation (`[{"role": "user", "content": ...}, ...]`) in the model's own chat format (its chat
        template, with the assistant's turn opened), under `task`'s soft prompt; the task's template, if it has one,
        wraps the last user message. Settings as for `complete`."""
        settings = GenerationSettings.of(settings, **overrides)
        found = self._store.resolve([task])
        text = self._render_chat(messages, found[0])  # the template and the soft prompt of one version of the task
        return self._complete([self.backbone.encode(text, add_special_tokens=False)], found, [text], settings)[0]

    def render_chat(self, messages: Sequence[dict], task: str | None = None) -> str:
        """The text `chat` feeds the model for `messages` under `task` (before its soft prompt)."""
        return self._render_chat(messages, self._store.resolve([task])[0])

    def _render_chat(self, messages: Sequence[dict], found: Task | None) -> str:
        template = self._chat_template
        if template is None:
            raise RequestError(
                f"{self.backbone.folder} has no chat template (chat_template.jinja): the model was not tuned for chat; "
                "use generate() or complete()"
            )
        messages = check_messages(messages)
        if found is not None and len(found.inner):
            raise RequestError(f"task {found.name!r} places vectors inside its template (a P-tuning pattern); chat cannot")
        spec = spec_of(found)
        if spec.template != PLACEHOLDER:
            users = [i for i, message in enumerate(messages) if message["role"] == "user"]
            if not users:
                name = None if found is None else found.name
                raise RequestError(f"task {name!r} has a template for the user's text; the messages have no user message")
            messages[users[-1]]["content"] = spec.apply(messages[users[-1]]["content"])
        return template.render(messages, add_generation_prompt=True)

    @cached_property
    def _chat_template(self) -> ChatTemplate | None:
        return read_chat_template(self.backbone.folder)

    def row_text(self, task: Task | str | None, settings: GenerationSettings) -> RowText:
        """The state of one row generating under `task`: a classification task's row ends after a label (unless
        min_new_tokens asks for more)."""
        spec = spec_of(self._store.resolve([task])[0])
        labels = spec.verbalizer_ids(self.backbone.encode).values() if spec.labels and not settings.min_new_tokens else ()
        return RowText(self.decode, self._eos, settings.stop, labels=list(labels))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (a pattern's slot vectors, negative ids, are not text and are left out)."""
        return self.backbone.tokenizer.decode([int(t) for t in ids if t >= 0], skip_special_tokens=True)

    def classify(self, texts: str | Sequence[str], task, ensemble: str | None = None) -> list[dict]:
        """Label each text by its task's verbalizers: `[{"label": ..., "scores": {label: probability}}]`.

        A label's score is the summed log-probability of its words after the templated input (as
        the output, for encoder-decoders), normalised over the labels. `task` is one task, or one
        per text (rows of different tasks share batches). With `ensemble="vote"` or `"mean"`, `task`
        lists several prompts of one task and each text runs under all of them in one batch; the
        result adds `"votes"` and each member's label (`"members"`).
        """
        texts = as_texts(texts)
        probabilities = label_probabilities(self.backbone.encode, self._label_logprobs)
        if ensemble is None:
            return classify_rows(texts, self._store.resolve(tasks_for(task, len(texts))), probabilities)
        return classify_ensemble(texts, self._store.resolve(ensemble_members(task, ensemble)), ensemble, probabilities)

    def _complete(
        self, ids: Sequence[Sequence[int]], found: Sequence[Task | None], inputs: Sequence[str], settings: GenerationSettings
    ) -> list[Completion]:
        rows = list(self._steps(ids, found, settings))[-1]
        return [
            Completion(text, None if task is None else task.name, r.text, r.ids, r.finish_reason or "length")
            for text, task, r in zip(inputs, found, rows)
        ]

    def _steps(
        self, ids: Sequence[Sequence[int]], found: Sequence[Task | None], settings: GenerationSettings
    ) -> Iterator[list[RowText]]:
        raise NotImplementedError

    def _label_logprobs(
        self, inputs: list[list[int]], verbalizers: list[list[list[int]]], found: Sequence[Task]
    ) -> list[np.ndarray]:
        raise NotImplementedError
