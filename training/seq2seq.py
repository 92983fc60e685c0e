"""Prompt tuning of encoder-decoders (T5, BART): the prompt leads the encoder input, targets are the decoder's output.

Rows are built as the runtime's `Seq2Seq` builds them: prompt rows, then the embedding-table rows
of the templated input's ids, right-padded. The decoder reads [start] + target[:-1] and is scored
on the target tokens (teacher forcing), so a classification task's score is the same summed
log-probability of the verbalizer that the runtime's `classify` computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from softprompt.exporter.seq2seq import input_scales


def encoder_inputs(model, prompt: torch.Tensor, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, P + T, E] encoder embeddings and their mask."""
    embed = model.get_input_embeddings()
    length = max(len(r) for r in rows) + prompt.shape[0]
    embeds = prompt.new_zeros((len(rows), length, prompt.shape[1]))
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, ids in enumerate(rows):
        tokens = embed(torch.tensor(ids, dtype=torch.long)) if ids else prompt.new_zeros((0, prompt.shape[1]))
        row = torch.cat([prompt, tokens.to(prompt.dtype)])
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    scale = input_scales(model)[0]  # the export's encoder graph applies the same factor (Marian, Pegasus)
    return (embeds * scale if scale != 1.0 else embeds), mask


def target_logits(model, prompt: torch.Tensor, rows: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits [B, L, V] at the decoder positions that predict each target token (right-padded targets)."""
    start = int(model.config.decoder_start_token_id)
    length = max(len(t) for t in targets)
    decoder_ids = torch.full((len(targets), length), start, dtype=torch.long)
    for i, target in enumerate(targets):
        decoder_ids[i, 1 : len(target)] = torch.tensor(target[:-1], dtype=torch.long)
    embeds, mask = encoder_inputs(model, prompt, rows)
    return model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False).logits


def seq2seq_loss_sum(model, prompt: torch.Tensor, pairs) -> torch.Tensor:
    """Summed cross-entropy over every target token."""
    logits = target_logits(model, prompt, [ids for ids, _ in pairs], [t for _, t in pairs])
    losses = [
        torch.nn.functional.cross_entropy(logits[i, : len(t)], torch.tensor(t), reduction="sum") for i, (_, t) in enumerate(pairs)
    ]
    return torch.stack(losses).sum()


def seq2seq_label_logprobs(
    model, prompt: torch.Tensor, inputs: Sequence[Sequence[int]], verbalizers: Sequence[Sequence[int]], chunk: int = 16
) -> np.ndarray:
    """[N, L] summed log-probabilities of each label's verbalizer as the output for each input."""
    out = np.zeros((len(inputs), len(verbalizers)))
    items = [(i, j) for i in range(len(inputs)) for j in range(len(verbalizers))]
    for begin in range(0, len(items), chunk):
        batch = items[begin : begin + chunk]
        targets = [list(verbalizers[j]) for _, j in batch]
        logits = target_logits(model, prompt, [inputs[i] for i, _ in batch], targets).double()
        logp = torch.log_softmax(logits, -1)
        for r, ((i, j), target) in enumerate(zip(batch, targets)):
            out[i, j] = float(logp[r, torch.arange(len(target)), torch.tensor(target)].sum())
    return out
