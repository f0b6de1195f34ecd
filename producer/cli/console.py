"""The command line's consoles, its error lines and exit codes, and Ctrl-C: what only a
command line does (the Python API below it raises and never prints or exits)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

# Not a terminal (a pipe, a log, CI): no width to fit, so never wrap or cut a path or an id.
out = Console() if sys.stdout.isatty() else Console(width=1 << 14)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=1 << 14)
DEBUG = [False]  # --debug: unexpected errors show their traceback


class Fail(Exception):
    """A clear, user-facing failure of the command line itself: printed in red, exit code
    ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def error(message: str) -> None:
    """Print ``error: message`` on stderr as one logical line (markup in it is not parsed)."""
    err.print("[red]error:[/red] " + escape(message), soft_wrap=True, highlight=False)


def notice(text: str, warning: bool = False) -> None:
    """A line on stderr for something the user should know (yellow when a warning)."""
    err.print(f"[yellow]{escape(text)}[/yellow]" if warning else escape(text), highlight=False,
              soft_wrap=True)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn errors into red lines and an exit code (see ``options.EXIT_CODES``; a
    ``MoonbatchError`` carries its own); ``--debug`` shows the traceback of unexpected ones."""
    from moonbatch.errors import MoonbatchError, PreflightError, translated
    from moonbatch.workers.storage import StorageError

    try:
        with translated():  # the producer's own errors as the API's
            yield
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Fail as exc:
        error(str(exc))
        raise typer.Exit(exc.code) from None
    except PreflightError as exc:
        for problem in exc.problems:
            error(problem)
        raise typer.Exit(exc.exit_code) from None
    except MoonbatchError as exc:
        error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except (ValueError, StorageError) as exc:
        error(" ".join(str(exc).split()))
        raise typer.Exit(2 if isinstance(exc, ValueError) else 1) from None
    except Exception as exc:
        if DEBUG[0]:
            raise
        text = " ".join(str(exc).split())[:300]
        error(f"{type(exc).__name__}: {text} (moonbatch --debug ... shows the traceback)")
        raise typer.Exit(1) from None


@contextlib.contextmanager
def interruptible(where: dict[str, Any]) -> Iterator[None]:
    """Ctrl-C handling for commands that follow a run: the first Ctrl-C stops following (local
    workers get a warm shutdown), says what is still in flight and how to go on, and exits 130;
    a second one kills the local workers and exits at once. ``where`` holds the run's
    ``output`` (once known) and the ``workers`` count to suggest."""
    from moonbatch.producer.local import RUNNING

    presses = [0]

    def on_sigint(signum, frame) -> None:  # noqa: ANN001
        presses[0] += 1
        if presses[0] == 1:
            err.print("\ninterrupted: stopping (Ctrl-C again to stop at once)", highlight=False)
            raise KeyboardInterrupt
        for workers in list(RUNNING):
            with contextlib.suppress(OSError):
                os.killpg(workers.proc.pid, signal.SIGKILL)
        sys.stderr.write("stopped at once\n")
        sys.stderr.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except KeyboardInterrupt:
        err.print(in_flight_note(where), highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGINT, previous)


def in_flight_note(where: dict[str, Any]) -> str:
    """What an interrupted command leaves behind, and the command that continues it."""
    from moonbatch.config import get_settings
    from moonbatch.producer import ops
    from moonbatch.workers import layout
    from moonbatch.workers.runstate import open_output
    from moonbatch.workers.storage import get_json_or_none

    output = where.get("output")
    if output is None:
        return "interrupted before the run started: nothing was written"
    n = where.get("workers")
    flag = f" --workers {n}" if n else " --workers N"
    try:
        settings = get_settings()
        spec = get_json_or_none(open_output(output, settings), layout.SPEC)
        if spec is None:
            return f"interrupted before the run started: nothing was written to {output}"
        run_id = spec["run_id"]
        snap = ops.snapshot(output, settings)
    except Exception as exc:  # say what we can; the run id is still useful
        return (f"interrupted; the state of the run at {output} could not be read "
                f"({type(exc).__name__}): see `moonbatch status {output}`")
    c, s = snap["counts"], snap["shards"]
    if snap["status"] == "completed":
        return f"interrupted: run {run_id} is complete (moonbatch status {run_id})"
    if s["total"] is None:
        return (f"interrupted while planning run {run_id}: {s['in_flight']} shard(s) with "
                f"batches out at the API; continue it with `moonbatch resume {run_id}{flag}` "
                f"(or run the same command again)")
    return (f"interrupted: run {run_id} goes on without this process: {s['in_flight']} "
            f"shard(s) with batches out at the API (they run on and are billed), "
            f"{s['merged']}/{s['total']} shard(s) merged, {c['done']}/{c['total']} items done; "
            f"continue it with `moonbatch resume {run_id}{flag}`")
