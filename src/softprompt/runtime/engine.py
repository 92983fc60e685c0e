"""The one thread that runs generation for a server: requests queue here and run together, whatever their tasks.

This engine batches in turns (encoder-decoders): a free engine takes the waiting requests that
share generation settings (up to `max_batch`, in arrival order) and runs them as one batch of the
runtime (`model.steps`): rows of different tasks share every decode step. Each request hears of
its row after every step (for streaming) and at the end. Requests that arrive while a batch runs
wait for the next one; a batch whose clients have all gone away stops at the next step. Decoders
batch continuously instead (continuous.py), on the same queue.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
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
    settings: Any  # GenerationSettings: rows share a batch only with rows of equal settings
    on_step: Callable[[Any], None] = lambda state: None  # the row's RowText after a step (on the engine's thread)
    on_done: Callable[[Any], None] = lambda state: None  # the final RowText
    on_error: Callable[[BaseException], None] = lambda error: None
    cancelled: bool = False


@dataclasses.dataclass
class Stats:
    batches: int = 0
    rows: int = 0
    steps: int = 0
    running: int = 0


class Engine:
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

    def _take(self) -> list[Job] | None:
        with self._lock:
            while not self._waiting:
                if self._closing:
                    return None
                self._lock.wait()
            first = self._waiting.popleft()
            batch = [first]
            for job in list(self._waiting):
                if len(batch) >= self.max_batch:
                    break
                if job.settings == first.settings:
                    self._waiting.remove(job)
                    batch.append(job)
            return [job for job in batch if not job.cancelled]

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._run(batch)

    def _run(self, batch: Sequence[Job]) -> None:
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.running = len(batch)
        states = None
        try:
            steps = self.model.steps([job.ids for job in batch], task=[job.task for job in batch], settings=batch[0].settings)
            for states in steps:
                self.stats.steps += 1
                if all(job.cancelled for job in batch):
                    steps.close()
                    return
                for job, state in zip(batch, states):
                    if not job.cancelled:
                        job.on_step(state)
            for job, state in zip(batch, states or []):
                if not job.cancelled:
                    job.on_done(state)
        except SoftpromptError as exc:  # one row's bad input must not fail the rows it was batched with
            if len(batch) > 1:
                for job in batch:
                    self._run([job])
            else:
                batch[0].on_error(exc)
        except Exception as exc:  # the clients hear of it; the engine keeps serving
            log.exception("a batch of %d rows failed", len(batch))
            for job in batch:
                job.on_error(exc)
        finally:
            self.stats.running = 0
