"""One decode step of decoder graphs, without anything around them: is a gap the graph's or the loop's?

bench/speed/precision.py times whole generations, so its figures carry each side's own loop (this
runtime's Python, onnxruntime-genai's C++). This times only `run` of each graph on the same
onnxruntime: batch 1, one new token on a past of `--past` positions, inputs and outputs bound once
(I/O binding), each graph in a fresh process holding one onnxruntime InferenceSession (a second
one's idle threads would compete for the cores), graphs alternating and their order flipping every
round. It also prints what creating the InferenceSession added to the process's resident memory,
steady and at its peak.

    python -m bench.speed.graph_step /tmp/genai-int8/model.onnx exports/smollm2-int8/model.onnx

Any decoder graph with a KV cache runs: the inputs are made from their names (inputs_embeds or
input_ids, attention_mask, position_ids, logits_to_keep, past_key_values.*), as this runtime's and
onnxruntime-genai's graphs name them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import ROOT, decoder_feeds, machine, peak_rss_mb, rss_mb


def head_size(graph: Path) -> int | None:
    """The head size from the config beside the graph (softprompt.json, or genai_config.json, whose graphs leave it symbolic)."""
    for name, path in (("softprompt.json", ("head_size",)), ("genai_config.json", ("model", "decoder", "head_size"))):
        config = graph.with_name(name)
        if config.is_file():
            value = json.loads(config.read_text())
            for key in path:
                value = value.get(key, {}) if isinstance(value, dict) else {}
            if isinstance(value, int):
                return value
    return None


def side(graph: Path, threads: int, past: int, calls: int) -> dict:
    """In a fresh process: the session's memory, then the median of 5 timings of `calls` bound steps."""
    import onnxruntime as ort

    before = rss_mb()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    resident, peak = rss_mb(), peak_rss_mb()
    binding = session.io_binding()
    for name, value in decoder_feeds(session, past=past, head_size=head_size(graph)).items():
        binding.bind_cpu_input(name, value)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cpu")
    for _ in range(5):  # warm-up
        session.run_with_iobinding(binding)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            session.run_with_iobinding(binding)
        times.append((time.perf_counter() - start) / calls * 1000)
    return {"step_ms": statistics.median(times), "session_mb": resident - before, "session_peak_mb": peak - before}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+", type=Path, help="model.onnx files; ratios are against the first")
    parser.add_argument(
        "--past", type=int, default=54, help="positions already in the KV cache (default: 54, the middle of 22 + 64)"
    )
    parser.add_argument("--rounds", type=int, default=10, help="fresh processes per graph, alternating")
    parser.add_argument("--calls", type=int, default=20, help="steps per timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    missing = [str(g) for g in args.graphs if not g.is_file()]
    if missing:
        parser.error(f"no such graph: {', '.join(missing)}")
    if args.side:
        print(json.dumps(side(args.graphs[0], args.threads, args.past, args.calls)))
        return 0

    print(f"machine: {machine()}")
    print(
        f"date: {dt.datetime.now().isoformat(timespec='minutes')}; batch 1, one new token on a past of {args.past}, "
        f"{args.threads} threads; {args.rounds} rounds of fresh single-session processes, order flipped each round"
    )
    runs: list[list[dict]] = [[] for _ in args.graphs]  # by position: a graph given twice is a noise check
    order = list(range(len(args.graphs)))
    for round_ in range(args.rounds):
        for index in order if round_ % 2 == 0 else order[::-1]:
            command = [sys.executable, "-m", "bench.speed.graph_step", str(args.graphs[index]), "--side"]
            command += ["--past", str(args.past), "--calls", str(args.calls), "--threads", str(args.threads)]
            result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if result.returncode != 0:
                raise SystemExit(f"{args.graphs[index]} failed:\n{result.stderr[-3000:]}")
            runs[index].append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(
        f"\n{'step ms':>8} {'vs first':>8} {'session MB':>10} {'peak MB':>8}  graph (vs first: median of per-round time ratios)"
    )
    for graph, results in zip(args.graphs, runs):
        ratio = statistics.median(b["step_ms"] / r["step_ms"] for b, r in zip(runs[0], results))
        print(
            f"{statistics.median(r['step_ms'] for r in results):8.2f} {ratio:7.2f}x "
            f"{statistics.median(r['session_mb'] for r in results):10.0f} "
            f"{statistics.median(r['session_peak_mb'] for r in results):8.0f}  {graph}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
