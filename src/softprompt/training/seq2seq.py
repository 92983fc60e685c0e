"""Prompt tuning of encoder-decoders (T5, BART): the prompt leads the encoder input, targets are the decoder's output.

Rows are built as the runtime's `Seq2Seq` builds them: prompt rows, then the embedding-table rows
of the templated input's ids, right-padded. The decoder reads [start] + target[:-1] and is scored
on the target tokens (teacher forcing), so a classification task's score is the same summed
log-probability of the verbalizer that the runtime's `classify` computes.

A prefix ([2 * decoder layers, heads, P, head_size], PEFT's seq2seq prefix tuning) is the decoder's
self-attention past instead: the encoder reads the text alone, and the decoder's positions
continue after the prefix, as in the runtime. A prefix with parts (Li and Liang's,
[2 * (decoder + encoder + cross layers), heads, P, head_size]) also puts keys and values before
the text in every encoder layer (exporter/encoder_prefix.py) and before the encoder's in every
cross-attention layer. With a P-tuning pattern (`lead`), only the first
`lead` vectors lead the encoder input; the rest go where the row's negative ids place them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from softprompt.exporter.encoder_prefix import encode, encoder_prefix, self_attention_shape
from softprompt.exporter.seq2seq import input_scales

from .checkpointing import paused
from .errors import TrainingError
from .methods import cache_layers, prefix_cache
from .rows import embed_ids


def encoder_inputs(
    model, prompt: torch.Tensor, rows: Sequence[Sequence[int]], lead: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, P + T, E] encoder embeddings and their mask."""
    embed = model.get_input_embeddings()
    front, inner = (prompt, prompt[:0]) if lead is None else (prompt[:lead], prompt[lead:])
    length = max(len(r) for r in rows) + front.shape[0]
    embeds = prompt.new_zeros((len(rows), length, prompt.shape[1]))
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, ids in enumerate(rows):
        row = torch.cat([front, embed_ids(embed, ids, inner)])
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    scale = input_scales(model)[0]  # the export's encoder graph applies the same factor (Marian, Pegasus)
    return (embeds * scale if scale != 1.0 else embeds), mask


def target_logits(
    model, prompt: torch.Tensor, rows: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], lead: int | None = None
) -> torch.Tensor:
    """Logits [B, L, V] at the decoder positions that predict each target token (right-padded targets)."""
    start = int(model.config.decoder_start_token_id)
    length = max(len(t) for t in targets)
    decoder_ids = torch.full((len(targets), length), start, dtype=torch.long)
    for i, target in enumerate(targets):
        decoder_ids[i, 1 : len(target)] = torch.tensor(target[:-1], dtype=torch.long)
    if prompt.ndim == 4:
        return _prefixed_logits(model, prompt, rows, decoder_ids)
    embeds, mask = encoder_inputs(model, prompt, rows, lead)
    return model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False).logits


def _prefixed_logits(model, prefix: torch.Tensor, rows, decoder_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's logits with `prefix` as its self-attention past (and, with parts, before the encoder's and the
    cross-attention's keys and values), the text alone in the encoder."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    batch, length = len(rows), prefix.shape[2]
    own, encoder, cross = split_prefix(model, prefix)
    embeds, mask = encoder_inputs(model, prefix.new_zeros((0, model.get_input_embeddings().weight.shape[1])), rows)
    if encoder is None:
        cache = EncoderDecoderCache(prefix_cache(model, own, batch), DynamicCache())
        return model(
            inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids, past_key_values=cache, use_cache=True
        ).logits
    with paused():  # the encoder's layers attend to the prefix only while this forward runs
        hidden = encode(model, embeds, mask, [t[None].expand(batch, -1, -1, -1) for t in encoder])
    cache = EncoderDecoderCache(prefix_cache(model, own, batch), prefix_cache(model, cross, batch))
    cache.is_updated = {i: False for i in range(len(cache.is_updated))}  # compute the encoder's keys, after the prefix
    return model(
        encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
        attention_mask=torch.cat([torch.ones((batch, length), dtype=mask.dtype), mask], dim=1),
        decoder_input_ids=decoder_ids,
        past_key_values=cache,
        use_cache=True,
    ).logits


def decoder_layers(model) -> int:
    decoder = model.get_decoder()
    return len(getattr(decoder, "block", None) or decoder.layers)


def prefix_parts(model, slabs: int) -> dict[str, int] | None:
    """The bank record's `parts` of a prefix of `slabs` keys and values (two per layer): None for the decoder's alone."""
    decoder = decoder_layers(model)
    if slabs == 2 * decoder:
        return None
    return {"decoder": decoder, "encoder": slabs // 2 - 2 * decoder, "cross": decoder}


def split_prefix(model, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(decoder self-attention, encoder, cross-attention) keys and values of a prefix; None for parts it has not."""
    parts = prefix_parts(model, prefix.shape[0])
    if parts is None:
        return prefix, None, None
    decoder, encoder = 2 * parts["decoder"], 2 * parts["encoder"]
    return prefix[:decoder], prefix[decoder : decoder + encoder], prefix[decoder + encoder :]


def decoder_keys_values(model, prompt: torch.Tensor, parts: bool = False) -> torch.Tensor:
    """A prefix's starting point that carries the `--init` prompt (for decoders, methods.prompt_keys_values): the
    keys and values of the model reading the prompt's vectors as its encoder input and as its decoder's first P
    inputs. [2 * decoder layers, heads, P, head_size] of the decoder's self-attention; with `parts`, then the encoder's
    self-attention's and the cross-attention's too (the prompt's encoder output, as cross-attention reads it)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    encoder_scale, decoder_scale = input_scales(model)
    layers, heads, size = self_attention_shape(model)
    mask = torch.ones((1, prompt.shape[0]), dtype=torch.long)
    nothing = [prompt.new_zeros((1, heads, 0, size))] * (2 * layers)
    with torch.no_grad():
        with encoder_prefix(model, nothing) as own:  # an empty prefix: the layers' own keys and values are seen
            hidden = model.get_encoder()(inputs_embeds=prompt[None] * encoder_scale, attention_mask=mask).last_hidden_state
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            decoder_inputs_embeds=prompt[None] * decoder_scale,
            past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
            use_cache=True,
        )
    tensors = [t[0] for layer in cache_layers(out.past_key_values.self_attention_cache) for t in layer]
    if parts:
        tensors += [t[0] for stand in own for t in stand.seen]  # type: ignore[union-attr]
        tensors += [t[0] for layer in cache_layers(out.past_key_values.cross_attention_cache) for t in layer]
    return torch.stack(tensors).detach()


def seq2seq_prefix_start(model, prompt: torch.Tensor, parts: str) -> torch.Tensor:
    """Where a prefix's training starts (`decoder_keys_values`), for `--prefix-parts` all or decoder."""
    from softprompt.exporter.seq2seq import cross_layout, encoder_prefix_layers

    if parts == "all" and not encoder_prefix_layers(model, *cross_layout(model)):
        raise TrainingError(
            f"{type(model).__name__}: its encoder's or cross-attention's heads differ from the decoder's, so one prefix "
            "array cannot hold all three parts (or its encoder is not supported); use --prefix-parts decoder"
        )
    return decoder_keys_values(model, prompt, parts=parts == "all")


def seq2seq_loss_sum(model, prompt: torch.Tensor, pairs, lead: int | None = None) -> torch.Tensor:
    """Summed cross-entropy over every target token."""
    logits = target_logits(model, prompt, [ids for ids, _ in pairs], [t for _, t in pairs], lead)
    losses = [
        torch.nn.functional.cross_entropy(logits[i, : len(t)], torch.tensor(t), reduction="sum") for i, (_, t) in enumerate(pairs)
    ]
    return torch.stack(losses).sum()


def seq2seq_label_logprobs(
    model,
    prompt: torch.Tensor,
    inputs: Sequence[Sequence[int]],
    verbalizers: Sequence[Sequence[int]],
    chunk: int = 16,
    lead: int | None = None,
) -> np.ndarray:
    """[N, L] summed log-probabilities of each label's verbalizer as the output for each input."""
    out = np.zeros((len(inputs), len(verbalizers)))
    items = [(i, j) for i in range(len(inputs)) for j in range(len(verbalizers))]
    for begin in range(0, len(items), chunk):
        batch = items[begin : begin + chunk]
        targets = [list(verbalizers[j]) for _, j in batch]
        logits = target_logits(model, prompt, [inputs[i] for i, _ in batch], targets, lead).double()
        logp = torch.log_softmax(logits, -1)
        for r, ((i, j), target) in enumerate(zip(batch, targets)):
            out[i, j] = float(logp[r, torch.arange(len(target)), torch.tensor(target)].sum())
    return out
