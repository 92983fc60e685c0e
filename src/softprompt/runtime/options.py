"""The options every command that generates takes (run-model, cluster-model run): generation settings and what
--bank, --task, --classify, --chat and --system need of each other, checked before anything loads."""

from __future__ import annotations

import argparse

from .errors import RequestError
from .settings import GenerationSettings


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The generation settings, shared by every command that generates (run-model, cluster-model run)."""
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    parser.add_argument("--min-new-tokens", type=int, default=0, help="tokens to generate before end-of-sequence is allowed")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); above 0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set of tokens with this mass")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text appears (repeatable); it is not included in the output",
    )


def check_row_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """What --bank, --task, --classify, --chat and --system need of each other (run-model, cluster-model run)."""
    if args.task and not args.bank:
        parser.error("--task needs --bank (the folder that holds the task's prompt)")
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    if args.chat and args.classify:
        parser.error("--chat and --classify do not go together: classify labels texts, chat answers them")


def generation_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The settings `add_generation_options` parsed; an out-of-range value is a usage error naming its option."""
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    )
    try:
        GenerationSettings(**settings)  # refused before anything loads
    except RequestError as exc:  # "top_p 2.0; expected ..." names the setting: say it as the option
        setting, _, rest = str(exc).partition(" ")
        parser.error(f"--{setting.replace('_', '-')} {rest}")
    return settings
