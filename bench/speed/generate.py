"""Generation speed: this runtime against PyTorch + PEFT prompt tuning, side by side in one run.

Workload: the default model, a 20-vector soft prompt, 32 input tokens per row, exactly
64 new tokens (end-of-sequence is held off, as `min_new_tokens` does in transformers), greedy,
2 threads, batch 1 and batch 8. Each measurement runs in its own subprocess so peak memory
(max RSS) belongs to one side only; the sides alternate over the repeats so that a noisy
neighbour hurts both alike, and medians are reported with the ratio runtime / PyTorch.

    python -m bench.speed.generate --export exports/smollm2        # after: export-model smollm2-135m exports/smollm2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import ROOT, machine, new_steps, peak_rss_mb, serve, timed_generate, workload


def onnx_side(args):
    """Load the runtime once and warm it up; returns `measure()`, which times `args.inner` generations."""
    from softprompt.runtime import load

    model = load(args.export, bank=args.bank, providers="cpu", threads=args.threads, loop=args.loop)
    rows = workload(model, args.batch, args.input_tokens)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    def once():
        start = time.perf_counter()
        stamps = []
        states = []
        for states in new_steps(model.steps(rows, "bench" if args.prompt_length else None, **settings)):  # noqa: B007
            stamps.append(time.perf_counter())
        return start, stamps, [s.ids for s in states]

    once()  # warm-up: first-run allocations and onnxruntime's lazy initialisation
    return lambda: summarise([once() for _ in range(args.inner)], args)


def run_onnx(args) -> dict:
    return onnx_side(args)()


def run_torch(args) -> dict:
    import numpy as np
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from softprompt.exporter.sources import resolve
    from softprompt.prompt_bank import load_prompt
    from softprompt.runtime import load

    torch.set_num_threads(args.threads)
    tokenizer_model = load(args.export)  # only for the same token ids
    rows = workload(tokenizer_model, args.batch, args.input_tokens)
    folder = resolve(args.model, log=lambda m: None)[0]
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = load_prompt(args.bank, "bench").vectors
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.shape[0])
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(np.asarray(prompt, np.float32)))

    ids = torch.tensor(rows)
    timed_generate(model, ids, args.new_tokens)  # warm-up
    results = [timed_generate(model, ids, args.new_tokens) for _ in range(args.inner)]
    return summarise(results, args)


def summarise(results, args) -> dict:
    first = [stamps[0] - start for start, stamps, _ in results]
    decode = [(len(stamps) - 1) * args.batch / (stamps[-1] - stamps[0]) for _, stamps, _ in results]
    return {
        "first_token_ms": 1000 * statistics.median(first),
        "decode_tokens_per_s": statistics.median(decode),
        "peak_rss_mb": peak_rss_mb(),
        "tokens": results[-1][2],
    }


def make_prompt(args) -> None:
    """A 20-row prompt sampled from the vocabulary's embeddings (realistic scale), shared by both sides."""
    import numpy as np

    from softprompt.formats.export_folder import open_export
    from softprompt.prompt_bank import save_prompt

    backbone = open_export(args.export)
    rows = np.random.default_rng(0).integers(0, backbone.config.vocab_size, args.prompt_length)
    save_prompt(
        args.bank,
        "bench",
        np.asarray(backbone.table[rows], np.float32),
        fingerprint=backbone.config.fingerprint,
        init="vocab",
        source="bench/speed/generate.py",
    )


def side_command(side: str, args, batch: int) -> tuple[list[str], dict]:
    """The command line and environment of one side's process."""
    command = [sys.executable, "-m", "bench.speed.generate", "--side", side, "--batch", str(batch), "--bank", str(args.bank)]
    for key in ("export", "model", "threads", "input_tokens", "new_tokens", "inner", "prompt_length"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return command, {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}  # threads: set in each side


def child(side: str, args, batch: int) -> dict:
    command, env = side_command(side, args, batch)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{side} side failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("exports/smollm2"), help="export folder of the model")
    parser.add_argument("--model", default="smollm2-135m", help="the same model for PyTorch (what export-model took)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="subprocess runs per side and batch (alternating)")
    parser.add_argument("--inner", type=int, default=2, help="timed generations per subprocess, after one warm-up")
    parser.add_argument("--json-out", type=Path, help="also write the results here")
    parser.add_argument("--loop", choices=["runtime", "genai"], default="runtime", help="the runtime's load(loop=...)")
    parser.add_argument("--side", choices=["onnx", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bank", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side == "onnx" and args.serve:
        serve(onnx_side(args))
        return 0
    if args.side:
        print(json.dumps((run_onnx if args.side == "onnx" else run_torch)(args)))
        return 0
    if not (args.export / "softprompt.json").is_file():
        raise SystemExit(f"{args.export}: no export; run: export-model {args.model} {args.export}")
    with tempfile.TemporaryDirectory() as bank:
        args.bank = Path(bank)
        make_prompt(args)
        print(f"machine: {machine()}")
        print(
            f"date: {dt.datetime.now().isoformat(timespec='minutes')}; workload: prompt {args.prompt_length} vectors, "
            f"{args.input_tokens} input tokens, {args.new_tokens} new tokens, greedy, {args.threads} threads; "
            f"medians of {args.repeats} alternating runs x {args.inner}"
        )
        report = {}
        for batch in (int(b) for b in args.batches.split(",")):
            runs = {"onnx": [], "torch": []}
            for _ in range(args.repeats):
                for side in ("torch", "onnx"):
                    runs[side].append(child(side, args, batch))
            medians = {
                side: {
                    key: statistics.median(r[key] for r in rs) for key in ("first_token_ms", "decode_tokens_per_s", "peak_rss_mb")
                }
                for side, rs in runs.items()
            }
            same = all(r["tokens"] == runs["torch"][0]["tokens"] for r in runs["onnx"] + runs["torch"])
            o, t = medians["onnx"], medians["torch"]
            print(f"\nbatch {batch}:            {'runtime':>10} {'torch+peft':>11} {'ratio':>7}")
            print(
                f"  decode tokens/s    {o['decode_tokens_per_s']:10.1f} {t['decode_tokens_per_s']:11.1f} {o['decode_tokens_per_s'] / t['decode_tokens_per_s']:6.2f}x"
            )
            print(
                f"  first token (ms)   {o['first_token_ms']:10.1f} {t['first_token_ms']:11.1f} {o['first_token_ms'] / t['first_token_ms']:6.2f}x"
            )
            print(
                f"  peak RSS (MiB)     {o['peak_rss_mb']:10.0f} {t['peak_rss_mb']:11.0f} {o['peak_rss_mb'] / t['peak_rss_mb']:6.2f}x"
            )
            print(f"  greedy tokens identical: {'yes' if same else 'NO'}")
            report[f"batch_{batch}"] = {"runtime": o, "torch_peft": t, "identical_tokens": same}
        if args.json_out:
            args.json_out.write_text(json.dumps({"machine": machine(), "results": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
