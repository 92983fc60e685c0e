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

from softprompt.formats.export_folder import ExportFolder

from .classify import classify_ensemble, classify_rows, ensemble_members, log_softmax
from .errors import InferenceError, RequestError
from .rows import as_texts, check_rows, embed_row, pad, tasks_for
from .served import ServedExport
from .tasks import Task, TaskRef

# Cosine similarities lie in [-1, 1]; scaled by this before the softmax over labels, as
# sentence-transformers scales them in its contrastive losses, so the scores read as probabilities.
SIMILARITY_SCALE = 20.0


class Encoder(ServedExport):
    """A loaded encoder export: `embed` and `classify`, optionally under task prompts."""

    def __init__(self, backbone: ExportFolder, session, bank: Path | None = None, batch_size: int = 32, truncate: bool = True):
        super().__init__(backbone, session, bank)
        self.batch_size = batch_size
        # As sentence-transformers: a text is cut to max_seq_length tokens, [SEP] kept (truncate=False refuses it).
        self.max_tokens = self.config.max_seq_length if truncate else None
        if self.max_tokens:
            backbone.tokenizer.enable_truncation(self.max_tokens)
        self._token_types = "token_type_ids" in self.config.input_names
        self._pooler = "pooler_output" in self.config.output_names
        self._outputs = ["last_hidden_state", "pooler_output"] if self._pooler else ["last_hidden_state"]

    def embed(
        self,
        texts: str | Sequence[str],
        task: TaskRef | Sequence[TaskRef] = None,
        normalize: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """[N, E] sentence embeddings of a list of texts, [E] of one text (as sentence-transformers' `encode`),
        under the task's prompt. Texts longer than the model's `max_seq_length` are cut to it, as
        sentence-transformers cuts them (`load(..., truncate=False)` refuses them instead)."""
        one = isinstance(texts, str)
        texts = as_texts(texts)
        found = self._store.resolve(tasks_for(task, len(texts)))
        vectors = self._embed(self._encode_rows(texts, found), found, normalize, batch_size or self.batch_size)
        return vectors[0] if one else vectors

    def classify(self, texts: str | Sequence[str], task, ensemble: str | None = None) -> list[dict]:
        """Label each text by the nearest label embedding (labels embedded without a prompt), or by
        the task's trained linear head when it has one.

        Scores are a softmax over the labels of cosine similarity x 20 (or of the head's logits).
        `task` and `ensemble` work as in the decoder's `classify`.
        """
        texts = as_texts(texts)
        if ensemble is None:
            return classify_rows(texts, self._store.resolve(tasks_for(task, len(texts))), self._probabilities)
        return classify_ensemble(texts, self._store.resolve(ensemble_members(task, ensemble)), ensemble, self._probabilities)

    # ---- internals --------------------------------------------------------------------------

    def _encode_rows(self, texts: Sequence[str], found: Sequence[Task | None]) -> list[list[int]]:
        """Token ids of each text, cut at max_seq_length by the tokenizer or, with truncate=False, refused past it."""
        rows = super()._encode_rows(texts, found)
        limit = self.config.max_seq_length
        if limit and not self.max_tokens:
            for i, ids in enumerate(rows):
                if len(ids) > limit:
                    raise RequestError(
                        f"input {i} has {len(ids)} tokens; the model was trained on at most {limit} "
                        "(load with truncate=True to cut it there, as sentence-transformers does)"
                    )
        return rows

    def _probabilities(self, texts: Sequence[str], found: Sequence[Task]) -> list[np.ndarray]:
        """Each row's label probabilities; rows of one task share batches."""
        out: list[np.ndarray] = [np.zeros(0)] * len(texts)
        for task in dict.fromkeys(found):
            rows = [i for i, t in enumerate(found) if t is task]
            for i, probs in zip(rows, self._task_probabilities([texts[i] for i in rows], task)):
                out[i] = probs
        return out

    def _task_probabilities(self, texts: list[str], task: Task) -> np.ndarray:
        labels = list(task.spec.labels)
        head = task.head
        ids = self._encode_rows(texts, [task] * len(texts))
        if head is not None and head.pooling == "pooler":  # PEFT sequence classification: the pooler output
            if not self._pooler:
                raise RequestError(
                    f"task {task.name!r} classifies the pooler output; this export has none "
                    "(re-export the model with this version of export-model)"
                )
            pooled = np.concatenate(
                [
                    self._run(ids[i : i + self.batch_size], [task] * len(ids[i : i + self.batch_size]))[1]
                    for i in range(0, len(ids), self.batch_size)
                ]
            )
            logits = pooled @ head.weight.T + head.bias
        elif head is not None:  # a trained linear classifier on the pooled embedding
            logits = self._embed(ids, [task] * len(ids), True, self.batch_size) @ head.weight.T + head.bias
        else:  # the nearest label embedding, labels embedded without a prompt
            vectors = self._embed(ids, [task] * len(ids), True, self.batch_size)
            logits = SIMILARITY_SCALE * (vectors @ self.embed([task.spec.labels[label].strip() or label for label in labels]).T)
        return np.exp(log_softmax(logits.astype(np.float64)))

    def _embed(self, ids: list[list[int]], found: list[Task | None], normalize: bool, batch_size: int) -> np.ndarray:
        out = np.concatenate(
            [self._run(ids[i : i + batch_size], found[i : i + batch_size])[0] for i in range(0, len(ids), batch_size)]
        )
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _run(self, ids: list[list[int]], found: list[Task | None]) -> tuple[np.ndarray, np.ndarray | None]:
        """One graph call on right-padded rows: (pooled over each row's text tokens [B, E], pooler output [B, E] or None)."""
        starts = [0 if task is None else task.length for task in found]
        check_rows(ids, starts, vocab_size=self.config.vocab_size, limit=self.config.max_positions, need_tokens=True)
        embeds, mask = pad([embed_row(self.table, row, None if t is None else t.vectors) for row, t in zip(ids, found)], "right")
        feeds = {"inputs_embeds": embeds, "attention_mask": mask}
        if self._token_types:
            feeds["token_type_ids"] = np.zeros_like(mask)
        try:
            outputs = self.session.run(self._outputs, feeds)
        except Exception as exc:  # onnxruntime raises its own types
            raise InferenceError(f"onnxruntime failed with inputs_embeds {embeds.shape}: {exc}") from exc
        spans = [(start, start + len(row)) for start, row in zip(starts, ids)]
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
