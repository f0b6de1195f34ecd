"""Following a run to its end: look at its progress at a pace that backs off as it ages,
keep local workers alive, run the reconciler's pass for a run without a fleet's beat, and
notice queues that lost their consumers. Below the command line: it reports through
callbacks and raises ``moonbatch.errors`` classes."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from moonbatch.config import Settings
from moonbatch.errors import RunFailed, RunStopped, Timeout
from moonbatch.producer import ops
from moonbatch.producer.local import LocalWorkers
from moonbatch.workers.ends import FALLBACK_SECONDS, EndWatch
from moonbatch.workers.runstate import FINAL

log = logging.getLogger(__name__)

#: Seconds between two looks for a run's end (a read of ``run.json``) while it is followed:
#: the command returns this soon after the run's end (1 s once a run is an hour old).
END_CHECK = 0.2
#: Seconds between two looks at a young run's progress (a listing of its state and a read of
#: each document that changed: a few dozen requests): its end is looked for every
#: ``END_CHECK`` in between, so looking more often would only show progress sooner.
LOOK_YOUNG = 1.0
#: ``on_progress(snapshot)``: called after each look at the run.
ProgressFn = Callable[[dict[str, Any]], None]
#: ``on_notice(text, warning)``: something the user should know (workers revived, a queue
#: without consumer, a reconciler pass that re-enqueued work).
NoticeFn = Callable[[str, bool], None]


def _log_notice(text: str, warning: bool) -> None:
    log.log(logging.WARNING if warning else logging.INFO, "%s", text)


def follow(output: str, settings: Settings, *, workers: LocalWorkers | None = None,
           timeout: float | None = None, on_progress: ProgressFn | None = None,
           on_notice: NoticeFn | None = None, started: str | None = None) -> dict[str, Any]:
    """Block until the run at ``output`` is complete and return its final snapshot (the shape
    of ``run.json``). ``timeout`` in seconds (None: no limit). Raises ``RunStopped`` when the
    run ended ``stopped`` (budget, error rate). ``started``: the run's id when the caller has
    just enqueued it: its first look is ``LOOK_YOUNG`` from now (or at its announced end),
    not at once, when there is nothing to see yet and the run's first steps need the store.

    With local ``workers`` this also revives them if they die (``LocalWorkers.max_revivals``
    times) and runs the reconciler for the run every ``settings.reconcile_interval`` seconds,
    as a fleet's beat does; without them, it tells (``on_notice``) when no worker consumes one
    of the run's queues. Raises ``RunFailed`` (failed, cancelled, local workers dead for good),
    ``Timeout`` (the run goes on), ``RunNotFound``.
    """
    notice = on_notice or _log_notice
    start = reconciled = time.time()
    watch = _consumer_watch(output, settings) if workers is None else None
    announced: set[str] = set()
    reader = ops.progress_reader(output, settings)
    looked = False  # the last end check found no final summary just now
    final = None  # the final summary the last end check found
    ending: EndWatch | None = None  # the run's end announcement (ends), once subscribed
    tried = False  # to subscribe (once)
    look_first = False  # subscribed since the last look: the next wait looks once first
    with watch or contextlib.nullcontext(), contextlib.ExitStack() as stack:
        if started is not None:
            tried, ending = True, EndWatch.open(settings, started)
            if ending is not None:
                stack.callback(ending.close)
            looked, final = _await_end(reader, LOOK_YOUNG, END_CHECK, ending)
        while True:
            snap = final or ops.snapshot(output, settings, reader, look_final=not looked)
            rid = snap["run_id"]
            if not tried and snap["status"] not in FINAL:
                tried, ending = True, EndWatch.open(settings, rid)
                if ending is not None:
                    stack.callback(ending.close)
                    look_first = True
            if watch is not None:
                announced = _announce(watch, announced, rid, notice)
            if on_progress is not None:
                on_progress(snap)
            if snap["status"] == "completed":
                return snap
            if snap["status"] == "stopped":
                why = snap.get("stop_reason") or {}
                raise RunStopped(f"run {rid} stopped: {why.get('reason', '')}; every item has "
                                 f"a row (those not sent: {why.get('code')}); carry on with "
                                 f"`moonbatch retry-failed {rid} --max-cost USD`", run_id=rid,
                                 stop_reason=why, status=snap)
            if snap["status"] == "cancelled":
                raise RunFailed(f"run {rid} was cancelled", run_id=rid, status="cancelled")
            if snap["failure"]:
                f = snap["failure"]
                raise RunFailed(f"run {rid} cannot complete: {f['where']}: {f['error']}",
                                run_id=rid, failure=f)
            if workers is not None and workers.dead():
                code = workers.proc.returncode
                if not workers.revive():
                    raise RunFailed("the local worker processes exited:\n" + workers.tail(),
                                    run_id=rid)
                notice(f"the local worker processes exited (code {code}); started them again "
                       f"({workers.revivals}/{workers.max_revivals})", True)
            if workers is not None and time.time() - reconciled >= settings.reconcile_interval:
                reconciled = time.time()
                _reconcile(output, rid, notice)
            if timeout is not None and time.time() - start > timeout:
                raise Timeout(f"run {rid} not complete after {timeout:.0f}s; it goes on: "
                              f"moonbatch wait {rid}", run_id=rid)
            age = time.time() - start  # each look lists the run's state: back off as it ages
            looked, final = _await_end(
                reader, LOOK_YOUNG if age < 10 else 2.0 if age < 600 else 10.0,
                END_CHECK if age < 3600 else 1.0, ending, first=look_first)
            look_first = False


def _await_end(reader: Any, seconds: float, every: float, ending: EndWatch | None = None, *,
               first: bool = False) -> tuple[bool, dict[str, Any] | None]:
    """Wait ``seconds``, looking for the run's end (one read of ``run.json``) every ``every``
    seconds, or, while ``ending`` is subscribed, when the end is announced and at least every
    ``ends.FALLBACK_SECONDS``: a run's end is noticed at once (or within ``every``) however
    long it ran and however slowly its progress is looked at. ``first``: look once before
    waiting. A read that fails is left to the next snapshot. Returns ``(looked, final)``:
    ``final`` the final summary found (the next snapshot), else ``looked`` True when the last
    look, just now, found the run not final (the next snapshot need not read ``run.json``)."""
    deadline = time.monotonic() + seconds
    looked = False
    while (left := deadline - time.monotonic()) > 0:
        if first:
            first = False
        elif ending is not None and ending.alive:
            if not ending.wait(min(FALLBACK_SECONDS, left)) and deadline <= time.monotonic():
                break  # the next snapshot looks
        else:
            time.sleep(min(every, left))
        try:
            final = reader.final()
        except Exception:  # storage errors: the next full look raises or retries them
            return False, None
        if final is not None:
            return False, final
        looked = True
    return looked, None


def _consumer_watch(output: str, settings: Settings):
    """A ``workers.consumers.ConsumerWatch`` over the run's queues, not yet started; None when
    there is no shared broker to ask (embedded) or the run's spec cannot be read."""
    from moonbatch.workers.app import app as celery_app
    from moonbatch.workers.consumers import ConsumerWatch
    from moonbatch.workers.embedded import EMBEDDED

    if settings.broker_url == EMBEDDED:
        return None
    try:
        queues = ops.run_queues(output, settings)
    except Exception:  # no spec to read: nothing to name; the run's state says the rest
        return None
    return ConsumerWatch(celery_app, queues, first=1.0, recheck=2.0, every=30.0)


def _announce(watch, announced: set[str], run_id: str, notice: NoticeFn) -> set[str]:
    """Tell, once each time it happens, that a queue of the run lost (or found) its consumers;
    returns the queues announced as without one (the next call's ``announced``)."""
    missing = watch.unconsumed()
    if set(missing) - announced:
        notice(ops.no_consumer_text(missing, watch.queues, run_id) + "; still waiting", True)
    back = [q for q in watch.queues if q in announced and q not in missing]
    if back:
        notice(f"a worker now consumes {', '.join(back)}", False)
    return set(missing)


def _reconcile(output: str, run_id: str, notice: NoticeFn) -> None:
    """One reconciler pass over the run; a broker that is down for now is tried again at the
    next pass."""
    try:
        lost, counts = ops.reconcile_once(output, run_id)
        if lost:
            done = ", ".join(f"{n} {a}" for a, n in sorted(counts.items())) or "nothing left"
            notice(f"the broker lost its data: re-enqueued the work of run {run_id} ({done})",
                   False)
    except Exception as exc:
        notice(f"reconcile of run {run_id} failed for now: {type(exc).__name__}: "
               f"{str(exc)[:200]}", True)
