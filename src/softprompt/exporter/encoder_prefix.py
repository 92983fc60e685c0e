"""An encoder prefix (Li and Liang 2021): keys and values every encoder self-attention layer attends to before the text.

transformers' encoders take no past, but their self-attention modules do (the decoder's share the
class): each is called here with a read-only stand-in cache whose `update` returns the prefix's
keys and values before the layer's own, and with P more columns (all attending) on the attention
mask it is given. Nothing else in the model changes, so the same context manager serves tracing
the encoder graph, validating it and training.

Positions: BART-like encoders add learned positions to the text's embeddings, so the text keeps
positions 0..S-1 and the prefix has none, as in Li and Liang's BART. T5's relative positions are
computed between query and key positions: the text's queries are placed at P..P+S-1
(`encode`) so that the prefix sits at 0..P-1 before them, as a decoder's past does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .errors import ExportError


def self_attentions(model) -> list[torch.nn.Module]:
    """The encoder's self-attention modules, in layer order (T5's blocks or BART-like layers)."""
    encoder = model.get_encoder()
    blocks = getattr(encoder, "block", None)
    if blocks is not None:  # LongT5's local and transient-global attention have no such module
        found = [getattr(block.layer[0], "SelfAttention", None) for block in blocks]
        if all(module is not None for module in found):
            return found
    layers = getattr(encoder, "layers", None)
    if layers is not None and all(hasattr(layer, "self_attn") for layer in layers):
        return [layer.self_attn for layer in layers]
    raise ExportError(
        f"{type(model).__name__}: its encoder's self-attention layers are not found; encoder prefixes not supported"
    )


def self_attention_shape(model) -> tuple[int, int, int]:
    """(layers, heads, head size) of the encoder's self-attention."""
    modules = self_attentions(model)
    first = modules[0]
    heads = getattr(first, "n_heads", None) or getattr(first, "num_heads", None)
    size = getattr(first, "key_value_proj_dim", None) or getattr(first, "head_dim", None)
    if not heads or not size:
        raise ExportError(f"{type(model).__name__}: the encoder's attention heads are not known; encoder prefixes not supported")
    return len(modules), int(heads), int(size)


def encode(model, inputs_embeds, attention_mask, keys_values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The encoder's last hidden state when every layer attends to `keys_values` ([B, heads, P, head size] per key or
    value, `encoder_prefix`'s order) before the text: what the export's encoder graph computes, and training."""
    with encoder_prefix(model, keys_values):
        extra = _positions(model, keys_values[0].shape[2], inputs_embeds.shape[1])
        return model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **extra).last_hidden_state


def _positions(model, prefix_length, text_length) -> dict:
    """What the encoder is called with besides its inputs: T5's query positions after the prefix."""
    if getattr(model.config, "relative_attention_num_buckets", None):
        return {"cache_position": torch.arange(text_length) + prefix_length}
    return {}


class _Before:
    """A stand-in cache for one layer: `update` puts the prefix before the layer's keys and values (and writes
    nothing, so a layer may run twice, as under gradient checkpointing)."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, layer_idx=None, cache_kwargs=None):
        self.seen = (key_states, value_states)
        return torch.cat([self.key.to(key_states.dtype), key_states], -2), torch.cat(
            [self.value.to(value_states.dtype), value_states], -2
        )


@contextlib.contextmanager
def encoder_prefix(model, keys_values: Sequence[torch.Tensor]) -> Iterator[list[_Before]]:
    """Within the block, the encoder's layer i attends to keys_values[2i], keys_values[2i + 1] ([B, heads, P, head
    size]) before the text. Yields the per-layer stand-ins, whose `seen` are the layers' own keys and values."""
    modules = self_attentions(model)
    if len(keys_values) != 2 * len(modules):
        raise ExportError(f"an encoder prefix of {len(keys_values) // 2} layers; the encoder has {len(modules)}")
    stands = [_Before(keys_values[2 * i], keys_values[2 * i + 1]) for i in range(len(modules))]
    for module, stand in zip(modules, stands):
        module.forward = _with_prefix(module.forward, stand)
    try:
        yield stands
    finally:
        for module in modules:
            del module.forward  # back to the class's own


def _with_prefix(forward, stand: _Before):
    def run(*args, **kwargs):
        kwargs["past_key_values"] = stand
        length = stand.key.shape[-2]
        for name in ("attention_mask", "mask"):  # BART-like layers pass attention_mask, T5's mask
            mask = kwargs.get(name)
            if mask is not None:
                kwargs[name] = _attending(mask, length)
        return forward(*args, **kwargs)

    return run


def _attending(mask: torch.Tensor, length) -> torch.Tensor:
    """A 4-D attention mask with `length` more leading key columns that attend (additive 0, or True)."""
    columns = mask[..., :1].expand(*mask.shape[:-1], length)
    fill = torch.ones_like(columns) if mask.dtype == torch.bool else torch.zeros_like(columns)
    return torch.cat([fill, mask], -1)
