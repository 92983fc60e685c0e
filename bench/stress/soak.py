"""Hot-swap soak: 8 threads of requests while another thread swaps a task's files.

For `--seconds` (default 60) eight threads generate with task "task" from one loaded model while a
ninth replaces task.npy/task.json in the bank folder, back and forth between two prompts, the way
a copy tool does (a dot-named temporary file, then a rename). Every output must equal what the
old or the new prompt gives alone (computed first, each by a model of its own), never a mix, and
no request may fail. The test suite runs the same check for 3 seconds on a tiny model; this runs
it on a real export, long enough for the rare interleavings.

    python -m bench.stress.soak --export exports/smollm2 --bank banks/smollm2-135m --tasks sentiment,define

Exits 1 if any request failed or returned a mix. Prints requests, swaps and latency percentiles.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import machine
from softprompt.prompt_bank import load_prompt, save_prompt
from softprompt.runtime import load

TEXTS = ["Committee, n.", "a gorgeous, moving film", "Text: dull and slow\nSentiment:"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("exports/smollm2"))
    parser.add_argument("--bank", type=Path, default=Path("banks/smollm2-135m"), help="where the two prompts come from")
    parser.add_argument("--tasks", default="sentiment,define", help="the two prompts swapped in as one task")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=8, help="request threads")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    args = parser.parse_args()

    first, second = args.tasks.split(",")
    with tempfile.TemporaryDirectory() as folder:
        versions, bank = Path(folder) / "versions", Path(folder) / "bank"
        for version, name in (("a", first), ("b", second)):
            prompt = load_prompt(args.bank, name)
            # Templates and labels left out: both versions wrap the texts alike, only the prompt differs.
            save_prompt(versions / version, "task", prompt.vectors, fingerprint=prompt.meta.fingerprint)
        shutil.copytree(versions / "a", bank)
        settings = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens}
        expected = {
            tuple(load(args.export, bank=versions / v, threads=2).generate(TEXTS, task="task", **settings)) for v in ("a", "b")
        }
        if len(expected) != 2:
            print("the two prompts give the same outputs; choose two that differ", file=sys.stderr)
            return 2
        model = load(args.export, bank=bank, threads=2)
        stop = threading.Event()
        latencies: list[float] = []
        outputs: list[tuple] = []
        failures: list[str] = []
        swaps = [0]

        def serve() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    outputs.append(tuple(model.generate(TEXTS, task="task", **settings)))
                except Exception as exc:  # noqa: BLE001 - every failure is reported
                    failures.append(f"{type(exc).__name__}: {exc}")
                latencies.append(time.perf_counter() - started)

        def swap() -> None:
            flip = 0
            while not stop.is_set():
                flip ^= 1
                for suffix in (".npy", ".json"):
                    temporary = bank / f".task{suffix}.partial"
                    shutil.copyfile(versions / "ab"[flip] / f"task{suffix}", temporary)
                    temporary.replace(bank / f"task{suffix}")
                swaps[0] += 1
                time.sleep(0.01)

        threads = [threading.Thread(target=serve) for _ in range(args.threads)] + [threading.Thread(target=swap)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(args.seconds)
        stop.set()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began

    mixes = [o for o in outputs if o not in expected]
    seen = {o for o in outputs if o in expected}
    ms = sorted(t * 1000 for t in latencies)
    print(f"machine: {machine()}")
    print(f"{args.export}, {args.threads} request threads + 1 swapping thread, {wall:.1f} s")
    print(
        f"requests: {len(outputs) + len(failures)} ({len(outputs)} answered, {len(failures)} failed); "
        f"swaps: {swaps[0]}; outputs not equal to either prompt's: {len(mixes)}; versions served: {len(seen)} of 2"
    )
    if ms:
        print(
            f"request latency ms: median {statistics.median(ms):.0f}, p99 {ms[int(0.99 * (len(ms) - 1))]:.0f}, max {ms[-1]:.0f}"
        )
    for failure in failures[:3]:
        print(f"failure: {failure}")
    ok = not failures and not mixes and len(seen) == 2
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
