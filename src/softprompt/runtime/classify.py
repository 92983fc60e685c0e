"""Classification by verbalizers: a label's score is the log-probability of its words after the input.

For each text and label the row is (templated input ids + the label's verbalizer ids); the
verbalizer's tokens are scored from the logits one position earlier and summed. Labels whose
words are one token share a single row per text. Scores are a softmax over the labels' sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import RequestError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def label_logprobs(
    run_rows: Callable[[list[list[int]], list[int]], np.ndarray],
    inputs: Sequence[Sequence[int]],
    verbalizers: Sequence[Sequence[Sequence[int]]],
    chunk: int = 8,
) -> list[np.ndarray]:
    """Per input, the summed log-probability of each of its labels' verbalizer ids after it.

    `verbalizers[i]` holds input i's labels (inputs of different tasks may have different labels).
    `run_rows(rows, owners)` returns left-padded logits [len(rows), T, V] for rows that all end at
    T - 1; `owners[r]` is the input row r belongs to (so a caller can give each its own task).
    """
    # (owner, label or None, row ids, words): an input whose labels are all one token needs one row,
    # whose next-token distribution scores every label at once; otherwise one row per label.
    items: list[tuple[int, int | None, list[int], list[int]]] = []
    for i, (ids, labels) in enumerate(zip(inputs, verbalizers)):
        if all(len(words) == 1 for words in labels):
            items.append((i, None, list(ids), [words[0] for words in labels]))
        else:
            items.extend((i, j, list(ids) + list(words), list(words)) for j, words in enumerate(labels))
    out = [np.zeros(len(labels), dtype=np.float64) for labels in verbalizers]
    for start in range(0, len(items), chunk):
        batch = items[start : start + chunk]
        logits = run_rows([row for _, _, row, _ in batch], [owner for owner, *_ in batch])
        for r, (i, j, _, words) in enumerate(batch):
            if j is None:
                out[i][:] = log_softmax(logits[r, -1].astype(np.float64))[words]
            else:
                # Token words[m] sits at position T-k+m and is predicted by the logits at T-k+m-1.
                k = len(words)
                scores = log_softmax(logits[r, -k - 1 : -1].astype(np.float64))
                out[i][j] = float(scores[np.arange(k), words].sum())
    return out


def combine(probabilities: np.ndarray, how: str) -> tuple[int, np.ndarray, np.ndarray]:
    """Ensemble of M prompts' label probabilities [M, L]: (winning label, mean probabilities, votes).

    "mean" picks the label with the highest mean probability; "vote" the label most members pick,
    ties broken by the mean probability (as in the prompt-tuning paper's ensembles, which vote).
    """
    mean = probabilities.mean(axis=0)
    votes = np.bincount(probabilities.argmax(axis=1), minlength=probabilities.shape[1])
    if how == "mean":
        return int(mean.argmax()), mean, votes
    if how == "vote":
        best = np.flatnonzero(votes == votes.max())
        return int(best[mean[best].argmax()]), mean, votes
    raise ValueError(f"ensemble {how!r}; expected 'vote' or 'mean'")


def normalise(logprobs: np.ndarray) -> np.ndarray:
    """Softmax over labels: the scores a user reads, summing to 1 per text."""
    return np.exp(log_softmax(logprobs))


def ensemble_members(task, ensemble: str) -> list[str]:
    """The member task names of an ensemble request, checked."""
    if ensemble not in ("vote", "mean"):
        raise RequestError(f"ensemble {ensemble!r}; expected 'vote' or 'mean'")
    members = [task] if isinstance(task, str) else list(task or [])
    if len(members) < 2 or len(set(members)) != len(members) or None in members:
        raise RequestError(f"an ensemble needs at least two different tasks; got {members}")
    return members


def ensemble_result(labels: Sequence[str], members: Sequence[str], probabilities: np.ndarray, how: str) -> dict:
    """One text's combined result from its members' label probabilities [M, L]."""
    winner, mean, votes = combine(probabilities, how)
    return {
        "label": labels[winner],
        "scores": {label: float(p) for label, p in zip(labels, mean)},
        "votes": {label: int(v) for label, v in zip(labels, votes)},
        "members": {name: labels[int(row.argmax())] for name, row in zip(members, probabilities)},
    }


def classifiable(found: Sequence) -> Sequence:
    """The tasks, if each is a classification task (has labels)."""
    for task in found:
        if task is None or not task.spec.labels:
            kind = "no task" if task is None else f"task {task.name!r} is a {task.spec.kind} task"
            raise RequestError(f"classify needs a classification task; {kind} with no labels")
    return found


# probabilities(texts, tasks) -> each row's label probabilities, in the order of its task's labels
Probabilities = Callable[[Sequence[str], Sequence], list[np.ndarray]]


def classify_rows(texts: Sequence[str], found: Sequence, probabilities: Probabilities) -> list[dict]:
    """One task per text: each text's winning label and every label's probability."""
    classifiable(found)
    results = []
    for t, probs in zip(found, probabilities(texts, found)):
        labels = list(t.spec.labels)
        results.append({"label": labels[int(probs.argmax())], "scores": {l: float(p) for l, p in zip(labels, probs)}})
    return results


def classify_ensemble(texts: Sequence[str], found: Sequence, how: str, probabilities: Probabilities) -> list[dict]:
    """Every text under each member task (one batch), the members' probabilities combined by `how`."""
    classifiable(found)
    labels = list(found[0].spec.labels)
    odd = [t.name for t in found if list(t.spec.labels) != labels]
    if odd:
        raise RequestError(f"ensemble members {odd} have labels other than {found[0].name!r}'s {labels}")
    probs = probabilities([text for text in texts for _ in found], list(found) * len(texts))
    return [
        ensemble_result(labels, [t.name for t in found], np.stack(probs[i * len(found) : (i + 1) * len(found)]), how)
        for i in range(len(texts))
    ]


def label_probabilities(encode: Callable, logprobs: Callable) -> Probabilities:
    """Verbalizer scoring as `probabilities`: `logprobs(inputs, verbalizers, tasks)` gives each row's summed
    log-probability of each label's verbalizer ids after (or, for encoder-decoders, as the output of) its
    templated input ids; the scores are normalised over the labels."""

    def probabilities(texts: Sequence[str], found: Sequence) -> list[np.ndarray]:
        inputs, verbalizers = verbalized(texts, found, encode)
        return [normalise(row) for row in logprobs(inputs, verbalizers, found)]

    return probabilities


def verbalized(texts: Sequence[str], found: Sequence, encode: Callable) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(templated input ids, each label's verbalizer ids) per row; `found` are classification tasks (classifiable)."""
    verbalizers = []
    for task in found:
        by_label = task.spec.verbalizer_ids(encode)
        empty = [label for label, ids in by_label.items() if not ids]
        if empty:
            raise RequestError(f"task {task.name!r}: verbalizers of {empty} have no tokens")
        verbalizers.append(list(by_label.values()))
    return [task.spec.encode(text, encode) for text, task in zip(texts, found)], verbalizers
