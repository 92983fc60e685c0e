"""`serve-model EXPORT_DIR [--bank BANK]`: the export and its tasks behind an OpenAI-compatible HTTP API."""

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
next request. Listens on 127.0.0.1 unless --host says otherwise.

examples:
  serve-model exports/smollm2-int4 --bank banks/smollm2-135m --name smollm2
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2:define", "prompt": "Committee, n.", "max_tokens": 32}'
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="serve-model",
        description="Serve an export and its bank's tasks over HTTP, speaking the OpenAI API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by export-model")
    add_serving_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def add_serving_options(parser: argparse.ArgumentParser) -> None:
    """What one server process needs beside its export and address; shared with `cluster-model serve`."""
    parser.add_argument("--bank", help="prompt-bank folder whose tasks are served as NAME:TASK")
    parser.add_argument("--name", help="the backbone's model id (default: the export folder's name)")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = limits(args, parser)
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
        return run_command(lambda: _serve(args, chosen, listener))


def _serve(args: argparse.Namespace, chosen: Limits, listener: socket.socket) -> int:
    import uvicorn

    from softprompt.runtime import load

    from .app import create_app

    model = load(args.export_dir, bank=args.bank, providers=args.providers, threads=args.threads)
    name = served_name(args)
    app = create_app(model, name=name, api_key=args.api_key, limits=chosen)
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
