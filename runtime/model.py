"""`load()` and the `Model` it returns: a frozen ONNX backbone plus a bank of task prompts.

The model holds only read-only state after loading (session, embedding table, tokenizer,
prompts), so one instance can serve requests from several threads: each request builds its
own arrays and its own KV cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from softprompt.prompt_bank import Prompt, UnknownTaskError, load_bank
from softprompt.prompt_bank.task import TaskSpec

from .backbone import Backbone, open_backbone
from .batch import embed_row, left_pad, position_ids
from .classify import label_logprobs, normalise
from .errors import InferenceError, RequestError
from .generate import Completion, RowText, decode_steps
from .sampling import check_sampling, next_tokens
from .session import create_session, resolve_providers

Tasks = str | None | Sequence[str | None]


def load(
    export_dir: str | os.PathLike,
    bank: str | os.PathLike | None = None,
    providers: Sequence[str] | str | None = None,
    threads: int | None = None,
) -> "Model":
    """Open an export folder (and optionally a prompt bank checked against it).

    `providers=None` uses CUDA when this onnxruntime has it, else the CPU; `threads` sets
    onnxruntime's intra-op threads (default: onnxruntime's choice, or $SOFTPROMPT_THREADS).

    >>> model = load("exports/smollm2", bank="banks/demo")            # doctest: +SKIP
    >>> model.generate("Review: a gorgeous film. Sentiment:", task="sentiment")  # doctest: +SKIP
    """
    backbone = open_backbone(export_dir)
    config = backbone.config
    prompts = load_bank(bank, width=config.hidden_size, fingerprint=config.fingerprint) if bank is not None else {}
    session = create_session(backbone.file("model"), resolve_providers(providers), threads)
    return Model(backbone, session, prompts, bank=Path(bank) if bank is not None else None)


class Model:
    """A loaded export: `generate`, `stream` and `complete` text, optionally under a task's soft prompt."""

    def __init__(self, backbone: Backbone, session, prompts: dict[str, Prompt], bank: Path | None = None):
        self.backbone = backbone
        self.config = config = backbone.config
        self.table = backbone.table
        self.session = session
        self.bank = bank
        self._prompts = {name: np.asarray(p.vectors, dtype=np.float32) for name, p in prompts.items()}
        self._specs = {name: TaskSpec.from_extra(p.meta.extra, f"task {name!r}") for name, p in prompts.items()}
        inputs = {i.name: i for i in session.get_inputs()}
        self._feeds_positions = "position_ids" in inputs
        self._past_names = config.past_names
        self._output_names = ["logits", *config.present_names]
        # Per-layer cache shape [heads, head size], read from the graph so unusual layouts still work.
        self._past_shapes = [tuple(inputs[name].shape[1::2]) for name in self._past_names]
        self._eos = set(config.eos_token_ids)

    # ---- tasks and tokens -------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return sorted(self._prompts)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def prompt(self, task: str | None) -> np.ndarray | None:
        """The [P, E] float32 soft prompt of `task`, or None for no prompt."""
        if task is None:
            return None
        if task not in self._prompts:
            where = f"bank {self.bank}" if self.bank else "this model (no bank was loaded)"
            raise UnknownTaskError(f"no task {task!r} in {where}; tasks: {', '.join(self.tasks) or 'none'}")
        return self._prompts[task]

    def task_spec(self, task: str | None) -> TaskSpec:
        """The task's template and labels (no task: the text as it is, no labels)."""
        if task is None:
            return TaskSpec()
        self.prompt(task)  # the unknown-task error, listing the tasks
        return self._specs[task]

    def encode(self, text: str, task: str | None = None) -> list[int]:
        """Token ids of `text` wrapped in the task's template, as the model's own tokenizer makes them."""
        return self.backbone.encode(self.task_spec(task).apply(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.backbone.tokenizer.decode(list(ids), skip_special_tokens=True)

    def inputs_embeds(self, ids: Sequence[int], task: str | None = None) -> np.ndarray:
        """[P + n, E]: exactly what the model is fed for `ids` under `task` (training must match it)."""
        return embed_row(self.table, ids, self.prompt(task))

    # ---- running ----------------------------------------------------------------------------

    def forward(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                past: list[np.ndarray], all_logits: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call; returns the last position's logits [B, V] (all of them with `all_logits`)."""
        feeds = {"inputs_embeds": embeds, "attention_mask": mask}
        if self._feeds_positions:
            feeds["position_ids"] = positions
        feeds.update(zip(self._past_names, past))
        try:
            logits, *present = self.session.run(self._output_names, feeds)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            shapes = {name: tuple(value.shape) for name, value in feeds.items() if not name.startswith("past_key_values.")}
            raise InferenceError(f"onnxruntime failed with inputs {shapes}: {exc}") from exc
        return (logits if all_logits else logits[:, -1]), present

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, heads, 0, size), dtype=np.float32) for heads, size in self._past_shapes]

    def logits(self, texts: str | Sequence[str], task: Tasks = None) -> np.ndarray:
        """Logits [B, T, V] of one forward pass over (prompt + text), left-padded; for scoring and parity checks."""
        texts = _as_list(texts)
        tasks = _tasks_for(task, len(texts))
        return self._logits_for_ids([self.encode(t, k) for t, k in zip(texts, tasks)], tasks)

    def _logits_for_ids(self, ids: Sequence[Sequence[int]], tasks: list[str | None]) -> np.ndarray:
        rows = self._rows(ids, tasks, 0)
        embeds, mask = left_pad(rows)
        logits, _ = self.forward(embeds, mask, position_ids(mask), self.empty_past(len(rows)), all_logits=True)
        return logits

    def complete(self, texts: str | Sequence[str], task: Tasks = None, **settings) -> list[Completion]:
        """Generate for each text (one left-padded batch); returns a `Completion` per text, in order.

        Settings: max_new_tokens=64, min_new_tokens=0, temperature=0 (greedy), top_k, top_p,
        seed, stop (a string or a list of strings; the text is cut before it).
        """
        texts = _as_list(texts)
        ids = [self.encode(t, k) for t, k in zip(texts, _tasks_for(task, len(texts)))]
        return self._complete(ids, task, texts, settings)

    def complete_ids(self, ids: Sequence[Sequence[int]], task: Tasks = None, **settings) -> list[Completion]:
        """`complete` for inputs that are already token ids (no template is applied; `input` is their decoded text)."""
        return self._complete(ids, task, [self.decode(row) for row in ids], settings)

    def generate(self, text: str | Sequence[str], task: Tasks = None, **settings) -> str | list[str]:
        """Generated text for one text (a str) or for each of a list of texts (a list, one batch)."""
        results = [c.text for c in self.complete(text, task, **settings)]
        return results[0] if isinstance(text, str) else results

    def stream(self, text: str, task: str | None = None, **settings) -> Iterator[str]:
        """Yield pieces of the generated text as they are made (complete characters, stop strings held back)."""
        if not isinstance(text, str):
            raise RequestError("stream takes one text; use generate() or complete() for a batch")
        shown = 0
        for rows in self._run([self.encode(text, task)], task, **settings):
            stable = rows[0].stable_text()
            if len(stable) > shown:
                yield stable[shown:]
                shown = len(stable)

    def classify(self, texts: str | Sequence[str], task: str) -> list[dict]:
        """Label each text by its task's verbalizers: `[{"label": ..., "scores": {label: probability}}]`.

        A label's score is the summed log-probability of its words after the templated input,
        normalised over the labels.
        """
        texts = _as_list(texts)
        spec = self.task_spec(task)
        if not spec.labels:
            raise RequestError(f"task {task!r} has no labels (it is a {spec.kind} task); classify needs a classification task")
        by_label = spec.verbalizer_ids(self.backbone.encode)
        labels, verbalizers = list(by_label), list(by_label.values())
        empty = [label for label, ids in by_label.items() if not ids]
        if empty:
            raise RequestError(f"task {task!r}: verbalizers of {empty} have no tokens")
        inputs = [self.encode(text, task) for text in texts]
        logprobs = label_logprobs(lambda rows: self._logits_for_ids(rows, [task] * len(rows)), inputs, verbalizers)
        probs = normalise(logprobs)
        return [
            {"label": labels[int(row.argmax())], "scores": {label: float(p) for label, p in zip(labels, row)}}
            for row in probs
        ]

    # ---- internals --------------------------------------------------------------------------

    def _complete(self, ids: Sequence[Sequence[int]], task: Tasks, inputs: Sequence[str], settings: dict) -> list[Completion]:
        rows = list(self._run(ids, task, **settings))[-1]
        tasks = _tasks_for(task, len(ids))
        return [Completion(inputs[i], tasks[i], r.text, r.ids, r.finish_reason or "length") for i, r in enumerate(rows)]

    def _rows(self, ids: Sequence[Sequence[int]], tasks: list[str | None], max_new_tokens: int) -> list[np.ndarray]:
        limit = self.config.max_positions
        rows = []
        for i, (row_ids, task) in enumerate(zip(ids, tasks)):
            prompt = self.prompt(task)
            prompt_len = 0 if prompt is None else prompt.shape[0]
            if prompt_len + len(row_ids) == 0:
                raise RequestError(f"input {i} is empty and has no task prompt: nothing to continue from")
            if limit is not None and prompt_len + len(row_ids) + max_new_tokens > limit:
                raise RequestError(
                    f"input {i} needs {prompt_len} prompt + {len(row_ids)} input + {max_new_tokens} new = "
                    f"{prompt_len + len(row_ids) + max_new_tokens} positions; the model has {limit}"
                )
            bad = [t for t in row_ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise RequestError(f"input {i} has token ids {bad[:5]} outside [0, {self.config.vocab_size})")
            rows.append(embed_row(self.table, row_ids, prompt))
        return rows

    def _run(self, ids: Sequence[Sequence[int]], task: Tasks, *, max_new_tokens: int = 64, min_new_tokens: int = 0,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop: str | Sequence[str] | None = None) -> Iterator[list[RowText]]:
        """Run the batch, yielding the rows' states after every step (the last yield is final)."""
        if not ids:
            raise RequestError("no input given")
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens {max_new_tokens}; expected at least 1")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise RequestError(f"min_new_tokens {min_new_tokens}; expected 0..max_new_tokens ({max_new_tokens})")
        check_sampling(temperature, top_k, top_p)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        embeds, mask = left_pad(self._rows(ids, _tasks_for(task, len(ids)), max_new_tokens))
        rng = np.random.default_rng(seed)
        eos = sorted(self._eos)
        chosen = 0

        def choose(logits: np.ndarray) -> np.ndarray:
            nonlocal chosen
            if chosen < min_new_tokens and eos:
                logits = logits.copy()
                logits[:, eos] = -np.inf  # as transformers' min_new_tokens: end of sequence is not allowed yet
            chosen += 1
            return next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)

        states = [RowText(self.decode, self._eos, stops) for _ in ids]
        for tokens in decode_steps(self.forward, self.table, embeds, mask, self.empty_past(len(ids)), choose,
                                   max_new_tokens):
            for state, token in zip(states, tokens.tolist()):
                state.add(token)
            if all(state.done for state in states):
                break
            yield states
        for state in states:
            state.finish()
        yield states


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise RequestError("texts must be a string or a list of strings")
    return texts


def _tasks_for(task: Tasks, count: int) -> list[str | None]:
    """One task per row: a single task (or None) applies to every row; a list gives one per row."""
    if task is None or isinstance(task, str):
        return [task] * count
    tasks = list(task)
    if len(tasks) != count:
        raise RequestError(f"{len(tasks)} tasks for {count} inputs; give one task, or one per input")
    return tasks
