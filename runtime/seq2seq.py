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

from .backbone import Backbone
from .batch import embed_row
from .classify import classify_texts, log_softmax, normalise, verbalized
from .errors import InferenceError, RequestError
from .generate import GeneratesText, RowText, as_texts, check_request, spec_of
from .sampling import chooser
from .tasks import ServesTasks, Task, TaskStore


class Seq2Seq(ServesTasks, GeneratesText):
    """A loaded encoder-decoder export: `generate`, `stream`, `complete` and `classify` under task prompts.

    A model's forced first/last tokens (BART's forced BOS/EOS) apply as in transformers' `generate`.
    """

    def __init__(self, backbone: Backbone, encoder, decoder, bank: Path | None = None):
        self.backbone = backbone
        self.config = config = backbone.config
        self.table = backbone.table
        self.session = decoder  # providers and device follow the decoder, where the time goes
        self.encoder = encoder
        self.decoder = decoder
        self.bank = bank
        self._cross_names = [o.name for o in encoder.get_outputs()]
        self._past_names = config.past_names
        self._present_names = config.present_names
        inputs = {i.name: i for i in decoder.get_inputs()}
        self._past_shapes = [(inputs[name].shape[1], inputs[name].shape[3]) for name in self._past_names]
        self._eos = set(config.eos_token_ids)
        self._start = config.bos_token_id
        self._device = "cuda" if "CUDAExecutionProvider" in decoder.get_providers() else "cpu"
        self._store = TaskStore(bank, width=config.hidden_size, fingerprint=config.fingerprint, prefill=None)

    # ---- tokens -------------------------------------------------------------------------------

    def encode(self, text: str, task: str | None = None) -> list[int]:
        """Encoder token ids of `text` in the task's template (the tokenizer's own special tokens included)."""
        found = self._resolve([task])[0]
        return self.backbone.encode(spec_of(found).apply(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.backbone.tokenizer.decode(list(ids), skip_special_tokens=True)

    def inputs_embeds(self, ids: Sequence[int], task: str | None = None) -> np.ndarray:
        """[P + n, E]: the encoder input for `ids` under `task` (training builds the same)."""
        return embed_row(self.table, ids, self.prompt(task))

    # ---- generation (complete, generate, stream: GeneratesText over `_run`) and classification ----

    def classify(self, texts: str | Sequence[str], task, ensemble: str | None = None) -> list[dict]:
        """Label each text by the log-probability of each label's verbalizer as the decoder's output.

        `task` and `ensemble` work as in the decoder `Model.classify`.
        """
        return classify_texts(as_texts(texts), task, ensemble, self._resolve, self._label_probabilities)

    # ---- internals ----------------------------------------------------------------------------

    def _label_probabilities(self, texts: Sequence[str], found: Sequence[Task | None]) -> list[np.ndarray]:
        ids, targets = verbalized(texts, found, self.backbone.encode)
        out: list[np.ndarray] = []
        for start in range(0, len(ids), 16):
            out += self._candidate_logprobs(ids[start : start + 16], found[start : start + 16], targets[start : start + 16])
        return [normalise(row) for row in out]

    def _candidate_logprobs(self, ids: Sequence[Sequence[int]], found: Sequence[Task | None],
                            targets: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
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
        limit = self.config.max_positions
        rows = []
        for i, (row_ids, task) in enumerate(zip(ids, found)):
            prompt = None if task is None else task.vectors
            length = (0 if prompt is None else prompt.shape[0]) + len(row_ids)
            if length == 0:
                raise RequestError(f"input {i} is empty and has no task prompt")
            if limit is not None and length > limit:
                raise RequestError(f"input {i} needs {length - len(row_ids)} prompt + {len(row_ids)} input = {length} "
                                   f"encoder positions; the model has {limit}")
            bad = [t for t in row_ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise RequestError(f"input {i} has token ids {bad[:5]} outside [0, {self.config.vocab_size})")
            rows.append(embed_row(self.table, row_ids, prompt))
        width = max(r.shape[0] for r in rows)
        embeds = np.zeros((len(rows), width, self.table.shape[1]), dtype=np.float32)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            embeds[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = 1
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

    def _decoder_step(self, embeds: np.ndarray, mask: np.ndarray, past: Sequence, cross: Sequence,
                      all_logits: bool = False) -> tuple[np.ndarray, list]:
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

    def _run(self, ids: Sequence[Sequence[int]], found: list[Task | None], *, max_new_tokens: int = 64,
             min_new_tokens: int = 0, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop: str | Sequence[str] | None = None) -> Iterator[list[RowText]]:
        """Encode once, then decode token by token; yields the rows' states after every step (the last is final)."""
        check_request(len(ids), max_new_tokens, min_new_tokens)
        generation = self.config.generation
        choose = chooser(eos=self._eos, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         forced_first=generation.get("forced_bos_token_id"),
                         forced_last=generation.get("forced_eos_token_id"))
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        cross, mask = self._encoder(ids, found)
        states = [RowText(self.decode, self._eos, stops) for _ in ids]
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
