"""A decoder's running batch: the one decode loop, driven by `Model.complete` and friends (all rows admitted at once,
stepped until every row is done) and by the engine (engine.py: rows join and leave at every step). An
encoder-decoder's batch (seq2seq_batch.py) has the same three calls and the same rows.

The batch is the graph's own state: keys and values [B, heads, T, head size] for every layer, the
attention mask [B, T] and each row's next position. `admit` runs the new rows' first step together
(`Model.first_step`: a cached prompt or a prefix as their past, then their tokens), which gives each
its first token; their keys and values join the batch, left-padded with masked columns to the
batch's length (or the batch's to theirs). `step` feeds every row's last token in one graph call.
Each row chooses its next token with its own settings (temperature, seed, stops) and its own random
generator, so a row generates what it generates alone, whatever it is batched with; a row that is
done, or whose request was cancelled, leaves at once, and mask columns no row needs are cut off.
With a graph that can share its past and present (`shares_cache`), the keys and values live in
preallocated buffers that each step writes in place (shared_cache.py), laid out the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .engine import Job
from .generate import RowText
from .graph import numpy_value
from .rows import position_ids
from .sampling import chooser
from .shared_cache import SharedCache


class Row:
    """One request's row in the batch: its job, its text so far, its chooser, its next position and token."""

    def __init__(self, job: Job, model, choose: Callable[[np.ndarray], np.ndarray] | None = None):
        self.job = job
        self.state: RowText = model.row_text(job.task, job.settings)
        self.choose = choose or chooser(job.settings, set(model.config.eos_token_ids))
        self.position = 0  # the next token's position
        self.token = 0  # the last chosen token, fed at the next step

    def take(self, logits: np.ndarray) -> bool:
        """Choose from this row's logits [V]; tell the job; True when the row is done."""
        self.token = int(self.choose(logits[None])[0])
        self.state.add(self.token)
        self.job.on_step(self.state)
        if self.state.done:
            self.job.on_done(self.state)
        return self.state.done


class DecodeBatch:
    """The rows a decoder generates together, and the keys, values and mask they share."""

    def __init__(self, model):
        self.model = model
        self.rows: list[Row] = []
        self.past: list = []  # a growing past; empty when the cache is shared
        self.cache = SharedCache(model.graph) if model.graph.shares_cache else None
        self.mask = np.zeros((0, 0), dtype=np.int64)

    def admit(self, jobs: Sequence[Job]) -> list[Row]:
        """The jobs' first step, together (a bad input raises before anything runs); the rows not done at once join
        the batch. Returns every job's row, done or not, in the jobs' order."""
        longest = max(job.settings.max_new_tokens for job in jobs)
        embeds, mask, past = self.model.first_step(
            [job.ids for job in jobs], task=[job.task for job in jobs], max_new_tokens=longest
        )
        positions = position_ids(mask, mask.shape[1] - embeds.shape[1])
        logits, present = self.model.forward(embeds, mask, positions, past)
        rows = [Row(job, self.model) for job in jobs]
        finished = []
        for i, row in enumerate(rows):
            row.position = int(positions[i, -1]) + 1
            if row.take(logits[i]):
                finished.append(i)
        kept = _kept(rows, mask, finished)
        joined, present, mask = _drop(rows, present, mask, kept)
        if joined and self.cache is not None:
            self.cache.join(present, mask.shape[1], _remaining([*self.rows, *joined]))
            self.mask = _stack_masks(self.mask, mask) if self.rows else mask
        elif joined and self.rows:
            self.past, self.mask = _stack(self.past, self.mask, present, mask)
        elif joined:
            self.past, self.mask = present, mask
        self.rows += joined
        return rows

    def step(self) -> None:
        """One token for every row; rows that are done or cancelled leave."""
        rows = self.rows
        mask = np.concatenate([self.mask, np.ones((len(rows), 1), dtype=self.mask.dtype)], axis=1)
        positions = np.array([[row.position] for row in rows], dtype=np.int64)
        embeds = np.asarray(self.model.table[[row.token for row in rows]], dtype=np.float32)[:, None, :]
        if self.cache is not None:
            self.cache.reserve(mask.shape[1], _remaining(rows))
            logits, past = self.cache.step(embeds, mask, positions), []
        else:
            logits, past = self.model.forward(embeds, mask, positions, self.past)
        done = []
        for i, row in enumerate(rows):
            row.position += 1
            if row.job.cancelled or row.take(logits[i]):
                done.append(i)
        kept = _kept(rows, mask, done)
        if self.cache is not None and kept is not None:
            self.cache.keep(*kept)
        self.rows, self.past, self.mask = _drop(rows, past, mask, kept)

    def clear(self) -> list[Row]:
        """Empty the batch (after a failed step); returns the rows it held."""
        rows, self.rows, self.past, self.mask = self.rows, [], [], np.zeros((0, 0), dtype=np.int64)
        if self.cache is not None:
            self.cache = SharedCache(self.model.graph)
        return rows


def _remaining(rows: Sequence[Row]) -> int:
    """The most steps any of `rows` may still take: how much room a shared cache reserves."""
    return max((row.job.settings.max_new_tokens - len(row.state.ids) for row in rows), default=1)


def _numpy(values: Sequence) -> list[np.ndarray]:
    return [numpy_value(value) for value in values]


def _left_pad(values: np.ndarray, axis: int, width: int) -> np.ndarray:
    if width == 0:
        return values
    shape = list(values.shape)
    shape[axis] = width
    return np.concatenate([np.zeros(shape, dtype=values.dtype), values], axis=axis)


def _stack_masks(mask: np.ndarray, other: np.ndarray) -> np.ndarray:
    length = max(mask.shape[1], other.shape[1])
    return np.concatenate([_left_pad(mask, 1, length - mask.shape[1]), _left_pad(other, 1, length - other.shape[1])], axis=0)


def _stack(past: list, mask: np.ndarray, other: list, other_mask: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Two batches' keys, values and masks as one, the shorter left-padded with masked columns."""
    length = max(mask.shape[1], other_mask.shape[1])
    joined = [
        np.concatenate([_left_pad(a, 2, length - a.shape[2]), _left_pad(b, 2, length - b.shape[2])], axis=0)
        for a, b in zip(_numpy(past), _numpy(other))
    ]
    return joined, _stack_masks(mask, other_mask)


def _kept(rows: list[Row], mask: np.ndarray, done: list[int]) -> tuple[list[int], int] | None:
    """The rows that remain when `done` leave, and the first mask column one of them attends to; None: none left."""
    if not done:
        return None
    keep = [i for i in range(len(rows)) if i not in set(done)]
    used = np.flatnonzero(mask[keep].any(axis=0)) if keep else np.zeros(0, np.int64)
    return keep, int(used[0]) if len(used) else 0


def _drop(rows: list[Row], past: list, mask: np.ndarray, kept: tuple[list[int], int] | None):
    """The batch with only the `kept` rows, and without leading mask columns no remaining row attends to."""
    if kept is None:
        return rows, past, mask
    keep, start = kept
    if not keep:
        return [], [], np.zeros((0, 0), dtype=mask.dtype)
    return [rows[i] for i in keep], [value[keep, :, start:] for value in _numpy(past)], mask[keep][:, start:]
