"""Serving speed on the default model: decode against the memory-bandwidth limit, the cached prompt,
mixed-task batches, task switching and hot swap, side by side in one run.

Workload: 32 input tokens per row, 64 new tokens (end-of-sequence held off), greedy, fp32,
`--threads` onnxruntime threads. Everything runs in this process on the CPU provider, one
measurement after another, and prints medians and ratios; PyTorch + PEFT runs in a subprocess
through bench/speed/generate.py's side so that its threads and memory are its own. Against
onnxruntime-genai (its own environment) the runtime runs in a process of its own too, and both stay
alive through `--genai-rounds` alternating rounds, so the comparison is symmetric and long enough
to see through a drifting load. The two are started afresh `--genai-processes` times: a process
keeps its speed for life, and identical ones differ by several per cent on a shared virtual machine.

    python -m bench.speed.serve --export exports/smollm2

The limit: a batch-1 decode step reads every weight once, so tokens/s cannot exceed
(memory bandwidth) / (weight bytes). The bandwidth is measured here, in this run: numpy copying a
buffer far larger than the caches on the same number of threads, in bytes copied per second
(counting the copy's reads and writes both would double the yardstick).
A second yardstick, also measured here: onnxruntime running only the export's weight MatMuls
(every matrix once, from a one-row input), the floor of any graph of these weights.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import ROOT, machine, new_steps, workload
from bench.speed.generate import child, side_command


class RunTimer:
    """Time spent inside the model's graph calls, to find the Python time around them.

    The runtime calls onnxruntime through `session.run_with_ort_values` on the CPU and
    `session.run_with_iobinding` with CUDA; both are timed.
    """

    def __init__(self, model):
        self.inside = 0.0
        model.session.run_with_ort_values = self._timed(model.session.run_with_ort_values)
        model.session.run_with_iobinding = self._timed(model.session.run_with_iobinding)

    def _timed(self, call):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.inside += time.perf_counter() - start

        return timed


def copy_bandwidth(threads: int, megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes copied per second by a large copy on `threads` threads (numpy releases the GIL while copying)."""
    from concurrent.futures import ThreadPoolExecutor

    source = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    target = np.empty_like(source)
    parts = np.array_split(np.arange(source.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    with ThreadPoolExecutor(threads) as pool:

        def copy() -> float:
            start = time.perf_counter()
            list(pool.map(lambda b: np.copyto(target[b[0] : b[1]], source[b[0] : b[1]]), bounds))
            return time.perf_counter() - start

        copy()
        seconds = statistics.median(copy() for _ in range(repeats))
    return source.nbytes / seconds


def matmul_floor(export: Path, threads: int, repeats: int = 30):
    """A function timing how long onnxruntime needs to multiply a one-row input by every weight matrix of the export."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    source = onnx.load(str(export / "model.onnx"))
    matrices = [
        t
        for t in source.graph.initializer
        if len(t.dims) == 2
        and min(t.dims) > 1
        and t.data_type == TensorProto.FLOAT
        and not t.name.startswith(("cos_cache", "sin_cache"))
    ]
    widths = sorted({int(t.dims[0]) for t in matrices})
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in widths]
    nodes = [helper.make_node("MatMul", [f"x{t.dims[0]}", t.name], [f"y{i}"]) for i, t in enumerate(matrices)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(matrices))]
    graph = helper.make_graph(nodes, "matmuls", inputs, outputs, initializer=matrices)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {f"x{k}": np.ones((1, k), np.float32) for k in widths}

    def seconds() -> float:
        for _ in range(3):
            session.run(None, feeds)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return seconds


def weight_bytes(export: Path) -> int:
    """Bytes of the graph's weights (the initializers), read once per batch-1 decode step."""
    import onnx

    graph = onnx.load(str(export / "model.onnx"), load_external_data=False).graph
    total = 0
    for tensor in graph.initializer:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def decode_rate(model, rows, tasks, new_tokens: int, repeats: int) -> dict:
    """Median decode tokens/s (after the first token), first-token ms and Python share of a step."""
    timed = model.timer
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    rates, firsts, shares = [], [], []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        stamps, inside = [], []
        for _ in new_steps(model.steps(rows, tasks, **settings)):
            stamps.append(time.perf_counter())
            inside.append(timed.inside)
        if repeat == 0:
            continue  # warm-up
        firsts.append(stamps[0] - start)
        rates.append((len(stamps) - 1) * len(rows) / (stamps[-1] - stamps[0]))
        shares.append(1 - (inside[-1] - inside[0]) / (stamps[-1] - stamps[0]))
    return {
        "tokens_per_s": statistics.median(rates),
        "first_token_ms": 1000 * statistics.median(firsts),
        "python_share": statistics.median(shares),
    }


class Worker:
    """A measuring process kept alive between rounds (bench.harness.serve's protocol): 'run' in,
    one JSON line out. Each measurement waits a moment first, so that the other side's onnxruntime
    threads, which spin for a while after their last call, have gone to sleep."""

    def __init__(self, command: list[str], env: dict | None = None, settle: float = 0.3):
        self.settle = settle
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True, env=env, cwd=ROOT
        )
        self._expect("ready")

    def _expect(self, what: str) -> str:
        line = self.process.stdout.readline()
        if not line or (what and line.strip() != what):
            self.errors.seek(0)
            raise SystemExit(f"{self.process.args[:3]} failed:\n{self.errors.read()[-3000:]}")
        return line

    def run(self) -> dict:
        time.sleep(self.settle)
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return json.loads(self._expect(""))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.errors.close()


def rounds_of(rounds: int, *measures) -> list[tuple[float, ...]]:
    """Each round runs every measurement once, starting one later each round (no side always goes first)."""
    results = []
    for r in range(rounds):
        order = [(r + i) % len(measures) for i in range(len(measures))]
        values = {i: measures[i]() for i in order}
        results.append(tuple(values[i] for i in range(len(measures))))
    return results


def paired(rounds: int, first, second) -> tuple[float, float, float, list[tuple[float, float]]]:
    """Alternate two measurements; their medians and the median of the per-round ratios first / second."""
    pairs = rounds_of(rounds, first, second)
    return (
        statistics.median(a for a, _ in pairs),
        statistics.median(b for _, b in pairs),
        statistics.median(a / b for a, b in pairs),
        pairs,
    )


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def first_token_ms(model, rows, task) -> float:
    """One request's first token (the whole first step: embedding, cached past, session.run, choice)."""
    start = time.perf_counter()
    for _ in model.steps(rows, task, max_new_tokens=1):
        pass
    return 1000 * (time.perf_counter() - start)


def against_genai(args, genai: list[str]) -> list[list[dict[str, dict]]]:
    """Rounds of the runtime and onnxruntime-genai, each a process of its own (genai lives in its own
    environment) kept alive through `--genai-rounds` rounds, no prompt on either side; then both are started
    afresh, `--genai-processes` times.

    Why fresh processes: on a shared virtual machine identical processes can run at different speeds for
    their whole life (three workers of the same runtime measured 0.94x, 0.99x and 0.99x genai over the same
    30 rounds), most likely from where their weights land in memory. One set of processes is one draw of
    that; the median over several sets is the comparison, and each set's own median shows the spread.
    `genai` is the command line of genai's side (bench.speed.genai_side --serve). Returns per set, per
    round, each side's result: {"ours": ..., "genai": ...}.
    """
    command, env = side_command("onnx", args, 1)
    sets = []
    for _ in range(args.genai_processes):
        workers = {"ours": Worker([*command, "--serve"], env=env), "genai": Worker(genai)}
        kept: dict[str, list[dict]] = {name: [] for name in workers}

        def measure(name: str, worker: Worker, results: list[dict]):
            return lambda: results.append(worker.run()) or results[-1]["decode_tokens_per_s"]

        try:
            rounds_of(args.genai_rounds, *(measure(name, workers[name], kept[name]) for name in workers))
        finally:
            for worker in workers.values():
                worker.close()
        sets.append([dict(zip(kept, results)) for results in zip(*kept.values())])
    return sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("exports/smollm2"))
    parser.add_argument("--model", default="smollm2-135m", help="the same model for PyTorch (what export-model took)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true", help="leave out PyTorch + PEFT")
    parser.add_argument(
        "--other-export",
        type=Path,
        help="another export of the same model (e.g. --graph traced, or --fuse), measured at batch 1 "
        "beside --export, alternating",
    )
    parser.add_argument(
        "--genai-python",
        type=Path,
        default=Path("/tmp/genai-venv/bin/python"),
        help="python of the onnxruntime-genai environment (see bench/speed/genai_side.py)",
    )
    parser.add_argument(
        "--genai-rounds",
        type=int,
        default=6,
        help="alternating rounds against onnxruntime-genai per set of processes (two generations a side each)",
    )
    parser.add_argument(
        "--genai-processes", type=int, default=4, help="sets of fresh processes for the comparison with onnxruntime-genai"
    )
    parser.add_argument(
        "--genai-model",
        type=Path,
        default=Path("/tmp/genai/smollm2-fp32"),
        help="the default model built by onnxruntime-genai's model builder, fp32, cpu",
    )
    args = parser.parse_args()

    from softprompt.formats.export_folder import open_export
    from softprompt.prompt_bank import save_prompt
    from softprompt.runtime import load

    print(
        f"{dt.date.today()}  {machine()}  threads {args.threads}; every comparison alternates its two sides over "
        f"{args.repeats} rounds and reports the median of the per-round ratios (the load on this machine drifts)"
    )
    weights = weight_bytes(args.export)

    backbone = open_export(args.export)
    bank = Path(tempfile.mkdtemp(prefix="serve-bank-"))
    rng = np.random.default_rng(0)
    lengths = {"bench": 20, "p100": 100, **{f"t{i}": 20 for i in range(8)}}
    for name, length in lengths.items():
        rows = rng.integers(0, backbone.config.vocab_size, length)
        save_prompt(bank, name, np.asarray(backbone.table[rows], np.float32), fingerprint=backbone.config.fingerprint)
    model = load(args.export, bank=bank, providers="cpu", threads=args.threads)
    model.timer = RunTimer(model)
    one = workload(model, 1, args.input_tokens)
    eight = workload(model, 8, args.input_tokens)

    # Decode at batch 1 against the limit and the MatMul floor, each measured beside it in every round.
    plain_runs: list[dict] = []

    def plain_rate() -> float:
        plain_runs.append(decode_rate(model, one, [None], args.new_tokens, 1))
        return plain_runs[-1]["tokens_per_s"]

    rate, bandwidth, share, _ = paired(args.repeats, plain_rate, lambda: copy_bandwidth(args.threads, repeats=3) / weights)
    limit = bandwidth
    bandwidth *= weights
    floor_seconds = matmul_floor(args.export, args.threads)
    _, floor_rate, of_floor, _ = paired(args.repeats, plain_rate, lambda: 1 / floor_seconds())
    plain = median_of(plain_runs)
    print(
        f"memory bandwidth (bytes copied per second, {args.threads} threads) {bandwidth / 1e9:.1f} GB/s, weights "
        f"{weights / 1e6:.0f} MB -> limit {limit:.1f} tokens/s at batch 1; the weight MatMuls alone: "
        f"{floor_rate:.1f} tokens/s ({floor_rate * weights / 1e9:.1f} GB/s)"
    )
    print(
        f"batch 1, no prompt: {rate:.1f} tokens/s = {share:.0%} of the limit (target >= 90%), {of_floor:.0%} of the "
        f"MatMul floor; Python outside session.run {plain['python_share']:.1%} of a step (target < 5%)"
    )
    prompted = decode_rate(model, one, ["bench"], args.new_tokens, args.repeats)
    print(f"batch 1, 20-vector prompt: {prompted['tokens_per_s']:.1f} tokens/s, first token {prompted['first_token_ms']:.0f} ms")
    if args.other_export:
        other = load(args.other_export, bank=bank, providers="cpu", threads=args.threads)
        other.timer = RunTimer(other)
        mine, theirs, ratio, _ = paired(
            args.repeats,
            lambda: decode_rate(model, one, ["bench"], args.new_tokens, 1)["tokens_per_s"],
            lambda: decode_rate(other, one, ["bench"], args.new_tokens, 1)["tokens_per_s"],
        )
        print(f"batch 1, 20-vector prompt, --export {mine:.1f} tokens/s vs {args.other_export} {theirs:.1f}: {ratio:.2f}x")
        del other

    # Single requests alternate, many rounds: a first step takes ~60 ms and the load here moves faster than that.
    first_token_ms(model, one, "p100"), first_token_ms(model, one, None)
    p100_ms, none_ms, first_ratio, _ = paired(
        20 * args.repeats, lambda: first_token_ms(model, one, "p100"), lambda: first_token_ms(model, one, None)
    )
    print(f"first token, 100-vector prompt {p100_ms:.1f} ms vs no prompt {none_ms:.1f} ms: {first_ratio:.2f}x (target <= 1.1x)")

    # The two sides run the same computation (20-vector cached prompts, 8 rows), so their ratio is this
    # machine's noise around 1 unless mixing costs something: twice the rounds to see which.
    mixed_rate, same_rate, mixed_ratio, _ = paired(
        2 * args.repeats,
        lambda: decode_rate(model, eight, [f"t{i}" for i in range(8)], args.new_tokens, 1)["tokens_per_s"],
        lambda: decode_rate(model, eight, ["t0"] * 8, args.new_tokens, 1)["tokens_per_s"],
    )

    def one_after_another() -> float:
        start = time.perf_counter()
        for i, row in enumerate(eight):
            for _ in model.steps([row], f"t{i}", max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens):
                pass
        return 8 * args.new_tokens / (time.perf_counter() - start)

    batched, sequential, batch_gain, _ = paired(
        args.repeats,
        lambda: decode_rate(model, eight, [f"t{i}" for i in range(8)], args.new_tokens, 1)["tokens_per_s"],
        one_after_another,
    )
    print(
        f"8 rows of 8 tasks {mixed_rate:.1f} tokens/s vs 8 rows of one task {same_rate:.1f}: {mixed_ratio:.2f}x "
        f"(target >= 0.95); 8 rows of 8 tasks {batched:.1f} vs the 8 requests one after another {sequential:.1f}: "
        f"{batch_gain:.1f}x (target >= 3)"
    )

    switches = []
    for i in range(2000):
        start = time.perf_counter()
        model.prompt(f"t{i % 8}")
        switches.append(time.perf_counter() - start)
    print(f"switching task (bank check + lookup): median {1e6 * statistics.median(switches):.0f} us (target < 1 ms)")

    served, written, cached = [], [], []
    for _ in range(7):
        rows = rng.integers(0, backbone.config.vocab_size, 20)
        vectors = np.asarray(backbone.table[rows], np.float32)
        start = time.perf_counter()
        save_prompt(bank, "t0", vectors, fingerprint=backbone.config.fingerprint)
        in_place = time.perf_counter()
        while not np.array_equal(model.prompt("t0"), vectors):
            pass
        seen = time.perf_counter()
        model.logits_of_ids([[0]], "t0")  # its first request starts computing the cached prompt
        model.wait_for_prompt_cache()
        ready = time.perf_counter()
        written.append(in_place - start)
        served.append(seen - in_place)
        cached.append(ready - in_place)
    print(
        f"swapped file served after: median {1000 * statistics.median(served):.1f} ms, worst {1000 * max(served):.1f} ms "
        f"from the files being in place (target < 50 ms); writing them took {1000 * statistics.median(written):.1f} ms; "
        f"its cached prompt ready after {1000 * statistics.median(cached):.0f} ms (until then it runs uncached)"
    )

    if not args.skip_torch:
        args.bank, args.inner, args.prompt_length = bank, 2, 20
        ours, torch_rate, ratio, _ = paired(
            args.repeats,
            lambda: decode_rate(model, one, ["bench"], args.new_tokens, 2)["tokens_per_s"],
            lambda: child("torch", args, 1)["decode_tokens_per_s"],
        )
        print(
            f"PyTorch + PEFT, batch 1, same prompt: {torch_rate:.1f} tokens/s, the runtime {ours:.1f}: "
            f"runtime / PyTorch {ratio:.2f}x (target >= 1.3x)"
        )
    if args.genai_python.is_file() and (args.genai_model / "genai_config.json").is_file():
        args.bank, args.inner, args.prompt_length = bank, 2, 0
        genai = [
            str(args.genai_python),
            "-m",
            "bench.speed.genai_side",
            str(args.genai_model),
            "--ids",
            ",".join(map(str, one[0])),
            "--new-tokens",
            str(args.new_tokens),
            "--threads",
            str(args.threads),
            "--repeats",
            "2",
            "--serve",
        ]
        sets = against_genai(args, genai)
        runs = [r for group in sets for r in group]
        rates = [[tuple(r[name]["decode_tokens_per_s"] for name in ("ours", "genai")) for r in group] for group in sets]
        pairs = [t for group in rates for t in group]
        ours_rate, genai_rate_ = (statistics.median(t[i] for t in pairs) for i in range(2))
        ratio = statistics.median(a / b for a, b in pairs)
        per_set = [statistics.median(a / b for a, b in group) for group in rates]
        ours = model.complete_ids(one, None, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)[0].token_ids
        same = next((i for i, (a, b) in enumerate(zip(ours, runs[-1]["genai"]["tokens"])) if a != b), None)
        print(
            f"onnxruntime-genai fp32, batch 1, no prompt: {genai_rate_:.1f} tokens/s, first token "
            f"{statistics.median(r['genai']['first_token_ms'] for r in runs):.0f} ms; the runtime {ours_rate:.1f}: runtime / genai "
            f"{ratio:.2f}x (target >= 0.95; ratio of the medians {ours_rate / genai_rate_:.2f}x; {len(pairs)} rounds over "
            f"{len(sets)} sets of processes, whose own medians were "
            + ", ".join(f"{x:.2f}x" for x in per_set)
            + "); "
            + ("same greedy tokens" if same is None else f"greedy tokens first differ at token {same}")
        )
    else:
        print(f"onnxruntime-genai: skipped ({args.genai_python} or {args.genai_model} missing; see bench/speed/genai_side.py)")
    shutil.rmtree(bank, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
