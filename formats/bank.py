"""The prompt-bank format: a folder where a task is `NAME.npy` (the [P, E] soft prompt) plus `NAME.json`.

Everything here needs numpy alone, so a device can read and check banks without torch.
Files are validated when they are loaded, never deep inside their first use, and every refusal
names the file, the value found and what was expected.

>>> import tempfile, numpy as np
>>> bank = tempfile.mkdtemp()
>>> meta = save_prompt(bank, "sentiment", np.zeros((4, 8), np.float32), fingerprint="sha256:ab")
>>> load_prompt(bank, "sentiment", width=8).vectors.shape
(4, 8)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_atomic
from .errors import BackboneMismatchError, InvalidPromptError, UnknownTaskError
from .fingerprint import short

SCHEMA_VERSION = 1
ALLOWED_DTYPES = ("float32", "float16")
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # fullmatch: `$` would let a trailing newline in


@dataclasses.dataclass(frozen=True)
class PromptMeta:
    """What `NAME.json` holds: the prompt's shape and the record of how it was made."""

    name: str
    length: int
    width: int
    dtype: str
    fingerprint: str | None
    init: str | None = None
    source: str | None = None
    training: dict[str, Any] | None = None
    created: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A validated task prompt: `vectors` is [length, width] and read-only."""

    meta: PromptMeta
    vectors: np.ndarray

    @property
    def name(self) -> str:
        return self.meta.name


def check_task_name(name: str) -> str:
    """Refuse names that are not plain file stems (no paths, no leading dot: those are temp files)."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name) or name.endswith((".npy", ".json")):
        raise InvalidPromptError(
            f"invalid task name {name!r}: expected letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without a file extension"
        )
    return name


def validate_vectors(vectors: np.ndarray, where: str) -> None:
    """Check that an array can be a soft prompt: 2-D, float32/float16, finite, non-empty."""
    if not isinstance(vectors, np.ndarray):
        raise InvalidPromptError(f"{where}: expected a numpy array, got {type(vectors).__name__}")
    if vectors.dtype == object:
        raise InvalidPromptError(f"{where}: object array; expected float32 or float16")
    if vectors.ndim != 2:
        raise InvalidPromptError(
            f"{where}: shape {vectors.shape} has {vectors.ndim} dimensions; expected 2 ([prompt length, embedding width])"
        )
    if vectors.dtype.name not in ALLOWED_DTYPES:
        raise InvalidPromptError(f"{where}: dtype {vectors.dtype}; expected one of {ALLOWED_DTYPES}")
    if vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise InvalidPromptError(f"{where}: empty prompt of shape {vectors.shape}")
    bad = ~np.isfinite(vectors)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise InvalidPromptError(
            f"{where}: {int(bad.sum())} non-finite values (first: {vectors[row, col]} at row {row}, "
            f"column {col}); expected finite numbers"
        )


def save_prompt(
    bank_dir: str | os.PathLike,
    name: str,
    vectors: np.ndarray,
    *,
    fingerprint: str | None,
    init: str | None = None,
    source: str | None = None,
    training: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    overwrite: bool = True,
) -> PromptMeta:
    """Write `NAME.npy` and `NAME.json` into `bank_dir`, each through a temporary file and a rename.

    `dtype` ("float32" or "float16") converts before saving; by default the array's own dtype
    is kept when allowed, else float32.
    """
    check_task_name(name)
    bank = Path(bank_dir)
    target = dtype or (vectors.dtype.name if vectors.dtype.name in ALLOWED_DTYPES else "float32")
    if target not in ALLOWED_DTYPES:
        raise InvalidPromptError(f"dtype {target!r} for task {name!r}; expected one of {ALLOWED_DTYPES}")
    array = np.ascontiguousarray(np.asarray(vectors).astype(target, copy=False))
    validate_vectors(array, f"task {name!r}")
    if not overwrite and (bank / f"{name}.npy").exists():
        raise InvalidPromptError(f"{bank / (name + '.npy')} exists; pass overwrite (--force) to replace it")
    meta = PromptMeta(
        name=name,
        length=int(array.shape[0]),
        width=int(array.shape[1]),
        dtype=target,
        fingerprint=fingerprint,
        init=init,
        source=source,
        training=dict(training) if training else None,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra=dict(extra or {}),
    )
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomic(bank / f"{name}.npy", lambda handle: handle.write(buffer.getvalue()))
    text = json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n"
    write_atomic(bank / f"{name}.json", lambda handle: handle.write(text), mode="w")
    return meta


def list_tasks(bank_dir: str | os.PathLike) -> list[str]:
    """Task names in a bank: every `NAME.npy` whose name does not start with a dot."""
    bank = Path(bank_dir)
    if not bank.is_dir():
        raise InvalidPromptError(f"bank {bank} is not a folder")
    return sorted(p.stem for p in bank.glob("*.npy") if not p.name.startswith("."))


def read_vectors(path: Path) -> np.ndarray:
    """Read a `.npy` prompt without ever unpickling, and turn numpy's errors into ours."""
    try:
        with open(path, "rb") as handle:
            vectors = np.load(handle, allow_pickle=False)
    except FileNotFoundError:
        raise InvalidPromptError(f"{path}: file not found") from None
    except ValueError as exc:
        text = str(exc)
        if "allow_pickle" in text or "Object arrays" in text:
            raise InvalidPromptError(
                f"{path}: holds a pickled or object array; expected a plain float32/float16 array (pickles are never loaded)"
            ) from None
        raise InvalidPromptError(f"{path}: not a readable .npy array ({text}); the file may be truncated") from None
    except (EOFError, OSError) as exc:
        raise InvalidPromptError(f"{path}: cannot read .npy data ({exc}); the file may be truncated") from None
    if not isinstance(vectors, np.ndarray):
        raise InvalidPromptError(f"{path}: expected one array, got {type(vectors).__name__}")
    validate_vectors(vectors, str(path))
    vectors.setflags(write=False)
    return vectors


def read_meta(path: Path) -> PromptMeta:
    """Read and check `NAME.json` against the schema."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidPromptError(f"{path}: missing; every task needs NAME.npy and NAME.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidPromptError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidPromptError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InvalidPromptError(f"{path}: schema_version {version!r}; expected {SCHEMA_VERSION}")
    fields = {f.name: f for f in dataclasses.fields(PromptMeta)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidPromptError(f"{path}: unknown fields {unknown}; expected only {sorted(fields)}")
    required = ("name", "length", "width", "dtype", "fingerprint")
    missing = [key for key in required if key not in data]
    if missing:
        raise InvalidPromptError(f"{path}: missing fields {missing}")
    for key in ("length", "width"):
        if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] <= 0:
            raise InvalidPromptError(f"{path}: {key} is {data[key]!r}; expected a positive integer")
    if data["dtype"] not in ALLOWED_DTYPES:
        raise InvalidPromptError(f"{path}: dtype {data['dtype']!r}; expected one of {ALLOWED_DTYPES}")
    return PromptMeta(**data)


def load_prompt(
    bank_dir: str | os.PathLike,
    name: str,
    *,
    width: int | None = None,
    fingerprint: str | None = None,
) -> Prompt:
    """Load one task and check it, and (when given) that it fits the backbone's width and fingerprint."""
    check_task_name(name)
    bank = Path(bank_dir)
    npy, meta_path = bank / f"{name}.npy", bank / f"{name}.json"
    if not npy.exists():
        tasks = list_tasks(bank)
        raise UnknownTaskError(f"no task {name!r} in bank {bank}; tasks there: {', '.join(tasks) or 'none'}")
    vectors = read_vectors(npy)
    meta = read_meta(meta_path)
    if meta.name != name:
        raise InvalidPromptError(f"{meta_path}: name is {meta.name!r}; expected {name!r} (the file's name)")
    found = (int(vectors.shape[0]), int(vectors.shape[1]), vectors.dtype.name)
    if found != (meta.length, meta.width, meta.dtype):
        raise InvalidPromptError(
            f"{npy}: array is {found[0]}x{found[1]} {found[2]} but {meta_path.name} says {meta.length}x{meta.width} {meta.dtype}"
        )
    if width is not None and meta.width != width:
        raise BackboneMismatchError(f"{npy}: prompt width E={meta.width}; the backbone's embedding width is {width}")
    if fingerprint is not None and meta.fingerprint != fingerprint:
        raise BackboneMismatchError(
            f"{meta_path}: made for backbone {short(meta.fingerprint)}; this model is {short(fingerprint)}. "
            "A soft prompt only works with the backbone it was made for."
        )
    return Prompt(meta=meta, vectors=vectors)


def load_bank(bank_dir: str | os.PathLike, *, width: int | None = None, fingerprint: str | None = None) -> dict[str, Prompt]:
    """Load and check every task of a bank at once, so a bad file is reported at load time."""
    return {name: load_prompt(bank_dir, name, width=width, fingerprint=fingerprint) for name in list_tasks(bank_dir)}


def remove_prompt(bank_dir: str | os.PathLike, name: str) -> None:
    """Delete a task's two files (the `.npy` first, so a half-removed task is simply absent)."""
    check_task_name(name)
    bank = Path(bank_dir)
    if not (bank / f"{name}.npy").exists():
        raise UnknownTaskError(f"no task {name!r} in bank {bank}; tasks there: {', '.join(list_tasks(bank)) or 'none'}")
    (bank / f"{name}.npy").unlink()
    (bank / f"{name}.json").unlink(missing_ok=True)
