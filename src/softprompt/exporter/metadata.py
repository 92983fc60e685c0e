"""What an export records besides the graph: the embedding table and the facts in `softprompt.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .graph import CacheLayout

POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def embedding_table(model, path: Path | None = None, chunk: int = 4096) -> np.ndarray:
    """[V, E] float32: the model's own input-embedding module applied to every token id.

    Using the module's output (not its weight) captures scaling done inside it (Gemma's
    sqrt(E) factor, for one), so a prompt lives in the same space as the tokens it precedes.
    With `path`, the rows are written to a float32 .npy there as they are made and the table comes back mapped
    from it: a large vocabulary's table (Gemma-3-270m: 0.64 GB) is then never in memory whole beside the model.
    """
    module = model.get_input_embeddings()
    vocab = int(getattr(module, "num_embeddings", None) or module.weight.shape[0])

    def rows(start: int) -> np.ndarray:
        with torch.no_grad():
            return module(torch.arange(start, min(start + chunk, vocab)).unsqueeze(0))[0].float().numpy()

    first = rows(0)  # its width is the table's
    shape = (vocab, first.shape[-1])
    chunks = ((start, first if start == 0 else rows(start)) for start in range(0, vocab, chunk))
    if path is None:
        table = np.empty(shape, np.float32)  # filled in place: chunks kept for a concatenation stayed allocated after it
        for start, part in chunks:
            table[start : start + len(part)] = part
        return table
    with open(path, "wb") as file:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(file, header)
        for _, part in chunks:
            part.tofile(file)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def special_tokens(model, tokenizer) -> dict[str, Any]:
    """End-of-sequence ids from the generation config first (where chat models list several)."""
    generation = getattr(model, "generation_config", None)
    eos = (
        _as_list(getattr(generation, "eos_token_id", None))
        or _as_list(model.config.eos_token_id)
        or _as_list(tokenizer.eos_token_id)
    )
    pad = next(
        (
            v
            for v in (getattr(generation, "pad_token_id", None), tokenizer.pad_token_id, model.config.pad_token_id)
            if v is not None
        ),
        None,
    )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    return {"bos_token_id": bos, "eos_token_ids": eos, "pad_token_id": pad if pad is not None else (eos[0] if eos else None)}


def max_positions(config) -> int | None:
    for field in POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def structural(model, layout: CacheLayout, table: np.ndarray) -> dict[str, Any]:
    """The config fields the runtime and the fingerprint use."""
    config = model.config
    heads, head_size = layout.shapes[0]
    return {
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "hidden_size": int(table.shape[1]),
        "vocab_size": int(table.shape[0]),
        "num_layers": layout.num_layers,
        "num_heads": int(getattr(config, "num_attention_heads", heads)),
        "num_kv_heads": heads,
        "head_size": head_size,
        "max_positions": max_positions(config),
    }
