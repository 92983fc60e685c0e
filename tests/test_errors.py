"""Every failure is one line: CLIs print `error: ...` (usage errors exit 2, others 1) and never a traceback;
the Python API raises the project's own errors, which are also the matching built-in (ValueError, TypeError)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from softprompt.formats.errors import SoftpromptError
from softprompt.runtime import load
from softprompt.runtime.cli import main as run_main

from conftest import TEXTS


def run_cli(*args: str, stdin: bytes = b"", env: dict | None = None) -> tuple[int, list[str]]:
    """Run `run-model` in its own process (argv and stdin as raw bytes): exit code and stderr lines."""
    command = [sys.executable, "-m", "softprompt.runtime.cli", *args]
    done = subprocess.run(command, input=stdin, capture_output=True, timeout=120, env={**os.environ, **(env or {})})
    return done.returncode, done.stderr.decode("utf-8", "replace").splitlines()


def damaged(export, tmp_path, change) -> str:
    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    change(folder)
    return str(folder)


def retype(key, value):
    def change(folder):
        config = json.loads((folder / "softprompt.json").read_text())
        config[key] = value
        (folder / "softprompt.json").write_text(json.dumps(config))

    return change


BROKEN_EXPORTS = {
    "damaged graph": (lambda f: (f / "model.onnx").write_bytes((f / "model.onnx").read_bytes()[:100]), "onnxruntime cannot load"),
    "empty graph": (lambda f: (f / "model.onnx").write_bytes(b""), "onnxruntime cannot load"),
    "garbage tokenizer": (lambda f: (f / "tokenizer.json").write_text("garbage"), "not a readable tokenizer.json"),
    "empty table": (lambda f: (f / "embeddings.npy").write_bytes(b""), "not a readable .npy table"),
    "eos ids a string": (retype("eos_token_ids", "x"), "eos_token_ids is 'x'; expected a list of token ids (0 or more)"),
    "input names a number": (retype("input_names", 5), "input_names is 5; expected a list of strings"),
    "config a list": (lambda f: (f / "softprompt.json").write_text("[]"), "expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(BROKEN_EXPORTS))
def test_a_broken_export_is_one_error_line(llama_export, tmp_path, case):
    change, message = BROKEN_EXPORTS[case]
    code, err = run_cli(damaged(llama_export, tmp_path, change), "hello")
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_bad_text_and_environment_are_one_error_line(llama_export):
    code, err = run_cli(str(llama_export), stdin=b"\xff\xfe not utf-8\n")
    # (read strictly, or with the surrogate escapes a C locale gives: either way one line naming the problem)
    assert code == 1 and len(err) == 1 and re.search(r"is not (valid Unicode|utf-8) text", err[0]), err
    code, err = run_cli(str(llama_export), os.fsdecode(b"\xff"))
    assert code == 1 and err == ["error: input 0 is not valid Unicode text (surrogates not allowed at character 0)"], err
    code, err = run_cli(str(llama_export), "hello", env={"SOFTPROMPT_THREADS": "many"})
    assert code == 1 and err == ["error: SOFTPROMPT_THREADS='many'; expected a positive whole number of threads"], err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "--seed -1; expected 0 to 2**64 - 1"),
        (["--top-p", "2"], "--top-p 2.0; expected a value in (0, 1]"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0; expected at least 1"),
        (["--temperature", "nan"], "--temperature nan; expected 0 (greedy)"),
        (["--threads", "0"], "--threads 0; expected at least 1"),
    ],
)
def test_values_out_of_range_are_usage_errors(llama_export, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        run_main([str(llama_export), "hello", *args])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_every_cli_has_a_version(capsys):
    from softprompt.exporter.cli import main as export_main
    from softprompt.prompt_bank.cli import main as bank_main
    from softprompt.training.cli import main as train_main

    for name, main in (
        ("run-model", run_main),
        ("prompt-bank", bank_main),
        ("export-model", export_main),
        ("train-prompt", train_main),
    ):
        with pytest.raises(SystemExit) as info:
            main(["--version"])
        assert info.value.code == 0 and capsys.readouterr().out.startswith(f"{name} ")


API = {
    "a number as the text": (lambda m: m.generate(123), TypeError, "texts 123"),
    "a number in the texts": (lambda m: m.complete(["ok", 1]), TypeError, "input 1 is 1"),
    "a number as the task": (lambda m: m.generate("hi", task=5), TypeError, "task 5"),
    "a number as a stop string": (lambda m: m.generate("hi", stop=[1]), TypeError, "stop string 1"),
    "a fraction of tokens": (lambda m: m.generate("hi", max_new_tokens=2.5), TypeError, "max_new_tokens 2.5"),
    "text as a count": (lambda m: m.generate("hi", max_new_tokens="3"), TypeError, "max_new_tokens '3'"),
    "a negative seed": (lambda m: m.generate("hi", temperature=1.0, seed=-1), ValueError, "seed -1"),
    "a word as the temperature": (lambda m: m.generate("hi", temperature="hot"), TypeError, "temperature 'hot'"),
    "a lone surrogate": (lambda m: m.generate("a\udcff"), ValueError, "not valid Unicode"),
    "ids out of range": (lambda m: m.logits_of_ids([[10**6]]), ValueError, "[1000000] outside"),
    "ids that are text": (lambda m: m.logits_of_ids([["a"]]), TypeError, "expected a list of token ids"),
    "streaming a list": (lambda m: list(m.stream(["a", "b"])), TypeError, "stream takes one text"),
}


@pytest.mark.parametrize("case", list(API))
def test_the_api_raises_its_own_errors_with_the_value(llama_export, case):
    call, builtin, message = API[case]
    model = load(llama_export)
    with pytest.raises(SoftpromptError, match=None) as info:
        call(model)
    assert isinstance(info.value, builtin) and message in str(info.value)
    assert model.generate(TEXTS[0], max_new_tokens=2)  # and the model still serves


def adapter(folder, config, header: bytes | None = None):
    import struct

    folder.mkdir()
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if header is not None:
        (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return folder


PROMPT_TUNING = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "task_type": "CAUSAL_LM"}
KEY = "prompt_embeddings"


@pytest.mark.parametrize(
    ("config", "header", "message"),
    [
        ("[]", None, "a JSON list; expected an object"),
        ("[" * 100_000, None, "not valid JSON"),
        ({**PROMPT_TUNING, "num_virtual_tokens": "2"}, None, "num_virtual_tokens is '2'"),
        (PROMPT_TUNING, b"[1, 2]", "safetensors header is a list"),
        (PROMPT_TUNING, b'{"prompt_embeddings": 5}', "is described as 5"),
        (PROMPT_TUNING, json.dumps({KEY: {"dtype": "F32", "shape": [2, "a"], "data_offsets": [0, 8]}}).encode(), "described as"),
        (PROMPT_TUNING, json.dumps({KEY: {"dtype": "F32", "shape": [10**9, 64], "data_offsets": [0, 8]}}).encode(), "needs"),
        (PROMPT_TUNING, json.dumps({KEY: {"dtype": "X9", "shape": [2, 2], "data_offsets": [0, 16]}}).encode(), "described as"),
    ],
)
def test_malformed_adapters_are_one_error_line(llama_export, tmp_path, capsys, config, header, message):
    from softprompt.prompt_bank.cli import main as bank_main

    folder = adapter(tmp_path / "adapter", config, header)
    code = bank_main(["import-peft", str(folder), str(tmp_path / "bank"), "--task", "t", "--model", str(llama_export)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize(
    ("cli", "args", "message"),
    [
        ("train-prompt", ["--length", "0"], "--length 0; expected at least 1"),
        ("train-prompt", ["--lr", "nan"], "--lr nan; expected a positive number"),
        ("train-prompt", ["--batch-size", "-2"], "--batch-size -2; expected at least 1"),
        ("export-model", ["--tolerance", "-1"], "--tolerance -1.0; expected a positive number"),
        ("export-model", ["--precision", "int8", "--block-size", "24"], "--block-size 24; expected a power of two"),
    ],
)
def test_other_clis_refuse_values_out_of_range_as_usage_errors(tmp_path, capsys, cli, args, message):
    from softprompt.exporter.cli import main as export_main
    from softprompt.training.cli import main as train_main

    if cli == "train-prompt":
        argv = ["some-model", "--data", str(tmp_path / "d.jsonl"), "--task", "t", "--bank", str(tmp_path / "b"), *args]
        main = train_main
    else:
        argv, main = ["some-model", str(tmp_path / "out"), *args], export_main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
