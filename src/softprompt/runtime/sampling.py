"""Choosing the next token from logits: greedy, temperature, top-k and top-p, in numpy."""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from .settings import GenerationSettings


def next_tokens(
    logits: np.ndarray,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Pick one token id per row of `logits` [B, V]."""
    if temperature == 0:
        return logits.argmax(-1)
    # Scale by temperature; work in float64 so tiny probabilities do not underflow.
    scores = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        # Keep the k highest scores per row; the rest can never be drawn.
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p is not None and top_p < 1:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always the top one).
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    rng = rng or np.random.default_rng()
    # Inverse-CDF draw per row: one uniform number each, vectorised over the batch.
    draws = rng.random((probs.shape[0], 1))
    picked = (np.cumsum(probs, -1) < draws).sum(-1)
    return np.minimum(picked, probs.shape[-1] - 1)


def chooser(
    settings: GenerationSettings, eos: Collection[int], *, forced_first: int | None = None, forced_last: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A per-request `choose(logits [B, V]) -> [B]` that counts its steps.

    As transformers' logits processors: end of sequence is masked until `min_new_tokens` tokens
    exist; `forced_first` / `forced_last` (a model's forced BOS / EOS, as BART and mBART set them)
    replace the first and the `max_new_tokens`-th choice.
    """
    temperature, top_k, top_p = settings.temperature, settings.top_k, settings.top_p
    # Greedy draws nothing: no generator, so a greedy process never imports numpy.random (with OpenSSL, 7 MB).
    rng = np.random.default_rng(settings.seed) if temperature else None
    eos = sorted(eos)
    ends = set(eos)
    state = {"step": 0}

    def choose(logits: np.ndarray) -> np.ndarray:
        step = state["step"]
        state["step"] += 1
        if forced_first is not None and step == 0:
            return np.full(logits.shape[0], forced_first, dtype=np.int64)
        if forced_last is not None and step == settings.max_new_tokens - 1:
            return np.full(logits.shape[0], forced_last, dtype=np.int64)
        if step < settings.min_new_tokens and eos:
            if temperature == 0:  # greedy: mask only when an end-of-sequence token would win
                tokens = logits.argmax(-1)
                if not ends.intersection(tokens.tolist()):
                    return tokens
            logits = logits.copy()
            logits[:, eos] = -np.inf
        return next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)

    return choose
