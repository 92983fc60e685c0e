"""The ONNX graph: a decoder that takes `inputs_embeds` and a flat KV cache, exported with torch.export.

One graph serves the first step (past of length 0) and every later step, so the wrapper turns
the flat `past_key_values.{i}.key/value` inputs into transformers' standard cache and flattens
the updated cache back into `present.{i}.key/value` outputs. Cache shapes are read from a real
forward pass rather than from config field names, which differ between architectures.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import warnings
from pathlib import Path

import torch

from softprompt.formats.export_folder import PAST, PRESENT, cache_names

from .errors import ExportError


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Per-layer [heads, head size] of the cache, as the model really produces it."""

    shapes: list[tuple[int, int]]

    @property
    def num_layers(self) -> int:
        return len(self.shapes)

    def input_names(self) -> list[str]:
        return cache_names(PAST, self.num_layers)

    def output_names(self) -> list[str]:
        return cache_names(PRESENT, self.num_layers)


def cache_tensors(cache) -> list[torch.Tensor]:
    """Flatten a transformers cache into [key0, value0, key1, value1, ...]."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for pair in cache.to_legacy_cache() for t in pair]


def probe_cache(model) -> CacheLayout:
    """Run two tokens through the model and read the cache it builds."""
    embeds = model.get_input_embeddings()(torch.tensor([[0, 1]]))
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=torch.ones(1, 2, dtype=torch.long), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise ExportError(f"{type(model).__name__} returned no KV cache; only decoders with a standard cache are supported")
    tensors = cache_tensors(cache)
    shapes = []
    for i in range(0, len(tensors), 2):
        key, value = tensors[i], tensors[i + 1]
        shapes_found = [None if t is None else tuple(t.shape) for t in (key, value)]
        if None in shapes_found or key.dim() != 4 or key.shape != value.shape or key.shape[2] != 2:
            raise ExportError(
                f"{type(model).__name__} layer {i // 2} caches keys {shapes_found[0]} and values {shapes_found[1]}; "
                "expected [batch, heads, sequence, head size] for both (fused key/value caches are not supported)"
            )
        shapes.append((int(key.shape[1]), int(key.shape[3])))
    return CacheLayout(shapes)


def accepts_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


class CachedDecoder(torch.nn.Module):
    """inputs_embeds, attention_mask, position_ids, *past -> logits, *present."""

    def __init__(self, model, layout: CacheLayout):
        super().__init__()
        self.model = model
        self.layout = layout
        self.pass_positions = accepts_position_ids(model)
        self.window, self.layer_types = sliding_window(model.config)

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(self.layout.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs = {"position_ids": position_ids} if self.pass_positions else {}
        mask = attention_mask
        if self.window is not None:
            mask = window_masks(attention_mask, inputs_embeds.shape[1], self.window, inputs_embeds.dtype, self.layer_types)
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
            **kwargs,
        )
        return (out.logits, *cache_tensors(out.past_key_values))


def sliding_window(config) -> tuple[int | None, bool]:
    """(the attention window, whether the model mixes windowed and full layers by `layer_types`); (None, False) for
    models that attend to everything."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None, False
    types = getattr(config, "layer_types", None) or []
    if types and "sliding_attention" not in types:
        return None, False
    return int(window), bool(types)


def window_masks(mask, queries: int, window: int, dtype, by_layer_type: bool):
    """Additive [B, 1, Q, K] masks that count a window in real tokens, not columns.

    transformers measures a sliding window in cache columns. The runtime's rows are left-padded,
    and a task's cached prompt sits before the padding of the tokens fed after it, so a short
    row's window would cover padding instead of its prompt: batch != alone. Here each column's
    place is its count of real tokens before it (as position ids count), so every row sees the
    window it sees alone. Models that mix windowed and full layers get both masks by layer type.
    """
    real = mask.bool()
    place = mask.long().cumsum(-1) - 1  # [B, K]
    query = place[:, -queries:].unsqueeze(-1)  # [B, Q, 1]
    key = place.unsqueeze(1)  # [B, 1, K]
    full = real.unsqueeze(1) & (key <= query)
    windowed = full & (query - key < window)
    low = torch.finfo(dtype).min

    def additive(allowed):
        return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), low, dtype=dtype)).unsqueeze(1)

    if by_layer_type:
        return {"full_attention": additive(full), "sliding_attention": additive(windowed)}
    return additive(windowed)


def example_inputs(layout: CacheLayout, hidden: int, batch: int = 2, seq: int = 3, past: int = 4):
    """Inputs for tracing; no size is 0 or 1, so torch.export keeps every axis symbolic."""
    embeds = torch.randn(batch, seq, hidden) * 0.02
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = tuple(torch.randn(batch, heads, past, size) * 0.02 for heads, size in layout.shapes for _ in range(2))
    return embeds, mask, positions, cache


def export_graph(
    wrapper: CachedDecoder, hidden: int, path: Path, opset: int = 18, external_data: bool = False, optimize: bool = True
) -> None:
    """Export with dynamic batch, sequence, past and total lengths, and save to `path`; `optimize=False` leaves
    `optimize_saved` to the caller (who may first let the PyTorch model go)."""
    from torch.export import Dim

    layout = wrapper.layout
    batch, seq, past, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    dynamic = {
        "inputs_embeds": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * layout.num_layers)),
    }
    names_in = ["inputs_embeds", "attention_mask", "position_ids", *layout.input_names()]
    names_out = ["logits", *layout.output_names()]
    onnx_export(
        wrapper,
        example_inputs(layout, hidden),
        path,
        opset,
        external_data,
        dynamic,
        names_in,
        names_out,
        what=type(wrapper.model).__name__,
        hint=" Try --attention eager, or report the architecture.",
        optimize=optimize,
    )


def onnx_export(
    module,
    example,
    path: Path,
    opset: int,
    external_data: bool,
    dynamic,
    inputs: list[str],
    outputs: list[str],
    *,
    what: str,
    hint: str = "",
    optimize: bool = True,
) -> None:
    """torch.onnx.export(dynamo=True) with onnxruntime-ready optimisation, saved to `path`; failures as ExportError."""
    # torch logs a warning per torchvision op it cannot register; they concern no language model.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.export's tracing warnings are about internals, not the user's model
        try:
            program = torch.onnx.export(
                module,
                example,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic,
                input_names=inputs,
                output_names=outputs,
                optimize=False,  # done by optimize_saved, from the file
                verbose=False,
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"torch.onnx.export failed for {what}: {first}.{hint}") from exc
    program.save(str(path), external_data=external_data)
    del program
    if optimize:
        optimize_saved(path, external_data)


def optimize_saved(path: Path, external_data: bool) -> None:
    """What torch.onnx.export(optimize=True) runs (constant folding, dead code, onnx fusions), on the saved graph.

    From the file, not on the program torch returns: optimised there, the program's graph stays
    referenced after the export (see `drop_weights`) and PyTorch's parameters with it; that kept a
    traced Gemma-3-270m's 1 GB of weights mapped to the end of its export. The graph is the same.
    """
    import onnx_ir as ir
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    model = ir.load(str(path))
    onnxscript.optimizer.optimize_ir(model)
    onnxscript.rewriter.onnx_fusions.fuse(model)
    save_over(model, path, external_data)


def save_over(model, path: Path, external_data: bool) -> None:
    """Save an onnx_ir model loaded from `path` back to `path`, with its data file `<name>.data` if external.

    Written beside, then moved over: the loaded model still reads its weights from the old files.
    """
    import onnx_ir as ir

    scratch = path.parent / f".{path.name}.rewritten"
    scratch.mkdir()
    data_name = path.name + ".data"
    ir.save(model, str(scratch / path.name), external_data=data_name if external_data else None)
    os.replace(scratch / path.name, path)
    if external_data:
        os.replace(scratch / data_name, path.with_name(data_name))
    scratch.rmdir()
    drop_weights(model)


def drop_weights(model) -> None:
    """Empty an onnx_ir model of its weights once it is saved.

    onnxscript's rewrite rules are module-level objects whose matchers keep the last graph they
    looked at; that graph would hold its weights, the data file it was loaded from mapped, to the
    end of the export (1 GB for Gemma-3-270m). Emptied, it holds nothing of size.
    """
    for value in model.graph.initializers.values():
        value.const_value = None
