"""The three commands: exit codes (0 ok, 1 error with one `error:` line, 2 usage), output and input forms."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from softprompt.exporter.cli import main as export_main
from softprompt.prompt_bank import save_prompt
from softprompt.prompt_bank.cli import main as bank_main
from softprompt.runtime import load, read_config
from softprompt.runtime.cli import main as run_main

from conftest import TEXTS, random_prompt


@pytest.fixture
def bank(llama_export, tmp_path):
    config = read_config(llama_export)
    save_prompt(tmp_path / "bank", "sentiment", random_prompt(4, config.hidden_size), fingerprint=config.fingerprint)
    return tmp_path / "bank"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_run_model_json_one_object_per_input_in_order(llama_export, bank, capsys):
    args = [str(llama_export), "--bank", str(bank), "--task", "sentiment", "--json", *TEXTS[:3], "--max-new-tokens", "6"]
    assert run_main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["input"] for r in records] == TEXTS[:3]
    assert all(r["task"] == "sentiment" and isinstance(r["text"], str) for r in records)
    assert all(1 <= len(r["token_ids"]) <= 6 and r["finish_reason"] in ("stop", "length") for r in records)


def test_run_model_options_after_texts_and_plain_output(llama_export, bank, capsys):
    assert (
        run_main([str(llama_export), TEXTS[0], TEXTS[1], "--bank", str(bank), "--task", "sentiment", "--max-new-tokens", "5"])
        == 0
    )
    plain = capsys.readouterr().out
    assert (
        run_main(
            [str(llama_export), "--bank", str(bank), "--task", "sentiment", "--max-new-tokens", "5", "--json", TEXTS[0], TEXTS[1]]
        )
        == 0
    )
    outputs = [json.loads(line)["text"] for line in capsys.readouterr().out.strip().splitlines()]
    assert plain == "".join(f"> {t}\n{o}\n\n" for t, o in zip(TEXTS[:2], outputs))


def test_run_model_single_text_is_streamed_to_the_same_text(llama_export, bank, capsys):
    assert run_main([str(llama_export), "--bank", str(bank), "--task", "sentiment", "--max-new-tokens", "7", TEXTS[3]]) == 0
    streamed = capsys.readouterr().out
    assert (
        run_main([str(llama_export), "--bank", str(bank), "--task", "sentiment", "--max-new-tokens", "7", "--json", TEXTS[3]])
        == 0
    )
    assert streamed == json.loads(capsys.readouterr().out)["text"] + "\n"


def test_run_model_reads_standard_input(llama_export, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{TEXTS[0]}\n\n{TEXTS[2]}\n"))
    assert run_main([str(llama_export), "--json", "--max-new-tokens", "3"]) == 0
    assert [json.loads(x)["input"] for x in capsys.readouterr().out.strip().splitlines()] == [TEXTS[0], TEXTS[2]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "nope"], "no task 'nope'.*sentiment"),
        (["--task", "sentiment", "--max-new-tokens", "1000"], "positions; the model has 128"),
        (["--providers", "TensorrtExecutionProvider"], "not available in this onnxruntime"),
    ],
)
def test_run_model_errors_exit_1_with_one_line(llama_export, bank, capsys, extra, message):
    assert run_main([str(llama_export), "--bank", str(bank), *extra, "hello"]) == 1
    assert re.search(message, one_error_line(capsys))


def test_run_model_missing_export_exits_1(tmp_path, capsys):
    assert run_main([str(tmp_path), "hello"]) == 1
    assert "softprompt.json: not found" in one_error_line(capsys)


@pytest.mark.parametrize("args", [[], ["x", "--task", "t", "hi"], ["x", "--max-new-tokens", "many", "hi"]])
def test_run_model_usage_errors_exit_2(args):
    with pytest.raises(SystemExit) as info:
        run_main(args)
    assert info.value.code == 2


def test_export_model_help_and_usage(capsys):
    with pytest.raises(SystemExit) as info:
        export_main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--opset", "--tolerance", "--attention", "--cache-dir", "--force", "--quiet", "smollm2-135m"):
        assert option in text
    with pytest.raises(SystemExit) as info:
        export_main([])
    assert info.value.code == 2


def test_export_model_unknown_model_exits_1(tmp_path, capsys):
    assert export_main(["not-a-model", str(tmp_path / "out"), "-q"]) == 1
    assert "neither a built-in name" in one_error_line(capsys)


def test_export_model_cli_writes_an_export(gpt2_dir, tmp_path, capsys):
    assert export_main([str(gpt2_dir), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "out")
    assert "[3/6] exporting the ONNX graph" in captured.err and "validating against PyTorch" in captured.err
    assert export_main([str(gpt2_dir), str(tmp_path / "out"), "-q"]) == 1
    assert "--force" in one_error_line(capsys)


def test_prompt_bank_list_show_verify(llama_export, gpt2_export, bank, capsys):
    assert bank_main(["list", str(bank)]) == 0
    assert "sentiment" in capsys.readouterr().out
    assert bank_main(["show", str(bank), "sentiment"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["length"] == 4 and record["stats"]["bytes"] == 4 * 64 * 4
    assert bank_main(["verify", str(bank), "--model", str(llama_export)]) == 0
    assert "1 of 1 tasks valid" in capsys.readouterr().out
    assert bank_main(["verify", str(bank), "--model", str(gpt2_export)]) == 1
    assert "FAIL  sentiment" in capsys.readouterr().out


def test_prompt_bank_errors(llama_export, bank, tmp_path, capsys):
    assert bank_main(["show", str(bank), "nope"]) == 1
    assert "tasks there: sentiment" in one_error_line(capsys)
    np.save(bank / "broken.npy", np.ones(3, np.float32))
    assert bank_main(["list", str(bank)]) == 1
    assert "broken" in capsys.readouterr().out
    assert bank_main(["from-text", str(llama_export), str(bank), "--task", "sentiment", "hello"]) == 1
    assert "--force" in one_error_line(capsys)
    with pytest.raises(SystemExit) as info:
        bank_main(["import-peft", str(tmp_path)])
    assert info.value.code == 2


def test_import_peft_refusals(llama_export, gpt2_export, tmp_path, capsys):
    peft = pytest.importorskip("peft")

    adapter = tmp_path / "lora"
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.save_pretrained(adapter)
    assert bank_main(["import-peft", str(adapter), str(tmp_path / "b"), "--task", "x", "--model", str(llama_export)]) == 1
    assert "peft_type is 'LORA'; expected 'PROMPT_TUNING', 'P_TUNING' or 'PREFIX_TUNING'" in one_error_line(capsys)
    assert (
        bank_main(["import-peft", str(tmp_path / "missing"), str(tmp_path / "b"), "--task", "x", "--model", str(llama_export)])
        == 1
    )
    assert "no adapter_config.json" in one_error_line(capsys)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )


def test_import_peft_checks_width_and_reads_bin_and_bf16(llama_dir, llama_export, gpt2_export, tmp_path, capsys):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_dir), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    weight = model.prompt_encoder["default"].embedding.weight.detach().numpy().copy()
    model.save_pretrained(tmp_path / "st")
    capsys.readouterr()  # transformers 5 shows a loading bar on stderr: only the command's own output is checked
    assert bank_main(["import-peft", str(tmp_path / "st"), str(tmp_path / "b"), "--task", "x", "--model", str(gpt2_export)]) == 1
    assert "prompt width E=64; the export" in one_error_line(capsys)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (
        bank_main(["import-peft", str(tmp_path / "bin"), str(tmp_path / "b"), "--task", "frombin", "--model", str(llama_export)])
        == 0
    )
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert (
        bank_main(
            ["import-peft", str(tmp_path / "bf16"), str(tmp_path / "b"), "--task", "frombf16", "--model", str(llama_export)]
        )
        == 0
    )
    from softprompt.prompt_bank import load_prompt

    np.testing.assert_array_equal(load_prompt(tmp_path / "b", "frombin").vectors, weight)
    bf16 = torch.from_numpy(weight).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(load_prompt(tmp_path / "b", "frombf16").vectors, bf16)
    assert load_prompt(tmp_path / "b", "frombin").meta.fingerprint == read_config(llama_export).fingerprint
    # An imported adapter can carry its template and labels, so it classifies without editing JSON.
    args = ["import-peft", str(tmp_path / "st"), str(tmp_path / "b"), "--task", "cls", "--model", str(llama_export)]
    assert (
        bank_main([*args, "--template", "Review: {text}\\nSentiment:", "--verbalizer", "pos= good", "--verbalizer", "neg= bad"])
        == 0
    )
    extra = load_prompt(tmp_path / "b", "cls").meta.extra
    assert extra["template"] == "Review: {text}\nSentiment:" and extra["labels"] == {"pos": " good", "neg": " bad"}
    assert load(llama_export, bank=tmp_path / "b").classify("fine", task="cls")[0]["label"] in ("pos", "neg")


def test_from_text_takes_a_template_and_labels(llama_export, tmp_path, capsys):
    args = ["from-text", str(llama_export), str(tmp_path / "b"), "--task", "t", "Decide.", "--template", "Q: {text}\\nA:"]
    assert bank_main([*args, "--verbalizer", "yes= yes", "--verbalizer", "no= no"]) == 0
    model = load(llama_export, bank=tmp_path / "b")
    assert model.encode("x", "t") == model.encode("Q: x\nA:")
    assert set(model.classify("x", task="t")[0]["scores"]) == {"yes", "no"}
    assert bank_main([*args, "--force", "--verbalizer", "yes= same", "--verbalizer", "no= same"]) == 1
    assert "share the verbalizer ' same'" in one_error_line(capsys)


def test_console_scripts_are_installed_and_run(llama_export):
    from importlib.metadata import entry_points
    from pathlib import Path

    names = {ep.name for ep in entry_points(group="console_scripts") if ep.value.startswith("softprompt.")}
    assert names == {"export-model", "prompt-bank", "run-model", "train-prompt", "serve-model", "cluster-model"}
    helped = subprocess.run([str(Path(sys.executable).with_name("serve-model")), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "OpenAI API" in helped.stdout
    helped = subprocess.run([str(Path(sys.executable).with_name("cluster-model")), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "Ray Serve replicas" in helped.stdout and "{serve,run}" in helped.stdout
    script = Path(sys.executable).with_name("run-model")
    result = subprocess.run(
        [str(script), str(llama_export), "--max-new-tokens", "2", "--json", "hi"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["input"] == "hi"


def test_a_classification_task_asked_to_generate_answers_with_one_label(llama_export, tmp_path, capsys):
    """Not the label repeated until max_new_tokens: the row ends after a label, or after the longest label's tokens."""

    config = read_config(llama_export)
    bank = tmp_path / "bank"
    prompt = np.zeros((1, config.hidden_size), np.float32)
    save_prompt(bank, "free", prompt, fingerprint=config.fingerprint)
    model = load(llama_export, bank=bank)
    plain = model.complete("a gorgeous film", task="free", max_new_tokens=32)[0]
    assert len(plain.token_ids) == 32
    # One label is what this random model writes first under the prompt; the other is longer and never written.
    labels = {"yes": model.decode(plain.token_ids[:1]), "no": " zzzz qqqq xxxx wwww"}
    longest = max(len(model.backbone.encode(words, add_special_tokens=False)) for words in labels.values())
    save_prompt(bank, "labelled", prompt, fingerprint=config.fingerprint, extra={"labels": labels})
    row = model.complete("a gorgeous film", task="labelled", max_new_tokens=32)[0]
    assert row.finish_reason == "stop" and 1 <= len(row.token_ids) <= longest < 32
    assert row.token_ids == plain.token_ids[: len(row.token_ids)]  # the same tokens, cut after the label
    if model.backbone.encode(labels["yes"], add_special_tokens=False) == plain.token_ids[:1]:
        assert row.token_ids == plain.token_ids[:1]
    # min_new_tokens asks for more than a label: then the row runs on.
    assert len(model.complete("a gorgeous film", task="labelled", max_new_tokens=8, min_new_tokens=8)[0].token_ids) == 8
    # run-model prints the label once.
    assert run_main([str(llama_export), "--bank", str(bank), "--task", "labelled", "--json", "a gorgeous film"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == row.token_ids
