"""The device environment is what a device installs (`[cpu]` and pytest): nothing heavy may be importable
there, or the torch-free run would prove nothing. In the full environment these checks do not apply."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from softprompt.prompt_bank.cli import main as bank_main

FIXTURE = Path(__file__).resolve().parents[1] / "fixture"


@pytest.mark.skipif(os.environ.get("SOFTPROMPT_DEVICE_ENV") != "1", reason="only in the device environment (make test-device)")
def test_no_heavy_package_is_installed():
    heavy = [
        name
        for name in ("torch", "transformers", "onnx", "onnxscript", "peft", "optimum")
        if importlib.util.find_spec(name) is not None
    ]
    assert heavy == []


def test_the_committed_fixture_is_current(capsys):
    """The bank verifies against the export with this version's format checks (else: tests/make_fixture.py)."""
    assert bank_main(["verify", str(FIXTURE / "bank"), "--model", str(FIXTURE / "export")]) == 0
    assert "3 of 3 tasks valid" in capsys.readouterr().out
