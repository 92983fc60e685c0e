"""Does an export of a GGUF tokenize as llama.cpp does with the same file? Ids compared on real sentences.

For each GGUF file: the tokenizer the exporter builds from the file (softprompt.exporter.gguf_tokenizer)
and, for contrast, the one transformers' GGUF conversion builds, each against llama.cpp
(llama-cpp-python, run by `--llama-python`, the Python of its own environment) on the Pang & Lee
sentences, the fortunes definitions and a few chat and code texts. Prints the share of texts whose
ids are equal and the first difference.

    python -m bench.quality.gguf_tokenizer --llama-python /tmp/llama-venv/bin/python FILE.gguf [...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

from bench.quality.datasets import FORTUNES, pang_lee

EXTRA = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n\treturn fibonacci(n - 1) + fibonacci(n - 2)  # 12345",
    "In 2024, 1,234,567 people paid $99.95 (or €89,50) for naïve café lattes — 日本語も 🙂!!",
    "  leading spaces,   runs of   spaces, and trailing ones   ",
    '<tool_call>{"name": "f"}</tool_call><|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>',
]


def texts(limit: int) -> list[str]:
    sentences = [text for text, _ in pang_lee()][:limit]
    definitions = FORTUNES / "definitions"
    if definitions.is_file():
        blocks = definitions.read_text(encoding="utf-8", errors="replace").split("\n%\n")
        sentences += [block.strip() for block in blocks if block.strip()][: limit // 3]
    return sentences + EXTRA


def llama_cpp(python: str, model: Path, batch: list[str]) -> list[list[int]]:
    script = Path(__file__).with_name("llama_cpp_tokens.py")
    done = subprocess.run(
        [python, str(script)], input=json.dumps({"model": str(model), "texts": batch}), capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def compare(name: str, got: list[list[int]], want: list[list[int]], batch: list[str], decode) -> None:
    same = sum(g == w for g, w in zip(got, want))
    print(f"  {name:<28} {same}/{len(want)} texts with llama.cpp's ids ({same / len(want):.1%})")
    for text, g, w in zip(batch, got, want):
        if g != w:
            cut = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            print(f"    first difference: {text[:60]!r}: at {cut}, {decode(g[cut : cut + 4])!r} vs {decode(w[cut : cut + 4])!r}")
            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", nargs="+", type=Path)
    parser.add_argument("--llama-python", required=True, help="python of an environment with llama-cpp-python")
    parser.add_argument("--sentences", type=int, default=300)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from softprompt.exporter.gguf_tokenizer import gguf_fields, gguf_tokenizer

    batch = texts(args.sentences)
    print(f"{len(batch)} texts; {platform.machine()}, {platform.python_version()}")
    for path in args.gguf:
        print(path.name)
        want = llama_cpp(args.llama_python, path, batch)
        own, why = gguf_tokenizer(gguf_fields(path))
        if own is None:
            print(f"  exporter: no tokenizer of its own ({why})")
        else:
            compare("exporter (from the file)", [own.encode(t).ids for t in batch], want, batch, own.decode)
        converted = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        compare("transformers' conversion", [converted.encode(t) for t in batch], want, batch, converted.decode)


if __name__ == "__main__":
    main()
