"""Encoder-decoders (T5, BART and the like): two graphs, the soft prompt on the encoder input only.

- `encoder.onnx`: inputs_embeds [B, S, E], attention_mask [B, S] (and, where the encoder's heads
  match the decoder's, `encoder_prefix.{i}.key/value` [B, H, P, D] for every encoder layer: a prefix
  task's encoder part, P = 0 for other rows; encoder_prefix.py) -> `cross.{i}.key/value`
  [B, H, S, D] for every decoder layer. The cross-attention keys and values depend on the encoder
  output alone, so they are computed once per request, in the encoder graph, and never again.
- `decoder.onnx`: inputs_embeds [B, T, E] (decoder tokens, from the same embedding table),
  encoder_attention_mask [B, S], `past_key_values.{i}.key/value` (self-attention, past 0 on the
  first step) and `cross.{i}.key/value` -> logits [B, T, V], `present.{i}.key/value`.

As in PEFT's prompt tuning of a seq2seq model, the prompt rows lead the encoder input and their
attention-mask columns are passed on to the decoder's cross-attention. The embedding table is the
output of the model's own input-embedding module (BART's scaled embedding included), which is
what the model computes for token ids itself; the graphs take embeddings, so both agree.

The graphs are traced through the model's own forward with a transformers `EncoderDecoderCache`:
the encoder graph runs one throw-away decoder step to make the model fill its cross-attention
cache (dead code is dropped from the graph), and the decoder graph marks that cache as filled
so the model reads it instead of recomputing it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from softprompt.formats.export_folder import CROSS, PAST, PRESENT, cache_names

from .encoder_prefix import encode, self_attention_shape
from .errors import ExportError
from .graph import cache_tensors, onnx_export
from .validate import passed, relative_diff

ENCODER_PREFIX = "encoder_prefix."  # encoder graph inputs: a prefix task's keys and values for every encoder layer


def encoder_prefix_layers(model, self_shapes: list[tuple[int, int]], cross_shapes: list[tuple[int, int]]) -> int:
    """How many encoder layers a prefix task can reach (0: none). A prefix is one array of one [heads, P, head size]
    per layer, so the encoder's self-attention and the cross-attention must have the decoder's heads."""
    try:
        layers, heads, size = self_attention_shape(model)
    except ExportError:
        return 0
    shapes = {(heads, size), *self_shapes, *cross_shapes}
    return layers if len(shapes) == 1 else 0


def cross_layout(model) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Per decoder layer [heads, head size] of the self- and cross-attention caches, from a real forward pass."""
    self_cache, cross_cache = _run(
        model, _embed(model, [[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long), _embed(model, [[_start_id(model)]])
    )
    shapes = []
    for tensors in (cache_tensors(self_cache), cache_tensors(cross_cache)):
        if not tensors or any(t is None or t.dim() != 4 for t in tensors):
            raise ExportError(f"{type(model).__name__} does not fill a standard encoder-decoder KV cache; not supported")
        shapes.append([(int(tensors[i].shape[1]), int(tensors[i].shape[3])) for i in range(0, len(tensors), 2)])
    return shapes[0], shapes[1]


def check_shared_embeddings(model, table: np.ndarray) -> None:
    """The runtime feeds both graphs rows of one table: the encoder's and decoder's own lookups must give it."""
    ids = torch.arange(table.shape[0]).unsqueeze(0)
    for side in ("encoder", "decoder"):
        module = getattr(model, f"get_{side}")().get_input_embeddings()
        with torch.no_grad():
            rows = module(ids)[0].float().numpy()
        if rows.shape != table.shape or not np.allclose(rows, table, rtol=0, atol=1e-6 * max(1.0, float(np.abs(table).max()))):
            raise ExportError(
                f"{type(model).__name__}: the {side}'s input embeddings differ from the shared table; "
                "models with separate encoder and decoder vocabularies are not supported"
            )


def input_scales(model) -> tuple[float, float]:
    """What the encoder and the decoder multiply token embeddings by when given ids but not when given embeddings.

    BART scales inside its embedding module, so embeddings from the table are already scaled (1.0
    here). Marian, Pegasus and Blenderbot-small scale the encoder's embeddings only on the ids
    path (their decoders scale both ways): a graph fed table rows must apply that factor itself,
    or tokens and prompt would enter the encoder sqrt(d_model) too small. Found by running each
    side both ways, not by reading model code. Cached on the model.
    """
    cached = getattr(model, "_softprompt_input_scales", None)
    if cached is not None:
        return cached
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    embeds = model.get_input_embeddings()(ids)
    encoder, decoder = model.get_encoder(), model.get_decoder()
    scales = []
    with torch.no_grad():
        hidden = encoder(input_ids=ids).last_hidden_state
        for side, module, run in (
            ("encoder", encoder, lambda **kw: encoder(**kw).last_hidden_state),
            ("decoder", decoder, lambda **kw: decoder(encoder_hidden_states=hidden, use_cache=False, **kw).last_hidden_state),
        ):
            want = run(input_ids=ids)
            candidates = dict.fromkeys([1.0, float(getattr(module, "embed_scale", 1.0) or 1.0)])
            found = [c for c in candidates if torch.allclose(run(inputs_embeds=embeds * c), want, rtol=1e-4, atol=1e-5)]
            if not found:
                raise ExportError(
                    f"{type(model).__name__}: the {side} gives other outputs for token embeddings than for "
                    "token ids, by no factor this exporter knows; not supported"
                )
            scales.append(found[0])
    model._softprompt_input_scales = (scales[0], scales[1])
    return model._softprompt_input_scales


def _embed(model, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor(ids))


def _start_id(model) -> int:
    start = model.config.decoder_start_token_id
    if start is None:
        raise ExportError(f"{type(model).__name__}: config has no decoder_start_token_id; cannot generate")
    return int(start)


def _run(model, embeds, mask, decoder_embeds, self_cache=None, cross_cache=None, encoder_hidden=None, fill=False):
    """One forward of the whole model through transformers' encoder-decoder cache; returns the two caches (and the
    output, given `encoder_hidden` and a filled cross cache; with `fill`, the cross cache is made from it)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    self_cache = self_cache if self_cache is not None else DynamicCache()
    cross_cache = cross_cache if cross_cache is not None else DynamicCache()
    cache = EncoderDecoderCache(self_cache, cross_cache)
    kwargs = {}
    if encoder_hidden is not None:
        kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder_hidden)
        if not fill:
            cache.is_updated = {i: True for i in range(len(cross_cache))}  # the cross cache is filled: read it
    else:
        kwargs["inputs_embeds"] = embeds
    with torch.no_grad():
        out = model(
            attention_mask=mask,
            decoder_inputs_embeds=decoder_embeds,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
            **kwargs,
        )
    if encoder_hidden is not None and not fill:
        return out
    return out.past_key_values.self_attention_cache, out.past_key_values.cross_attention_cache


class Seq2SeqEncoder(torch.nn.Module):
    """inputs_embeds [B, S, E], attention_mask [B, S], *encoder prefix -> cross.{i}.key, cross.{i}.value."""

    def __init__(self, model, prefix_layers: int = 0):
        super().__init__()
        self.model = model
        self.scale = input_scales(model)[0]
        self.prefix_layers = prefix_layers

    def forward(self, inputs_embeds, attention_mask, prefix=()):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        if self.scale != 1.0:  # what the encoder does to token embeddings on its ids path
            inputs_embeds = inputs_embeds * self.scale
        kwargs = {"inputs_embeds": inputs_embeds}
        if self.prefix_layers:
            hidden = encode(self.model, inputs_embeds, attention_mask, prefix)
            kwargs = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden)}
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = inputs_embeds.new_zeros((inputs_embeds.shape[0], 1, inputs_embeds.shape[2]))
        out = self.model(
            attention_mask=attention_mask,
            decoder_inputs_embeds=start,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
            **kwargs,
        )
        return tuple(cache_tensors(out.past_key_values.cross_attention_cache))


class Seq2SeqDecoder(torch.nn.Module):
    """inputs_embeds [B, T, E], encoder_attention_mask [B, S], *past, *cross -> logits [B, T, V], *present."""

    def __init__(self, model, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers
        self.scale = input_scales(model)[1]

    def forward(self, inputs_embeds, encoder_attention_mask, past, cross):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        if self.scale != 1.0:
            inputs_embeds = inputs_embeds * self.scale

        self_cache, cross_cache = DynamicCache(), DynamicCache()
        for i in range(self.layers):
            self_cache.update(past[2 * i], past[2 * i + 1], i)
            cross_cache.update(cross[2 * i], cross[2 * i + 1], i)
        cache = EncoderDecoderCache(self_cache, cross_cache)
        cache.is_updated = {i: True for i in range(self.layers)}
        # The decoder layers only look at the encoder output through the cross cache; the model
        # still wants a tensor of the right shape to decide that cross-attention runs.
        shape = (encoder_attention_mask.shape[0], encoder_attention_mask.shape[1], inputs_embeds.shape[2])
        placeholder = inputs_embeds.new_zeros(shape)
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=placeholder),
            attention_mask=encoder_attention_mask,
            decoder_inputs_embeds=inputs_embeds,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        return (out.logits, *cache_tensors(out.past_key_values.self_attention_cache))


def names(layers: int, encoder_layers: int = 0) -> dict[str, list[str]]:
    return {
        "past": cache_names(PAST, layers),
        "present": cache_names(PRESENT, layers),
        "cross": cache_names(CROSS, layers),
        "encoder_prefix": cache_names(ENCODER_PREFIX, encoder_layers),
    }


def export_seq2seq_graphs(model, folder: Path, opset: int, external_data: bool, layout: tuple) -> None:
    """Write encoder.onnx and decoder.onnx into `folder`.

    `layout` is `cross_layout(model)`: the self- and cross-attention cache shapes per layer, and
    `encoder_prefix_layers` (0: the encoder graph takes no prefix).
    """
    from torch.export import Dim

    self_shapes, cross_shapes, encoder_layers = layout
    layers = len(self_shapes)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    n = names(layers, encoder_layers)
    batch, seq, src, past = Dim("batch"), Dim("sequence"), Dim("source_sequence"), Dim("past_sequence")
    b, s, t, p = 2, 5, 3, 4  # no size 0 or 1, so torch.export keeps every axis symbolic
    embeds = torch.randn(b, s, hidden) * 0.02
    mask = torch.ones(b, s, dtype=torch.long)
    encoder = Seq2SeqEncoder(model, encoder_layers)
    heads, size = self_shapes[0]
    prefix = tuple(torch.randn(b, heads, 3, size) * 0.02 for _ in n["encoder_prefix"])
    dynamic: dict = {"inputs_embeds": {0: batch, 1: src}, "attention_mask": {0: batch, 1: src}}
    if encoder_layers:
        dynamic["prefix"] = tuple({0: batch, 2: Dim("prefix_length")} for _ in prefix)
    _export(
        encoder,
        (embeds, mask, prefix) if encoder_layers else (embeds, mask),
        folder / "encoder.onnx",
        opset,
        external_data,
        dynamic,
        ["inputs_embeds", "attention_mask", *n["encoder_prefix"]],
        n["cross"],
    )
    cross = tuple(torch.randn(b, h, s, d) * 0.02 for h, d in cross_shapes for _ in range(2))
    pasts = tuple(torch.randn(b, h, p, d) * 0.02 for h, d in self_shapes for _ in range(2))
    decoder = Seq2SeqDecoder(model, layers)
    _export(
        decoder,
        (torch.randn(b, t, hidden) * 0.02, mask, pasts, cross),
        folder / "decoder.onnx",
        opset,
        external_data,
        {
            "inputs_embeds": {0: batch, 1: seq},
            "encoder_attention_mask": {0: batch, 1: src},
            "past": tuple({0: batch, 2: past} for _ in pasts),
            "cross": tuple({0: batch, 2: src} for _ in cross),
        },
        ["inputs_embeds", "encoder_attention_mask", *n["past"], *n["cross"]],
        ["logits", *n["present"]],
    )


def _export(module, example, path: Path, opset: int, external_data: bool, dynamic, inputs, outputs) -> None:
    onnx_export(
        module,
        example,
        path,
        opset,
        external_data,
        dynamic,
        inputs,
        outputs,
        what=f"the {path.stem} of {type(module.model).__name__}",
        hint=" Try --attention eager, or report the architecture.",
    )


def validate_seq2seq(folder: Path, model, table: np.ndarray, tolerance: float) -> dict:
    """Both graphs against PyTorch: padded encoder rows, then two decoder steps with a growing self cache."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    embeds = table[rng.integers(0, table.shape[0], (2, 6))].astype(np.float32)
    mask = np.ones((2, 6), dtype=np.int64)
    mask[1, 4:] = 0
    start = _start_id(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    encoder = ort.InferenceSession(str(folder / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(folder / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    prefix_names = [i.name for i in encoder.get_inputs() if i.name.startswith(ENCODER_PREFIX)]
    heads, size = encoder.get_outputs()[0].shape[1], encoder.get_outputs()[0].shape[3]
    empty = {name: np.zeros((2, heads, 0, size), np.float32) for name in prefix_names}
    cross = encoder.run(None, {"inputs_embeds": embeds, "attention_mask": mask, **empty})
    encoder_scale, decoder_scale = input_scales(model)
    self_cache, cross_cache = _run(
        model,
        torch.from_numpy(embeds) * encoder_scale,
        torch.from_numpy(mask),
        torch.from_numpy(table[[[start], [start]]]) * decoder_scale,
    )
    want_cross = [t.numpy() for t in cache_tensors(cross_cache)]
    diffs = {"cross keys/values": _cache_diff(cross, want_cross, mask)}
    if prefix_names:
        prefix = [rng.standard_normal((2, heads, 3, size)).astype(np.float32) for _ in prefix_names]
        got = encoder.run(None, {"inputs_embeds": embeds, "attention_mask": mask, **dict(zip(prefix_names, prefix))})
        want = _prefixed_cross(model, torch.from_numpy(embeds) * encoder_scale, torch.from_numpy(mask), prefix)
        diffs["cross keys/values under an encoder prefix"] = _cache_diff(got, want, mask)
    layers = len(cross) // 2
    n = names(layers)
    past = [np.zeros((2, t.shape[1], 0, t.shape[3]), dtype=np.float32) for t in want_cross]
    tokens = np.array([[start], [start]])
    from transformers.cache_utils import DynamicCache

    torch_self = DynamicCache()
    torch_cross = DynamicCache()
    for i in range(layers):
        torch_cross.update(torch.from_numpy(want_cross[2 * i]), torch.from_numpy(want_cross[2 * i + 1]), i)
    worst = 0.0
    for _ in range(2):
        step_embeds = table[tokens].astype(np.float32)
        feeds = {
            "inputs_embeds": step_embeds,
            "encoder_attention_mask": mask,
            **dict(zip(n["past"], past)),
            **dict(zip(n["cross"], cross)),
        }
        logits, *past = decoder.run(None, feeds)
        hidden = torch.zeros(2, 6, table.shape[1])
        want = _run(
            model, None, torch.from_numpy(mask), torch.from_numpy(step_embeds) * decoder_scale, torch_self, torch_cross, hidden
        )
        torch_self = want.past_key_values.self_attention_cache
        expected = want.logits.numpy()
        worst = max(worst, relative_diff(logits, expected))
        tokens = logits[:, -1:].argmax(-1)
    diffs["decoder logits, 2 cached steps"] = worst
    return passed(diffs, tolerance)


def _prefixed_cross(model, embeds: torch.Tensor, mask: torch.Tensor, prefix: list[np.ndarray]) -> list[np.ndarray]:
    """PyTorch's cross-attention keys and values when the encoder attends to `prefix` before the text."""

    with torch.no_grad():
        hidden = encode(model, embeds, mask, [torch.from_numpy(p) for p in prefix])
    start = torch.zeros(embeds.shape[0], 1, embeds.shape[2])
    _, cross = _run(model, None, mask, start, encoder_hidden=hidden, fill=True)
    return [t.numpy() for t in cache_tensors(cross)]


def _cache_diff(got: list[np.ndarray], want: list[np.ndarray], mask: np.ndarray) -> float:
    """The worst relative difference over cache tensors [B, H, S, D], at real source positions only."""
    keep = mask.astype(bool)
    return max(relative_diff(g.transpose(0, 2, 1, 3)[keep], w.transpose(0, 2, 1, 3)[keep]) for g, w in zip(got, want))


def seq2seq_facts(model, table: np.ndarray, self_shapes: list[tuple[int, int]]) -> dict:
    config = model.config
    heads, head_size = self_shapes[0]
    return {
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "hidden_size": int(table.shape[1]),
        "vocab_size": int(table.shape[0]),
        "num_layers": len(self_shapes),
        "num_heads": heads,
        "num_kv_heads": heads,
        "head_size": head_size,
        "max_positions": _encoder_positions(config),
    }


def _encoder_positions(config) -> int | None:
    """Learned positions cap the encoder input (BART); T5's relative positions do not."""
    if getattr(config, "relative_attention_num_buckets", None):
        return None
    for field in ("max_position_embeddings", "n_positions"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generation_tokens(model, tokenizer) -> dict:
    """Start, end, pad and forced tokens, from the generation config first (as `generate` reads them)."""
    generation = getattr(model, "generation_config", None)
    config = model.config

    def pick(field):
        value = getattr(generation, field, None)
        return value if value is not None else getattr(config, field, None)

    eos = pick("eos_token_id")
    eos = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    if not eos and tokenizer.eos_token_id is not None:
        eos = [int(tokenizer.eos_token_id)]
    pad = pick("pad_token_id")
    return {
        "bos_token_id": _start_id(model),  # the decoder's first input
        "eos_token_ids": eos,
        "pad_token_id": int(pad) if pad is not None else (eos[0] if eos else None),
        "forced_bos_token_id": pick("forced_bos_token_id"),
        "forced_eos_token_id": pick("forced_eos_token_id"),
    }
