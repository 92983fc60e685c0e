"""Each task's prompt, run once: the keys and values of all its rows, used as the past of every request.

A task's soft prompt is the same prefix for every request, so a decoder computes its keys and
values once per version of the task and the first token's latency does not grow with the prompt
length. The model owns this cache and fills it through its graph; the task store never calls
into it. Tasks present at load (or `reload`) are computed before the call returns; a task swapped
in while serving is computed on a background thread, and until it is ready the task runs its
prompt with each request (the same results, a slower first token).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable

import numpy as np

from .graph import DecoderGraph
from .rows import position_ids
from .tasks import Task

log = logging.getLogger("softprompt.runtime")

# One [heads, P, head size] array per cache input. A request with an empty input uses the first
# P - 1 rows and feeds the last prompt vector, to have a position whose logits start generation.
Prefix = tuple[np.ndarray, ...]
FAILED: Prefix = ()  # computing it failed: the task runs its prompt with each request, and is not retried


def prefill(graph: DecoderGraph, vectors: np.ndarray) -> Prefix:
    """Keys and values of every prompt row (read-only arrays)."""
    embeds = vectors[None]
    mask = np.ones(embeds.shape[:2], dtype=np.int64)
    _, present = graph.forward(embeds, mask, position_ids(mask), graph.empty_past(1))
    prefix = tuple(np.ascontiguousarray(layer.numpy()[0]) for layer in present)
    for layer in prefix:
        layer.setflags(write=False)
    return prefix


class PromptCache:
    """Task -> its prompt's keys and values; entries go when their Task object does (a replaced version)."""

    def __init__(self, graph: DecoderGraph):
        self._graph = graph
        self._lock = threading.Lock()
        self._ready: weakref.WeakKeyDictionary[Task, Prefix] = weakref.WeakKeyDictionary()
        self._pending: dict[Task, threading.Event] = {}

    def fill(self, tasks: Iterable[Task]) -> None:
        """Compute the prompts of `tasks` that are not cached yet, now."""
        for task in tasks:
            if task.past is not None or not len(task.vectors):
                continue  # a prefix task's keys and values are in its file; an empty prompt has none
            with self._lock:
                cached = task in self._ready
            if not cached:
                prefix = prefill(self._graph, task.vectors)
                with self._lock:
                    self._ready[task] = prefix

    def get(self, task: Task, start: bool = True) -> Prefix | None:
        """The cached prompt, or None while it is not ready (then, with `start`, computed in the background)."""
        if not len(task.vectors):  # an empty prompt (a zero-shot task: template and labels only) has nothing to cache
            return None
        with self._lock:
            found = self._ready.get(task)
            if found is not None or not start or task in self._pending:
                return found or None
            self._pending[task] = threading.Event()
        # Not a daemon: a process that exits while a prompt is computed waits for that one forward pass
        # (milliseconds) instead of tearing onnxruntime down under it, which aborts the process.
        threading.Thread(target=self._compute, args=(task,), name=f"prefill-{task.name}", daemon=False).start()
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every computation started so far has finished; False if `timeout` passed first."""
        with self._lock:
            events = list(self._pending.values())
        return all(event.wait(timeout) for event in events)

    def _compute(self, task: Task) -> None:
        try:
            prefix = prefill(self._graph, task.vectors)
        except Exception as exc:  # noqa: BLE001 - the task keeps working without its cache
            log.error("task %r: computing its cached prompt failed (%s); it runs uncached", task.name, exc)
            prefix = FAILED
        with self._lock:
            self._ready[task] = prefix
            self._pending.pop(task).set()
