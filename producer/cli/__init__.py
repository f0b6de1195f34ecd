"""The ``moonbatch`` command line (typer + rich), one module per command group over the Python
API (``moonbatch.api``, ``moonbatch.producer.ops``): ``run`` (run, submit), ``inspect``
(status, runs, wait), ``repair`` (resume, retry-failed, cancel, clean), ``tools`` (demo,
emulator, flower); ``options`` declares every option once, ``render`` shows runs, ``console``
maps errors to exit codes. See README "Command line"."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import signal
import sys
import threading
from typing import Annotated

import typer

from moonbatch.producer.cli.options import ENVIRONMENT, EXIT_CODES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Annotate image datasets with Moondream models (the Moondream Batch "
                  "API or fal.ai), at scale.",
                  epilog=f"""\b
Examples:
  moonbatch run s3://photos/2024/ s3://annotations/2024-captions/ --skill caption
  moonbatch submit s3://photos/ s3://out/q1/ --skill query --question "Is it indoors?"
  moonbatch run s3://photos/ s3://out/c/ --provider fal --dry-run   # items, shards, cost
  moonbatch status RUN_ID        moonbatch resume RUN_ID --workers 4

{ENVIRONMENT}

{EXIT_CODES}""")


def _print_version(value: bool) -> None:
    """``--version``: print the installed version and exit 0."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        print(f"moonbatch {dist_version('moonbatch')}")
    except PackageNotFoundError:
        print("moonbatch (not installed)")
    raise typer.Exit(0)


@app.callback()
def _global(version: Annotated[bool, typer.Option(
                "--version", is_eager=True, callback=_print_version,
                help="print moonbatch's version and exit")] = False,
            debug: Annotated[bool, typer.Option(
                "--debug", envvar="MOONBATCH_DEBUG", show_envvar=True,
                help="show the traceback of unexpected errors")] = False) -> None:
    """Annotate image datasets with the Moondream Batch API, at scale."""
    from moonbatch.producer.cli.console import DEBUG

    DEBUG[0] = debug


# httpcore (under httpx, which the command groups import) imports trio whenever it is
# installed, only to serve trio's event loop; the command line runs no event loop (moonbatch
# has no async client), yet an environment with trio would pay 0.1-0.2 s of every command's
# start for it, before any check or send. None in sys.modules makes ``import trio`` raise the
# ImportError httpcore expects (trio = None).
sys.modules.setdefault("trio", None)  # type: ignore[arg-type]

# The command groups register their commands on ``app``, in help's order.
for _group in ("run", "inspect", "repair", "tools"):
    importlib.import_module(f"moonbatch.producer.cli.{_group}")


def _exit_on_signal(signum: int, frame: object) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so `finally` stops the local workers and the embedded
    # broker and deletes temporary files; later ones are ignored so that cleanup completes.
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry point. SIGTERM and SIGHUP exit (code 128 + signal) through the
    same clean-up as Ctrl-C. Exits without the interpreter's teardown (see ``_exit``)."""
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _exit_on_signal)
    try:
        app()
    except SystemExit as exc:
        _exit(exc.code)
    _exit(0)


def _exit(code: object) -> None:
    """Exit with ``code`` (as ``SystemExit`` would: None is 0, text is printed and is 1) once
    the command's own clean-up ran (its ``finally`` blocks, then the threads it left and the
    ``atexit`` handlers, as the interpreter would), but without tearing the interpreter down:
    freeing every module and object of boto3, Celery and pydantic took 0.4 s on a 2-core
    machine, after the command's work was done and its output written."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    for thread in threading.enumerate():  # what the interpreter joins first
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # logging's flush among them
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
