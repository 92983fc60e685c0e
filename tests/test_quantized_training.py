"""Quantization-aware prompt training: the frozen model runs exactly the weights of its int8/int4 export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from softprompt.exporter import export_model
from softprompt.exporter.precision import default_precision, for_kind
from softprompt.prompt_bank import load_prompt, save_prompt
from softprompt.prompt_bank.cli import main as bank_main
from softprompt.runtime import load
from softprompt.training.cli import main as train_main
from softprompt.training.errors import TrainingError
from softprompt.training.quantized import quantize_backbone
from softprompt.training.train import build_inputs_embeds, load_backbone

from conftest import TEXTS, TINY_INT4_TOLERANCE, random_prompt


def torch_logits(backbone, prompt: np.ndarray, text: str) -> np.ndarray:
    with torch.no_grad():
        embeds, mask, positions = build_inputs_embeds(backbone.model, torch.from_numpy(prompt), [backbone.encode(text)])
        return backbone.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[0].numpy()


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_the_trained_model_computes_what_the_export_computes(llama_dir, tied_dir, tmp_path, precision, which):
    """Logits of the quantized PyTorch model equal the export's at float compute (accuracy level 0), far closer
    than the fp32 model's: the prompt trains against the device's very weights and table."""
    folder = tied_dir if which == "tied" else llama_dir
    backbone = load_backbone(str(folder), log=lambda m: None)
    prompt = random_prompt(4, 64)
    save_prompt(tmp_path / "bank", "t", prompt, fingerprint=backbone.fingerprint)
    fp32 = torch_logits(backbone, prompt, TEXTS[0])
    record = quantize_backbone(backbone, precision)
    assert record["precision"] == precision and record == for_kind(default_precision(precision), "decoder").record()
    assert not any(p.requires_grad for p in backbone.model.parameters())
    quantized = torch_logits(backbone, prompt, TEXTS[0])
    export = tmp_path / "export"
    export_model(
        str(folder),
        export,
        precision=default_precision(precision, accuracy_level=0),
        tolerance=TINY_INT4_TOLERANCE,
        log=lambda m: None,
    )
    device = load(export, bank=tmp_path / "bank").logits(TEXTS[0], task="t")[0]
    scale = np.abs(device).max()
    assert np.abs(quantized - device).max() < 1e-4 * scale
    assert np.abs(fp32 - device).max() > 1e-3 * scale  # the test could tell the fp32 weights apart


def test_train_prompt_at_int4_saves_a_prompt_for_every_precision(llama_dir, llama_export, tmp_path, capsys):
    records = [{"text": t, "label": label} for t, label in (("a gorgeous film", "positive"), ("dull and slow", "negative"))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 4))
    args = [str(llama_dir), "--data", str(tmp_path / "train.jsonl"), "--task", "t", "--bank", str(tmp_path / "bank")]
    args += ["--length", "3", "--steps", "3", "--batch-size", "4", "--template", "Review: {text}\\nSentiment:", "-q"]
    assert train_main([*args, "--precision", "int4"]) == 0
    meta = load_prompt(tmp_path / "bank", "t").meta
    assert meta.training["precision"]["precision"] == "int4"
    assert meta.training["precision"]["algorithm"] == "offset"
    assert bank_main(["verify", str(tmp_path / "bank"), "--model", str(llama_export)]) == 0  # the fp32 model's fingerprint
    assert len(load(llama_export, bank=tmp_path / "bank").complete(TEXTS[0], task="t", max_new_tokens=2)[0].token_ids) == 2
    with pytest.raises(SystemExit) as exit_info:
        train_main([*args, "--precision", "int3", "--force"])
    assert (
        exit_info.value.code == 2
        and "--precision 'int3'; expected fp32, int8, int4 or an export folder" in capsys.readouterr().err
    )


def test_quantization_aware_training_is_refused_where_it_is_not_built(tmp_path):
    from test_encoder import make_bert

    backbone = load_backbone(str(make_bert(tmp_path / "bert")), log=lambda m: None)
    with pytest.raises(TrainingError, match="--precision int8 trains decoder prompts, not encoder ones"):
        quantize_backbone(backbone, "int8")
    with pytest.raises(TrainingError, match="--precision 'fp16'; expected one of fp32, int8, int4 or an export folder"):
        quantize_backbone(backbone, "fp16")
    assert quantize_backbone(backbone, "fp32") == {"precision": "fp32"}


def test_training_follows_an_export_folders_own_settings(llama_dir, tmp_path):
    """--precision EXPORT_DIR: the weights of that export, whatever its settings (here rtn, lm_head at 4 bits)."""
    from softprompt.exporter.precision import Precision

    export = tmp_path / "rtn"
    precision = Precision("int4", algorithm="rtn", accuracy_level=0, block_size=16)
    export_model(str(llama_dir), export, precision=precision, tolerance=TINY_INT4_TOLERANCE, log=lambda m: None)
    backbone = load_backbone(str(llama_dir), log=lambda m: None)
    prompt = random_prompt(4, 64)
    save_prompt(tmp_path / "bank", "t", prompt, fingerprint=backbone.fingerprint)
    record = quantize_backbone(backbone, str(export))
    assert (record["algorithm"], record["block_size"], record["keep"]) == ("rtn", 16, [])
    device = load(export, bank=tmp_path / "bank").logits(TEXTS[1], task="t")[0]
    assert np.abs(torch_logits(backbone, prompt, TEXTS[1]) - device).max() < 1e-4 * np.abs(device).max()
