"""llama.cpp's side of bench/speed/precision.py, run in its own environment (llama-cpp-python builds from
source: about 20 minutes on 2 cores).

Set up once:
    python3.11 -m venv /tmp/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llama-venv/bin/pip install llama-cpp-python

    /tmp/llama-venv/bin/python -m bench.speed.llama_side MODEL.gguf --ids 1,2,3 --new-tokens 64 --threads 2
prints one JSON line: decode tokens/s and first-token ms (medians), peak RSS and the greedy tokens.
"""

from __future__ import annotations

import json
import statistics
import time

from llama_cpp import Llama

from bench.harness import peak_rss_mb, side_arguments  # standard library only at import


def main() -> None:
    args = side_arguments("the GGUF file", repeats=2).parse_args()
    ids = [int(x) for x in args.ids.split(",")]
    model = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512, verbose=False)

    def once() -> tuple[float, float, list[int]]:
        model.reset()  # else its prefix cache skips the prefill of a repeated input
        start = time.perf_counter()
        stamps, tokens = [], []
        for token in model.generate(ids, top_k=1, temp=0.0, reset=True):  # greedy; end-of-text does not stop it
            stamps.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == args.new_tokens:
                break
        return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens

    once()  # warm-up
    runs = [once() for _ in range(args.repeats)]
    print(
        json.dumps(
            {
                "decode_tokens_per_s": statistics.median(r[1] for r in runs),
                "first_token_ms": 1000 * statistics.median(r[0] for r in runs),
                "peak_rss_mb": peak_rss_mb(),
                "tokens": runs[-1][2],
            }
        )
    )


if __name__ == "__main__":
    main()
