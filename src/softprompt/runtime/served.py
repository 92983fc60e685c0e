"""What every loaded export has, whatever its kind: the folder it came from, its tasks, its session."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from softprompt.formats.export_folder import ExportFolder
from softprompt.formats.task import TaskSpec

from .rows import as_texts, embed_row
from .tasks import Task, TaskRef, TaskStore


class ServedExport:
    """An export folder and the bank it serves (followed as its files change), on one onnxruntime session."""

    def __init__(self, backbone: ExportFolder, session, bank: Path | None):
        self.backbone = backbone
        self.config = backbone.config
        self.table = backbone.table
        self.session = session
        self.bank = bank
        self._store = TaskStore(
            bank,
            width=self.config.hidden_size,
            fingerprint=self.config.fingerprint,
            max_positions=self.config.max_positions,
            cache=self.config.prefix_cache,
            slots=self.config.kind != "encoder",
        )

    @property
    def tasks(self) -> list[str]:
        return sorted(self._store.current())

    @property
    def unserved(self) -> Mapping[str, str]:
        """Tasks of the bank that failed to load, each with the reason: a request for one is refused with it, while
        every other task serves."""
        return self._store.failed()

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def resolve_tasks(self, names: Sequence[str | None]) -> list[Task | None]:
        """The tasks of a request's rows, all from one version of the bank. Every `task=` argument takes these in place
        of names, so a request that is templated, checked and run in separate calls (as a server does) runs under
        the version it was templated with, even while the task's files are swapped."""
        return self._store.resolve(names)

    def reload(self) -> list[str]:
        """Re-read every task file of the bank now (changes are also picked up before each request)."""
        return sorted(self._store.reload())

    def prompt(self, task: TaskRef) -> np.ndarray | None:
        """The [P, E] float32 soft prompt of `task` (all its vectors, a pattern's slots included), or None for no
        prompt (and for a prefix task, whose keys and values `prefix` gives)."""
        found = self._store.resolve([task])[0]
        if found is None or found.past is not None:
            return None
        return found.vectors if not len(found.inner) else np.concatenate([found.vectors, found.inner])

    def prefix(self, task: TaskRef) -> tuple[np.ndarray, ...] | None:
        """A prefix task's keys and values, one [kv_heads, P, head_size] array per cache input; None for others."""
        found = self._store.resolve([task])[0]
        return None if found is None else found.past

    def task_length(self, task: TaskRef) -> int:
        """Positions the task takes before the input (its prompt's vectors, or its prefix's length; 0 for no task)."""
        found = self._store.resolve([task])[0]
        return 0 if found is None else found.length

    def task_spec(self, task: TaskRef) -> TaskSpec:
        """The task's template and labels (no task: the text as it is, no labels)."""
        return spec_of(self._store.resolve([task])[0])

    def encode(self, text: str, task: TaskRef = None) -> list[int]:
        """Token ids of `text` wrapped in the task's template, as the model's own tokenizer makes them."""
        return self.task_spec(task).encode(text, self.backbone.encode)

    def inputs_embeds(self, ids: Sequence[int], task: str | None = None) -> np.ndarray:
        """[P + n, E]: exactly what the model is fed for `ids` under `task` (training builds the same; a prefix task
        adds no rows: its keys and values are the past; negative ids are a P-tuning pattern's slots)."""
        found = self._store.resolve([task])[0]
        if found is None or found.past is not None:
            return embed_row(self.table, ids, None)
        return embed_row(self.table, ids, found.vectors, found.inner)

    def _encode_rows(self, texts: Sequence[str], found: Sequence[Task | None]) -> list[list[int]]:
        return [spec_of(task).encode(text, self.backbone.encode) for text, task in zip(as_texts(texts), found)]


def spec_of(task: Task | None) -> TaskSpec:
    """A task's template and labels; no task: the text as it is."""
    return TaskSpec() if task is None else task.spec
