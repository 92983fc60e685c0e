"""`Seq2Seq`: an encoder-decoder export (T5, BART, ...) generating and classifying under task prompts.

The soft prompt leads the encoder input only, as prompt tuning does for T5: rows are [prompt
vectors, then the templated text's token embeddings], right-padded, and the attention mask's
prompt columns are passed on to the decoder's cross-attention. The encoder graph returns every
decoder layer's cross-attention keys and values once per request; each decoder step reads them
and its own self-attention cache. Both stay onnxruntime values between steps (on the GPU with
CUDA), bound through I/O binding rather than copied through numpy.

A prompt cannot be cached here as for decoders: the encoder attends in both directions, so the
prompt's states depend on the text it precedes. Rows of different tasks still share batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from softprompt.formats.export_folder import ExportFolder

from .classify import log_softmax
from .errors import InferenceError
from .generate import RowText, TextModel
from .rows import check_rows, embed_row, pad
from .sampling import chooser
from .settings import GenerationSettings
from .tasks import Task


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
        self._past_names = config.past_names
        self._present_names = config.present_names
        inputs = {i.name: i for i in decoder.get_inputs()}
        self._past_shapes = [(inputs[name].shape[1], inputs[name].shape[3]) for name in self._past_names]
        self._eos = set(config.eos_token_ids)
        self._start = config.bos_token_id
        self._device = "cuda" if "CUDAExecutionProvider" in decoder.get_providers() else "cpu"

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
        past = self._empty_past(len(candidates))
        cross = [np.asarray(_numpy(c))[pick] for c in cross]
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
            [0 if t is None else t.length for t in found],
            vocab_size=self.config.vocab_size,
            limit=self.config.max_positions,
            what="encoder positions",
        )
        embeds, mask = pad([embed_row(self.table, row, None if t is None else t.vectors) for row, t in zip(ids, found)], "right")
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", embeds)
        binding.bind_cpu_input("attention_mask", mask)
        for name in self._cross_names:
            binding.bind_output(name, self._device)
        try:
            self.encoder.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own types
            raise InferenceError(f"onnxruntime failed in the encoder with inputs_embeds {embeds.shape}: {exc}") from exc
        return binding.get_outputs(), mask

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

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, heads, 0, size), dtype=np.float32) for heads, size in self._past_shapes]

    def _steps(
        self, ids: Sequence[Sequence[int]], found: Sequence[Task | None], settings: GenerationSettings
    ) -> Iterator[list[RowText]]:
        """Encode once, then decode token by token; yields the rows' states after every step (the last is final)."""
        generation = self.config.generation
        choose = chooser(
            settings,
            self._eos,
            forced_first=generation.get("forced_bos_token_id"),
            forced_last=generation.get("forced_eos_token_id"),
        )
        max_new_tokens = settings.max_new_tokens
        cross, mask = self._encoder(ids, found)
        states = [RowText(self.decode, self._eos, settings.stop) for _ in ids]
        tokens = np.full(len(ids), self._start, dtype=np.int64)
        past: list = self._empty_past(len(ids))
        for step in range(max_new_tokens):
            logits, past = self._decoder_step(np.asarray(self.table[tokens], dtype=np.float32)[:, None], mask, past, cross)
            tokens = choose(logits)
            for state, token in zip(states, tokens.tolist()):
                state.add(token)
            if all(state.done for state in states) or step + 1 == max_new_tokens:
                break
            yield states
        for state in states:
            state.finish()
        yield states


def _numpy(value):
    return value if isinstance(value, np.ndarray) else value.numpy()
