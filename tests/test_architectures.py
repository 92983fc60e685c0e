"""Beyond Llama and GPT-2: architectures with biases, scaled embeddings, sliding windows, MQA and ALiBi.

Four run in every `make test`; the rest of tests/architectures.py is the sweep (`pytest -m sweep`,
`make sweep`), too slow for every run.
"""

from __future__ import annotations

import numpy as np
import pytest

from softprompt.exporter import export_model

from architectures import build, configs, greedy_matches
from conftest import TEXTS

EVERY_RUN = ("qwen2", "gemma3_text", "falcon", "bloom")


@pytest.mark.parametrize(
    "name", [name if name in EVERY_RUN else pytest.param(name, marks=pytest.mark.sweep) for name in configs()]
)
def test_architecture_exports_and_matches_transformers(name, tmp_path):
    build(name, tmp_path)
    export_model(str(tmp_path), tmp_path / "export", log=lambda m: None)
    alone, batched = greedy_matches(tmp_path, tmp_path / "export", TEXTS)
    assert alone, f"{name}: greedy tokens differ from transformers"
    assert batched, f"{name}: a left-padded batch differs from single rows"


LONG_TEXTS = [
    "the cat sat on the mat and the dog sat on the log while the bird sang in the tall green tree by the river",
    "ok",
    "a moderately long sentence about windows, masks and padding in a batch",
]


def sliding(name: str, window: int):
    """A tiny config of `name` whose attention window is shorter than the inputs."""
    if name == "gemma2":
        import transformers as T

        from architectures import COMMON

        return T.Gemma2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_key_value_heads=1,
            head_dim=16, max_position_embeddings=128, sliding_window=window, **COMMON,
        )  # fmt: skip
    config = configs()[name]
    config.sliding_window = window
    if name == "qwen2":
        config.use_sliding_window = True
        config.max_window_layers = 1  # layer 0 full, layer 1 windowed
        config.layer_types = ["full_attention", "sliding_attention"]
    return config


@pytest.mark.parametrize(("name", "window"), [("gemma3_text", 6), ("gemma2", 6), ("mistral", 6), ("qwen2", 6), ("phi3", 6)])
def test_sliding_windows_count_tokens_not_padding(name, window, tmp_path):
    """A row in a left-padded batch sees the same window of real tokens as alone, with and without a cached prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from softprompt.formats.export_folder import read_config
    from softprompt.prompt_bank import save_prompt
    from softprompt.runtime import load

    from conftest import make_tokenizer, random_prompt

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(sliding(name, window)).save_pretrained(tmp_path / "hf")
    make_tokenizer(tmp_path / "hf", add_bos=False)
    export_model(str(tmp_path / "hf"), tmp_path / "export", log=lambda m: None)
    alone, batched = greedy_matches(tmp_path / "hf", tmp_path / "export", LONG_TEXTS, new_tokens=6)
    assert alone and batched, (alone, batched)
    config = read_config(tmp_path / "export")
    save_prompt(tmp_path / "bank", "t", random_prompt(4, config.hidden_size), fingerprint=config.fingerprint)
    model = load(tmp_path / "export", bank=tmp_path / "bank")
    ids = [model.encode(text) for text in LONG_TEXTS]
    assert max(map(len, ids)) > 3 * window and min(map(len, ids)) < window
    # The cached prompt sits before the batch's padding: a short row's window must still reach it.
    batch = model.logits_of_ids(ids, task="t")
    for i, row in enumerate(ids):
        alone = model.logits_of_ids([row], task="t")[0]
        np.testing.assert_allclose(batch[i, -len(row) :], alone, atol=1e-4 * np.abs(alone).max())
    rows = [model.complete(text, task="t", max_new_tokens=6)[0].token_ids for text in LONG_TEXTS]
    assert [c.token_ids for c in model.complete(LONG_TEXTS, task="t", max_new_tokens=6)] == rows
