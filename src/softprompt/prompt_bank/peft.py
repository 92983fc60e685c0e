"""Conversion from and to PEFT prompt-tuning, P-tuning and prefix-tuning adapters (`adapter_config.json` + `adapter_model.*`).

PEFT keeps a prompt-tuning adapter's prompt under the key `prompt_embeddings`, shaped
[num_virtual_tokens * num_transformer_submodules, token_dim]: encoder-decoder models carry a
second block that PEFT never uses, so only the first `num_virtual_tokens` rows are the prompt.

A P-tuning adapter (Liu et al. 2021) learns its prompt through a small encoder (an MLP or LSTM over
trainable embeddings), but PEFT saves the encoder's *output* under the same key and, loaded for
inference, prepends exactly those vectors: a plain [P, E] soft prompt, served like any other task.

A prefix-tuning adapter (Li and Liang 2021) saves, under the same key, the keys and values every
layer attends to before the input: [P, layers * 2 * kv_heads * head_size] (its reparameterisation
MLP, where it has one, already applied), which PEFT views as [P, 2 * layers, kv_heads, head_size]
and hands the model as its cache. `prefix_keys_values` turns that into the bank's prefix layout,
[2 * layers, kv_heads, P, head_size]; `prefix_table` back.

For an encoder-decoder (num_transformer_submodules 2) PEFT differs from Li and Liang, who give the
encoder, the decoder and the cross-attention prefixes of their own. PEFT (0.21) gives the decoder's
self-attention alone a prefix (the encoder and the cross-attention see none), and its layer split
feeds decoder layer i the keys and values it saved for layer 2i mod L (`seq2seq_layer_sources`):
with an even number of layers, half of what it saves is never read and layer i + L/2 repeats layer
i. Imports reproduce what PEFT serves, so the bank holds each decoder layer's keys and values as
the model reads them; exports write them back where PEFT will read them, and refuse a prefix
PEFT cannot serve (layers i and i + L/2 differing).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from softprompt.formats.atomic import write_atomic

from .errors import AdapterError
from .safetensors_np import read_safetensors, safetensors_bytes

PROMPT_KEY = "prompt_embeddings"
# PEFT methods whose saved `prompt_embeddings` are the vectors prepended to the input embeddings.
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")
PREFIX_TYPE = "PREFIX_TUNING"


@dataclasses.dataclass(frozen=True)
class PeftPrompt:
    """The prompt read from an adapter, with the adapter's config for the task's record."""

    vectors: np.ndarray
    config: dict[str, Any]
    weights_file: Path
    # A sequence-classification adapter's linear classifier (PEFT saves it as a module to save):
    # {"weight": [labels, E], "bias": [labels]}; None for other adapters.
    classifier: dict[str, np.ndarray] | None = None


def read_peft_adapter(adapter_dir: str | Path) -> PeftPrompt:
    """Read a PEFT prompt-tuning adapter folder; safetensors is preferred over a pickled `.bin`."""
    folder = Path(adapter_dir)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(f"{folder}: no adapter_config.json; expected a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterError(f"{config_path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: a JSON {type(config).__name__}; expected an object (PEFT's adapter config)")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in (*PROMPT_TYPES, PREFIX_TYPE):
        raise AdapterError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; expected 'PROMPT_TUNING', 'P_TUNING' or "
            "'PREFIX_TUNING' (the methods that learn a prompt or a prefix for a frozen model)"
        )
    if peft_type == PREFIX_TYPE and config.get("num_transformer_submodules", 1) not in (1, 2):
        raise AdapterError(
            f"{config_path}: num_transformer_submodules is {config.get('num_transformer_submodules')!r}; expected 1 "
            "(a decoder-only model's prefix) or 2 (an encoder-decoder's)"
        )
    tokens = config.get("num_virtual_tokens")
    if not isinstance(tokens, int) or tokens <= 0:
        raise AdapterError(f"{config_path}: num_virtual_tokens is {tokens!r}; expected a positive integer")
    weights = _read_prompt_table(folder)
    table = weights.vectors
    if table.ndim != 2 or table.shape[0] < tokens:
        raise AdapterError(
            f"{weights.path}: {PROMPT_KEY} has shape {table.shape}; expected at least "
            f"{tokens} rows (num_virtual_tokens) of width token_dim"
        )
    token_dim = config.get("token_dim")
    if peft_type == PREFIX_TYPE:
        token_dim = token_dim * 2 * config["num_layers"] if isinstance(config.get("num_layers"), int) and token_dim else None
    if token_dim is not None and table.shape[1] != token_dim:
        says = "token_dim x 2 x num_layers" if peft_type == PREFIX_TYPE else "token_dim"
        raise AdapterError(f"{weights.path}: {PROMPT_KEY} width {table.shape[1]}; adapter_config.json's {says} is {token_dim}")
    vectors = np.ascontiguousarray(table[:tokens])
    classifier = _classifier(weights.path) if str(config.get("task_type", "")).upper() == "SEQ_CLS" else None
    return PeftPrompt(vectors=vectors, config=config, weights_file=weights.path, classifier=classifier)


def _classifier(path: Path) -> dict[str, np.ndarray]:
    """The linear classifier of a SEQ_CLS adapter (BERT-style: one Linear on the pooler output)."""
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: sequence-classification adapters are read from adapter_model.safetensors only")
    tensors = read_safetensors(path)
    found = {
        key.rsplit(".", 1)[-1]: value for key, value in tensors.items() if key.endswith(("classifier.weight", "classifier.bias"))
    }
    others = sorted(key for key in tensors if key != PROMPT_KEY and not key.endswith(("classifier.weight", "classifier.bias")))
    if set(found) != {"weight", "bias"} or others:
        raise AdapterError(
            f"{path}: a SEQ_CLS adapter with tensors {sorted(tensors)}; only a single linear "
            "'classifier' on the pooler output (BERT-style) is supported"
        )
    weight, bias = found["weight"].astype(np.float32), found["bias"].astype(np.float32)
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise AdapterError(f"{path}: classifier weight {weight.shape} / bias {bias.shape}; expected [labels, E] and [labels]")
    return {"weight": weight, "bias": bias}


@dataclasses.dataclass(frozen=True)
class _Table:
    vectors: np.ndarray
    path: Path


def _read_prompt_table(folder: Path) -> _Table:
    safetensors = folder / "adapter_model.safetensors"
    if safetensors.is_file():
        try:
            return _Table(read_safetensors(safetensors, [PROMPT_KEY])[PROMPT_KEY], safetensors)
        except (KeyError, ValueError) as exc:
            raise AdapterError(str(exc).strip('"')) from None
    pickled = folder / "adapter_model.bin"
    if not pickled.is_file():
        raise AdapterError(f"{folder}: neither adapter_model.safetensors nor adapter_model.bin found")
    try:
        import torch  # a .bin adapter is a torch pickle: reading it needs torch
    except ImportError:
        raise AdapterError(
            f"{pickled} is a PyTorch pickle and torch is not installed; re-save the adapter with "
            "safe_serialization=True, or: pip install 'softprompt-onnx[export]'"
        ) from None
    try:
        state = torch.load(pickled, map_location="cpu", weights_only=True)  # never a full unpickle
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise AdapterError(f"{pickled}: cannot be read safely ({exc})") from None
    if PROMPT_KEY not in state:
        raise AdapterError(f"{pickled}: no key {PROMPT_KEY!r}; keys there: {sorted(state)}")
    return _Table(state[PROMPT_KEY].detach().float().numpy(), pickled)


def seq2seq_layer_sources(layers: int) -> list[int]:
    """For each decoder layer, the layer whose saved keys and values PEFT's seq2seq prefix feeds it.

    PEFT doubles the [2 * layers] key/value axis (one copy per "submodule"), splits it into groups of
    four and takes each group's first two as a decoder layer's self-attention past: layer i reads
    entries 4i and 4i + 1 of the doubled axis, saved layer 2i mod layers."""
    return [(2 * i) % layers for i in range(layers)]


def prefix_keys_values(
    table: np.ndarray, layers: int, kv_heads: int, head_size: int, where: str, submodules: int = 1
) -> np.ndarray:
    """PEFT's saved prefix [P, layers * 2 * kv_heads * head_size] as the bank's [2 * layers, kv_heads, P, head_size]
    (layer 0 key, layer 0 value, layer 1 key, ...: the order PEFT splits it into the model's cache). With
    `submodules` 2 (an encoder-decoder), each decoder layer gets what PEFT feeds it (`seq2seq_layer_sources`)."""
    expected = layers * 2 * kv_heads * head_size
    if table.ndim != 2 or table.shape[1] != expected:
        raise AdapterError(
            f"{where}: {PROMPT_KEY} has shape {table.shape}; the export's cache needs [P, {expected}] "
            f"({layers} layers x key and value x {kv_heads} key/value heads x head size {head_size})"
        )
    length = table.shape[0]
    saved = table.reshape(length, layers, 2, kv_heads, head_size).transpose(1, 2, 3, 0, 4)
    if submodules == 2:
        saved = saved[seq2seq_layer_sources(layers)]
    return np.ascontiguousarray(saved.reshape(2 * layers, kv_heads, length, head_size))


def prefix_table(keys_values: np.ndarray, submodules: int = 1) -> np.ndarray:
    """The inverse of `prefix_keys_values`: PEFT's [P, layers * 2 * kv_heads * head_size]. For an encoder-decoder a
    layer PEFT never reads is saved as zeros, and a prefix whose layers PEFT would feed the same keys and values
    but that differ is refused (PEFT cannot serve it)."""
    pairs, heads, length, size = keys_values.shape
    layers = pairs // 2
    per_layer = keys_values.reshape(layers, 2, heads, length, size)
    if submodules == 2:
        saved = np.zeros_like(per_layer)
        owner: dict[int, int] = {}
        for layer, source in enumerate(seq2seq_layer_sources(layers)):
            if source in owner and not np.array_equal(per_layer[owner[source]], per_layer[layer]):
                raise AdapterError(
                    f"decoder layers {owner[source]} and {layer} have different prefixes; PEFT's seq2seq prefix tuning "
                    f"feeds both the keys and values it saves for layer {source}, so it cannot serve this prefix"
                )
            owner[source] = layer
            saved[source] = per_layer[layer]
        per_layer = saved
    return np.ascontiguousarray(per_layer.transpose(3, 0, 1, 2, 4).reshape(length, pairs * heads * size))


def adapter_init(config: dict[str, Any]) -> str:
    """Describe how PEFT initialised the prompt, for the task's record."""
    if str(config.get("peft_type", "")).upper() == PREFIX_TYPE:
        return "peft:prefix-tuning" + (":projection" if config.get("prefix_projection") else "")
    if str(config.get("peft_type", "")).upper() == "P_TUNING":
        return f"peft:p-tuning:{str(config.get('encoder_reparameterization_type', 'MLP')).lower()}"
    init = str(config.get("prompt_tuning_init", "unknown")).lower()
    text = config.get("prompt_tuning_init_text")
    return f"peft:{init}" + (f":{text!r}" if text and init == "text" else "")


def write_peft_adapter(
    out_dir: str | Path,
    vectors: np.ndarray,
    *,
    num_layers: int,
    num_attention_heads: int,
    base_model: str | None = None,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` that `PeftModel.from_pretrained` loads.

    The template and labels of a task have no place in a PEFT adapter; only the prompt goes.
    Files are written through temporary names, so an existing adapter is replaced whole or not at all.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if vectors.ndim == 4:
        return _write_prefix_adapter(folder, vectors, base_model=base_model, task_type=task_type)
    length, width = vectors.shape
    # PEFT gives a seq2seq model's prompt table a second block (for the decoder) that prompt tuning
    # never reads; its loader expects the [2N, E] shape, so the prompt is written twice.
    submodules = 2 if task_type == "SEQ_2_SEQ_LM" else 1
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": task_type,
        "num_virtual_tokens": int(length),
        "token_dim": int(width),
        "num_transformer_submodules": submodules,
        "num_attention_heads": int(num_attention_heads),
        "num_layers": int(num_layers),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "modules_to_save": None,
    }
    data = safetensors_bytes({PROMPT_KEY: np.tile(np.asarray(vectors, dtype=np.float32), (submodules, 1))})
    write_atomic(folder / "adapter_model.safetensors", lambda handle: handle.write(data))
    text = json.dumps(config, indent=2) + "\n"
    write_atomic(folder / "adapter_config.json", lambda handle: handle.write(text), mode="w")
    return folder


def _write_prefix_adapter(folder: Path, keys_values: np.ndarray, *, base_model: str | None, task_type: str) -> Path:
    """A PREFIX_TUNING adapter holding `keys_values` [2 * layers, kv_heads, P, head_size] as PEFT saves one (without
    its reparameterisation MLP: `prefix_projection` false, the saved table is the prefix itself)."""
    if task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise AdapterError(f"a prefix task exports as a CAUSAL_LM or SEQ_2_SEQ_LM adapter, not {task_type}")
    submodules = 2 if task_type == "SEQ_2_SEQ_LM" else 1
    table = prefix_table(np.asarray(keys_values, dtype=np.float32), submodules)
    pairs, heads, length, size = keys_values.shape
    config = {
        "peft_type": PREFIX_TYPE,
        "task_type": task_type,
        "num_virtual_tokens": int(length),
        "token_dim": int(heads * size),  # PEFT's for grouped-query models: kv_heads x head_size
        "num_transformer_submodules": submodules,
        "num_attention_heads": int(heads),
        "num_layers": int(pairs // 2),
        "encoder_hidden_size": int(heads * size),
        "prefix_projection": False,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "modules_to_save": None,
    }
    data = safetensors_bytes({PROMPT_KEY: table})
    write_atomic(folder / "adapter_model.safetensors", lambda handle: handle.write(data))
    text = json.dumps(config, indent=2) + "\n"
    write_atomic(folder / "adapter_config.json", lambda handle: handle.write(text), mode="w")
    return folder
