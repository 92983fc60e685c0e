"""What every command does alike: its parser, its `--providers` option, its log lines, and what it does when
something goes wrong.

Errors are one `error: ...` line and exit status 1; a usage error is argparse's, exit 2; Ctrl-C
(or SIGTERM) is one line and 130, as a shell reports an interrupted program; a closed pipe
(`run-model ... | head`) ends quietly with 141, the status of a program killed by SIGPIPE. No
traceback reaches a user unless SOFTPROMPT_DEBUG=1 asks for one. Every command's parser is a
`Parser`, which says "did you mean --max-new-tokens?" for `--max_new_tokens`.

Log lines (a task that fails to load, a request served) go to stderr as `warning: ...`, `info: ...`.

Needs nothing beyond the standard library; it lives here because every room's command imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from .errors import SoftpromptError, unexpected

INTERRUPTED = 130
CLOSED_PIPE = 141


def run_command(run: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run a command's work; what goes wrong becomes one line on stderr and the matching exit status
    (`interrupted` is the line for Ctrl-C: what was left as it was, where that matters)."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # Whoever read our output has gone: say nothing, and keep Python from complaining when it flushes stdout.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return CLOSED_PIPE
    except (SoftpromptError, OSError) as exc:
        print(f"error: {describe(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # still one line; SOFTPROMPT_DEBUG=1 shows where
        if os.environ.get("SOFTPROMPT_DEBUG"):
            raise
        print(unexpected(exc), file=sys.stderr)
        return 1


def describe(exc: BaseException) -> str:
    """An error as a sentence: an OSError as `PATH: reason` (not Python's `[Errno 2] ...: 'PATH'`)."""
    if isinstance(exc, OSError) and not isinstance(exc, SoftpromptError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror.lower()}" if where else exc.strerror.lower()
    return str(exc)


def stop_on_sigterm() -> None:
    """SIGTERM ends the command as Ctrl-C does (its `finally` blocks run, then exit 130), replacing any handler a
    library installed (Ray's prints C++ stack frames and leaves its cleanup undone)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


class Parser(argparse.ArgumentParser):
    """argparse's parser, naming the option meant when one is typed with underscores (`--max_new_tokens`)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        parsed, extras = super().parse_known_args(args, namespace)
        for extra in extras:
            option = extra.split("=", 1)[0]
            fixed = option.replace("_", "-")
            if option.startswith("--") and fixed != option and fixed in self._option_string_actions:
                self.error(f"unrecognized argument {option}; did you mean {fixed}?")
        return parsed, extras


def add_providers_option(parser: argparse.ArgumentParser) -> None:
    """--providers, parsed into the list `load` takes; shared by every command that loads an export."""
    parser.add_argument(
        "--providers",
        type=lambda value: value.split(","),
        default=None,
        help="comma-separated onnxruntime providers, e.g. cpu or cuda (default: CUDA if available, else CPU)",
    )


def log_to_stderr(level: int = logging.WARNING) -> None:
    """The runtime's log lines (a task that fails to load, a swapped task) on stderr as `warning: ...` lines."""
    logger = logging.getLogger("softprompt")
    logger.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_LevelFormatter())
        logger.addHandler(handler)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (a test's capture, a redirected stream)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"
