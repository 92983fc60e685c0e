"""`prompt-bank`: list, show, verify, import and make task prompts in a bank folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from softprompt.formats import __version__
from softprompt.formats.bank import (
    list_tasks,
    load_prompt,
    misnamed,
    orphans,
    remove_prompt,
    save_prompt,
    upgrade_bank,
)
from softprompt.formats.command import Parser, run_command
from softprompt.formats.errors import PromptBankError
from softprompt.formats.export_folder import chat_template_source, open_export, read_config
from softprompt.formats.fingerprint import short
from softprompt.formats.task import parse_verbalizers, unescape

from .peft_tasks import export_peft, import_peft, task_spec

EPILOG = """\
A bank is a folder; a task is NAME.json (its record) naming NAME.<hash>.npy (a [P, E] float32/float16 soft prompt,
or a prefix task's keys and values for every layer, [2 x layers, kv heads, P, head size]).

examples:
  prompt-bank list banks/smollm2
  prompt-bank import-peft path/to/peft_adapter banks/smollm2 --task sentiment --model exports/smollm2
  prompt-bank from-text exports/smollm2 banks/smollm2 --task polite "Answer politely and briefly."
  prompt-bank verify banks/smollm2 --model exports/smollm2
  prompt-bank export-peft banks/smollm2 sentiment out/peft_adapter --model exports/smollm2
"""

NOT_A_TASK = (
    "not served: its name is not a task's (NAME.json or NAME.<hash>.npy, NAME of letters, digits, '_', '-' and '.', "
    "starting with a letter or digit, at most 128 characters)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="prompt-bank",
        description="Manage banks of soft prompts for an exported backbone.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("list", help="list the tasks of a bank")
    p.add_argument("bank", type=Path, metavar="BANK")

    p = commands.add_parser("show", help="show one task's record and statistics")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("task", metavar="TASK")

    p = commands.add_parser("verify", help="check every task (and, with --model, that it fits that export)")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("--model", type=Path, metavar="EXPORT_DIR", help="export folder whose width and fingerprint must match")

    p = commands.add_parser("import-peft", help="import a PEFT prompt-tuning, P-tuning or prefix-tuning adapter as a task")
    p.add_argument("adapter", type=Path, metavar="ADAPTER_DIR", help="folder with adapter_config.json and adapter_model.*")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("--task", required=True, help="name of the task to create")
    p.add_argument("--model", type=Path, required=True, metavar="EXPORT_DIR", help="export the adapter was trained for")
    p.add_argument(
        "--labels",
        default=None,
        metavar="A,B,...",
        help="a SEQ_CLS adapter's label names in its classifier's order (default: LABEL_0, LABEL_1, ...)",
    )
    _add_write_options(p)

    p = commands.add_parser("from-text", help="make a task whose prompt is the embeddings of a text")
    p.add_argument("model", type=Path, metavar="EXPORT_DIR")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("text", metavar="TEXT", help="the text; its tokens (no special tokens) become the prompt rows")
    p.add_argument("--task", required=True, help="name of the task to create")
    _add_write_options(p)

    p = commands.add_parser("export-peft", help="write a task as a PEFT prompt-tuning (or prefix-tuning) adapter")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("task", metavar="TASK")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="adapter folder to write (loads with PeftModel.from_pretrained)")
    p.add_argument(
        "--model",
        type=Path,
        metavar="EXPORT_DIR",
        help="export the task was made for: checks the fingerprint and records the layer and head counts",
    )

    p = commands.add_parser("upgrade", help="rewrite a bank's schema 1 tasks (NAME.npy + NAME.json) in today's format")
    p.add_argument("bank", type=Path)

    p = commands.add_parser("remove", help="delete a task's files")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("task", metavar="TASK")
    return parser


def _add_write_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--template",
        default=None,
        help="the task's hard prompt around each input, with {text} once (e.g. 'Review: {text}\\nSentiment:')",
    )
    p.add_argument(
        "--verbalizer",
        action="append",
        default=[],
        metavar="LABEL=WORDS",
        help="a classification label and the words that stand for it (repeat per label): makes --classify work",
    )
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage dtype (default: float32)")
    p.add_argument("--force", action="store_true", help="replace the task if it exists")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: COMMANDS[args.command](args))


def _list(args) -> int:
    tasks = list_tasks(args.bank)
    unserved = _unserved_files(args.bank)
    if not tasks and not unserved:
        print(f"{args.bank}: no tasks", file=sys.stderr)
        return 0
    failed = 0
    print(f"{'TASK':24} {'METHOD':7} {'P':>5} {'E':>6} {'DTYPE':8} {'BACKBONE':20} INIT")
    for name in tasks:
        try:
            meta = load_prompt(args.bank, name).meta
        except PromptBankError as exc:
            failed += 1
            print(f"{name:24} INVALID: {exc}")
            continue
        print(
            f"{name:24} {meta.method:7} {meta.length:>5} {meta.width:>6} {meta.dtype:8} {short(meta.fingerprint):20} "
            f"{meta.init or '-'}"
        )
    for label, reason in unserved:
        failed += 1
        print(f"{label:24} INVALID: {reason}")
    return 1 if failed else 0


def _show(args) -> int:
    prompt = load_prompt(args.bank, args.task)
    vectors = prompt.vectors.astype(np.float32)
    record = prompt.meta.to_json()
    norms = np.linalg.norm(vectors, axis=-1)  # a prompt's rows; a prefix's keys and values, per head and position
    record["stats"] = {
        "row_norm_mean": float(norms.mean()),
        "row_norm_min": float(norms.min()),
        "row_norm_max": float(norms.max()),
        "bytes": int(prompt.vectors.nbytes),
    }
    print(json.dumps(record, indent=2))
    return 0


def _verify(args) -> int:
    width = fingerprint = max_positions = cache = None
    against = ""
    if args.model:
        config = read_config(args.model)
        width, fingerprint, max_positions = config.hidden_size, config.fingerprint, config.max_positions
        cache = config.prefix_cache
        # The fingerprint names the model, not its precision: one check holds for all its exports.
        against = f" against {args.model} ({config.architecture}, {config.precision} graphs)"
    tasks = list_tasks(args.bank)
    failed = valid = 0
    for name in tasks:
        try:
            meta = load_prompt(
                args.bank, name, width=width, fingerprint=fingerprint, max_positions=max_positions, cache=cache
            ).meta
            valid += 1
            shape = f"prefix of {meta.length} for {_layers(meta)}" if meta.method == "prefix" else f"{meta.length}x{meta.width}"
            print(f"ok    {name} ({shape} {meta.dtype})")
        except PromptBankError as exc:
            failed += 1
            print(f"FAIL  {name}: {exc}")
    for label, reason in _unserved_files(args.bank):
        failed += 1
        print(f"FAIL  {label}: {reason}")
    print(f"{valid} of {len(tasks)} tasks valid{against}")
    return 1 if failed else 0


def _unserved_files(bank: Path) -> list[tuple[str, str]]:
    """(what to call it, why) for each file that looks like a task's but that no reader serves: `list` and `verify`
    name them beside the tasks."""
    found = [(orphan[:-4], f"{bank / orphan} has no {orphan[:-4]}.json record beside it") for orphan in orphans(bank)]
    return found + [(repr(entry), NOT_A_TASK) for entry in misnamed(bank)]


def _layers(meta) -> str:
    if meta.parts is None:
        return f"{meta.layers} layers"
    return ", ".join(f"{meta.parts[part]} {part} layers" for part in ("decoder", "encoder", "cross"))


def _upgrade(args) -> int:
    upgraded = upgrade_bank(args.bank)
    print(f"{args.bank}: {len(upgraded)} task(s) rewritten as schema 2" + (f": {', '.join(upgraded)}" if upgraded else ""))
    return 0


def _import_peft(args) -> int:
    meta = import_peft(
        args.adapter,
        args.bank,
        args.task,
        args.model,
        template=None if args.template is None else unescape(args.template),
        verbalizers=parse_verbalizers(args.verbalizer) if args.verbalizer else None,
        labels=args.labels.split(",") if args.labels else None,
        dtype=args.dtype,
        overwrite=args.force,
    )
    if meta.method == "prefix":
        print(
            f"imported {args.task}: a prefix of {meta.length} positions for {meta.layers} layers "
            f"({meta.kv_heads} key/value heads of {meta.head_size}) {meta.dtype} into {args.bank}"
        )
    else:
        print(f"imported {args.task}: {meta.length}x{meta.width} {meta.dtype} into {args.bank}")
    return 0


def _task_spec(args) -> dict:
    """--template and --verbalizer as a record's `extra` (nothing when neither was given)."""
    verbalizers = parse_verbalizers(args.verbalizer) if args.verbalizer else None
    return task_spec(None if args.template is None else unescape(args.template), verbalizers)


def _from_text(args) -> int:
    backbone = open_export(args.model)
    ids = backbone.encode(args.text, add_special_tokens=False)
    if not ids:
        raise PromptBankError(f"text {args.text!r} has no tokens; expected a non-empty text")
    vectors = np.asarray(backbone.table[np.asarray(ids)], dtype=np.float32)
    meta = save_prompt(
        args.bank,
        args.task,
        vectors,
        fingerprint=backbone.config.fingerprint,
        dtype=args.dtype,
        overwrite=args.force,
        init="text",
        source=f"text:{args.text}",
        extra={"token_ids": ids, **_task_spec(args)},
    )
    print(f"made {args.task}: {meta.length}x{meta.width} {meta.dtype} from {len(ids)} tokens into {args.bank}")
    if chat_template_source(args.model)[0] is not None:  # an instruct model answers in its chat format
        print(
            f"{args.model} is a chat model: run the task in its chat format, e.g. "
            f"run-model {args.model} --bank {args.bank} --task {args.task} --chat 'Where is my order?'",
            file=sys.stderr,
        )
    return 0


def _export_peft(args) -> int:
    written = export_peft(args.bank, args.task, args.out, export_dir=args.model)
    note = f" (PEFT has no place for the task's {' and '.join(written.dropped)}: apply them yourself)" if written.dropped else ""
    what = f"{written.length}-position prefix" if written.prefix else f"{written.length}x{written.width} prompt"
    print(f"wrote {args.out}: {what} of {args.task}{note}")
    return 0


def _remove(args) -> int:
    remove_prompt(args.bank, args.task)
    print(f"removed {args.task} from {args.bank}")
    return 0


COMMANDS = {
    "list": _list,
    "show": _show,
    "verify": _verify,
    "import-peft": _import_peft,
    "from-text": _from_text,
    "upgrade": _upgrade,
    "export-peft": _export_peft,
    "remove": _remove,
}

if __name__ == "__main__":
    sys.exit(main())
