"""The prompt-bank format: a folder where a task is `NAME.json`, its record, naming the file of its vectors.

A task changes as one unit. Its [P, E] soft prompt is written first to a new, immutable
`NAME.<hash>.npy` (16 hex digits of its sha256), then `NAME.json`, which names that file and holds
its full sha256, is renamed into place: the one step that switches readers from the old version to
the new. A write killed anywhere leaves the old version whole (and stray files that the next write
of the task removes); a reader that finds vectors other than the record's hash refuses them.
Banks of schema 1 (`NAME.npy` beside a `NAME.json` that names no file) are still read. What a
record holds, and the checks it passes, are task_record.py's.

Everything here needs numpy alone, so a device can read and check banks without torch.
Files are validated when they are loaded, never deep inside their first use, and every refusal
names the file, the value found and what was expected. Reads never block (a FIFO or a device in a
bank is refused, not opened for reading) and are bounded in size before anything is allocated.

>>> import tempfile, numpy as np
>>> bank = tempfile.mkdtemp()
>>> meta = save_prompt(bank, "sentiment", np.zeros((4, 8), np.float32), fingerprint="sha256:ab")
>>> load_prompt(bank, "sentiment", width=8).vectors.shape
(4, 8)
"""

from __future__ import annotations

import contextlib
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
from .task_record import (
    SCHEMA_VERSION,
    PromptMeta,
    check_extra,
    check_parts,
    parse_meta,
    vectors_file_name,
)
from .vectors_file import ALLOWED_DTYPES, read_bounded, read_vectors, sha256_hex, validate_vectors

# What a bank file may hold before it is read: a record (an encoder's head lives in it) and a prompt.
MAX_RECORD_BYTES = 16 * 2**20
# A schema 2 vectors file, NAME.<HASH_DIGITS hex digits of its sha256>.npy; group 1 is the task's name.
VECTORS_FILE = re.compile(r"(.+)\.[0-9a-f]{16}\.npy")
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # fullmatch: `$` would let a trailing newline in


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A validated task: `vectors` is [length, width] (a prompt) or [2 * layers, kv_heads, length, head_size]
    (a prefix), read-only."""

    meta: PromptMeta
    vectors: np.ndarray

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def is_prefix(self) -> bool:
        return self.meta.method == "prefix"


def check_task_name(name: str) -> str:
    """Refuse names that are not plain file stems (no paths, no leading dot: those are temp files)."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name) or name.endswith((".npy", ".json")):
        raise InvalidPromptError(
            f"invalid task name {name!r}: expected letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without a file extension"
        )
    return name


def save_prompt(
    bank_dir: str | os.PathLike,
    name: str,
    vectors: np.ndarray,
    *,
    fingerprint: str | None,
    overwrite: bool = True,
    dtype: str | None = None,
    **record: Any,
) -> PromptMeta:
    """Write task `name` into `bank_dir` as one unit: its vectors' file, then `NAME.json` naming it.

    `dtype` ("float32" or "float16") converts before saving; by default the array's own dtype
    is kept when allowed, else float32. `record` holds the record's other fields: init, source,
    training, extra.
    """
    return _save(bank_dir, name, vectors, "prompt", fingerprint=fingerprint, overwrite=overwrite, dtype=dtype, **record)


def save_prefix(
    bank_dir: str | os.PathLike,
    name: str,
    keys_values: np.ndarray,
    *,
    fingerprint: str | None,
    overwrite: bool = True,
    dtype: str | None = None,
    **record: Any,
) -> PromptMeta:
    """Write prefix task `name`: `keys_values` [2 * layers, kv_heads, P, head_size], the keys and values every
    layer attends to before the input, in the graph's cache order (layer 0 key, layer 0 value, layer 1 key, ...)."""
    return _save(bank_dir, name, keys_values, "prefix", fingerprint=fingerprint, overwrite=overwrite, dtype=dtype, **record)


def _save(
    bank_dir: str | os.PathLike,
    name: str,
    vectors: np.ndarray,
    method: str,
    *,
    fingerprint: str | None,
    overwrite: bool,
    dtype: str | None,
    init: str | None = None,
    source: str | None = None,
    training: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    parts: Mapping[str, int] | None = None,
) -> PromptMeta:
    check_task_name(name)
    bank = Path(bank_dir)
    target = dtype or (vectors.dtype.name if vectors.dtype.name in ALLOWED_DTYPES else "float32")
    if target not in ALLOWED_DTYPES:
        raise InvalidPromptError(f"dtype {target!r} for task {name!r}; expected one of {ALLOWED_DTYPES}")
    array = np.ascontiguousarray(np.asarray(vectors).astype(target, copy=False))
    where = f"{'prefix ' if method == 'prefix' else ''}task {name!r}"
    validate_vectors(array, where, ndim=(4,) if method == "prefix" else (2,))
    if method == "prefix":
        if array.shape[0] % 2:
            raise InvalidPromptError(f"{where}: {array.shape[0]} keys and values; expected a key and a value per layer")
        pairs, heads, length, size = (int(n) for n in array.shape)
        shape: dict[str, Any] = {
            "length": length,
            "width": heads * size,
            "method": method,
            "layers": pairs // 2,
            "kv_heads": heads,
            "head_size": size,
        }
        if parts is not None:
            check_parts(dict(parts), pairs // 2, where)
            shape["parts"] = dict(parts)
    else:
        if parts is not None:
            raise InvalidPromptError(f"{where}: parts are a prefix's; a prompt has none")
        shape = {"length": int(array.shape[0]), "width": int(array.shape[1])}
    if not overwrite and task_exists(bank, name):
        raise InvalidPromptError(f"{bank / (name + '.json')} exists; pass overwrite (--force) to replace it")
    meta = PromptMeta(
        name=name,
        dtype=target,
        fingerprint=fingerprint,
        init=init,
        source=source,
        training=dict(training) if training else None,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra=dict(extra or {}),
        **shape,
    )
    return _write_task(bank, meta, array)


def upgrade_bank(bank_dir: str | os.PathLike) -> list[str]:
    """Rewrite every schema 1 task of a bank as schema 2 (its record otherwise unchanged); returns their names."""
    bank = Path(bank_dir)
    upgraded = []
    for name in list_tasks(bank):
        prompt = load_prompt(bank, name)
        if prompt.meta.vectors is None:
            _write_task(bank, prompt.meta, np.asarray(prompt.vectors))
            upgraded.append(name)
    return upgraded


def _write_task(bank: Path, meta: PromptMeta, array: np.ndarray) -> PromptMeta:
    """The vectors under a new name, then the record naming them (the switch), then what is no longer named."""
    check_extra(meta.extra, meta.width, f"task {meta.name!r}", meta.length, prefix=meta.method == "prefix")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    digest = sha256_hex(data)
    vectors_name = vectors_file_name(meta.name, digest)
    meta = dataclasses.replace(meta, vectors=vectors_name, vectors_sha256=digest, schema_version=SCHEMA_VERSION)
    text = json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n"
    write_atomic(bank / vectors_name, lambda handle: handle.write(data))  # a new name: the old version is untouched
    write_atomic(bank / f"{meta.name}.json", lambda handle: handle.write(text), mode="w")  # the switch
    _remove_strays(bank, meta.name, keep=vectors_name)
    return meta


def task_exists(bank_dir: str | os.PathLike, name: str) -> bool:
    return (Path(bank_dir) / f"{name}.json").exists()


def task_of(file_name: str) -> str | None:
    """The task whose record `file_name` is (`NAME.json`), or None (vectors, temporary files, anything else)."""
    if not file_name.endswith(".json"):
        return None
    stem = file_name[: -len(".json")]
    return stem if _TASK_NAME.fullmatch(stem) and not stem.endswith((".npy", ".json")) else None


def list_tasks(bank_dir: str | os.PathLike) -> list[str]:
    """Task names in a bank: every `NAME.json` whose name is a task name (temporary files start with a dot)."""
    bank = Path(bank_dir)
    if not bank.is_dir():
        raise InvalidPromptError(f"bank {bank} is not a folder")
    try:
        return sorted(name for name in map(task_of, os.listdir(bank)) if name is not None)
    except OSError as exc:
        raise InvalidPromptError(f"bank {bank}: cannot list it ({exc.strerror or exc})") from None


def orphans(bank_dir: str | os.PathLike) -> list[str]:
    """`NAME.npy` files without a `NAME.json` record: schema 1 tasks half copied or half removed (a schema 2
    version's `NAME.<hash>.npy` is left out: a record may name it, or the next write of its task removes it)."""
    names = set(os.listdir(bank_dir))
    return sorted(
        f
        for f in names
        if f.endswith(".npy")
        and task_of(f[: -len(".npy")] + ".json")
        and f"{f[: -len('.npy')]}.json" not in names
        and not VECTORS_FILE.fullmatch(f)
    )


def misnamed(bank_dir: str | os.PathLike) -> list[str]:
    """Files that look like a task's (`.json` or `.npy` in the name) but that no reader serves, since their names are
    not task names (a space, a trailing newline, a leading dash, over 128 characters): `verify` lists them, where
    a reader skips them."""
    found = []
    for entry in os.listdir(bank_dir):
        if entry.startswith(".") or (".json" not in entry and ".npy" not in entry):
            continue
        if task_of(entry) is not None or VECTORS_FILE.fullmatch(entry):
            continue
        if entry.endswith(".npy") and task_of(entry[: -len(".npy")] + ".json") is not None:
            continue  # schema 1 vectors: a task's, or an orphan (listed as one)
        found.append(entry)
    return sorted(found)


def vectors_path(bank_dir: str | os.PathLike, meta: PromptMeta) -> Path:
    """Where a task's vectors are: the file its record names (schema 2), else `NAME.npy`."""
    return Path(bank_dir) / (meta.vectors or f"{meta.name}.npy")


def confined(bank: Path, file_name: str, task: str, what: str) -> Path:
    """`file_name` in the bank with its links resolved, refused unless it lies in the bank folder itself: no
    record, name or link may make a reader open a file elsewhere (export folders are confined the same way).
    The result has no link left in it; read it as `real=` (vectors_file.read_bounded), so a link put there since
    is refused too."""
    if not isinstance(file_name, str) or Path(file_name).name != file_name or "\\" in file_name or file_name in ("", ".", ".."):
        raise InvalidPromptError(f"task {task!r}: its {what} is {file_name!r:.80}; expected a plain file name in the bank")
    path = bank / file_name
    try:
        real = path.resolve(strict=True)
        home = bank.resolve(strict=True)
    except FileNotFoundError:
        return path  # the reader says it is missing (or retries: a writer may have just replaced it)
    except (OSError, RuntimeError):  # a loop of links
        raise InvalidPromptError(f"task {task!r}: its {what} {path} is a link that leads nowhere (a loop)") from None
    if real.parent != home:
        raise InvalidPromptError(
            f"task {task!r}: its {what} {path} is a link to a file outside the bank {bank}; a task's files must lie in "
            "its bank folder (copy the file in instead)"
        )
    return real


def load_prompt(
    bank_dir: str | os.PathLike,
    name: str,
    *,
    width: int | None = None,
    fingerprint: str | None = None,
    max_positions: int | None = None,
    cache: tuple[int, ...] | None = None,
) -> Prompt:
    """Load one task and check everything the runtime will rely on, and (when given) that it fits the backbone's
    width, fingerprint and positions. `cache` is the export's (layers, kv_heads, head_size, encoder layers) a prefix
    task must have (ExportConfig.prefix_cache): with `width` given and no `cache`, the export takes no prefix (an
    encoder's graph has no past).
    `prompt-bank verify`, `load()` and hot swap all check tasks here."""
    check_task_name(name)
    bank = Path(bank_dir)
    meta_path = bank / f"{name}.json"
    if not meta_path.exists():
        if meta_path.is_symlink():
            raise InvalidPromptError(f"{meta_path}: a link to {os.readlink(meta_path)!r}, which does not exist")
        if (bank / f"{name}.npy").exists():
            raise InvalidPromptError(f"{bank / (name + '.npy')}: has no {name}.json record beside it; every task needs one")
        raise UnknownTaskError(f"no task {name!r} in bank {bank}; tasks there: {', '.join(list_tasks(bank)) or 'none'}")
    for attempt in range(3):
        try:
            raw = read_bounded(
                meta_path, MAX_RECORD_BYTES, "a task record (JSON)", real=confined(bank, meta_path.name, name, "record")
            )
        except FileNotFoundError:
            raise InvalidPromptError(f"{meta_path}: missing; every task needs its NAME.json record") from None
        meta = parse_meta(raw, meta_path)
        if meta.name != name:  # before its vectors are looked for: the name must not lead anywhere
            raise InvalidPromptError(f"{meta_path}: name is {meta.name!r:.80}; expected {name!r} (the file's name)")
        npy = vectors_path(bank, meta)
        try:
            vectors = read_vectors(npy, meta.vectors_sha256, real=confined(bank, npy.name, name, "vectors file"))
            break
        except InvalidPromptError:
            # A writer may have replaced the record and removed the file it named since it was read.
            if attempt == 2 or npy.exists() or meta.vectors is None:
                raise
    if (vectors.shape, vectors.dtype.name) != (meta.shape, meta.dtype):
        raise InvalidPromptError(
            f"{npy}: array is {'x'.join(map(str, vectors.shape))} {vectors.dtype.name} but {meta_path.name} says "
            f"{'x'.join(map(str, meta.shape))} {meta.dtype}"
        )
    if meta.method == "prefix":
        if meta.width != (meta.kv_heads or 0) * (meta.head_size or 0):
            raise InvalidPromptError(f"{meta_path}: width {meta.width}; a prefix's is kv_heads x head_size")
        if width is not None and cache is None:
            raise BackboneMismatchError(
                f"{meta_path}: a prefix task (keys and values for every layer); this export's graph takes no past keys "
                "and values (prefix tasks serve on decoder and encoder-decoder exports)"
            )
        if meta.parts is not None:
            check_parts(meta.parts, meta.layers or 0, str(meta_path))
        found = (meta.parts["decoder"] if meta.parts else meta.layers, meta.kv_heads, meta.head_size)
        if cache is not None and found != tuple(cache[:3]):
            raise BackboneMismatchError(
                f"{npy}: a prefix for {found[0]} layers of {found[1]} key/value heads of size {found[2]}; the export has "
                f"{cache[0]} layers of {cache[1]} heads of size {cache[2]}"
            )
        encoder_layers = cache[3] if cache is not None and len(cache) > 3 else 0
        if cache is not None and meta.parts is not None and meta.parts["encoder"] != encoder_layers:
            has = (
                f"an encoder graph that takes a prefix for {encoder_layers} layers"
                if encoder_layers
                else "no encoder prefix input"
            )
            raise BackboneMismatchError(
                f"{npy}: a prefix for {meta.parts['encoder']} encoder layers as well; the export has {has} (re-export it "
                "with this version, or train a decoder-only prefix)"
            )
    elif width is not None and meta.width != width:
        raise BackboneMismatchError(f"{npy}: prompt width E={meta.width}; the backbone's embedding width is {width}")
    if fingerprint is not None and meta.fingerprint != fingerprint:
        raise BackboneMismatchError(
            f"{meta_path}: made for backbone {short(meta.fingerprint)}; this model is {short(fingerprint)}. "
            "A soft prompt only works with the backbone it was made for."
        )
    if max_positions is not None and meta.length >= max_positions:
        raise BackboneMismatchError(
            f"{npy}: a prompt of {meta.length} vectors leaves no room for text in the model's {max_positions} positions"
        )
    check_extra(meta.extra, meta.width, str(meta_path), meta.length, prefix=meta.method == "prefix")
    if meta.method == "prefix" and "head" in meta.extra:
        raise InvalidPromptError(f"{meta_path}: extra.head is an encoder's classifier; a prefix task serves decoders")
    return Prompt(meta=meta, vectors=vectors)


def load_bank(
    bank_dir: str | os.PathLike,
    *,
    width: int | None = None,
    fingerprint: str | None = None,
    max_positions: int | None = None,
    cache: tuple[int, ...] | None = None,
) -> dict[str, Prompt]:
    """Load and check every task of a bank at once, so a bad file is reported at load time."""
    return {
        name: load_prompt(bank_dir, name, width=width, fingerprint=fingerprint, max_positions=max_positions, cache=cache)
        for name in list_tasks(bank_dir)
    }


def remove_prompt(bank_dir: str | os.PathLike, name: str) -> None:
    """Delete a task: its record first (the task is gone at once), then its vectors and any strays."""
    check_task_name(name)
    bank = Path(bank_dir)
    if not task_exists(bank, name):
        raise UnknownTaskError(f"no task {name!r} in bank {bank}; tasks there: {', '.join(list_tasks(bank)) or 'none'}")
    (bank / f"{name}.json").unlink()
    _remove_strays(bank, name, keep=None)


def _remove_strays(bank: Path, name: str, keep: str | None) -> None:
    """Files of task `name` that its record does not name: older versions' vectors, schema 1's NAME.npy, and
    temporary files of killed writes.

    Task names may hold dots, so a name alone does not say whose a file is: `a.0123456789abcdef.npy` is a
    version of task `a` and the schema 1 vectors of task `a.0123456789abcdef`. Only a file that can be no other
    task's, in any of its states (a write in flight included), is removed; an ambiguous one is left as a stray.
    """
    ours = re.escape(name)
    versions = re.compile(ours + r"\.[0-9a-f]{16}\.npy")  # NAME.<hash>.npy
    temporary = re.compile(r"\." + ours + r"(\.json|\.[0-9a-f]{16}\.npy)\.[a-z0-9_]{8}\.tmp")  # atomic_writer's names
    try:
        entries = set(os.listdir(bank))
    except OSError:
        return
    for entry in entries - {keep, f"{name}.json"}:
        if versions.fullmatch(entry):
            # Also task NAME.<hash>'s schema 1 vectors, while that task has a record.
            if f"{entry[: -len('.npy')]}.json" in entries:
                continue
        elif entry == f"{name}.npy":
            if VECTORS_FILE.fullmatch(entry):  # also another task's version: ambiguous, kept
                continue
        elif not temporary.fullmatch(entry):
            continue
        with contextlib.suppress(OSError):
            os.unlink(bank / entry)
