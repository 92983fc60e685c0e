"""`load()` and the decoder `Model` it returns: a frozen ONNX backbone serving the tasks of a prompt bank.

What is shared and what is per request (one Model serves many threads at once):
- shared, read-only: the onnxruntime session (its `run` is thread-safe), the memory-mapped
  embedding table, the tokenizer, the current tasks and their cached prompts. Tasks are
  immutable; a hot swap publishes a new name -> Task mapping, and each request takes the mapping
  once at its start, so all its rows run under one version of each task.
- per request: the settings, the input arrays, the KV cache, each row's sampling generator and text.

A request, top to bottom: `complete` checks its settings and resolves its tasks (text_model.py),
`first_step` checks the rows and builds the first input over the cached prompts, the running batch
(batch.py, the loop the server's engine steps too) runs the graph token by token, and each row's
`RowText` turns its ids into text.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from softprompt.formats.export_folder import ExportFolder, open_export

from .batch import DecodeBatch
from .classify import label_logprobs
from .encoder import Encoder
from .errors import RequestError
from .generate import RowText
from .graph import DecoderGraph
from .native_loop import NativeLoop, check_loop
from .prompt_cache import Prefix, PromptCache
from .rows import as_texts, check_rows, embed_row, pad, position_ids, tasks_for
from .seq2seq import Seq2Seq
from .session import CPU, check_onnxruntime, create_session, resolve_providers, warn_if_slow
from .settings import GenerationSettings
from .tasks import Task
from .text_model import TextModel


def load(
    export_dir: str | os.PathLike,
    bank: str | os.PathLike | None = None,
    providers: Sequence[str] | str | None = None,
    threads: int | None = None,
    cache_prompts: bool = True,
    truncate: bool = True,
    loop: str = "runtime",
) -> Model | Encoder | Seq2Seq:
    """Open an export folder and (optionally) a prompt bank checked against it.

    `providers=None` uses CUDA when this onnxruntime has it, else the CPU; `threads` sets
    onnxruntime's intra-op threads (default: onnxruntime's choice, or $SOFTPROMPT_THREADS).
    The bank folder is followed while the model runs: tasks added, replaced or removed there are
    served from the next request on. `cache_prompts=False` runs each prompt with every request
    instead of reusing its cached keys and values (for checking; it is slower). Encoders cut texts
    to the model's sentence-transformers `max_seq_length`; `truncate=False` refuses them instead.

    `loop="genai"` (a decoder on the CPU, with the `genai` extra) generates on onnxruntime-genai's native loop
    whatever it gives the same tokens for (one text, greedy, no task or a prompt task; native_loop.py): up to
    7% more tokens a second on a small quantized model, for 4-15 MB more memory. Anything else runs on the
    runtime's own loop, whose session is created when first needed; until then the process holds one copy of
    the weights.

    An encoder export (BERT, MiniLM, ...) gives an `Encoder` (`embed`, `classify`) instead, and an
    encoder-decoder export (T5, BART, ...) a `Seq2Seq` (`generate`, `stream`, `complete`, `classify`).

    >>> model = load("exports/smollm2", bank="banks/smollm2-135m")   # doctest: +SKIP
    >>> model.classify("a gorgeous film", task="sentiment")          # doctest: +SKIP
    """
    backbone = open_export(export_dir)
    bank = Path(bank) if bank is not None else None
    check_loop(loop, providers, backbone.config.kind)
    chosen = [CPU] if loop == "genai" else resolve_providers(providers)
    fold = bool(backbone.config.quantization.get("web"))  # export-model --web: fold the weights once
    if backbone.config.kind == "seq2seq":
        decoder = create_session(backbone.file("decoder"), chosen, threads, fold)
        warn_if_slow(backbone.config, decoder)
        return Seq2Seq(backbone, create_session(backbone.file("encoder"), chosen, threads, fold), decoder, bank)

    def session():
        check_onnxruntime(backbone.config)
        created = create_session(backbone.file("model"), chosen, threads, fold)
        warn_if_slow(backbone.config, created)
        return created

    if backbone.config.kind == "encoder":
        return Encoder(backbone, session(), bank, truncate=truncate)
    if loop == "genai":
        native = NativeLoop(backbone.folder, backbone.config, threads)
        return Model(backbone, session, bank, cache_prompts=cache_prompts, native=native)
    return Model(backbone, session(), bank, cache_prompts=cache_prompts)


class Model(TextModel):
    """A loaded decoder export: `generate`, `stream`, `complete` and `classify`, optionally under task prompts."""

    def __init__(
        self,
        backbone: ExportFolder,
        session,
        bank: Path | None = None,
        *,
        cache_prompts: bool = True,
        native: NativeLoop | None = None,
    ):
        """`session`: an onnxruntime session, or with `native` a function that makes it when a request first needs
        the runtime's own loop (what the native loop does not serve)."""
        super().__init__(backbone, None if native is not None else session, bank)
        self._eos = set(self.config.eos_token_ids)
        self._native = native
        self._cache_prompts = cache_prompts
        self._graph: DecoderGraph | None = None
        self._prompts: PromptCache | None = None
        self._make_session = session if native is not None else None
        self._starting = threading.Lock()
        if native is None:
            self._start(session)

    def _start(self, session) -> None:
        graph = DecoderGraph(session, self.config)
        self.session = session
        self._prompts = PromptCache(graph) if self._cache_prompts else None
        if self._prompts is not None:
            self._prompts.fill(self._store.current().values())
        self._graph = graph  # last: another thread waits on the lock until the prompts are cached

    @property
    def graph(self) -> DecoderGraph:
        """The decoder's onnxruntime graph (DecoderGraph), created on first use where a native loop serves the rest."""
        if self._graph is None:
            with self._starting:
                if self._graph is None:
                    assert self._make_session is not None
                    self._start(self._make_session())
        assert self._graph is not None
        return self._graph

    @property
    def providers(self) -> list[str]:
        return [CPU] if self._graph is None else self.session.get_providers()

    @property
    def loop(self) -> str:
        """Which loop generates what it serves: "genai" (onnxruntime-genai's native loop) or "runtime"."""
        return "runtime" if self._native is None else "genai"

    def forward(
        self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Sequence, all_logits: bool = False
    ) -> tuple[np.ndarray, list]:
        """One graph call (DecoderGraph.forward): the last position's logits [B, V], or all, and the present."""
        return self.graph.forward(embeds, mask, positions, past, all_logits)

    def batch(self) -> DecodeBatch:
        """An empty running batch of this model (the engine's and `complete`'s loop)."""
        return DecodeBatch(self)

    def empty_past(self, batch: int, length: int = 0) -> list[np.ndarray]:
        return self.graph.empty_past(batch, length)

    def reload(self) -> list[str]:
        """Re-read every task file of the bank now, and compute the new versions' cached prompts before returning."""
        names = super().reload()
        if self._prompts is not None:  # (not yet made where the native loop has served everything so far)
            self._prompts.fill(self._store.current().values())
        return names

    def wait_for_prompt_cache(self, timeout: float | None = None) -> bool:
        """Wait until the cached prompts of tasks swapped in while serving are computed (True), or `timeout` passed."""
        return self._prompts is None or self._prompts.wait(timeout)  # none yet: nothing to wait for

    def is_cached(self, task: str) -> bool:
        """Whether `task`'s prompt keys and values are cached (then a request feeds only its tokens); a prefix task
        always is."""
        return self._past(self._store.resolve([task])[0], start=False) is not None

    def logits(self, texts: str | Sequence[str], task=None) -> np.ndarray:
        """Logits [B, P + T, V] of one forward pass over (whole prompt + templated text), left-padded.

        For parity checks against other implementations: it never uses the cached prompt (a prefix task's keys and
        values are its past all the same, and its rows have the text's logits only).
        """
        texts = as_texts(texts)
        found = self._store.resolve(tasks_for(task, len(texts)))
        embeds, mask, past = self._first_step(self._encode_rows(texts, found), found, 0, cached=False)
        logits, _ = self.forward(embeds, mask, position_ids(mask, mask.shape[1] - embeds.shape[1]), past, all_logits=True)
        return logits

    def logits_of_ids(self, ids: Sequence[Sequence[int]], task=None) -> np.ndarray:
        """Logits [B, T, V] of the input positions of token-id rows, after each task's cached prompt (left-padded)."""
        return self._logits_of(ids, self._store.resolve(tasks_for(task, len(ids))))

    def first_step(
        self, ids: Sequence[Sequence[int]], task=None, max_new_tokens: int = 0, cached: bool = True
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """The first step's inputs for token-id rows: embeddings [B, S, E], mask [B, past + S] and past."""
        return self._first_step(ids, self._store.resolve(tasks_for(task, len(ids))), max_new_tokens, cached)

    # ---- the request pipeline's steps -------------------------------------------------------

    def _steps(
        self, ids: Sequence[Sequence[int]], found: Sequence[Task | None], settings: GenerationSettings
    ) -> Iterator[list[RowText]]:
        """The native loop's tokens where it serves the rows (the same as the runtime's loop gives), else the
        runtime's loop (text_model.py)."""
        native = self._native
        if native is None or not native.serves(ids, found, settings):
            yield from super()._steps(ids, found, settings)
            return
        task = found[0]
        self._check_rows(ids, found, settings.max_new_tokens)
        state = self.row_text(task, settings)
        for token in native.generate(ids[0], task, settings):
            state.add(token)
            yield [state]
            if state.done:
                break
        yield [state]

    def _label_logprobs(
        self, inputs: list[list[int]], verbalizers: list[list[list[int]]], found: Sequence[Task]
    ) -> list[np.ndarray]:
        return label_logprobs(lambda rows, owners: self._logits_of(rows, [found[i] for i in owners]), inputs, verbalizers)

    def _logits_of(self, ids: Sequence[Sequence[int]], found: Sequence[Task | None]) -> np.ndarray:
        embeds, mask, past = self._first_step(ids, found, 0)
        logits, _ = self.forward(embeds, mask, position_ids(mask, mask.shape[1] - embeds.shape[1]), past, all_logits=True)
        return logits

    def _check_rows(self, ids: Sequence[Sequence[int]], found: Sequence[Task | None], new_tokens: int) -> None:
        """Refuse rows this model cannot run (rows.check_rows), whichever loop is about to run them."""
        check_rows(
            ids,
            [0 if t is None else t.length for t in found],
            vocab_size=self.config.vocab_size,
            limit=self.config.max_positions,
            new_tokens=new_tokens,
            slots=[0 if t is None else len(t.inner) for t in found],
        )

    def _first_step(
        self, ids: Sequence[Sequence[int]], found: Sequence[Task | None], max_new_tokens: int, cached: bool = True
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """First step's embeddings [B, S, E], mask [B, past + S] and past.

        Rows whose task has a cached prompt take its keys/values as their past (left-padded to the
        longest, pad columns masked) and feed only their tokens, so a first step costs what it
        costs without a prompt; a row with an empty input takes all but the last cached row and
        feeds the prompt's last vector, to have a position whose logits start generation. A prefix
        task's keys and values are its past in the same way (they are what it learned). Other
        rows feed their whole prompt. Positions count real columns, so they continue after the
        prompt either way.
        """
        self._check_rows(ids, found, max_new_tokens)
        for i, (row_ids, task) in enumerate(zip(ids, found)):
            if task is not None and task.past is not None and not len(row_ids):
                raise RequestError(f"input {i} is empty: prefix task {task.name!r} needs at least one token to continue from")
        prefixes = [self._past(t, cached) for t in found]
        rows = []
        for row_ids, task, prefix in zip(ids, found, prefixes):
            vectors = None if task is None or task.past is not None else task.vectors
            if prefix is not None and vectors is not None:  # the cache holds the prompt; a row without text re-feeds its last row
                vectors = None if len(row_ids) else vectors[-1:]
            rows.append(embed_row(self.table, row_ids, vectors, None if task is None else task.inner))
        embeds, mask = pad(rows, "left")
        held = [
            0 if prefix is None else prefix[0].shape[1] - (0 if len(row_ids) else 1) for prefix, row_ids in zip(prefixes, ids)
        ]
        width = max(held)
        if len(rows) == 1 and (only := prefixes[0]) is not None:
            past = [layer[None, :, :width] for layer in only]  # one row: views of the cached arrays
        else:
            past = self.graph.empty_past(len(rows), width)
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

    def _past(self, task: Task | None, cached: bool = True, start: bool = True) -> Prefix | None:
        """The keys and values a row of `task` starts from: a prefix task's own, or its prompt's cached ones (with
        `cached`; None while they are computed, which `start` begins)."""
        if task is None:
            return None
        if task.past is not None:
            return task.past
        if cached and start and self._graph is None and self._native is not None:
            self.graph  # the runtime's loop is about to run: its session and cached prompts begin now  # noqa: B018
        return self._prompts.get(task, start) if cached and self._prompts is not None else None
