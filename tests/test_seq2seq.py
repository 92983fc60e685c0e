"""Encoder-decoders (T5, BART): export, greedy parity with PEFT's seq2seq prompt tuning, classify, PEFT both ways, training.

Tiny random models from configs (conftest.make_seq2seq).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from softprompt.exporter.export import export_model
from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import load_prompt, save_prompt
from softprompt.runtime import RequestError, load
from softprompt.runtime.seq2seq import Seq2Seq

from conftest import make_tokenizer, random_prompt

TEXTS = ["a gorgeous, moving film", "dull, slow and far too long", "the quick brown fox", "Tell me a story"]


def peft_model(hf, prompt: np.ndarray):
    import peft
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(hf).eval()
    config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=prompt.shape[0])
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        weight = model.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.from_numpy(np.tile(prompt, (2, 1))))  # PEFT's [2N, E] table; only the first N are used
    return model


def bank_with(export, tmp_path, prompt, name="t", spec: TaskSpec | None = None):
    fingerprint = json.loads((export / "softprompt.json").read_text())["fingerprint"]
    save_prompt(tmp_path, name, prompt, fingerprint=fingerprint, extra=(spec or TaskSpec()).to_extra())
    return tmp_path


def test_export_writes_two_graphs_and_says_seq2seq(seq2seq):
    kind, _, export = seq2seq
    config = json.loads((export / "softprompt.json").read_text())
    assert config["kind"] == "seq2seq"
    assert (export / "encoder.onnx").is_file() and (export / "decoder.onnx").is_file()
    assert config["max_positions"] == (40 if kind == "bart" else None)  # T5's relative positions have no cap
    assert config["generation"] == ({"forced_eos_token_id": 2} if kind == "bart" else {})
    assert max(config["validation"]["max_relative_diff"].values()) < 1e-4


def test_greedy_tokens_match_peft_generate(seq2seq, tmp_path):
    from transformers import AutoTokenizer

    kind, hf, export = seq2seq
    width = json.loads((export / "softprompt.json").read_text())["hidden_size"]
    prompt = random_prompt(5, width, seed=1, scale=2.0 if kind == "bart" else 0.5)
    model = load(export, bank=bank_with(export, tmp_path, prompt))
    assert isinstance(model, Seq2Seq)
    reference = peft_model(hf, prompt)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    want = []
    for text in TEXTS:
        batch = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = reference.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=10,
                do_sample=False,
                num_beams=1,
            )
        want.append(out[0, 1:].tolist())  # without the decoder start token
    got = [c.token_ids for c in model.complete(TEXTS, task="t", max_new_tokens=10)]  # one padded batch
    assert got == want
    # The prompt changes the output, and rows with and without it share one batch exactly.
    plain = [c.token_ids for c in model.complete(TEXTS, max_new_tokens=10)]
    assert plain != got
    mixed = [c.token_ids for c in model.complete(TEXTS, task=["t", None, "t", None], max_new_tokens=10)]
    assert mixed == [got[0], plain[1], got[2], plain[3]]
    streamed = "".join(model.stream(TEXTS[0], task="t", max_new_tokens=10))
    assert streamed == model.generate(TEXTS[0], task="t", max_new_tokens=10)


def test_bart_forces_the_end_token_at_the_limit(seq2seq, tmp_path):
    kind, _, export = seq2seq
    model = load(export)
    last = [c.token_ids[-1] for c in model.complete(TEXTS, max_new_tokens=4)]
    finish = [c.finish_reason for c in model.complete(TEXTS, max_new_tokens=4)]
    if kind == "bart":
        assert all(t == 2 for t in last) and all(f == "stop" for f in finish)
    else:
        assert not all(t == 2 for t in last)


def test_classify_scores_match_peft_logprobs(seq2seq, tmp_path):
    from transformers import AutoTokenizer

    _, hf, export = seq2seq
    width = json.loads((export / "softprompt.json").read_text())["hidden_size"]
    prompt = random_prompt(3, width, seed=4)
    spec = TaskSpec(template="Review: {text} Sentiment:", labels={"positive": " positive", "negative": " dull slow"})
    model = load(export, bank=bank_with(export, tmp_path, prompt, spec=spec))
    got = model.classify(TEXTS, task="t")
    reference = peft_model(hf, prompt)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    for text, result in zip(TEXTS, got):
        batch = tokenizer(spec.apply(text), return_tensors="pt")
        scores = []
        for words in spec.labels.values():
            target = torch.tensor([tokenizer(words, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=target).logits
            scores.append(float(torch.log_softmax(logits[0].double(), -1)[torch.arange(target.shape[1]), target[0]].sum()))
        want = np.exp(np.array(scores) - np.logaddexp.reduce(scores))
        np.testing.assert_allclose([result["scores"][label] for label in spec.labels], want, atol=1e-4)
    # An ensemble of two prompts runs and reports each member.
    bank_with(export, tmp_path, random_prompt(3, width, seed=5), name="u", spec=spec)
    combined = model.classify(TEXTS, task=["t", "u"], ensemble="mean")
    assert set(combined[0]["members"]) == {"t", "u"}


def test_peft_adapter_round_trip_uses_the_first_block_only(seq2seq, tmp_path, capsys):
    import peft
    from transformers import AutoModelForSeq2SeqLM

    from softprompt.prompt_bank.cli import main as bank_main

    _, hf, export = seq2seq
    width = json.loads((export / "softprompt.json").read_text())["hidden_size"]
    prompt = random_prompt(4, width, seed=7)
    reference = peft_model(hf, prompt)
    with torch.no_grad():  # a distinct second block, which PEFT never reads, must not leak into the import
        reference.prompt_encoder["default"].embedding.weight[4:] = 9.0
    reference.save_pretrained(tmp_path / "adapter")
    assert (
        bank_main(
            ["import-peft", str(tmp_path / "adapter"), str(tmp_path / "bank"), "--task", "imported", "--model", str(export)]
        )
        == 0
    )
    np.testing.assert_array_equal(load_prompt(tmp_path / "bank", "imported").vectors, prompt)
    assert bank_main(["export-peft", str(tmp_path / "bank"), "imported", str(tmp_path / "out"), "--model", str(export)]) == 0
    loaded = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(hf), tmp_path / "out")
    assert loaded.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    np.testing.assert_array_equal(loaded.prompt_encoder["default"].embedding.weight.detach().numpy()[:4], prompt)


def test_prompt_counts_against_encoder_positions(seq2seq, tmp_path):
    kind, _, export = seq2seq
    width = json.loads((export / "softprompt.json").read_text())["hidden_size"]
    model = load(export, bank=bank_with(export, tmp_path, random_prompt(36, width)))
    if kind == "bart":
        with pytest.raises(RequestError, match="encoder positions; the model has 40"):
            model.generate("a gorgeous, moving film again and again", task="t", max_new_tokens=2)
    else:
        assert isinstance(model.generate("a gorgeous, moving film again and again", task="t", max_new_tokens=2), str)


def sentiment_data(folder):
    """Twelve labelled rows (positive: gorgeous or moving) as dicts and as a training Dataset read from a file."""
    from softprompt.training.data import read_jsonl

    texts = ["a gorgeous film", "dull and slow", "moving, gorgeous", "slow, dull film", "a moving story", "too long"]
    rows = [{"text": t, "label": "positive" if "gorgeous" in t or "moving" in t else "negative"} for t in texts] * 2
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, read_jsonl(folder / "train.jsonl")


def test_train_prompt_on_seq2seq_leaves_the_backbone_unchanged(seq2seq, tmp_path, capsys):
    from softprompt.training.train import TrainConfig, load_backbone, train_prompt

    _, hf, export = seq2seq
    rows, data = sentiment_data(tmp_path)
    spec = TaskSpec(template="{text} Sentiment:", labels={"positive": " positive", "negative": " negative"})
    backbone = load_backbone(str(hf), log=lambda m: None)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    config = TrainConfig(length=4, init="labels", batch_size=4, steps=6, lr=0.3, eval_every=3)
    vectors, record = train_prompt(backbone, data, spec, config, eval_data=data, progress=False, log=lambda m: None)
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert record["best"]["accuracy"] >= record["history"][0]["accuracy"]
    # The runtime, given the trained prompt, classifies the training rows as training's evaluation did.
    save_prompt(tmp_path / "bank", "s", vectors, fingerprint=backbone.fingerprint, extra=spec.to_extra())
    model = load(export, bank=tmp_path / "bank")
    predicted = [r["label"] for r in model.classify([r["text"] for r in rows], task="s")]
    accuracy = float(np.mean([p == r["label"] for p, r in zip(predicted, rows)]))
    assert accuracy == pytest.approx(record["best"]["accuracy"])


def test_checkpointing_keeps_seq2seq_loss_and_gradient(seq2seq):
    """BART's layers call dropout with their own training flag; checkpointing must not switch it on."""
    from softprompt.training.train import batch_loss, enable_checkpointing, load_backbone

    _, hf, _ = seq2seq
    backbone = load_backbone(str(hf), log=lambda m: None)
    pairs = [(backbone.encode(t), backbone.encode(" positive", add_special_tokens=False)) for t in TEXTS]
    prompt = torch.nn.Parameter(torch.from_numpy(backbone.table[:3].copy()))

    def loss_and_grad():
        prompt.grad = None
        loss = batch_loss(backbone.model, prompt, pairs)
        loss.backward()
        return loss.detach().clone(), prompt.grad.clone()

    plain = loss_and_grad()
    assert enable_checkpointing(backbone.model, 1) == 4  # 2 encoder + 2 decoder layers
    for _ in range(2):
        loss, grad = loss_and_grad()
        assert torch.allclose(loss, plain[0], rtol=1e-6) and torch.allclose(grad, plain[1], rtol=1e-5, atol=1e-7)


def test_generation_training_lowers_the_loss(seq2seq, tmp_path):
    from softprompt.training.data import read_jsonl
    from softprompt.training.train import TrainConfig, load_backbone, train_prompt

    _, hf, _ = seq2seq
    rows = [{"input": t, "output": "positive"} for t in TEXTS]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = read_jsonl(tmp_path / "gen.jsonl")
    backbone = load_backbone(str(hf), log=lambda m: None)
    config = TrainConfig(length=3, init="random", batch_size=4, steps=8, lr=0.3, eval_every=1)
    _, record = train_prompt(backbone, data, TaskSpec(), config, eval_data=data, progress=False, log=lambda m: None)
    assert record["best"]["loss"] < record["history"][0]["loss"]


def test_export_model_refuses_a_decoder_as_seq2seq(llama_dir, tmp_path, capsys):
    from softprompt.exporter.cli import main as export_main

    assert export_main([str(llama_dir), str(tmp_path / "out"), "--task", "seq2seq", "-q"]) == 1
    assert "cannot be exported as seq2seq" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_model_generates_with_a_seq2seq_export(seq2seq, tmp_path, capsys):
    from softprompt.runtime.cli import main as run_main

    _, _, export = seq2seq
    assert run_main([str(export), "--json", "--max-new-tokens", "5", TEXTS[0], TEXTS[1]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["input"] for line in lines] == TEXTS[:2]
    assert all(1 <= len(line["token_ids"]) <= 5 for line in lines)


def test_marian_scales_encoder_embeddings_in_the_graph(tmp_path):
    """Marian (like Pegasus) multiplies encoder embeddings by sqrt(d_model) on the ids path only; the
    export must too, or tokens and prompt enter the encoder 8x too small here."""
    from transformers import AutoTokenizer, MarianConfig, MarianMTModel

    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=320,
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
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
        forced_eos_token_id=2,
    )
    MarianMTModel(config).save_pretrained(tmp_path / "hf")
    make_tokenizer(tmp_path / "hf", add_bos=False, template="$A </s>")
    exported = export_model(str(tmp_path / "hf"), tmp_path / "export", log=lambda m: None)
    reference = MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = random_prompt(4, 64, seed=3, scale=0.05)
    save_prompt(tmp_path / "bank", "t", prompt, fingerprint=exported.fingerprint)
    model = load(tmp_path / "export", bank=tmp_path / "bank")
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            plain = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False, num_beams=1)[0, 1:].tolist()
            embeds = torch.cat([torch.from_numpy(prompt)[None], reference.get_input_embeddings()(ids)], 1) * 8.0
            prompted = reference.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False, num_beams=1)[0, 1:].tolist()
        assert model.complete(text, max_new_tokens=8)[0].token_ids == plain  # the model's own ids path
        assert model.complete(text, task="t", max_new_tokens=8)[0].token_ids == prompted


def test_a_seq2seq_graph_that_differs_from_pytorch_is_an_export_validation_error(seq2seq):
    from transformers import AutoModelForSeq2SeqLM

    from softprompt.exporter import ExportValidationError
    from softprompt.exporter.seq2seq import validate_seq2seq

    _, hf, export = seq2seq
    model = AutoModelForSeq2SeqLM.from_pretrained(hf).eval()
    decoder = model.get_decoder()
    last = decoder.layers[-1].fc2 if hasattr(decoder, "layers") else decoder.block[-1].layer[-1].DenseReluDense.wo
    with torch.no_grad():
        last.weight.mul_(1.5)  # PyTorch's decoder now computes something the graph does not
    table = np.load(export / "embeddings.npy")
    with pytest.raises(ExportValidationError, match=r"decoder logits, 2 cached steps differ\(s\) by"):
        validate_seq2seq(export, model, table, 1e-4)
