"""`Encoder`: an encoder export (BERT, MiniLM, ...) serving sentence embeddings and classification under task prompts.

Rows are [prompt vectors, then the text's token embeddings ([CLS] ... [SEP])], right-padded; the
graph adds position and token-type embeddings and the embedding LayerNorm to every row, prompt
included. A sentence embedding pools the last hidden states over the text's tokens (not the
prompt rows: they are the same for every input of a task) as the model's sentence-transformers
Pooling module says (mean when it says nothing; `pooling` in softprompt.json), L2-normalised.

`load()` returns an `Encoder` for exports whose softprompt.json says `"kind": "encoder"`. Tasks
follow the bank folder as for decoders (hot swap, bad files never replace good ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from softprompt.prompt_bank.task import TaskSpec

from .backbone import Backbone
from .batch import embed_row
from .classify import ensemble_members, ensemble_result, log_softmax
from .errors import InferenceError, RequestError
from .tasks import ServesTasks, Task, TaskStore

# Cosine similarities lie in [-1, 1]; scaled by this before the softmax over labels, as
# sentence-transformers scales them in its contrastive losses, so the scores read as probabilities.
SIMILARITY_SCALE = 20.0


class Encoder(ServesTasks):
    """A loaded encoder export: `embed` and `classify`, optionally under task prompts."""

    def __init__(self, backbone: Backbone, session, bank: Path | None = None):
        self.backbone = backbone
        self.config = config = backbone.config
        self.table = backbone.table
        self.session = session
        self.bank = bank
        self._token_types = "token_type_ids" in config.input_names
        self._pooler = "pooler_output" in config.output_names
        self._outputs = ["last_hidden_state", "pooler_output"] if self._pooler else ["last_hidden_state"]
        self._store = TaskStore(bank, width=config.hidden_size, fingerprint=config.fingerprint, prefill=None)

    def encode(self, text: str, task: str | None = None) -> list[int]:
        """Token ids of `text` in the task's template, with the tokenizer's [CLS]/[SEP]."""
        found = self._resolve([task])[0]
        return self.backbone.encode((TaskSpec() if found is None else found.spec).apply(text))

    def embed(self, texts: str | Sequence[str], task: str | None | Sequence[str | None] = None,
              normalize: bool = True, batch_size: int = 32) -> np.ndarray:
        """[N, E] sentence embeddings (one row per text; a str gives [1, E]) under the task's prompt."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise RequestError("no input given")
        names = [task] * len(texts) if task is None or isinstance(task, str) else list(task)
        if len(names) != len(texts):
            raise RequestError(f"{len(names)} tasks for {len(texts)} inputs; give one task, or one per input")
        found = self._resolve(names)
        ids = [self.backbone.encode((TaskSpec() if t is None else t.spec).apply(text)) for text, t in zip(texts, found)]
        out = np.concatenate([self._pooled(ids[i : i + batch_size], found[i : i + batch_size])
                              for i in range(0, len(ids), batch_size)])
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def classify(self, texts: str | Sequence[str], task, ensemble: str | None = None) -> list[dict]:
        """Label each text by the nearest label embedding (labels embedded without a prompt), or by
        the task's trained linear head when it has one.

        Scores are a softmax over the labels of cosine similarity x 20 (or of the head's logits).
        `task` and `ensemble` work as in the decoder's `classify`.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        members = [task] if isinstance(task, str) or task is None else list(task)
        if ensemble is None:
            names = [task] * len(texts) if isinstance(task, str) or task is None else members
            if len(names) != len(texts):
                raise RequestError(f"{len(names)} tasks for {len(texts)} inputs; give one task, or one per input")
            results: list[dict] = [{} for _ in texts]
            for name in dict.fromkeys(names):  # rows of one task share batches
                rows = [i for i, n in enumerate(names) if n == name]
                for i, result in zip(rows, self._scores([texts[i] for i in rows], name)):
                    results[i] = result
            return results
        members = ensemble_members(task, ensemble)
        per_member = [self._scores(texts, name) for name in members]
        labels = list(per_member[0][0]["scores"])
        return [ensemble_result(labels, members, np.array([[m[i]["scores"][label] for label in labels] for m in per_member]),
                                ensemble) for i in range(len(texts))]

    # ---- internals --------------------------------------------------------------------------

    def _scores(self, texts: list[str], task: str | None) -> list[dict]:
        found = self._resolve([task])[0]
        if found is None or not found.spec.labels:
            raise RequestError(f"classify needs a classification task; {task!r} has no labels")
        labels = list(found.spec.labels)
        head = found.head
        if head is not None and head.pooling == "pooler":  # PEFT sequence classification: the pooler output
            if not self._pooler:
                raise RequestError(f"task {task!r} classifies the pooler output; this export has none "
                                   "(re-export the model with this version of export-model)")
            ids = [self.backbone.encode(found.spec.apply(text)) for text in texts]
            pooled = np.concatenate([self._run(ids[i : i + 32], [found] * len(ids[i : i + 32]))[1]
                                     for i in range(0, len(ids), 32)])
            logits = pooled @ head.weight.T + head.bias
        elif head is not None:  # a trained linear classifier on the pooled embedding
            logits = self.embed(texts, task) @ head.weight.T + head.bias
        else:
            vectors = self.embed(texts, task)  # the nearest label embedding, labels embedded without a prompt
            logits = SIMILARITY_SCALE * (vectors @ self.embed([found.spec.labels[label].strip() or label for label in labels]).T)
        probs = np.exp(log_softmax(logits.astype(np.float64)))
        return [{"label": labels[int(row.argmax())], "scores": dict(zip(labels, map(float, row)))} for row in probs]

    def _pooled(self, ids: list[list[int]], found: list[Task | None]) -> np.ndarray:
        """Each row's pooled last hidden state over its text tokens: [B, E]."""
        return self._run(ids, found)[0]

    def _run(self, ids: list[list[int]], found: list[Task | None]) -> tuple[np.ndarray, np.ndarray | None]:
        """One graph call on right-padded rows: (pooled over each row's text tokens [B, E], pooler output [B, E] or None)."""
        limit = self.config.max_positions
        rows, spans = [], []
        for i, (row_ids, task) in enumerate(zip(ids, found)):
            prompt = None if task is None else task.vectors
            start = 0 if prompt is None else prompt.shape[0]
            if not row_ids:
                raise RequestError(f"input {i} has no tokens")
            if limit is not None and start + len(row_ids) > limit:
                raise RequestError(f"input {i} needs {start} prompt + {len(row_ids)} input = {start + len(row_ids)} "
                                   f"positions; the model has {limit}")
            rows.append(embed_row(self.table, row_ids, prompt))
            spans.append((start, start + len(row_ids)))
        length = max(r.shape[0] for r in rows)
        embeds = np.zeros((len(rows), length, self.table.shape[1]), dtype=np.float32)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):  # right padding, as encoders are trained
            embeds[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = 1
        feeds = {"inputs_embeds": embeds, "attention_mask": mask}
        if self._token_types:
            feeds["token_type_ids"] = np.zeros_like(mask)
        try:
            outputs = self.session.run(self._outputs, feeds)
        except Exception as exc:  # onnxruntime raises its own types
            raise InferenceError(f"onnxruntime failed with inputs_embeds {embeds.shape}: {exc}") from exc
        pooled = pool(outputs[0], spans, self.config.pooling or "mean")
        return pooled, (outputs[1] if self._pooler else None)


def pool(hidden: np.ndarray, spans: list[tuple[int, int]], mode: str) -> np.ndarray:
    """[B, E] from hidden [B, T, E] over each row's text span [a, b): the prompt rows never count."""
    if mode == "mean":
        rows = [hidden[i, a:b].mean(axis=0) for i, (a, b) in enumerate(spans)]
    elif mode == "max":
        rows = [hidden[i, a:b].max(axis=0) for i, (a, b) in enumerate(spans)]
    elif mode == "cls":
        rows = [hidden[i, a] for i, (a, _) in enumerate(spans)]
    elif mode == "lasttoken":
        rows = [hidden[i, b - 1] for i, (_, b) in enumerate(spans)]
    else:
        raise ValueError(f"pooling {mode!r}")
    return np.stack(rows).astype(np.float32)

