"""``moonbatch status``, ``moonbatch runs`` and ``moonbatch wait``: look at runs and follow
one to its end. Without a RUN_ID, ``status`` and ``wait`` take the newest run in the
registry."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from moonbatch.producer.cli import app
from moonbatch.producer.cli.console import cli_errors, err, interruptible, notice, out
from moonbatch.producer.cli.options import (
    FollowWorkersOpt,
    JsonOpt,
    NewestRunRefArg,
    ReportOpt,
    ReportOutOpt,
    SampleOpt,
    TimeoutOpt,
    epilog,
)
from moonbatch.producer.cli.render import (
    ProgressView,
    print_skipped,
    print_summary,
    spend_text,
    status_line,
)
from moonbatch.producer.report import DEFAULT_SAMPLE


@app.command(epilog=epilog("moonbatch status                       # the newest run",
                           "moonbatch status 20250101-120000-a1b2c3",
                           "moonbatch status s3://annotations/2024/ --json | jq .counts",
                           "moonbatch status RUN_ID --skipped > skipped.txt"))
def status(run_ref: NewestRunRefArg = None, as_json: JsonOpt = False,
           skipped: Annotated[bool, typer.Option(
               "--skipped", help="list every object of INPUT skipped as not an image, one key "
               "per line")] = False) -> None:
    """Print a run's progress: items done, its provider (and fal endpoint), batches at the
    provider, shards merged; for a running run, whether a worker consumes each of its queues.

    Exits 0 for a running or completed run, 1 for a failed or cancelled one, 5 for a stopped
    one (budget or error rate).
    """
    from moonbatch.config import get_settings
    from moonbatch.producer import ops

    with cli_errors():
        settings = get_settings()
        output = ops.resolve(run_ref, settings)
        snap = ops.snapshot(output, settings)
        if skipped:
            print_skipped(output, snap, settings)
        else:
            snap["queues_without_consumer"] = ops.unconsumed(output, settings, running_only=snap)
            if as_json:
                print(json.dumps(snap, indent=2))
            else:
                _print_status(output, snap, settings)
        if snap["status"] in ("failed", "cancelled"):
            raise typer.Exit(1)
        if snap["status"] == "stopped":
            raise typer.Exit(5)


def _print_status(output: str, snap: dict[str, Any], settings) -> None:
    """The status line, then what needs attention: skipped objects, a failure, queues without
    a consumer."""
    from moonbatch.producer import ops

    out.print(status_line(snap), highlight=False, soft_wrap=True)
    c = snap["counts"]
    if c.get("skipped"):
        out.print(f"{c['skipped']} object(s) skipped (not images): moonbatch status "
                  f"{snap['run_id']} --skipped", highlight=False, soft_wrap=True)
    spend = snap.get("spend") or {}
    if spend:
        out.print(spend_text(spend), highlight=False, soft_wrap=True)
    if snap.get("stop_reason"):
        out.print(f"[yellow]stopped:[/yellow] {escape(snap['stop_reason'].get('reason', ''))} "
                  f"(items not sent: {escape(str(snap['stop_reason'].get('code')))})",
                  soft_wrap=True)
    if snap["failure"]:
        out.print(f"[red]failure:[/red] {escape(snap['failure']['where'])}: "
                  f"{escape(str(snap['failure']['error']))}", soft_wrap=True)
    if snap["queues_without_consumer"]:
        out.print("[yellow]" + escape(ops.no_consumer_text(
            snap["queues_without_consumer"], ops.run_queues(output, settings),
            snap["run_id"])) + "[/yellow]", highlight=False, soft_wrap=True)


@app.command(epilog=epilog("moonbatch runs --limit 5",
                           "moonbatch runs --json | jq '.[] | select(.status==\"running\")'"))
def runs(limit: Annotated[int, typer.Option("--limit", metavar="INTEGER",
                                            help="show the INTEGER newest runs")] = 20,
         as_json: JsonOpt = False) -> None:
    """List runs from the registry (MOONBATCH_STATE_URL), newest first: run id, status, input,
    output, counts and start time."""
    from moonbatch.config import get_settings
    from moonbatch.producer import ops
    from moonbatch.workers import registry

    with cli_errors():
        settings = get_settings()
        rows = []
        for entry in registry.iter_runs(registry.open_state(settings), limit=max(0, limit)):
            row = {**entry, "status": "unknown", "counts": None}
            try:
                snap = ops.snapshot(entry["output"], settings)
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


def follow(output: str, settings, workers: int | None, timeout: float | None,
           where: dict[str, Any]) -> None:
    """Follow the run at ``output`` to its end with ``workers`` local worker processes on its
    own queue (none: a fleet does the work), showing its progress; print its summary."""
    from moonbatch.producer.local import follow_with_workers

    where["output"] = output
    with ProgressView() as view:
        snap = follow_with_workers(output, settings, workers, timeout=timeout,
                                   on_progress=view.update, on_notice=notice)
    print_summary(snap)


@app.command(epilog=epilog("moonbatch wait                         # the newest run",
                           "moonbatch wait RUN_ID --timeout 3600",
                           "moonbatch wait s3://annotations/2024/ --workers 4 --report"))
def wait(run_ref: NewestRunRefArg = None, timeout: TimeoutOpt = None,
         workers: FollowWorkersOpt = None, report: ReportOpt = False) -> None:
    """Block until the run is complete (exit 0), cannot complete (exit 1) or stopped (exit 5:
    budget or error rate); print its summary."""
    from moonbatch.config import get_settings
    from moonbatch.producer import ops, preflight
    from moonbatch.workers.runstate import open_run

    where: dict[str, Any] = {"workers": workers}
    with cli_errors(), interruptible(where), reporting(report, where):
        settings = get_settings()
        output = ops.resolve(run_ref, settings)
        if workers:
            preflight.preflight(settings, state=False,
                                provider=open_run(output, settings).spec.provider)
        follow(output, settings, workers, timeout, where)


@app.command(name="report", epilog=epilog(
    "moonbatch report                      # the newest run: OUTPUT/report.html",
    "moonbatch report RUN_ID --sample 200 --out run.html && xdg-open run.html",
    "moonbatch report s3://annotations/2024/ --out s3://team-reports/2024.html"))
def report_command(run_ref: NewestRunRefArg = None, sample: SampleOpt = DEFAULT_SAMPLE,
                   out_file: ReportOutOpt = None) -> None:
    """Write a run's report: one HTML file a browser opens from disk, with no server. It shows
    the run (input, output, provider, model, options, status, timings, items ok, error and
    skipped, tokens and cost), every error code with its count and examples, and a sample of
    rows as thumbnails with each skill's answer: captions and answers, detect boxes, points and
    segment masks drawn over the image. Prints where the report is.

    Images are read as the run's workers read them (the same rules for local files, private
    addresses and buckets); one that cannot be read is a tile saying why. Works on a running
    run too (the rows merged so far).
    """
    from moonbatch.config import get_settings
    from moonbatch.producer import ops
    from moonbatch.producer import report as reports

    with cli_errors():
        settings = get_settings()
        output = ops.resolve(run_ref, settings)
        print(reports.write(output, settings, sample=sample, out=out_file))


@contextlib.contextmanager
def reporting(wanted: bool, where: dict[str, Any]) -> Iterator[None]:
    """``--report`` of a command that follows a run: once the run is final (the block ends, or
    raises ``RunFailed`` or ``RunStopped``), write its report to OUTPUT/report.html and say
    where on stderr. The run's outcome decides the exit code: a report that cannot be
    written is a warning naming the command that writes it. ``where["output"]`` is the run's
    OUTPUT once known (a failed or stopped run is found by its id)."""
    from moonbatch.errors import RunFailed, RunStopped

    try:
        yield
    except (RunFailed, RunStopped) as exc:
        if wanted:
            write_report(exc.run_id)
        raise
    if wanted and where.get("output"):
        write_report(where["output"])


def write_report(ref: str) -> None:
    """Write the report of the run ``ref`` names (run id or OUTPUT) where it goes by default
    and print where; a failure is a warning line."""
    from moonbatch.config import get_settings
    from moonbatch.producer import ops
    from moonbatch.producer import report as reports

    try:
        settings = get_settings()
        where = reports.write(ops.resolve(ref, settings), settings)
    except Exception as exc:  # the run's own outcome stands; say how to try again
        notice(f"warning: the report could not be written ({type(exc).__name__}: "
               f"{' '.join(str(exc).split())[:300]}): `moonbatch report {ref}` writes it",
               warning=True)
        return
    err.print(f"report: {escape(where)}", highlight=False, soft_wrap=True)
