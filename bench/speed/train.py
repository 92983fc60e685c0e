"""Training speed and memory: train-prompt against PEFT prompt tuning, and model tuning's memory, in one run.

Same data (Pang & Lee sentences in the sentiment template), batch size, prompt length and
optimizer (AdamW) on each side. Each side runs in its own subprocess so its peak memory (max
RSS) is its own; steps per second is the median over timed steps after warm-up steps.

    python -m bench.speed.train [--steps 8 --batch-size 16 --length 20 --threads 2] [--methods]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from bench.harness import ROOT

TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZERS = {"positive": " positive", "negative": " negative"}


def examples(count: int):
    from bench.quality import datasets

    rows = datasets.split(datasets.pang_lee(), (count,), seed=0)[0]
    return [(TEMPLATE.replace("{text}", text), VERBALIZERS[label]) for text, label in rows]


def timed(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def side_ours(args, method: str = "prompt") -> float:
    """train-prompt's own loop: left-padded rows, loss on the verbalizer tokens, logits for the tail only;
    `method` as train-prompt --method (prefix and P-tuning train through their encoders)."""
    import torch

    from softprompt.training.train import TrainConfig, batch_loss, enable_checkpointing, load_backbone, trained_source

    backbone = load_backbone(args.model, log=lambda m: None)
    enable_checkpointing(backbone.model, args.checkpoint_every)
    data = examples(args.batch_size * (args.steps + args.warmup))
    pairs = [(backbone.encode(text), backbone.encode(words, add_special_tokens=False)) for text, words in data]
    start = torch.from_numpy(backbone.table[: args.length].copy())
    source = trained_source(backbone.model, start, TrainConfig(length=args.length, method=method))
    optimizer = torch.optim.AdamW([p for p in source.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.0)
    batches = iter(range(0, len(pairs), args.batch_size))

    def step():
        start = next(batches)
        loss = batch_loss(backbone.model, source(), pairs[start : start + args.batch_size])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return timed(step, args.warmup, args.steps)


def side_hf(args, peft_prompt: bool) -> float:
    """The usual transformers recipe: right padding, labels -100 outside the target; PEFT or all weights."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.exporter.sources import resolve

    folder = resolve(args.model, log=lambda m: None)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if peft_prompt:
        model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.length))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2 if peft_prompt else 2e-5, weight_decay=0.0)
    data = examples(args.batch_size * (args.steps + args.warmup))
    batches = iter(range(0, len(data), args.batch_size))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def step():
        start = next(batches)
        rows, labels = [], []
        for text, words in data[start : start + args.batch_size]:
            ids = tokenizer(text).input_ids
            target = tokenizer(words, add_special_tokens=False).input_ids
            rows.append(ids + target)
            labels.append([-100] * len(ids) + target)
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        label_ids = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=label_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return timed(step, args.warmup, args.steps)


SIDES = {
    "train-prompt": side_ours,
    "peft": lambda a: side_hf(a, True),
    "model-tuning": lambda a: side_hf(a, False),
    "train-prefix": lambda a: side_ours(a, "prefix"),
    "train-p-tuning": lambda a: side_ours(a, "p-tuning"),
}
COMPARED = ("train-prompt", "peft", "model-tuning")  # the targets' sides; the other methods with --methods


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=2, help="train-prompt's --checkpoint-every")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument(
        "--methods", action="store_true", help="also train-prompt --method prefix and p-tuning (their steps/s and memory)"
    )
    args = parser.parse_args()
    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        rate = SIDES[args.side](args)
        print(json.dumps({"steps_per_s": rate, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return 0
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
        f"batch {args.batch_size}, prompt {args.length}, {args.steps} timed steps after {args.warmup}, {args.threads} threads"
    )
    results = {}
    for side in [*COMPARED, *(("train-prefix", "train-p-tuning") if args.methods else ())]:
        command = [sys.executable, "-m", "bench.speed.train", "--side", side] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("side", "methods")
        ]
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode:
            raise SystemExit(f"{side} failed:\n{out.stderr[-2000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"  {side:13} {results[side]['steps_per_s']:.3f} steps/s   peak RSS {results[side]['peak_rss_mb']:.0f} MiB",
            flush=True,
        )
    ours, peft, full = results["train-prompt"], results["peft"], results["model-tuning"]
    print(f"speed train-prompt / PEFT: {ours['steps_per_s'] / peft['steps_per_s']:.2f}x (target >= 1.0)")
    print(f"peak memory train-prompt / model tuning: {ours['peak_rss_mb'] / full['peak_rss_mb']:.2f} (target <= 0.5)")
    for side in ("train-prefix", "train-p-tuning"):
        if side in results:
            print(
                f"{side} / train-prompt: {results[side]['steps_per_s'] / ours['steps_per_s']:.2f}x steps/s, "
                f"{results[side]['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x peak memory"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
