"""`cluster-model serve|run`: serve-model and run-model --input on Ray, past one machine."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

from softprompt.formats import __version__
from softprompt.formats.command import Parser, add_providers_option, run_command, stop_on_sigterm
from softprompt.runtime import add_generation_options, check_row_options, generation_settings
from softprompt.server.cli import add_serving_options, limits, served_name

APP = "softprompt"  # the Ray Serve application's name

EPILOG = """\
Both commands join the Ray cluster at --address (default: $RAY_ADDRESS, else a new Ray instance on
this machine). The export and bank folders must be readable at the same path on every node.

examples:
  cluster-model serve exports/smollm2-int4 --bank banks/smollm2-135m --name smollm2 --replicas 2
  cluster-model run exports/smollm2-int4 --bank banks/smollm2-135m --task sentiment --classify \\
      --input examples/reviews.jsonl --output labelled/ --workers 2
  serve run softprompt.cluster:build export_dir=exports/smollm2-int4 bank=banks/smollm2-135m replicas=2
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cluster-model",
        description="Serve an export on Ray Serve replicas, or run a dataset through it on Ray Data workers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,run}")

    serve = commands.add_parser(
        "serve",
        help="serve-model's OpenAI API on N Ray Serve replicas",
        description="serve-model's OpenAI-compatible API on Ray Serve: every replica loads the export once and "
        "follows the bank folder; Ray's proxy spreads requests over them.",
    )
    serve.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by export-model")
    add_serving_options(serve)
    serve.add_argument("--replicas", type=int, default=1, help="copies of the model serving at once (default: 1)")
    serve.add_argument("--cpus-per-replica", type=float, default=1, help="CPUs Ray gives each replica (default: 1)")
    serve.add_argument("--host", default="127.0.0.1", help="Ray's HTTP proxy address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="Ray's HTTP proxy port (default: 8000)")
    serve.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start one here)")

    run = commands.add_parser(
        "run",
        help="classify, generate, chat or embed a JSONL or Parquet dataset on Ray Data",
        description="Run every row of a JSONL or Parquet dataset (a file or a folder of files) with one loaded "
        "model per worker, as run-model --input does, and write a folder of result files in input order.",
    )
    run.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by export-model")
    run.add_argument("--input", required=True, metavar="IN", help=".jsonl or .parquet file, or a folder of them")
    run.add_argument("--output", required=True, metavar="OUT_DIR", help="new folder for the result files")
    run.add_argument("--input-format", choices=["jsonl", "parquet"], help="default: from the input's extension")
    run.add_argument("--output-format", choices=["jsonl", "parquet"], help="default: the input's format")
    run.add_argument("--bank", help="prompt-bank folder holding the task prompts")
    run.add_argument("--task", help="task of rows that name none (default: no prompt)")
    run.add_argument("--classify", action="store_true", help="label each text with the task's labels")
    run.add_argument("--chat", action="store_true", help="rows are chats ('messages', or 'text' as a user's message)")
    run.add_argument("--system", metavar="TEXT", help="with --chat: a system message before a 'text' row's")
    add_generation_options(run)
    run.add_argument("--batch-size", type=int, default=16, help="rows a worker runs together (default: 16)")
    run.add_argument("--workers", type=int, default=1, help="workers, each with its own loaded model (default: 1)")
    run.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs Ray gives each worker (default: 1)")
    add_providers_option(run)
    run.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start one here)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.replicas < 1 or args.cpus_per_replica <= 0:
            parser.error(f"--replicas {args.replicas}, --cpus-per-replica {args.cpus_per_replica}; expected at least 1, > 0")
        if not 0 < args.port < 65536:
            parser.error(f"--port {args.port}; expected 1..65535")
        app = application_of(args, parser)
        return run_command(lambda: _serve(args, app))
    check_row_options(args, parser)
    if args.batch_size < 1 or args.workers < 1 or args.cpus_per_worker <= 0:
        parser.error(
            f"--batch-size {args.batch_size}, --workers {args.workers}, --cpus-per-worker {args.cpus_per_worker}; "
            "expected at least 1, at least 1, > 0"
        )
    settings = generation_settings(args, parser)
    return run_command(lambda: _run(args, settings))


def build(args: dict[str, str]):
    """The application builder for Ray's own tools: `serve run softprompt.cluster:build export_dir=... bank=...
    replicas=2`, or `import_path: softprompt.cluster:build` with `args:` in a `serve deploy` config file. The
    arguments are `cluster-model serve`'s options, spelled with underscores."""
    given = dict(args)
    if "export_dir" not in given:
        raise ValueError("args need export_dir: the export folder to serve")
    argv = ["serve", str(given.pop("export_dir"))]
    for key, value in given.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    parser = build_parser()
    return application_of(parser.parse_args(argv), parser)


def application_of(parsed: argparse.Namespace, parser: argparse.ArgumentParser):
    """The Ray Serve application `cluster-model serve`'s parsed options describe."""
    from .serving import application

    return application(
        parsed.export_dir,
        bank=parsed.bank,
        name=served_name(parsed),
        replicas=parsed.replicas,
        cpus_per_replica=parsed.cpus_per_replica,
        api_key=parsed.api_key,
        limits=limits(parsed, parser),
        providers=parsed.providers,
        threads=parsed.threads,
    )


def _join_ray(address: str | None, cpus: float) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start Ray here with at least `cpus` logical CPUs.

    Ray waits, without a word, for CPUs it does not have: two one-CPU Ray Data workers on a two-core
    machine leave none for the reads and wait forever. Ray started here counts enough CPUs (the
    threads still share the real cores); a cluster short of them is told, since an autoscaler may add them.
    """
    import ray

    if address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)), log_to_driver=False)
        stop_on_sigterm()  # after ray.init, whose own handler prints C++ frames and skips the cleanup
        return
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    stop_on_sigterm()
    have = ray.cluster_resources().get("CPU", 0)
    if cpus > have:
        print(
            f"warning: this needs {cpus:g} CPUs and the Ray cluster has {have:g}: it waits until they are added", file=sys.stderr
        )


def _serve(args: argparse.Namespace, app) -> int:
    import ray
    from ray import serve

    _join_ray(args.address, args.replicas * args.cpus_per_replica)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"serving on http://{args.host}:{args.port}/v1 with {args.replicas} replica(s); Ctrl-C stops", file=sys.stderr)
        serve.run(app, name=APP, route_prefix="/", blocking=True)
    finally:  # Ctrl-C or SIGTERM: the app, Serve and (where this command started it) Ray stop before the exit
        for stop in (lambda: serve.delete(APP), serve.shutdown, ray.shutdown):
            with contextlib.suppress(Exception):
                stop()
    return 0


def _run(args: argparse.Namespace, settings: dict) -> int:
    from softprompt.formats.errors import SoftpromptError

    from .datasets import choose_mode, input_format, is_uri, map_dataset, read_inputs, write_outputs

    output = Path(args.output)
    if not is_uri(args.output) and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise SoftpromptError(f"{output} already exists; give a new folder for the results (nothing was overwritten)")
    fmt = input_format(args.input, args.input_format)  # what can be checked here is checked before Ray starts
    mode = choose_mode(args.export_dir, "classify" if args.classify else "chat" if args.chat else None)
    import ray

    _join_ray(args.address, args.workers * args.cpus_per_worker + 1)  # one CPU for Ray Data's reads and writes
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results in input order, file after file
    dataset = map_dataset(
        read_inputs(args.input, fmt),
        args.export_dir,
        bank=args.bank,
        mode=mode,
        task=args.task,
        settings=settings,
        system=args.system,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size,
        providers=args.providers,
    )
    try:
        write_outputs(dataset, args.output, args.output_format or fmt)
    except Exception as exc:  # a worker's error comes back wrapped in Ray's; say the worker's own words
        raise _cause(exc) from None
    written = "" if is_uri(args.output) else f"{sum(1 for _ in output.iterdir())} file(s) "
    print(f"{args.output}: {written}written", file=sys.stderr)
    return 0


def _cause(exc: BaseException) -> BaseException:
    """The first of this project's errors in the chain Ray wraps around a worker's exception, else `exc`."""
    from softprompt.formats.errors import SoftpromptError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SoftpromptError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


if __name__ == "__main__":
    sys.exit(main())
