"""Prompt tuning of encoder-decoders (T5, BART): the prompt leads the encoder input, targets are the decoder's output.

Rows are built as the runtime's `Seq2Seq` builds them: prompt rows, then the embedding-table rows
of the templated input's ids, right-padded. The decoder reads [start] + target[:-1] and is scored
on the target tokens (teacher forcing), so a classification task's score is the same summed
log-probability of the verbalizer that the runtime's `classify` computes.

A prefix ([2 * decoder layers, heads, P, head_size], PEFT's seq2seq prefix tuning) is the decoder's
self-attention past instead: the encoder reads the text alone, and the decoder's positions
continue after the prefix, as in the runtime. With a P-tuning pattern (`lead`), only the first
`lead` vectors lead the encoder input; the rest go where the row's negative ids place them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from softprompt.exporter.seq2seq import input_scales

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
    if prompt.ndim == 4:  # a prefix: the decoder's past
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        embeds, mask = encoder_inputs(model, prompt.new_zeros((0, model.get_input_embeddings().weight.shape[1])), rows)
        cache = EncoderDecoderCache(prefix_cache(model, prompt, len(rows)), DynamicCache())
        return model(
            inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids, past_key_values=cache, use_cache=True
        ).logits
    embeds, mask = encoder_inputs(model, prompt, rows, lead)
    return model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False).logits


def decoder_keys_values(model, prompt: torch.Tensor) -> torch.Tensor:
    """[2 * decoder layers, heads, P, head_size]: the decoder's self-attention keys and values when it reads the prompt's
    vectors as its first P inputs, having encoded the same prompt: a prefix's starting point that carries the
    `--init` prompt (for decoders, methods.prompt_keys_values)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    encoder_scale, decoder_scale = input_scales(model)
    with torch.no_grad():
        out = model(
            inputs_embeds=prompt[None] * encoder_scale,
            attention_mask=torch.ones((1, prompt.shape[0]), dtype=torch.long),
            decoder_inputs_embeds=prompt[None] * decoder_scale,
            past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
            use_cache=True,
        )
        layers = cache_layers(out.past_key_values.self_attention_cache)
    return torch.stack([t[0] for layer in layers for t in layer]).detach()


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
