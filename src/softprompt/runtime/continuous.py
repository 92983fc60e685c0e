"""Continuous batching for decoder exports: a request joins the running batch at the next step and leaves when done.

The running batch is the graph's own state: keys and values [B, heads, T, head size] for every
layer, the attention mask [B, T] and each row's next position. A step first takes the waiting
requests (any tasks, any settings) up to `max_batch` rows and runs their first step together
(`Model.first_step`: cached prompt or prefix keys as their past, then their tokens), which gives
each its first token; their keys and values join the batch, left-padded with masked columns to
the batch's length (or the batch's to theirs). Then every row feeds its last token in one graph
call. Each row chooses its own next token with its own settings (temperature, seed, stops), and a
row that is done, or whose client went away, leaves the batch at once. Masked columns that no
row needs any more are cut off. Positions count each row's real tokens, so a row sees what it
sees alone (the tests compare greedy tokens with the Python API's).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from softprompt.formats.errors import SoftpromptError

from .encoder import Encoder
from .engine import Engine, Job, log
from .model import Model
from .rows import position_ids
from .sampling import chooser


class _Row:
    def __init__(self, job: Job, model):
        self.job = job
        eos = set(model.config.eos_token_ids)
        self.state = model.row_text(job.task, job.settings)
        self.choose = chooser(job.settings, eos)
        self.position = 0  # the next token's position
        self.token = 0  # the last chosen token, fed at the next step

    def take(self, logits: np.ndarray) -> bool:
        """Choose from this row's logits [V]; tell the client; True when the row is done."""
        self.token = int(self.choose(logits[None])[0])
        self.state.add(self.token)
        if len(self.state.ids) >= self.job.settings.max_new_tokens:
            self.state.finish()
        self.job.on_step(self.state)
        if self.state.done:
            self.job.on_done(self.state)
        return self.state.done


class ContinuousEngine(Engine):
    """Engine whose batch changes at every step (decoder exports: `Model`)."""

    def _loop(self) -> None:
        rows: list[_Row] = []
        past: list = []
        mask = np.zeros((0, 0), dtype=np.int64)
        while True:
            joining = self._join(wait=not rows)
            if joining is None:
                return
            if joining:
                rows, past, mask = self._admit(rows, past, mask, joining)
            if not rows:
                continue
            self.stats.running = len(rows)
            try:
                mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=mask.dtype)], axis=1)
                positions = np.array([[row.position] for row in rows], dtype=np.int64)
                embeds = np.asarray(self.model.table[[row.token for row in rows]], dtype=np.float32)[:, None, :]
                logits, past = self.model.forward(embeds, mask, positions, past)
            except Exception as exc:
                log.exception("a decode step of %d rows failed", len(rows))
                for row in rows:
                    row.job.on_error(exc)
                rows, past, mask = [], [], np.zeros((0, 0), dtype=np.int64)
                continue
            self.stats.steps += 1
            done = []
            for i, row in enumerate(rows):
                row.position += 1
                if row.job.cancelled or row.take(logits[i]):
                    done.append(i)
            rows, past, mask = _drop(rows, past, mask, done)
            self.stats.running = len(rows)

    def _join(self, wait: bool) -> list[Job] | None:
        """Waiting jobs for the free rows; blocks only when nothing runs; None when closing and nothing is left."""
        with self._lock:
            while wait and not self._waiting:
                if self._closing:
                    return None
                self._lock.wait()
            taken: list[Job] = []
            while self._waiting and len(taken) < self.max_batch - self.stats.running:
                job = self._waiting.popleft()
                if not job.cancelled:
                    taken.append(job)
            return taken

    def _admit(self, rows: list[_Row], past: list, mask: np.ndarray, jobs: list[Job]):
        """The jobs' first step, together; rows not done at once join the running batch."""
        self.stats.batches += 1
        self.stats.rows += len(jobs)
        try:
            longest = max(job.settings.max_new_tokens for job in jobs)
            embeds, first_mask, first_past = self.model.first_step(
                [job.ids for job in jobs], task=[job.task for job in jobs], max_new_tokens=longest
            )
            positions = position_ids(first_mask, first_mask.shape[1] - embeds.shape[1])
            logits, present = self.model.forward(embeds, first_mask, positions, first_past)
        except SoftpromptError as exc:
            if len(jobs) > 1:  # one bad request must not fail the others
                for job in jobs:
                    rows, past, mask = self._admit(rows, past, mask, [job])
                return rows, past, mask
            jobs[0].on_error(exc)
            return rows, past, mask
        except Exception as exc:
            log.exception("the first step of %d rows failed", len(jobs))
            for job in jobs:
                job.on_error(exc)
            return rows, past, mask
        joined = [_Row(job, self.model) for job in jobs]
        finished = []
        for i, row in enumerate(joined):
            row.position = int(positions[i, -1]) + 1
            if row.take(logits[i]):
                finished.append(i)
        joined, present, first_mask = _drop(joined, present, first_mask, finished)
        if not joined:
            return rows, past, mask
        if not rows:
            return joined, present, first_mask
        return rows + joined, *_stack(past, mask, present, first_mask)


def _numpy(values: Sequence) -> list[np.ndarray]:
    return [value if isinstance(value, np.ndarray) else value.numpy() for value in values]


def _stack(past: list, mask: np.ndarray, other: list, other_mask: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Two batches' keys, values and masks as one, the shorter left-padded with masked columns."""
    length = max(mask.shape[1], other_mask.shape[1])

    def pad(values: np.ndarray, axis: int, width: int) -> np.ndarray:
        if width == 0:
            return values
        shape = list(values.shape)
        shape[axis] = width
        return np.concatenate([np.zeros(shape, dtype=values.dtype), values], axis=axis)

    joined = [
        np.concatenate([pad(a, 2, length - a.shape[2]), pad(b, 2, length - b.shape[2])], axis=0)
        for a, b in zip(_numpy(past), _numpy(other))
    ]
    masks = np.concatenate([pad(mask, 1, length - mask.shape[1]), pad(other_mask, 1, length - other_mask.shape[1])], axis=0)
    return joined, masks


def _drop(rows: list[_Row], past: list, mask: np.ndarray, done: list[int]):
    """The batch without the `done` rows, and without leading mask columns no remaining row attends to."""
    if not done:
        return rows, past, mask
    keep = [i for i in range(len(rows)) if i not in set(done)]
    if not keep:
        return [], [], np.zeros((0, 0), dtype=mask.dtype)
    mask = mask[keep]
    used = np.flatnonzero(mask.any(axis=0))
    start = int(used[0]) if len(used) else 0
    return [rows[i] for i in keep], [value[keep, :, start:] for value in _numpy(past)], mask[:, start:]


def start_engine(model, max_batch: int = 16, max_queue: int = 256) -> Engine | None:
    """The engine a server runs `model` on: decoders batch continuously, encoder-decoders in turns; None for an
    encoder (it embeds and classifies in the request's own thread)."""
    if isinstance(model, Encoder):
        return None
    kind = ContinuousEngine if isinstance(model, Model) else Engine
    return kind(model, max_batch, max_queue)
