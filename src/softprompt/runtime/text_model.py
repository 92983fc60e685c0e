"""`complete` / `generate` / `stream` / `chat` / `classify`: the front shared by decoders and encoder-decoders.

A request reads top to bottom: settings are checked once (GenerationSettings), the tasks resolved
once (one version of each for the whole request), the rows encoded and checked, then the model's
the model's running batch steps and `_steps` yields every row's state after each token (generate.RowText).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property

import numpy as np

from softprompt.formats.task import PLACEHOLDER

from .chat import ChatTemplate, check_messages, read_chat_template
from .classify import classify_ensemble, classify_rows, ensemble_members, label_probabilities
from .engine import Job
from .errors import RequestError, RequestTypeError
from .generate import Completion, RowText
from .rows import as_texts, tasks_for
from .served import ServedExport, spec_of
from .settings import GenerationSettings
from .tasks import Task


class TextModel(ServedExport):
    """`complete`, `generate`, `stream` and `classify` for a model that generates text.

    A subclass provides `batch()`, its running batch (the one decode loop: `Model`'s batch.py,
    `Seq2Seq`'s seq2seq_batch.py), and `_label_logprobs(inputs, verbalizers, tasks)`, each row's
    summed log-probability of each of its labels' verbalizer ids.
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
        """The state of one row generating under `task`: it ends at max_new_tokens, and a classification task's row
        after a label (unless min_new_tokens asks for more)."""
        spec = spec_of(self._store.resolve([task])[0])
        labels = spec.verbalizer_ids(self.backbone.encode).values() if spec.labels and not settings.min_new_tokens else ()
        return RowText(self.decode, self._eos, settings.stop, labels=list(labels), limit=settings.max_new_tokens)

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
        """Run the rows as one running batch (the engine's loop too), yielding their states after every step (the
        last yield is final); a row that is done leaves the batch."""
        batch = self.batch()
        states = [row.state for row in batch.admit([Job(list(row), task, settings) for row, task in zip(ids, found)])]
        while batch.rows:
            yield states
            batch.step()
        yield states

    def batch(self):
        """An empty running batch of this model: `admit(jobs)`, `step()`, `clear()` and its `rows`."""
        raise NotImplementedError

    def _label_logprobs(
        self, inputs: list[list[int]], verbalizers: list[list[list[int]]], found: Sequence[Task]
    ) -> list[np.ndarray]:
        raise NotImplementedError
