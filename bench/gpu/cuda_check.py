"""CUDA check: greedy tokens on CUDA equal the CPU's, and decode tokens/s with the KV
cache kept on the GPU (I/O binding) against copying it to the host every step; with `--fp16`, the
same model's fp16 export on CUDA against fp32 on the CPU (the first 32 greedy tokens) and its speed.

Two steps, because the GPU machines lent to this project take 64 MiB a call and the default model's
weights are 540 MB:

    python -m bench.gpu.cuda_check skeleton --export exports/smollm2-cuda --out build/cuda-skeleton   # here (fp32, --kv-cache growing)
    python -m bench.gpu.cuda_check run --skeleton build/cuda-skeleton                           # GPU machine

(`make cuda-skeleton` writes both skeletons, fp32 and fp16; there, add `--fp16 build/cuda-skeleton-fp16`.)

`skeleton` copies an export without its large weight tensors (the graph, norm gains, rotary tables,
tokenizer and config stay; 5 MB for SmolLM2). `run` fills them with seeded random values of the same
shapes and compares the CPU and CUDA execution providers on them. Decode speed depends only on the
shapes and parity compares two providers on the same weights, so random weights serve both; the
generated text means nothing. For fp16 that is a proxy: what rounding does to greedy tokens depends
on the margins between the top logits, which the real weights would give; these give logits of unit
spread over the whole vocabulary. `run` needs onnxruntime-gpu and only the runtime's dependencies.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import decoder_feeds, new_steps

WEIGHTS = "weights.bin"
FP16_TOKENS = 32  # leading greedy tokens an fp16 export must share with fp32
KEPT = ("cos", "sin")  # rotary tables: computed, not learned; random values would break positions


def skeleton(export: Path, out: Path, keep_below: int = 4096) -> None:
    """Write `export` to `out` with every large learned tensor moved to an absent external file."""
    import onnx

    model = onnx.load(str(export / "model.onnx"))
    entries, offset = [], 0
    for tensor in model.graph.initializer:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        if count <= keep_below or any(word in tensor.name for word in KEPT):
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        length = count * dtype.itemsize
        entries.append({"name": tensor.name, "shape": list(tensor.dims), "dtype": dtype.str, "offset": offset, "length": length})
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        offset += -(-length // 4096) * 4096
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    table = np.load(export / "embeddings.npy", mmap_mode="r")
    for path in export.iterdir():
        if path.is_file() and path.name not in ("model.onnx", "model.onnx.data", "embeddings.npy"):  # kept tensors: inline
            shutil.copy2(path, out / path.name)
    (out / "skeleton.json").write_text(
        json.dumps(
            {"weights": entries, "weights_bytes": offset, "embeddings": list(table.shape), "embeddings_dtype": table.dtype.str},
            indent=1,
        )
    )
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{out}: {len(entries)} tensors ({offset / 1e6:.0f} MB) left out, {size / 1e6:.1f} MB written")


def fill(skeleton_dir: Path, out: Path, seed: int = 0) -> Path:
    """A runnable export: the skeleton with seeded random weights, scaled 1/sqrt(fan-in) so activations stay O(1).

    The values are drawn in float32 and stored in each tensor's own type, so the skeletons of one model's
    fp32 and fp16 exports (same tensors, same order) filled with one seed hold the same weights, rounded
    to fp16 in the second: the fp16 check compares them as the real exports would be compared."""
    info = json.loads((skeleton_dir / "skeleton.json").read_text())
    shutil.copytree(skeleton_dir, out, dirs_exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(out / WEIGHTS, "wb") as handle:
        handle.truncate(info["weights_bytes"])
        for entry in info["weights"]:
            shape = entry["shape"]
            values = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[0]))
            handle.seek(entry["offset"])
            handle.write(values.astype(np.dtype(entry["dtype"])).tobytes())
    table = rng.standard_normal(info["embeddings"], dtype=np.float32)
    np.save(out / "embeddings.npy", table.astype(np.dtype(info.get("embeddings_dtype", "<f4"))))
    return out


def device_name() -> str:
    try:
        import subprocess

        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return found.stdout.strip() or "unknown GPU"
    except Exception as exc:  # noqa: BLE001 - a report line, not a failure
        return f"unknown GPU ({exc})"


def placement(model_path: Path) -> dict[str, dict[str, int]]:
    """Which provider ran each op type in one first step (from onnxruntime's profile)."""
    import onnxruntime as ort

    from softprompt.runtime.session import CUDA, CUDA_OPTIONS

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "placement")
    session = ort.InferenceSession(str(model_path), options, providers=[(CUDA, CUDA_OPTIONS), "CPUExecutionProvider"])
    session.run(None, decoder_feeds(session, length=4))
    events = json.loads(Path(session.end_profiling()).read_text())
    found: dict[str, dict[str, int]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and "provider" in args:
            counts = found.setdefault(args["provider"], {})
            counts[args["op_name"]] = counts.get(args["op_name"], 0) + 1
    return found


def decode_rate(model, rows, tasks, new_tokens: int, repeats: int) -> float:
    """Median tokens/s after the first token."""
    rates = []
    for repeat in range(repeats + 1):
        steps = new_steps(model.steps(rows, tasks, max_new_tokens=new_tokens, min_new_tokens=new_tokens))
        stamps = [time.perf_counter() for _ in steps]
        if repeat:
            rates.append((len(stamps) - 1) * len(rows) / (stamps[-1] - stamps[0]))
    return statistics.median(rates)


def run(
    skeleton_dir: Path,
    new_tokens: int,
    repeats: int,
    dry_run: bool = False,
    prompt_lengths: tuple[int, int, int] = (20, 100, 7),
    fp16_skeleton: Path | None = None,
) -> int:
    import onnxruntime as ort

    from softprompt.prompt_bank import save_prompt
    from softprompt.runtime import load, read_config

    print(
        f"{device_name()}; {platform.processor() or platform.machine()}; onnxruntime {ort.__version__} "
        f"{ort.get_available_providers()}"
    )
    work = Path(tempfile.mkdtemp(prefix="cuda-check-"))
    export = fill(skeleton_dir, work / "export")
    config = read_config(export)
    bank = work / "bank"
    rng = np.random.default_rng(1)
    table = np.load(export / "embeddings.npy", mmap_mode="r")
    names = ["p20", "p100", "p7"]  # named for the default lengths
    for name, length in zip(names, prompt_lengths):
        save_prompt(bank, name, np.asarray(table[rng.integers(0, len(table), length)]), fingerprint=config.fingerprint)

    if not dry_run:
        for provider, ops in placement(export / "model.onnx").items():
            print(f"ops on {provider}: {sum(ops.values())} ({', '.join(f'{k} {v}' for k, v in sorted(ops.items()))})")

    cpu = load(export, bank=bank, providers="cpu")
    gpu = load(export, bank=bank, providers="cpu" if dry_run else "cuda")
    gpu.graph.binds = gpu.graph.binds or dry_run  # the dry run takes the CUDA code path (I/O binding) on the CPU
    print(
        f"CUDA session providers {gpu.session.get_providers()}; use_tf32 = "
        f"{gpu.session.get_provider_options().get('CUDAExecutionProvider', {}).get('use_tf32')}"
    )
    assert gpu.graph.binds, "a CUDA session must keep the cache on the device"

    # Parity: a mixed-task batch (prompts of 20, 100, 7 vectors and none, cached; inputs of different
    # lengths) greedy on both providers, and each row alone on CUDA.
    texts = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea, there lived",
        "def fibonacci(n):",
        "1, 2, 3, 4,",
    ]
    tasks = ["p20", "p100", None, "p7"]
    on_cpu = cpu.complete(texts, task=tasks, max_new_tokens=new_tokens)
    on_gpu = gpu.complete(texts, task=tasks, max_new_tokens=new_tokens)
    alone = [gpu.complete(text, task=task, max_new_tokens=new_tokens)[0] for text, task in zip(texts, tasks)]
    same_batch = [a.token_ids == b.token_ids for a, b in zip(on_cpu, on_gpu)]
    same_alone = [a.token_ids == b.token_ids for a, b in zip(alone, on_gpu)]
    ids = [cpu.encode(text, task) for text, task in zip(texts, tasks)]
    diff = np.abs(cpu.logits_of_ids(ids, tasks) - gpu.logits_of_ids(ids, tasks)).max()
    print(
        f"parity, {new_tokens} greedy tokens: CUDA batch == CPU batch per row {same_batch}; CUDA row alone == CUDA "
        f"batch {same_alone}; input logits max |CUDA - CPU| {diff:.2e}; distinct tokens per row "
        f"{[len(set(r.token_ids)) for r in on_gpu]} (random weights can repeat a token, which would make parity cheap)"
    )

    # Speed: batch 1 and 8, 32 input tokens, the cache on the device (binding) vs copied to the host each step.
    vocab = config.vocab_size
    one = [list(rng.integers(0, vocab, 32))]
    eight = [list(rng.integers(0, vocab, 32)) for _ in range(8)]
    for label, rows, row_tasks in (
        ("batch 1, no prompt", one, [None]),
        ("batch 1, 20-vector prompt", one, ["p20"]),
        ("batch 8, no prompt", eight, [None] * 8),
    ):
        gpu.graph.binds = True
        bound = decode_rate(gpu, rows, row_tasks, new_tokens, repeats)
        gpu.graph.binds = False
        copied = decode_rate(gpu, rows, row_tasks, new_tokens, repeats)
        gpu.graph.binds = True
        host = decode_rate(cpu, rows, row_tasks, new_tokens, 1)
        print(
            f"{label}: CUDA, cache on the device {bound:.0f} tokens/s; cache copied to the host each step "
            f"{copied:.0f} ({bound / copied:.2f}x); CPU provider on this machine {host:.0f}"
        )
    ok = all(same_batch) and all(same_alone)
    if fp16_skeleton is not None:
        export16 = fill(fp16_skeleton, work / "export-fp16")
        half = load(export16, bank=bank, providers="cpu" if dry_run else "cuda")
        half.graph.binds = half.graph.binds or dry_run
        ok = fp16_parity(skeleton_dir, fp16_skeleton, cpu, gpu, half, texts, tasks, [one, eight], repeats) and ok
    print("PASS" if ok else "FAIL: greedy tokens differ")
    return 0 if ok else 1


def leading(reference: list[int], tokens: list[int]) -> int:
    """How many tokens `tokens` shares with `reference` before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), min(len(reference), len(tokens)))


def fp16_parity(fp32_skeleton: Path, fp16_skeleton: Path, cpu, gpu, half, texts, tasks, batches, repeats: int) -> bool:
    """The fp16 export on CUDA (`half`) against fp32 on the CPU (`cpu`), both filled with the same weights:
    each row's greedy tokens must equal fp32's for the first FP16_TOKENS; also the input logits' error and
    decode speed against fp32 on CUDA (`gpu`). The bank's prompts, saved for the fp32 export, load unchanged."""
    shapes = [
        [(entry["name"], entry["shape"]) for entry in json.loads((folder / "skeleton.json").read_text())["weights"]]
        for folder in (fp32_skeleton, fp16_skeleton)
    ]
    if shapes[0] != shapes[1]:
        raise SystemExit(f"{fp16_skeleton} is not a skeleton of the same model as {fp32_skeleton}: their weights differ")
    if half.backbone.config.precision != "fp16":
        raise SystemExit(f"{fp16_skeleton}: precision {half.backbone.config.precision}; expected an fp16 export's skeleton")
    settings = {"max_new_tokens": FP16_TOKENS, "min_new_tokens": FP16_TOKENS}
    reference = cpu.complete(texts, task=tasks, **settings)
    got = half.complete(texts, task=tasks, **settings)
    agreed = [leading(a.token_ids, b.token_ids) for a, b in zip(reference, got)]
    ids = [cpu.encode(text, task) for text, task in zip(texts, tasks)]
    expected = cpu.logits_of_ids(ids, tasks)
    error = np.abs(half.logits_of_ids(ids, tasks) - expected).max() / np.abs(expected).max()
    print(
        f"fp16 parity: greedy tokens equal to fp32 (CPU) before the first difference, per row {agreed} of "
        f"{FP16_TOKENS} (target: all); input logits max |fp16 - fp32| / max |fp32| {error:.2e}; providers "
        f"{half.session.get_providers()}"
    )
    for rows in batches:
        row_tasks = [None] * len(rows)
        fast = decode_rate(half, rows, row_tasks, FP16_TOKENS, repeats)
        full = decode_rate(gpu, rows, row_tasks, FP16_TOKENS, repeats)
        print(f"batch {len(rows)}, no prompt: fp16 {fast:.0f} tokens/s, fp32 {full:.0f} ({fast / full:.2f}x), same provider")
    return all(count >= FP16_TOKENS for count in agreed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("skeleton", help="an export without its large weights, small enough to carry")
    make.add_argument("--export", type=Path, default=Path("exports/smollm2-cuda"))
    make.add_argument("--out", type=Path, default=Path("build/cuda-skeleton"))
    check = verbs.add_parser("run", help="fill the skeleton with random weights; CUDA vs CPU parity and tokens/s")
    check.add_argument("--skeleton", type=Path, default=Path("build/cuda-skeleton"))
    check.add_argument("--new-tokens", type=int, default=64)
    check.add_argument("--repeats", type=int, default=5)
    check.add_argument(
        "--fp16",
        type=Path,
        default=None,
        metavar="SKELETON",
        help="also check the skeleton of the same model's fp16 export (e.g. build/cuda-skeleton-fp16): its greedy "
        f"tokens on CUDA against fp32's on the CPU for the first {FP16_TOKENS}, and its speed",
    )
    check.add_argument("--dry-run", action="store_true", help="the CPU provider for both sides: checks this script")
    args = parser.parse_args()
    if args.verb == "skeleton":
        skeleton(args.export, args.out)
        return 0
    return run(args.skeleton, args.new_tokens, args.repeats, args.dry_run, fp16_skeleton=args.fp16)


if __name__ == "__main__":
    raise SystemExit(main())
