"""`train-prompt MODEL --data train.jsonl --task NAME --bank BANK`: prompt tuning with the backbone frozen."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from softprompt.formats import __version__
from softprompt.formats.bank import task_exists
from softprompt.formats.command import INTERRUPTED, Parser, run_command
from softprompt.formats.task import TaskSpec, default_verbalizers, parse_verbalizers, unescape

from .data import read_jsonl
from .errors import TrainingError
from .init import check_init

EPILOG = """\
Data is JSON Lines: {"text": ..., "label": ...} for classification (the loss is on the label's
verbalizer tokens) or {"input": ..., "output": ...} for generation (the loss is on the output).

--init: random (uniform, the embedding table's spread), vocab (rows sampled from the 5,000 most
common tokens), labels (each label's verbalizer embedding averaged over its tokens, the rest as
vocab), text:"..." (a text's embeddings, repeated or cut to --length), file:BANK/NAME.npy
(start from another task's prompt).

example:
  train-prompt smollm2-135m --data examples/train.jsonl --eval examples/dev.jsonl --task sentiment \\
      --bank banks/smollm2 --length 20 --init labels --template "Review: {text}\\nSentiment:"
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="train-prompt",
        description="Learn a task's soft prompt with the backbone frozen.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="what export-model takes (built-in name, .gguf file, model folder), or an export folder: its source model",
    )
    parser.add_argument("--data", type=Path, required=True, help="training data (JSON Lines)")
    parser.add_argument("--eval", type=Path, help="evaluation data; the best prompt on it is kept")
    parser.add_argument("--task", required=True, help="task name in the bank")
    parser.add_argument("--bank", type=Path, required=True, help="bank folder to save the prompt into")
    parser.add_argument(
        "--length", type=int, default=None, help="prompt length P (default: 20, or what the template's slots hold)"
    )
    parser.add_argument(
        "--init", default=None, help="labels (classification default), vocab (generation default), random, text:..., file:..."
    )
    parser.add_argument(
        "--template",
        default="{text}",
        help="hard prompt wrapping each input; must contain {text}; {soft:N} places the next N prompt vectors there "
        "(a P-tuning pattern, e.g. '{soft:4}Review: {text}{soft:2} Sentiment:'; without slots they all go in front); "
        "\\n and \\t are read as newline and tab, as a shell passes them literally",
    )
    parser.add_argument(
        "--verbalizer",
        action="append",
        default=[],
        metavar="LABEL=WORDS",
        help="words the model should produce for a label (repeatable; default: ' ' + label name)",
    )
    parser.add_argument(
        "--method",
        choices=["prompt", "prefix", "p-tuning"],
        default="prompt",
        help="what to learn: a prompt before the input (default), a prefix of keys and values at every layer "
        "(prefix tuning; trained through an MLP, saved as plain keys and values), or a prompt made by a "
        "prompt encoder (P-tuning; saved as the encoder's output)",
    )
    parser.add_argument(
        "--prefix-parts",
        choices=["all", "decoder"],
        default="all",
        help="encoder-decoders, --method prefix: a prefix for the encoder, the decoder and the cross-attention "
        "(all, Li and Liang's; default) or for the decoder's self-attention only (PEFT's, which export-peft can write)",
    )
    parser.add_argument("--encoder", choices=["mlp", "lstm"], default="mlp", help="P-tuning's prompt encoder (default: mlp)")
    parser.add_argument(
        "--encoder-hidden",
        type=int,
        default=None,
        help="hidden width of the P-tuning encoder or prefix MLP (default: their output width per position)",
    )
    parser.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw")
    parser.add_argument("--lr", type=float, default=3e-2, help="learning rate (default: 0.03)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="training steps (overrides --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (and at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=2,
        metavar="N",
        help="recompute every N-th layer's activations in backward to save memory "
        "(1: least memory, 0: off and fastest; default: 2)",
    )
    parser.add_argument(
        "--head",
        choices=["none", "linear"],
        default="none",
        help="encoders only: also train a linear classifier on the pooled embedding, stored with the task "
        "(default: none, the nearest label embedding decides)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        metavar="fp32|int8|int4|EXPORT_DIR",
        help="train through the weights of the model's export at this precision (export-model's defaults for it), or "
        "of that export folder (its settings): the prompt learns to make up for their quantization error. It "
        "loads on every precision; decoders only",
    )
    parser.add_argument("--force", action="store_true", help="replace the task if the bank has it")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Values out of range are usage errors, refused before anything loads.
    for flag, value, low in (
        ("--length", args.length, 1),
        ("--batch-size", args.batch_size, 1),
        ("--steps", args.steps, 1),
        ("--eval-every", args.eval_every, 1),
        ("--seed", args.seed, 0),
        ("--checkpoint-every", args.checkpoint_every, 0),
        ("--encoder-hidden", args.encoder_hidden, 1),
    ):
        if value is not None and value < low:
            parser.error(f"{flag} {value}; expected at least {low}")
    for flag, value in (("--lr", args.lr), ("--epochs", args.epochs)):
        if not value > 0 or value == float("inf"):  # (NaN fails it too)
            parser.error(f"{flag} {value}; expected a positive number")
    if args.precision not in ("fp32", "int8", "int4") and not (Path(args.precision) / "softprompt.json").is_file():
        parser.error(f"--precision {args.precision!r}; expected fp32, int8, int4 or an export folder (with softprompt.json)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        from .encoder import train_encoder_prompt
        from .train import TrainConfig, load_backbone, save_trained, train_prompt
    except ImportError as exc:
        print(
            f"error: training needs torch and transformers ({exc.name} is missing): pip install 'softprompt-onnx[export]'",
            file=sys.stderr,
        )
        return 1

    def train() -> int:
        # Everything about the inputs is checked before the model is loaded.
        if task_exists(args.bank, args.task) and not args.force:
            raise TrainingError(f"task {args.task!r} exists in {args.bank}; pass --force to replace it")
        verbalizers = parse_verbalizers(args.verbalizer)
        train = read_jsonl(args.data, labels=list(verbalizers) or None)
        if train.kind == "classification":
            verbalizers = verbalizers or default_verbalizers(train.labels)
        elif verbalizers:
            raise TrainingError(f"{args.data} is generation data; --verbalizer is for classification")
        eval_data = read_jsonl(args.eval, labels=list(verbalizers) or None) if args.eval else None
        if eval_data and eval_data.kind != train.kind:
            raise TrainingError(f"{args.eval} is {eval_data.kind} data but {args.data} is {train.kind} data")
        spec = TaskSpec(template=unescape(args.template), labels=verbalizers)
        length = args.length if args.length is not None else (sum(spec.slots) or 20)
        spec.check_length(length, "--template")
        if args.init:
            check_init(args.init)
        config = TrainConfig(
            length=length,
            init=args.init or ("labels" if spec.labels else "vocab"),
            optimizer=args.optimizer,
            lr=args.lr,
            batch_size=args.batch_size,
            steps=args.steps,
            epochs=args.epochs,
            eval_every=args.eval_every,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            precision=args.precision,
            method=args.method,
            encoder=args.encoder,
            encoder_hidden=args.encoder_hidden,
            prefix_parts=args.prefix_parts,
        )
        log(f"loading {args.model}")
        backbone = load_backbone(args.model, log=log)
        head = None
        if backbone.kind == "encoder":
            vectors, record, head = train_encoder_prompt(
                backbone, train, spec, config, eval_data=eval_data, head=args.head == "linear", progress=not args.quiet, log=log
            )
        elif args.head != "none":
            raise TrainingError("--head is for encoder models; a decoder's task is scored by its verbalizers")
        else:
            vectors, record = train_prompt(backbone, train, spec, config, eval_data=eval_data, progress=not args.quiet, log=log)
        meta = save_trained(args.bank, args.task, vectors, backbone, spec, record, args.model, overwrite=True, head=head)
        best = record["best"]
        summary = (
            f"; best {', '.join(f'{k} {v:.4g}' for k, v in best.items() if k != 'step')} at step {best['step']}" if best else ""
        )
        shape = (
            f"a prefix of {meta.length} for {meta.layers} layers" if meta.method == "prefix" else f"{meta.length}x{meta.width}"
        )
        print(f"saved {args.task} ({shape}) to {args.bank} after {record['steps']} steps{summary}")
        if record.get("interrupted"):  # Ctrl-C in the loop keeps the best prompt so far, then says it was stopped
            print("interrupted: the best prompt so far was saved", file=sys.stderr)
            return INTERRUPTED
        return 0

    return run_command(train, interrupted=f"interrupted; task {args.task!r} in {args.bank} was left as it was")


if __name__ == "__main__":
    sys.exit(main())
