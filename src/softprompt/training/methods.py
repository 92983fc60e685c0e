"""What training learns for each method: a prompt, a P-tuning prompt encoder's output, or a prefix at every layer.

Every method is a module whose `forward()` gives what the bank stores, so the training loop,
evaluation and saving are the same for all three; only the trainable parameters differ:

- `prompt` (Lester et al. 2021): the [P, E] vectors themselves.
- `p-tuning` (Liu et al. 2021): [P, E] vectors made by a prompt encoder (PEFT's: an MLP, or a
  bidirectional LSTM and an MLP head) from P trainable input embeddings. Saved as its output, a
  plain prompt: the encoder is only a way to train it.
- `prefix` (Li and Liang 2021): keys and values for P positions at every layer,
  [2 * layers, kv_heads, P, head_size], made by a reparameterisation MLP (PEFT's `prefix_projection`:
  embedding, Linear, tanh, Linear) during training, collapsed to the plain keys and values when saved.

The encoders are residual: their output is added to a fixed starting point (the `--init` prompt,
and for a prefix that prompt's keys and values, computed by the frozen model), and their last layer
starts at zero, so every method starts from exactly the prompt the others start from. (PEFT starts
P-tuning and prefix tuning from random encoder outputs; Li and Liang found initialising a prefix
with real words' activations helps, which this does.)
"""

from __future__ import annotations

import torch

METHODS = ("prompt", "prefix", "p-tuning")
ENCODERS = ("mlp", "lstm")


class Prompt(torch.nn.Module):
    """The prompt itself is the parameter."""

    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.vectors = torch.nn.Parameter(start.clone())

    def forward(self) -> torch.Tensor:
        return self.vectors


class PromptEncoder(torch.nn.Module):
    """P-tuning: start + encoder(embeddings), PEFT's MLP or LSTM encoder, its last layer zero at first."""

    def __init__(self, start: torch.Tensor, kind: str = "mlp", hidden: int | None = None):
        super().__init__()
        length, width = start.shape
        hidden = hidden or width
        self.register_buffer("start", start.clone())
        self.embedding = torch.nn.Parameter(start.clone())
        if kind == "lstm":
            self.lstm: torch.nn.LSTM | None = torch.nn.LSTM(width, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.head = torch.nn.Sequential(
                torch.nn.Linear(2 * hidden, 2 * hidden), torch.nn.ReLU(), torch.nn.Linear(2 * hidden, width)
            )
        elif kind == "mlp":
            self.lstm = None
            self.head = torch.nn.Sequential(
                torch.nn.Linear(width, hidden),
                torch.nn.ReLU(),
                torch.nn.Linear(hidden, hidden),
                torch.nn.ReLU(),
                torch.nn.Linear(hidden, width),
            )
        else:
            raise ValueError(f"prompt encoder {kind!r}; expected one of {', '.join(ENCODERS)}")
        _zero(self.head[-1])

    def forward(self) -> torch.Tensor:
        x = self.embedding
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]
        return self.start + self.head(x)


class PrefixEncoder(torch.nn.Module):
    """Prefix tuning: start + MLP(embeddings) as [2 * layers, kv_heads, P, head_size], the MLP's last layer zero
    at first (PEFT's reparameterisation: embedding [P, kv width], Linear, tanh, Linear to layers x 2 x kv width)."""

    def __init__(self, start: torch.Tensor, hidden: int | None = None):
        super().__init__()
        pairs, heads, length, size = start.shape
        width = heads * size
        hidden = hidden or width
        self.shape = (pairs, heads, length, size)
        self.register_buffer("start", start.clone())
        self.embedding = torch.nn.Parameter(torch.randn(length, width) * 0.02)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, pairs * width))
        _zero(self.mlp[-1])

    def forward(self) -> torch.Tensor:
        pairs, heads, length, size = self.shape
        # PEFT's layout of one position's output: [2 * layers, kv_heads, head_size] (prompt_bank.peft.prefix_keys_values)
        delta = self.mlp(self.embedding).view(length, pairs, heads, size).permute(1, 2, 0, 3)
        return self.start + delta


def _zero(layer: torch.nn.Linear) -> None:
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()


def prompt_keys_values(model, prompt: torch.Tensor) -> torch.Tensor:
    """[2 * layers, kv_heads, P, head_size]: the keys and values of `prompt` run through the frozen decoder, the
    prefix that serves exactly as the prompt would (what the runtime's prompt cache holds)."""
    with torch.no_grad():
        positions = torch.arange(prompt.shape[0])[None]
        out = model(
            inputs_embeds=prompt[None], attention_mask=torch.ones(positions.shape, dtype=torch.long), position_ids=positions
        )
        layers = cache_layers(out.past_key_values)
    return torch.stack([t[0] for layer in layers for t in layer]).detach()


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers 5's Cache
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]


def prefix_cache(model, keys_values: torch.Tensor, batch: int):
    """A transformers cache holding `keys_values` [2 * layers, kv_heads, P, head_size] for every row of a batch.

    Its layers are read-only: a forward pass gets the prefix and its own keys and values back without
    storing them, so a checkpointed layer that runs again in the backward pass (`read_only` is set)
    sees the same past as the first time."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers
        cache = DynamicCache()
    for layer in range(keys_values.shape[0] // 2):
        key, value = keys_values[2 * layer], keys_values[2 * layer + 1]
        cache.update(key[None].expand(batch, -1, -1, -1), value[None].expand(batch, -1, -1, -1), layer)
    layers = getattr(cache, "layers", None)
    if layers is not None and all(type(layer).__name__ == "DynamicLayer" for layer in layers):
        for layer in layers:
            layer.update = _appending(layer.keys, layer.values)
        cache.read_only = True
    return cache


def _appending(keys: torch.Tensor, values: torch.Tensor):
    def update(key_states, value_states, cache_kwargs=None):
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    return update


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
