"""The README's commands work as typed: each parses with its command's own options, every file it reads ships under
examples/ in the format that command takes, and the Python example loads what exists after `make demo`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from softprompt.cluster.cli import build_parser as cluster_parser
from softprompt.exporter.cli import build_parser as export_parser
from softprompt.prompt_bank.cli import build_parser as bank_parser
from softprompt.runtime.batch_file import check_row, read_rows
from softprompt.runtime.cli import build_parser as run_parser
from softprompt.server.cli import build_parser as serve_parser
from softprompt.training.cli import build_parser as train_parser
from softprompt.training.data import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PARSERS = {
    "export-model": export_parser,
    "run-model": run_parser,
    "prompt-bank": bank_parser,
    "train-prompt": train_parser,
    "serve-model": serve_parser,
    "cluster-model": cluster_parser,
}


def commands() -> list[list[str]]:
    """Every command line in the README's shell blocks (continuation lines joined, comments dropped)."""
    found = []
    for language, block in fenced_blocks():
        if language:
            continue
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in PARSERS:
                found.append(words)
    return found


def fenced_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block, fences read line by line."""
    blocks, language, lines = [], None, []
    for line in README.splitlines():
        if line.startswith("```"):
            if language is None:
                language, lines = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(lines) + "\n"))
                language = None
        elif language is not None:
            lines.append(line)
    return blocks


def test_the_readme_has_a_command_for_every_cli():
    assert {words[0] for words in commands()} == set(PARSERS)


@pytest.mark.parametrize("words", commands(), ids=lambda words: " ".join(words)[:70])
def test_each_readme_command_parses_and_its_input_files_ship(words):
    parser = PARSERS[words[0]]()
    args = parser.parse_intermixed_args(words[1:]) if words[0] == "run-model" else parser.parse_args(words[1:])
    for option in ("data", "eval", "input"):
        path = getattr(args, option, None)
        if path is None or "://" in str(path):
            continue
        assert (ROOT / path).is_file(), f"{' '.join(words)} reads {path}, which does not ship"
        if words[0] == "train-prompt":
            assert read_jsonl(ROOT / path).kind == "classification"
        else:
            mode = "chat" if getattr(args, "chat", False) else "generate"
            rows = list(read_rows(ROOT / path))
            assert rows
            for number, row in rows:
                check_row(row, mode, f"{path}:{number}")
    for option in ("bank", "export_dir", "model"):
        path = getattr(args, option, None)
        if isinstance(path, (str, Path)) and str(path).startswith("banks/smollm2-135m"):
            assert (ROOT / path).is_dir()  # the shipped bank; other banks are made by an earlier command


def test_the_python_example_loads_the_export_it_made_and_a_shipped_bank():
    example = next(text for language, text in fenced_blocks() if language == "python")
    made = re.search(r'export_model\("[^"]+", "([^"]+)"', example).group(1)
    loaded, bank = re.search(r'load\("([^"]+)", bank="([^"]+)"\)', example).groups()
    assert loaded == made and (ROOT / bank).is_dir()
    for task in re.findall(r'task="([^"]+)"', example) + re.findall(r'"(sentiment[^"]*)"', example):
        assert (ROOT / bank / f"{task}.json").is_file(), task
