"""A quantized decoder judged by what users compare (exporter/quality.py): KL to fp32's next-token distribution, top-1
agreement and perplexity on sample text, refusing only a broken graph."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from softprompt.exporter import ExportValidationError, export_model
from softprompt.exporter.cli import main as export_main
from softprompt.formats.export_folder import read_config


@pytest.mark.parametrize("positions_at_once", [16, 2])
def test_quality_measures_what_users_compare(positions_at_once, monkeypatch):
    """KL to fp32, top-1 agreement and perplexity, from logits with known answers, whether a text is measured in one
    piece or in pieces of 2 positions; broken graphs are refused."""
    from softprompt.exporter import quality
    from softprompt.exporter.quality import Quality, check, compare

    monkeypatch.setattr(quality, "POSITIONS_AT_ONCE", positions_at_once)

    rng = np.random.default_rng(0)
    reference = [rng.normal(size=(5, 7)), rng.normal(size=(3, 7))]
    ids = [[0, 1, 2, 3, 4], [6, 5, 4]]
    same = compare(reference, reference, ids)
    assert same.kl_mean == pytest.approx(0, abs=1e-12) and same.top1_agreement == 1 and same.perplexity_ratio == pytest.approx(1)
    assert same.positions == 8
    # Logits shifted by a constant are the same distribution; scaled by 0 they are uniform: KL(p || uniform) = log V - H(p).
    assert compare(reference, [r + 3.0 for r in reference], ids).kl_mean == pytest.approx(0, abs=1e-12)
    flat = compare(reference, [0 * r for r in reference], ids)
    p = [np.exp(r) / np.exp(r).sum(-1, keepdims=True) for r in reference]
    entropy = np.concatenate([-(q * np.log(q)).sum(-1) for q in p])
    assert flat.kl_mean == pytest.approx(np.log(7) - entropy.mean())
    assert flat.perplexity == pytest.approx(7)  # uniform over 7 tokens
    nll = np.concatenate([-np.log(q[np.arange(len(row) - 1), row[1:]]) for q, row in zip(p, ids)])
    assert same.perplexity_fp32 == pytest.approx(np.exp(nll.mean()))
    negated = compare(reference, [-r for r in reference], ids)
    assert negated.top1_agreement == 0
    half = compare(reference, [r * 0.5 for r in reference], iter(ids))  # logits made as they are read: any iterables
    q = [np.exp(r / 2) / np.exp(r / 2).sum(-1, keepdims=True) for r in reference]
    kl = np.concatenate([(a * (np.log(a) - np.log(b))).sum(-1) for a, b in zip(p, q)])
    assert half.kl_mean == pytest.approx(kl.mean()) and half.kl_max == pytest.approx(kl.max())
    nll_half = np.concatenate([-np.log(b[np.arange(len(row) - 1), row[1:]]) for b, row in zip(q, ids)])
    assert half.perplexity == pytest.approx(np.exp(nll_half.mean())) and half.positions == 8
    with pytest.raises(ExportValidationError, match="the graph gives non-finite logits"):
        compare(reference, [r * np.nan for r in reference], ids)
    with pytest.raises(ExportValidationError, match=r"broken on sample text: kl mean .* > 1"):
        check(negated)
    check(Quality(0.4, 4.0, 0.7, 10.0, 13.0, 100))  # what --fast gives the default model: reported, not refused
    with pytest.raises(ExportValidationError, match=r"perplexity ratio 2.5 > 2"):
        check(Quality(0.4, 4.0, 0.7, 10.0, 25.0, 100))


def test_a_quantized_decoder_is_judged_by_its_quality_and_a_broken_one_refused(llama_dir, tmp_path, monkeypatch, capsys):
    """int4 of a model born in float exports by default with its quality reported; a graph whose logits are negated
    (what a wrong weight layout does) is refused, naming what to do."""
    import torch
    from transformers import AutoModelForCausalLM

    from softprompt.exporter import conversion

    assert export_main([str(llama_dir), str(tmp_path / "int4"), "--precision", "int4"]) == 0
    out = capsys.readouterr().err
    assert "refused only when broken" in out and "next-token quality: KL to fp32" in out
    quality = read_config(tmp_path / "int4").validation["quality"]
    assert quality["kl_mean"] < 1.0 and 0 < quality["top1_agreement"] <= 1 and quality["positions"] > 100
    assert read_config(tmp_path / "int4").validation["max_relative_diff"]  # still reported

    broken = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        broken.lm_head.weight.mul_(-8.0)
    broken.save_pretrained(tmp_path / "negated")
    shutil.copy(llama_dir / "tokenizer.json", tmp_path / "negated")
    export_model(str(tmp_path / "negated"), tmp_path / "negated-export", log=lambda m: None)
    real = conversion.apply_precision

    def negating(path, *args, **kwargs):
        change = real(path, *args, **kwargs)
        for name in ("model.onnx", "model.onnx.data"):
            if (tmp_path / "negated-export" / name).exists():
                shutil.copy(tmp_path / "negated-export" / name, path.parent / name)
        return change

    monkeypatch.setattr(conversion, "apply_precision", negating)
    with pytest.raises(
        ExportValidationError, match=r"--precision int4: the graph is broken on sample text: kl mean .*--tolerance"
    ):
        export_model(str(llama_dir), tmp_path / "bad", precision="int4", log=lambda m: None)
    assert not (tmp_path / "bad").exists()
