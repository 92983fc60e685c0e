"""The server and batch runs on Ray, past one machine: `application` (Ray Serve replicas of serve-model's app),
`build` (its builder for `serve run` and `serve deploy`), and `map_dataset` (Ray Data workers, one loaded model
each)."""

from __future__ import annotations

import importlib
from typing import Any

# Importing Ray takes seconds: the entry points load it when first used, so `cluster-model --help` answers at once.
_WHERE = {
    "application": ".serving",
    "build": ".cli",  # options spelled as cluster-model serve's
    "map_dataset": ".datasets",
    "read_inputs": ".datasets",
    "write_outputs": ".datasets",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
