"""`describe`: what an export records of a model, computed one way for export-model and train-prompt.

A prompt trained on a model must carry the fingerprint the model's export gets, so both read
the embedding table, the structural facts and the special tokens from here, for every kind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softprompt.formats.fingerprint import backbone_fingerprint

from .encoder import encoder_facts, encoder_tokens, sentence_max_length, sentence_pooling
from .graph import CacheLayout, probe_cache
from .metadata import embedding_table, special_tokens, structural
from .seq2seq import check_shared_embeddings, cross_layout, encoder_prefix_layers, generation_tokens, seq2seq_facts
from .sources import Source


@dataclasses.dataclass
class Backbone:
    """A loaded, frozen model and the `softprompt.json` fields that describe it (not its graphs)."""

    kind: str  # "decoder", "encoder" or "seq2seq"
    model: Any  # the frozen torch.nn.Module; None once an export released it (its checks' answers computed)
    table: np.ndarray  # [V, E] float32: the model's input-embedding module applied to every id
    facts: dict[str, Any]  # architecture and shapes: the fingerprint covers these and the table
    tokens: dict[str, Any]  # bos_token_id, eos_token_ids, pad_token_id
    fields: dict[str, Any]  # kind-specific softprompt.json fields: pooling, max_seq_length, generation
    layout: Any  # decoder: CacheLayout; seq2seq: (self, cross) shapes per layer and encoder prefix layers; encoder: None
    tokenizer: Any = None  # the transformers tokenizer the export writes as tokenizer.json
    weight_bytes: int = dataclasses.field(init=False)  # of the model's parameters, kept after the model is released

    def __post_init__(self) -> None:
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def fingerprint(self) -> str:
        return backbone_fingerprint(self.table, self.facts)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in evaluation mode with no parameter asking for gradients: a frozen backbone."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def describe(source: Source, table_path: Path | None = None) -> Backbone:
    """Freeze `source.model` and read everything an export of it records besides the graphs; with `table_path`, the
    embedding table is written there as it is made (a float32 .npy) and mapped from it (`embedding_table`)."""
    model = freeze(source.model)
    table = embedding_table(model, table_path)
    if source.kind == "encoder":
        folder = Path(source.info["path"]) if source.info.get("path") else None
        return Backbone(
            "encoder",
            model,
            table,
            encoder_facts(model, table),
            encoder_tokens(source.tokenizer),
            {"pooling": sentence_pooling(folder), "max_seq_length": sentence_max_length(folder)},
            None,
            source.tokenizer,
        )
    if source.kind == "seq2seq":
        check_shared_embeddings(model, table)
        self_shapes, cross_shapes = cross_layout(model)
        prefix_layers = encoder_prefix_layers(model, self_shapes, cross_shapes)
        tokens = generation_tokens(model, source.tokenizer)
        forced = {key: tokens.pop(key) for key in ("forced_bos_token_id", "forced_eos_token_id")}
        generation = {key: int(value) for key, value in forced.items() if value is not None}
        return Backbone(
            "seq2seq",
            model,
            table,
            seq2seq_facts(model, table, self_shapes),
            tokens,
            {"generation": generation, "encoder_prefix_layers": prefix_layers or None},
            (self_shapes, cross_shapes, prefix_layers),
            source.tokenizer,
        )
    layout: CacheLayout = probe_cache(model)
    return Backbone(
        "decoder",
        model,
        table,
        structural(model, layout, table),
        special_tokens(model, source.tokenizer),
        {},
        layout,
        source.tokenizer,
    )
