"""An export's memory, step by step: what export-model holds against the size of the model's weights.

Runs `export_model` in this process (into a temporary folder) with resident memory sampled every
50 ms, and prints after each step of the export its peak: anonymous memory (what the process itself
allocated) and file pages (the model's weights as transformers maps them from its safetensors, the
graph's data file as onnxruntime maps it), and their total over the weights' size, the baseline.

    python -m bench.speed.export_memory /path/to/model.gguf --precision int4
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import _status_mb, machine


class Sampler:
    """The largest anonymous + file resident memory seen since the last `take`, sampled on a thread."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self.lock = every, (0.0, 0.0), threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.sample()
            time.sleep(self.every)

    def sample(self) -> None:
        anon, file = _status_mb("RssAnon") or 0.0, _status_mb("RssFile") or 0.0
        with self.lock:
            if anon + file > sum(self.peak):
                self.peak = (anon, file)

    def take(self) -> tuple[float, float]:
        self.sample()
        with self.lock:
            peak, self.peak = self.peak, (0.0, 0.0)
        return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="what export-model takes: a built-in name, a .gguf file or a Hugging Face folder")
    parser.add_argument("--precision", default="int4", help="default: int4")
    args = parser.parse_args()

    from softprompt.exporter import export_model

    print(f"machine: {machine()}")
    print(f"date: {dt.datetime.now().isoformat(timespec='minutes')}; export-model {args.model} --precision {args.precision}")
    sampler = Sampler()
    steps: list[tuple[str, float, float]] = []
    label = ["starting"]

    def log(message: str) -> None:
        if message.startswith("["):  # a new step: what the last one held
            steps.append((label[0], *sampler.take()))
            label[0] = message.split("] ", 1)[-1][:70]

    with tempfile.TemporaryDirectory() as folder:
        export_model(args.model, Path(folder) / "export", precision=args.precision, log=log)
    steps.append((label[0], *sampler.take()))
    weights_mb = _weights_mb(args.model)
    print(f"\nweights: {weights_mb:.0f} MB (float32)\n")
    print(f"{'anon MB':>8} {'file MB':>8} {'total':>8} {'/weights':>8}  step (peak while it ran)")
    for name, anon, file in steps:
        print(f"{anon:8.0f} {file:8.0f} {anon + file:8.0f} {(anon + file) / weights_mb:7.2f}x  {name}")
    top = max(steps, key=lambda s: s[1] + s[2])
    print(f"\npeak: {top[1] + top[2]:.0f} MB = {(top[1] + top[2]) / weights_mb:.2f}x the weights, while {top[0]}")
    return 0


def _weights_mb(model: str) -> float:
    """The float32 weights' size, from the source as export-model loads it (cached, so a second load is quick)."""
    from softprompt.exporter.sources import load_source

    source = load_source(model, log=lambda message: None)
    return sum(p.numel() * p.element_size() for p in source.model.parameters()) / 2**20


if __name__ == "__main__":
    raise SystemExit(main())
