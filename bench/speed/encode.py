"""Sentence-embedding speed on MiniLM: the runtime's `embed` against sentence-transformers-style PyTorch, one run.

Batch 32 sentences, a 20-vector soft prompt on both sides (PyTorch gets it through inputs_embeds:
prompt rows, then the word embeddings of [CLS] text [SEP], right-padded; mean pooling over the
text tokens; L2 normalisation), 2 threads each. The sides alternate over the repeats; medians.

    python -m bench.speed.encode --export exports/minilm      # after: export-model minilm-l6 exports/minilm
    python -m bench.speed.encode --export exports/minilm-int8 # after: ... exports/minilm-int8 --precision int8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import machine

SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "The new phone has a brilliant screen but a weak battery.",
    "Heavy rain is expected across the north tomorrow.",
    "She finally finished the marathon after five hours.",
    "The committee postponed its decision until next month.",
    "This recipe needs two eggs and a cup of flour.",
    "Our flight was delayed because of a technical problem.",
    "The museum opens a new exhibition on ancient Rome.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("exports/minilm"))
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torch
    from transformers import AutoModel

    from softprompt.exporter.sources import resolve
    from softprompt.formats.export_folder import open_export
    from softprompt.prompt_bank import save_prompt
    from softprompt.runtime import load

    torch.set_num_threads(args.threads)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(args.batch)]
    backbone = open_export(args.export)
    bank = Path(tempfile.mkdtemp(prefix="encode-bank-"))
    rows = np.random.default_rng(0).integers(0, backbone.config.vocab_size, args.prompt_length)
    prompt = np.asarray(backbone.table[rows], np.float32)
    save_prompt(bank, "bench", prompt, fingerprint=backbone.config.fingerprint)
    runtime = load(args.export, bank=bank, providers="cpu", threads=args.threads)

    reference = AutoModel.from_pretrained(resolve(args.model, log=lambda m: None)[0], dtype=torch.float32).eval()
    words = reference.get_input_embeddings()
    ids = [backbone.encode(text) for text in texts]
    width = max(len(r) for r in ids) + args.prompt_length
    input_ids = torch.zeros((len(ids), width - args.prompt_length), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : args.prompt_length + len(row)] = 1
    text_mask = mask[:, args.prompt_length :].unsqueeze(-1).float()
    prompt_t = torch.from_numpy(prompt)

    def torch_side() -> np.ndarray:
        with torch.no_grad():
            embeds = torch.cat([prompt_t.expand(len(ids), -1, -1), words(input_ids)], dim=1)
            hidden = reference(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, args.prompt_length :]
            pooled = (hidden * text_mask).sum(1) / text_mask.sum(1)
            return torch.nn.functional.normalize(pooled, dim=1).numpy()

    def runtime_side() -> np.ndarray:
        return runtime.embed(texts, task="bench")

    want, got = torch_side(), runtime_side()
    diff = float(np.abs(want - got).max())
    cosine = float((want * got).sum(axis=1).min())  # both unit length
    times: dict[str, list[float]] = {"runtime": [], "pytorch": []}
    for _ in range(args.repeats):
        for name, side in (("runtime", runtime_side), ("pytorch", torch_side)):
            start = time.perf_counter()
            side()
            times[name].append(time.perf_counter() - start)
    rate = {name: args.batch / statistics.median(t[1:]) for name, t in times.items()}
    print(f"{machine()}; batch {args.batch}, prompt {args.prompt_length}, {args.threads} threads")
    print(
        f"runtime embed: {rate['runtime']:.0f} sentences/s; PyTorch: {rate['pytorch']:.0f} sentences/s; "
        f"ratio {rate['runtime'] / rate['pytorch']:.2f}x (target >= 1.5x); max |difference| {diff:.1e}"
    )
    precision = backbone.config.precision
    print(f"{precision} export: lowest cosine similarity to PyTorch fp32 {cosine:.4f} (target for int8: >= 0.99)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
