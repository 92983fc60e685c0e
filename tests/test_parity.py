"""The runtime against PyTorch + PEFT prompt tuning: logits within 1e-4, then identical greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softprompt.prompt_bank.cli import main as bank_main
from softprompt.runtime import load

from conftest import TEXTS, greedy_without_cache

peft = pytest.importorskip("peft")


def make_adapter(hf_dir, out_dir, length: int, seed: int):
    """A PEFT prompt-tuning adapter with a random (not initial) prompt, saved like PEFT users save it."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length)
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    weight = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    model.save_pretrained(out_dir)
    return model.eval()


def serves_like_peft(model, task: str, peft_model, new_tokens: int) -> None:
    """For each text: logits over prompt + text (a prefix task: text alone) within 1e-4 of PEFT's, then PEFT's
    greedy tokens."""
    eos = model.config.eos_token_ids[0]
    prompt = model.prompt(task)
    length = 0 if prompt is None else prompt.shape[0]
    for text in TEXTS:
        ids = torch.tensor([model.encode(text)])
        with torch.no_grad():
            ref = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy()
        got = model.logits(text, task=task)[0]
        assert got.shape == ref.shape == (length + ids.shape[1], model.config.vocab_size)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), text
        expected = greedy_without_cache(peft_model, ids, new_tokens, eos=eos)
        assert model.complete(text, task=task, max_new_tokens=new_tokens)[0].token_ids == expected, text


def until_eos(ids: list[int], eos: int) -> list[int]:
    """HF pads finished rows; the runtime stops at (and keeps) end-of-sequence."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("length", [1, 5, 12])
def test_peft_parity_logits_and_greedy_tokens(arch, tmp_path, length):
    hf_dir, export = arch
    peft_model = make_adapter(hf_dir, tmp_path / "adapter", length, seed=length)
    assert (
        bank_main(["import-peft", str(tmp_path / "adapter"), str(tmp_path / "bank"), "--task", "t", "--model", str(export)]) == 0
    )
    model = load(export, bank=tmp_path / "bank", providers="cpu")
    np.testing.assert_array_equal(model.prompt("t"), peft_model.prompt_encoder["default"].embedding.weight.detach().numpy())
    serves_like_peft(model, "t", peft_model, new_tokens=12)


def test_no_prompt_matches_the_plain_model(arch):
    from transformers import AutoModelForCausalLM

    hf_dir, export = arch
    reference = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model = load(export)
    for text in TEXTS:
        ids = torch.tensor([model.encode(text)])
        with torch.no_grad():
            out = reference.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0
            )
        assert model.complete(text, max_new_tokens=10)[0].token_ids == until_eos(out[0, ids.shape[1] :].tolist(), 2)


def test_text_prompt_equals_prepending_its_token_ids(arch, tmp_path):
    """A from-text prompt, untrained, gives exactly the tokens of the text's ids prepended to the input's."""
    from transformers import AutoModelForCausalLM

    hf_dir, export = arch
    text = "Soft prompts are learned vectors"
    assert bank_main(["from-text", str(export), str(tmp_path), "--task", "intro", text]) == 0
    model = load(export, bank=tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prefix = model.backbone.encode(text, add_special_tokens=False)
    for line in TEXTS:
        ids = torch.tensor([prefix + model.encode(line)])
        with torch.no_grad():
            out = reference.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0
            )
        expected = until_eos(out[0, ids.shape[1] :].tolist(), 2)
        assert model.complete(line, task="intro", max_new_tokens=10)[0].token_ids == expected
        assert model.complete_ids([prefix + model.encode(line)], max_new_tokens=10)[0].token_ids == expected


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_adapters_serve_what_peft_serves(llama_dir, llama_export, tmp_path, encoder):
    """A P-tuning adapter saves its prompt encoder's output: imported as a plain prompt, the runtime gives PEFT's
    logits (within 1e-4) and greedy tokens, loading the adapter as PEFT users do."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    config = peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32, encoder_reparameterization_type=encoder
    )
    trained = peft.get_peft_model(base, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in trained.prompt_encoder["default"].parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)  # as if trained: the encoder is not at its init
    trained.save_pretrained(tmp_path / "adapter")
    args = ["import-peft", str(tmp_path / "adapter"), str(tmp_path / "bank"), "--task", "p", "--model", str(llama_export)]
    assert bank_main(args) == 0
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir).eval(), tmp_path / "adapter")
    reference.eval()
    model = load(llama_export, bank=tmp_path / "bank", providers="cpu")
    assert model.prompt("p").shape == (4, model.config.hidden_size)
    serves_like_peft(model, "p", reference, new_tokens=8)
