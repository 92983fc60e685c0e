"""Shared fixtures: tiny random decoders (Llama and GPT-2 shapes) built from configs, and their exports.

Nothing is downloaded. Each model gets a small byte-level BPE tokenizer trained here on a few
sentences; the Llama one adds a BOS token like Llama tokenizers do, the GPT-2 one adds nothing.
Weights use a large init range so greedy decoding has no near-ties between ONNX and PyTorch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CORPUS = [
    "Review: a gorgeous, moving film. Sentiment: positive",
    "Review: dull, slow and far too long. Sentiment: negative",
    "The quick brown fox jumps over the lazy dog.",
    "Soft prompts are learned vectors prepended to the input embeddings of a frozen model.",
    "Tell me a story about a robot who learns to paint.",
    "Once upon a time there was a small model that ran on every phone.",
] * 4

TEXTS = ["Review: a gorgeous film. Sentiment:", "Tell me a story", "dull", "The quick brown fox jumps over"]


def make_tokenizer(folder: Path, add_bos: bool, template: str | None = None) -> None:
    """A byte-level BPE tokenizer; `template` (e.g. "$A </s>") overrides the special tokens it adds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if template or add_bos:
        tok.post_processor = processors.TemplateProcessing(single=template or "<s> $A", special_tokens=[("<s>", 1), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)


# The tiny test models have random weights of scale 0.2 and widths of 48-64: at 4 bits their logits move
# by about half their range (a trained model's by far less; see docs/QUALITY.md), so int4 is checked
# at a tolerance that still refuses a wrong graph.
TINY_INT4_TOLERANCE = 1.0


def make_model(folder: Path, kind: str) -> Path:
    """A tiny random "llama" (lm_head untied), "llama-tied" or "gpt2" with its tokenizer, saved in `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind in ("llama", "llama-tied"):
        config = LlamaConfig(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=kind == "llama-tied",
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=320,
            n_embd=48,
            n_layer=2,
            n_head=4,
            n_positions=96,
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    make_tokenizer(folder, add_bos=kind != "gpt2")
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tied_dir(tmp_path_factory):
    """The tiny Llama with its lm_head tied to the input embeddings, as most small models are."""
    return make_model(tmp_path_factory.mktemp("tied-llama"), "llama-tied")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def _export(src: Path, out: Path) -> Path:
    from softprompt.exporter import export_model

    export_model(str(src), out, log=lambda message: None)
    return out


@pytest.fixture(scope="session")
def llama_export(llama_dir, tmp_path_factory) -> Path:
    return _export(llama_dir, tmp_path_factory.mktemp("exports") / "llama")


@pytest.fixture(scope="session")
def gpt2_export(gpt2_dir, tmp_path_factory) -> Path:
    return _export(gpt2_dir, tmp_path_factory.mktemp("exports") / "gpt2")


@pytest.fixture(params=["llama", "gpt2"])
def arch(request, llama_dir, llama_export, gpt2_dir, gpt2_export):
    """(hf folder, export folder) for each architecture shape."""
    return {"llama": (llama_dir, llama_export), "gpt2": (gpt2_dir, gpt2_export)}[request.param]


def random_prompt(length: int, width: int, seed: int = 0, scale: float = 0.5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((length, width)) * scale).astype(np.float32)


def greedy_without_cache(model, ids, new_tokens: int, min_new_tokens: int = 0, eos: int | None = None) -> list[int]:
    """Greedy tokens from one full forward of `model` per token: what `generate` computes, without its cache.

    The reference for PEFT models: with transformers 5, PEFT 0.21's cached `generate` of a
    prompt-tuned model returns other tokens than its own forward does (from the third token on).
    """
    import torch

    out: list[int] = []
    with torch.no_grad():
        for step in range(new_tokens):
            seq = torch.cat([ids, torch.tensor([out], dtype=ids.dtype)], 1) if out else ids
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1]
            if eos is not None and step < min_new_tokens:
                logits[eos] = -float("inf")
            out.append(int(logits.argmax()))
            if eos is not None and out[-1] == eos:
                break
    return out


def make_seq2seq(folder, kind: str):
    """A tiny random T5 or BART. BART scales its embeddings (scale_embedding=True) and forces the end token at the
    length limit (forced_eos_token_id), so both details are exercised."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "t5":
        config = T5Config(
            vocab_size=320,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=2,
            initializer_factor=3.0,
        )
        model = T5ForConditionalGeneration(config)
        template = "$A </s>"  # T5's tokenizer ends every input with </s>
    else:
        config = BartConfig(
            vocab_size=320,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=40,
            scale_embedding=True,
            init_std=0.2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=2,
        )
        model = BartForConditionalGeneration(config)
        template = "<s> $A </s>"
    model.save_pretrained(folder)
    make_tokenizer(folder, add_bos=False, template=template)
    return folder


@pytest.fixture(scope="session", params=["t5", "bart"])
def seq2seq(request, tmp_path_factory):
    hf = make_seq2seq(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
    export = tmp_path_factory.mktemp(f"export-{request.param}") / "out"
    _export(hf, export)
    return request.param, hf, export


# A template in the style of chat models' own: the tokenizer's special tokens, a default system
# message, loop controls, tojson and raise_exception.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% if loop.first and message['role'] != 'system' %}<|system|>\nYou are helpful.{{ eos_token }}\n{% endif %}"
    "{% if message['role'] == 'assistant' and message['content'] == '' %}{% continue %}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONVERSATION = [  # short: the tiny test tokenizer spends a token on most characters of the markup
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " Hi? "},
    {"role": "assistant", "content": "Yes."},
    {"role": "assistant", "content": ""},
    {"role": "user", "content": 'Ok, "é"?'},
]


@pytest.fixture(scope="session")
def chat_export(llama_dir, tmp_path_factory):
    """The tiny llama with TEMPLATE as its chat template, and its export."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-llama")
    shutil.copytree(llama_dir, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder, _export(folder, folder.parent / (folder.name + "-export"))


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def prefill_logits(graph, model, feeds: dict) -> np.ndarray:
    """Logits of every position of one graph call from an empty past (`feeds`: the inputs besides past, positions
    and logits_to_keep, which are filled in where the graph takes them)."""
    config = model.config
    length = feeds["attention_mask"].shape[1]
    empty = np.zeros((1, config.num_kv_heads, 0, config.head_size), np.float32)
    feeds = {**feeds, **{name: empty for name in config.past_names}}
    names = {i.name for i in graph.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(length)[None]
    if "logits_to_keep" in names:
        feeds["logits_to_keep"] = np.array([0])
    return graph.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]


def genai_layout_matches(export: Path) -> bool:
    """Whether an export's model.genai.onnx, fed ids (prompt rows picked by ids V.. from soft_prompts, then a text's),
    gives model.onnx's logits on the rows the runtime feeds, bit for bit; and with one zero row and no prompt ids.
    Where model.onnx takes logits_to_keep, model.genai.onnx gives the last position's only, and says so in its
    output's shape (onnxruntime-genai then binds one position's buffer for the prefill, not the whole prompt's)."""
    from softprompt.runtime import load

    model = load(export)
    config = model.config
    genai, own = ort_session(export / "model.genai.onnx"), ort_session(export / "model.onnx")
    ids = model.encode(TEXTS[0])
    prompt = random_prompt(4, config.hidden_size, seed=3)
    mask = np.ones((1, 4 + len(ids)), np.int64)
    fed = {"input_ids": np.array([[config.vocab_size + i for i in range(4)] + ids]), "soft_prompts": prompt}
    got = prefill_logits(genai, model, {**fed, "attention_mask": mask})
    rows = np.concatenate([prompt, np.asarray(model.table[ids], np.float32)])[None]
    want = prefill_logits(own, model, {"inputs_embeds": rows, "attention_mask": mask})
    none = np.zeros((1, config.hidden_size), np.float32)  # no task: one row no id picks
    plain = prefill_logits(genai, model, {"input_ids": np.array([ids]), "attention_mask": mask[:, 4:], "soft_prompts": none})
    alone = prefill_logits(own, model, {"inputs_embeds": rows[:, 4:], "attention_mask": mask[:, 4:]})
    # A graph that takes logits_to_keep gives genai the last position's logits only (its trimmed prefill), any
    # other every position's.
    kept = 1 if "logits_to_keep" in {i.name for i in own.get_inputs()} else want.shape[1]
    want, alone = want[:, -kept:], alone[:, -kept:]
    (declared,) = [o.shape for o in genai.get_outputs() if o.name == "logits"]
    if kept == 1 and declared[1] != 1:
        return False
    return got.shape == want.shape and np.array_equal(got, want) and np.array_equal(plain, alone)
