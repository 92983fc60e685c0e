"""Regenerate tests/fixture/: a tiny Llama export and a bank for it, which the torch-free tests run on.

    .venv/bin/python tests/make_fixture.py

The runtime ships to devices without torch, so its tests must run without torch too; they read
this committed export instead of building one. The model is the suite's tiny random Llama
(conftest.make_model); the bank holds a generation task with a template, a classification task
and a two-vector prompt.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from softprompt.exporter import export_model
from softprompt.formats import read_config, save_prompt

from conftest import make_model, random_prompt

FIXTURE = Path(__file__).resolve().parent / "fixture"


def main() -> int:
    with tempfile.TemporaryDirectory() as work:
        model = make_model(Path(work) / "hf", "llama")
        shutil.rmtree(FIXTURE, ignore_errors=True)
        # growing: the web twin runs this export on onnxruntime-node, whose newest (1.31) lacks the shared cache's op
        export_model(str(model), FIXTURE / "export", kv_cache="growing", log=lambda m: None)
    config = read_config(FIXTURE / "export")
    bank = FIXTURE / "bank"
    for name, length, seed, extra in (
        ("story", 5, 1, {"template": "Tell me a story about {text}."}),
        (
            "sentiment",
            4,
            2,
            {"template": "Review: {text} Sentiment:", "labels": {"positive": " positive", "negative": " negative"}},
        ),
        ("short", 2, 3, {}),
    ):
        save_prompt(
            bank,
            name,
            random_prompt(length, config.hidden_size, seed=seed),
            fingerprint=config.fingerprint,
            init="random",
            source="tests/make_fixture.py",
            extra=extra,
        )
    for path in sorted(FIXTURE.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>8}  {path.relative_to(FIXTURE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
