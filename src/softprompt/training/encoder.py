"""Prompt tuning for encoders (BERT, MiniLM, ...): the encoder stays frozen; the prompt (and optionally a
linear head) learns to put each input's pooled embedding nearest to its label.

Labels are anchored by the frozen encoder itself: each label's verbalizer text (without a prompt)
is embedded once, and the loss is the cross-entropy of the softmax over labels of
20 x cosine(input embedding under the prompt, label embedding), the runtime's own scoring
(runtime/encoder.py). With `head=True` a [labels, E] linear layer on the pooled embedding is
trained with the prompt and stored in the task, the way PEFT keeps a classifier for sequence
classification; the runtime then scores with it.

Rows are built as the runtime builds them: prompt rows, then the word embeddings of
[CLS] templated text [SEP], right-padded; the pooled embedding is the mean over the text's tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from softprompt.formats.task import TaskSpec
from softprompt.runtime.encoder import SIMILARITY_SCALE

from .data import Dataset
from .errors import TrainingError
from .train import (
    FrozenModel,
    TrainConfig,
    _better,
    _optimizer,
    _progress,
    shuffled_batches,
    starting_prompt,
    training_record,
)


def pooled(model, prompt: torch.Tensor, rows: list[list[int]], mode: str = "mean") -> torch.Tensor:
    """[B, E] L2-normalised pooling (the export's `pooling`) of the last hidden states over each row's
    tokens (not the prompt rows), as the runtime's `pool`."""
    embed = model.get_input_embeddings()
    length = max(len(r) for r in rows) + prompt.shape[0]
    embeds = prompt.new_zeros((len(rows), length, prompt.shape[1]))
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    weights = torch.zeros((len(rows), length, 1))
    p = prompt.shape[0]
    for i, ids in enumerate(rows):
        embeds[i, : p + len(ids)] = torch.cat([prompt, embed(torch.tensor(ids, dtype=torch.long))])
        mask[i, : p + len(ids)] = 1
        weights[i, p : p + len(ids)] = 1.0
    hidden = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    if mode == "mean":
        vectors = (hidden * weights).sum(1) / weights.sum(1)
    elif mode == "max":
        vectors = hidden.masked_fill(weights == 0, float("-inf")).amax(1)
    elif mode == "cls":
        vectors = hidden[:, p]
    elif mode == "lasttoken":
        vectors = hidden[torch.arange(len(rows)), torch.tensor([p + len(ids) - 1 for ids in rows])]
    else:
        raise ValueError(f"pooling {mode!r}")
    return torch.nn.functional.normalize(vectors, dim=-1)


def label_logits(vectors: torch.Tensor, anchors: torch.Tensor, head: torch.nn.Linear | None) -> torch.Tensor:
    return head(vectors) if head is not None else SIMILARITY_SCALE * vectors @ anchors.T


def train_encoder_prompt(
    backbone: FrozenModel,
    train: Dataset,
    spec: TaskSpec,
    config: TrainConfig,
    *,
    eval_data: Dataset | None = None,
    head: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[np.ndarray, dict, dict | None]:
    """Return (best prompt [P, E], training record, head {"weight", "bias"} or None)."""
    if train.kind != "classification":
        raise TrainingError(f"{train.path}: encoder tasks are classification tasks; got {train.kind} data")
    if config.precision != "fp32":
        raise TrainingError(f"--precision {config.precision} trains decoder prompts; train an encoder's prompt at fp32")
    if spec.slots:
        raise TrainingError(f"--template {spec.template!r} places vectors with slots; patterns train decoder prompts only")
    if config.method != "prompt":
        raise TrainingError(f"--method {config.method} trains decoder tasks; an encoder's task is a prompt (--method prompt)")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = backbone.model
    frozen = sum(p.numel() for p in model.parameters())
    labels = list(spec.labels)
    start = starting_prompt(backbone, spec, config, rng)
    prompt = torch.nn.Parameter(torch.from_numpy(start.copy()))
    linear = torch.nn.Linear(prompt.shape[1], len(labels)) if head else None
    params = [prompt, *(linear.parameters() if linear else [])]
    trainable = sum(p.numel() for p in params)
    log(
        f"trainable parameters: {trainable:,} (prompt {config.length} x {prompt.shape[1]}"
        f"{f' + head {len(labels)} x {prompt.shape[1]} + {len(labels)}' if linear else ''}); frozen: {frozen:,}"
    )
    limit = backbone.max_positions

    def encode(data: Dataset) -> tuple[list[list[int]], list[int]]:
        rows, targets = [], []
        for number, example in enumerate(data.examples, 1):
            ids = backbone.encode(spec.apply(example.text))
            if limit is not None and config.length + len(ids) > limit:
                raise TrainingError(
                    f"{data.path}:{number}: {config.length} prompt + {len(ids)} tokens exceed the model's {limit} positions"
                )
            rows.append(ids)
            targets.append(labels.index(example.target))
        return rows, targets

    rows, targets = encode(train)
    eval_rows, eval_targets = encode(eval_data) if eval_data else (None, None)
    with torch.no_grad():
        anchors = pooled(
            model,
            prompt.new_zeros((0, prompt.shape[1])),
            [backbone.encode(spec.labels[label].strip() or label) for label in labels],
            backbone.pooling,
        )

    def accuracy() -> dict:
        with torch.no_grad():
            hits = 0
            for i in range(0, len(eval_rows), 32):
                logits = label_logits(pooled(model, prompt, eval_rows[i : i + 32], backbone.pooling), anchors, linear)
                hits += int((logits.argmax(1) == torch.tensor(eval_targets[i : i + 32])).sum())
            return {"accuracy": hits / len(eval_rows)}

    total = config.steps or max(1, round(config.epochs * math.ceil(len(rows) / config.batch_size)))
    optimizer = _optimizer(config, params)
    batches = shuffled_batches(len(rows), config.batch_size, rng)
    best, best_head, best_metric, history = prompt.detach().clone(), _head_state(linear, labels), None, []
    started, step, interrupted = time.perf_counter(), 0, False
    bar = _progress(total, progress)
    try:
        for step in range(1, total + 1):
            picked = next(batches)
            logits = label_logits(pooled(model, prompt, [rows[i] for i in picked], backbone.pooling), anchors, linear)
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([targets[i] for i in picked]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            postfix = {"loss": f"{loss.item():.3f}"}
            if eval_rows and (step % config.eval_every == 0 or step == total):
                metric = accuracy()
                history.append({"step": step, **metric})
                if _better(metric, best_metric):
                    best_metric, best, best_head = {"step": step, **metric}, prompt.detach().clone(), _head_state(linear, labels)
                postfix["accuracy"] = f"{metric['accuracy']:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)
    except KeyboardInterrupt:
        interrupted, step = True, step - 1
        log(f"\ninterrupted after {step} steps; keeping the best prompt so far")
    finally:
        bar.close()
    if not eval_rows:
        best, best_head = prompt.detach().clone(), _head_state(linear, labels)
    record = training_record(
        train,
        eval_data,
        config,
        examples=len(rows),
        steps=step,
        best=best_metric,
        history=history,
        trainable=trainable,
        frozen=frozen,
        started=started,
        interrupted=interrupted,
        objective="linear head" if linear else f"nearest label embedding (cosine x {SIMILARITY_SCALE:g})",
    )
    return best.numpy().astype(np.float32), record, best_head


def _head_state(linear: torch.nn.Linear | None, labels: list[str]) -> dict | None:
    """The head as stored in the task: rows named by label (the record's label order may change on saving)."""
    if linear is None:
        return None
    return {"labels": labels, "weight": linear.weight.detach().tolist(), "bias": linear.bias.detach().tolist()}
