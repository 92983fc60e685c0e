"""Opening an export folder's numpy side: config, embedding table (memory-mapped) and tokenizer.

Separate from the session so that tools that only need the embedding space (building a prompt
from text, checking a bank) do not load the graph.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .config import FILES, ExportConfig, read_config
from .errors import ExportFormatError


@dataclasses.dataclass(frozen=True)
class Backbone:
    folder: Path
    config: ExportConfig
    table: np.ndarray  # [vocab, hidden] float32, memory-mapped and read-only
    tokenizer: Tokenizer

    def file(self, key: str) -> Path:
        return self.folder / self.config.files[key]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def open_backbone(export_dir: str | os.PathLike) -> Backbone:
    """Read `softprompt.json`, map `embeddings.npy` and load the tokenizer, checking each against the config."""
    folder = Path(export_dir)
    config = read_config(folder)
    for key in FILES[config.kind]:
        name = config.files.get(key)
        if not name or not (folder / name).is_file():
            raise ExportFormatError(f"{folder}: the {key} file {name!r} named in softprompt.json is missing")
    path = folder / config.files["embeddings"]
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ExportFormatError(f"{path}: not a readable .npy table ({exc})") from None
    if table.shape != (config.vocab_size, config.hidden_size) or table.dtype != np.float32:
        raise ExportFormatError(
            f"{path}: {table.dtype} {table.shape}; softprompt.json expects float32 "
            f"({config.vocab_size}, {config.hidden_size})"
        )
    # A plain ndarray over the same mapping: numpy.memmap's Python-level indexing costs ~30 us a decode step.
    table = table.view(np.ndarray)
    tokenizer = Tokenizer.from_file(str(folder / config.files["tokenizer"]))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return Backbone(folder, config, table, tokenizer)
