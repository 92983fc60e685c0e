"""Building the model's first-step inputs: soft prompt + token embeddings, left-padded into one batch.

Kept as pure functions over arrays so that training (which must build the very same
`inputs_embeds`) and tests can call them without a session.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def embed_row(table: np.ndarray, ids: Sequence[int], prompt: np.ndarray | None) -> np.ndarray:
    """[P + n, E] float32: the task's prompt rows, then the embeddings of `ids` from the table."""
    tokens = np.asarray(table[np.asarray(ids, dtype=np.int64)], dtype=np.float32)
    if prompt is None:
        return tokens
    return np.concatenate([np.asarray(prompt, dtype=np.float32), tokens], axis=0)


def left_pad(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack [T_i, E] rows into [B, T, E] with padding on the left, and the [B, T] int64 mask."""
    width = rows[0].shape[1]
    length = max(row.shape[0] for row in rows)
    embeds = np.zeros((len(rows), length, width), dtype=np.float32)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        embeds[i, length - row.shape[0] :] = row
        mask[i, length - row.shape[0] :] = 1
    return embeds, mask


def position_ids(mask: np.ndarray, past_length: int = 0) -> np.ndarray:
    """Positions counted over real tokens only, so a left-padded row sees 0, 1, 2, ... like alone.

    `mask` covers past and new tokens; the result covers the new ones (its last columns).
    Padding gets position 1, as transformers does, which the mask makes irrelevant.
    """
    positions = np.cumsum(mask, axis=-1) - 1
    positions = np.where(mask == 0, 1, positions)
    return positions[:, past_length:].astype(np.int64)
