"""Tiny random configs of decoder architectures, shared by the tests and bench/architectures.py."""

from __future__ import annotations

COMMON = dict(vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)


def configs() -> dict:
    import transformers as T

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    return {
        "qwen2": T.Qwen2Config(**small, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=128, **COMMON),
        "qwen3": T.Qwen3Config(
            **small, intermediate_size=128, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, **COMMON
        ),
        # Llama variants the built graph must follow: llama3 rope scaling, attention biases, a head size
        # other than width / heads, tied output embeddings.
        "llama-variant": T.LlamaConfig(
            **small,
            intermediate_size=96,
            num_key_value_heads=1,
            head_dim=24,
            attention_bias=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            max_position_embeddings=128,
            tie_word_embeddings=True,
            **COMMON,
        ),
        "mistral": T.MistralConfig(
            **small, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=128, sliding_window=None, **COMMON
        ),
        "phi3": T.Phi3Config(**small, intermediate_size=128, num_key_value_heads=4, max_position_embeddings=128, **COMMON),
        "gemma": T.GemmaConfig(
            **small, intermediate_size=128, num_key_value_heads=1, head_dim=16, max_position_embeddings=128, **COMMON
        ),
        "gemma3_text": T.Gemma3TextConfig(
            **small,
            intermediate_size=128,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=128,
            sliding_window=16,
            **COMMON,
        ),
        "gpt_neox": T.GPTNeoXConfig(**small, intermediate_size=128, max_position_embeddings=128, **COMMON),
        "opt": T.OPTConfig(**small, ffn_dim=128, max_position_embeddings=128, word_embed_proj_dim=64, **COMMON),
        "falcon": T.FalconConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False, multi_query=True, **COMMON
        ),
        "bloom": T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **COMMON),
        "stablelm": T.StableLmConfig(
            **small, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=128, **COMMON
        ),
    }


def build(name: str, folder) -> None:
    """Save a random model of architecture `name` with a tokenizer into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import make_tokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(configs()[name]).save_pretrained(folder)
    make_tokenizer(folder, add_bos=False)


def greedy_matches(hf_folder, export, texts, new_tokens: int = 8) -> tuple[bool, bool]:
    """(runtime == transformers for each text alone, batch == each row alone)."""
    import torch
    from transformers import AutoModelForCausalLM

    from softprompt.runtime import load

    runtime = load(export)
    reference = AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    alone = []
    matches = True
    for text in texts:
        ids = torch.tensor([runtime.encode(text)])
        with torch.no_grad():
            out = reference.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )[0, ids.shape[1] :].tolist()
        out = out[: out.index(2) + 1] if 2 in out else out
        got = runtime.complete(text, max_new_tokens=new_tokens)[0].token_ids
        alone.append(got)
        matches &= got == out
    batch = [c.token_ids for c in runtime.complete(texts, max_new_tokens=new_tokens)]
    return matches, batch == alone
