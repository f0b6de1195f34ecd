"""The ``moonbatch`` command line (typer + rich). See README "Command line"."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

EXIT_CODES = """\b
Exit codes:
  0    done: the run is complete (or was already), or the command did what it says
  1    the run failed, was cancelled or cannot complete (the message says why)
  2    usage: a bad option, argument or setting
  3    a check before work failed (broker, API key, INPUT, OUTPUT, state location),
       or OUTPUT holds another or an unfinished run; nothing was written
  4    --timeout reached; the run goes on (moonbatch wait RUN_ID)
  130  interrupted (Ctrl-C); the run goes on (moonbatch resume RUN_ID --workers N)"""

ENVIRONMENT = """\b
Environment (README "Configuration" lists every variable):
  MOONBATCH_PROVIDER         the default --provider: moondream (default) or fal
  MOONDREAM_API_KEY          the Moondream API key (--provider moondream)
  FAL_KEY                    the fal.ai key (--provider fal)
  MOONBATCH_BROKER_URL       Celery broker (default redis://127.0.0.1:6379/0)
  MOONBATCH_STATE_URL        run registry: a directory or s3://bucket/prefix/ (~/.moonbatch/)
  MOONBATCH_S3_ENDPOINT_URL  S3-compatible endpoint (MinIO, R2); AWS credentials as boto3 reads them"""

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
# Not a terminal (a pipe, a log, CI): no width to fit, so never wrap or cut a path or an id.
out = Console() if sys.stdout.isatty() else Console(width=1 << 14)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=1 << 14)
DEBUG = False  # --debug: unexpected errors show their traceback

SkillOpt = Annotated[Optional[list[str]], typer.Option(
    "--skill", metavar="SKILL", help="caption | query | detect | point (default caption); "
    "repeat it for several skills in one run: each image is sent once per skill and its row "
    "holds every skill's result under the skill's name")]
LengthOpt = Annotated[Optional[str], typer.Option(
    "--length", metavar="TEXT", help="caption length: short | normal | long (caption; default "
    "normal)")]
QuestionOpt = Annotated[Optional[str], typer.Option(
    "--question", metavar="TEXT", help="the question to ask of each image (query; required)")]
ObjectOpt = Annotated[Optional[str], typer.Option(
    "--object", metavar="TEXT", help="what to find, e.g. \"face\" (detect, point; required)")]
ReasoningOpt = Annotated[Optional[bool], typer.Option(
    "--reasoning/--no-reasoning", help="chain of thought before the answer (query; default: the "
    "API's, on)")]
TemperatureOpt = Annotated[Optional[float], typer.Option(
    "--temperature", metavar="FLOAT", help="sampling temperature, 0 to 1 (caption, query; "
    "default: the API's)")]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", metavar="FLOAT", help="nucleus sampling probability, 0 to 1 (caption, query; "
    "default: the API's)")]
MaxTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-tokens", metavar="INTEGER", help="most tokens in an answer (caption, query; default: "
    "the API's)")]
ShardSizeOpt = Annotated[Optional[int], typer.Option(
    "--shard-size", metavar="INTEGER", help="most images per shard (a batch of the Batch API), "
    "1 to 100000 (default 10000, or MOONBATCH_SHARD_SIZE)")]
ProviderOpt = Annotated[Optional[str], typer.Option(
    "--provider", metavar="NAME", help="who annotates: moondream (the Moondream Batch API) | "
    "fal (fal.ai's queue API) (default: MOONBATCH_PROVIDER, else moondream)")]
EndpointOpt = Annotated[Optional[str], typer.Option(
    "--endpoint", metavar="ID", help="the fal endpoint (--provider fal only; default "
    "fal-ai/moondream3-preview/<skill>; README \"Providers\" lists them and their options)")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="list and plan INPUT as a run would and print items, shards, requests, "
    "bytes, tokens and the estimated cost; write nothing, send nothing, need no key")]
DryRunJsonOpt = Annotated[bool, typer.Option(
    "--json", help="with --dry-run: print the estimate as JSON")]
MaxPixelsOpt = Annotated[Optional[int], typer.Option(
    "--max-pixels", metavar="INTEGER", help="downscale images above this many pixels; 0 sends "
    "full resolution (default 2000000, or MOONBATCH_MAX_PIXELS)")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", metavar="INTEGER", help="local worker processes started for the duration of "
    "the command (default: one per core); 0 uses a running fleet")]
FollowWorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", metavar="INTEGER", help="start INTEGER local worker processes and follow the "
    "run to the end, as `run` does (default: none; a running fleet does the work)")]
TimeoutOpt = Annotated[Optional[float], typer.Option(
    "--timeout", metavar="SECONDS", help="stop waiting after SECONDS and exit 4; the run goes "
    "on (follow it with `moonbatch wait RUN_ID`) (default: wait until it is final)")]
EmbeddedBrokerOpt = Annotated[bool, typer.Option(
    "--embedded-broker", help="start a private broker (a redis-server of this command's own) for "
    "the local workers: no Redis needed (same as MOONBATCH_BROKER_URL=embedded)")]
AllowEmptyOpt = Annotated[bool, typer.Option(
    "--allow-empty", help="accept an INPUT with no objects (a run of 0 images) instead of "
    "failing the check before work")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="if OUTPUT holds a run of another command (or a cancelled or failed one), "
    "start a new run in OUTPUT/<new run id>/ instead of refusing")]


InputFormatOpt = Annotated[str, typer.Option(
    "--input-format", metavar="FORMAT", help="how INPUT is read: auto (by its form: a prefix "
    "of images, a .csv/.jsonl/.parquet manifest, a WebDataset .tar, a Parquet file of image "
    "bytes) | prefix | manifest | webdataset | parquet (e.g. webdataset for a prefix of .tar "
    "shards)")]
IdColumnOpt = Annotated[Optional[str], typer.Option(
    "--id-column", metavar="NAME", help="manifest or Parquet input: the column of item ids "
    "(default id)")]
ImageColumnOpt = Annotated[Optional[str], typer.Option(
    "--image-column", metavar="NAME", help="manifest or Parquet input: the column of images "
    "(default image): an s3:// URI, a key relative to --base, a local path or an http(s) URL; "
    "for Parquet, the image bytes")]
BaseOpt = Annotated[Optional[str], typer.Option(
    "--base", metavar="URL", help="manifest input: where relative image keys are (default: "
    "the manifest's folder)")]
SkipExistingOpt = Annotated[Optional[str], typer.Option(
    "--skip-existing", metavar="PREVIOUS_OUTPUT", help="annotate only items without an ok row "
    "in the results of the run at PREVIOUS_OUTPUT (its OUTPUT URL or run id), e.g. images "
    "added since")]
FormatOpt = Annotated[str, typer.Option(
    "--format", metavar="FORMAT", help="results format: jsonl | parquet (results/*.parquet, "
    "one row per item)")]


class URL(str):
    """A store URL argument (its type name is what help shows: ``<URL>``)."""


class TEXT(str):
    """A text argument (help shows ``<TEXT>``)."""


InputArg = Annotated[URL, typer.Argument(metavar="INPUT", parser=URL, help="where the images "
                                         "are: s3://bucket/prefix/ or a local directory")]
OutputArg = Annotated[URL, typer.Argument(metavar="OUTPUT", parser=URL, help="where results "
                                          "go: s3://bucket/prefix/ or a local directory")]
RunRefArg = Annotated[TEXT, typer.Argument(metavar="RUN_ID", parser=TEXT, help="a run id (from "
                                           "the registry at MOONBATCH_STATE_URL) or the run's "
                                           "OUTPUT")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]


def _epilog(*examples: str) -> str:
    """A command's help epilog: its examples (``\\b`` keeps click from rewrapping them), then
    the environment variables and the exit codes."""
    lines = "\n".join(f"  {e}" for e in examples)
    return f"\b\nExamples:\n{lines}\n\n{ENVIRONMENT}\n\n{EXIT_CODES}"


class Fail(Exception):
    """A clear, user-facing failure: printed in red, exit code ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _spec_args(*, shard_size: int | None, max_pixels: int | None, provider: str | None,
               endpoint: str | None, input_format: str = "auto", id_column: str | None = None,
               image_column: str | None = None, base: str | None = None,
               output_format: str = "jsonl", skip_existing: str | None = None
               ) -> dict[str, Any]:
    """The run-shaping options of ``run``/``submit``/``demo`` as ``producer.runs.new_spec``
    takes them (``Fail``, exit 2, for a negative --max-pixels)."""
    _check_max_pixels(max_pixels)
    reader = {k: v for k, v in (("id_column", id_column), ("image_column", image_column),
                                ("base", base)) if v is not None}
    return {"shard_size": shard_size, "max_pixels": max_pixels, "provider": provider,
            "endpoint": endpoint, "input_format": input_format, "input_options": reader,
            "output_format": output_format, "skip_existing": skip_existing}


def _planned(plan: dict[str, Any]) -> str:
    """What a plan holds, for the line ``run``/``submit`` print."""
    text = (f"{plan['items']} images in {plan['shards']} shard(s); {plan['skipped']} other "
            "objects skipped")
    if plan.get("skipped_existing"):
        text += f"; {plan['skipped_existing']} already with an ok row (--skip-existing) left out"
    return text


# Which skills take each option (workers.models.SkillOptions checks the same for one skill).
_TAKEN_BY = {"length": ("caption",), "question": ("query",), "reasoning": ("query",),
             "object": ("detect", "point"), "temperature": ("caption", "query"),
             "top_p": ("caption", "query"), "max_tokens": ("caption", "query")}


def _options(skills: list[str] | str | None, length: str | None, question: str | None,
             obj: str | None, reasoning: bool | None, temperature: float | None,
             top_p: float | None, max_tokens: int | None):
    """The run's ``SkillOptions``, one per ``--skill`` (a list; default caption). Each skill
    gets the options it takes; ``Fail`` (exit 2) for a repeated skill, an option no chosen
    skill takes, or a missing required one."""
    from moonbatch.workers.models import SkillOptions

    names = [skills] if isinstance(skills, str) else list(skills or ["caption"])
    if len(set(names)) < len(names):
        raise Fail(f"--skill {next(n for n in names if names.count(n) > 1)} is given twice: "
                   "each skill once per run", code=2)
    given = {"length": length, "question": question, "object": obj, "reasoning": reasoning,
             "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    try:
        if len(names) == 1:
            return SkillOptions(skill=names[0], **given)
        for key, value in given.items():
            if value is not None and not set(_TAKEN_BY[key]) & set(names):
                flag = "--" + key.replace("_", "-")
                raise Fail(f"{flag} applies to --skill {' and '.join(_TAKEN_BY[key])} only",
                           code=2)
        return [SkillOptions(skill=n, **{k: v for k, v in given.items()
                                         if v is not None and n in _TAKEN_BY[k]})
                for n in names]
    except ValidationError as exc:
        msgs = [str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()]
        raise Fail("; ".join(msgs), code=2) from None


@contextlib.contextmanager
def _cli_errors() -> Iterator[None]:
    """Turn errors into one red line and an exit code (see EXIT_CODES); ``--debug`` shows the
    traceback of unexpected ones."""
    from moonbatch.producer.preflight import PreflightFailed
    from moonbatch.producer.runs import RunExists
    from moonbatch.workers.runstate import RunNotFound
    from moonbatch.workers.storage import StorageError

    try:
        yield
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Fail as exc:
        _error(str(exc))
        raise typer.Exit(exc.code) from None
    except PreflightFailed as exc:
        for problem in exc.problems:
            _error(problem)
        raise typer.Exit(3) from None
    except RunExists as exc:
        _error(str(exc))
        raise typer.Exit(3) from None
    except (RunNotFound, ValueError, StorageError) as exc:
        _error(str(exc))
        raise typer.Exit(2 if isinstance(exc, ValueError) else 1) from None
    except Exception as exc:
        if DEBUG:
            raise
        text = " ".join(str(exc).split())[:300]
        _error(f"{type(exc).__name__}: {text} (moonbatch --debug ... shows the traceback)")
        raise typer.Exit(1) from None


def _error(message: str) -> None:
    """Print ``error: message`` on stderr as one logical line (markup in it is not parsed)."""
    err.print("[red]error:[/red] " + escape(message), soft_wrap=True, highlight=False)


_LOCAL_WORKERS: set[LocalWorkers] = set()


class LocalWorkers:
    """``N`` worker processes (one ``celery -A moonbatch.workers worker`` with concurrency N) for the
    duration of a command, consuming only ``queue`` (the run's private one) and its control
    queue; they inherit
    this process's environment and, on Linux, get SIGTERM if this process dies. ``revive()`` starts them
    again after they died (say, a broker restart kombu did not survive): the run's state is in
    storage, so the new workers carry on where the old ones stopped."""

    max_revivals = 3

    def __init__(self, n: int, queue: str, env: dict[str, str] | None = None) -> None:
        self.n = n
        from moonbatch.workers.runstate import control_queue

        self.cmd = [sys.executable, "-m", "celery", "-A", "moonbatch.workers", "worker", "--concurrency",
                    str(n), "--queues", f"{queue},{control_queue(queue)}", "--loglevel",
                    "WARNING", "--without-mingle",
                    "--without-gossip", "--hostname", f"moonbatch-local-{uuid.uuid4().hex[:8]}@%h"]
        self.env = {**os.environ, **(env or {})}
        self.revivals = 0
        self.log = tempfile.NamedTemporaryFile(prefix="moonbatch-workers-", suffix=".log",
                                               delete=False)
        try:
            self.proc = self._spawn()
        except BaseException:
            self._remove_log()
            raise
        _LOCAL_WORKERS.add(self)  # a second Ctrl-C kills them before exiting

    def _spawn(self) -> subprocess.Popen:
        from moonbatch.workers.embedded import child_setup

        return subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=child_setup())

    def revive(self) -> bool:
        """Start the workers again if they died and revivals are left; True if started."""
        if self.revivals >= self.max_revivals:
            return False
        self.revivals += 1
        self.proc = self._spawn()
        return True

    def dead(self) -> bool:
        """True if the worker process has exited."""
        return self.proc.poll() is not None

    def tail(self, n: int = 20) -> str:
        """The last ``n`` lines of the workers' log."""
        with open(self.log.name, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL after 20 s."""
        _LOCAL_WORKERS.discard(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._remove_log()

    def _remove_log(self) -> None:
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


def _check_fleet(settings) -> None:
    """Fail fast when ``--workers 0`` and no worker answers."""
    from moonbatch.workers.app import app as celery_app

    try:
        replies = celery_app.control.ping(timeout=2.0, limit=1)  # returns on the first reply
    except Exception as exc:
        raise Fail(f"cannot reach the broker at {_safe_url(settings.broker_url)}: {exc}") from None
    if not replies:
        raise Fail("no worker answered: start a fleet (celery -A moonbatch.workers worker) or use --workers N")


def _check_broker(settings) -> None:
    """Fail fast, with the way out, when the configured broker cannot be reached."""
    from moonbatch.workers.app import app as celery_app

    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
    except Exception as exc:
        raise Fail(f"cannot reach the broker at {_safe_url(settings.broker_url)} "
                   f"({type(exc).__name__}): start it, or run with a private broker of this "
                   "command's own: --embedded-broker (or MOONBATCH_BROKER_URL=embedded)") from None


def _no_embedded(settings, what: str) -> None:
    """``embedded`` names a broker private to one ``moonbatch run``: nothing else can use it."""
    from moonbatch.workers.embedded import EMBEDDED

    if settings.broker_url == EMBEDDED:
        raise Fail(f"MOONBATCH_BROKER_URL=embedded is a broker private to one `moonbatch run` "
                   f"with local workers; {what} needs a shared broker (a redis:// URL)", code=2)


@contextlib.contextmanager
def _embedded_broker() -> Iterator[None]:
    """Start a private ``redis-server`` (``moonbatch.workers.embedded``) and point this process's
    settings, and the workers it starts, at it; stop it and delete its folder on exit."""
    from moonbatch.config import reload_settings
    from moonbatch.workers.app import reconfigure
    from moonbatch.workers.embedded import EmbeddedRedis, NoRedisServer

    saved = {k: os.environ.get(k) for k in ("MOONBATCH_BROKER_URL", "MOONBATCH_RESULT_BACKEND")}
    server = EmbeddedRedis()
    try:
        server.start()
    except NoRedisServer as exc:
        raise Fail(str(exc)) from None
    if server.note:  # the fallback broker, said in one line
        err.print(server.note, highlight=False, markup=False)
    try:
        os.environ.update(MOONBATCH_BROKER_URL=server.url(0), MOONBATCH_RESULT_BACKEND=server.url(1))
        reconfigure(reload_settings())
        yield
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reconfigure(reload_settings())


def _safe_url(url: str) -> str:
    from moonbatch.producer.preflight import safe_url

    return safe_url(url)


def _watch(output: str, settings, *, workers: LocalWorkers | None, timeout: float | None,
           show: bool = True) -> dict[str, Any]:
    """Follow a run until it is final; show a progress bar. Raises ``Fail`` if it cannot
    complete (failure recorded, workers died, timeout).

    With local ``workers`` this process also runs the reconciler for the run every
    ``reconcile_interval`` seconds, as a fleet's beat does, so a run started from a laptop heals
    from lost messages and a broker that restarted empty the same way.
    """
    from moonbatch.workers.runstate import Progress as RunProgress
    from moonbatch.workers.runstate import open_output

    store = open_output(output, settings)
    progress = RunProgress(store)
    start = time.time()
    reconciled = start
    # Without local workers a fleet must consume the run's queues: look, and say so if not.
    watch = _consumer_watch(output, settings) if workers is None else None
    announced: set[str] = set()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn()]
    with Progress(*columns, console=err, disable=not show, transient=False) as bar, \
            watch or contextlib.nullcontext():
        task = bar.add_task("planning", total=None, note="")
        while True:
            snap = progress.snapshot()
            if watch is not None:
                announced = _announce_consumers(watch, announced, snap["run_id"])
            c, s = snap["counts"], snap["shards"]
            bar.update(task, total=c["total"], completed=c["done"] + c["in_flight"],
                       description="planning" if s["total"] is None else "annotating",
                       note=f"shards {s['merged']}/{s['total'] if s['total'] is not None else '?'}"
                            f"  ok {c['ok']}  error {c['error']}")
            if snap["status"] == "completed":
                return snap
            if snap["status"] == "cancelled":
                raise Fail(f"run {snap['run_id']} was cancelled")
            if snap["failure"]:
                f = snap["failure"]
                raise Fail(f"run {snap['run_id']} cannot complete: {f['where']}: {f['error']}")
            if workers is not None and workers.dead():
                code = workers.proc.returncode
                if not workers.revive():
                    raise Fail("the local worker processes exited:\n" + workers.tail())
                err.print(f"[yellow]the local worker processes exited (code {code}); started "
                          f"them again ({workers.revivals}/{workers.max_revivals})[/yellow]")
            if workers is not None and time.time() - reconciled >= settings.reconcile_interval:
                reconciled = time.time()
                _reconcile(output, snap["run_id"])
            if timeout is not None and time.time() - start > timeout:
                raise Fail(f"run {snap['run_id']} not complete after {timeout:.0f}s; it goes on: "
                           f"moonbatch wait {snap['run_id']}", code=4)
            age = time.time() - start  # each look lists the run's state: back off as it ages
            time.sleep(0.2 if age < 10 else 2.0 if age < 600 else 10.0)


def _run_queues(output: str, settings) -> list[str]:
    """The run's two broker queues: its queue (builds, merges) and its control queue (polls,
    finalising). Raises ``RunNotFound`` and storage errors."""
    from moonbatch.workers.runstate import control_queue, open_run, run_queue

    queue = run_queue(open_run(output, settings).spec, settings)
    return [queue, control_queue(queue, settings)]


def _consumer_watch(output: str, settings):
    """A ``moonbatch.workers.consumers.ConsumerWatch`` over the run's queues, not yet started; None when
    there is no shared broker to ask (embedded) or the run's spec cannot be read."""
    from moonbatch.workers.app import app as celery_app
    from moonbatch.workers.consumers import ConsumerWatch
    from moonbatch.workers.embedded import EMBEDDED

    if settings.broker_url == EMBEDDED:
        return None
    try:
        queues = _run_queues(output, settings)
    except Exception:  # no spec to read: nothing to name; the run's state says the rest
        return None
    return ConsumerWatch(celery_app, queues, first=1.0, recheck=2.0, every=30.0)


def _announce_consumers(watch, announced: set[str], run_id: str) -> set[str]:
    """Print, once each time it happens, that a queue of the run lost (or found) its consumers;
    returns the queues announced as without one (the next call's ``announced``)."""
    missing = watch.unconsumed()
    if set(missing) - announced:
        err.print("[yellow]" + escape(_no_consumer_text(missing, watch.queues, run_id))
                  + "; still waiting[/yellow]", highlight=False, soft_wrap=True)
    back = [q for q in watch.queues if q in announced and q not in missing]
    if back:
        err.print(f"a worker now consumes {', '.join(back)}", highlight=False, soft_wrap=True)
    return set(missing)


def _no_consumer_text(missing: list[str], queues: list[str], run_id: str) -> str:
    """One line: which of the run's ``queues`` (its queue and control queue) no worker
    consumes, what waits there, and the command that serves them."""
    from moonbatch.producer.runs import local_queue

    what = dict(zip(queues, ("its builds and merges", "its polls and finalising"), strict=False))
    names = "; ".join(f"{q} ({what.get(q, 'its work')} wait there)" for q in missing)
    text = (f"no worker consumes {'queue' if len(missing) == 1 else 'queues'} {names} of run "
            f"{run_id}: start workers with: celery -A moonbatch.workers worker -Q {','.join(queues)}")
    if queues and queues[0] == local_queue(run_id):  # the private queues of `moonbatch run`
        text += f" (or follow it with local workers: moonbatch wait {run_id} --workers N)"
    return text


def _reconcile(output: str, run_id: str) -> None:
    """One reconciler pass over the run (see ``moonbatch.workers.tasks.reconcile``); a broker that is
    down for now is tried again at the next pass."""
    from moonbatch.workers.tasks import reconcile_active_run

    try:
        lost, counts = reconcile_active_run(output, run_id)
        if lost:
            err.print(f"the broker lost its data: re-enqueued the work of run {run_id} "
                      f"({', '.join(f'{n} {a}' for a, n in sorted(counts.items())) or 'nothing left'})")
    except Exception as exc:
        err.print(f"[yellow]reconcile of run {run_id} failed for now:[/yellow] "
                  f"{type(exc).__name__}: {str(exc)[:200]}")


def _provider_text(doc: dict[str, Any]) -> str:
    """``moondream (Batch API)`` or ``fal (<endpoint>)`` for a snapshot, summary or dry run
    (runs recorded before providers existed are Batch API runs)."""
    provider = doc.get("provider") or "moondream"
    if provider == "moondream":
        return "moondream (Batch API)"
    return f"{provider} ({doc.get('endpoint') or 'default endpoint'})"


def _at(doc: dict[str, Any]) -> str:
    """Where a run's work in flight is: ``the API`` (Batch API) or ``fal``."""
    return "the API" if (doc.get("provider") or "moondream") == "moondream" else doc["provider"]


def _print_summary(snap: dict[str, Any]) -> None:
    """The run's summary as a two-column table on stdout; paths fold, never cut."""
    c = snap["counts"]
    skipped = c["skipped"]
    if skipped:
        skipped = f"{skipped} (list them: moonbatch status {snap['run_id']} --skipped)"
    out_of = sum(1 for b in snap["batches"] if not b.get("merged", True))
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in (("run", snap["run_id"]), ("status", snap["status"]),
                 ("provider", _provider_text(snap)), ("skill", snap["skill"]),
                 ("items", c["total"]), ("ok", c["ok"]), ("error", c["error"]),
                 ("skipped (not images)", skipped),
                 (("requests", sum(b.get("requests") or 0 for b in snap["batches"]))
                  if snap.get("provider") == "fal" else
                  ("batches", len(snap["batches"]) if not out_of
                   else f"{len(snap['batches'])} ({out_of} at {_at(snap)})")),
                 ("tokens in/out", f"{snap['usage']['input_tokens']}/{snap['usage']['output_tokens']}"),
                 ("wall time", f"{snap['timings'].get('wall_seconds', 0):.1f}s"),
                 ("results", snap["output"] + "results/"), ("summary", snap["output"] + "run.json")):
        table.add_row(str(k), str(v))
    out.print(table)


def _check_max_pixels(max_pixels: int | None) -> None:
    """``--max-pixels`` is 0 or more (exit 2 otherwise)."""
    if max_pixels is not None and max_pixels < 0:
        raise Fail("--max-pixels must be >= 0 (0 turns downscaling off)", code=2)


def _run(spec, *, workers: int | None, timeout: float | None, embedded: bool = False
         ) -> dict[str, Any]:
    """Start ``spec`` (a ``RunSpec`` from ``_start_checks``) and follow it to the end (see
    ``run``); with ``workers`` > 0 start that many local workers on the run's private queue,
    and with ``embedded`` (or ``MOONBATCH_BROKER_URL=embedded``) a private broker too. Raises
    ``Fail``."""
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import local_queue, start_run
    from moonbatch.workers.embedded import EMBEDDED

    settings = get_settings()
    n = (os.cpu_count() or 1) if workers is None else workers
    if n < 0:
        raise Fail("--workers must be >= 0", code=2)
    embedded = embedded or settings.broker_url == EMBEDDED
    if embedded and n == 0:
        raise Fail("an embedded broker serves only this command's own workers: use --workers N "
                   "(N > 0), or a shared broker for a fleet", code=2)
    run_id, output_url = spec.run_id, spec.output
    with _embedded_broker() if embedded else contextlib.nullcontext():
        settings = get_settings()
        if n == 0:
            _check_fleet(settings)
        else:
            _check_broker(settings)
        # Local workers consume only this run's queue: they never take a fleet's work, and a
        # fleet never takes theirs (with credentials or an API key it may not have).
        queue = local_queue(run_id) if n > 0 else None
        local = LocalWorkers(n, queue) if queue else None
        try:
            plan = start_run(spec.model_copy(update={"queue": queue}) if queue else spec,
                             settings)
            if local is not None and plan["run_id"] != run_id:
                # A dead start of the same command was taken over: its spec names its queue.
                from moonbatch.workers.runstate import open_run, run_queue

                local.stop()
                local = LocalWorkers(n, run_queue(open_run(output_url, settings).spec, settings))
            err.print(f"run [bold]{plan['run_id']}[/bold]: {_planned(plan)}")
            return _watch(output_url, settings, workers=local, timeout=timeout)
        finally:
            if local is not None:
                local.stop()


def _start_checks(settings, opts, input_url: str, output_url: str, *, spec_args: dict[str, Any],
                  allow_empty: bool, force: bool, broker: bool = True):
    """Everything a start checks before it writes: option ranges and what the provider and
    endpoint serve (``ValueError``/``Fail``, exit 2), what OUTPUT holds (``AlreadyComplete``;
    ``RunExists``, or with ``force`` a new OUTPUT/<run id>/) and the preflight, with the
    provider's credentials (``PreflightFailed``). Returns the ``RunSpec`` to start."""
    from moonbatch.producer import preflight
    from moonbatch.producer.runs import AlreadyComplete, RunExists, check_output_for, new_run_id, new_spec

    spec = new_spec(input_url, output_url, opts, settings, **spec_args)
    try:
        check_output_for(preflight.quick_store(spec.output, settings), spec)
    except AlreadyComplete:
        raise
    except RunExists as exc:
        if not force or exc.state == "planning":
            raise
        run_id = new_run_id()
        err.print(f"{spec.output} holds run {exc.run_id} ({exc.state}); --force: starting run "
                  f"{run_id} in {spec.output}{run_id}/", highlight=False)
        spec = spec.model_copy(update={"output": spec.output + run_id + "/", "run_id": run_id})
    except Exception:
        pass  # OUTPUT cannot be read: the preflight below says why, in one line
    preflight.preflight(settings, input_url=spec.input, output_url=spec.output,
                        allow_empty=allow_empty, broker=broker, provider=spec.provider)
    return spec


def _dry_run(settings, opts, input_url: str, output_url: str, *, spec_args: dict[str, Any],
             allow_empty: bool, as_json: bool) -> None:
    """``--dry-run``: check the options and INPUT, list and plan INPUT as a run would
    (``producer.runs.dry_run``) and print what it would send and cost. Writes nothing, reaches
    no broker, registry or provider, needs no key."""
    from moonbatch.producer import preflight
    from moonbatch.producer.runs import dry_run, new_spec

    spec = new_spec(input_url, output_url, opts, settings, **spec_args)
    preflight.preflight(settings, input_url=spec.input, allow_empty=allow_empty, broker=False,
                        api_key=False, state=False)
    report = dry_run(spec, settings)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_dry_run(report)


def _size(n: int) -> str:
    """Bytes as ``1,234,567 (1.2 MB)``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.1f} {unit})"
    return f"{n:,}"


def _print_dry_run(report: dict[str, Any]) -> None:
    """A dry run's report as a two-column table on stdout (see ``producer.runs.dry_run``)."""
    batch_api = report["provider"] == "moondream"
    cost = report["cost_usd"]
    rows: list[tuple[str, Any]] = [
        ("provider", _provider_text(report)), ("skill", report["skill"]),
        ("input", report["input"]), ("items", f"{report['items']:,}"),
        ("skipped (not images)", f"{report['skipped']:,}"),
        *([("skipped (ok in " + report["skip_existing"] + ")", f"{report['skipped_existing']:,}")]
          if report.get("skip_existing") else []),
        ("shards", f"{report['shards']:,}"),
        ("batches" if batch_api else "requests", f"{report['requests']:,}"),
        ("image bytes", _size(report["image_bytes"])),
        ("upload bytes", _size(report["upload_bytes"])
         + (" (images go as presigned URLs)" if not batch_api and not report["upload_bytes"]
            and report["input"].startswith("s3://") else ""))]
    if report["input_tokens"] is not None:
        rows.append(("input tokens (estimate)", f"{report['input_tokens']:,}"))
        rows.append(("output tokens (estimate)", f"{report['output_tokens']:,}"))
    if report["compute_seconds"] is not None:
        rows.append(("compute seconds (estimate)", f"{report['compute_seconds']:,.0f}"))
    rows.append(("cost (USD, estimate)", "no published price" if cost is None
                 else f"${cost:,.4f}" if cost < 1 else f"${cost:,.2f}"))
    rows.append(("basis", report["basis"]))
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, str(v))
    err.print("dry run: nothing was written and nothing was sent", highlight=False)
    out.print(table)


def _already_complete(done, settings) -> None:
    """Say so and print the run's summary (``done`` is ``AlreadyComplete``)."""
    err.print(str(done), highlight=False, soft_wrap=True)
    summary = done.summary if done.summary and "counts" in done.summary else None
    if summary is None:
        from moonbatch.workers.runstate import Progress as RunProgress
        from moonbatch.workers.runstate import open_output

        summary = RunProgress(open_output(done.summary["output"], settings)).snapshot()
    _print_summary(summary)


@contextlib.contextmanager
def _interruptible(where: dict[str, Any]) -> Iterator[None]:
    """Ctrl-C handling for commands that follow a run: the first Ctrl-C stops following (local
    workers get a warm shutdown), says what is still in flight and how to go on, and exits 130;
    a second one kills the local workers and exits at once. ``where`` holds the run's
    ``output`` (once known) and the ``workers`` count to suggest."""
    presses = [0]

    def on_sigint(signum, frame) -> None:  # noqa: ANN001
        presses[0] += 1
        if presses[0] == 1:
            err.print("\ninterrupted: stopping (Ctrl-C again to stop at once)", highlight=False)
            raise KeyboardInterrupt
        for workers in list(_LOCAL_WORKERS):
            with contextlib.suppress(OSError):
                os.killpg(workers.proc.pid, signal.SIGKILL)
        sys.stderr.write("stopped at once\n")
        sys.stderr.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except KeyboardInterrupt:
        err.print(_in_flight_note(where), highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGINT, previous)


def _in_flight_note(where: dict[str, Any]) -> str:
    """What an interrupted command leaves behind, and the command that continues it."""
    from moonbatch.config import get_settings
    from moonbatch.workers import layout
    from moonbatch.workers.runstate import Progress as RunProgress
    from moonbatch.workers.runstate import open_output
    from moonbatch.workers.storage import get_json_or_none

    output = where.get("output")
    if output is None:
        return "interrupted before the run started: nothing was written"
    n = where.get("workers")
    flag = f" --workers {n}" if n else " --workers N"
    try:
        store = open_output(output, get_settings())
        spec = get_json_or_none(store, layout.SPEC)
        if spec is None:
            return f"interrupted before the run started: nothing was written to {output}"
        run_id = spec["run_id"]
        snap = RunProgress(store).snapshot()
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
    global DEBUG
    DEBUG = debug


@app.command(epilog=_epilog(
    "moonbatch run s3://photos/2024/ s3://annotations/2024/ --skill caption --length short",
    "moonbatch run ./images ./out --skill query --question \"Is there a dog?\" --workers 4",
    "moonbatch run s3://b/in/ s3://b/out/ --skill detect --object face --workers 0  # a fleet",
    "moonbatch run s3://b/in/ s3://b/out/ --timeout 3600 || moonbatch wait RUN_ID",
    "moonbatch run s3://b/in/ s3://b/out/ --provider fal --endpoint fal-ai/moondream/batched "
    "--skill query --question \"Is it a cat?\"",
    "moonbatch run s3://b/in/ s3://b/out/ --provider fal --dry-run   # what it would cost"))
def run(input: InputArg, output: OutputArg,
        skill: SkillOpt = None, length: LengthOpt = None, question: QuestionOpt = None,
        object: ObjectOpt = None, reasoning: ReasoningOpt = None,
        temperature: TemperatureOpt = None, top_p: TopPOpt = None,
        max_tokens: MaxTokensOpt = None, shard_size: ShardSizeOpt = None,
        max_pixels: MaxPixelsOpt = None, provider: ProviderOpt = None,
        endpoint: EndpointOpt = None, input_format: InputFormatOpt = "auto",
        id_column: IdColumnOpt = None, image_column: ImageColumnOpt = None,
        base: BaseOpt = None, output_format: FormatOpt = "jsonl",
        skip_existing: SkipExistingOpt = None, workers: WorkersOpt = None,
        timeout: TimeoutOpt = None, allow_empty: AllowEmptyOpt = False,
        force: ForceOpt = False, embedded_broker: EmbeddedBrokerOpt = False,
        dry_run: DryRunOpt = False, as_json: DryRunJsonOpt = False) -> None:
    """Annotate every image under INPUT and write the results under OUTPUT; exit 0 when every
    image has a result (ok or error).

    Checks the broker, the provider's key, INPUT and OUTPUT before writing anything. The same
    command again after success exits 0 ("already complete"); after an interrupted start it
    starts again; for an unfinished run it says to `moonbatch resume RUN_ID`. With --dry-run,
    only lists and plans INPUT and prints what the run would send and cost.
    """
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import AlreadyComplete
    from moonbatch.workers.embedded import EMBEDDED

    where: dict[str, Any] = {"workers": workers if workers is not None else os.cpu_count()}
    with _cli_errors(), _interruptible(where):
        opts = _options(skill, length, question, object, reasoning, temperature, top_p, max_tokens)
        spec_args = _spec_args(shard_size=shard_size, max_pixels=max_pixels, provider=provider,
                               endpoint=endpoint, input_format=input_format,
                               id_column=id_column, image_column=image_column, base=base,
                               output_format=output_format, skip_existing=skip_existing)
        settings = get_settings()
        if as_json and not dry_run:
            raise Fail("--json applies to --dry-run only: add --dry-run, or leave --json out",
                       code=2)
        if dry_run:
            _dry_run(settings, opts, input, output, spec_args=spec_args,
                     allow_empty=allow_empty, as_json=as_json)
            return
        embedded = embedded_broker or settings.broker_url == EMBEDDED
        try:
            # An embedded broker is checked once started, in _run.
            spec = _start_checks(settings, opts, input, output, spec_args=spec_args,
                                 allow_empty=allow_empty, force=force, broker=not embedded)
            where["output"] = spec.output
            snap = _run(spec, workers=workers, timeout=timeout, embedded=embedded)
        except AlreadyComplete as done:
            _already_complete(done, settings)
            return
        _print_summary(snap)


@app.command(epilog=_epilog(
    "RUN_ID=$(moonbatch submit s3://photos/ s3://out/captions/ --skill caption | tail -n1)",
    "moonbatch wait $RUN_ID --timeout 7200",
    "moonbatch submit s3://photos/ s3://out/c/ --provider fal --dry-run --json"))
def submit(input: InputArg, output: OutputArg,
           skill: SkillOpt = None, length: LengthOpt = None, question: QuestionOpt = None,
           object: ObjectOpt = None, reasoning: ReasoningOpt = None,
           temperature: TemperatureOpt = None, top_p: TopPOpt = None,
           max_tokens: MaxTokensOpt = None, shard_size: ShardSizeOpt = None,
           max_pixels: MaxPixelsOpt = None, provider: ProviderOpt = None,
           endpoint: EndpointOpt = None, input_format: InputFormatOpt = "auto",
           id_column: IdColumnOpt = None, image_column: ImageColumnOpt = None,
           base: BaseOpt = None, output_format: FormatOpt = "jsonl",
           skip_existing: SkipExistingOpt = None,
           allow_empty: AllowEmptyOpt = False, force: ForceOpt = False,
           dry_run: DryRunOpt = False, as_json: DryRunJsonOpt = False) -> None:
    """Plan and enqueue a run for a worker fleet; print its run id on the last line of stdout.

    Runs the same checks as `run` first. The same command again after the run completed exits
    0 and prints the run id again. With --dry-run, only lists and plans INPUT and prints what
    the run would send and cost.
    """
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import AlreadyComplete, start_run

    with _cli_errors():
        opts = _options(skill, length, question, object, reasoning, temperature, top_p, max_tokens)
        spec_args = _spec_args(shard_size=shard_size, max_pixels=max_pixels, provider=provider,
                               endpoint=endpoint, input_format=input_format,
                               id_column=id_column, image_column=image_column, base=base,
                               output_format=output_format, skip_existing=skip_existing)
        settings = get_settings()
        if as_json and not dry_run:
            raise Fail("--json applies to --dry-run only: add --dry-run, or leave --json out",
                       code=2)
        if dry_run:
            _dry_run(settings, opts, input, output, spec_args=spec_args,
                     allow_empty=allow_empty, as_json=as_json)
            return
        _no_embedded(settings, "submit")
        try:
            spec = _start_checks(settings, opts, input, output, spec_args=spec_args,
                                 allow_empty=allow_empty, force=force)
            plan = start_run(spec, settings)
        except AlreadyComplete as done:
            err.print(str(done), highlight=False, soft_wrap=True)
            print(done.run_id)
            return
        err.print(f"{_planned(plan)}; results: {spec.output}", highlight=False,
                  soft_wrap=True)
        print(plan["run_id"])


def _open_snapshot(output: str, settings) -> dict[str, Any]:
    """The run's snapshot; ``Fail`` if no run is at ``output``."""
    from moonbatch.workers.runstate import Progress as RunProgress
    from moonbatch.workers.runstate import open_output
    from moonbatch.workers.storage import NotFound

    try:
        return RunProgress(open_output(output, settings)).snapshot()
    except NotFound:
        raise Fail(f"no moonbatch run at {output}") from None


def _print_skipped(output: str, snap: dict[str, Any], settings) -> None:
    """Every key skipped, one per line on stdout, streamed from storage: a key skipped as not
    an image alone, one that cannot be an item with its reason after a tab."""
    from moonbatch.workers import layout
    from moonbatch.workers.runstate import open_output
    from moonbatch.workers.storage import get_json_or_none

    store = open_output(output, settings)
    plan = get_json_or_none(store, layout.PLAN)
    if plan is None:
        raise Fail(f"run {snap['run_id']} is still being planned: skipped objects are listed "
                   "once its plan is complete")
    why = "not images, or for the reason after a tab" if plan.get("skipped_reasons") else "not images"
    err.print(f"{plan['skipped']} object(s) under {snap['input']} skipped ({why}):",
              highlight=False, soft_wrap=True)
    if "skipped_parts" not in plan:  # a run planned before the full list was kept
        for key in plan.get("skipped_examples", []):
            print(key)
        if plan["skipped"] > len(plan.get("skipped_examples", [])):
            err.print("(this run kept only these examples)")
        return
    for part in range(plan["skipped_parts"]):
        for line in store.get(layout.skipped_part(part)).splitlines():
            if line.strip():
                record = json.loads(line)  # a key that cannot be an item has its reason
                print(record["key"] + (f"\t{record['reason']}" if record.get("reason") else ""))


@app.command(epilog=_epilog("moonbatch status 20250101-120000-a1b2c3",
                            "moonbatch status s3://annotations/2024/ --json | jq .counts",
                            "moonbatch status RUN_ID --skipped > skipped.txt"))
def status(run_ref: RunRefArg, as_json: JsonOpt = False,
           skipped: Annotated[bool, typer.Option(
               "--skipped", help="list every object of INPUT skipped as not an image, one key "
               "per line")] = False) -> None:
    """Print a run's progress: items done, its provider (and fal endpoint), batches at the
    provider, shards merged; for a running run, whether a worker consumes each of its queues.

    Exits 0 for a running or completed run, 1 for a failed or cancelled one.
    """
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import resolve_run

    with _cli_errors():
        settings = get_settings()
        output = resolve_run(run_ref, settings)
        snap = _open_snapshot(output, settings)
        if not skipped:
            snap["queues_without_consumer"] = _unconsumed_now(output, snap, settings)
        if skipped:
            _print_skipped(output, snap, settings)
        elif as_json:
            print(json.dumps(snap, indent=2))
        else:
            c, s = snap["counts"], snap["shards"]
            out.print(f"run {snap['run_id']}: [bold]{snap['status']}[/bold]  "
                      f"{c['done']}/{c['total'] if c['total'] is not None else '?'} items done "
                      f"(ok {c['ok']}, error {c['error']}, in flight {c['in_flight']}); "
                      f"provider {escape(_provider_text(snap))}; "
                      f"batches at {_at(snap)} {s.get('in_flight', 0)}; shards merged "
                      f"{s['merged']}/{s['total'] if s['total'] is not None else '?'}, "
                      f"submitted {s['submitted']}", highlight=False, soft_wrap=True)
            if c.get("skipped"):
                out.print(f"{c['skipped']} object(s) skipped (not images): moonbatch status "
                          f"{snap['run_id']} --skipped", highlight=False, soft_wrap=True)
            if snap["failure"]:
                out.print(f"[red]failure:[/red] {escape(snap['failure']['where'])}: "
                          f"{escape(str(snap['failure']['error']))}", soft_wrap=True)
            if snap["queues_without_consumer"]:
                out.print("[yellow]" + escape(_no_consumer_text(
                    snap["queues_without_consumer"], _run_queues(output, settings),
                    snap["run_id"])) + "[/yellow]", highlight=False, soft_wrap=True)
        if snap["status"] in ("failed", "cancelled"):
            raise typer.Exit(1)


@app.command(epilog=_epilog("moonbatch runs --limit 5",
                            "moonbatch runs --json | jq '.[] | select(.status==\"running\")'"))
def runs(limit: Annotated[int, typer.Option("--limit", metavar="INTEGER",
                                            help="show the INTEGER newest runs")] = 20,
         as_json: JsonOpt = False) -> None:
    """List runs from the registry (MOONBATCH_STATE_URL), newest first: run id, status, input,
    output, counts and start time."""
    from moonbatch.config import get_settings
    from moonbatch.workers import registry
    from moonbatch.workers.runstate import Progress as RunProgress
    from moonbatch.workers.runstate import open_output

    with _cli_errors():
        settings = get_settings()
        rows = []
        for entry in registry.iter_runs(registry.open_state(settings), limit=max(0, limit)):
            row = {**entry, "status": "unknown", "counts": None}
            try:
                snap = RunProgress(open_output(entry["output"], settings)).snapshot()
                row.update(status=snap["status"], counts=snap["counts"])
            except Exception as exc:  # an OUTPUT deleted or out of reach: still list the id
                row["status"] = f"unreadable ({type(exc).__name__})"
            rows.append(row)
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        table = Table("run", "status", "input", "output", "ok/error/total", "started (UTC)",
                      box=None)
        for row in rows:
            c = row["counts"] or {}
            counts = f"{c.get('ok', '?')}/{c.get('error', '?')}/{c.get('total') or '?'}"
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["created_at"]))
            table.add_row(row["run_id"], row["status"], row["input"], row["output"], counts,
                          started)
        for column in table.columns:
            column.overflow = "fold"  # never cut a path
        out.print(table if rows else "no runs in the registry at " + settings.state_url)


def _follow(output: str, settings, workers: int | None, timeout: float | None,
            where: dict[str, Any]) -> None:
    """Follow the run at ``output`` to the end with ``workers`` local worker processes on the
    run's own queue (none: a fleet does the work) and print its summary. Raises ``Fail`` as
    ``_watch`` does."""
    from moonbatch.workers.runstate import open_run, run_queue

    if workers is not None and workers < 0:
        raise Fail("--workers must be >= 0", code=2)
    local = None
    if workers:
        queue = run_queue(open_run(output, settings).spec, settings)
        if queue == settings.queue:
            err.print(f"the run's work is on the shared queue {queue}: these {workers} local "
                      "worker(s) take any run's work on it while they run", highlight=False)
        local = LocalWorkers(workers, queue)
    where["output"] = output
    try:
        snap = _watch(output, settings, workers=local, timeout=timeout)
    finally:
        if local is not None:
            local.stop()
    _print_summary(snap)


@app.command(epilog=_epilog("moonbatch wait RUN_ID --timeout 3600",
                            "moonbatch wait s3://annotations/2024/ --workers 4"))
def wait(run_ref: RunRefArg, timeout: TimeoutOpt = None,
         workers: FollowWorkersOpt = None) -> None:
    """Block until the run is complete (exit 0) or cannot complete (exit 1); print its
    summary."""
    from moonbatch.config import get_settings
    from moonbatch.producer import preflight
    from moonbatch.producer.runs import resolve_run

    where: dict[str, Any] = {"workers": workers}
    with _cli_errors(), _interruptible(where):
        settings = get_settings()
        output = resolve_run(run_ref, settings)
        if workers:
            from moonbatch.workers.runstate import open_run

            preflight.preflight(settings, state=False,
                                provider=open_run(output, settings).spec.provider)
        _follow(output, settings, workers, timeout, where)


def _requeue(run_ref: str, settings, where: dict[str, Any]) -> str | None:
    """Re-enqueue every unfinished step of a run on the run's own queue, or plan a start that
    stopped before its plan was complete again; print what was done. Returns the run's OUTPUT,
    or None when it is already complete. Raises ``Fail``, ``RunExists``, ``PreflightFailed``."""
    from moonbatch.producer import preflight
    from moonbatch.producer.runs import RunExists, describe_output, register_run, resolve_run, start_run
    from moonbatch.workers import layout
    from moonbatch.workers.runstate import open_run
    from moonbatch.workers.storage import get_json_or_none
    from moonbatch.workers.tasks import reconcile_run

    output = resolve_run(run_ref, settings)
    run = open_run(output, settings)
    store = run.output
    where["output"] = output
    if store.exists(layout.FINALIZED):
        out.print(f"run {run.spec.run_id} is already complete")
        return None
    if store.exists(layout.CANCELLED):
        raise Fail(f"run {run.spec.run_id} was cancelled; start a new run instead")
    preflight.preflight(settings, output_url=output, provider=run.spec.provider)
    plan = get_json_or_none(store, layout.PLAN)
    if plan is None:
        if describe_output(store)["state"] == "planning":
            raise RunExists(f"run {run.spec.run_id} is being planned by a live producer: "
                            f"follow it with `moonbatch wait {run.spec.run_id}`")
        plan = start_run(run.spec, settings)  # the dead start's run id and spec
        out.print(f"run {run.spec.run_id}: planned again: {plan['items']} images in "
                  f"{plan['shards']} shard(s)", highlight=False)
        return output
    store.delete(layout.FAILED)  # a recorded failure is retried, not inherited
    register_run(run.spec, settings)  # again: the registry or canary may be new
    counts = reconcile_run(output, run.spec.run_id, full=True)
    counts["nothing"] = plan["shards"] - sum(counts.values())
    counts = {action: n for action, n in counts.items() if n}
    out.print(f"run {run.spec.run_id}: " + ", ".join(
        f"{n} shard(s) {a}" for a, n in sorted(counts.items())))
    return output


@app.command(epilog=_epilog("moonbatch resume RUN_ID --workers 4   # on this machine, to the end",
                            "moonbatch resume RUN_ID               # a fleet does the work"))
def resume(run_ref: RunRefArg, workers: FollowWorkersOpt = None, timeout: TimeoutOpt = None,
           embedded_broker: EmbeddedBrokerOpt = False) -> None:
    """Re-enqueue whatever a run still needs, on the run's own queue (after Ctrl-C, a broker
    that lost its queues, or a failure you have fixed); batches that exist are polled, not
    submitted again. A run whose start stopped before its plan was complete is planned again.

    With --workers N, starts N local worker processes on the run's queue and follows the run to
    the end, as `run` does; without it, returns once the work is enqueued.
    """
    from moonbatch.config import get_settings
    from moonbatch.workers.embedded import EMBEDDED

    where: dict[str, Any] = {"workers": workers}
    with _cli_errors(), _interruptible(where):
        settings = get_settings()
        if workers is not None and workers < 0:
            raise Fail("--workers must be >= 0", code=2)
        embedded = embedded_broker or settings.broker_url == EMBEDDED
        if embedded and not workers:
            raise Fail("an embedded broker serves only this command's own workers: add "
                       "--workers N, or use a shared broker", code=2)
        with _embedded_broker() if embedded else contextlib.nullcontext():
            settings = get_settings()
            output = _requeue(run_ref, settings, where)
            if output is not None and workers:
                _follow(output, settings, workers, timeout, where)
            elif output is not None:
                _say_where_the_work_is(output, settings)


def _unconsumed_now(output: str, snap: dict[str, Any], settings) -> list[str] | None:
    """The queues of a running run that no worker consumes now (one look, about
    ``moonbatch.workers.consumers.LOOK_TIMEOUT`` seconds); None for a run that is not running, or when
    the broker cannot be asked (embedded, out of reach)."""
    from moonbatch.workers.app import app as celery_app
    from moonbatch.workers.consumers import without_consumer
    from moonbatch.workers.embedded import EMBEDDED

    if snap["status"] != "running" or settings.broker_url == EMBEDDED:
        return None
    try:
        queues = _run_queues(output, settings)
    except Exception:  # no spec to read: nothing to name
        return None
    return without_consumer(celery_app, queues)


def _say_where_the_work_is(output: str, settings) -> None:
    """After work was enqueued without local workers (resume, retry-failed): say so, naming
    the queue and the way to serve it, when no worker consumes one of the run's queues."""
    from moonbatch.workers.app import app as celery_app
    from moonbatch.workers.consumers import without_consumer
    from moonbatch.workers.runstate import control_queue, open_run, run_queue

    spec = open_run(output, settings).spec
    queue = run_queue(spec, settings)
    queues = [queue, control_queue(queue, settings)]
    missing = without_consumer(celery_app, queues)
    if missing:
        err.print("[yellow]" + escape(_no_consumer_text(missing, queues, spec.run_id))
                  + "[/yellow]", highlight=False, soft_wrap=True)
    elif missing is None and queue != settings.queue:  # no answer: say where the work is
        err.print(f"its work is on its own queues {queue} and {queues[1]} (its workers were "
                  "`moonbatch run`'s): add --workers N, or start workers with "
                  f"-Q {queue},{queues[1]}", highlight=False)


CodesArg = Annotated[Optional[list[str]], typer.Argument(
    metavar="[CODE]...", help="retry only error rows with these codes, e.g. object_not_found "
    "read_failed (default: every error row)", show_default=False)]
RetryDryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="print how many error rows of each code would be retried; change "
    "nothing")]


def _retry(run_ref: str, codes: list[str] | None, settings, where: dict[str, Any], *,
           dry_run: bool) -> str | None:
    """Start (or continue) a retry pass of a finished run's error rows (``moonbatch.workers.retries``)
    and enqueue its work; print what was done. Returns the run's OUTPUT, or None when there is
    nothing to follow (nothing to retry, a dry run). Raises ``Fail``, ``PreflightFailed``."""
    from moonbatch.producer import preflight
    from moonbatch.producer.runs import register_run, resolve_run
    from moonbatch.workers import layout, retries
    from moonbatch.workers.runstate import open_run
    from moonbatch.workers.storage import get_json_or_none
    from moonbatch.workers.tasks import reconcile_run

    output = resolve_run(run_ref, settings)
    run = open_run(output, settings)
    store, rid = run.output, run.spec.run_id
    where["output"] = output
    if store.exists(layout.CANCELLED):
        raise Fail(f"run {rid} was cancelled: its items cannot be retried; start a new run")
    wanted = sorted(set(codes)) if codes else None
    doc, applied = retries.latest_pass(store)
    finalized = store.exists(layout.FINALIZED)
    if doc is not None and not (applied and finalized):  # a pass under way, or one that stopped
        what = f"retry pass {doc['pass']} of run {rid} ({doc['items']} item(s))"
        if dry_run:
            out.print(f"{what} is under way: follow it with `moonbatch wait {rid}`",
                      highlight=False)
            return None
        if wanted != doc["codes"]:
            err.print(f"{what} is not finished: continuing it (codes: "
                      f"{', '.join(doc['codes'] or ['every error'])})", highlight=False)
        preflight.preflight(settings, output_url=output, provider=run.spec.provider)
        register_run(run.spec, settings)
        if not applied:
            retries.apply_pass(store, doc)
        store.delete(layout.FAILED)  # a recorded failure is retried, not inherited
        reconcile_run(output, rid, full=True)
        out.print(f"{what}: continued", highlight=False)
        return output
    if not finalized:
        failure = get_json_or_none(store, layout.FAILED)
        if failure:
            raise Fail(f"run {rid} failed before it finished ({failure.get('where')}: "
                       f"{str(failure.get('error'))[:200]}): fix the cause and `moonbatch resume "
                       f"{rid} --workers N`, then retry its failed items")
        raise Fail(f"run {rid} is not finished: wait for it (`moonbatch wait {rid}`), then "
                   "retry its failed items", code=3)
    found, chosen, every = retries.find_errors(run, set(wanted) if wanted else None)
    items = sum(chosen.values())
    others = ", ".join(f"{c} {n}" for c, n in sorted(every.items()) if c not in chosen)
    if not items:
        why = (f"no error rows with code {', '.join(wanted)} (its error rows: {others})"
               if every else "no error rows")
        out.print(f"run {rid}: {why}: nothing to retry", highlight=False)
        return None
    counts = ", ".join(f"{c} {n}" for c, n in sorted(chosen.items()))
    if dry_run:
        out.print(f"run {rid}: would retry {items} error row(s) in {len(found)} shard(s): "
                  f"{counts}" + (f"; not retried: {others}" if others else "")
                  + " (dry run: nothing changed)", highlight=False, soft_wrap=True)
        return None
    preflight.preflight(settings, output_url=output, provider=run.spec.provider)
    doc = retries.record_pass(store, found, set(wanted) if wanted else None, chosen)
    register_run(run.spec, settings)  # on the reconciler's list before the run reopens
    retries.apply_pass(store, doc, found)
    reconcile_run(output, rid, full=True)
    out.print(f"run {rid}: retry pass {doc['pass']}: {items} item(s) of {len(found)} shard(s) "
              f"sent again ({counts})", highlight=False, soft_wrap=True)
    return output


@app.command("retry-failed", epilog=_epilog(
    "moonbatch retry-failed RUN_ID --workers 4                      # every error row",
    "moonbatch retry-failed RUN_ID object_not_found read_failed     # only these codes",
    "moonbatch retry-failed s3://annotations/2024/ --dry-run        # how many, per code"))
def retry_failed(run_ref: RunRefArg, codes: CodesArg = None, workers: FollowWorkersOpt = None,
                 timeout: TimeoutOpt = None, dry_run: RetryDryRunOpt = False,
                 embedded_broker: EmbeddedBrokerOpt = False) -> None:
    """Send the error rows of a finished run again, into the same OUTPUT: their rows in
    results/ are replaced by the new outcome (ok, or the new error), so results/ still holds
    exactly one row per item; run.json counts again. Fix the cause first (objects restored,
    a key with quota). Run again after an interruption, it finishes the same pass.

    With --workers N, starts N local worker processes on the run's queue and follows the run
    to the end; without it, returns once the work is enqueued (a fleet does it).
    """
    from moonbatch.config import get_settings
    from moonbatch.workers.embedded import EMBEDDED

    where: dict[str, Any] = {"workers": workers}
    with _cli_errors(), _interruptible(where):
        settings = get_settings()
        if workers is not None and workers < 0:
            raise Fail("--workers must be >= 0", code=2)
        embedded = not dry_run and (embedded_broker or settings.broker_url == EMBEDDED)
        if embedded and not workers:
            raise Fail("an embedded broker serves only this command's own workers: add "
                       "--workers N, or use a shared broker", code=2)
        with _embedded_broker() if embedded else contextlib.nullcontext():
            settings = get_settings()
            output = _retry(run_ref, codes, settings, where, dry_run=dry_run)
            if output is not None and workers:
                _follow(output, settings, workers, timeout, where)
            elif output is not None:
                _say_where_the_work_is(output, settings)


@app.command(epilog=_epilog("moonbatch cancel RUN_ID"))
def cancel(run_ref: RunRefArg) -> None:
    """Stop a run: queued work becomes a no-op, builds in progress abort their uploads, and
    run.json says "cancelled". The provider's work in flight is cancelled where it can be
    (fal: every request in flight; the Batch API: open uploads are aborted, but submitted
    batches run on, as the API has no cancel); results not merged yet are not merged."""
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import resolve_run
    from moonbatch.workers import layout
    from moonbatch.workers.providers import provider_for
    from moonbatch.workers.runstate import Progress as RunProgress
    from moonbatch.workers.runstate import iso_time, open_output, open_run
    from moonbatch.workers.storage import put_json
    from moonbatch.workers.tasks import run_final

    with _cli_errors():
        settings = get_settings()
        output = resolve_run(run_ref, settings)
        store = open_output(output, settings)
        if store.exists(layout.FINALIZED):
            raise Fail("the run is already complete")
        put_json(store, layout.CANCELLED, {"at": time.time()}, if_absent=True)
        run = open_run(output, settings)
        stopped = provider_for(run.spec).cancel_run(run)
        snap = RunProgress(store).snapshot()
        snap["status"] = "cancelled"
        snap["timings"]["finished_at"] = iso_time(time.time())
        put_json(store, layout.SUMMARY, snap)
        run_final(settings, snap["run_id"])
        what = "open upload(s) aborted" if run.spec.provider == "moondream" \
            else "request(s) in flight cancelled"
        out.print(f"run {snap['run_id']} cancelled ({stopped} {what}; "
                  f"{snap['counts']['done']} item(s) had results)")


@app.command(epilog=_epilog("moonbatch clean s3://annotations/2024/        # a failed start",
                            "moonbatch clean ./out --force                  # even a complete run"))
def clean(output: OutputArg,
          force: Annotated[bool, typer.Option(
              "--force", help="also clean a complete or running run (a running one is "
              "cancelled first; its batches at the API run on)")] = False) -> None:
    """Delete what moonbatch wrote under OUTPUT: _moonbatch/, run.json, results/shard-*.jsonl
    (or .parquet) and annotations/instances.json (nothing else), so OUTPUT can take a new run.
    Refuses a complete or running run without --force.
    """
    from moonbatch.config import get_settings
    from moonbatch.producer import runs as runs_mod
    from moonbatch.workers import layout, registry, writers
    from moonbatch.workers.runstate import open_output
    from moonbatch.workers.storage import LocalStore, normalize_url, put_json
    from moonbatch.workers.tasks import run_final

    with _cli_errors():
        settings = get_settings()
        output = normalize_url(output)
        store = open_output(output, settings)
        info = runs_mod.describe_output(store)
        state, spec = info["state"], info["raw_spec"] or {}
        run_id = spec.get("run_id")
        if state in ("completed", "running", "planning") and not force:
            what = {"completed": "is complete: its results are in " + output + "results/",
                    "running": "is still running (moonbatch cancel it first)",
                    "planning": "is being planned by a live producer"}[state]
            raise Fail(f"run {run_id or '?'} at {output} {what}; pass --force to delete it",
                       code=3)
        if state in ("running", "planning"):  # stop its queued work before removing its state
            put_json(store, layout.CANCELLED, {"at": time.time()}, if_absent=True)
        suffixes = "|".join(writers.module(f).SUFFIX for f in writers.OUTPUT_FORMATS)
        pattern = re.compile(r"results/shard-\d{5}\.(" + suffixes + ")")
        keys = [o.key for o in store.iter_objects(layout.STATE)]
        keys += [o.key for o in store.iter_objects(layout.RESULTS) if pattern.fullmatch(o.key)]
        keys += [k for k in (layout.SUMMARY, layout.COCO) if store.exists(k)]
        if not keys:
            out.print(f"nothing to clean at {output}", highlight=False)
            return
        for key in sorted(keys, key=lambda k: k == layout.SPEC):  # the spec last
            store.delete(key)
        if isinstance(store, LocalStore):  # folders left empty
            for folder in (layout.STATE, layout.RESULTS, layout.ANNOTATIONS):
                _remove_empty_dirs(store.root / folder)
        if run_id:
            with contextlib.suppress(Exception):  # the registry only helps find runs
                registry.forget_run(registry.open_state(settings), run_id)
                run_final(settings, run_id)
        out.print(f"cleaned {output}: {len(keys)} object(s) of run {run_id or '?'} "
                  f"({state or 'no run'}) deleted", highlight=False, soft_wrap=True)


def _remove_empty_dirs(root: Path) -> None:
    """Remove ``root`` and the folders under it that are empty (deepest first)."""
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def skimage_data_dir() -> Path:
    """The folder of sample photographs that scikit-image ships (``skimage/data``)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise Fail("scikit-image is not installed: pip install 'moonbatch[demo]' installs it")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


DemoShardSizeOpt = Annotated[int, typer.Option(
    "--shard-size", metavar="INTEGER", help="most images per batch (small, to show several)")]
DemoWorkersOpt = Annotated[int, typer.Option(
    "--workers", metavar="INTEGER", help="local worker processes (at least 1)")]
DemoTimeoutOpt = Annotated[float, typer.Option(
    "--timeout", metavar="SECONDS", help="stop waiting after SECONDS (exit 4)")]


@app.command(epilog=_epilog("moonbatch demo", "moonbatch demo --skill query --question "
                            "\"What is in the picture?\" --output /tmp/demo",
                            "moonbatch demo --provider fal --endpoint fal-ai/moondream/batched"))
def demo(output: Annotated[Path, typer.Option(
             "--output", metavar="DIRECTORY",
             help="each run goes into DIRECTORY/<run id>/")] = Path("moonbatch-demo"),
         skill: SkillOpt = None, length: LengthOpt = None, question: QuestionOpt = None,
         object: ObjectOpt = None, reasoning: ReasoningOpt = None,
         provider: ProviderOpt = None, endpoint: EndpointOpt = None,
         shard_size: DemoShardSizeOpt = 8, workers: DemoWorkersOpt = 2,
         timeout: DemoTimeoutOpt = 300.0) -> None:
    """Annotate scikit-image's sample photographs with no account and no servers: an embedded
    broker (a private redis-server), local storage and the emulator of the Batch API or (with
    --provider fal) of fal's queue API."""
    from moonbatch.config import get_settings, reload_settings
    from moonbatch.emulator.fal import FalConfig
    from moonbatch.emulator.server import EmulatorConfig, EmulatorServer
    from moonbatch.producer.runs import new_run_id, new_spec
    from moonbatch.workers.app import reconfigure

    with _cli_errors():
        opts = _options(skill, length, question, object, reasoning, None, None, None)
        run_id = new_run_id()
        target = (output / run_id).resolve()
        source = skimage_data_dir()
        # The provider, endpoint and shard size are checked before anything starts.
        spec = new_spec(str(source), str(target), opts, get_settings(), shard_size=shard_size,
                        run_id=run_id, provider=provider, endpoint=endpoint)
        key, fal_key = uuid.uuid4().hex, uuid.uuid4().hex
        config = EmulatorConfig(api_key=key, chunking_seconds=0.5, processing_seconds=1.0,
                                lines_per_second=50, fal_key=fal_key,
                                fal=FalConfig(concurrency=8, processing_seconds=0.1))
        with EmulatorServer(config) as emu:
            os.environ.update({
                "MOONBATCH_PROVIDER": spec.provider,
                "MOONBATCH_MOONDREAM_URL": emu.url, "MOONDREAM_API_KEY": key,
                "MOONBATCH_FAL_QUEUE_URL": emu.fal_url, "FAL_KEY": fal_key,
                "MOONBATCH_POLL_MIN_INTERVAL": "0.5", "MOONBATCH_POLL_MAX_INTERVAL": "2",
            })
            reconfigure(reload_settings())
            what = (f"emulated Moondream Batch API at {emu.url}" if spec.provider == "moondream"
                    else f"emulated fal queue at {emu.fal_url}, {spec.endpoint}")
            err.print(f"demo: {source} → {target} ({what})")
            snap = _run(spec, workers=max(1, workers or 1), timeout=timeout, embedded=True)
        _print_summary(snap)
        from moonbatch.workers import writers

        writer = writers.module(spec.output_format)
        first = next(iter(sorted((target / "results").glob(f"*.{writer.SUFFIX}"))), None)
        row = next(writer.decode(first.read_bytes()), None) if first is not None else None
        if row is not None:
            out.print(f"first row of {first.name}: {json.dumps(row, ensure_ascii=False)[:300]}")
        out.print(f"results are in {target / 'results'}")


@app.command(epilog=_epilog(
    "moonbatch emulator --port 8787 --api-key K",
    "MOONBATCH_MOONDREAM_URL=http://127.0.0.1:8787/v1 MOONDREAM_API_KEY=K moonbatch run ..."))
def emulator(port: Annotated[int, typer.Option(
                 "--port", metavar="INTEGER", help="TCP port to listen on (0: any free port)")] = 8787,
             host: Annotated[str, typer.Option(
                 "--host", metavar="TEXT", help="address to bind; keep the loopback default "
                 "unless other machines must reach it")] = "127.0.0.1",
             api_key: Annotated[Optional[str], typer.Option(
                 "--api-key", envvar="MOONDREAM_API_KEY", show_envvar=True, metavar="TEXT",
                 help="key clients must send in X-Moondream-Auth (default: a random key, "
                 "printed)")] = None,
             fal_key: Annotated[Optional[str], typer.Option(
                 "--fal-key", envvar="FAL_KEY", show_envvar=True, metavar="TEXT",
                 help="key fal clients must send (Authorization: Key <key>; default: a random "
                 "key, printed)")] = None) -> None:
    """Serve the Moondream Batch API emulator and the fal queue API emulator on one port (for
    tests, benchmarks and offline work)."""
    from moonbatch.emulator.server import EmulatorConfig, EmulatorServer

    key = api_key or uuid.uuid4().hex
    fkey = fal_key or uuid.uuid4().hex
    server = EmulatorServer(EmulatorConfig(api_key=key, fal_key=fkey), host=host, port=port)
    err.print(f"Moondream Batch API emulator on {server.url}"
              + ("" if api_key else f" (API key: {key})") + f"; files in {server.emulator.dir}")
    err.print(f"fal queue emulator on {server.fal_url} (MOONBATCH_FAL_QUEUE_URL={server.fal_url})"
              + ("" if fal_key else f" (fal key: {fkey})"))
    try:
        server.serve_forever()  # SIGINT, SIGTERM and SIGHUP end it (see main)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()  # deletes its folder


@app.command(epilog=_epilog(
    "FLOWER_BASIC_AUTH=ops:s3cret moonbatch flower",
    "FLOWER_BASIC_AUTH=ops:s3cret moonbatch flower --address 0.0.0.0 --port 5555  # a server"))
def flower(address: Annotated[str, typer.Option(
               "--address", metavar="HOST", help="interface to listen on (default: this machine "
               "only)")] = "127.0.0.1",
           port: Annotated[int, typer.Option("--port", metavar="PORT",
                                             help="port to listen on")] = 5555,
           no_auth: Annotated[bool, typer.Option(
               "--no-auth", help="serve without a password (only behind a proxy of your own "
               "that authenticates)")] = False) -> None:
    """Start Flower on the fleet's broker, with basic auth (FLOWER_BASIC_AUTH=user:password,
    comma-separated for several users). Task arguments show only OUTPUT URLs, run ids and shard
    and round numbers; Flower's /healthcheck and /metrics stay open, as Flower serves them."""
    from moonbatch.config import get_settings

    with _cli_errors():
        auth = os.environ.get("FLOWER_BASIC_AUTH", "")
        if not auth and not no_auth:
            raise Fail("FLOWER_BASIC_AUTH is not set: export FLOWER_BASIC_AUTH=user:password, or "
                       "pass --no-auth to serve Flower without a password behind a proxy of "
                       "your own", code=2)
        if auth and not all(":" in pair and pair.split(":", 1)[0] and pair.split(":", 1)[1]
                            for pair in auth.split(",")):
            raise Fail("FLOWER_BASIC_AUTH must be user:password (several: comma-separated)",
                       code=2)
        if not 0 < port < 65536:
            raise Fail("--port must be within 1..65535", code=2)
        from moonbatch.producer.preflight import check_broker

        problem = check_broker(get_settings().broker_url)
        if problem:
            raise Fail(problem, code=3)
        # Flower reads FLOWER_BASIC_AUTH from the environment itself: the password never
        # appears in a command line (ps shows those).
        env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH" or not no_auth}
        # The task list shows each task's keyword arguments: run, shard, round.
        env.setdefault("FLOWER_TASKS_COLUMNS", "name,uuid,state,kwargs,received,runtime,worker")
        cmd = [sys.executable, "-m", "celery", "-A", "moonbatch.workers", "flower",
               f"--address={address}", f"--port={port}"]
        err.print(f"Flower on http://{address}:{port}/ "
                  + ("(no auth)" if no_auth else "(basic auth from FLOWER_BASIC_AUTH)"))
        os.execve(sys.executable, cmd, env)


def _exit_on_signal(signum: int, frame: object) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so `finally` stops the local workers and the embedded
    # broker and deletes temporary files; later ones are ignored so that cleanup completes.
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry point. SIGTERM and SIGHUP exit (code 128 + signal) through the
    same clean-up as Ctrl-C."""
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _exit_on_signal)
    app()


if __name__ == "__main__":
    main()
