"""P-tuning patterns: a template's {soft:N} slots place the prompt's vectors around the text, alike in the runtime
and in training; the vectors before the first text are cached as a plain prompt's are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from softprompt.formats.errors import InvalidPromptError
from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import save_prompt
from softprompt.runtime import RequestError, load
from softprompt.training.cli import main as train_main
from softprompt.training.data import read_jsonl
from softprompt.training.train import TrainConfig, build_inputs_embeds, load_backbone, train_prompt

from conftest import TEXTS, random_prompt

PATTERN = "{soft:2}Question: {text}{soft:1} Answer:{soft:1}"


def characters(text: str, add_special_tokens: bool = True) -> list[int]:
    """A tokenizer of one id per character that wraps a text in 1 ... 2 (as BERT's [CLS] ... [SEP])."""
    ids = [ord(c) for c in text]
    return [1, *ids, 2] if add_special_tokens else ids


def test_slots_become_negative_ids_between_the_pieces_and_specials_wrap_the_whole():
    spec = TaskSpec(template=PATTERN)
    assert (spec.slots, spec.lead) == ([2, 1, 1], 2)
    assert spec.encode("hi", characters) == [1, *map(ord, "Question: hi"), -1, *map(ord, " Answer:"), -2, 2]
    assert spec.apply("hi") == "Question: hi Answer:"
    # Slots only in front: the row is the plain template's, exactly.
    front = TaskSpec(template="{soft:3}Q: {text}")
    assert front.lead == 3 and front.encode("hi", characters) == characters("Q: hi")
    assert TaskSpec().lead is None and TaskSpec().encode("hi", characters) == characters("hi")
    with pytest.raises(InvalidPromptError, match=r"slots for 2 \+ 1 \+ 1 = 4 vectors; the task has 5"):
        spec.check_length(5, "task 'x'")
    with pytest.raises(InvalidPromptError, match="slot {soft:0} holds no vectors"):
        TaskSpec(template="{soft:0}{text}")


@pytest.fixture(scope="module")
def pattern_bank(llama_export, tmp_path_factory):
    bank = tmp_path_factory.mktemp("pattern-bank")
    fingerprint = json.loads((llama_export / "softprompt.json").read_text())["fingerprint"]
    save_prompt(bank, "qa", random_prompt(4, 64, seed=3), fingerprint=fingerprint, extra=TaskSpec(template=PATTERN).to_extra())
    save_prompt(bank, "plain", random_prompt(3, 64, seed=4), fingerprint=fingerprint)
    return bank


def test_runtime_and_training_build_identical_inputs_embeds(llama_dir, llama_export, pattern_bank):
    model = load(llama_export, bank=pattern_bank, providers="cpu")
    backbone = load_backbone(str(llama_dir), log=lambda m: None)
    spec = TaskSpec(template=PATTERN)
    prompt = model.prompt("qa")
    assert prompt.shape == (4, 64)
    for text in TEXTS:
        ids = model.encode(text, task="qa")
        assert ids == spec.encode(text, backbone.encode) and -1 in ids and -2 in ids
        runtime = model.inputs_embeds(ids, task="qa")
        embeds, _, _ = build_inputs_embeds(backbone.model, torch.from_numpy(prompt), [ids], spec.lead)
        np.testing.assert_array_equal(runtime, embeds[0].detach().numpy())
        np.testing.assert_array_equal(runtime[:2], prompt[:2])  # the lead goes in front
        np.testing.assert_array_equal(runtime[2 + ids.index(-1)], prompt[2])  # then each slot's vector, in place


def test_patterns_are_served_cached_uncached_and_batched_alike(llama_dir, llama_export, pattern_bank):
    from transformers import AutoModelForCausalLM

    model = load(llama_export, bank=pattern_bank, providers="cpu")
    uncached = load(llama_export, bank=pattern_bank, providers="cpu", cache_prompts=False)
    assert model.is_cached("qa")
    reference = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    for text in TEXTS:
        ids = model.encode(text, task="qa")
        embeds = torch.from_numpy(model.inputs_embeds(ids, task="qa"))[None]
        with torch.no_grad():
            want = reference(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits[0]
        got = model.logits(text, task="qa")[0]
        assert np.abs(got - want.numpy()).max() <= 1e-4 * float(want.abs().max())
        tokens = model.complete(text, task="qa", max_new_tokens=6)[0].token_ids
        assert uncached.complete(text, task="qa", max_new_tokens=6)[0].token_ids == tokens
    texts, tasks = [TEXTS[0], TEXTS[1], TEXTS[2]], ["qa", "plain", None]
    together = model.complete(texts, task=tasks, max_new_tokens=6)
    assert [c.token_ids for c in together] == [
        model.complete(t, task=k, max_new_tokens=6)[0].token_ids for t, k in zip(texts, tasks)
    ]
    assert together[0].input == TEXTS[0]
    with pytest.raises(RequestError, match=r"token ids \[-3\] outside \[-2, 320\)"):
        model.complete_ids([[5, -3]], task="qa")
    with pytest.raises(RequestError, match=r"token ids \[-1\] outside \[0, 320\)"):
        model.complete_ids([[5, -1]], task="plain")


def test_patterns_that_do_not_hold_the_vectors_are_refused(llama_export, tmp_path):
    fingerprint = json.loads((llama_export / "softprompt.json").read_text())["fingerprint"]
    with pytest.raises(InvalidPromptError, match=r"task 'qa': template .* has slots for 2 \+ 1 \+ 1 = 4 vectors; the task has 5"):
        save_prompt(tmp_path, "qa", random_prompt(5, 64), fingerprint=fingerprint, extra={"template": PATTERN})


def test_training_a_pattern(llama_dir, llama_export, tmp_path, capsys):
    records = [{"text": t, "label": label} for t, label in (("a gorgeous film", "positive"), ("dull and slow", "negative"))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 4))
    args = [str(llama_dir), "--data", str(tmp_path / "train.jsonl"), "--task", "p", "--bank", str(tmp_path / "bank")]
    assert train_main([*args, "--template", PATTERN, "--length", "5", "-q"]) == 1
    assert "slots for 2 + 1 + 1 = 4 vectors; the task has 5" in capsys.readouterr().err
    assert train_main([*args, "--template", PATTERN, "--steps", "3", "--batch-size", "4", "-q"]) == 0  # P from the slots
    model = load(llama_export, bank=tmp_path / "bank")
    assert model.prompt("p").shape == (4, 64) and model.classify("a gorgeous film", task="p")[0]["label"] in (
        "positive",
        "negative",
    )
    # The loss goes down through the slots too: every vector gets a gradient.
    backbone = load_backbone(str(llama_dir), log=lambda m: None)
    data = read_jsonl(tmp_path / "train.jsonl")
    spec = TaskSpec(template=PATTERN, labels={"positive": " positive", "negative": " negative"})
    start = torch.from_numpy(random_prompt(4, 64)).requires_grad_(True)
    from softprompt.training.train import batch_loss, encode_examples

    loss = batch_loss(backbone.model, start, encode_examples(backbone, data, spec, 4), spec.lead)
    loss.backward()
    assert (start.grad.abs().sum(dim=1) > 0).all()
    vectors, record = train_prompt(backbone, data, spec, TrainConfig(length=4, steps=2, batch_size=4), progress=False)
    assert vectors.shape == (4, 64) and record["steps"] == 2


def test_patterns_are_refused_where_the_store_takes_no_slots(pattern_bank):
    from softprompt.runtime.tasks import TaskStore

    store = TaskStore(pattern_bank, width=64, fingerprint=None, slots=False)  # what an encoder export's store is
    with pytest.raises(
        InvalidPromptError,
        match="task 'qa' .*qa.json: template .* places vectors after the text .* serve on decoder and encoder-decoder exports",
    ):
        store.resolve(["qa"])


def test_a_pattern_is_not_exported_as_a_peft_adapter_that_would_prepend_it(pattern_bank, tmp_path, capsys):
    from softprompt.prompt_bank.cli import main as bank_main

    assert bank_main(["export-peft", str(pattern_bank), "qa", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "places vectors after the text (a P-tuning pattern); a PEFT adapter prepends every vector" in err
    assert not (tmp_path / "out" / "adapter_config.json").exists()
