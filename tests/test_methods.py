"""train-prompt --method prompt|prefix|p-tuning: each learns through its own parameters on the frozen backbone,
saves what the runtime serves, and serving gives what training computed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import load_prompt, save_prompt
from softprompt.runtime import load
from softprompt.training.cli import main as train_main
from softprompt.training.data import read_jsonl
from softprompt.training.errors import TrainingError
from softprompt.training.methods import prompt_keys_values
from softprompt.training.train import TrainConfig, _forward_tail, load_backbone, save_trained, train_prompt

from conftest import TEXTS, random_prompt

SPEC = TaskSpec(template="Review: {text}\nSentiment:", labels={"positive": " positive", "negative": " negative"})
RECORDS = [("a gorgeous film", "positive"), ("dull and slow", "negative"), ("a joy", "positive"), ("a mess", "negative")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("methods") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in RECORDS * 2))
    return read_jsonl(path)


@pytest.fixture(scope="module")
def backbone(llama_dir):
    return load_backbone(str(llama_dir), log=lambda m: None)


def test_a_prompts_keys_and_values_serve_as_a_prefix_exactly_as_the_prompt(backbone, llama_export, tmp_path):
    """The layout test: the prefix a prompt's cache makes gives that prompt's logits (where prefix training starts)."""
    from softprompt.formats.bank import save_prefix

    prompt = random_prompt(3, 64, seed=7)
    fingerprint = backbone.fingerprint
    save_prompt(tmp_path, "prompt", prompt, fingerprint=fingerprint)
    save_prefix(tmp_path, "prefix", prompt_keys_values(backbone.model, torch.from_numpy(prompt)).numpy(), fingerprint=fingerprint)
    model = load(llama_export, bank=tmp_path, providers="cpu")
    for text in TEXTS:
        ids = [model.encode(text)]
        want = model.logits_of_ids(ids, task="prompt")
        np.testing.assert_allclose(model.logits_of_ids(ids, task="prefix"), want, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize(
    ("method", "encoder", "shape"),
    [("prompt", "mlp", (4, 64)), ("p-tuning", "mlp", (4, 64)), ("p-tuning", "lstm", (4, 64)), ("prefix", "mlp", (4, 2, 4, 16))],
)
def test_each_method_trains_saves_and_serves_what_training_computed(
    backbone, llama_export, data, tmp_path, method, encoder, shape
):
    before = {name: t.clone() for name, t in backbone.model.state_dict().items()}
    config = TrainConfig(length=4, steps=6, batch_size=4, lr=0.05, method=method, encoder=encoder, encoder_hidden=16)
    vectors, record = train_prompt(backbone, data, SPEC, config, eval_data=data, progress=False)
    assert all(torch.equal(before[name], t) for name, t in backbone.model.state_dict().items())  # bit-identical
    assert vectors.shape == shape and record["method"]["name"] == method
    prompt_size = 4 * 64
    assert (record["trainable_parameters"] == prompt_size) == (method == "prompt")  # encoders train more than they save
    meta = save_trained(tmp_path, "t", vectors, backbone, SPEC, record, "tiny", overwrite=False)
    assert meta.method == ("prefix" if method == "prefix" else "prompt")
    model = load(llama_export, bank=tmp_path, providers="cpu")
    ids = [model.encode(text, task="t") for text in TEXTS[:2]]
    with torch.no_grad():
        torch_logits = _forward_tail(backbone.model, torch.from_numpy(vectors), ids, keep=1).numpy()
    served = model.logits_of_ids(ids, task="t")[:, -1:]
    np.testing.assert_allclose(served, torch_logits, atol=1e-4 * np.abs(torch_logits).max())
    assert load_prompt(tmp_path, "t").meta.training["method"]["name"] == method


def test_methods_start_from_the_same_prompt_and_learn(backbone, data):
    """At step 0 every method computes the --init prompt's loss (the encoders are residual, their last layer zero)."""
    from softprompt.training.train import batch_loss, encode_examples, trained_source

    pairs = encode_examples(backbone, data, SPEC, 4)
    start = torch.from_numpy(random_prompt(4, 64, seed=2))
    losses = {}
    for method in ("prompt", "p-tuning", "prefix"):
        source = trained_source(backbone.model, start, TrainConfig(length=4, method=method))
        with torch.no_grad():
            losses[method] = float(batch_loss(backbone.model, source(), pairs))
    assert losses["p-tuning"] == pytest.approx(losses["prompt"], rel=1e-6)
    assert losses["prefix"] == pytest.approx(losses["prompt"], rel=1e-4)


def test_methods_refuse_what_they_cannot_train(backbone, data, llama_dir, tmp_path, capsys):
    patterned = TaskSpec(template="{soft:2}{text}{soft:2}", labels=SPEC.labels)
    with pytest.raises(TrainingError, match="has slots for vectors; a prefix has none to place"):
        train_prompt(backbone, data, patterned, TrainConfig(length=4, method="prefix"), progress=False)
    with pytest.raises(TrainingError, match="--method 'lora'; expected one of prompt, prefix, p-tuning"):
        train_prompt(backbone, data, SPEC, TrainConfig(length=4, method="lora"), progress=False)
    args = [str(llama_dir), "--data", str(data.path), "--task", "t", "--bank", str(tmp_path), "--method", "prefix"]
    with pytest.raises(SystemExit) as exit_info:
        train_main([*args, "--encoder-hidden", "0"])
    assert exit_info.value.code == 2 and "--encoder-hidden 0; expected at least 1" in capsys.readouterr().err


def test_prefixes_train_where_the_graph_takes_a_past():
    from softprompt.training.train import check_method

    with pytest.raises(TrainingError, match="--method prefix trains decoder and encoder-decoder prefixes, not encoder ones"):
        check_method(TrainConfig(length=4, method="prefix"), SPEC, "encoder")
    check_method(TrainConfig(length=4, method="prefix"), SPEC, "seq2seq")
    check_method(TrainConfig(length=4, method="p-tuning"), SPEC, "seq2seq")  # a P-tuning prompt is a prompt


def test_a_prefix_gets_the_same_gradient_with_checkpointed_layers(llama_dir, data):
    """The prefix's cache is read-only, so a layer run again in the backward pass sees the same past."""
    from softprompt.training.train import batch_loss, enable_checkpointing, encode_examples

    grads = []
    for every in (0, 1):
        backbone = load_backbone(str(llama_dir), log=lambda m: None)
        assert enable_checkpointing(backbone.model, every) == (2 if every else 0)
        start = prompt_keys_values(backbone.model, torch.from_numpy(random_prompt(3, 64))).requires_grad_(True)
        backbone.model.train()  # checkpointing is for training
        batch_loss(backbone.model, start, encode_examples(backbone, data, SPEC, 3)).backward()
        grads.append(start.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
