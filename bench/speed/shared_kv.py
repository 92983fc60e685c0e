"""A KV cache in one preallocated buffer against a past that grows by a copy every step.

With `--exports SHARED GROWING`: this runtime on two exports of one model, `export-model --kv-cache shared`
(GroupQueryAttention; the runtime binds one buffer per layer as past and present) and `--kv-cache growing`
(ONNX's Attention), in alternating fresh processes (bench/speed/generate.py's side: batch 1, 22 input ids, 64
new tokens, no prompt); prints medians of decode tokens/s, peak RSS, the ratio, and how many greedy tokens both
wrote before they first differ:

    python -m bench.speed.shared_kv --exports exports/smollm2-int4 exports/smollm2-int4-growing

With a graph: the experiment that led to the runtime's shared cache, on onnxruntime-genai's graph.

onnxruntime's GroupQueryAttention writes the new keys and values into its past in place when the
present output is bound to the same memory as the past input (it compares the pointers), so a decode
step copies nothing and allocates no cache; with a past that grows, every step concatenates the whole
cache into a new present. This drives a decoder graph that uses GroupQueryAttention (onnxruntime-genai's
builder writes one: input_ids, attention_mask, past_key_values.*) both ways from Python, in one process,
alternating rounds: batch 1, the prompt run once with an empty past (its present copied into the
buffers), then `--new-tokens` greedy steps; prints medians, the ratio, the machine, and whether both
ways wrote the same tokens.

    python -m bench.speed.shared_kv /tmp/genai-int4/model.onnx
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime import OrtValue

from bench.harness import machine
from bench.speed.precision import agreement, child, runtime_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "graph", type=Path, nargs="?", help="a decoder graph with GroupQueryAttention (input_ids, past_key_values.*)"
    )
    parser.add_argument("--exports", type=Path, nargs=2, metavar=("SHARED", "GROWING"), help="this runtime's two exports")
    parser.add_argument("--input-tokens", type=int, default=22)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="generations each way, alternating")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.exports:
        return runtime_sides(args)
    if args.graph is None:
        parser.error("give a graph, or --exports SHARED GROWING")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    session = ort.InferenceSession(str(args.graph), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [name for name in inputs if name.startswith("past_key_values")]
    present_names = [o.name for o in session.get_outputs() if o.name.startswith("present")]
    if "input_ids" not in inputs or not past_names or len(past_names) != len(present_names):
        raise SystemExit(f"{args.graph}: expected input_ids, past_key_values.* and present.* (a genai-style decoder graph)")
    heads, size = kv_shape(args.graph, inputs[past_names[0]].shape)
    ids = list(range(100, 100 + args.input_tokens))
    longest = args.input_tokens + args.new_tokens

    def prompt() -> tuple[int, list]:
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        feeds.update((name, np.zeros((1, heads, 0, size), np.float32)) for name in past_names)
        logits, *present = session.run(["logits", *present_names], feeds)
        return int(logits[0, -1].argmax()), present

    def growing() -> list[int]:
        token, present = prompt()
        past, tokens, length = [OrtValue.ortvalue_from_numpy(p) for p in present], [token], len(ids) + 1
        for _ in range(args.new_tokens - 1):
            feeds = {
                "input_ids": OrtValue.ortvalue_from_numpy(np.array([[token]], np.int64)),
                "attention_mask": OrtValue.ortvalue_from_numpy(np.ones((1, length), np.int64)),
                **dict(zip(past_names, past)),
            }
            logits, *past = session.run_with_ort_values(["logits", *present_names], feeds)
            token = int(logits.numpy()[0, -1].argmax())
            tokens.append(token)
            length += 1
        return tokens

    buffers = [np.zeros((1, heads, longest, size), np.float32) for _ in past_names]
    values = [OrtValue.ortvalue_from_numpy(b) for b in buffers]  # on the CPU, the arrays' own memory

    def shared() -> list[int]:
        token, present = prompt()
        for buffer, part in zip(buffers, present):
            buffer[:, :, : len(ids)] = part
        binding = session.io_binding()
        for name, value in zip(past_names, values):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(present_names, values):  # the same memory: GroupQueryAttention writes in place
            binding.bind_ortvalue_output(name, value)
        tokens, length = [token], len(ids) + 1
        for _ in range(args.new_tokens - 1):
            binding.bind_cpu_input("input_ids", np.array([[token]], np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((1, length), np.int64))
            binding.bind_output("logits", "cpu")
            session.run_with_iobinding(binding)
            token = int(binding.get_outputs()[-1].numpy()[0, -1].argmax())  # logits: bound last
            tokens.append(token)
            length += 1
        return tokens

    same = growing() == shared()
    times: dict[str, list[float]] = {"growing": [], "shared": []}
    sides = {"growing": growing, "shared": shared}
    for round_ in range(args.rounds):
        for name in ("growing", "shared") if round_ % 2 == 0 else ("shared", "growing"):
            started = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - started)
    print(f"machine: {machine()}")
    print(
        f"date: {dt.datetime.now().isoformat(timespec='minutes')}; {args.graph}; batch 1, {args.input_tokens} input tokens, "
        f"{args.new_tokens} new, greedy, {args.threads} threads; medians of {args.rounds} generations each way, alternating"
    )
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    for name, ms in medians.items():
        print(f"  {name:8} {ms:7.1f} ms a generation ({args.new_tokens / ms * 1000:.1f} tokens/s)")
    print(f"shared buffer / growing past: {medians['growing'] / medians['shared']:.2f}x; the same tokens: {same}")
    return 0


def runtime_sides(args) -> int:
    """This runtime on a shared-cache and a growing-cache export of one model, alternating fresh processes."""
    names = {"shared": args.exports[0], "growing": args.exports[1]}
    for name, export in names.items():
        found = json.loads((export / "softprompt.json").read_text()).get("kv_cache")
        if found != name:
            raise SystemExit(f"{export}: kv_cache is {found!r}; expected {name!r} (export-model --kv-cache {name})")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as bank:
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else reversed(list(names)):
                runs[name].append(child(name, runtime_command(names[name], Path(bank), args)))
    print(f"machine: {machine()}")
    print(
        f"date: {dt.datetime.now().isoformat(timespec='minutes')}; this runtime, batch 1, {args.input_tokens} input tokens, "
        f"{args.new_tokens} new, greedy, {args.threads} threads; medians of {args.rounds} fresh processes each, alternating"
    )
    medians = {}
    for name, results in runs.items():
        medians[name] = statistics.median(r["decode_tokens_per_s"] for r in results)
        rss = statistics.median(r["peak_rss_mb"] for r in results)
        print(f"  {name:8} {medians[name]:7.1f} tokens/s, peak RSS {rss:.0f} MB  ({names[name]})")
    ours, theirs = (runs[name][-1]["tokens"][0] for name in names)
    same = agreement(ours, theirs)
    print(
        f"shared / growing: {medians['shared'] / medians['growing']:.2f}x; the same greedy tokens: {same} of {len(ours)} "
        "(two graphs: each attention kernel rounds its own way)"
    )
    return 0


def kv_shape(graph: Path, shape: list) -> tuple[int, int]:
    """(key/value heads, head size): from the graph's past input, or where it names them (genai's graphs say
    'kv_cache_dim'), from the genai_config.json beside it."""
    heads, size = shape[1], shape[3]
    if isinstance(heads, int) and isinstance(size, int):
        return heads, size
    config = graph.with_name("genai_config.json")
    if not config.is_file():
        raise SystemExit(f"{graph}: the past's shape {shape} names its sizes and no genai_config.json is beside it")
    decoder = json.loads(config.read_text())["model"]["decoder"]
    return int(decoder["num_key_value_heads"]), int(decoder["head_size"])


if __name__ == "__main__":
    raise SystemExit(main())
