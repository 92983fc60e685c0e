"""Prompt tuning on tiny models: frozen backbone, same inputs as the runtime, inits, data checks, PEFT export."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import load_prompt, save_prompt
from softprompt.prompt_bank.cli import main as bank_main
from softprompt.prompt_bank.errors import PromptBankError
from softprompt.runtime import RequestError, load
from softprompt.runtime.cli import main as run_main
from softprompt.training.cli import main as train_main
from softprompt.training.data import read_jsonl
from softprompt.training.init import common_token_ids, init_prompt
from softprompt.training.train import (
    TrainConfig,
    batch_loss,
    build_inputs_embeds,
    enable_checkpointing,
    encode_examples,
    load_backbone,
    train_prompt,
)

TEMPLATE = "Review: {text}\nSentiment:"
POSITIVE = ["a gorgeous film", "moving and bright", "a joy to watch", "warm, funny, lovely"]
NEGATIVE = ["dull and slow", "far too long", "a tedious mess", "flat, grey, boring"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def sentiment_data(tmp_path):
    records = [{"text": t, "label": "positive"} for t in POSITIVE] + [{"text": t, "label": "negative"} for t in NEGATIVE]
    return write_jsonl(tmp_path / "train.jsonl", records)


@pytest.fixture(scope="module")
def llama_backbone(llama_dir):
    return load_backbone(str(llama_dir), log=lambda m: None)


SPEC = TaskSpec(template=TEMPLATE, labels={"positive": " positive", "negative": " dull mess"})  # one multi-token verbalizer


def test_training_freezes_the_backbone_and_saves_a_prompt_the_export_accepts(
    llama_backbone, llama_export, sentiment_data, tmp_path, capsys
):
    before = {name: t.clone() for name, t in llama_backbone.model.state_dict().items()}
    data = read_jsonl(sentiment_data)
    config = TrainConfig(length=6, init="labels", steps=12, batch_size=4, eval_every=4, lr=0.1)
    vectors, record = train_prompt(llama_backbone, data, SPEC, config, eval_data=data, progress=False)
    after = llama_backbone.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # bit-identical
    assert record["trainable_parameters"] == 6 * 64
    assert record["frozen_parameters"] == sum(t.numel() for t in before.values())
    assert record["steps"] == 12 and len(record["history"]) == 3 and record["best"]["step"] in (4, 8, 12)
    assert record["data_sha256"] == data.sha256
    from softprompt.training.train import save_trained

    save_trained(tmp_path / "bank", "sentiment", vectors, llama_backbone, SPEC, record, "tiny", overwrite=False)
    model = load(llama_export, bank=tmp_path / "bank")  # same fingerprint as the export: accepted as is
    results = model.classify(POSITIVE + NEGATIVE, task="sentiment")
    assert all(set(r["scores"]) == {"positive", "negative"} and abs(sum(r["scores"].values()) - 1) < 1e-9 for r in results)
    assert load_prompt(tmp_path / "bank", "sentiment").meta.extra["template"] == TEMPLATE


def test_training_lowers_the_loss(llama_backbone, sentiment_data):
    data = read_jsonl(sentiment_data)
    config = TrainConfig(length=4, init="vocab", steps=15, batch_size=8, lr=0.1, seed=1)
    pairs = encode_examples(llama_backbone, data, SPEC, config.length)
    vectors, _ = train_prompt(llama_backbone, data, SPEC, config, progress=False)
    from softprompt.training.init import init_prompt as init

    start = init(
        "vocab",
        4,
        llama_backbone.table,
        encode=lambda t: llama_backbone.encode(t, False),
        common_ids=common_token_ids(llama_backbone.tokenizer.to_str()),
        rng=np.random.default_rng(1),
    )
    with torch.no_grad():
        initial = float(batch_loss(llama_backbone.model, torch.from_numpy(start), pairs))
        final = float(batch_loss(llama_backbone.model, torch.from_numpy(vectors), pairs))
    assert final < initial * 0.8


def test_training_and_runtime_build_identical_inputs_embeds(llama_backbone, llama_export, tmp_path):
    prompt = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    save_prompt(tmp_path, "t", prompt, fingerprint=llama_backbone.fingerprint, extra=SPEC.to_extra())
    model = load(llama_export, bank=tmp_path)
    texts = ["a gorgeous film", "dull"]
    runtime_ids = [model.encode(t, "t") for t in texts]
    train_ids = [llama_backbone.encode(SPEC.apply(t)) for t in texts]
    assert runtime_ids == train_ids
    from softprompt.runtime.rows import pad, position_ids

    expected, mask = pad([model.inputs_embeds(ids, "t") for ids in runtime_ids], "left")
    with torch.no_grad():
        embeds, torch_mask, positions = build_inputs_embeds(llama_backbone.model, torch.from_numpy(prompt), train_ids)
    np.testing.assert_array_equal(embeds.numpy(), expected)
    np.testing.assert_array_equal(torch_mask.numpy(), mask)
    np.testing.assert_array_equal(positions.numpy(), position_ids(mask))


def test_runtime_classify_matches_the_trainers_scores(llama_backbone, llama_export, tmp_path):
    from softprompt.training.train import evaluate

    prompt = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    save_prompt(tmp_path, "t", prompt, fingerprint=llama_backbone.fingerprint, extra=SPEC.to_extra())
    model = load(llama_export, bank=tmp_path)
    results = model.classify(POSITIVE + NEGATIVE, task="t")
    records = [{"text": t, "label": r["label"]} for t, r in zip(POSITIVE + NEGATIVE, results)]
    data = read_jsonl(write_jsonl(tmp_path / "d.jsonl", records))
    pairs = encode_examples(llama_backbone, data, SPEC, 3)
    # Training's evaluation scores the runtime's own predictions as 100% correct: same labels both ways.
    assert evaluate(llama_backbone.model, torch.from_numpy(prompt), pairs, data, SPEC, llama_backbone) == {"accuracy": 1.0}
    # And the scores themselves: the runtime's log-probabilities equal the trainer's torch ones.
    from softprompt.runtime.classify import label_logprobs
    from softprompt.training.train import _forward_tail

    verbalizers = [llama_backbone.encode(w, add_special_tokens=False) for w in SPEC.labels.values()]
    inputs = [ids for ids, _ in pairs]
    keep = max(len(v) for v in verbalizers) + 1
    with torch.no_grad():
        torch_scores = label_logprobs(
            lambda rows, _: _forward_tail(llama_backbone.model, torch.from_numpy(prompt), rows, keep).numpy(),
            inputs,
            [verbalizers] * len(inputs),
        )
    onnx_scores = label_logprobs(
        lambda rows, _: model.logits_of_ids(rows, ["t"] * len(rows)), inputs, [verbalizers] * len(inputs)
    )
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-4, atol=1e-4)


def test_classify_refuses_generation_tasks(llama_export, llama_backbone, tmp_path):
    save_prompt(tmp_path, "gen", np.ones((2, 64), np.float32), fingerprint=llama_backbone.fingerprint)
    with pytest.raises(RequestError, match="no labels"):
        load(llama_export, bank=tmp_path).classify("hi", task="gen")


def test_inits(llama_backbone, tmp_path):
    table = llama_backbone.table
    encode = lambda t: llama_backbone.encode(t, False)  # noqa: E731
    common = common_token_ids(llama_backbone.tokenizer.to_str(), count=50)
    kwargs = dict(encode=encode, common_ids=common, label_words=[" positive", " dull mess"], rng=np.random.default_rng(0))
    labels = init_prompt("labels", 5, table, **kwargs)
    np.testing.assert_allclose(labels[1], table[encode(" dull mess")].mean(0), rtol=1e-6)
    assert labels.shape == (5, 64)
    text = init_prompt("text:hello world", 9, table, **kwargs)
    ids = np.resize(encode("hello world"), 9)
    np.testing.assert_array_equal(text, table[ids])
    vocab = init_prompt("vocab", 7, table, **kwargs)
    assert all(any(np.array_equal(row, table[i]) for i in common) for row in vocab)
    rand = init_prompt("random", 100, table, **kwargs)
    assert abs(rand.std() - table.std()) < 0.2 * table.std()
    save_prompt(tmp_path, "src", labels, fingerprint=llama_backbone.fingerprint)
    np.testing.assert_array_equal(
        init_prompt(f"file:{tmp_path}/src.npy", 5, table, fingerprint=llama_backbone.fingerprint, **kwargs), labels
    )
    with pytest.raises(PromptBankError, match="expected one of"):
        init_prompt("zeros", 3, table, **kwargs)


def test_common_tokens_follow_merge_order_and_skip_specials(llama_backbone):
    tokenizer_json = llama_backbone.tokenizer.to_str()
    data = json.loads(tokenizer_json)
    first_merge = data["model"]["merges"][0]
    merged = "".join(first_merge.split(" ") if isinstance(first_merge, str) else first_merge)
    ids = common_token_ids(tokenizer_json, count=10)
    assert ids[0] == data["model"]["vocab"][merged]
    assert not {0, 1, 2} & set(common_token_ids(tokenizer_json, count=10_000).tolist())


OK_LINE = '{"text": "fine", "label": "positive"}'


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        ([OK_LINE, "not json"], [], r"train.jsonl:2: not JSON"),
        (['{"text": "fine"}'], [], r"train.jsonl:1: missing field 'label'"),
        (['{"text": "  ", "label": "positive"}'], [], r"train.jsonl:1: empty 'text'"),
        (['{"text": "ok", "label": "meh"}'], [], r"train.jsonl:1: unknown label 'meh'"),
        (['{"input": "q", "output": "a"}', OK_LINE], [], r"train.jsonl:2: a classification line"),
        ([OK_LINE], ["--init", "zeros"], r"--init 'zeros'; expected one of"),
        ([OK_LINE], ["--template", "no placeholder"], r"must contain \{text\} exactly once"),
    ],
)
def test_bad_input_is_refused_before_the_model_loads(tmp_path, lines, extra, message, capsys):
    """The model name is bogus: reaching the model would fail differently, so these are caught first."""
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    args = [
        "no-model-needed",
        "--data",
        str(tmp_path / "train.jsonl"),
        "--task",
        "t",
        "--bank",
        str(tmp_path / "b"),
        "--verbalizer",
        "positive= positive",
        "--verbalizer",
        "negative= negative",
        *extra,
    ]
    assert train_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]


def test_too_long_example_is_refused_with_the_limit(llama_backbone, tmp_path):
    data = read_jsonl(write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 200, "label": "positive"}]))
    with pytest.raises(
        PromptBankError, match=r"long.jsonl example 1: 20 prompt \+ \d+ input \+ \d+ target = \d+ positions; the model has 128"
    ):
        encode_examples(llama_backbone, data, TaskSpec(labels={"positive": " positive"}), 20)


def test_train_prompt_cli_generation_task(llama_dir, llama_export, tmp_path, capsys):
    data = write_jsonl(tmp_path / "gen.jsonl", [{"input": f"Say {w}", "output": f" {w} {w}"} for w in ("hi", "yes", "no", "ok")])
    args = [
        str(llama_dir),
        "--data",
        str(data),
        "--eval",
        str(data),
        "--task",
        "echo",
        "--bank",
        str(tmp_path / "bank"),
        "--length",
        "3",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--template",
        "Q: {text}\\nA:",
        "-q",
    ]  # as a shell passes it
    assert train_main(args) == 0
    assert "saved echo (3x64)" in capsys.readouterr().out
    meta = load_prompt(tmp_path / "bank", "echo").meta
    assert meta.extra["kind"] == "generation" and meta.init == "vocab" and meta.training["best"]["loss"] > 0
    assert train_main(args) == 1  # exists: refused without --force
    assert "--force" in capsys.readouterr().err
    model = load(llama_export, bank=tmp_path / "bank")
    assert model.encode("hi", "echo") == model.encode("Q: hi\nA:")  # the runtime applies the stored template


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_keeps_loss_and_gradient_and_dropout_off(gpt2_dir, every):
    """GPT-2 has dropout 0.1: marking layers for checkpointing must not switch it on."""
    backbone = load_backbone(str(gpt2_dir), log=lambda m: None)
    pairs = [(backbone.encode(t), backbone.encode(" yes")) for t in POSITIVE + NEGATIVE]
    prompt = torch.nn.Parameter(torch.from_numpy(backbone.table[:4].copy()))

    def loss_and_grad():
        prompt.grad = None
        loss = batch_loss(backbone.model, prompt, pairs)
        loss.backward()
        return loss.detach().clone(), prompt.grad.clone()

    plain_loss, plain_grad = loss_and_grad()
    layers = len(backbone.model.transformer.h)
    assert enable_checkpointing(backbone.model, every) == len(range(0, layers, every))
    assert enable_checkpointing(backbone.model, every) == len(range(0, layers, every))  # again: no double wrapping
    calls = {"n": 0}
    backbone.model.transformer.h[0].attn.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    for _ in range(2):  # twice: with dropout on, two runs would differ from each other too
        loss, grad = loss_and_grad()
        assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=1e-7)
        assert torch.allclose(grad, plain_grad, rtol=1e-5, atol=1e-7)
    assert calls["n"] == 4  # the first layer really ran again in each backward


def interrupt_training_at(monkeypatch, call: int) -> None:
    """Ctrl-C as the training loop computes its `call`-th batch loss."""
    from softprompt.training import train as train_module

    real = train_module.batch_loss
    calls = {"n": 0}

    def interrupting(*args):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_module, "batch_loss", interrupting)


def test_ctrl_c_keeps_the_best_prompt_so_far(llama_backbone, sentiment_data, monkeypatch):
    data = read_jsonl(sentiment_data)
    interrupt_training_at(monkeypatch, 5)
    config = TrainConfig(length=3, init="labels", steps=50, batch_size=4, eval_every=2)
    vectors, record = train_prompt(llama_backbone, data, SPEC, config, eval_data=data, progress=False, log=lambda m: None)
    assert record["interrupted"] and record["steps"] == 4 and record["best"]["step"] in (2, 4)
    assert vectors.shape == (3, 64)


def test_export_peft_round_trip_and_logits(llama_dir, llama_export, llama_backbone, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    prompt = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    save_prompt(tmp_path / "bank", "t", prompt, fingerprint=llama_backbone.fingerprint)
    assert bank_main(["export-peft", str(tmp_path / "bank"), "t", str(tmp_path / "adapter"), "--model", str(llama_export)]) == 0
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    model = load(llama_export, bank=tmp_path / "bank")
    ids = torch.tensor([model.encode("a gorgeous film")])
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy()
    got = model.logits("a gorgeous film", task="t")[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (
        bank_main(
            ["import-peft", str(tmp_path / "adapter"), str(tmp_path / "bank"), "--task", "back", "--model", str(llama_export)]
        )
        == 0
    )
    np.testing.assert_array_equal(load_prompt(tmp_path / "bank", "back").vectors, prompt)  # exact round trip


def test_run_model_classify_cli(llama_export, llama_backbone, tmp_path, capsys):
    save_prompt(tmp_path, "s", np.zeros((2, 64), np.float32), fingerprint=llama_backbone.fingerprint, extra=SPEC.to_extra())
    assert run_main([str(llama_export), "--bank", str(tmp_path), "--task", "s", "--classify", "--json", *POSITIVE[:2]]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["input"] for r in records] == POSITIVE[:2]
    assert all(r["label"] in ("positive", "negative") and set(r["scores"]) == {"positive", "negative"} for r in records)
    assert run_main([str(llama_export), "--bank", str(tmp_path), "--task", "s", "--classify", POSITIVE[0]]) == 0
    line = capsys.readouterr().out.strip()
    assert line.split("\t")[0] in ("positive", "negative") and line.endswith(POSITIVE[0])


def test_train_prompt_takes_an_export_folder_and_trains_on_its_source(llama_export, tmp_path, capsys):
    """train-prompt EXPORT_DIR trains on the model softprompt.json names (not "no config.json"), and the prompt fits
    the export; an export whose source is gone is one line saying what to give instead."""
    import json
    import shutil

    data = write_jsonl(tmp_path / "gen.jsonl", [{"input": f"Say {w}", "output": f" {w} {w}"} for w in ("hi", "yes")])
    args = ["--data", str(data), "--task", "echo", "--bank", str(tmp_path / "bank"), "--length", "2", "--steps", "2", "-q"]
    assert train_main([str(llama_export), *args]) == 0
    assert "saved echo (2x64)" in capsys.readouterr().out
    model = load(llama_export, bank=tmp_path / "bank")
    assert model.tasks == ["echo"] and model.complete("Say hi", task="echo", max_new_tokens=2)[0].token_ids
    moved = tmp_path / "moved-export"
    shutil.copytree(llama_export, moved)
    config = json.loads((moved / "softprompt.json").read_text())
    config["source"] = {"name": "tiny-llama", "path": str(tmp_path / "gone")}
    (moved / "softprompt.json").write_text(json.dumps(config))
    assert train_main([str(moved), *args, "--force"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "which is not on this machine" in err and "\n" not in err


def test_ctrl_c_in_train_prompt_saves_the_best_prompt_and_exits_130(llama_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "gen.jsonl", [{"input": f"Say {w}", "output": f" {w} {w}"} for w in ("hi", "yes", "no", "ok")])
    interrupt_training_at(monkeypatch, 4)
    args = [str(llama_dir), "--data", str(data), "--eval", str(data), "--task", "echo", "--bank", str(tmp_path / "bank")]
    assert train_main([*args, "--length", "2", "--steps", "20", "--eval-every", "1", "--batch-size", "4", "-q"]) == 130
    captured = capsys.readouterr()
    assert (
        "saved echo" in captured.out and captured.err.strip().splitlines()[-1] == "interrupted: the best prompt so far was saved"
    )
    assert load_prompt(tmp_path / "bank", "echo").meta.training["interrupted"]
