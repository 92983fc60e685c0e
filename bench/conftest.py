"""The benchmarks' tests run on the committed tiny export that the torch-free tests use (tests/fixture):
data, read by path; bench/ imports nothing from tests/."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.harness import ROOT


@pytest.fixture(scope="session")
def llama_export() -> Path:
    return ROOT / "tests" / "fixture" / "export"
