"""Token rows as embeddings, with a P-tuning pattern's slot vectors where a row's ids are negative.

Decoders and encoder-decoders build their inputs from the same rows (runtime.rows.embed_row is the
numpy twin the runtime uses), so a pattern is fed identically in training and serving.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def embed_ids(embed, ids: Sequence[int], inner: torch.Tensor) -> torch.Tensor:
    """Token embeddings of `ids`, with a pattern's slot vectors (`inner`) where the ids are negative."""
    if not ids:
        return inner.new_zeros((0, inner.shape[1]))
    index = torch.tensor(ids, dtype=torch.long)
    slots = index < 0
    tokens = embed(index.clamp(min=0)).to(inner.dtype)
    if not bool(slots.any()):
        return tokens
    return torch.where(slots[:, None], inner[(-index - 1).clamp(min=0, max=max(len(inner) - 1, 0))], tokens)
