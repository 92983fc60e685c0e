"""A task's record, `NAME.json` in a bank: its fields (`PromptMeta`), and the checks a record passes when it is read
(`parse_meta`) or written (`check_parts`, `check_extra`) before any vectors are looked at. The bank folder itself,
its writes and reads, is bank.py's."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InvalidPromptError
from .json_object import parse_object
from .task import TaskSpec, parse_head
from .vectors_file import ALLOWED_DTYPES, HASH_DIGITS

SCHEMA_VERSION = 2
READ_SCHEMAS = (1, 2)  # 1: vectors in NAME.npy, no hash (written before tasks changed as one unit)
METHODS = ("prompt", "prefix")
PREFIX_FIELDS = ("method", "layers", "kv_heads", "head_size")


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
    vectors: str | None = None  # the vectors' file in the bank (schema 2); None: NAME.npy (schema 1)
    vectors_sha256: str | None = None
    schema_version: int = SCHEMA_VERSION
    # "prompt": [P, E] vectors before the input embeddings; "prefix": keys and values for P positions at every
    # layer, [2 * layers, kv_heads, P, head_size] in the graph's cache order (layer 0 key, layer 0 value, ...).
    method: str = "prompt"
    layers: int | None = None  # prefix only, with kv_heads and head_size: the cache shape it was made for
    kv_heads: int | None = None
    head_size: int | None = None
    # An encoder-decoder's prefix for its encoder and cross-attention as well (Li and Liang): how many of the
    # `layers` key/value pairs are each part's, {"decoder": Ld, "encoder": Le, "cross": Ld}, held in that order.
    # None: every pair is the graph's past (a decoder's layers; an encoder-decoder's decoder self-attention, PEFT's).
    parts: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.method == "prompt":  # a prompt's record stays what every schema 2 reader knows
            for key in PREFIX_FIELDS:
                del data[key]
        if self.parts is None:
            del data["parts"]
        return data

    @property
    def shape(self) -> tuple[int, ...]:
        """The vectors' shape this record describes."""
        if self.method == "prefix":
            return (2 * (self.layers or 0), self.kv_heads or 0, self.length, self.head_size or 0)
        return (self.length, self.width)


PARTS = ("decoder", "encoder", "cross")


def check_parts(parts: Any, layers: int, where: str) -> None:
    """A prefix's `parts`: a count of key/value pairs for each of the three (the array holds them in PARTS order),
    adding up to `layers`."""
    if not isinstance(parts, dict) or set(parts) != set(PARTS):
        raise InvalidPromptError(f"{where}: parts {parts!r:.80}; expected {{'decoder': N, 'encoder': N, 'cross': N}}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in parts.values()):
        raise InvalidPromptError(f"{where}: parts {parts!r}; expected positive layer counts")
    if sum(parts.values()) != layers or parts["decoder"] != parts["cross"]:
        raise InvalidPromptError(
            f"{where}: parts {parts!r} for {layers} key/value pairs; expected decoder + encoder + cross = {layers}, and as "
            "many cross-attention layers as decoder layers"
        )


def vectors_file_name(name: str, sha256: str) -> str:
    return f"{name}.{sha256[:HASH_DIGITS]}.npy"


def parse_meta(raw: bytes, path: Path) -> PromptMeta:
    """A record's bytes checked against the schema; `path` is the record's place in its bank (NAME.json)."""
    data = parse_object(raw, path, InvalidPromptError, "a task record")
    version = data.get("schema_version")
    if version not in READ_SCHEMAS or isinstance(version, bool):
        raise InvalidPromptError(f"{path}: schema_version {version!r}; this version reads {', '.join(map(str, READ_SCHEMAS))}")
    fields = {f.name: f for f in dataclasses.fields(PromptMeta)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidPromptError(f"{path}: unknown fields {unknown}; expected only {sorted(fields)}")
    required = ("name", "length", "width", "dtype", "fingerprint") + (("vectors", "vectors_sha256") if version >= 2 else ())
    missing = [key for key in required if key not in data]
    if missing:
        raise InvalidPromptError(f"{path}: missing fields {missing}")
    for key in ("length", "width"):
        if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] <= 0:
            raise InvalidPromptError(f"{path}: {key} is {data[key]!r}; expected a positive integer")
    if data["dtype"] not in ALLOWED_DTYPES:
        raise InvalidPromptError(f"{path}: dtype {data['dtype']!r}; expected one of {ALLOWED_DTYPES}")
    for key, kind in (
        ("fingerprint", str),
        ("init", str),
        ("source", str),
        ("created", str),
        ("training", dict),
        ("extra", dict),
    ):
        value = data.get(key)
        if value is not None and not isinstance(value, kind):
            raise InvalidPromptError(f"{path}: {key} is {value!r}; expected {'an object' if kind is dict else 'a string'}")
    method = data.get("method", "prompt")
    if method not in METHODS:
        raise InvalidPromptError(f"{path}: method {method!r}; expected one of {', '.join(METHODS)}")
    for key in PREFIX_FIELDS[1:]:
        value = data.get(key)
        if method == "prefix" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise InvalidPromptError(f"{path}: {key} is {value!r}; a prefix task's record gives it as a positive integer")
        if method == "prompt" and value is not None:
            raise InvalidPromptError(f"{path}: {key} is {value!r} in a prompt task's record; only prefix tasks have it")
    if data.get("parts") is not None:
        if method != "prefix":
            raise InvalidPromptError(f"{path}: parts in a prompt task's record; only prefix tasks have them")
        check_parts(data["parts"], data["layers"], str(path))
    if "extra" in data and data["extra"] is None:
        raise InvalidPromptError(f"{path}: extra is null; expected an object (empty for a task without template or labels)")
    if version == 1 and (data.get("vectors") is not None or data.get("vectors_sha256") is not None):
        raise InvalidPromptError(
            f"{path}: a schema 1 record naming a vectors file ({data.get('vectors')!r:.80}); schema 1 keeps a task's vectors "
            "in NAME.npy beside its record, and only schema 2 records name a file (with its sha256)"
        )
    if version >= 2:
        stem = path.name[: -len(".json")]
        named, digest = data["vectors"], data["vectors_sha256"]
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise InvalidPromptError(f"{path}: vectors_sha256 is {digest!r}; expected 64 lowercase hex digits")
        if named != vectors_file_name(stem, digest):
            raise InvalidPromptError(f"{path}: vectors is {named!r}; expected {vectors_file_name(stem, digest)}, in the bank")
    return PromptMeta(**data)


def check_extra(extra: Mapping[str, Any], width: int, where: str, length: int | None = None, prefix: bool = False) -> None:
    """The task in a record's `extra`: template (its slots must hold the task's `length` vectors; a prefix has none
    to place), labels, an encoder's head, as the runtime will read them."""
    spec = TaskSpec.from_extra(extra, where)
    if prefix and spec.slots:
        raise InvalidPromptError(f"{where}: template {spec.template!r} has slots for vectors; a prefix task has none to place")
    if length is not None:
        spec.check_length(length, where)
    kind = extra.get("kind")
    if kind is not None and kind not in ("classification", "generation"):
        raise InvalidPromptError(f"{where}: kind {kind!r}; expected 'classification' or 'generation'")
    parse_head(extra.get("head"), list(spec.labels), width, where)
