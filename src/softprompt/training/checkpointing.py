"""Gradient checkpointing of the frozen model's layers, and a way to pause it around code it cannot rerun."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_paused = 0  # > 0 while `paused()` is active: layers then run without checkpointing


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Run the block's layers without checkpointing: for a forward whose layers are patched only while it runs (an
    encoder prefix, exporter/encoder_prefix.py), which a recomputation in the backward pass would miss."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def enable_checkpointing(model, every: int = 2) -> int:
    """Recompute the activations of every `every`-th layer during backward instead of keeping them.

    Prompt tuning still backpropagates through every frozen layer to reach the prompt, so stored
    activations, not weights, dominate its memory. Every layer (every=1) cuts train-prompt's peak
    memory on SmolLM2 by half but costs a recomputed forward; every second layer keeps most of the
    saving for half the cost (docs/BENCHMARKS.md). transformers only checkpoints layers in training
    mode, which also switches on their dropout (BART's layers and T5's attention call dropout with
    their own flag), so the chosen layers are wrapped here instead and the model stays in eval mode:
    the loss is unchanged. Calling it again on the same model changes nothing. Returns how many
    layers are checkpointed (0 where transformers marks no layer as checkpointable).
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return 0
    if every <= 0:
        return 0
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen = blocks[::every]
    for block in chosen:
        if not getattr(block, "_softprompt_checkpointed", False):
            block.forward = _checkpointed(block.forward)
            block._softprompt_checkpointed = True
    return len(chosen)


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        # A layer that writes into a cache cannot run twice: its recomputation would write again (a prefix's
        # cache is read-only, methods.prefix_cache, and checkpoints as well as no cache).
        caches = [v for v in kwargs.values() if hasattr(v, "get_seq_length")]
        if not torch.is_grad_enabled() or _paused or any(not getattr(cache, "read_only", False) for cache in caches):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
