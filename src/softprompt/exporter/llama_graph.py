"""A decoder graph written op by op for Llama-family models, instead of traced through PyTorch.

Why: at batch 1 on a CPU a decode step should cost one read of the weights, but the traced graph
has about 2,250 small nodes (shape arithmetic, the spelled-out RMSNorm, rotary embedding and
attention) whose dispatch costs a fifth of each step. Written directly it has 11 nodes a layer
(SmolLM2: 358 in all): onnxruntime's (Skip)SimplifiedLayerNormalization, one packed QKV MatMul, the
attention (which applies the rotary embedding itself where heads are 16n wide; else a Split and
RotaryEmbedding for queries and keys come first), the output projection and one packed gate/up
MatMul for the SiLU MLP. This is what onnxruntime-genai's model builder does; unlike its graphs, this
one keeps the export's interface (inputs_embeds, an attention mask with gaps, explicit position ids,
a past of any length), so left-padded batches, mixed tasks and cached prompts run unchanged.

The attention is onnxruntime's GroupQueryAttention with the mask as its additive bias (`kv_cache`
"shared", the default): given a past that is a preallocated buffer and a present bound to the same
memory, it writes the new keys and values in place, where any other attention concatenates the whole
cache into a new present every step (SmolLM2, a whole generation: int4 1.17x, int8 1.12x, fp32 1.03x
faster). Its rows all use the mask's width as their length (`seqlens_k` = T - 1), so the mask alone
says what each row sees, gaps included, and a past that is just the past works too. onnxruntime's
CUDA provider has GroupQueryAttention for fp16 only, so fp16 exports (and `kv_cache` "growing") use
ONNX's Attention (opset 23: grouped-query heads, past and present, an additive mask) instead.
softprompt.json says which (`kv_cache`), which is how the runtime knows it may share the buffer. The op
takes S new positions on a past at batch > 1 only when told each row's count (query_seqlens), which
onnxruntime has from 1.32 (SHARED_CACHE_ORT): older ones, onnxruntime-web's included, need "growing".

Tried and not used: attention spelled out in MatMul/Softmax with queries grouped per key head (the
same results with 19 nodes a layer instead of one: 5% slower in an A/B run).

Only architectures whose computation is exactly this are built (`unsupported` says why not
otherwise); the export validates the result against PyTorch either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from softprompt.formats.export_folder import KV_CACHES, PAST, PRESENT, cache_names

from .graph import CacheLayout
from .lazy_weights import external_reference

MODEL_TYPES = ("llama", "mistral", "qwen2")
MS = "com.microsoft"
OPSET = 23  # the first with Attention (grouped-query heads, past/present, additive mask)


@dataclasses.dataclass
class Layer:
    """One decoder layer's weights, as the graph uses them ([in, out] matrices, norms as gains)."""

    input_norm: np.ndarray
    qkv: np.ndarray  # [E, (Hq + 2 Hkv) D], queries pre-scaled by the attention's scaling
    qkv_bias: np.ndarray | None
    out: np.ndarray
    out_bias: np.ndarray | None
    post_norm: np.ndarray
    gate_up: np.ndarray  # [E, 2F]: gate columns, then up columns
    down: np.ndarray


@dataclasses.dataclass
class Weights:
    layers: Sequence[Layer]
    final_norm: np.ndarray
    lm_head: np.ndarray  # [E, V]
    lm_bias: np.ndarray | None
    cos: np.ndarray  # [max positions, D / 2]
    sin: np.ndarray
    eps: float
    heads: int
    kv_heads: int
    head_size: int


def unsupported(model) -> str | None:
    """Why `model` cannot be built here (the traced graph is used then), or None when it can."""
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (only silu is built)"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < (config.max_position_embeddings or 0):
        return f"sliding-window attention ({window} < {config.max_position_embeddings} positions)"
    rope = getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        return f"rope scaling {rope.get('rope_type', rope.get('type'))!r} depends on the sequence length"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} does not have the model.layers / rotary_emb / lm_head structure"
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(attention, f"{p}_proj") for p in "qkvo") or not all(
            hasattr(mlp, f"{p}_proj") for p in ("gate", "up", "down")
        ):
            return f"{type(layer).__name__} has other projections than q/k/v/o and gate/up/down"
        if hasattr(attention, "q_norm") or mlp.gate_proj.bias is not None:
            return "query/key norms or MLP biases"
    return None


def _matrix(linear) -> np.ndarray:
    return np.ascontiguousarray(linear.weight.detach().float().numpy().T)


def _bias(linear) -> np.ndarray | None:
    return None if linear.bias is None else linear.bias.detach().float().numpy()


def _gain(norm, width: int) -> tuple[np.ndarray, float]:
    """The norm's effective gain, read by running it on a vector of ones (whose RMS is 1)."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    with torch.no_grad():
        gain = norm(torch.ones(1, 1, width)).float().numpy()[0, 0] * np.sqrt(1.0 + eps)
    return gain.astype(np.float32), eps


def read_weights(model, layout: CacheLayout) -> Weights:
    """Everything the graph needs, from the PyTorch modules themselves (not from config field names).

    A layer's matrices are made when the graph reaches it (`_Layers`), so that a big model's weights are held once
    more per layer at a time, not once more whole (a 0.5B model: 2.4 GB)."""
    inner = model.model
    width = model.config.hidden_size
    kv_heads, head_size = layout.shapes[0]
    heads = int(model.config.num_attention_heads)
    _, eps = _gain(inner.layers[-1].input_layernorm, width)
    final_norm, _ = _gain(inner.norm, width)
    cos, sin = _rotary_tables(inner.rotary_emb, int(model.config.max_position_embeddings), head_size)
    layers = _Layers([lambda block=block: _layer(block, width, head_size) for block in inner.layers])
    return Weights(layers, final_norm, _matrix(model.lm_head), _bias(model.lm_head), cos, sin, eps, heads, kv_heads, head_size)


def _layer(block, width: int, head_size: int) -> Layer:
    attention, mlp = block.self_attn, block.mlp
    scale = float(getattr(attention, "scaling", head_size**-0.5))
    q, k, v = (_matrix(getattr(attention, f"{p}_proj")) for p in "qkv")
    biases = [_bias(getattr(attention, f"{p}_proj")) for p in "qkv"]
    qkv_bias = None
    if any(b is not None for b in biases):
        sizes = (q.shape[1], k.shape[1], v.shape[1])
        qkv_bias = np.concatenate([b if b is not None else np.zeros(n, np.float32) for b, n in zip(biases, sizes)])
        qkv_bias[: sizes[0]] *= scale
    return Layer(
        input_norm=_gain(block.input_layernorm, width)[0],
        qkv=np.ascontiguousarray(np.concatenate([q * scale, k, v], axis=1)),
        qkv_bias=qkv_bias,
        out=_matrix(attention.o_proj),
        out_bias=_bias(attention.o_proj),
        post_norm=_gain(block.post_attention_layernorm, width)[0],
        gate_up=np.ascontiguousarray(np.concatenate([_matrix(mlp.gate_proj), _matrix(mlp.up_proj)], axis=1)),
        down=_matrix(mlp.down_proj),
    )


class _Layers(Sequence[Layer]):
    """Layers made on first use; the two last used are kept (the graph reads layer i, then layer i + 1's norm)."""

    def __init__(self, makers: list[Callable[[], Layer]]):
        self._makers = makers
        self._made: dict[int, Layer] = {}

    def __len__(self) -> int:
        return len(self._makers)

    def __getitem__(self, index):  # type: ignore[override]  (ints only)
        index = range(len(self))[index]
        if index not in self._made:
            self._made = {i: layer for i, layer in self._made.items() if abs(i - index) == 1}
            self._made[index] = self._makers[index]()
        return self._made[index]


def _rotary_tables(rotary, positions: int, head_size: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, D/2] from the model's own rotary module (so its scaling variant is included)."""
    with torch.no_grad():
        ids = torch.arange(positions).unsqueeze(0)
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), ids)
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    half = head_size // 2
    if cos.shape[-1] != head_size or not (
        np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])
    ):
        raise ValueError("the rotary tables are not in rotate-half form")
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


class _Builder:
    """Collects nodes and initializers; names are made unique by a counter.

    With a `data` file, each initializer of 1 KiB or more is written to it as it is made (page-aligned, as
    onnxruntime maps it) and only its place is kept; without one, the arrays are kept to be made tensors once the
    graph exists."""

    def __init__(self, data: BinaryIO | None = None, location: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.arrays: list[tuple[str, np.ndarray]] = []
        self.written: list[onnx.TensorProto] = []
        self.data, self.location = data, location
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        array = np.asarray(array)
        if self.data is not None and array.nbytes >= EXTERNAL_THRESHOLD:
            self.written.append(_write(array, name, self.data, self.location))
        else:
            self.arrays.append((name, array))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        names = [self.name(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), domain=domain or None, **attrs))
        return names

    def one(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]


EXTERNAL_THRESHOLD = 1024  # bytes: smaller initializers stay inside the graph, as onnx.save_model's size_threshold
PAGE = 4096


def _write(array: np.ndarray, name: str, data: BinaryIO, location: str) -> onnx.TensorProto:
    """`array` appended to the open data file at a page boundary; the tensor that points at it."""
    data.write(b"\0" * (-data.tell() % PAGE))
    offset = data.tell()
    data.write(memoryview(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))).cast("B"))
    return external_reference(name, array.dtype, array.shape, location, offset)


def _interface(w: Weights) -> tuple[list, list]:
    E, V = w.layers[0].qkv.shape[0], w.lm_head.shape[1]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "sequence", E]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "sequence", V])]
    for past, present in zip(cache_names(PAST, len(w.layers)), cache_names(PRESENT, len(w.layers))):
        inputs.append(helper.make_tensor_value_info(past, f32, ["batch", w.kv_heads, "past_sequence", w.head_size]))
        outputs.append(helper.make_tensor_value_info(present, f32, ["batch", w.kv_heads, "total_sequence", w.head_size]))
    inputs.append(helper.make_tensor_value_info("logits_to_keep", i64, [1]))
    return inputs, outputs


def _additive_mask(b: _Builder) -> str:
    """Once per call: the additive mask [B, 1, S, T] that hides padding, gaps and later positions."""
    lowest = b.const("lowest", np.array(np.finfo(np.float32).min, np.float32))
    keep = b.one("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    padding = b.one("Mul", [b.one("Sub", [b.const("one", np.array(1.0, np.float32)), keep]), lowest])  # [B, T]
    padding = b.one("Unsqueeze", [padding, b.const("axes", np.array([1, 2]))])  # [B, 1, 1, T]
    total = b.one("Squeeze", [b.one("Shape", ["attention_mask"], start=1, end=2)])
    past = b.one("Sub", [total, b.one("Squeeze", [b.one("Shape", ["inputs_embeds"], start=1, end=2)])])
    one = b.const("step", np.array(1))
    key_columns = b.one("Range", [b.const("zero", np.array(0)), total, one])
    query_columns = b.one("Unsqueeze", [b.one("Range", [past, total, one]), b.const("axis1", np.array([1]))])
    # Query s sits at column past + s and sees keys 0 .. past + s.
    causal = b.one(
        "Where", [b.one("Greater", [key_columns, query_columns]), lowest, b.const("zero_f", np.array(0.0, np.float32))]
    )
    return b.one("Add", [padding, causal])


def _lengths(b: _Builder) -> list[str]:
    """GroupQueryAttention's seqlens_k (every row: T - 1), total_sequence_length (T) and query_seqlens (every row: S),
    int32, for T the mask's width and S the new positions: every row spans the whole mask and the bias hides what it
    must not see, so rows need not be right-padded, and S new positions on top of a past are allowed in a batch (the op
    takes several only at batch 1 unless it is told each row's count)."""
    total = b.one("Cast", [b.one("Shape", ["attention_mask"], start=1, end=2)], to=TensorProto.INT32)  # [1]
    new = b.one("Cast", [b.one("Shape", ["inputs_embeds"], start=1, end=2)], to=TensorProto.INT32)
    rows = b.one("Shape", ["attention_mask"], start=0, end=1)
    seqlens = b.one("Expand", [b.one("Sub", [total, b.const("one_i32", np.array([1], np.int32))]), rows])
    return [seqlens, b.one("Squeeze", [total]), b.one("Expand", [new, rows])]


def _skip_norm(b: _Builder, x: str, residual: str, gain: np.ndarray, eps: float, keep_sum: bool = True) -> tuple[str, str]:
    """(normalised x + residual, x + residual). The optional mean and inverse-deviation outputs stay
    unnamed: named, onnxruntime writes them for every call, which doubled the op's cost in a decode step."""
    hidden, total = b.name("skipsimplifiedlayernormalization"), b.name("residual") if keep_sum else ""
    b.op(
        "SkipSimplifiedLayerNormalization", [x, residual, b.const("norm", gain)], [hidden, "", "", total], domain=MS, epsilon=eps
    )
    return hidden, total


def build(weights: Weights, path: Path, external_data: bool = False, kv_cache: str = "shared") -> None:
    """Write the decoder graph to `path` with the export's standard inputs and outputs; `kv_cache` "shared" uses
    GroupQueryAttention (a past and present that may be one buffer), "growing" ONNX's Attention.

    With `external_data`, the weights go to `path`.data as the graph is built, layer by layer (`read_weights`
    makes a layer's matrices when they are needed), so a big model's weights are not held a second time: a 0.5B
    model's build peaked 2.3 GB above the loaded model when its arrays, then its tensors, were all made first.
    Without it (small models), the arrays become the graph's tensors one at a time once the graph exists."""
    data_path = path.with_name(f"{path.name}.data")
    data_path.unlink(missing_ok=True)
    with open(data_path, "wb") if external_data else contextlib.nullcontext() as data:
        _build(weights, path, _Builder(data, data_path.name), kv_cache)
    if external_data:
        os.chmod(data_path, path.stat().st_mode & 0o777)


def _build(weights: Weights, path: Path, b: _Builder, kv_cache: str) -> None:
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache {kv_cache!r}; expected one of {', '.join(KV_CACHES)}")
    w = weights
    inputs, outputs = _interface(w)
    mask = _additive_mask(b)
    lengths = _lengths(b) if kv_cache == "shared" else None
    cos, sin = b.const("cos_cache", w.cos), b.const("sin_cache", w.sin)
    q_size, kv_size = w.heads * w.head_size, w.kv_heads * w.head_size
    qkv_split = ""  # made when first needed: a graph whose attention takes packed QKV splits nothing
    heads = dict(num_heads=w.heads, kv_num_heads=w.kv_heads, scale=1.0)
    mlp_split = b.const("mlp_split", np.array([w.layers[0].down.shape[0]] * 2))
    norm = dict(epsilon=w.eps)
    residual = "inputs_embeds"
    past, present = cache_names(PAST, len(w.layers)), cache_names(PRESENT, len(w.layers))
    hidden = b.one(
        "SimplifiedLayerNormalization", [residual, b.const("norm", w.layers[0].input_norm)], axis=-1, stash_type=1, **norm
    )
    for i, layer in enumerate(w.layers):
        qkv = b.one("MatMul", [hidden, b.const(f"layers.{i}.qkv", layer.qkv)])
        if layer.qkv_bias is not None:
            qkv = b.one("Add", [qkv, b.const(f"layers.{i}.qkv_bias", layer.qkv_bias)])
        kv = [*past[2 * i : 2 * i + 2]]
        out = [b.name("attention"), *present[2 * i : 2 * i + 2]]
        if lengths is not None and w.head_size % 16 == 0:  # packed QKV in, rotary inside (it takes head sizes of 16n)
            args = [qkv, "", "", *kv, *lengths[:2], cos, sin, "position_ids", mask, "", "", "", "", "", lengths[2]]
            attn = b.op("GroupQueryAttention", args, out, domain=MS, do_rotary=1, **heads)[0]
        else:
            qkv_split = qkv_split or b.const("qkv_split", np.array([q_size, kv_size, kv_size]))
            q, k, v = b.op("Split", [qkv, qkv_split], 3, axis=-1)
            q = b.one("RotaryEmbedding", [q, "position_ids", cos, sin], domain=MS, num_heads=w.heads)
            k = b.one("RotaryEmbedding", [k, "position_ids", cos, sin], domain=MS, num_heads=w.kv_heads)
            if lengths is None:  # ONNX's Attention (opset 23): grouped-query heads, past + new -> present, additive mask
                attn = b.op("Attention", [q, k, v, mask, *kv], out, q_num_heads=w.heads, kv_num_heads=w.kv_heads, scale=1.0)[0]
            else:
                args = [q, k, v, *kv, *lengths[:2], "", "", "", mask, "", "", "", "", "", lengths[2]]
                attn = b.op("GroupQueryAttention", args, out, domain=MS, **heads)[0]
        attn = b.one("MatMul", [attn, b.const(f"layers.{i}.out", layer.out)])
        if layer.out_bias is not None:
            attn = b.one("Add", [attn, b.const(f"layers.{i}.out_bias", layer.out_bias)])
        hidden, residual = _skip_norm(b, attn, residual, layer.post_norm, w.eps)
        gate, up = b.op(
            "Split", [b.one("MatMul", [hidden, b.const(f"layers.{i}.gate_up", layer.gate_up)]), mlp_split], 2, axis=-1
        )
        act = b.one("Mul", [b.one("Mul", [gate, b.one("Sigmoid", [gate])]), up])  # SiLU(gate) * up
        mlp = b.one("MatMul", [act, b.const(f"layers.{i}.down", layer.down)])
        gain = w.layers[i + 1].input_norm if i + 1 < len(w.layers) else w.final_norm
        hidden, residual = _skip_norm(b, mlp, residual, gain, w.eps, keep_sum=i + 1 < len(w.layers))
    # Logits of the last `logits_to_keep` positions only (0 keeps all, as in transformers): generating needs
    # one position, and projecting every input position onto the vocabulary was a third of a first step.
    start = b.one("Neg", ["logits_to_keep"])
    hidden = b.one("Slice", [hidden, start, b.const("end", np.array([np.iinfo(np.int64).max])), b.const("axis1", np.array([1]))])
    if w.lm_bias is None:
        b.op("MatMul", [hidden, b.const("lm_head", w.lm_head)], ["logits"])
    else:
        b.op("Add", [b.one("MatMul", [hidden, b.const("lm_head", w.lm_head)]), b.const("lm_bias", w.lm_bias)], ["logits"])

    del w, weights, layer  # from here the builder holds the only references to the arrays
    graph = helper.make_graph(b.nodes, "softprompt_decoder", inputs, outputs, initializer=b.written)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)], producer_name="softprompt-onnx"
    )
    del graph
    model.ir_version = 10
    b.arrays.reverse()
    while b.arrays:
        name, array = b.arrays.pop()
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        del array
    path.unlink(missing_ok=True)
    onnx.save_model(model, str(path))  # (the data file, if any, holds its initializers already)
