"""Training data: JSON Lines, checked whole before training starts, errors naming the file and line.

Classification lines are `{"text": ..., "label": ...}`; generation lines are `{"input": ..., "output": ...}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from .errors import TrainingError


class DataError(TrainingError):
    """A data file cannot be used for training; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class Example:
    text: str  # the input (before the template)
    target: str  # the label (classification) or the output text (generation)


@dataclasses.dataclass(frozen=True)
class Dataset:
    path: Path
    kind: str  # "classification" or "generation"
    examples: list[Example]
    sha256: str

    @property
    def labels(self) -> list[str]:
        return sorted({e.target for e in self.examples}) if self.kind == "classification" else []


FIELDS = {"classification": ("text", "label"), "generation": ("input", "output")}


def read_jsonl(path: str | Path, labels: list[str] | None = None) -> Dataset:
    """Read and check every line; `labels` (when given) is the set a classification label must be in."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None
    kind = None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        line_kind = "classification" if "label" in record or "text" in record else "generation"
        kind = kind or line_kind
        if line_kind != kind:
            raise DataError(f"{where}: a {line_kind} line in a {kind} file (fields {sorted(record)})")
        source, target = FIELDS[kind]
        for field in (source, target):
            if field not in record:
                raise DataError(f"{where}: missing field {field!r}; {kind} lines need {FIELDS[kind]}")
            if not isinstance(record[field], str):
                raise DataError(f"{where}: {field!r} is {type(record[field]).__name__}; expected a string")
        if not record[source].strip():
            raise DataError(f"{where}: empty {source!r}")
        if not record[target].strip():
            raise DataError(f"{where}: empty {target!r}")
        if kind == "classification" and labels is not None and record[target] not in labels:
            raise DataError(f"{where}: unknown label {record[target]!r}; expected one of {labels}")
        examples.append(Example(record[source], record[target]))
    if not examples:
        raise DataError(f"{path}: no examples")
    return Dataset(path, kind, examples, hashlib.sha256(raw).hexdigest())
