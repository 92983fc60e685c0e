"""A JSON file that must hold one object (a task record, softprompt.json), read with one error for each way it is not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def parse_object(raw: bytes, path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """`raw` (the file at `path`) as a JSON object; otherwise `error` saying what is wrong with it, as `what` (e.g. "a task
    record"), never json's traceback."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be {what}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
