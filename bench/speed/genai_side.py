"""onnxruntime-genai's side of bench/speed/serve.py and bench/speed/precision.py, run in its own environment
(a tool compared against never shares the project's). It takes no soft prompt.

Set up once (bench.speed.serve prints these lines when the environment is missing):
    python3.11 -m venv /tmp/genai-venv
    /tmp/genai-venv/bin/pip install torch==2.13.0 "transformers>=5,<6" onnx-ir onnx onnxruntime-genai==0.18.0
    /tmp/genai-venv/bin/python -m onnxruntime_genai.models.builder -i HF_FOLDER -o GENAI_MODEL -p fp32 -e cpu

    /tmp/genai-venv/bin/python -m bench.speed.genai_side GENAI_MODEL --ids 1,2,3 --new-tokens 64 --threads 2
prints one JSON line: decode tokens/s (median), first-token ms, peak RSS (with genai's tokenizer loaded, as an
application holds it) and the tokens; with --serve it stays alive and prints one such line per 'run' line on stdin.
"""

from __future__ import annotations

import json
import statistics
import time

import onnxruntime_genai as og

from bench.harness import peak_rss_mb, serve, side_arguments  # standard library only at import


def main() -> None:
    parser = side_arguments("onnxruntime-genai's model folder", repeats=3)
    parser.add_argument(
        "--serve", action="store_true", help="stay alive: measure once per 'run' line on stdin (bench.harness.serve's protocol)"
    )
    args = parser.parse_args()
    ids = [int(x) for x in args.ids.split(",")]
    config = og.Config(args.model)
    config.clear_providers()
    config.overlay(
        json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}})
    )
    model = og.Model(config)
    # An application holds the tokenizer beside the model, as this runtime's side does (its peak RSS counts it): load it
    # and write each generation's text, after the timed loop.
    tokenizer = og.Tokenizer(model)
    total = len(ids) + args.new_tokens

    def once() -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens([ids])  # runs the prompt and yields the first token's logits
        stamps = []
        while not generator.is_done():
            generator.generate_next_token()  # the first call only picks; each later one runs a step first
            stamps.append(time.perf_counter())
        tokens = [int(t) for t in generator.get_sequence(0)][len(ids) :]
        tokenizer.decode(tokens)
        return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens

    def measure() -> dict:
        runs = [once() for _ in range(args.repeats)]
        return {
            "decode_tokens_per_s": statistics.median(r[1] for r in runs),
            "first_token_ms": 1000 * statistics.median(r[0] for r in runs),
            "peak_rss_mb": peak_rss_mb(),
            "tokens": runs[-1][2],
        }

    once()  # warm-up
    if args.serve:
        serve(measure)
    else:
        print(json.dumps(measure()))


if __name__ == "__main__":
    main()
