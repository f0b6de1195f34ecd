"""``moonbatch resume``, ``moonbatch retry-failed``, ``moonbatch cancel`` and ``moonbatch
clean``: act on a run that exists (``moonbatch.producer.ops`` does the work; this shows it)."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import typer

from moonbatch.producer.cli import app
from moonbatch.producer.cli.console import Fail, cli_errors, err, interruptible, notice, out
from moonbatch.producer.cli.inspect import follow
from moonbatch.producer.cli.options import (
    CodesArg,
    EmbeddedBrokerOpt,
    FollowWorkersOpt,
    OutputArg,
    RetryDryRunOpt,
    RetryMaxCostOpt,
    RunRefArg,
    TimeoutOpt,
    epilog,
)
from moonbatch.producer.cli.render import requeued_text, retried_text


def _broker_for(workers: int | None, embedded_broker: bool, settings):
    """The broker context of a repair command: a private one (``--embedded-broker`` or
    ``MOONBATCH_BROKER_URL=embedded``) needs ``--workers N``; otherwise none."""
    from moonbatch.producer.local import embedded_broker as private_broker
    from moonbatch.workers.embedded import EMBEDDED

    if workers is not None and workers < 0:
        raise Fail("--workers must be >= 0", code=2)
    if not (embedded_broker or settings.broker_url == EMBEDDED):
        return contextlib.nullcontext()
    if not workers:
        raise Fail("an embedded broker serves only this command's own workers: add "
                   "--workers N, or use a shared broker", code=2)
    return private_broker()


@app.command(epilog=epilog("moonbatch resume RUN_ID --workers 4   # on this machine, to the end",
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
    from moonbatch.producer import ops

    where: dict[str, Any] = {"workers": workers}
    with cli_errors(), interruptible(where):
        with _broker_for(workers, embedded_broker, get_settings()):
            settings = get_settings()
            output = ops.resolve(run_ref, settings)
            where["output"] = output
            done = ops.requeue(output, settings)
            out.print(requeued_text(done), highlight=False)
            if done.get("complete"):
                return
            if workers:
                follow(output, settings, workers, timeout, where)
            elif (text := ops.where_the_work_is(output, settings)) is not None:
                notice(text, warning=True)


@app.command("retry-failed", epilog=epilog(
    "moonbatch retry-failed RUN_ID --workers 4                      # every error row",
    "moonbatch retry-failed RUN_ID object_not_found read_failed     # only these codes",
    "moonbatch retry-failed s3://annotations/2024/ --dry-run        # how many, per code",
    "moonbatch retry-failed RUN_ID --max-cost 50 --workers 4        # a stopped run, more budget"))
def retry_failed(run_ref: RunRefArg, codes: CodesArg = None, workers: FollowWorkersOpt = None,
                 timeout: TimeoutOpt = None, dry_run: RetryDryRunOpt = False,
                 max_cost: RetryMaxCostOpt = None,
                 embedded_broker: EmbeddedBrokerOpt = False) -> None:
    """Send the error rows of a finished run again, into the same OUTPUT: their rows in
    results/ are replaced by the new outcome (ok, or the new error), so results/ still holds
    exactly one row per item; run.json counts again. Fix the cause first (objects restored,
    a key with quota). Run again after an interruption, it finishes the same pass. A run that
    stopped at its budget carries on with --max-cost USD (the new budget; spend so far counts).

    With --workers N, starts N local worker processes on the run's queue and follows the run
    to the end; without it, a fleet must consume the run's queues: when none does (a run of
    `moonbatch run`, whose workers were its own), it refuses (exit 3) and changes nothing.
    """
    from moonbatch.config import get_settings
    from moonbatch.producer import ops

    where: dict[str, Any] = {"workers": workers}
    with cli_errors(), interruptible(where):
        with _broker_for(workers, embedded_broker and not dry_run, get_settings()) \
                if not dry_run else contextlib.nullcontext():
            settings = get_settings()
            output = ops.resolve(run_ref, settings)
            where["output"] = output
            done = ops.retry(output, settings, codes, dry_run=dry_run,
                             local_workers=bool(workers), max_cost=max_cost)
            if done.get("changed_codes"):
                err.print(f"retry pass {done['pass']} of run {done['run_id']} "
                          f"({done['items']} item(s)) is not finished: continuing it (codes: "
                          f"{', '.join(done['codes'] or ['every error'])})", highlight=False)
            out.print(retried_text(done), highlight=False, soft_wrap=True)
            if done["action"] in ("started", "continued") and workers:
                follow(output, settings, workers, timeout, where)


@app.command(epilog=epilog("moonbatch cancel RUN_ID"))
def cancel(run_ref: RunRefArg) -> None:
    """Stop a run: queued work becomes a no-op, builds in progress abort their uploads, and
    run.json says "cancelled". The provider's work in flight is cancelled where it can be
    (fal: every request in flight; the Batch API: open uploads are aborted, but submitted
    batches run on, as the API has no cancel); results not merged yet are not merged."""
    from moonbatch.api import open_run

    with cli_errors():
        done = open_run(run_ref).cancel()
        from moonbatch.workers.providers import provider_of

        what = provider_of(done).wording.cancelled
        out.print(f"run {done['run_id']} cancelled ({done['stopped']} {what}; "
                  f"{done['done']} item(s) had results)")


@app.command(epilog=epilog("moonbatch clean s3://annotations/2024/        # a failed start",
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
    from moonbatch.producer import ops

    with cli_errors():
        done = ops.clean(output, get_settings(), force=force)
        if not done["deleted"]:
            out.print(f"nothing to clean at {done['output']}", highlight=False)
            return
        out.print(f"cleaned {done['output']}: {done['deleted']} object(s) of run "
                  f"{done['run_id'] or '?'} ({done['state'] or 'no run'}) deleted",
                  highlight=False, soft_wrap=True)
