"""Initial values of a soft prompt (`--init`): random, vocab, labels, text:"...", file:PATH.

numpy only: everything here works from the embedding table and token ids, so the same
initialisations serve any backbone the table came from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from softprompt.formats.bank import load_prompt

from .errors import TrainingError

INITS = ("random", "vocab", "labels", "text:TEXT", "file:PATH")


def check_init(spec: str) -> str:
    """Refuse an unknown `--init` before any model is loaded."""
    if spec in ("random", "vocab", "labels") or (spec.startswith(("text:", "file:")) and len(spec) > 5):
        return spec
    raise TrainingError(f"--init {spec!r}; expected one of {', '.join(INITS)}")


def common_token_ids(tokenizer_json: str, count: int = 5000) -> np.ndarray:
    """The ids of the tokenizer's `count` most common tokens, decided from the tokenizer itself.

    - BPE: merge order. A merge learned earlier joined a more frequent pair in the tokenizer's
      training data, so tokens are ranked by the merge that created them; base symbols (single
      bytes or characters) rank after all merges, since many are rare control bytes.
    - Unigram (SentencePiece): the pieces' log-probabilities, highest first.
    - WordPiece / WordLevel: vocabulary order (such vocabularies are written most frequent first).
    Special and added tokens never count.
    """
    data = json.loads(tokenizer_json)
    model = data["model"]
    special = {t["id"] for t in data.get("added_tokens", [])}
    if model["type"] == "Unigram":
        order = sorted(range(len(model["vocab"])), key=lambda i: -model["vocab"][i][1])
    elif model["type"] == "BPE":
        vocab = model["vocab"]
        merged = []
        for merge in model.get("merges", []):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            token_id = vocab.get(left + right)
            if token_id is not None:
                merged.append(token_id)
        seen = set(merged)
        order = merged + sorted(i for i in vocab.values() if i not in seen)
    else:
        order = (
            sorted(model["vocab"].values()) if isinstance(model.get("vocab"), dict) else list(range(len(model.get("vocab", []))))
        )
    ids = [i for i in dict.fromkeys(order) if i not in special]
    return np.asarray(ids[:count], dtype=np.int64)


def init_prompt(
    spec: str,
    length: int,
    table: np.ndarray,
    *,
    encode: Callable[[str], list[int]],
    common_ids: np.ndarray,
    label_words: Sequence[str] = (),
    fingerprint: str | None = None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Return a [length, E] float32 starting prompt. `encode` gives token ids without special tokens."""
    if length < 1:
        raise TrainingError(f"prompt length {length}; expected at least 1")
    width = table.shape[1]
    if spec == "random":
        # Uniform with the table's own spread: the same std as a typical token embedding.
        bound = float(np.asarray(table, np.float32).std()) * np.sqrt(3.0)
        return rng.uniform(-bound, bound, (length, width)).astype(np.float32)
    if spec == "vocab":
        return _sample_rows(table, common_ids, length, rng)
    if spec == "labels":
        if not label_words:
            raise TrainingError("--init labels needs a classification task (labels with verbalizers)")
        rows = []
        for words in list(label_words)[:length]:
            ids = encode(words)
            if not ids:
                raise TrainingError(f"verbalizer {words!r} has no tokens")
            rows.append(np.asarray(table[np.asarray(ids)], np.float32).mean(0))  # averaged over sub-tokens
        rest = (
            _sample_rows(table, common_ids, length - len(rows), rng) if length > len(rows) else np.zeros((0, width), np.float32)
        )
        return np.concatenate([np.stack(rows), rest]).astype(np.float32)
    if spec.startswith("text:"):
        ids = encode(spec[5:])
        if not ids:
            raise TrainingError(f"--init {spec!r}: the text has no tokens")
        ids = np.resize(np.asarray(ids), length)  # repeated, or cut, to the prompt length
        return np.asarray(table[ids], np.float32)
    if spec.startswith("file:"):
        path = Path(spec[5:])
        if path.suffix not in (".json", ".npy"):
            raise TrainingError(f"--init {spec!r}: expected a bank task's record, BANK/NAME.json")
        prompt = load_prompt(path.parent, path.stem, fingerprint=fingerprint)
        if prompt.is_prefix:
            raise TrainingError(f"--init {spec!r}: a prefix task (keys and values); a prompt starts from a prompt task")
        if prompt.meta.width != width:
            raise TrainingError(f"--init {spec!r}: prompt width {prompt.meta.width}; the model's embedding width is {width}")
        vectors = np.asarray(prompt.vectors, np.float32)
        return vectors[np.resize(np.arange(len(vectors)), length)]
    raise TrainingError(f"--init {spec!r}; expected one of {', '.join(INITS)}")


def _sample_rows(table: np.ndarray, ids: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    if len(ids) == 0:
        raise TrainingError("the tokenizer has no ordinary tokens to sample from")
    picked = rng.choice(ids, size=count, replace=count > len(ids))
    return (
        np.asarray(table[np.sort(picked)], np.float32)[rng.permutation(count)]
        if count
        else np.zeros((0, table.shape[1]), np.float32)
    )
