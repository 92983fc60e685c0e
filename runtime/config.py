"""`softprompt.json`: what an export folder promises the runtime (shapes, names, tokens, fingerprint).

The exporter writes it and the runtime trusts nothing it does not check here, so a folder from
another version or a hand-edited file fails at load with the field that is wrong.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import ExportFormatError

FORMAT_VERSION = 1
CONFIG_FILE = "softprompt.json"
KINDS = ("decoder", "encoder", "seq2seq")
POOLINGS = ("mean", "cls", "max", "lasttoken")
# The files each kind of export must hold (keys of `files`).
FILES = {"decoder": ("model", "embeddings", "tokenizer"), "encoder": ("model", "embeddings", "tokenizer"),
         "seq2seq": ("encoder", "decoder", "embeddings", "tokenizer")}


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """The contents of `softprompt.json`."""

    kind: str  # "decoder", "encoder" or "seq2seq" (encoder-decoder: files encoder and decoder)
    architecture: str
    model_type: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    max_positions: int | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    input_names: list[str]
    output_names: list[str]
    opset: int
    dtype: str
    fingerprint: str
    files: dict[str, str]
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    validation: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Encoders: how a sentence embedding is pooled over the text's tokens (mean, cls, max, lasttoken).
    pooling: str | None = None
    # Generation settings a model's `generate` applies (encoder-decoders: forced_bos/eos_token_id).
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def past_names(self) -> list[str]:
        return [name for name in self.input_names if name.startswith("past_key_values.")]

    @property
    def present_names(self) -> list[str]:
        return [name for name in self.output_names if name.startswith("present.")]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = CONFIG_FILE) -> "ExportConfig":
        if data.get("format_version") != FORMAT_VERSION:
            raise ExportFormatError(
                f"{where}: format_version {data.get('format_version')!r}; this runtime reads "
                f"version {FORMAT_VERSION}. Re-export the model with this version's export-model."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ExportFormatError(f"{where}: missing fields {missing}")
        config = cls(**{key: value for key, value in data.items() if key in fields})
        for key in ("hidden_size", "vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_size"):
            value = getattr(config, key)
            if not isinstance(value, int) or value <= 0:
                raise ExportFormatError(f"{where}: {key} is {value!r}; expected a positive integer")
        if config.pooling not in (None, *POOLINGS):
            raise ExportFormatError(f"{where}: pooling {config.pooling!r}; expected one of {', '.join(POOLINGS)}")
        if config.kind not in KINDS:
            raise ExportFormatError(f"{where}: kind {config.kind!r}; this runtime reads {', '.join(map(repr, KINDS))} exports")
        if config.kind != "encoder" and (
                len(config.past_names) != 2 * config.num_layers or len(config.present_names) != 2 * config.num_layers):
            raise ExportFormatError(
                f"{where}: {len(config.past_names)} past and {len(config.present_names)} present names "
                f"for {config.num_layers} layers; expected {2 * config.num_layers} of each"
            )
        return config


def read_config(export_dir: str | Path) -> ExportConfig:
    """Read and check `softprompt.json` of an export folder."""
    path = Path(export_dir) / CONFIG_FILE
    if not path.is_file():
        hint = " (is this an export-model output folder?)" if Path(export_dir).is_dir() else ""
        raise ExportFormatError(f"{path}: not found{hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportFormatError(f"{path}: not valid JSON ({exc})") from None
    return ExportConfig.from_dict(data, str(path))
