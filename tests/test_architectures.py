"""Beyond Llama and GPT-2: architectures with biases, scaled embeddings, sliding windows, MQA and ALiBi.

Four run in every `make test`; the rest of tests/architectures.py is the sweep (`pytest -m sweep`,
`make sweep`), too slow for every run.
"""

from __future__ import annotations

import pytest

from softprompt.exporter import export_model

from architectures import build, configs, greedy_matches
from conftest import TEXTS

EVERY_RUN = ("qwen2", "gemma3_text", "falcon", "bloom")


@pytest.mark.parametrize(
    "name", [name if name in EVERY_RUN else pytest.param(name, marks=pytest.mark.sweep) for name in configs()]
)
def test_architecture_exports_and_matches_transformers(name, tmp_path):
    build(name, tmp_path)
    export_model(str(tmp_path), tmp_path / "export", log=lambda m: None)
    alone, batched = greedy_matches(tmp_path, tmp_path / "export", TEXTS)
    assert alone, f"{name}: greedy tokens differ from transformers"
    assert batched, f"{name}: a left-padded batch differs from single rows"
