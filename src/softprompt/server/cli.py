"""`serve-model EXPORT_DIR [--bank BANK]`: the export and its tasks behind an OpenAI-compatible HTTP API; several
exports (each with its bank) in one server as `serve-model A B --bank BANK_A --bank BANK_B`."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from softprompt.formats import __version__
from softprompt.formats.command import Parser, add_providers_option, log_to_stderr, run_command

if TYPE_CHECKING:
    from .protocol import Limits

EPILOG = """\
Every task of the bank is a model id, NAME:TASK (NAME: --name, default the export folder's name);
NAME alone is the backbone without a task. Tasks swapped into the bank folder are served from the
next request. Several exports share one server: give --bank (and --name) once per export, in the
exports' order; each runs its own batch. Listens on 127.0.0.1 unless --host says otherwise.

examples:
  serve-model exports/smollm2-int4 --bank banks/smollm2-135m --name smollm2
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2:define", "prompt": "Committee, n.", "max_tokens": 32}'
  serve-model exports/smollm2-int4 exports/gemma-int4 --bank banks/smollm2-135m --bank banks/gemma-3-270m \\
      --name smollm2 --name gemma
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="serve-model",
        description="Serve an export and its bank's tasks over HTTP, speaking the OpenAI API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR", nargs="+", help="folder written by export-model (one or more)")
    add_serving_options(parser, several=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def add_serving_options(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """What one server process needs beside its export and address; shared with `cluster-model serve`. With
    `several`, --bank and --name may be given once per export."""
    each = " (once per export, in their order)" if several else ""
    action = "append" if several else "store"
    parser.add_argument("--bank", action=action, help=f"prompt-bank folder whose tasks are served as NAME:TASK{each}")
    parser.add_argument("--name", action=action, help=f"the backbone's model id (default: the export folder's name){each}")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SOFTPROMPT_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $SOFTPROMPT_API_KEY; none: no key)",
    )
    parser.add_argument("--max-batch", type=int, default=16, help="rows run together at most (default: 16)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; more get 429 (default: 256)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask (default: 2048)")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt in tokens (default: 4096)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    add_providers_option(parser)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: onnxruntime's)")


def limits(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Limits:
    """The limits `add_serving_options` parsed; a value below 1 is a usage error naming its option."""
    from .protocol import Limits

    for option in ("max_batch", "max_queue", "max_tokens", "max_prompt_tokens", "max_body_bytes"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}; expected at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}; expected at least 1")
    return Limits(args.max_body_bytes, args.max_prompt_tokens, args.max_tokens, args.max_batch, args.max_queue)


def served_name(args: argparse.Namespace) -> str:
    """The backbone's model id: --name, or the export folder's name."""
    return args.name or Path(args.export_dir).resolve().name


def exports(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[tuple[str, str, str | None]]:
    """(model id, export folder, bank or None) for each export serve-model serves; a usage error where --bank or
    --name is given for some exports but not each, or two exports would have one name."""
    folders = args.export_dir
    for option in ("bank", "name"):
        given = getattr(args, option) or []
        if given and len(given) != len(folders):
            parser.error(
                f"--{option} given {len(given)} times for {len(folders)} exports; give it once per export, in their order"
            )
    names = args.name or [Path(folder).resolve().name for folder in folders]
    for name in names:
        if not name or ":" in name:
            parser.error(f"model name {name!r}: expected a non-empty name without ':' (NAME:TASK names a task)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        parser.error(f"two exports would both be {', '.join(repeated)}; name each with --name, once per export")
    return list(zip(names, folders, args.bank or [None] * len(folders)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = limits(args, parser)
    served = exports(args, parser)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}; expected 1..65535")
    log_to_stderr(logging.INFO)  # a task that fails to load, then a line a request
    try:
        listener = listen(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc} (another server there? pick another --port)",
              file=sys.stderr)  # fmt: skip
        return 1
    with listener:
        return run_command(lambda: _serve(args, served, chosen, listener))


def _serve(args: argparse.Namespace, served: list[tuple[str, str, str | None]], chosen: Limits, listener: socket.socket) -> int:
    import uvicorn

    from softprompt.runtime import load

    from .app import create_app

    models = {name: load(folder, bank=bank, providers=args.providers, threads=args.threads) for name, folder, bank in served}
    app = create_app(models, api_key=args.api_key, limits=chosen)
    for name, model in models.items():
        print(describe(model, name, args), file=sys.stderr)
    # uvicorn handles Ctrl-C and SIGTERM itself: running requests finish (up to 60 s), then it returns.
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=60)).run(sockets=[listener])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a busy port is one error line at once, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT, not one in use
        listener.bind((host, port))
        listener.listen(2048)
    except OSError:
        listener.close()
        raise
    return listener


def describe(model, name: str, args: argparse.Namespace) -> str:
    """What this server serves, said once at start: the model, its precision and threads, its tasks."""
    config = model.config
    threads = args.threads or os.environ.get("SOFTPROMPT_THREADS") or f"onnxruntime's default ({os.cpu_count()} cores)"
    tasks = ", ".join(model.tasks) or "none"
    lines = [
        f"serving {name} ({config.architecture}, {config.precision}, {', '.join(model.providers)}, threads: {threads}) "
        f"on http://{args.host}:{args.port}/v1",
        f"tasks ({len(model.tasks)}), each as {name}:TASK: {tasks}",
    ]
    if model.unserved:
        lines.append(f"not served (see the warnings above): {', '.join(model.unserved)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
