"""What every benchmark shares: the machine line, the workload text, step counting and the worker protocol.

Standard library only at import, so a side that runs in another environment (onnxruntime-genai's)
can use it too. Benchmarks run as modules from the repository root: `python -m bench.speed.generate`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root: where `python -m bench....` runs

SOURCE_TEXT = (
    "The film opens on a quiet harbour town where nothing much happens, and for a while the camera is content "
    "to watch fishermen mend their nets, children chase gulls along the pier and an old woman sell bread from "
    "a cart. Then a stranger arrives on the evening ferry, carrying a single suitcase and a letter addressed to "
    "someone who died years ago. What follows is a patient, often funny and finally very moving story about "
    "grief, small lies and the people who keep a place alive long after its best days are gone."
)


def workload(model, batch: int, input_tokens: int) -> list[list[int]]:
    """`batch` rows of exactly `input_tokens` ids, each starting at a different word of the text."""
    words = SOURCE_TEXT.split()
    rows = []
    for i in range(batch):
        ids = model.encode(" ".join(words[i * 3 :] + words[: i * 3]))
        if len(ids) < input_tokens:
            raise SystemExit(f"the source text has only {len(ids)} tokens; need {input_tokens}")
        rows.append(ids[:input_tokens])
    return rows


def new_steps(steps):
    """The runtime's per-step yields that brought a token: a yield that repeats the last step's state (an engine
    yielding its finished rows again) counted as a step would add a token that took no time."""
    made = 0
    for states in steps:
        if len(states[0].ids) > made:
            made = len(states[0].ids)
            yield states


def serve(measure) -> None:
    """Measure once per 'run' line on stdin, one JSON line each (with this process's id): a side kept alive
    between the rounds of a comparison (loading a model every round costs more than the round, and the
    load here drifts)."""
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps({**measure(), "pid": os.getpid()}), flush=True)


def timed_generate(model, ids, new_tokens: int) -> tuple[float, list[float], list[list[int]]]:
    """One greedy `generate` of a transformers (or PEFT) model on the [B, T] tensor `ids`, exactly `new_tokens`
    new: (start time, the time each step's tokens arrived, the new ids per row). torch and transformers are
    imported here, so the harness itself stays importable without them."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    streamer = Stamps()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=2,
            streamer=streamer,
        )
    return start, streamer.times[1:], out[:, ids.shape[1] :].tolist()  # the first put() is the input


def side_arguments(model_help: str, repeats: int) -> argparse.ArgumentParser:
    """The command line every side of a comparison takes (a model, input ids, new tokens, threads, repeats)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help=model_help)
    parser.add_argument("--ids", required=True, help="comma-separated input token ids")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def _status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status in MB, or None where there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM). Not ru_maxrss: Linux carries that
    over from the parent through fork and exec, so every child of a large parent reports the parent's."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident memory now (VmRSS; 0 where /proc is missing)."""
    return _status_mb("VmRSS") or 0.0


def decoder_feeds(session, length: int = 1, past: int = 0, embeds=None, all_logits: bool = False, head_size=None) -> dict:
    """Inputs for one call of a KV-cached decoder graph, made from its input names (this runtime's and
    onnxruntime-genai's): `length` new positions after `past` cached ones (random keys and values, of
    `head_size` where the graph leaves it symbolic), every position attended. The new positions are
    `embeds` [1, length, E] where given, else small random embeddings, or token 42 for a graph that
    takes input_ids; `all_logits` asks a graph with logits_to_keep for every position's logits."""
    import numpy as np

    rng = np.random.default_rng(0)
    if embeds is not None:
        embeds = np.asarray(embeds, np.float32)
        length = embeds.shape[1]
    made = {}
    for node in session.get_inputs():
        name, shape = node.name, node.shape
        if name.startswith("past"):
            size = shape[3] if isinstance(shape[3], int) else head_size
            if not isinstance(shape[1], int) or size is None:
                raise SystemExit(f"{name} {shape}: no head count or head size in the graph or a config beside it")
            made[name] = rng.standard_normal((1, shape[1], past, size), dtype=np.float32)
        elif name == "inputs_embeds":
            made[name] = embeds if embeds is not None else 0.1 * rng.standard_normal((1, length, shape[2]), dtype=np.float32)
        elif name == "input_ids":
            made[name] = np.full((1, length), 42, np.int64)
        elif name == "attention_mask":
            made[name] = np.ones((1, past + length), np.int64)
        elif name == "position_ids":
            made[name] = np.arange(past, past + length, dtype=np.int64)[None]
        elif name == "logits_to_keep":
            made[name] = np.array([0 if all_logits else 1], np.int64)
        else:
            raise SystemExit(f"{name}: an input this benchmark does not know how to fill")
    return made


def machine() -> str:
    """CPU model, visible cores, Python and onnxruntime versions: printed with every result."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return f"{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"
