"""Classification by verbalizers: a label's score is the log-probability of its words after the input.

For each text and label the row is (templated input ids + the label's verbalizer ids); the
verbalizer's tokens are scored from the logits one position earlier and summed. Labels whose
words are one token share a single row per text. Scores are a softmax over the labels' sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def label_logprobs(
    run_rows: Callable[[list[list[int]]], np.ndarray],
    inputs: Sequence[list[int]],
    verbalizers: Sequence[list[int]],
    chunk: int = 8,
) -> np.ndarray:
    """[texts, labels] summed log-probabilities of each label's verbalizer ids after each input.

    `run_rows(rows)` returns left-padded logits [len(rows), T, V] for rows that all end at T - 1.
    """
    out = np.zeros((len(inputs), len(verbalizers)), dtype=np.float64)
    if all(len(v) == 1 for v in verbalizers):
        # One row per text: the next-token distribution after the input scores every label at once.
        first = [v[0] for v in verbalizers]
        for start in range(0, len(inputs), chunk):
            logits = run_rows(list(inputs[start : start + chunk]))
            out[start : start + chunk] = log_softmax(logits[:, -1].astype(np.float64))[:, first]
        return out
    pairs = [(i, j) for i in range(len(inputs)) for j in range(len(verbalizers))]
    for start in range(0, len(pairs), chunk):
        batch = pairs[start : start + chunk]
        logits = run_rows([list(inputs[i]) + list(verbalizers[j]) for i, j in batch])
        for row, (i, j) in enumerate(batch):
            words = verbalizers[j]
            k = len(words)
            # Token words[m] sits at position T-k+m and is predicted by the logits at T-k+m-1.
            scores = log_softmax(logits[row, -k - 1 : -1].astype(np.float64))
            out[i, j] = float(scores[np.arange(k), words].sum())
    return out


def normalise(logprobs: np.ndarray) -> np.ndarray:
    """Softmax over labels: the scores a user reads, summing to 1 per text."""
    return np.exp(log_softmax(logprobs))
