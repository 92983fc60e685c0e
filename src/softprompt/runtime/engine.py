"""The one thread that runs generation for a server: requests queue here and share one running batch.

Continuous batching, for decoders and encoder-decoders alike: at every step the engine's thread
admits the waiting requests (any tasks, any settings) up to `max_batch` rows into the model's
running batch (`model.batch()`: batch.py for decoders, seq2seq_batch.py for encoder-decoders, the
loop `complete` and friends drive too) and steps it. Each request hears of its row after every
step (for streaming) and at the end; a row that is done, or whose client went away, leaves at
once. A request whose input is bad fails alone, and a failed step fails the rows it ran, never the
engine.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from softprompt.formats.errors import SoftpromptError

from .tasks import Task

log = logging.getLogger("softprompt.runtime")


class QueueFull(Exception):
    """More requests wait than the engine takes (or it is closing); the client should retry later."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request's row: token ids (templated), its task, its settings, and where to report."""

    ids: list[int]
    task: Task | str | None  # the version the ids were templated with (a name is resolved when the row starts)
    settings: Any  # GenerationSettings: each row chooses its tokens with its own
    on_step: Callable[[Any], None] = lambda state: None  # the row's RowText after a step (on the engine's thread)
    on_done: Callable[[Any], None] = lambda state: None  # the final RowText
    on_error: Callable[[BaseException], None] = lambda error: None
    cancelled: bool = False


@dataclasses.dataclass
class Stats:
    batches: int = 0  # admissions (one first step each)
    rows: int = 0
    steps: int = 0
    running: int = 0


class Engine:
    """Continuous batching of a text model's requests on one thread (`submit`, `close`)."""

    def __init__(self, model, max_batch: int = 16, max_queue: int = 256):
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stats = Stats()
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the limit is {self.max_queue})")
            self._waiting.append(job)
            self._lock.notify()

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the waiting and running ones, stop the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        batch = self.model.batch()
        while True:
            joining = self._join(wait=not batch.rows)
            if joining is None:
                return
            if joining:
                self._admit(batch, joining)
            if not batch.rows:
                continue
            self.stats.running = len(batch.rows)
            try:
                batch.step()
            except Exception as exc:
                log.exception("a decode step of %d rows failed", len(batch.rows))
                for row in batch.clear():
                    row.job.on_error(exc)
                continue
            finally:
                self.stats.running = len(batch.rows)
            self.stats.steps += 1

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

    def _admit(self, batch, jobs: list[Job]) -> None:
        """The jobs' first step, together; one request's bad input fails it alone."""
        self.stats.batches += 1
        self.stats.rows += len(jobs)
        try:
            batch.admit(jobs)
        except SoftpromptError as exc:
            if len(jobs) > 1:  # one bad request must not fail the others
                for job in jobs:
                    self._admit(batch, [job])
                return
            jobs[0].on_error(exc)
        except Exception as exc:
            log.exception("the first step of %d rows failed", len(jobs))
            for job in jobs:
                job.on_error(exc)


def start_engine(model, max_batch: int = 16, max_queue: int = 256) -> Engine | None:
    """The engine a server runs `model` on; None for an encoder (it embeds and classifies in the request's thread)."""
    if model.config.kind == "encoder":
        return None
    return Engine(model, max_batch, max_queue)
