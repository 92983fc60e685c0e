"""`run-model EXPORT_DIR [--bank BANK --task NAME] [options] TEXT...`: generate with a task's soft prompt."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from softprompt.formats import __version__
from softprompt.formats.command import Parser, add_providers_option, log_to_stderr, run_command
from softprompt.formats.errors import SoftpromptError

from .native_loop import LOOPS
from .options import add_generation_options, check_row_options, generation_settings

EPILOG = """\
An encoder export (export-model minilm-l6 ...) prints one JSON sentence embedding per text, or
labels with --classify. Options may stand before or after the texts. With no TEXT, one input is read per line of
standard input; with --chat and no TEXT in a terminal, a conversation starts (/clear starts over, /exit ends).
Several texts run as one batch and each output is printed under a '> input' line. A single text without --json
is streamed.

examples:
  run-model exports/smollm2 --bank banks/smollm2-135m --task define "Committee, n."
  run-model exports/smollm2 --chat "How do I reset my password?"
  run-model exports/smollm2 --chat                       # a conversation in the terminal
  run-model exports/smollm2 --chat --system "Answer politely and briefly." "Where is my order?"
  run-model exports/smollm2 --json "one" "two"
  run-model exports/smollm2 --bank banks/smollm2-135m --task sentiment --classify "a gorgeous, moving film"
  run-model exports/smollm2 --bank banks/mine --task s1,s2,s3 --ensemble vote --classify "dull and slow"
  printf 'first\\nsecond\\n' | run-model exports/smollm2 --max-new-tokens 16
  run-model exports/smollm2 --bank banks/smollm2-135m --task define --input examples/words.jsonl --output defined.jsonl

--input runs a JSONL file ({"text": ...} a line, optionally "task"; with --chat, "messages" or "text") in
batches of --batch-size and writes one JSON object a line to --output, in input order; run it again
after a stop and it continues after the last line written.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="run-model",
        description="Generate text with an exported backbone, optionally under a task's soft prompt.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by export-model")
    parser.add_argument("texts", metavar="TEXT", nargs="*", help="input texts (default: lines of standard input)")
    parser.add_argument("--bank", help="prompt-bank folder holding the task prompts")
    parser.add_argument("--task", help="task whose soft prompt is prepended (default: no prompt)")
    add_generation_options(parser)
    parser.add_argument(
        "--classify",
        action="store_true",
        help="label each text with the task's labels instead of generating (needs a classification task)",
    )
    parser.add_argument(
        "--ensemble",
        choices=["vote", "mean"],
        help="with --classify and --task A,B,C: run every text under each prompt and combine them",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="each TEXT is a user's message: render it with the model's chat template and answer as the assistant",
    )
    parser.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the user's")
    parser.add_argument("--input", metavar="IN.jsonl", help="run every line of a JSONL file (with --output)")
    parser.add_argument("--output", metavar="OUT.jsonl", help="where --input's results go, one JSON object a line")
    parser.add_argument("--batch-size", type=int, default=16, help="--input rows run together (default: 16)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar for --input")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per input: input, task, text, token_ids, finish_reason (stop or length)",
    )
    add_providers_option(parser)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: onnxruntime's)")
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="runtime",
        help="genai: generate one greedy text at a time on onnxruntime-genai's native loop (a decoder on the CPU, "
        "the genai extra; up to 7%% faster on small quantized models), the rest on the runtime's (default: runtime)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    check_row_options(args, parser)
    if args.classify and not args.task:
        parser.error("--classify needs --bank and --task (a classification task)")
    members = [name.strip() for name in (args.task or "").split(",") if name.strip()]
    if args.ensemble and not (args.classify and len(members) >= 2):
        parser.error("--ensemble needs --classify and several tasks: --task A,B,C")
    if (args.input is None) != (args.output is None):
        parser.error("--input and --output go together: the file to run and where its results go")
    if args.input is not None and args.texts:
        parser.error("give TEXT arguments or --input, not both")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}; expected at least 1")
    if len(members) > 1 and not args.ensemble:
        parser.error(f"--task {args.task!r} names several tasks; that needs --ensemble vote or --ensemble mean")
    settings = generation_settings(args, parser)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}; expected at least 1")
    if args.input is not None:
        return run_command(lambda: _run_file(args, settings))
    if args.chat and not args.texts and sys.stdin.isatty():  # a person at a terminal: a conversation
        return run_command(lambda: _chat_repl(args, settings))
    try:
        texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    except UnicodeDecodeError as exc:
        print(f"error: standard input is not {exc.encoding} text ({exc.reason} at byte {exc.start})", file=sys.stderr)
        return 1
    if not texts:
        parser.error("no input: give TEXT arguments or lines on standard input")
    return run_command(lambda: _run_texts(args, texts, members, settings))


def _load(args):
    from .encoder import Encoder
    from .model import load

    log_to_stderr()
    model = load(args.export_dir, bank=args.bank, providers=args.providers, threads=args.threads, loop=args.loop)
    if args.chat and isinstance(model, Encoder):
        raise SoftpromptError(f"{args.export_dir} is an encoder export: it embeds texts and cannot chat")
    return model


def _chat_repl(args, settings: dict) -> int:
    from .repl import chat_repl

    return chat_repl(_load(args), task=args.task, system=args.system, settings=settings)


def _run_texts(args, texts: list[str], members: list[str], settings: dict) -> int:
    from .chat import user_turn
    from .encoder import Encoder

    model = _load(args)
    if args.classify:
        task = members if args.ensemble else args.task
        return _print_labels(texts, args.task, model.classify(texts, task=task, ensemble=args.ensemble), args.json)
    if isinstance(model, Encoder):  # an encoder makes sentence embeddings, not text (_load refused --chat)
        for text, vector in zip(texts, model.embed(texts, task=args.task)):
            print(json.dumps({"input": text, "task": args.task, "embedding": [round(float(x), 6) for x in vector]}))
        return 0
    if args.chat:
        completions = [model.chat(user_turn(text, args.system), task=args.task, **settings) for text in texts]
        if len(texts) == 1 and not args.json:
            print(completions[0].text)
            return 0
    elif len(texts) == 1 and not args.json:
        for piece in model.stream(texts[0], task=args.task, **settings):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    else:
        completions = model.complete(texts, task=args.task, **settings)
    for text, completion in zip(texts, completions):
        if args.json:
            print(json.dumps({**completion.to_json(), **({"message": text} if args.chat else {})}, ensure_ascii=False))
        else:  # several inputs: each output under its input, so multi-line outputs stay readable
            print(f"> {text if args.chat else completion.input}\n{completion.text}\n")
    return 0


def _run_file(args, settings: dict) -> int:
    from .batch_file import run_file
    from .encoder import Encoder

    model = _load(args)
    mode = "classify" if args.classify else "chat" if args.chat else "generate"
    if isinstance(model, Encoder) and mode != "classify":  # (_load refused --chat)
        mode = "embed"
    ran = run_file(
        model,
        Path(args.input),
        Path(args.output),
        mode=mode,
        task=args.task,
        batch_size=args.batch_size,
        settings=settings if mode in ("generate", "chat") else None,
        system=args.system,
        progress=not args.quiet,
        log=lambda message: print(message, file=sys.stderr),
    )
    print(f"{args.output}: {ran} rows written", file=sys.stderr)
    return 0


def _print_labels(texts: list[str], task: str, results: list[dict], as_json: bool) -> int:
    for text, result in zip(texts, results):
        if as_json:
            print(json.dumps({"input": text, "task": task, **result}, ensure_ascii=False))
        else:
            scores = "  ".join(f"{label} {score:.3f}" for label, score in result["scores"].items())
            votes = "  votes " + " ".join(f"{label} {n}" for label, n in result["votes"].items()) if "votes" in result else ""
            print(f"{result['label']}\t{scores}{votes}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
