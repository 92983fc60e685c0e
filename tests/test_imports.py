"""The runtime and the bank format are what ships to devices: they must not need torch and friends."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "optimum", "onnx", "onnxscript", "peft")

PROBE = """
import json, sys
{setup}
import softprompt.runtime, softprompt.prompt_bank
{work}
heavy = sorted({{m.split('.')[0] for m, mod in list(sys.modules.items()) if mod is not None}} & set({heavy!r}))
print(json.dumps(heavy))
"""


def run_probe(setup: str = "", work: str = "") -> list[str]:
    code = PROBE.format(setup=setup, work=work, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_runtime_and_bank_loads_no_heavy_module():
    assert run_probe() == []


def test_runtime_generates_with_torch_and_transformers_blocked(llama_export, tmp_path):
    """Make the heavy packages unimportable, as on a device, then load, import a bank task and generate."""
    block = f"for name in {HEAVY!r}: sys.modules[name] = None"
    work = f"""
from softprompt.prompt_bank.cli import main as bank_main
assert bank_main(["from-text", {str(llama_export)!r}, {str(tmp_path)!r}, "--task", "t", "hello there"]) == 0
from softprompt.runtime import load
model = load({str(llama_export)!r}, bank={str(tmp_path)!r})
out = model.complete(["Tell me a story", "dull"], task="t", max_new_tokens=4)
assert len(out) == 2 and all(len(c.token_ids) >= 1 for c in out)
"""
    assert run_probe(setup=block, work=work) == []


def test_seq2seq_and_encoder_runtimes_import_without_heavy_modules():
    """The modules `load` picks for encoder and encoder-decoder exports are device code too."""
    block = f"for name in {HEAVY!r}: sys.modules[name] = None"
    assert run_probe(setup=block, work="import softprompt.runtime.seq2seq, softprompt.runtime.encoder") == []


def test_the_runtime_reads_its_version_only_when_asked():
    """importlib.metadata (email, zipfile, csv...) is about 4 MB that an app embedding the runtime never uses: the
    import leaves it out, and `__version__` still names the installed package."""
    code = """
import json, sys
before = "importlib.metadata" in sys.modules
import softprompt.runtime, softprompt.formats
after = "importlib.metadata" in sys.modules
from importlib.metadata import version
print(json.dumps([before, after, softprompt.formats.__version__ == version("softprompt-onnx")]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, after, same = json.loads(result.stdout.strip().splitlines()[-1])
    assert after == before and same


def test_greedy_generation_without_tasks_loads_no_random_generator_or_openssl(llama_export):
    """numpy.random (3 MB, and through `secrets` OpenSSL's hashlib, 3.6 MB more) is for sampling, and hashlib for
    checking a task's vectors: a process that generates greedily without tasks loads neither. Sampling still does,
    and a seed still gives the same text."""
    code = f"""
import json, sys
from softprompt.runtime import load
model = load({str(llama_export)!r}, providers="cpu")
model.complete(["Tell me a story"], max_new_tokens=3)
greedy = sorted(m for m in ("numpy.random", "hashlib", "_hashlib") if m in sys.modules)
texts = [model.complete(["Tell me a story"], max_new_tokens=5, temperature=0.9, seed=7)[0].token_ids for _ in range(2)]
print(json.dumps([greedy, "numpy.random" in sys.modules, texts[0] == texts[1]]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    greedy, sampled, same = json.loads(result.stdout.strip().splitlines()[-1])
    assert greedy == [] and sampled and same
