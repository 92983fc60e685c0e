"""The export folder: `softprompt.json` (shapes, graph names, tokens, fingerprint) and the files beside it.

The exporter writes it and the runtime trusts nothing it does not check here, so a folder from
another version or a hand-edited file fails at load with the field that is wrong. The graphs'
cache inputs and outputs are named here, once, for the exporter that writes them and the runtime
that feeds them. `open_export` reads the folder's numpy side (config, memory-mapped embedding
table, tokenizer) without loading a graph, for tools that need only the embedding space.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .embedding_table import ScaledRows, open_table
from .errors import ExportFormatError
from .json_object import parse_object

FORMAT_VERSION = 1
CONFIG_FILE = "softprompt.json"
# A decoder's graph in onnxruntime-genai's layout and genai's description of it (exporter/genai_layout.py writes
# them, runtime/native_loop.py runs them).
GENAI_GRAPH = "model.genai.onnx"
GENAI_CONFIG = "genai_config.json"
KINDS = ("decoder", "encoder", "seq2seq")
POOLINGS = ("mean", "cls", "max", "lasttoken")
# Precisions of an export's graphs. Inputs, outputs, the embedding table and prompts are float32 in each.
PRECISIONS = ("fp32", "fp16", "int8", "int4", "gguf")  # gguf: a GGUF source's own blocks (4- and 8-bit MatMulNBits)
# The files each kind of export must hold (keys of `files`).
FILES = {
    "decoder": ("model", "embeddings", "tokenizer"),
    "encoder": ("model", "embeddings", "tokenizer"),
    "seq2seq": ("encoder", "decoder", "embeddings", "tokenizer"),
}
PAST = "past_key_values."  # decoder inputs: the self-attention cache before a step
PRESENT = "present."  # decoder outputs: the cache after it
# A built decoder graph's attention (`kv_cache`): "shared" (GroupQueryAttention: past and present may be one buffer,
# written in place; it needs onnxruntime SHARED_CACHE_ORT or later, the first with the op's query_seqlens) or
# "growing" (ONNX's Attention). None: a traced graph, an encoder or an encoder-decoder (their past grows).
KV_CACHES = ("shared", "growing")
SHARED_CACHE_ORT = (1, 32)
CROSS = "cross."  # encoder-decoders: the encoder graph's cross-attention keys/values, read by every decoder step


def cache_names(prefix: str, layers: int) -> list[str]:
    """`{prefix}{i}.key`, `{prefix}{i}.value` for every layer, in the order the graphs list them."""
    return [f"{prefix}{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


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
    # Encoders: texts are cut to this many tokens (special tokens included), as sentence-transformers cuts them.
    max_seq_length: int | None = None
    # Generation settings a model's `generate` applies (encoder-decoders: forced_bos/eos_token_id).
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Encoder-decoders whose encoder graph takes `encoder_prefix.{i}.key/value`: how many encoder layers (a prefix
    # task's encoder part); None: the encoder takes no prefix (then prefix tasks are the decoder's only, PEFT's).
    encoder_prefix_layers: int | None = None
    # The graphs' weights: fp32, fp16 (for CUDA) or weight-only int8/int4 (MatMulNBits), and how they were made.
    precision: str = "fp32"
    quantization: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Set where files.embeddings is a graph's data file holding a tied lm_head that is the int8 table:
    # {"codes_offset", "scales_offset", "zero_point"}, optionally "scales_dtype" and "factor" (see docs/FORMAT.md).
    table_in_graph: dict[str, Any] | None = None
    kv_cache: str | None = None  # built decoder graphs: "shared" or "growing" (KV_CACHES)
    format_version: int = FORMAT_VERSION

    @property
    def past_names(self) -> list[str]:
        return [name for name in self.input_names if name.startswith(PAST)]

    @property
    def prefix_cache(self) -> tuple[int, int, int, int] | None:
        """(layers, kv_heads, head_size, encoder layers) of the keys and values a prefix task gives every layer (an
        encoder-decoder's: every decoder layer's self-attention, and where its encoder graph takes one, every encoder
        layer's and the cross-attention's); None where the export takes no prefix (an encoder has no past)."""
        if self.kind == "encoder":
            return None
        return (self.num_layers, self.num_kv_heads, self.head_size, self.encoder_prefix_layers or 0)

    @property
    def present_names(self) -> list[str]:
        return [name for name in self.output_names if name.startswith(PRESENT)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = CONFIG_FILE) -> ExportConfig:
        if data.get("format_version") != FORMAT_VERSION:
            raise ExportFormatError(
                f"{where}: format_version {data.get('format_version')!r}; this runtime reads "
                f"version {FORMAT_VERSION}. Re-export the model with this version's export-model."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ExportFormatError(f"{where}: missing fields {missing}")
        for key, check, what in _TYPES:
            if key in data and not check(data[key]):
                raise ExportFormatError(f"{where}: {key} is {data[key]!r:.60}; expected {what}")
        config = cls(**{key: value for key, value in data.items() if key in fields})
        for key in ("hidden_size", "vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_size"):
            value = getattr(config, key)
            if not isinstance(value, int) or value <= 0:
                raise ExportFormatError(f"{where}: {key} is {value!r}; expected a positive integer")
        named = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id}
        named |= {f"eos_token_ids[{i}]": token for i, token in enumerate(config.eos_token_ids)}
        for key, token in named.items():
            if token is not None and token >= config.vocab_size:
                raise ExportFormatError(f"{where}: {key} is {token}; expected a token id below vocab_size {config.vocab_size}")
        if config.pooling not in (None, *POOLINGS):
            raise ExportFormatError(f"{where}: pooling {config.pooling!r}; expected one of {', '.join(POOLINGS)}")
        if config.precision not in PRECISIONS:
            raise ExportFormatError(f"{where}: precision {config.precision!r}; this runtime reads {', '.join(PRECISIONS)}")
        if config.kind not in KINDS:
            raise ExportFormatError(f"{where}: kind {config.kind!r}; this runtime reads {', '.join(map(repr, KINDS))} exports")
        if config.kind != "encoder" and (
            len(config.past_names) != 2 * config.num_layers or len(config.present_names) != 2 * config.num_layers
        ):
            raise ExportFormatError(
                f"{where}: {len(config.past_names)} past and {len(config.present_names)} present names "
                f"for {config.num_layers} layers; expected {2 * config.num_layers} of each"
            )
        return config


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(_int(v) for v in value)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _table_place(value: Any) -> bool:
    places = {"codes_offset", "scales_offset", "zero_point"}
    return (
        isinstance(value, dict)
        and places <= set(value) <= places | {"scales_dtype", "factor"}
        and all(_int(value[k]) and value[k] >= 0 for k in places)
        and value["zero_point"] < 256
        and value.get("scales_dtype", "float32") in ("float32", "float16")
        and _positive_number(value.get("factor", 1.0))
    )


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# What each softprompt.json field must be, checked before anything is built from it.
_TYPES = [
    *(
        (key, lambda v: isinstance(v, str), "a string")
        for key in ("kind", "architecture", "model_type", "dtype", "fingerprint", "precision")
    ),
    ("max_positions", lambda v: v is None or (_int(v) and v >= 2), "a whole number of positions (at least 2) or null"),
    *(
        (key, lambda v: v is None or (_int(v) and v >= 0), "a token id (0 or more) or null")
        for key in ("bos_token_id", "pad_token_id")
    ),
    *((key, _int, "a whole number") for key in ("opset",)),
    ("eos_token_ids", lambda v: _ints(v) and all(i >= 0 for i in v), "a list of token ids (0 or more)"),
    *((key, _strings, "a list of strings") for key in ("input_names", "output_names")),
    ("files", lambda v: isinstance(v, dict), "an object of file names"),
    *((key, lambda v: isinstance(v, dict), "an object") for key in ("source", "validation", "generation", "quantization")),
    ("pooling", lambda v: v is None or isinstance(v, str), "a string or null"),
    ("max_seq_length", lambda v: v is None or (_int(v) and v >= 2), "a whole number of tokens (at least 2) or null"),
    ("kv_cache", lambda v: v is None or v in KV_CACHES, f"null or one of {', '.join(map(repr, KV_CACHES))}"),
    (
        "table_in_graph",
        lambda v: v is None or _table_place(v),
        "null or {codes_offset, scales_offset, zero_point} of non-negative integers (zero_point below 256), and "
        'optionally scales_dtype ("float32" or "float16") and a positive factor',
    ),
]


def read_config(export_dir: str | Path) -> ExportConfig:
    """Read and check `softprompt.json` of an export folder."""
    path = Path(export_dir) / CONFIG_FILE
    if not path.is_file():
        hint = " (is this an export-model output folder?)" if Path(export_dir).is_dir() else ""
        raise ExportFormatError(f"{path}: not found{hint}")
    return ExportConfig.from_dict(parse_object(path.read_bytes(), path, ExportFormatError, "an export's config"), str(path))


@dataclasses.dataclass(frozen=True)
class ExportFolder:
    """An export folder's numpy side: what `open_export` checked and opened."""

    folder: Path
    config: ExportConfig
    table: np.ndarray | ScaledRows  # [vocab, hidden], read-only, from the file as needed; table[ids] gives float32 rows
    tokenizer: Tokenizer

    def file(self, key: str) -> Path:
        return self.folder / self.config.files[key]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def _check_inside(folder: Path, key: str, name: object) -> None:
    """A file named in softprompt.json is a plain name in the folder and, links resolved, stays there: a
    folder from elsewhere must not make the runtime read (or map) files outside it."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ExportFormatError(f"{folder}: files.{key} is {name!r}; expected a plain file name inside the export folder")
    if not (folder / name).resolve().is_relative_to(folder.resolve()):
        raise ExportFormatError(f"{folder}: files.{key} {name!r} leads outside the export folder")


def open_export(export_dir: str | os.PathLike) -> ExportFolder:
    """Read `softprompt.json`, open the embedding table and load the tokenizer, checking each against the config."""
    folder = Path(export_dir)
    config = read_config(folder)
    for key, named in config.files.items():
        _check_inside(folder, key, named)
    for key in FILES[config.kind]:
        name = config.files.get(key)
        if not name or not (folder / name).is_file():
            raise ExportFormatError(f"{folder}: the {key} file {name!r} named in softprompt.json is missing")
    scales = config.files.get("embedding_scales")
    table = open_table(
        folder / config.files["embeddings"],
        folder / scales if scales else None,
        (config.vocab_size, config.hidden_size),
        config.table_in_graph,
    )
    try:
        tokenizer = Tokenizer.from_file(str(folder / config.files["tokenizer"]))
    except Exception as exc:  # the tokenizers library raises plain Exception
        raise ExportFormatError(f"{folder / config.files['tokenizer']}: not a readable tokenizer.json ({exc})") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return ExportFolder(folder, config, table, tokenizer)


def chat_template_source(folder: Path) -> tuple[str | None, dict[str, Any]]:
    """The export's chat template (`chat_template.jinja`, else `chat_template` in `tokenizer_config.json`; None where
    the model has none) and the tokenizer config, whose special tokens the template sees."""
    config: dict[str, Any] = {}
    path = Path(folder) / "tokenizer_config.json"
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            config = {}
    source: Any
    if (Path(folder) / "chat_template.jinja").is_file():
        source = (Path(folder) / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: transformers uses "default"
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    return (source if isinstance(source, str) and source else None), config
