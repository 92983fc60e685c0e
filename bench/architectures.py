"""Export tiny random models of every architecture in tests/architectures.py and compare with transformers.

Not a speed benchmark: a sweep of which decoder architectures the exporter and runtime handle,
too slow to run whole in `make test` (which covers Llama, GPT-2 and four of these).

    python bench/architectures.py [NAME ...]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from architectures import build, configs, greedy_matches  # noqa: E402
from conftest import TEXTS  # noqa: E402

from softprompt.exporter import ExportError, export_model  # noqa: E402


def main() -> int:
    names = sys.argv[1:] or list(configs())
    failed = 0
    for name in names:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            try:
                build(name, Path(folder))
                export_model(folder, Path(folder) / "export", log=lambda m: None)
                alone, batched = greedy_matches(folder, Path(folder) / "export", TEXTS)
            except ExportError as exc:
                failed += 1
                print(f"{name:12} export refused: {exc}")
                continue
            ok = alone and batched
            failed += not ok
            print(f"{name:12} {'ok' if ok else 'MISMATCH'}  greedy==transformers: {alone}  batch==alone: {batched}  "
                  f"({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
