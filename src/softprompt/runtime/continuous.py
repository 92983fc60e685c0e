"""Continuous batching for decoder exports: a request joins the running batch at the next step and leaves when done.

The engine's thread admits the waiting requests (any tasks, any settings) up to `max_batch` rows into
the decoder's running batch (batch.py, the loop `Model.complete` drives too) and steps it; a request
whose input is bad fails alone, and a failed step fails the rows it ran, never the engine.
"""

from __future__ import annotations

from softprompt.formats.errors import SoftpromptError

from .batch import DecodeBatch
from .encoder import Encoder
from .engine import Engine, Job, log
from .model import Model


class ContinuousEngine(Engine):
    """Engine whose batch changes at every step (decoder exports: `Model`)."""

    def _loop(self) -> None:
        batch = DecodeBatch(self.model)
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

    def _admit(self, batch: DecodeBatch, jobs: list[Job]) -> None:
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
    """The engine a server runs `model` on: decoders batch continuously, encoder-decoders in turns; None for an
    encoder (it embeds and classifies in the request's own thread)."""
    if isinstance(model, Encoder):
        return None
    kind = ContinuousEngine if isinstance(model, Model) else Engine
    return kind(model, max_batch, max_queue)
