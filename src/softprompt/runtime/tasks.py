"""The tasks a running model serves: a bank folder followed as its files change (hot swap).

A `Task` is immutable once built (vectors, template and labels, an encoder's head); the store
publishes a new name -> Task mapping by replacing one reference. A request takes that mapping once
at its start, so it runs every row under one consistent version of each task even while files are
being swapped, and readers never lock. A swapped task is served as soon as its files are read
(about a millisecond). The store knows nothing of models: what a model derives from a task (a
decoder's cached prompt keys and values, prompt_cache.py) it keeps itself, keyed by the Task.

Checking the folder costs one `os.scandir` and a stat per file (tens of microseconds for a few
tasks), so it is done before every request. A file that fails validation never replaces a working
task: the old version keeps serving and the error is logged once, with the file name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Union

import numpy as np

from softprompt.formats.bank import VECTORS_FILE, load_prompt, task_of
from softprompt.formats.errors import InvalidPromptError, PromptBankError, UnknownTaskError
from softprompt.formats.task import Head, TaskSpec, parse_head

from .errors import RequestTypeError

log = logging.getLogger("softprompt.runtime")

# (mtime_ns, size, inode) of NAME.json, of NAME.npy (schema 1 banks) and of the NAME.<hash>.npy files
# present (a record copied in before its vectors is served once they arrive); None where absent.
FileStamp = tuple[int, int, int] | None
Stamp = tuple[FileStamp, FileStamp, tuple[FileStamp, ...]]


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    name: str
    vectors: np.ndarray  # [P, E] float32, read-only: the vectors before the input ([0, E] for a prefix task)
    spec: TaskSpec
    # An encoder task's optional linear classifier: weight [labels, E], bias [labels], and what it reads.
    head: Head | None = None
    # A prefix task's keys and values: one [kv_heads, P, head_size] float32 array per cache input, read-only (an
    # encoder-decoder's prefix with parts: the decoder's, then the encoder's and the cross-attention's, runtime/seq2seq.py).
    past: tuple[np.ndarray, ...] | None = None
    # A P-tuning pattern's vectors after the lead, [Q, E]: negative ids -1..-Q of the templated rows name them.
    inner: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))

    @property
    def length(self) -> int:
        """Positions the task takes before the input."""
        return int(self.past[0].shape[1] if self.past is not None else self.vectors.shape[0])


def build_task(name: str, vectors: np.ndarray, extra: Mapping, prefix: bool = False, width: int | None = None) -> Task:
    """A Task from a bank entry's vectors: [P, E] (a prompt) or, with `prefix`, [2 * layers, kv_heads, P, head_size]
    (then `width`, the model's E, is the width of its empty prompt rows)."""
    spec = TaskSpec.from_extra(dict(extra), f"task {name!r}")
    if prefix:
        past = tuple(np.ascontiguousarray(layer, dtype=np.float32) for layer in vectors)
        for layer in past:
            layer.setflags(write=False)
        empty = np.zeros((0, width or vectors.shape[1] * vectors.shape[3]), np.float32)
        return Task(name, empty, spec, past=past)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    vectors.setflags(write=False)
    head = parse_head(extra.get("head"), list(spec.labels), vectors.shape[1], f"task {name!r}")
    lead = spec.lead
    if lead is None:
        return Task(name, vectors, spec, head)
    return Task(name, vectors[:lead], spec, head, inner=vectors[lead:])


class TaskStore:
    """name -> Task for a bank folder, refreshed from the files when they change."""

    def __init__(
        self,
        bank: Path | None,
        *,
        width: int,
        fingerprint: str | None,
        max_positions: int | None = None,
        cache: tuple[int, ...] | None = None,
        slots: bool = True,
    ):
        self.bank = bank
        self._slots = slots  # whether templates may place vectors after the text (P-tuning patterns)
        self._width = width
        self._fingerprint = fingerprint
        self._max_positions = max_positions
        self._cache = cache  # ExportConfig.prefix_cache: the shape a prefix task must have; None: the model takes none
        self._lock = threading.Lock()
        self._tasks: Mapping[str, Task] = MappingProxyType({})
        self._seen: dict[str, Stamp] = {}  # last stamps looked at, including ones that failed to load
        # name -> why it is not served (no version of it loaded): the error, re-raised for a request that asks for it
        self._failed: Mapping[str, PromptBankError] = MappingProxyType({})
        if bank is not None:
            if not Path(bank).is_dir():
                raise InvalidPromptError(f"bank {bank} is not a folder")
            self._refresh()

    def current(self) -> Mapping[str, Task]:
        """The tasks to serve a request with, after picking up any change in the folder."""
        if self.bank is not None and self._stamps() != self._seen:
            with self._lock:
                self._refresh()
        return self._tasks

    def failed(self) -> Mapping[str, str]:
        """Tasks of the bank that are not served, each with the reason (the error, naming its file)."""
        self.current()
        return {name: str(exc) for name, exc in self._failed.items()}

    def resolve(self, names: Sequence[str | Task | None]) -> list[Task | None]:
        """The Task objects of one request (None stays None), all from one version of the bank. A Task given in
        place of a name is kept as it is: a request resolved once keeps that version through every later call."""
        current = self.current()
        found: list[Task | None] = []
        for name in names:
            if name is None or isinstance(name, Task):
                found.append(name)
                continue
            if not isinstance(name, str):
                raise RequestTypeError(f"task {name!r}; expected a task name or None")
            task = current.get(name)
            failed = self._failed.get(name)
            if task is None and failed is not None:  # the same kind of error (another backbone's task: a mismatch)
                raise type(failed)(f"task {name!r} is in the bank but cannot be served: {failed}")
            if task is None:
                where = f"bank {self.bank}" if self.bank else "this model (no bank was loaded)"
                raise UnknownTaskError(f"no task {name!r} in {where}; tasks: {', '.join(sorted(current)) or 'none'}")
            found.append(task)
        return found

    def reload(self) -> Mapping[str, Task]:
        """Re-read every task file now, even unchanged ones."""
        if self.bank is not None:
            with self._lock:
                self._seen = {}
                self._refresh(everything=True)
        return self._tasks

    # ---- internals ----------------------------------------------------------------------------

    def _stamps(self) -> dict[str, Stamp]:
        """Stamps of every task in the folder: its NAME.json records."""
        try:
            entries = {e.name: e for e in os.scandir(self.bank)}
        except OSError:
            return {}
        versions: dict[str, list[FileStamp]] = {}
        for file_name, entry in entries.items():
            match = VECTORS_FILE.fullmatch(file_name)
            if match:
                versions.setdefault(match.group(1), []).append(_entry_stat(entry))
        stamps = {}
        for file_name, entry in entries.items():
            name = task_of(file_name)
            if name is not None:
                legacy = entries.get(name + ".npy")
                stamps[name] = (
                    _entry_stat(entry),
                    _entry_stat(legacy) if legacy is not None else None,
                    tuple(sorted(versions.get(name, []), key=str)),
                )
        return stamps

    def _refresh(self, everything: bool = False) -> None:
        stamps = self._stamps()
        if stamps == self._seen and not everything:
            return  # another thread did it while this one waited for the lock
        # At load a bad task is a warning (the rest serve); a bad new version of a served task is an error.
        level = logging.ERROR if self._tasks or self._failed else logging.WARNING
        tasks = dict(self._tasks)
        failed = {name: why for name, why in self._failed.items() if name in stamps}
        for name in set(tasks) - set(stamps):
            del tasks[name]
            log.info("task %r removed (%s/%s.json is gone)", name, self.bank, name)
        for name, stamp in sorted(stamps.items()):
            if not everything and self._seen.get(name) == stamp:
                continue
            try:
                assert self.bank is not None  # (refreshed only where there is a bank)
                prompt = load_prompt(
                    self.bank,
                    name,
                    width=self._width,
                    fingerprint=self._fingerprint,
                    max_positions=self._max_positions,
                    cache=self._cache,
                )
                task = build_task(name, prompt.vectors, prompt.meta.extra, prefix=prompt.is_prefix, width=self._width)
                if len(task.inner) and not self._slots:
                    raise InvalidPromptError(
                        f"{self.bank}/{name}.json: template {task.spec.template!r} places vectors after the text "
                        "(a P-tuning pattern); those serve on decoder and encoder-decoder exports"
                    )
            except Exception as exc:  # whatever one entry does, it harms only itself
                if not isinstance(exc, PromptBankError):
                    exc = InvalidPromptError(f"{self.bank}/{name}.json: cannot be read ({type(exc).__name__}: {exc})")
                kept = "keeping the version already loaded" if name in tasks else "not served"
                log.log(level, "task %r failed to load: %s; %s", name, exc, kept)  # the error names the file
                if name not in tasks:
                    failed[name] = exc
                continue
            if name in tasks:
                log.info("task %r reloaded from %s", name, self.bank)
            tasks[name] = task
            failed.pop(name, None)
        self._seen = stamps
        self._failed = MappingProxyType(failed)
        self._tasks = MappingProxyType(tasks)


def _entry_stat(entry: os.DirEntry) -> tuple[int, int, int] | None:
    try:
        info = entry.stat()
    except OSError:  # gone, a dangling link or a loop: loading it says which
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


# What every `task=` takes: a name, a Task already resolved (one version of it for a whole request), or None.
TaskRef = Union[str, Task, None]  # noqa: UP007  (an alias evaluated at import: works on Python 3.10)
