"""The ``moonbatch`` command line (typer + rich). See README "Command line"."""

from __future__ import annotations

import contextlib
import json
import os
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Annotate image datasets with the Moondream Batch API, at scale.")
# Not a terminal (a pipe, a log, CI): no width to fit, so never wrap or cut a path or an id.
out = Console() if sys.stdout.isatty() else Console(width=1 << 14)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=1 << 14)

SkillOpt = Annotated[str, typer.Option("--skill", help="caption | query | detect | point")]
LengthOpt = Annotated[Optional[str], typer.Option("--length", help="caption length: short | normal | long")]
QuestionOpt = Annotated[Optional[str], typer.Option("--question", help="question (query)")]
ObjectOpt = Annotated[Optional[str], typer.Option("--object", help="what to find (detect, point)")]
ReasoningOpt = Annotated[Optional[bool], typer.Option("--reasoning/--no-reasoning",
                                                      help="chain of thought (query; API default on)")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens")]
ShardSizeOpt = Annotated[Optional[int], typer.Option(
    "--shard-size", help="max lines per batch (default 10000, at most 100000)")]
MaxPixelsOpt = Annotated[Optional[int], typer.Option(
    "--max-pixels", help="downscale images above this many pixels (default ~2 MP; 0: never)")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help="local worker processes to start (default: cores; 0: use a running fleet)")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="give up after SECONDS")]


class Fail(Exception):
    """A clear, user-facing failure: printed in red, exit code ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _options(skill: str, length: str | None, question: str | None, obj: str | None,
             reasoning: bool | None, temperature: float | None, top_p: float | None,
             max_tokens: int | None):
    from workers.models import SkillOptions

    try:
        return SkillOptions(skill=skill, length=length, question=question, object=obj,
                            reasoning=reasoning, temperature=temperature, top_p=top_p,
                            max_tokens=max_tokens)
    except ValidationError as exc:
        msgs = [str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()]
        raise Fail("; ".join(msgs), code=2) from None


@contextlib.contextmanager
def _cli_errors() -> Iterator[None]:
    from producer.runs import RunExists
    from workers.runstate import RunNotFound
    from workers.storage import StorageError

    try:
        yield
    except Fail as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(exc.code) from None
    except (RunExists, RunNotFound, ValueError, StorageError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2 if isinstance(exc, ValueError) else 1) from None


class LocalWorkers:
    """``N`` worker processes (one ``celery -A workers worker`` with concurrency N) for the
    duration of a command, consuming only ``queue`` (the run's private one); they inherit
    this process's environment and, on Linux, get SIGTERM if this process dies. ``revive()`` starts them
    again after they died (say, a broker restart kombu did not survive): the run's state is in
    storage, so the new workers carry on where the old ones stopped."""

    max_revivals = 3

    def __init__(self, n: int, queue: str, env: dict[str, str] | None = None) -> None:
        self.n = n
        self.cmd = [sys.executable, "-m", "celery", "-A", "workers", "worker", "--concurrency",
                    str(n), "--queues", queue, "--loglevel", "WARNING", "--without-mingle",
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

    def _spawn(self) -> subprocess.Popen:
        from workers.embedded import child_setup

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
    from workers.app import app as celery_app

    try:
        replies = celery_app.control.ping(timeout=2.0, limit=1)  # returns on the first reply
    except Exception as exc:
        raise Fail(f"cannot reach the broker at {_safe_url(settings.broker_url)}: {exc}") from None
    if not replies:
        raise Fail("no worker answered: start a fleet (celery -A workers worker) or use --workers N")


def _check_broker(settings) -> None:
    """Fail fast, with the way out, when the configured broker cannot be reached."""
    from workers.app import app as celery_app

    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
    except Exception as exc:
        raise Fail(f"cannot reach the broker at {_safe_url(settings.broker_url)} "
                   f"({type(exc).__name__}): start it, or run with a private broker of this "
                   "command's own: --embedded-broker (or MOONBATCH_BROKER_URL=embedded)") from None


def _no_embedded(settings, what: str) -> None:
    """``embedded`` names a broker private to one ``moonbatch run``: nothing else can use it."""
    from workers.embedded import EMBEDDED

    if settings.broker_url == EMBEDDED:
        raise Fail(f"MOONBATCH_BROKER_URL=embedded is a broker private to one `moonbatch run` "
                   f"with local workers; {what} needs a shared broker (a redis:// URL)", code=2)


@contextlib.contextmanager
def _embedded_broker() -> Iterator[None]:
    """Start a private ``redis-server`` (``workers.embedded``) and point this process's
    settings, and the workers it starts, at it; stop it and delete its folder on exit."""
    from config import reload_settings
    from workers.app import reconfigure
    from workers.embedded import EmbeddedRedis, NoRedisServer

    saved = {k: os.environ.get(k) for k in ("MOONBATCH_BROKER_URL", "MOONBATCH_RESULT_BACKEND")}
    server = EmbeddedRedis()
    try:
        server.start()
    except NoRedisServer as exc:
        raise Fail(str(exc)) from None
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
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _watch(output: str, settings, *, workers: LocalWorkers | None, timeout: float | None,
           show: bool = True) -> dict[str, Any]:
    """Follow a run until it is final; show a progress bar. Raises ``Fail`` if it cannot
    complete (failure recorded, workers died, timeout).

    With local ``workers`` this process also runs the reconciler for the run every
    ``reconcile_interval`` seconds, as a fleet's beat does, so a run started from a laptop heals
    from lost messages and a broker that restarted empty the same way.
    """
    from workers.runstate import Progress as RunProgress
    from workers.runstate import open_output

    store = open_output(output, settings)
    progress = RunProgress(store)
    start = time.time()
    reconciled = start
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn()]
    with Progress(*columns, console=err, disable=not show, transient=False) as bar:
        task = bar.add_task("planning", total=None, note="")
        while True:
            snap = progress.snapshot()
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
                _reconcile(settings, output, snap["run_id"])
            if timeout is not None and time.time() - start > timeout:
                raise Fail(f"run {snap['run_id']} not complete after {timeout:.0f}s; it goes on: "
                           f"moonbatch wait {snap['run_id']}")
            age = time.time() - start  # each look lists the run's state: back off as it ages
            time.sleep(0.2 if age < 10 else 2.0 if age < 600 else 10.0)


def _reconcile(settings, output: str, run_id: str) -> None:
    """One reconciler pass over the run (see ``workers.tasks.reconcile``); a broker that is
    down for now is tried again at the next pass."""
    from workers import canary
    from workers.tasks import reconcile_run

    try:
        lost = canary.broker_lost(settings, run_id)
        counts = reconcile_run(output, run_id, full=lost)
        if lost:
            err.print(f"the broker lost its data: re-enqueued the work of run {run_id} "
                      f"({', '.join(f'{n} {a}' for a, n in sorted(counts.items())) or 'nothing left'})")
    except Exception as exc:
        err.print(f"[yellow]reconcile of run {run_id} failed for now:[/yellow] "
                  f"{type(exc).__name__}: {str(exc)[:200]}")


def _print_summary(snap: dict[str, Any]) -> None:
    c = snap["counts"]
    table = Table(show_header=False, box=None)
    for k, v in (("run", snap["run_id"]), ("status", snap["status"]), ("skill", snap["skill"]),
                 ("items", c["total"]), ("ok", c["ok"]), ("error", c["error"]),
                 ("skipped (not images)", c["skipped"]),
                 ("batches", len(snap["batches"])),
                 ("tokens in/out", f"{snap['usage']['input_tokens']}/{snap['usage']['output_tokens']}"),
                 ("wall time", f"{snap['timings'].get('wall_seconds', 0):.1f}s"),
                 ("results", snap["output"] + "results/"), ("summary", snap["output"] + "run.json")):
        table.add_row(str(k), str(v))
    out.print(table)


def _submit(input_url: str, output_url: str, opts, settings, shard_size: int | None,
            max_pixels: int | None = None, run_id: str | None = None,
            queue: str | None = None) -> dict:
    from producer.runs import submit_run

    if shard_size is not None and not 1 <= shard_size <= 100_000:
        raise Fail("--shard-size must be within 1..100000 (the Batch API's line limit)", code=2)
    if max_pixels is not None and max_pixels < 0:
        raise Fail("--max-pixels must be >= 0 (0 turns downscaling off)", code=2)
    return submit_run(input_url, output_url, opts, settings, shard_size=shard_size,
                      max_pixels=max_pixels, run_id=run_id, queue=queue)


def _run(input_url: str, output_url: str, opts, *, shard_size: int | None, workers: int | None,
         timeout: float | None, max_pixels: int | None = None, run_id: str | None = None,
         embedded: bool = False) -> dict[str, Any]:
    """Submit a run and follow it to the end (see ``run``); with ``workers`` > 0 start that
    many local workers on the run's private queue, and with ``embedded`` (or
    ``MOONBATCH_BROKER_URL=embedded``) a private broker too. Raises ``Fail``."""
    from config import get_settings
    from producer.runs import local_queue, new_run_id
    from workers.embedded import EMBEDDED

    settings = get_settings()
    n = (os.cpu_count() or 1) if workers is None else workers
    if n < 0:
        raise Fail("--workers must be >= 0", code=2)
    embedded = embedded or settings.broker_url == EMBEDDED
    if embedded and n == 0:
        raise Fail("an embedded broker serves only this command's own workers: use --workers N "
                   "(N > 0), or a shared broker for a fleet", code=2)
    run_id = run_id or new_run_id()
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
            plan = _submit(input_url, output_url, opts, settings, shard_size, max_pixels, run_id,
                           queue=queue)
            err.print(f"run [bold]{plan['run_id']}[/bold]: {plan['items']} images in "
                      f"{plan['shards']} shard(s); {plan['skipped']} other objects skipped")
            return _watch(output_url, settings, workers=local, timeout=timeout)
        finally:
            if local is not None:
                local.stop()


@app.command()
def run(input: Annotated[str, typer.Argument(help="s3://bucket/prefix/ or a local directory")],
        output: Annotated[str, typer.Argument(help="s3://bucket/prefix/ or a local directory")],
        skill: SkillOpt = "caption", length: LengthOpt = None, question: QuestionOpt = None,
        object: ObjectOpt = None, reasoning: ReasoningOpt = None,
        temperature: TemperatureOpt = None, top_p: TopPOpt = None,
        max_tokens: MaxTokensOpt = None, shard_size: ShardSizeOpt = None,
        max_pixels: MaxPixelsOpt = None, workers: WorkersOpt = None,
        timeout: TimeoutOpt = None,
        embedded_broker: Annotated[bool, typer.Option(
            "--embedded-broker", help="start a private broker for this run's local workers "
            "(no Redis needed; same as MOONBATCH_BROKER_URL=embedded)")] = False) -> None:
    """Annotate every image under INPUT; write results under OUTPUT; exit 0 when complete."""
    with _cli_errors():
        opts = _options(skill, length, question, object, reasoning, temperature, top_p, max_tokens)
        _print_summary(_run(input, output, opts, shard_size=shard_size, workers=workers,
                            timeout=timeout, max_pixels=max_pixels, embedded=embedded_broker))


@app.command()
def submit(input: Annotated[str, typer.Argument()], output: Annotated[str, typer.Argument()],
           skill: SkillOpt = "caption", length: LengthOpt = None, question: QuestionOpt = None,
           object: ObjectOpt = None, reasoning: ReasoningOpt = None,
           temperature: TemperatureOpt = None, top_p: TopPOpt = None,
           max_tokens: MaxTokensOpt = None, shard_size: ShardSizeOpt = None,
           max_pixels: MaxPixelsOpt = None) -> None:
    """Plan and enqueue a run for a worker fleet; print its run id on the last line."""
    from config import get_settings

    with _cli_errors():
        _no_embedded(get_settings(), "submit")
        opts = _options(skill, length, question, object, reasoning, temperature, top_p, max_tokens)
        plan = _submit(input, output, opts, get_settings(), shard_size, max_pixels)
        err.print(f"{plan['items']} images in {plan['shards']} shard(s); "
                  f"{plan['skipped']} other objects skipped; results: {output}")
        print(plan["run_id"])


@app.command()
def status(run_ref: Annotated[str, typer.Argument(metavar="RUN_ID", help="run id or OUTPUT URL")],
           as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Print a run's progress."""
    from config import get_settings
    from producer.runs import resolve_run
    from workers.runstate import Progress as RunProgress
    from workers.runstate import open_output

    with _cli_errors():
        output = resolve_run(run_ref, get_settings())
        try:
            snap = RunProgress(open_output(output, get_settings())).snapshot()
        except Exception as exc:
            from workers.storage import NotFound

            if isinstance(exc, NotFound):
                raise Fail(f"no moonbatch run at {output}") from None
            raise
        if as_json:
            print(json.dumps(snap, indent=2))
            return
        c, s = snap["counts"], snap["shards"]
        out.print(f"run {snap['run_id']}: [bold]{snap['status']}[/bold]  "
                  f"{c['done']}/{c['total'] if c['total'] is not None else '?'} items done "
                  f"(ok {c['ok']}, error {c['error']}, in flight {c['in_flight']}); shards merged "
                  f"{s['merged']}/{s['total'] if s['total'] is not None else '?'}, "
                  f"submitted {s['submitted']}")
        if snap["failure"]:
            out.print(f"[red]failure:[/red] {snap['failure']['where']}: {snap['failure']['error']}")


@app.command()
def runs(limit: Annotated[int, typer.Option("--limit", metavar="N",
                                            help="show the N newest runs")] = 20,
         as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List runs from the registry (MOONBATCH_STATE_URL), newest first: run id, status, input,
    output, counts and start time."""
    from config import get_settings
    from workers import registry
    from workers.runstate import Progress as RunProgress
    from workers.runstate import open_output

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


@app.command()
def wait(run_ref: Annotated[str, typer.Argument(metavar="RUN_ID", help="run id or OUTPUT URL")],
         timeout: TimeoutOpt = None) -> None:
    """Block until the run is complete (exit 0) or cannot complete (exit 1)."""
    from config import get_settings
    from producer.runs import resolve_run

    with _cli_errors():
        settings = get_settings()
        _print_summary(_watch(resolve_run(run_ref, settings), settings, workers=None,
                              timeout=timeout))


def _requeue(run_ref: str, settings) -> tuple[str, str] | None:
    """Re-enqueue every unfinished step of a run on its own queue; print what was done.
    Returns ``(output, queue)``, or None when the run is already complete. Raises ``Fail``."""
    from producer.runs import register_run, resolve_run
    from workers import layout
    from workers.runstate import open_run, run_queue
    from workers.storage import get_json_or_none
    from workers.tasks import advance_shard, enqueue, finalize_run

    output = resolve_run(run_ref, settings)
    run = open_run(output, settings)
    store = run.output
    if store.exists(layout.FINALIZED):
        out.print(f"run {run.spec.run_id} is already complete")
        return None
    if store.exists(layout.CANCELLED):
        raise Fail(f"run {run.spec.run_id} was cancelled; start a new run instead")
    plan = get_json_or_none(store, layout.PLAN)
    if plan is None:
        raise Fail(f"run {run.spec.run_id} was never fully planned (the producer stopped "
                   "while listing); submit it again to a new OUTPUT")
    store.delete(layout.FAILED)  # a recorded failure is retried, not inherited
    register_run(run.spec, settings)  # again: the registry or canary may be new
    counts: dict[str, int] = {}
    for shard in range(plan["shards"]):
        action = advance_shard(run, shard, only_stale=False) or "nothing"
        counts[action] = counts.get(action, 0) + 1
    queue = run_queue(run.spec, settings)
    enqueue(finalize_run, (output, run.spec.run_id), queue=queue)
    out.print(f"run {run.spec.run_id}: " + ", ".join(
        f"{n} shard(s) {a}" for a, n in sorted(counts.items())))
    return output, queue


@app.command()
def resume(run_ref: Annotated[str, typer.Argument(metavar="RUN_ID", help="run id or OUTPUT URL")],
           workers: Annotated[int, typer.Option(
               "--workers", help="start N local workers on the run's own queue and wait for it "
               "(a run that `moonbatch run` started with local workers)")] = 0,
           timeout: TimeoutOpt = None,
           embedded_broker: Annotated[bool, typer.Option(
               "--embedded-broker", help="with --workers: a private broker for them")] = False
           ) -> None:
    """Re-enqueue whatever a run still needs, on the run's own queue (after the broker lost its
    queues, or a failure you have fixed). Batches that exist are polled, not submitted again."""
    from config import get_settings
    from workers.embedded import EMBEDDED

    with _cli_errors():
        settings = get_settings()
        if workers < 0:
            raise Fail("--workers must be >= 0", code=2)
        embedded = embedded_broker or settings.broker_url == EMBEDDED
        if embedded and workers == 0:
            raise Fail("an embedded broker serves only this command's own workers: add "
                       "--workers N, or use a shared broker", code=2)
        with _embedded_broker() if embedded else contextlib.nullcontext():
            settings = get_settings()
            if workers:
                _check_broker(settings)
            done = _requeue(run_ref, settings)
            if done is None:
                return
            output, queue = done
            if not workers:
                if queue != settings.queue:
                    err.print(f"its work is on its own queue {queue} (its workers were `moonbatch "
                              f"run`'s): resume it with --workers N, or start workers with "
                              f"-Q {queue}")
                return
            if queue == settings.queue:
                raise Fail("this run's work is on the fleet's queue: resume it without --workers "
                           "and let the fleet take it", code=2)
            local = LocalWorkers(workers, queue)
            try:
                _print_summary(_watch(output, settings, workers=local, timeout=timeout))
            finally:
                local.stop()


@app.command()
def cancel(run_ref: Annotated[str, typer.Argument(metavar="RUN_ID", help="run id or OUTPUT URL")]
           ) -> None:
    """Stop a run: queued work becomes a no-op, builds in progress abort their uploads, open
    uploads are aborted, and run.json says "cancelled". Batches already submitted run on at
    the API (it has no cancel); their results are not merged."""
    from config import get_settings
    from producer.runs import resolve_run
    from workers import layout
    from workers.runstate import Progress as RunProgress
    from workers.runstate import open_output
    from workers.storage import get_json_or_none, put_json
    from workers.tasks import batch_client, run_final

    with _cli_errors():
        settings = get_settings()
        output = resolve_run(run_ref, settings)
        store = open_output(output, settings)
        if store.exists(layout.FINALIZED):
            raise Fail("the run is already complete")
        put_json(store, layout.CANCELLED, {"at": time.time()}, if_absent=True)
        aborted = 0
        if settings.moondream_api_key is not None:
            for obj in store.iter_objects(layout.SHARDS):
                if obj.key.endswith("/upload.json"):
                    doc = get_json_or_none(store, obj.key)
                    if doc:
                        batch_client().abort_upload(doc["file_id"], doc["upload_id"])
                        store.delete(obj.key)
                        aborted += 1
        snap = RunProgress(store).snapshot()
        snap["status"] = "cancelled"
        snap["timings"]["finished_at"] = time.time()
        put_json(store, layout.SUMMARY, snap)
        run_final(settings, snap["run_id"])
        out.print(f"run {snap['run_id']} cancelled ({aborted} open upload(s) aborted; "
                  f"{snap['counts']['done']} item(s) had results)")


def skimage_data_dir() -> Path:
    """The folder of sample photographs that scikit-image ships (``skimage/data``)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise Fail("scikit-image is not installed: pip install -e . installs it")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@app.command()
def demo(output: Annotated[Path, typer.Option("--output", help="where runs go")] = Path("moonbatch-demo"),
         skill: SkillOpt = "caption", length: LengthOpt = None, question: QuestionOpt = None,
         object: ObjectOpt = None, reasoning: ReasoningOpt = None,
         shard_size: ShardSizeOpt = 8, workers: WorkersOpt = 2,
         timeout: TimeoutOpt = 300.0) -> None:
    """Annotate scikit-image's sample photographs with no account and no servers: an embedded
    broker (a private redis-server), local storage and the Batch API emulator."""
    from config import reload_settings
    from emulator.server import EmulatorConfig, EmulatorServer
    from workers.app import reconfigure

    with _cli_errors():
        opts = _options(skill, length, question, object, reasoning, None, None, None)
        key = uuid.uuid4().hex
        with EmulatorServer(EmulatorConfig(api_key=key, chunking_seconds=0.5,
                                           processing_seconds=1.0, lines_per_second=50)) as emu:
            os.environ.update({
                "MOONBATCH_MOONDREAM_URL": emu.url, "MOONDREAM_API_KEY": key,
                "MOONBATCH_POLL_MIN_INTERVAL": "0.5", "MOONBATCH_POLL_MAX_INTERVAL": "2",
            })
            reconfigure(reload_settings())
            from producer.runs import new_run_id

            run_id = new_run_id()
            target = (output / run_id).resolve()
            source = skimage_data_dir()
            err.print(f"demo: {source} → {target} (emulated Moondream Batch API at {emu.url})")
            snap = _run(str(source), str(target), opts, shard_size=shard_size,
                        workers=max(1, workers or 1), timeout=timeout, run_id=run_id,
                        embedded=True)
        _print_summary(snap)
        first = next(iter(sorted((target / "results").glob("*.jsonl"))), None)
        if first is not None:
            row = json.loads(first.read_text().splitlines()[0])
            out.print(f"first row of {first.name}: {json.dumps(row, ensure_ascii=False)[:300]}")
        out.print(f"results are in {target / 'results'}")


@app.command()
def emulator(port: Annotated[int, typer.Option("--port")] = 8787,
             host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
             api_key: Annotated[Optional[str], typer.Option(
                 "--api-key", envvar="MOONDREAM_API_KEY", show_envvar=True,
                 help="key clients must send in X-Moondream-Auth")] = None) -> None:
    """Serve the Moondream Batch API emulator (for tests, benchmarks and offline work)."""
    from emulator.server import EmulatorConfig, EmulatorServer

    key = api_key or uuid.uuid4().hex
    server = EmulatorServer(EmulatorConfig(api_key=key), host=host, port=port)
    err.print(f"Moondream Batch API emulator on {server.url}"
              + ("" if api_key else f" (API key: {key})") + f"; files in {server.emulator.dir}")
    try:
        server.serve_forever()  # SIGINT, SIGTERM and SIGHUP end it (see main)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()  # deletes its folder


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
