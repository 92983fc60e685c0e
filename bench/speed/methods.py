"""Serving cost of the three kinds of task on one export: prompt tuning, prefix tuning, P-tuning, mixed or alone.

A batch of 6 requests (the same 6 texts, each under its task's template) runs as one batch mixing
the three kinds (2 rows each) and as a batch of one kind (6 rows of it); the batches alternate over
the rounds. Prints first-token latency and decode tokens/s (medians), and the mixed batch's rate
over each single kind's.

    python -m bench.speed.methods --export exports/smollm2 --bank banks/smollm2-135m
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench.harness import machine
from bench.speed.serve import RunTimer, decode_rate, rounds_of

TEXTS = [
    "the film is a gorgeous, moving piece of work",
    "dull, slow and far too long",
    "Thanks, the new update works great!",
    "The flight was delayed three hours and nobody told us why.",
    "an honest, funny script with nothing to prove",
    "I want my two hours back.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("exports/smollm2"))
    parser.add_argument("--bank", type=Path, default=Path("banks/smollm2-135m"))
    parser.add_argument(
        "--tasks",
        default="sentiment,sentiment-prefix,sentiment-ptuning",
        help="a prompt-tuning, a prefix-tuning and a P-tuning task of the bank, in that order",
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from softprompt.runtime import load

    model = load(args.export, bank=args.bank, providers="cpu", threads=args.threads)
    model.timer = RunTimer(model)
    kinds = args.tasks.split(",")
    if len(kinds) != 3:
        raise SystemExit(f"--tasks {args.tasks!r}; expected three task names")
    names = ("prompt", "prefix", "p-tuning")
    batches = {"mixed": [kinds[i % 3] for i in range(len(TEXTS))], **{n: [k] * len(TEXTS) for n, k in zip(names, kinds)}}
    rows = {name: [model.encode(text, task=t) for text, t in zip(TEXTS, tasks)] for name, tasks in batches.items()}
    measures = [(lambda name=name: decode_rate(model, rows[name], batches[name], args.new_tokens, 1)) for name in batches]
    for measure in measures:
        measure()  # warm-up: each task's cached prompt is computed on its first request
    results = rounds_of(args.rounds, *measures)
    print(f"{machine()}; {args.export}, batch {len(TEXTS)}, {args.new_tokens} new tokens, {args.threads} threads")
    medians = {}
    for i, name in enumerate(batches):
        medians[name] = {key: statistics.median(r[i][key] for r in results) for key in ("tokens_per_s", "first_token_ms")}
        lengths = sorted({len(r) for r in rows[name]})
        print(
            f"{name:9} first token {medians[name]['first_token_ms']:6.1f} ms, decode {medians[name]['tokens_per_s']:6.1f} "
            f"tokens/s (input tokens {lengths[0]}-{lengths[-1]})"
        )
    for name in names:
        ratio = statistics.median(r[0]["tokens_per_s"] / r[names.index(name) + 1]["tokens_per_s"] for r in results)
        print(f"mixed batch / {name} alone: {ratio:.2f}x decode tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
