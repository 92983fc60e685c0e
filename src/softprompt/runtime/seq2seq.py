"""`Seq2Seq`: an encoder-decoder export (T5, BART, ...) generating and classifying under task prompts.

The soft prompt leads the encoder input only, as prompt tuning does for T5: rows are [prompt
vectors, then the templated text's token embeddings], right-padded, and the attention mask's
prompt columns are passed on to the decoder's cross-attention. The encoder graph returns every
decoder layer's cross-attention keys and values once per request; each decoder step reads them
and its own self-attention cache. Both stay onnxruntime values between steps (on the GPU with
CUDA), bound through I/O binding rather than copied through numpy.

A prompt cannot be cached here as for decoders: the encoder attends in both directions, so the
prompt's states depend on the text it precedes. Rows of different tasks still share batches.

A prefix task is the decoder's self-attention past (PEFT's prefix tuning of a seq2seq model): its
keys and values start every row's self cache, and the decoder's positions continue after them. A
prefix with parts (Li and Liang's) also gives every encoder layer keys and values to attend to
before the text (the encoder graph's `encoder_prefix.*` inputs, empty for other rows) and every
cross-attention layer keys and values before the encoder's (joined to the encoder graph's output,
with P more mask columns). The decoder graph takes no self-attention mask, so rows whose pasts
differ (a prefix of P, with parts or not, or none) cannot share its calls: they run as one group
per kind of past, stepped together.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from softprompt.formats.export_folder import ExportFolder

from .classify import log_softmax
from .errors import InferenceError, RequestError
from .graph import numpy_value
from .rows import as_texts, check_rows, embed_row, pad, tasks_for
from .sampling import chooser
from .seq2seq_batch import Seq2SeqBatch
from .settings import GenerationSettings
from .tasks import Task
from .text_model import TextModel


class Seq2Seq(TextModel):
    """A loaded encoder-decoder export: `generate`, `stream`, `complete` and `classify` under task prompts.

    A model's forced first/last tokens (BART's forced BOS/EOS) apply as in transformers' `generate`.
    """

    def __init__(self, backbone: ExportFolder, encoder, decoder, bank: Path | None = None):
        super().__init__(backbone, decoder, bank)  # providers and device follow the decoder, where the time goes
        config = self.config
        self.encoder = encoder
        self.decoder = decoder
        self._cross_names = [o.name for o in encoder.get_outputs()]
        self._prefix_inputs = [i for i in encoder.get_inputs() if i.name.startswith("encoder_prefix.")]
        self._past_names = config.past_names
        self._present_names = config.present_names
        inputs = {i.name: i for i in decoder.get_inputs()}
        self._past_shapes = [(inputs[name].shape[1], inputs[name].shape[3]) for name in self._past_names]
        self._eos = set(config.eos_token_ids)
        self._start = config.bos_token_id
        self._device = "cuda" if "CUDAExecutionProvider" in decoder.get_providers() else "cpu"

    def decoder_logits(self, texts: str | Sequence[str], decoder_ids: Sequence[Sequence[int]], task=None) -> np.ndarray:
        """Logits [B, 1 + T, V] of the decoder reading [start] + `decoder_ids[i]` (right-padded) after each templated
        text under its task: teacher forcing in one pass, for parity checks against other implementations."""
        texts = as_texts(texts)
        found = self._store.resolve(tasks_for(task, len(texts)))
        ids = self._encode_rows(texts, found)
        length = 1 + max(len(row) for row in decoder_ids)
        out = np.zeros((len(ids), length, self.config.vocab_size), dtype=np.float32)
        for group in _by_past(found):
            tasks = [found[i] for i in group]
            cross, mask = self._encoder([ids[i] for i in group], tasks)
            tokens = np.full((len(group), length), self._start, dtype=np.int64)
            for r, i in enumerate(group):
                tokens[r, 1 : 1 + len(decoder_ids[i])] = decoder_ids[i]
            embeds = np.asarray(self.table[tokens], dtype=np.float32)
            out[group], _ = self._decoder_step(embeds, mask, self._start_past(tasks), cross, all_logits=True)
        return out

    # ---- internals ----------------------------------------------------------------------------

    def _label_logprobs(
        self, inputs: list[list[int]], verbalizers: list[list[list[int]]], found: Sequence[Task]
    ) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for start in range(0, len(inputs), 16):
            out += self._candidate_logprobs(
                inputs[start : start + 16], found[start : start + 16], verbalizers[start : start + 16]
            )
        return out

    def _candidate_logprobs(
        self, ids: Sequence[Sequence[int]], found: Sequence[Task | None], targets: Sequence[Sequence[Sequence[int]]]
    ) -> list[np.ndarray]:
        """Per input row, the summed log-probability of each candidate target (decoder ids) given the row."""
        groups = _by_past(found)
        if len(groups) > 1:
            out: list[np.ndarray] = [np.zeros(0)] * len(ids)
            for group in groups:
                scores = self._candidate_logprobs([ids[i] for i in group], [found[i] for i in group], [targets[i] for i in group])
                for i, row in zip(group, scores):
                    out[i] = row
            return out
        cross, mask = self._encoder(ids, found)
        owners = [i for i, row in enumerate(targets) for _ in row]
        candidates = [list(words) for row in targets for words in row]
        if not candidates:
            return [np.zeros(0) for _ in ids]
        pick = np.asarray(owners)
        length = 1 + max(len(c) for c in candidates)
        tokens = np.full((len(candidates), length), self._start, dtype=np.int64)
        for r, words in enumerate(candidates):
            tokens[r, 1 : 1 + len(words)] = words  # right-padded: a causal decoder never looks ahead
        past = self._start_past([found[i] for i in owners])
        cross = [np.asarray(numpy_value(c))[pick] for c in cross]
        logits, _ = self._decoder_step(np.asarray(self.table[tokens], dtype=np.float32), mask[pick], past, cross, all_logits=True)
        scores = [np.zeros(len(row), dtype=np.float64) for row in targets]
        position = {i: 0 for i in range(len(ids))}
        for r, (owner, words) in enumerate(zip(owners, candidates)):
            logp = log_softmax(logits[r, : len(words)].astype(np.float64))
            scores[owner][position[owner]] = float(logp[np.arange(len(words)), words].sum())
            position[owner] += 1
        return scores

    def _encoder(self, ids: Sequence[Sequence[int]], found: Sequence[Task | None]) -> tuple[list, np.ndarray]:
        """Cross-attention keys/values of every decoder layer for the right-padded rows, and their mask."""
        check_rows(
            ids,
            [0 if t is None else len(t.vectors) for t in found],  # a prefix is the decoder's: none of these
            vocab_size=self.config.vocab_size,
            limit=self.config.max_positions,
            what="encoder positions",
            need_tokens=any(t is not None and t.past is not None for t in found),
            slots=[0 if t is None else len(t.inner) for t in found],
        )
        rows = [
            embed_row(self.table, row, None if t is None else t.vectors, None if t is None else t.inner)
            for row, t in zip(ids, found)
        ]
        embeds, mask = pad(rows, "right")
        parts = [self._parts(t) for t in found]  # one kind of past per call (_by_past)
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", embeds)
        binding.bind_cpu_input("attention_mask", mask)
        for j, node in enumerate(self._prefix_inputs):
            empty = np.zeros((len(ids), node.shape[1], 0, node.shape[3]), np.float32)
            binding.bind_cpu_input(node.name, np.stack([p[1][j] for p in parts]) if parts[0][1] else empty)
        for name in self._cross_names:
            binding.bind_output(name, self._device)
        try:
            self.encoder.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own types
            raise InferenceError(f"onnxruntime failed in the encoder with inputs_embeds {embeds.shape}: {exc}") from exc
        cross = binding.get_outputs()
        if not parts[0][2]:
            return cross, mask
        # The cross-attention prefix: its keys and values before the encoder's, attended by every row.
        joined = [np.concatenate([np.stack([p[2][j] for p in parts]), numpy_value(c)], axis=2) for j, c in enumerate(cross)]
        length = parts[0][2][0].shape[1]
        return joined, np.concatenate([np.ones((len(ids), length), dtype=mask.dtype), mask], axis=1)

    def _parts(self, task: Task | None) -> tuple[tuple, tuple, tuple]:
        """A row's (decoder self-attention, encoder, cross-attention) keys and values, each one array per layer's key
        or value; empty where the row has none."""
        if task is None or task.past is None:
            return (), (), ()
        decoder, encoder = len(self._past_names), len(self._prefix_inputs)
        past = task.past
        if len(past) == decoder:
            return past, (), ()
        return past[:decoder], past[decoder : decoder + encoder], past[decoder + encoder :]

    def _decoder_step(
        self, embeds: np.ndarray, mask: np.ndarray, past: Sequence, cross: Sequence, all_logits: bool = False
    ) -> tuple[np.ndarray, list]:
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
        binding.bind_cpu_input("encoder_attention_mask", mask)
        for name, value in [*zip(self._past_names, past), *zip(self._cross_names, cross)]:
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self._device)
        try:
            self.decoder.run_with_iobinding(binding)
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed in the decoder with inputs_embeds {embeds.shape}: {exc}") from exc
        logits, *present = binding.get_outputs()
        logits = logits.numpy()
        return (logits if all_logits else logits[:, -1]), present

    def _start_past(self, found: Sequence[Task | None]) -> list[np.ndarray]:
        """The decoder's self cache before its first step: the rows' prefixes (all of one length), or empty."""
        pasts = [self._parts(task)[0] for task in found if task is not None and task.past is not None]
        if not pasts:
            return [np.zeros((len(found), heads, 0, size), dtype=np.float32) for heads, size in self._past_shapes]
        return [np.stack([past[j] for past in pasts]) for j in range(len(self._past_shapes))]

    # ---- what the running batch (seq2seq_batch.py) calls ---------------------------------------

    def batch(self) -> Seq2SeqBatch:
        """An empty running batch of this model (the engine's and `complete`'s loop)."""
        return Seq2SeqBatch(self)

    def start(
        self, ids: Sequence[Sequence[int]], task=None, max_new_tokens: int = 0
    ) -> list[tuple[list[int], list, list, np.ndarray]]:
        """The rows' encoder outputs by kind of past (`_by_past`): for each group its row indices, the decoder's self
        cache before the first step, the cross-attention keys and values, and the encoder mask. Every row is checked
        before any is returned."""
        found = self._store.resolve(tasks_for(task, len(ids)))
        limit = self.config.max_positions
        out = []
        for group in _by_past(found):
            tasks = [found[i] for i in group]
            past = self._start_past(tasks)
            held = past[0].shape[2]
            if held and limit is not None and held + max_new_tokens > limit:
                raise RequestError(
                    f"task {tasks[0].name!r}: a prefix of {held} + {max_new_tokens} new tokens = {held + max_new_tokens} "  # type: ignore[union-attr]
                    f"decoder positions; the model has {limit}"
                )
            out.append((group, past, *self._encoder([ids[i] for i in group], tasks)))
        return out

    def row_chooser(self, settings: GenerationSettings):
        """A row's `choose(logits)`, with the model's forced first and last tokens (BART's) as `generate` applies them."""
        generation = self.config.generation
        return chooser(
            settings,
            self._eos,
            forced_first=generation.get("forced_bos_token_id"),
            forced_last=generation.get("forced_eos_token_id"),
        )

    def decoder_step(self, tokens: Sequence[int], mask: np.ndarray, past: Sequence, cross: Sequence) -> tuple[np.ndarray, list]:
        """One decoder call feeding each row's last token: the next logits [B, V] and the self cache after it."""
        return self._decoder_step(np.asarray(self.table[list(tokens)], dtype=np.float32)[:, None], mask, past, cross)

    def take_rows(self, values: Sequence, rows: Sequence[int]) -> list:
        """Cache arrays (numpy or onnxruntime values) with only `rows` of their batch, where the graphs keep them."""
        kept = [numpy_value(value)[list(rows)] for value in values]
        if self._device == "cpu":
            return kept
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self._device, 0) for value in kept]


def _by_past(found: Sequence[Task | None]) -> list[list[int]]:
    """Row indices grouped by their kind of past (its length, and which parts it has; (0, 0): no prefix), in order of
    first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, task in enumerate(found):
        key = (0, 0) if task is None or task.past is None else (task.length, len(task.past))
        groups.setdefault(key, []).append(i)
    return list(groups.values())
