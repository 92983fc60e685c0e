"""Prefix tuning and P-tuning patterns on encoder-decoders (T5, BART): import, serve, train.

A prefix task is PEFT's seq2seq prefix tuning: the decoder's self-attention past.

PEFT gives decoder layer i the keys and values it saved for layer 2i mod L (prompt_bank.peft); the
import reproduces what PEFT serves, which the parity tests check with adapters whose every saved
layer differs. The reference is PEFT's forward pass, the one it trains with: its `generate` starts
the decoder's positions at 0 under the prefix (and T5's causal mask then hides most of it), so
greedy tokens are checked against greedy decoding by PEFT's forward instead.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_prefix import make_prefix_adapter
from test_seq2seq import TEXTS, bank_with, sentiment_data

from softprompt.formats.errors import PromptBankError
from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import load_prompt
from softprompt.prompt_bank.cli import main as bank_main
from softprompt.prompt_bank.peft import prefix_keys_values, prefix_table, seq2seq_layer_sources
from softprompt.runtime import RequestError, load

from conftest import random_prompt

peft = pytest.importorskip("peft")


def make_adapter(hf, out, length: int, projection: bool, seed: int = 0):
    return make_prefix_adapter(hf, out, length, projection, seed, task_type="SEQ_2_SEQ_LM")


def reference(hf, adapter):
    from transformers import AutoModelForSeq2SeqLM

    return peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(hf).eval(), adapter).eval()


def greedy_by_forward(model, batch, start: int, config, new_tokens: int) -> list[int]:
    """Greedy tokens from whole forward passes (no cache), with the model's forced end token at the limit (BART)."""
    tokens: list[int] = []
    forced = config.generation.get("forced_eos_token_id")
    for step in range(new_tokens):
        with torch.no_grad():
            logits = model(**batch, decoder_input_ids=torch.tensor([[start, *tokens]])).logits[0, -1]
        token = forced if forced is not None and step == new_tokens - 1 else int(logits.argmax())
        tokens.append(token)
        if token in config.eos_token_ids:
            break
    return tokens


def import_task(adapter, bank, export, task="pre"):
    assert bank_main(["import-peft", str(adapter), str(bank), "--task", task, "--model", str(export)]) == 0


@pytest.mark.parametrize("projection", [False, True])
def test_seq2seq_prefix_adapters_serve_what_peft_serves(seq2seq, tmp_path, projection):
    """Decoder logits within 1e-4 of PEFT's and its greedy tokens, T5 (relative positions) and BART (learned ones)."""
    from transformers import AutoTokenizer

    _, hf, export = seq2seq
    adapter = make_adapter(hf, tmp_path / "adapter", length=4, projection=projection)
    import_task(adapter, tmp_path / "bank", export)
    model = load(export, bank=tmp_path / "bank")
    config = model.config
    assert model.prompt("pre") is None and len(model.prefix("pre")) == 2 * config.num_layers
    peft_model = reference(hf, adapter)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    start = config.bos_token_id
    targets = [[5, 9, 13], [7], [30, 31, 32, 33], [11, 12]]
    got = model.decoder_logits(TEXTS, targets, task="pre")
    want_tokens = []
    for i, text in enumerate(TEXTS):
        encoded = tokenizer(text, return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        with torch.no_grad():
            want = peft_model(**batch, decoder_input_ids=torch.tensor([[start, *targets[i]]])).logits[0].numpy()
        want_tokens.append(greedy_by_forward(peft_model, batch, start, config, new_tokens=8))
        np.testing.assert_allclose(got[i, : 1 + len(targets[i])], want, atol=1e-4 * np.abs(want).max())
    assert [c.token_ids for c in model.complete(TEXTS, task="pre", max_new_tokens=8)] == want_tokens


def test_mixed_batches_of_prefix_prompt_and_plain_rows_equal_each_row_alone(seq2seq, tmp_path):
    _, hf, export = seq2seq
    import_task(make_adapter(hf, tmp_path / "adapter", length=3, projection=False), tmp_path / "bank", export)
    import_task(make_adapter(hf, tmp_path / "adapter5", length=5, projection=True, seed=2), tmp_path / "bank", export, "long")
    width = json.loads((export / "softprompt.json").read_text())["hidden_size"]
    bank_with(export, tmp_path / "bank", random_prompt(3, width, seed=3), name="soft")
    model = load(export, bank=tmp_path / "bank")
    tasks = ["pre", "soft", None, "long", "pre"]
    texts = [*TEXTS, TEXTS[1]]
    together = model.complete(texts, task=tasks, max_new_tokens=6)
    for text, task, row in zip(texts, tasks, together):
        assert row.token_ids == model.complete(text, task=task, max_new_tokens=6)[0].token_ids
        assert row.task == task
    streamed = "".join(model.stream(TEXTS[0], task="pre", max_new_tokens=6))
    assert streamed == together[0].text
    # classify scores rows of the three kinds in one call as it scores each alone
    spec = TaskSpec(template="{text} Sentiment:", labels={"positive": " positive", "negative": " dull slow"})
    bank_main(["import-peft", str(tmp_path / "adapter"), str(tmp_path / "bank"), "--task", "cls", "--model", str(export)])
    record = json.loads((tmp_path / "bank" / "cls.json").read_text())
    record["extra"].update(spec.to_extra())
    (tmp_path / "bank" / "cls.json").write_text(json.dumps(record))
    bank_with(export, tmp_path / "bank", random_prompt(3, width, seed=3), name="cls2", spec=spec)
    both = model.classify([TEXTS[0], TEXTS[1]], task=["cls", "cls2"])
    assert both[0]["scores"] == pytest.approx(model.classify(TEXTS[0], task="cls")[0]["scores"], abs=1e-5)
    assert both[1]["scores"] == pytest.approx(model.classify(TEXTS[1], task="cls2")[0]["scores"], abs=1e-5)


def test_the_engine_batches_seq2seq_rows_continuously(seq2seq, tmp_path):
    """Rows of every kind join a running encoder-decoder batch while it decodes, leave when done or cancelled, and
    each gives the tokens it gives alone."""
    import threading

    from softprompt.runtime import Engine, GenerationSettings, Job

    _, hf, export = seq2seq
    import_task(make_adapter(hf, tmp_path / "adapter", length=3, projection=False), tmp_path / "bank", export)
    width = json.loads((export / "softprompt.json").read_text())["hidden_size"]
    bank_with(export, tmp_path / "bank", random_prompt(3, width, seed=3), name="soft")
    model = load(export, bank=tmp_path / "bank")
    engine = Engine(model, max_batch=8)
    long = GenerationSettings(max_new_tokens=24, min_new_tokens=24)
    short = GenerationSettings(max_new_tokens=5, temperature=0.9, seed=4)
    steps, started, submitted, order, results = [0], threading.Event(), threading.Event(), [], {}

    def counting(state):  # on the engine's thread: a's third step holds it until the others are queued
        steps[0] += 1
        if steps[0] == 3:
            started.set()
            assert submitted.wait(60)

    def job(name, text, task, settings, on_step=lambda state: None):
        ids = model.encode(text, task)
        return Job(ids, task, settings, on_step, lambda state: (order.append(name), results.update({name: state})), print)

    cancelled = job("gone", TEXTS[3], "soft", long)
    engine.submit(job("a", TEXTS[0], "pre", long, counting))
    engine.submit(cancelled)
    assert started.wait(60)
    cancelled.cancelled = True
    for name, text, task in [("b", TEXTS[1], "soft"), ("c", TEXTS[2], None), ("d", TEXTS[3], "pre")]:
        engine.submit(job(name, text, task, short))
    submitted.set()
    engine.close(timeout=120)
    assert order[-1] == "a" and sorted(order) == ["a", "b", "c", "d"]  # the others joined a's batch and left first
    assert engine.stats.batches >= 2 and engine.stats.running == 0
    assert results["a"].ids == model.complete(TEXTS[0], task="pre", settings=long)[0].token_ids
    for name, text, task in [("b", TEXTS[1], "soft"), ("c", TEXTS[2], None), ("d", TEXTS[3], "pre")]:
        assert results[name].ids == model.complete(text, task=task, settings=short)[0].token_ids, name


def test_a_prefix_counts_against_the_decoder_positions(seq2seq, tmp_path):
    kind, hf, export = seq2seq
    import_task(make_adapter(hf, tmp_path / "adapter", length=30, projection=False), tmp_path / "bank", export)
    model = load(export, bank=tmp_path / "bank")
    if kind == "bart":  # learned positions: 40
        with pytest.raises(RequestError, match="a prefix of 30 \\+ 12 new tokens = 42 decoder positions; the model has 40"):
            model.generate(TEXTS[0], task="pre", max_new_tokens=12)
    assert isinstance(model.generate(TEXTS[0], task="pre", max_new_tokens=10), str)
    with pytest.raises(RequestError, match="input 0 has no tokens"):
        model.complete_ids([[]], task="pre", max_new_tokens=2)


def test_seq2seq_prefix_round_trips_through_export_peft(seq2seq, tmp_path):
    _, hf, export = seq2seq
    adapter = make_adapter(hf, tmp_path / "adapter", length=3, projection=True)
    import_task(adapter, tmp_path / "bank", export)
    assert bank_main(["export-peft", str(tmp_path / "bank"), "pre", str(tmp_path / "out"), "--model", str(export)]) == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["num_transformer_submodules"] == 2
    import_task(tmp_path / "out", tmp_path / "again", export)
    np.testing.assert_array_equal(load_prompt(tmp_path / "bank", "pre").vectors, load_prompt(tmp_path / "again", "pre").vectors)
    ids = torch.tensor([[5, 6, 7, 8, 2]])
    decoder = torch.tensor([[json.loads((export / "softprompt.json").read_text())["bos_token_id"], 9, 10]])
    with torch.no_grad():
        want = reference(hf, adapter)(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder).logits
        got = reference(hf, tmp_path / "out")(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder)
    torch.testing.assert_close(got.logits, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 6])
def test_seq2seq_layouts_follow_peft_and_refuse_what_it_cannot_serve(layers):
    rng = np.random.default_rng(layers)
    table = rng.standard_normal((3, layers * 2 * 2 * 4)).astype(np.float32)
    keys_values = prefix_keys_values(table, layers, 2, 4, "adapter", submodules=2)
    per_layer = table.reshape(3, layers, 2, 2, 4)
    for layer, source in enumerate(seq2seq_layer_sources(layers)):
        np.testing.assert_array_equal(keys_values[2 * layer], per_layer[:, source, 0].transpose(1, 0, 2))
    again = prefix_keys_values(prefix_table(keys_values, submodules=2), layers, 2, 4, "adapter", submodules=2)
    np.testing.assert_array_equal(again, keys_values)
    if layers % 2 == 0:  # layers i and i + L/2 read one saved layer: a prefix where they differ has no PEFT form
        different = keys_values.copy()
        different[2 * (layers // 2)] += 1.0
        with pytest.raises(PromptBankError, match=f"decoder layers 0 and {layers // 2} have different prefixes"):
            prefix_table(different, submodules=2)


PATTERN = "{soft:2}Review: {text}{soft:1} Sentiment:{soft:1}"
SPEC = TaskSpec(template=PATTERN, labels={"positive": " positive", "negative": " dull slow"})


def test_seq2seq_patterns_feed_the_encoder_what_training_builds(seq2seq, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from softprompt.training.seq2seq import encoder_inputs
    from softprompt.training.train import load_backbone

    _, hf, export = seq2seq
    width = json.loads((export / "softprompt.json").read_text())["hidden_size"]
    prompt = random_prompt(4, width, seed=6)
    bank_with(export, tmp_path, prompt, name="qa", spec=SPEC)
    bank_with(export, tmp_path, random_prompt(3, width, seed=7), name="plain")
    model = load(export, bank=tmp_path)
    backbone = load_backbone(str(hf), log=lambda m: None)
    reference = AutoModelForSeq2SeqLM.from_pretrained(hf).eval()
    start = model.config.bos_token_id
    for text in TEXTS:
        ids = model.encode(text, task="qa")
        assert -1 in ids and -2 in ids and ids == SPEC.encode(text, backbone.encode)
        embeds, mask = encoder_inputs(backbone.model, torch.from_numpy(prompt), [ids], SPEC.lead)
        np.testing.assert_array_equal(model.inputs_embeds(ids, task="qa"), embeds[0].detach().numpy())
        with torch.no_grad():
            want = reference(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=torch.tensor([[start, 9, 10]])).logits[
                0
            ]
        got = model.decoder_logits(text, [[9, 10]], task="qa")[0]
        np.testing.assert_allclose(got, want.numpy(), atol=2e-4 * float(want.abs().max()))  # fp32, ops reordered
    tasks = ["qa", "plain", None, "qa"]
    together = model.complete(TEXTS, task=tasks, max_new_tokens=6)
    for text, task, row in zip(TEXTS, tasks, together):
        assert row.token_ids == model.complete(text, task=task, max_new_tokens=6)[0].token_ids
    with pytest.raises(RequestError, match=r"token ids \[-3\] outside \[-2, 320\)"):
        model.complete_ids([[5, -3]], task="qa")


@pytest.mark.parametrize("method", ["prefix", "prefix-decoder", "p-tuning"])
def test_training_seq2seq_prefixes_and_patterns(seq2seq, tmp_path, method):
    """Backbone bit-identical; the saved task classifies the rows as training's evaluation did, in the runtime."""
    from softprompt.training.train import TrainConfig, load_backbone, save_trained, train_prompt

    _, hf, export = seq2seq
    rows, data = sentiment_data(tmp_path)
    spec = SPEC if method == "p-tuning" else TaskSpec(template="{text} Sentiment:", labels=SPEC.labels)
    backbone = load_backbone(str(hf), log=lambda m: None)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    parts = "decoder" if method == "prefix-decoder" else "all"
    name = "prefix" if method.startswith("prefix") else method
    config = TrainConfig(length=4, init="labels", batch_size=4, steps=6, lr=0.05, eval_every=3, method=name, prefix_parts=parts)
    vectors, record = train_prompt(backbone, data, spec, config, eval_data=data, progress=False, log=lambda m: None)
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    layers = json.loads((export / "softprompt.json").read_text())["num_layers"]
    assert vectors.shape[0] == {"prefix": 2 * (3 * layers), "prefix-decoder": 2 * layers, "p-tuning": 4}[method]
    if method.startswith("prefix"):  # every part's keys and values get a gradient
        from softprompt.training.seq2seq import seq2seq_prefix_start
        from softprompt.training.train import batch_loss, encode_examples

        width = backbone.model.get_input_embeddings().weight.shape[1]
        start = seq2seq_prefix_start(backbone.model, torch.from_numpy(random_prompt(4, width)), parts).requires_grad_(True)
        batch_loss(backbone.model, start, encode_examples(backbone, data, spec, 4)[:4]).backward()
        assert (start.grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    meta = save_trained(tmp_path / "bank", "s", vectors, backbone, spec, record, str(hf), overwrite=True)
    assert meta.parts == ({"decoder": layers, "encoder": layers, "cross": layers} if method == "prefix" else None)
    model = load(export, bank=tmp_path / "bank")
    predicted = [r["label"] for r in model.classify([r["text"] for r in rows], task="s")]
    accuracy = float(np.mean([p == r["label"] for p, r in zip(predicted, rows)]))
    assert accuracy == pytest.approx(record["best"]["accuracy"])


def test_a_prefix_for_encoder_decoder_and_cross_serves_the_logits_training_computes(seq2seq, tmp_path):
    """Li and Liang's prefix: the runtime's encoder and decoder graphs against training's PyTorch forward, and mixed
    batches (all parts, decoder-only prefix, prompt, nothing) equal to each row alone."""
    from softprompt.formats.bank import save_prefix
    from softprompt.training.seq2seq import seq2seq_prefix_start, target_logits
    from softprompt.training.train import load_backbone

    _, hf, export = seq2seq
    backbone = load_backbone(str(hf), log=lambda m: None)
    width = backbone.model.get_input_embeddings().weight.shape[1]
    prefix = seq2seq_prefix_start(backbone.model, torch.from_numpy(random_prompt(3, width, seed=8)), "all")
    prefix = prefix + torch.from_numpy(np.random.default_rng(0).standard_normal(prefix.shape).astype(np.float32)) * 0.3
    layers = json.loads((export / "softprompt.json").read_text())["num_layers"]
    parts = {"decoder": layers, "encoder": layers, "cross": layers}
    save_prefix(tmp_path, "all", prefix.numpy(), fingerprint=backbone.fingerprint, parts=parts)
    import_task(make_adapter(hf, tmp_path / "adapter", length=3, projection=False), tmp_path, export, "dec")
    bank_with(export, tmp_path, random_prompt(3, width, seed=3), name="soft")
    model = load(export, bank=tmp_path)
    targets = [[5, 9, 13], [7], [30, 31, 32, 33], [11, 12]]
    got = model.decoder_logits(TEXTS, targets, task="all")
    rows = [model.encode(t) for t in TEXTS]
    want = target_logits(backbone.model, prefix, rows, [[*t, 0] for t in targets]).detach().numpy()
    for i, target in enumerate(targets):
        np.testing.assert_allclose(got[i, : 1 + len(target)], want[i, : 1 + len(target)], atol=1e-4 * np.abs(want).max())
    tasks = ["all", "dec", "soft", None, "all"]
    texts = [*TEXTS, TEXTS[2]]
    together = model.complete(texts, task=tasks, max_new_tokens=6)
    for text, task, row in zip(texts, tasks, together):
        assert row.token_ids == model.complete(text, task=task, max_new_tokens=6)[0].token_ids
    # verify names the parts; PEFT cannot hold them; an export whose encoder takes no prefix refuses them
    from softprompt.prompt_bank.cli import main as cli

    assert cli(["verify", str(tmp_path), "--model", str(export)]) == 0
    assert cli(["export-peft", str(tmp_path), "all", str(tmp_path / "out"), "--model", str(export)]) == 1
    with pytest.raises(PromptBankError, match="a prefix for 2 encoder layers as well; the export has no encoder prefix input"):
        load_prompt(tmp_path, "all", cache=(layers, 4, 16, 0))
    with pytest.raises(PromptBankError, match="parts .* expected decoder \\+ encoder \\+ cross = 6"):
        save_prefix(tmp_path, "bad", prefix.numpy(), fingerprint=None, parts={"decoder": 2, "encoder": 1, "cross": 2})


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_seq2seq_p_tuning_adapters_serve_what_peft_serves(seq2seq, tmp_path, encoder):
    """PEFT saves a seq2seq P-tuning adapter's encoder output for both "submodules"; the first block leads the encoder
    input, as PEFT feeds it: decoder logits within 1e-4 of PEFT's and its greedy tokens."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    _, hf, export = seq2seq
    config = peft.PromptEncoderConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, encoder_hidden_size=32, encoder_reparameterization_type=encoder
    )
    trained = peft.get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(hf).eval(), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in trained.prompt_encoder["default"].parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    trained.save_pretrained(tmp_path / "adapter")
    import_task(tmp_path / "adapter", tmp_path / "bank", export, "p")
    model = load(export, bank=tmp_path / "bank")
    reference = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(hf).eval(), tmp_path / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    start = model.config.bos_token_id
    got = model.decoder_logits(TEXTS, [[5, 9]] * len(TEXTS), task="p")
    for i, text in enumerate(TEXTS):
        encoded = tokenizer(text, return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        with torch.no_grad():
            want = reference(**batch, decoder_input_ids=torch.tensor([[start, 5, 9]])).logits[0].numpy()
            tokens = reference.generate(**batch, max_new_tokens=6, do_sample=False, num_beams=1)[0, 1:].tolist()
        np.testing.assert_allclose(got[i], want, atol=1e-4 * np.abs(want).max())
        assert model.complete(text, task="p", max_new_tokens=6)[0].token_ids == tokens
