"""An encoder-decoder's running batch: batch.py's `admit` / `step` / `clear` for `Seq2Seq`, so the engine and
`Seq2Seq.complete` run encoder-decoders through the same loop and the same rows as decoders.

The decoder graph takes no self-attention mask, so rows share a decoder call only when their self
caches have one length and kind: rows admitted together with the same kind of past (no prefix, or
a prefix of P, with parts or not). Each admission forms such groups (the encoder runs once for
each, and its cross-attention keys and values stay with the group); a step runs every group's
decoder call once. A row that is done or cancelled leaves its group at once (its rows of the self
cache, of the cross keys and values and of the encoder mask are cut out), and an empty group ends.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .batch import Row
from .engine import Job


class Group:
    """Rows admitted together with one kind of past: their self cache, cross keys and values and encoder mask."""

    def __init__(self, rows: list[Row], past: list, cross: list, mask: np.ndarray):
        self.rows, self.past, self.cross, self.mask = rows, past, cross, mask

    def step(self, model) -> None:
        """One decoder call: a token for every row; rows that are done or cancelled leave."""
        logits, self.past = model.decoder_step([row.token for row in self.rows], self.mask, self.past, self.cross)
        done = [i for i, row in enumerate(self.rows) if row.job.cancelled or row.take(logits[i])]
        if not done:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(done)]
        self.rows = [self.rows[i] for i in keep]
        if keep:
            self.past, self.cross = model.take_rows(self.past, keep), model.take_rows(self.cross, keep)
            self.mask = self.mask[keep]


class Seq2SeqBatch:
    """The groups an encoder-decoder generates together."""

    def __init__(self, model):
        self.model = model
        self.groups: list[Group] = []

    @property
    def rows(self) -> list[Row]:
        return [row for group in self.groups for row in group.rows]

    def admit(self, jobs: Sequence[Job]) -> list[Row]:
        """The jobs' encoder and first decoder step (a bad input raises before any row joins); the rows not done at
        once join the batch. Returns every job's row, done or not, in the jobs' order."""
        model = self.model
        longest = max(job.settings.max_new_tokens for job in jobs)
        started = model.start([job.ids for job in jobs], [job.task for job in jobs], longest)
        rows = [Row(job, model, model.row_chooser(job.settings)) for job in jobs]
        for row in rows:
            row.token = model.config.bos_token_id  # the decoder's start token
        groups = [Group([rows[i] for i in indices], past, cross, mask) for indices, past, cross, mask in started]
        for group in groups:
            group.step(model)
        self.groups += [group for group in groups if group.rows]
        return rows

    def step(self) -> None:
        """One token for every row, a decoder call per group."""
        for group in self.groups:
            group.step(self.model)
        self.groups = [group for group in self.groups if group.rows]

    def clear(self) -> list[Row]:
        """Empty the batch (after a failed step); returns the rows it held."""
        rows, self.groups = self.rows, []
        return rows
