"""`load()` and the `Model` it returns: a frozen ONNX backbone serving the tasks of a prompt bank.

What is shared and what is per request (one Model serves many threads at once):
- shared, read-only: the onnxruntime session (its `run` is thread-safe), the memory-mapped
  embedding table, the tokenizer, and the current tasks. Tasks are immutable; a hot swap publishes
  a new name -> Task mapping, and each request takes the mapping once at its start, so all its rows
  run under one version of each task.
- per request: the input arrays, the KV cache, the sampling generator and the output text.

A task's soft prompt is the same prefix for every request, so its keys and values are computed
once when the task is loaded (or swapped) and used as the past of every request: the first
token's latency does not grow with the prompt length.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from softprompt.prompt_bank.task import TaskSpec

from .backbone import Backbone, open_backbone
from .batch import embed_row, left_pad, position_ids
from .classify import classify_texts, label_logprobs, normalise, verbalized
from .errors import InferenceError, RequestError
from .generate import Completion, GeneratesText, RowText, as_texts, check_request, decode_steps, spec_of
from .sampling import chooser
from .session import create_session, resolve_providers
from .tasks import ServesTasks, Task, TaskStore, tasks_for

if TYPE_CHECKING:
    from .encoder import Encoder
    from .seq2seq import Seq2Seq

Tasks = str | None | Sequence[str | None]


def load(
    export_dir: str | os.PathLike,
    bank: str | os.PathLike | None = None,
    providers: Sequence[str] | str | None = None,
    threads: int | None = None,
    cache_prompts: bool = True,
) -> "Model | Encoder | Seq2Seq":
    """Open an export folder and (optionally) a prompt bank checked against it.

    `providers=None` uses CUDA when this onnxruntime has it, else the CPU; `threads` sets
    onnxruntime's intra-op threads (default: onnxruntime's choice, or $SOFTPROMPT_THREADS).
    The bank folder is followed while the model runs: tasks added, replaced or removed there are
    served from the next request on. `cache_prompts=False` runs each prompt with every request
    instead of reusing its cached keys and values (for checking; it is slower).

    An encoder export (BERT, MiniLM, ...) gives an `Encoder` (`embed`, `classify`) instead, and an
    encoder-decoder export (T5, BART, ...) a `Seq2Seq` (`generate`, `stream`, `complete`, `classify`).

    >>> model = load("exports/smollm2", bank="banks/smollm2-135m")   # doctest: +SKIP
    >>> model.classify("a gorgeous film", task="sentiment")          # doctest: +SKIP
    """
    backbone = open_backbone(export_dir)
    if backbone.config.kind == "seq2seq":
        from .seq2seq import Seq2Seq

        chosen = resolve_providers(providers)
        return Seq2Seq(backbone, create_session(backbone.file("encoder"), chosen, threads),
                       create_session(backbone.file("decoder"), chosen, threads), Path(bank) if bank is not None else None)
    session = create_session(backbone.file("model"), resolve_providers(providers), threads)
    if backbone.config.kind == "encoder":
        from .encoder import Encoder

        return Encoder(backbone, session, Path(bank) if bank is not None else None)
    return Model(backbone, session, Path(bank) if bank is not None else None, cache_prompts=cache_prompts)


class Model(ServesTasks, GeneratesText):
    """A loaded export: `generate`, `stream`, `complete` and `classify`, optionally under task prompts."""

    def __init__(self, backbone: Backbone, session, bank: Path | None = None, *, cache_prompts: bool = True):
        self.backbone = backbone
        self.config = config = backbone.config
        self.table = backbone.table
        self.session = session
        self.bank = bank
        inputs = {i.name: i for i in session.get_inputs()}
        self._feeds_positions = "position_ids" in inputs
        self._keeps_logits = "logits_to_keep" in inputs  # built graphs: logits of the last position only
        self._past_names = config.past_names
        self._output_names = ["logits", *config.present_names]
        # Per-layer cache shape [heads, head size], read from the graph so unusual layouts still work.
        self._past_shapes = [tuple(inputs[name].shape[1::2]) for name in self._past_names]
        self._eos = set(config.eos_token_ids)
        # Where present keys/values live between steps: on the GPU when the session runs there.
        self._cache_device = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
        self._bind = self._cache_device != "cpu"  # I/O binding: what keeps the cache on the GPU
        self._run_ort = values_runner(session)
        self._store = TaskStore(bank, width=config.hidden_size, fingerprint=config.fingerprint,
                                prefill=self._prefill if cache_prompts else None)

    # ---- tasks and tokens -------------------------------------------------------------------

    def task_spec(self, task: str | None) -> TaskSpec:
        """The task's template and labels (no task: the text as it is, no labels)."""
        found = self._resolve([task])[0]
        return TaskSpec() if found is None else found.spec

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
                past: Sequence, all_logits: bool = False) -> tuple[np.ndarray, list]:
        """One graph call; returns the last position's logits [B, V] (all of them with `all_logits`) and the present.

        The present keys/values stay onnxruntime values and go back in as the next step's past as
        they are, instead of being copied into numpy arrays and back every step. On the CPU they
        travel through `run_with_ort_values` (one call); with CUDA through I/O binding, which is
        what keeps them on the GPU. `past` holds numpy arrays or such values.
        """
        feeds = {"inputs_embeds": embeds, "attention_mask": mask}
        if self._feeds_positions:
            feeds["position_ids"] = positions
        if self._keeps_logits:
            feeds["logits_to_keep"] = np.array([0 if all_logits else 1], np.int64)
        try:
            outputs = self._run_bound(feeds, past) if self._bind else self._run_values(feeds, past)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            shapes = {name: tuple(value.shape) for name, value in feeds.items()}
            raise InferenceError(f"onnxruntime failed with inputs {shapes}: {exc}") from exc
        logits, *present = outputs
        logits = logits.numpy()
        return (logits if all_logits else logits[:, -1]), present

    def _run_values(self, feeds: dict[str, np.ndarray], past: Sequence) -> list:
        values = {name: _ort_value(value) for name, value in feeds.items()}
        if past and isinstance(past[0], np.ndarray):  # a first step; later steps pass the last outputs as they are
            values.update((name, _ort_value(value)) for name, value in zip(self._past_names, past))
        else:
            values.update(zip(self._past_names, past))
        return self._run_ort(self._output_names, values)

    def _run_bound(self, feeds: dict[str, np.ndarray], past: Sequence) -> list:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self._past_names, past):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, _python_ort_value(value))
        binding.bind_output("logits", "cpu")
        for name in self._output_names[1:]:
            binding.bind_output(name, self._cache_device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()

    def empty_past(self, batch: int, length: int = 0) -> list[np.ndarray]:
        return [np.zeros((batch, heads, length, size), dtype=np.float32) for heads, size in self._past_shapes]

    def logits(self, texts: str | Sequence[str], task: Tasks = None) -> np.ndarray:
        """Logits [B, P + T, V] of one forward pass over (whole prompt + text), left-padded.

        For parity checks against other implementations: it never uses the cached prompt.
        """
        texts = as_texts(texts)
        found = self._resolve(tasks_for(task, len(texts)))
        ids = [self.backbone.encode(spec_of(t).apply(text)) for text, t in zip(texts, found)]
        embeds, mask, past = self._first_input(ids, found, 0, cached=False)
        logits, _ = self.forward(embeds, mask, position_ids(mask), past, all_logits=True)
        return logits

    def complete_ids(self, ids: Sequence[Sequence[int]], task: Tasks = None, **settings) -> list[Completion]:
        """`complete` for inputs that are already token ids (no template is applied; `input` is their decoded text)."""
        found = self._resolve(tasks_for(task, len(ids)))
        return self._complete(ids, found, [self.decode(row) for row in ids], settings)

    def classify(self, texts: str | Sequence[str], task: Tasks, ensemble: str | None = None) -> list[dict]:
        """Label each text by its task's verbalizers: `[{"label": ..., "scores": {label: probability}}]`.

        A label's score is the summed log-probability of its words after the templated input,
        normalised over the labels. `task` is one task, or one per text (rows of different tasks
        share batches). With `ensemble="vote"` or `"mean"`, `task` lists several prompts of one
        task and each text runs under all of them in one batch; the result adds `"votes"` and
        each member's label (`"members"`).
        """
        return classify_texts(as_texts(texts), task, ensemble, self._resolve, self._label_probabilities)

    # ---- internals --------------------------------------------------------------------------

    def _label_probabilities(self, texts: Sequence[str], found: Sequence[Task | None]) -> list[np.ndarray]:
        inputs, verbalizers = verbalized(texts, found, self.backbone.encode)

        def run_rows(rows: list[list[int]], owners: list[int]) -> np.ndarray:
            return self._logits_of(rows, [found[i] for i in owners])

        return [normalise(row) for row in label_logprobs(run_rows, inputs, verbalizers)]

    def _logits_for_ids(self, ids: Sequence[Sequence[int]], tasks: Sequence[str | None]) -> np.ndarray:
        return self._logits_of(ids, self._resolve(tasks))

    def _logits_of(self, ids: Sequence[Sequence[int]], found: Sequence[Task | None]) -> np.ndarray:
        """Logits [B, T, V] of the input positions (after cached prompts, if any), left-padded."""
        embeds, mask, past = self._first_input(ids, found, 0)
        logits, _ = self.forward(embeds, mask, position_ids(mask, mask.shape[1] - embeds.shape[1]), past, all_logits=True)
        return logits

    def _prefill(self, vectors: np.ndarray) -> tuple[np.ndarray, ...]:
        """Keys and values of every prompt row: computed once per task load."""
        embeds = vectors[None]
        mask = np.ones(embeds.shape[:2], dtype=np.int64)
        _, present = self.forward(embeds, mask, position_ids(mask), self.empty_past(1))
        prefix = tuple(np.ascontiguousarray(layer.numpy()[0]) for layer in present)
        for layer in prefix:
            layer.setflags(write=False)
        return prefix

    def _first_input(self, ids: Sequence[Sequence[int]], found: Sequence[Task | None], max_new_tokens: int,
                     cached: bool = True) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """First step's embeddings [B, S, E], mask [B, past + S] and past.

        Rows whose task has a cached prefix take its keys/values as their past (left-padded to the
        longest prefix, pad columns masked) and feed only their tokens, so a first step costs what
        it costs without a prompt; a row with an empty input takes all but the last cached row and
        feeds the prompt's last vector, to have a position whose logits start generation. Other
        rows feed their whole prompt. Positions count real columns, so they continue after the
        prompt either way.
        """
        limit = self.config.max_positions
        prefixes = [t.prefix if cached and t is not None else None for t in found]
        rows = []
        for i, (row_ids, task) in enumerate(zip(ids, found)):
            prompt_len = 0 if task is None else task.length
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
            if prefixes[i] is None:
                vectors = None if task is None else task.vectors
            else:
                vectors = None if len(row_ids) else task.vectors[-1:]
            rows.append(embed_row(self.table, row_ids, vectors))
        embeds, mask = left_pad(rows)
        held = [0 if prefix is None else prefix[0].shape[1] - (0 if len(row_ids) else 1)
                for prefix, row_ids in zip(prefixes, ids)]
        width = max(held)
        if len(rows) == 1 and width:
            past = [layer[None, :, :width] for layer in prefixes[0]]  # one row: views of the cached arrays
        else:
            past = self.empty_past(len(rows), width)
        if width:
            past_mask = np.zeros((len(rows), width), dtype=np.int64)
            for i, prefix in enumerate(prefixes):
                if prefix is not None:
                    past_mask[i, width - held[i] :] = 1
                    if len(rows) > 1:
                        for layer, values in zip(past, prefix):
                            layer[i, :, width - held[i] :] = values[:, : held[i]]
            mask = np.concatenate([past_mask, mask], axis=1)
        return embeds, mask, past

    def _run(self, ids: Sequence[Sequence[int]], found: list[Task | None], *, max_new_tokens: int = 64,
             min_new_tokens: int = 0, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop: str | Sequence[str] | None = None) -> Iterator[list[RowText]]:
        """Run the batch, yielding the rows' states after every step (the last yield is final)."""
        check_request(len(ids), max_new_tokens, min_new_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        choose = chooser(eos=self._eos, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        embeds, mask, past = self._first_input(ids, found, max_new_tokens)
        states = [RowText(self.decode, self._eos, stops) for _ in ids]
        for tokens in decode_steps(self.forward, self.table, embeds, mask, past, choose, max_new_tokens):
            for state, token in zip(states, tokens.tolist()):
                state.add(token)
            if all(state.done for state in states):
                break
            yield states
        for state in states:
            state.finish()
        yield states


def _ort_value(value):
    """An onnxruntime value for a numpy array (sharing its memory) or the value itself."""
    if isinstance(value, np.ndarray):
        from onnxruntime import OrtValue

        return OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
    return value


def _python_ort_value(value):
    """The Python `OrtValue` for a value that may be onnxruntime's bare C value (what `values_runner` returns)."""
    from onnxruntime import OrtValue

    return value if isinstance(value, OrtValue) else OrtValue(value)


def values_runner(session) -> Callable[[list[str], dict], list]:
    """`run(output_names, {name: OrtValue or bare value}) -> [bare values]`, one graph call.

    onnxruntime's Python `run_with_ort_values` checks every input's name and owner and wraps
    every output in a Python object: 0.2-0.3 ms a step for the 60 cache tensors of SmolLM2, about
    1% of a CPU decode step. The session's own C entry point takes and returns the bare values,
    which go back in as the next step's past as they are; the Python values we create for numpy
    inputs stay referenced in the caller's dict, which keeps their memory alive through the call.
    Sessions without that entry point (another onnxruntime, a wrapper) take the public method.
    """
    inner = getattr(session, "_sess", None)
    if inner is None or not hasattr(inner, "run_with_ort_values"):
        return session.run_with_ort_values

    def run(names: list[str], values: dict) -> list:
        bare = {name: getattr(value, "_ortvalue", value) for name, value in values.items()}
        return list(inner.run_with_ort_values(bare, names, None))

    return run
