"""The backbone fingerprint: ties every prompt to the exact embedding space it was made in.

A soft prompt is only meaningful next to the embedding table it was learned against, so the
fingerprint hashes that table (float32, as the runtime feeds it) together with the few config
values that decide how the vectors are used. The exporter and the trainer both call this on
the same table, so a prompt trained from a Hugging Face model is accepted by its ONNX export.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

FINGERPRINT_FIELDS = ("architecture", "hidden_size", "vocab_size", "num_layers")


def backbone_fingerprint(table: np.ndarray, config: Mapping[str, Any]) -> str:
    """Return ``"sha256:<hex>"`` over the structural config fields and the embedding table.

    >>> backbone_fingerprint(np.zeros((4, 2), np.float32),
    ...     {"architecture": "X", "hidden_size": 2, "vocab_size": 4, "num_layers": 1})[:7]
    'sha256:'
    """
    missing = [key for key in FINGERPRINT_FIELDS if key not in config]
    if missing:
        raise ValueError(f"fingerprint needs config fields {missing}; got {sorted(config)}")
    import hashlib  # here, not at import: see vectors_file.sha256_hex

    digest = hashlib.sha256()
    header = {key: config[key] for key in FINGERPRINT_FIELDS}
    digest.update(json.dumps(header, sort_keys=True).encode())
    rows = np.ascontiguousarray(table, dtype=np.float32)
    digest.update(str(rows.shape).encode())
    # Hash in slices so a memory-mapped table of a large vocabulary is never copied whole.
    step = max(1, (64 << 20) // max(1, rows.strides[0]))
    for start in range(0, rows.shape[0], step):
        digest.update(np.ascontiguousarray(rows[start : start + step]).data.cast("B"))
    return "sha256:" + digest.hexdigest()


def short(fingerprint: str | None) -> str:
    """A fingerprint shortened for messages (the full value is in the files)."""
    if not fingerprint:
        return "none"
    return fingerprint[:19] + "…" if len(fingerprint) > 20 else fingerprint
