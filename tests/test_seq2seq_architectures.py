"""Encoder-decoder families beyond T5 and BART (`pytest -m sweep`, `make sweep`): exported tiny random
models give transformers' greedy tokens, with a prompt and without.

With a 4-vector prompt the runtime is compared with `generate(inputs_embeds=[prompt, token embeddings]
x the encoder's input scale)`; without one, with `generate(input_ids=...)`, the model's own token path.
"""

from __future__ import annotations

import numpy as np
import pytest

from softprompt.exporter import export_model
from softprompt.prompt_bank import save_prompt
from softprompt.runtime import load

from conftest import make_tokenizer

TEXTS = ["a gorgeous, moving film", "dull and slow", "the quick brown fox jumps over"]
COMMON = dict(vocab_size=320, pad_token_id=0, eos_token_id=2)
BART_LIKE = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    max_position_embeddings=64,
    init_std=0.2,
    scale_embedding=True,
)
T5_LIKE = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0, initializer_factor=3.0)


def family(name: str):
    """(model class, config, the tokenizer's special-token template) of a tiny random model."""
    import transformers as T

    return {
        "t5-v1.1": (
            T.T5ForConditionalGeneration,
            T.T5Config(
                **{**T5_LIKE, "num_decoder_layers": 1}, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **COMMON
            ),
            "$A </s>",
        ),
        "mt5": (T.MT5ForConditionalGeneration, T.MT5Config(**T5_LIKE, **COMMON), "$A </s>"),
        "longt5": (T.LongT5ForConditionalGeneration, T.LongT5Config(**T5_LIKE, **COMMON), "$A </s>"),
        "mbart": (
            T.MBartForConditionalGeneration,
            T.MBartConfig(
                **BART_LIKE, bos_token_id=1, decoder_start_token_id=2, forced_eos_token_id=2, forced_bos_token_id=5, **COMMON
            ),
            "<s> $A </s>",
        ),
        "pegasus": (
            T.PegasusForConditionalGeneration,
            T.PegasusConfig(**BART_LIKE, decoder_start_token_id=0, forced_eos_token_id=2, **COMMON),
            "$A </s>",
        ),
        "blenderbot-small": (
            T.BlenderbotSmallForConditionalGeneration,
            T.BlenderbotSmallConfig(**BART_LIKE, decoder_start_token_id=1, bos_token_id=1, forced_eos_token_id=2, **COMMON),
            "$A </s>",
        ),
    }[name]


@pytest.mark.sweep
@pytest.mark.parametrize("name", ["t5-v1.1", "mt5", "longt5", "mbart", "pegasus", "blenderbot-small"])
def test_family_gives_transformers_greedy_tokens(name, tmp_path):
    import torch
    import transformers as T

    from softprompt.exporter.seq2seq import input_scales

    torch.manual_seed(0)
    model_class, config, template = family(name)
    model_class(config).save_pretrained(tmp_path / "hf")
    make_tokenizer(tmp_path / "hf", False, template)
    exported = export_model(str(tmp_path / "hf"), tmp_path / "export", log=lambda m: None)
    reference = model_class.from_pretrained(tmp_path / "hf").eval()
    tokenizer = T.AutoTokenizer.from_pretrained(tmp_path / "hf")
    scale = float(np.load(tmp_path / "export" / "embeddings.npy").std())
    prompt = (np.random.default_rng(0).standard_normal((4, exported.hidden_size)) * scale).astype(np.float32)
    save_prompt(tmp_path / "bank", "t", prompt, fingerprint=exported.fingerprint)
    runtime = load(tmp_path / "export", bank=tmp_path / "bank")

    def generate(**inputs) -> list[int]:
        with torch.no_grad():
            return reference.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1)[0, 1:].tolist()

    with_prompt, plain = [], []
    for text in TEXTS:
        batch = tokenizer(text, return_tensors="pt")
        embeds = torch.cat([torch.from_numpy(prompt)[None], reference.get_input_embeddings()(batch["input_ids"])], 1)
        embeds = embeds * input_scales(reference)[0]
        with_prompt.append(generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)))
        plain.append(generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    assert [c.token_ids for c in runtime.complete(TEXTS, task="t", max_new_tokens=8)] == with_prompt
    assert [c.token_ids for c in runtime.complete(TEXTS, max_new_tokens=8)] == plain
