"""A bank's task from a PEFT adapter, and a PEFT adapter from a bank's task: what `prompt-bank import-peft` and
`export-peft` do, as functions (peft.py reads and writes the adapter files themselves).

Both check the adapter against the export it is for (width, layers, key/value heads, fingerprint),
so a task never reaches a bank for a backbone it does not fit, and never leaves as an adapter that
PEFT would apply differently from this runtime (a P-tuning pattern, an encoder prefix).

>>> meta = import_peft("out/peft_adapter", "banks/mine", "sentiment", "exports/smollm2")   # doctest: +SKIP
>>> export_peft("banks/mine", "sentiment", "out/again", export_dir="exports/smollm2")     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from softprompt.formats.bank import PromptMeta, load_prompt, save_prefix, save_prompt
from softprompt.formats.errors import BackboneMismatchError, PromptBankError
from softprompt.formats.export_folder import ExportConfig, read_config
from softprompt.formats.task import PLACEHOLDER, TaskSpec

from .peft import PREFIX_TYPE, PeftPrompt, adapter_init, prefix_keys_values, read_peft_adapter, write_peft_adapter

PROMPT_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "num_virtual_tokens", "encoder_reparameterization_type")
PREFIX_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "num_virtual_tokens", "prefix_projection")


def import_peft(
    adapter_dir: str | Path,
    bank_dir: str | Path,
    task: str,
    export_dir: str | Path,
    *,
    template: str | None = None,
    verbalizers: Mapping[str, str] | None = None,
    labels: Sequence[str] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> PromptMeta:
    """Save a PEFT prompt-tuning, P-tuning or prefix-tuning adapter as task `task`, for the export it was trained for.

    `template` and `verbalizers` make it a templated or classification task. A sequence-classification
    adapter brings its own classifier: `labels` names its rows (default LABEL_0, LABEL_1, ...).
    """
    config = read_config(export_dir)
    adapter = read_peft_adapter(adapter_dir)
    where = Path(adapter_dir)
    if str(adapter.config.get("peft_type")).upper() == PREFIX_TYPE:
        if labels:
            raise PromptBankError(f"--labels is for sequence-classification adapters; {where} is a prefix-tuning adapter")
        return _import_prefix(adapter, where, bank_dir, task, config, Path(export_dir), template, verbalizers, dtype, overwrite)
    width = adapter.vectors.shape[1]
    if width != config.hidden_size:
        raise BackboneMismatchError(
            f"{adapter.weights_file}: prompt width E={width}; the export {export_dir} has width {config.hidden_size}"
        )
    extra: dict[str, Any] = {"peft": {k: adapter.config[k] for k in PROMPT_FIELDS if k in adapter.config}}
    if adapter.classifier is not None:
        if verbalizers:
            raise PromptBankError("--verbalizer: this adapter classifies with its own head; name its labels with --labels")
        extra.update(_classifier_task(adapter, config, where, Path(export_dir), labels))
    elif labels:
        raise PromptBankError(
            f"--labels is for sequence-classification adapters; {where} is a {adapter.config.get('task_type')} adapter"
        )
    extra.update(task_spec(template, verbalizers, keep_labels=extra.get("labels")))
    return save_prompt(
        bank_dir,
        task,
        adapter.vectors,
        fingerprint=config.fingerprint,
        dtype=dtype,
        overwrite=overwrite,
        init=adapter_init(adapter.config),
        source=f"peft:{where.resolve()}",
        extra=extra,
    )


def _import_prefix(
    adapter: PeftPrompt,
    where: Path,
    bank_dir: str | Path,
    task: str,
    config: ExportConfig,
    export_dir: Path,
    template: str | None,
    verbalizers: Mapping[str, str] | None,
    dtype: str,
    overwrite: bool,
) -> PromptMeta:
    """A PREFIX_TUNING adapter as a prefix task: keys and values for the export's cache, checked against it."""
    cache = config.prefix_cache
    if cache is None:
        raise BackboneMismatchError(
            f"{where} is a prefix-tuning adapter; the export {export_dir} is a {config.kind} export, and prefix "
            "tasks serve decoder and encoder-decoder exports"
        )
    submodules = adapter.config.get("num_transformer_submodules", 1)
    expected = 2 if config.kind == "seq2seq" else 1
    if submodules != expected:
        made = "an encoder-decoder" if submodules == 2 else "a decoder-only model"
        raise BackboneMismatchError(
            f"{where}: a prefix for {made} (num_transformer_submodules {submodules}); the export {export_dir} is "
            f"a {config.kind} export (expected {expected})"
        )
    layers, kv_heads, head_size = cache[:3]
    keys_values = prefix_keys_values(adapter.vectors, layers, kv_heads, head_size, str(adapter.weights_file), submodules)
    return save_prefix(
        bank_dir,
        task,
        keys_values,
        fingerprint=config.fingerprint,
        dtype=dtype,
        overwrite=overwrite,
        init=adapter_init(adapter.config),
        source=f"peft:{where.resolve()}",
        extra={"peft": {k: adapter.config[k] for k in PREFIX_FIELDS if k in adapter.config}, **task_spec(template, verbalizers)},
    )


def task_spec(template: str | None, verbalizers: Mapping[str, str] | None, keep_labels: dict | None = None) -> dict:
    """A template and verbalizers as a record's `extra` (nothing when neither is given)."""
    if template is None and not verbalizers:
        return {}
    return TaskSpec(template=template or PLACEHOLDER, labels=dict(verbalizers or keep_labels or {})).to_extra()


def _classifier_task(adapter: PeftPrompt, config: ExportConfig, where: Path, export_dir: Path, labels) -> dict:
    """Labels and head of a PEFT sequence-classification adapter: its classifier reads the pooler output."""
    assert adapter.classifier is not None
    weight, bias = adapter.classifier["weight"], adapter.classifier["bias"]
    if config.kind != "encoder" or "pooler_output" not in config.output_names:
        raise BackboneMismatchError(
            f"{where} classifies an encoder's pooler output; the export {export_dir} "
            f"is a {config.kind} export without one (export the encoder with this version)"
        )
    if weight.shape[1] != config.hidden_size:
        raise BackboneMismatchError(
            f"{adapter.weights_file}: classifier width {weight.shape[1]}; the export has width {config.hidden_size}"
        )
    names = [name.strip() for name in labels] if labels else [f"LABEL_{i}" for i in range(len(bias))]
    if len(names) != len(bias) or len(set(names)) != len(names) or not all(names):
        raise PromptBankError(
            f"--labels {','.join(labels or [])!r}: {len(names)} names for a classifier of {len(bias)} "
            "labels; give one distinct name per label, in the classifier's order"
        )
    return {
        "labels": {label: label for label in names},
        "head": {"labels": names, "weight": weight.tolist(), "bias": bias.tolist(), "pooling": "pooler"},
    }


@dataclasses.dataclass(frozen=True)
class ExportedAdapter:
    """What `export_peft` wrote, and what of the task PEFT has no place for (its template, its labels)."""

    folder: Path
    prefix: bool
    length: int
    width: int
    dropped: tuple[str, ...]


def export_peft(bank_dir: str | Path, task: str, out_dir: str | Path, *, export_dir: str | Path | None = None) -> ExportedAdapter:
    """Write task `task` as a PEFT prompt-tuning (or prefix-tuning) adapter that `PeftModel.from_pretrained` loads.

    With `export_dir`, the task's fingerprint is checked against it and the adapter records its layer
    and head counts and its base model (the folder transformers loads offline)."""
    layers = heads = 0
    base = None
    fingerprint = None
    task_type = "CAUSAL_LM"
    if export_dir is not None:
        config = read_config(export_dir)
        layers, heads, fingerprint = config.num_layers, config.num_heads, config.fingerprint
        # A folder transformers can load offline (a GGUF's converted one) before a name it would look up on a hub.
        base = config.source.get("folder") or config.source.get("path") or config.source.get("name")
        task_type = {"encoder": "FEATURE_EXTRACTION", "seq2seq": "SEQ_2_SEQ_LM"}.get(config.kind, "CAUSAL_LM")
    prompt = load_prompt(bank_dir, task, fingerprint=fingerprint)
    spec = TaskSpec.from_extra(prompt.meta.extra)
    if spec.lead is not None and spec.lead < prompt.meta.length:
        raise PromptBankError(
            f"task {task!r}: its template {spec.template!r} places vectors after the text (a P-tuning pattern); "
            "a PEFT adapter prepends every vector, so it would be another task"
        )
    if prompt.meta.parts is not None:
        raise PromptBankError(
            f"task {task!r}: a prefix for the encoder and the cross-attention as well ({prompt.meta.parts}); PEFT's "
            "seq2seq prefix tuning reaches the decoder's self-attention only, so it would be another task"
        )
    write_peft_adapter(
        out_dir,
        prompt.vectors.astype(np.float32),
        num_layers=layers,
        num_attention_heads=heads,
        base_model=base,
        task_type=task_type,
    )
    dropped = tuple(k for k in ("template", "labels") if prompt.meta.extra.get(k) not in (None, {}, PLACEHOLDER))
    return ExportedAdapter(Path(out_dir), prompt.is_prefix, prompt.meta.length, prompt.meta.width, dropped)
