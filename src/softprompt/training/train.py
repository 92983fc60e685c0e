"""Prompt tuning (Lester et al. 2021): learn a task's [P, E] soft prompt with every backbone weight frozen.

The result is saved in the numpy-only bank format (softprompt.formats) with the fingerprint that the same model's export carries. Rows are
built exactly as the runtime builds them: prompt rows, then the embedding-table rows of the
templated input's ids, left-padded, positions counted over real tokens.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from softprompt.exporter.backbone import describe
from softprompt.exporter.sources import export_fingerprint, load_source
from softprompt.formats.bank import PromptMeta, save_prefix, save_prompt
from softprompt.formats.fingerprint import short
from softprompt.formats.task import TaskSpec
from softprompt.runtime.classify import label_logprobs

from .checkpointing import enable_checkpointing
from .data import Dataset
from .errors import TrainingError
from .init import common_token_ids, init_prompt
from .methods import (
    ENCODERS,
    METHODS,
    PrefixEncoder,
    Prompt,
    PromptEncoder,
    parameter_count,
    prefix_cache,
    prompt_keys_values,
)
from .quantized import quantize_backbone
from .rows import embed_ids
from .seq2seq import prefix_parts, seq2seq_label_logprobs, seq2seq_loss_sum, seq2seq_prefix_start


@dataclasses.dataclass
class TrainConfig:
    length: int = 20
    init: str = "labels"
    optimizer: str = "adamw"
    lr: float = 3e-2
    batch_size: int = 8
    steps: int | None = None
    epochs: float = 1.0
    eval_every: int = 50
    seed: int = 0
    checkpoint_every: int = 2
    precision: str = "fp32"  # int8/int4: train through the weights that export runs (quantized.py)
    method: str = "prompt"  # or "prefix", "p-tuning" (methods.py)
    encoder: str = "mlp"  # p-tuning's prompt encoder: "mlp" or "lstm"
    encoder_hidden: int | None = None  # the encoders' hidden width (default: what they output per position)
    # An encoder-decoder's prefix: "all" (encoder, decoder and cross-attention, Li and Liang) or "decoder" (PEFT's).
    prefix_parts: str = "all"


@dataclasses.dataclass
class FrozenModel:
    """The frozen model and what training needs of it."""

    model: torch.nn.Module
    tokenizer: Tokenizer  # the very tokenizer the export writes as tokenizer.json
    table: np.ndarray
    fingerprint: str
    max_positions: int | None
    eos_ids: list[int]
    kind: str = "decoder"  # "seq2seq" (train_seq2seq.py), or "encoder" (train_encoder.py trains those)
    pooling: str = "mean"  # encoders: how sentence embeddings are pooled, as the export records it

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def load_backbone(model_spec: str, log: Callable[[str], None] = print) -> FrozenModel:
    """Load MODEL as export-model does and freeze it; compute the same fingerprint its export gets."""
    source = load_source(model_spec, log=log)  # an export folder: the model it was exported from
    backbone = describe(source)
    exported = export_fingerprint(model_spec)
    if exported is not None and backbone.fingerprint != exported:
        raise TrainingError(
            f"{model_spec} was exported from {source.info.get('path') or source.info.get('gguf') or source.info.get('name')}, "
            f"which has changed since (its fingerprint is {short(backbone.fingerprint)}, the export's {short(exported)}): "
            "a prompt trained on it would not fit the export; export it again"
        )
    tokenizer = Tokenizer.from_str(source.tokenizer.backend_tokenizer.to_str())  # the tokenizer.json the export writes
    tokenizer.no_truncation()
    tokenizer.no_padding()
    if backbone.fields.get("max_seq_length"):  # encoders: texts cut as the runtime (and sentence-transformers) cut them
        tokenizer.enable_truncation(backbone.fields["max_seq_length"])
    return FrozenModel(
        backbone.model,
        tokenizer,
        backbone.table,
        backbone.fingerprint,
        backbone.facts["max_positions"],
        backbone.tokens["eos_token_ids"] if backbone.kind != "encoder" else [],
        backbone.kind,
        backbone.fields.get("pooling", "mean"),
    )


def build_inputs_embeds(model, prompt: torch.Tensor, rows: Sequence[Sequence[int]], lead: int | None = None):
    """Left-padded [B, P + T, E] embeddings, mask and positions: the runtime's construction, in torch.

    With `lead` (a template with slots, `TaskSpec.lead`), only the first `lead` vectors go in front and a
    row's negative ids -k take vector lead + k - 1, where the pattern places it (runtime.rows.embed_row)."""
    embed = model.get_input_embeddings()
    front, inner = (prompt, prompt[:0]) if lead is None else (prompt[:lead], prompt[lead:])
    length = max(len(r) for r in rows) + front.shape[0]
    batch = len(rows)
    embeds = prompt.new_zeros((batch, length, prompt.shape[1]))
    mask = torch.zeros((batch, length), dtype=torch.long)
    for i, ids in enumerate(rows):
        start = length - len(ids) - front.shape[0]
        embeds[i, start:] = torch.cat([front, embed_ids(embed, ids, inner)])
        mask[i, start:] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return embeds, mask, positions


def _forward_tail(model, prompt, rows, keep: int, lead: int | None = None) -> torch.Tensor:
    """Logits of the last `keep` positions only: that is where every row's targets are. `prompt` is [P, E] vectors
    before the input, or a prefix, [2 * layers, kv_heads, P, head_size], which every row attends to as its past."""
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    if prompt.ndim == 4:
        embeds, mask, positions = build_inputs_embeds(model, prompt.new_zeros((0, model.config.hidden_size)), rows)
        past = prompt.shape[2]
        mask = torch.cat([torch.ones((len(rows), past), dtype=mask.dtype), mask], dim=1)  # the runtime's layout
        positions = ((mask.cumsum(-1) - 1).masked_fill(mask == 0, 1))[:, past:]
        cache = prefix_cache(model, prompt, len(rows))
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache, **kwargs)
        return out.logits[:, -keep:]
    embeds, mask, positions = build_inputs_embeds(model, prompt, rows, lead)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs).logits
    return logits[:, -keep:]


def encode_examples(
    backbone: FrozenModel, data: Dataset, spec: TaskSpec, prompt_length: int
) -> list[tuple[list[int], list[int]]]:
    """(templated input ids, target ids) per example; targets are the verbalizer or output (+ end of sequence)."""
    verbalizers = spec.verbalizer_ids(backbone.encode)
    pairs = []
    for number, example in enumerate(data.examples, 1):
        ids = spec.encode(example.text, backbone.encode)
        if data.kind == "classification":
            target = verbalizers[example.target]
        else:
            target = backbone.encode(example.target, add_special_tokens=False) + backbone.eos_ids[:1]
        # An encoder-decoder's target goes to the decoder: only prompt and input share the encoder's positions.
        lead = spec.lead if spec.lead is not None else prompt_length  # (a pattern's other vectors are among the ids)
        total = lead + len(ids) + (0 if backbone.kind == "seq2seq" else len(target))
        if backbone.max_positions is not None and total > backbone.max_positions:
            what = "" if backbone.kind == "seq2seq" else f" + {len(target)} target"
            raise TrainingError(
                f"{data.path} example {number}: {lead} prompt + {len(ids)} input{what} = "
                f"{total} positions; the model has {backbone.max_positions}"
            )
        pairs.append((ids, target))
    return pairs


def shuffled_batches(count: int, batch_size: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless batches of example indices, a fresh permutation each epoch (a batch may span two)."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += rng.permutation(count).tolist()
        yield order[:batch_size]
        del order[:batch_size]


def target_loss_sum(model, prompt, pairs, lead: int | None = None) -> torch.Tensor:
    """Summed cross-entropy over the target tokens only (the input and prompt are context)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return seq2seq_loss_sum(model, prompt, pairs, lead)
    rows = [ids + target for ids, target in pairs]
    keep = max(len(t) for _, t in pairs) + 1
    logits = _forward_tail(model, prompt, rows, keep, lead)
    losses = []
    for i, (_, target) in enumerate(pairs):
        k = len(target)
        predicted = logits[i, keep - k - 1 : keep - 1]  # the logits one position before each target token
        losses.append(torch.nn.functional.cross_entropy(predicted, torch.tensor(target), reduction="sum"))
    return torch.stack(losses).sum()


def batch_loss(model, prompt, pairs, lead: int | None = None) -> torch.Tensor:
    """Mean cross-entropy per target token over the batch."""
    return target_loss_sum(model, prompt, pairs, lead) / sum(len(t) for _, t in pairs)


def evaluate(model, prompt, pairs, data: Dataset, spec: TaskSpec, backbone: FrozenModel) -> dict:
    """Accuracy by the runtime's own scoring for classification; mean target loss for generation."""
    lead = spec.lead
    with torch.no_grad():
        if data.kind == "generation":
            total = sum(float(target_loss_sum(model, prompt, pairs[i : i + 8], lead)) for i in range(0, len(pairs), 8))
            return {"loss": total / sum(len(t) for _, t in pairs)}
        by_label = spec.verbalizer_ids(backbone.encode)
        labels, verbalizers = list(by_label), list(by_label.values())
        keep = max(len(v) for v in verbalizers) + 1

        def run_rows(rows, owners):
            return _forward_tail(model, prompt, rows, keep, lead).float().numpy()

        if backbone.kind == "seq2seq":
            scores = seq2seq_label_logprobs(model, prompt, [ids for ids, _ in pairs], verbalizers, lead=lead)
        else:
            scores = np.stack(label_logprobs(run_rows, [ids for ids, _ in pairs], [verbalizers] * len(pairs)))
        predicted = [labels[i] for i in scores.argmax(1)]
        return {"accuracy": float(np.mean([p == e.target for p, e in zip(predicted, data.examples)]))}


def train_prompt(
    backbone: FrozenModel,
    train: Dataset,
    spec: TaskSpec,
    config: TrainConfig,
    *,
    eval_data: Dataset | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[np.ndarray, dict]:
    """Train and return (the best prompt [P, E] float32, or prefix [2 * layers, kv_heads, P, head_size], and the
    training record). Ctrl-C stops and keeps the best so far.

    At `config.precision` int8 or int4 the backbone's weights are first replaced, in place, by those
    that precision's export runs."""
    if backbone.kind == "encoder":
        raise TrainingError(
            "train_prompt trains decoder and encoder-decoder prompts; encoders go through train_encoder.train_encoder_prompt"
        )
    check_method(config, spec, backbone.kind)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = backbone.model
    frozen = sum(p.numel() for p in model.parameters())
    if any(p.requires_grad for p in model.parameters()):
        raise TrainingError("the backbone has trainable parameters; prompt tuning keeps every backbone weight frozen")
    start_values = starting_prompt(backbone, spec, config, rng)
    quantization = quantize_backbone(backbone, config.precision)
    if config.precision != "fp32":
        log(f"training through the weights of a {config.precision} export ({_settings(quantization)})")
    source = trained_source(model, torch.from_numpy(start_values.copy()), config)
    enable_checkpointing(model, config.checkpoint_every)
    trainable = parameter_count(source)
    log(f"trainable parameters: {trainable:,} ({_described(source, config)}); frozen: {frozen:,}")
    pairs = encode_examples(backbone, train, spec, config.length)
    eval_pairs = encode_examples(backbone, eval_data, spec, config.length) if eval_data else None
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total_steps = config.steps or max(1, round(config.epochs * steps_per_epoch))
    optimizer = _optimizer(config, [p for p in source.parameters() if p.requires_grad])

    best = source().detach().clone()
    best_metric: dict | None = None
    history = []
    interrupted = False
    started = time.perf_counter()
    batches = shuffled_batches(len(pairs), config.batch_size, rng)
    bar = _progress(total_steps, progress)
    step = 0
    try:
        for step in range(1, total_steps + 1):
            loss = batch_loss(model, source(), [pairs[i] for i in next(batches)], spec.lead)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            postfix = {"loss": f"{loss.detach().item():.3f}"}
            if eval_pairs and (step % config.eval_every == 0 or step == total_steps):
                with torch.no_grad():
                    trained = source().detach()
                metric = evaluate(model, trained, eval_pairs, eval_data, spec, backbone)
                history.append({"step": step, **metric})
                if _better(metric, best_metric):
                    best_metric, best = {"step": step, **metric}, trained.clone()
                postfix.update({k: f"{v:.3f}" for k, v in metric.items()})
            bar.set_postfix(postfix)
            bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
        step -= 1
        log(f"\ninterrupted after {step} steps; keeping the best prompt so far")
    finally:
        bar.close()
    if not eval_pairs:
        best = source().detach().clone()
    record = training_record(
        train,
        eval_data,
        config,
        examples=len(pairs),
        steps=step,
        best=best_metric,
        history=history,
        trainable=trainable,
        frozen=frozen,
        started=started,
        interrupted=interrupted,
        precision=quantization,
        method=_method_record(config),
    )
    return best.numpy().astype(np.float32), record


def check_method(config: TrainConfig, spec: TaskSpec, kind: str) -> None:
    """Refuse a method or pattern the model cannot take, before anything loads into it."""
    if config.method not in METHODS:
        raise TrainingError(f"--method {config.method!r}; expected one of {', '.join(METHODS)}")
    if config.prefix_parts not in ("all", "decoder"):
        raise TrainingError(f"--prefix-parts {config.prefix_parts!r}; expected all or decoder")
    if config.encoder not in ENCODERS:
        raise TrainingError(f"--encoder {config.encoder!r}; expected one of {', '.join(ENCODERS)}")
    if config.method == "prefix" and kind not in ("decoder", "seq2seq"):
        raise TrainingError(f"--method prefix trains decoder and encoder-decoder prefixes, not {kind} ones (no past to feed)")
    if config.method == "prefix" and spec.slots:
        raise TrainingError(f"--template {spec.template!r} has slots for vectors; a prefix has none to place")
    spec.check_length(config.length, "--template")
    if spec.slots and kind not in ("decoder", "seq2seq"):
        raise TrainingError(
            f"--template {spec.template!r} places vectors with slots; patterns train decoder and encoder-decoder prompts"
        )


def trained_source(model, start: torch.Tensor, config: TrainConfig) -> torch.nn.Module:
    """The module whose output is what `config.method` learns, starting from the [P, E] prompt `start`."""
    if config.method == "p-tuning":
        return PromptEncoder(start, config.encoder, config.encoder_hidden)
    if config.method == "prefix" and getattr(model.config, "is_encoder_decoder", False):
        return PrefixEncoder(seq2seq_prefix_start(model, start, config.prefix_parts), config.encoder_hidden)
    if config.method == "prefix":
        return PrefixEncoder(prompt_keys_values(model, start), config.encoder_hidden)
    return Prompt(start)


def _described(source: torch.nn.Module, config: TrainConfig) -> str:
    out = tuple(source().shape)
    if config.method == "prefix":
        return f"a prefix of {out[2]} positions for {out[0] // 2} layers, through an MLP"
    if config.method == "p-tuning":
        return f"prompt {out[0]} x {out[1]} through an {config.encoder.upper()} prompt encoder"
    return f"prompt {out[0]} x {out[1]}"


def _method_record(config: TrainConfig) -> dict:
    if config.method == "prompt":
        return {"name": "prompt"}
    record: dict = {"name": config.method, "encoder_hidden": config.encoder_hidden}
    if config.method == "prefix":
        record["parts"] = config.prefix_parts
    if config.method == "p-tuning":
        record["encoder"] = config.encoder
    return record


def starting_prompt(backbone: FrozenModel, spec: TaskSpec, config: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """The [P, E] prompt training starts from, by `config.init` (docs/TRAINING.md)."""
    return init_prompt(
        config.init,
        config.length,
        backbone.table,
        encode=lambda text: backbone.encode(text, add_special_tokens=False),
        common_ids=common_token_ids(backbone.tokenizer.to_str()),
        label_words=list(spec.labels.values()),
        fingerprint=backbone.fingerprint,
        rng=rng,
    )


def training_record(
    train: Dataset,
    eval_data: Dataset | None,
    config: TrainConfig,
    *,
    examples: int,
    steps: int,
    best: dict | None,
    history: list,
    trainable: int,
    frozen: int,
    started: float,
    interrupted: bool,
    **more,
) -> dict:
    """What a task's metadata says about how its prompt was trained (`training` in NAME.json)."""
    return {
        "data": str(train.path),
        "data_sha256": train.sha256,
        "examples": examples,
        "eval_data": str(eval_data.path) if eval_data else None,
        "eval_data_sha256": eval_data.sha256 if eval_data else None,
        "steps": steps,
        "batch_size": config.batch_size,
        "optimizer": config.optimizer,
        "lr": config.lr,
        "seed": config.seed,
        "init": config.init,
        "best": best,
        "history": history,
        **more,
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "interrupted": interrupted,
    }


def save_trained(
    bank: Path,
    task: str,
    vectors: np.ndarray,
    backbone: FrozenModel,
    spec: TaskSpec,
    record: dict,
    model_spec: str,
    overwrite: bool,
    head: dict | None = None,
) -> PromptMeta:
    extra = {**spec.to_extra(), **({"head": head} if head else {})}
    parts = {"parts": prefix_parts(backbone.model, vectors.shape[0])} if vectors.ndim == 4 and backbone.kind == "seq2seq" else {}
    save = save_prefix if vectors.ndim == 4 else save_prompt
    return save(
        bank,
        task,
        vectors,
        **parts,
        fingerprint=backbone.fingerprint,
        init=record["init"],
        source=f"train-prompt {model_spec}",
        training=record,
        extra=extra,
        overwrite=overwrite,
    )


def _settings(record: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in record.items() if k != "precision")


def _better(metric: dict, best: dict | None) -> bool:
    if best is None:
        return True
    if "accuracy" in metric:
        return metric["accuracy"] > best["accuracy"]
    return metric["loss"] < best["loss"]


def _optimizer(config: TrainConfig, params: list[torch.nn.Parameter]):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # As the prompt-tuning paper: a fixed learning rate, no parameter scaling.
        return Adafactor(params, lr=config.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    raise TrainingError(f"optimizer {config.optimizer!r}; expected adamw or adafactor")


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="step", disable=not enabled, dynamic_ncols=True)
