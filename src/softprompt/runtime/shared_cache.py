"""A running batch's keys and values in preallocated buffers that each decode step writes in place.

With a graph whose attention can share its past and present (graph.py, `shares_cache`), a step binds
the same arrays [rows, heads, capacity, size] as both, and the op writes the new position's keys and
values into them: no step copies or allocates the cache, where a past that grows is copied whole into a
new present at every step (a whole generation of the default model 1.03-1.17x faster). Column j of every
buffer is column j of the batch's attention mask, as in the growing past, so rows stay left-padded with
masked columns and the mask alone says what each row sees. Copies happen only when the batch changes:
rows joining (`join`), rows leaving and leading columns no row needs any more (`keep`), and a buffer out
of room (`reserve`, which makes room for up to ROOM more steps at a time).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .graph import numpy_value

ROOM = 256  # columns reserved past what the next step needs, at most: a copy every ROOM steps at worst


class SharedCache:
    """Buffers [rows, heads, capacity, size], one per cache input; `length` columns of them hold the batch's cache."""

    def __init__(self, graph):
        self.graph = graph
        self.buffers: list[np.ndarray] = []
        self.length = 0  # the columns in use: the attention mask's width
        self._binding = None
        self._logits = np.zeros((0, 1, graph.vocab_size), np.float32)  # where each step's logits land

    @property
    def rows(self) -> int:
        return self.buffers[0].shape[0] if self.buffers else 0

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2] if self.buffers else 0

    def join(self, present: Sequence, length: int, room: int) -> None:
        """Add rows whose cache is `present` ([m, heads, length, size] values, one per cache input), the batch's rows
        first; the shorter side is left-padded with zero (masked) columns, as `_stack` pads a growing past."""
        present = [numpy_value(value) for value in present]
        width = max(self.length, length)
        old = self.buffers
        rows = self.rows + present[0].shape[0]
        self.buffers = [np.zeros((rows, a.shape[1], width + _room(room), a.shape[3]), a.dtype) for a in present]
        for i, (buffer, new) in enumerate(zip(self.buffers, present)):
            if old:
                buffer[: old[i].shape[0], :, width - self.length : width] = old[i][:, :, : self.length]
            buffer[buffer.shape[0] - new.shape[0] :, :, width - length : width] = new
        self.length = width
        self._binding = None

    def keep(self, rows: Sequence[int], start: int) -> None:
        """Only `rows` (in this order) and the columns from `start` on remain: moved down and left in place."""
        if not rows:
            self.buffers, self.length, self._binding = [], 0, None
            return
        if list(rows) == list(range(self.rows)) and start == 0:
            return
        width = self.length - start
        for buffer in self.buffers:
            for to, row in enumerate(rows):
                if to != row or start:
                    buffer[to, :, :width] = buffer[row, :, start : self.length]  # numpy copies overlapping spans safely
        self.buffers = [buffer[: len(rows)] for buffer in self.buffers]  # a leading slice: contiguous still
        self.length = width
        self._binding = None

    def reserve(self, length: int, room: int) -> None:
        """Room for `length` columns; when there is none, new buffers with room for `room` more steps after it."""
        if length <= self.capacity:
            return
        old = self.buffers
        self.buffers = [np.zeros((a.shape[0], a.shape[1], length + _room(room), a.shape[3]), a.dtype) for a in old]
        for buffer, before in zip(self.buffers, old):
            buffer[:, :, : self.length] = before[:, :, : self.length]
        self._binding = None

    def step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One graph call for every row, the cache written in place; the last position's logits [rows, V], valid until
        the next step."""
        if mask.shape[1] > self.capacity:
            raise ValueError(f"a mask of {mask.shape[1]} columns for a cache of {self.capacity}; reserve() first")
        if self._binding is None:
            self._logits = np.zeros((self.rows, 1, self._logits.shape[2]), np.float32)
            self._binding = self.graph.bind_cache(self.buffers, self._logits)
        self.graph.step_bound(self._binding, embeds, mask, positions)
        self.length = mask.shape[1]
        return self._logits[:, -1]  # overwritten by the next step


def _room(steps: int) -> int:
    return max(1, min(int(steps), ROOM))
