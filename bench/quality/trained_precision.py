"""A prompt trained for its precision (`train-prompt --precision`) against the fp32-trained one, on the device's exports.

For each precision, the `define` task's evaluation loss (mean cross-entropy per target token, the
training's own metric, held-out definitions) with the shipped prompt (trained on fp32) and with a
prompt trained with the same settings through that precision's weights, both run by the runtime on
the default model's export at that precision (int8 activations included). The gap closed is how much
of the loss that quantization added (fp32-trained prompt: int4 export against fp32 export) the
precision-trained prompt takes back.

    python -m banks.prepare build/bank-data      # needs Debian's fortunes
    train-prompt smollm2-135m --task define --bank build/qat/int4 --precision int4 ...   # as `make banks`
    train-prompt smollm2-135m --task define --bank build/qat/int4-rtn --precision exports/smollm2-int4-rtn ...
    python -m bench.quality.trained_precision --trained int4=build/qat/int4 --trained int4-rtn=build/qat/int4-rtn
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

from bench.harness import machine


def eval_loss(model, task: str, examples: list[dict]) -> float:
    """Mean cross-entropy per target token (the output's tokens and end of sequence), one example at a time."""
    eos = model.config.eos_token_ids[:1]
    total, count = 0.0, 0
    for example in examples:
        ids = model.encode(example["input"], task)
        target = model.backbone.encode(example["output"], add_special_tokens=False) + eos
        logits = model.logits_of_ids([ids + target], task=task)[0, len(ids) - 1 : len(ids) + len(target) - 1]
        shifted = logits - logits.max(-1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        total -= float(logprobs[np.arange(len(target)), target].sum())
        count += len(target)
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exports", type=Path, default=Path("exports"), help="where smollm2, smollm2-int8, smollm2-int4 are")
    parser.add_argument("--bank", type=Path, default=Path("banks/smollm2-135m"), help="the fp32-trained prompts")
    parser.add_argument(
        "--trained",
        action="append",
        default=[],
        metavar="VARIANT=BANK",
        help="a bank trained for the export smollm2-VARIANT (e.g. int4, or int4-rtn for exports/smollm2-int4-rtn)",
    )
    parser.add_argument("--task", default="define")
    parser.add_argument("--data", type=Path, default=Path("build/bank-data/define-eval.jsonl"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    from softprompt.runtime import load

    trained = dict(item.split("=", 1) for item in args.trained)
    examples = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    print(f"machine: {machine()}")
    print(f"date: {dt.datetime.now().isoformat(timespec='minutes')}; task {args.task}; {len(examples)} held-out examples")
    rows: dict[str, dict] = {}
    for precision in dict.fromkeys(["fp32", "int8", "int4", *trained]):
        export = args.exports / f"smollm2{'' if precision == 'fp32' else '-' + precision}"
        row = {
            "fp32_trained": eval_loss(load(export, bank=args.bank, providers="cpu", threads=args.threads), args.task, examples)
        }
        if precision in trained:
            model = load(export, bank=Path(trained[precision]), providers="cpu", threads=args.threads)
            row["trained_for_it"] = eval_loss(model, args.task, examples)
        rows[precision] = row
    base = rows["fp32"]["fp32_trained"]
    print(f"\n{'export':9} {'fp32-trained':>13} {'trained for it':>15} {'gap closed':>11}")
    for precision, row in rows.items():
        own = row.get("trained_for_it")
        gap = row["fp32_trained"] - base
        closed = f"{100 * (row['fp32_trained'] - own) / gap:.0f}%" if own is not None and gap > 0 else "-"
        print(f"{precision:9} {row['fp32_trained']:13.4f} {own if own is not None else float('nan'):15.4f} {closed:>11}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
