"""What can be done to a run once it exists, below any command line: find it, read its
progress, cancel it, clean its OUTPUT, re-enqueue its unfinished work, retry its error rows,
and say which of its queues no worker consumes. Each returns data (a dict); the command line
renders it and the Python API (``moonbatch.api.Run``) returns it.

Raises ``moonbatch.errors`` classes for what a caller tells apart, and storage errors.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any

from moonbatch.config import Settings
from moonbatch.errors import (
    InvalidOption,
    MoonbatchError,
    NoConsumer,
    OutputConflict,
    RunNotFound,
    RunStopped,
    translated,
)


# -- recovery (``run_final``, ``reconcile_run``, ``reconcile_active_run``), imported when used:
# moonbatch.workers.reconcile never builds the Celery app.
def _tasks():
    from moonbatch.workers import reconcile

    return reconcile


def resolve(ref: str | None, settings: Settings) -> str:
    """The OUTPUT URL of the run ``ref`` names (a run id or an OUTPUT URL); None: the newest run
    in the registry. Raises ``RunNotFound``."""
    from moonbatch.producer.runs import resolve_run
    from moonbatch.workers import registry

    if ref is None:
        state = registry.open_state(settings)
        newest = next(registry.iter_runs(state, limit=1), None)
        if newest is None:
            raise RunNotFound(f"no runs in the registry at {state.url}: pass a RUN_ID or OUTPUT")
        return newest["output"]
    with translated():
        return resolve_run(ref, settings)


def snapshot(output: str, settings: Settings, reader: Any = None, *,
             look_final: bool = True) -> dict[str, Any]:
    """The run's progress: the shape of ``run.json`` (README "Output"). ``reader``: a
    ``progress_reader`` of the run kept between looks (it caches what no longer changes);
    ``look_final`` as ``Progress.snapshot`` takes it. Raises ``RunNotFound`` when no run is at
    ``output``."""
    from moonbatch.workers.storage import NotFound

    try:
        return (reader or progress_reader(output, settings)).snapshot(look_final=look_final)
    except NotFound:
        raise RunNotFound(f"no moonbatch run at {output}") from None


def progress_reader(output: str, settings: Settings) -> Any:
    """A ``workers.runstate.Progress`` of the run at ``output``: its ``snapshot()`` and its
    ``final()`` (one read of ``run.json``: the run's final summary, or None)."""
    from moonbatch.workers.runstate import Progress, open_output

    return Progress(open_output(output, settings))


def run_queues(output: str, settings: Settings) -> list[str]:
    """The run's two broker queues: its queue (builds, merges) and its control queue (polls,
    finalising). Raises ``RunNotFound`` and storage errors."""
    from moonbatch.workers.runstate import control_queue, open_run, run_queue

    with translated():
        queue = run_queue(open_run(output, settings).spec, settings)
    return [queue, control_queue(queue, settings)]


def no_consumer_text(missing: list[str], queues: list[str], run_id: str) -> str:
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


def unconsumed(output: str, settings: Settings, *, running_only: dict[str, Any] | None = None
               ) -> list[str] | None:
    """The run's queues that no worker consumes now (one look, about
    ``moonbatch.workers.consumers.LOOK_TIMEOUT`` seconds); None when the broker cannot be asked
    (embedded, out of reach), the spec cannot be read, or ``running_only`` (a snapshot) is
    given and the run is not running."""
    from moonbatch.workers.app import app as celery_app
    from moonbatch.workers.consumers import without_consumer
    from moonbatch.workers.embedded import EMBEDDED

    if running_only is not None and running_only["status"] != "running":
        return None
    if settings.broker_url == EMBEDDED:
        return None
    try:
        queues = run_queues(output, settings)
    except Exception:  # no spec to read: nothing to name
        return None
    return without_consumer(celery_app, queues)


def where_the_work_is(output: str, settings: Settings) -> str | None:
    """After work was enqueued without local workers: a line naming the queue and the way to
    serve it when no worker consumes one of the run's queues (or none answered and the queues
    are the run's own); None when a worker consumes both."""
    from moonbatch.workers.app import app as celery_app
    from moonbatch.workers.consumers import without_consumer
    from moonbatch.workers.runstate import open_run

    spec = open_run(output, settings).spec
    queues = run_queues(output, settings)
    missing = without_consumer(celery_app, queues)
    if missing:
        return no_consumer_text(missing, queues, spec.run_id)
    if missing is None and queues[0] != settings.queue:  # no answer: say where the work is
        return (f"its work is on its own queues {queues[0]} and {queues[1]} (its workers were "
                "`moonbatch run`'s): add --workers N, or start workers with "
                f"-Q {queues[0]},{queues[1]}")
    return None


def reconcile_once(output: str, run_id: str) -> tuple[bool, dict[str, int]]:
    """One reconciler pass over the run (``workers.reconcile.reconcile_active_run``): ``(the broker
    had lost the run's messages, {action: shards})``."""
    return _tasks().reconcile_active_run(output, run_id)


def cancel(output: str, settings: Settings) -> dict[str, Any]:
    """Stop the run: queued work becomes a no-op, the provider cancels what it can
    (``Provider.cancel_run``), and ``run.json`` says cancelled. Returns ``{"run_id",
    "provider", "stopped": provider work stopped, "done": items with results}``. Raises
    ``MoonbatchError`` for a complete run, ``RunNotFound``."""
    from moonbatch.workers import layout
    from moonbatch.workers.providers import provider_for
    from moonbatch.workers.runstate import iso_time, open_output, open_run
    from moonbatch.workers.storage import put_json

    store = open_output(output, settings)
    if store.exists(layout.FINALIZED):
        raise MoonbatchError("the run is already complete")
    with translated():
        run = open_run(output, settings)
    put_json(store, layout.CANCELLED, {"at": time.time()}, if_absent=True)
    stopped = provider_for(run.spec).cancel_run(run)
    snap = snapshot(output, settings)
    snap["status"] = "cancelled"
    snap["timings"]["finished_at"] = iso_time(time.time())
    put_json(store, layout.SUMMARY, snap)
    _tasks().run_final(settings, snap["run_id"])
    return {"run_id": snap["run_id"], "provider": run.spec.provider, "stopped": stopped,
            "done": snap["counts"]["done"]}


def clean(output: str, settings: Settings, *, force: bool = False) -> dict[str, Any]:
    """Delete what moonbatch wrote under OUTPUT (``_moonbatch/``, ``run.json``, its results
    files, its exports under ``annotations/``: COCO, Label Studio, YOLO, and ``report.html``;
    nothing else).
    Returns ``{"output", "run_id", "state", "deleted": objects deleted}``. Raises
    ``OutputConflict`` for a complete, running or planning run without ``force`` (a running one
    is cancelled first with it)."""
    from moonbatch.producer.runs import describe_output
    from moonbatch.workers import layout, registry, writers
    from moonbatch.workers.runstate import open_output
    from moonbatch.workers.storage import LocalStore, normalize_url, put_json

    output = normalize_url(output)
    store = open_output(output, settings)
    info = describe_output(store)
    state, spec = info["state"], info["raw_spec"] or {}
    run_id = spec.get("run_id")
    if state in ("completed", "running", "planning") and not force:
        what = {"completed": "is complete: its results are in " + output + "results/",
                "running": "is still running (moonbatch cancel it first)",
                "planning": "is being planned by a live producer"}[state]
        raise OutputConflict(f"run {run_id or '?'} at {output} {what}; pass --force to delete "
                             "it", run_id=run_id, state=state)
    if state in ("running", "planning"):  # stop its queued work before removing its state
        put_json(store, layout.CANCELLED, {"at": time.time()}, if_absent=True)
    suffixes = "|".join(writers.module(f).SUFFIX for f in writers.OUTPUT_FORMATS)
    pattern = re.compile(r"results/shard-\d{5}\.(" + suffixes + ")")
    keys = [o.key for o in store.iter_objects(layout.STATE)]
    keys += [o.key for o in store.iter_objects(layout.RESULTS) if pattern.fullmatch(o.key)]
    keys += layout.export_keys(o.key for o in store.iter_objects(layout.ANNOTATIONS))
    keys += [k for k in (layout.SUMMARY, layout.REPORT) if store.exists(k)]
    for key in sorted(keys, key=lambda k: k == layout.SPEC):  # the spec last
        store.delete(key)
    if keys and isinstance(store, LocalStore):  # folders left empty
        for folder in (layout.STATE, layout.RESULTS, layout.ANNOTATIONS):
            _remove_empty_dirs(store.root / folder)
    if keys and run_id:
        with contextlib.suppress(Exception):  # the registry only helps find runs
            registry.forget_run(registry.open_state(settings), run_id)
            _tasks().run_final(settings, run_id)
    return {"output": output, "run_id": run_id, "state": state, "deleted": len(keys)}


def _remove_empty_dirs(root: Path) -> None:
    """Remove ``root`` and the folders under it that are empty (deepest first)."""
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def requeue(output: str, settings: Settings) -> dict[str, Any]:
    """Re-enqueue every unfinished step of the run on its own queue, or plan again a start that
    stopped before its plan was complete. Returns ``{"run_id", "complete": True}`` for a
    complete run (nothing done), ``{"run_id", "replanned": plan}`` or ``{"run_id", "counts":
    {action: shards}}``. Raises ``RunStopped`` for a stopped run (``retry-failed`` carries it
    on), ``MoonbatchError`` for a cancelled run, ``OutputConflict`` for
    one a live producer plans, ``PreflightError``."""
    from moonbatch.producer import preflight
    from moonbatch.producer.runs import describe_output, register_run, start_run
    from moonbatch.workers import layout
    from moonbatch.workers.runstate import open_run
    from moonbatch.workers.storage import get_json_or_none

    with translated():
        run = open_run(output, settings)
    store, rid = run.output, run.spec.run_id
    if store.exists(layout.FINALIZED):
        summary = get_json_or_none(store, layout.SUMMARY) or {}
        if summary.get("status") == "stopped":  # final: only a retry pass sends more
            why = summary.get("stop_reason") or {}
            raise RunStopped(f"run {rid} stopped ({why.get('reason', '')}): carry on with "
                             f"`moonbatch retry-failed {rid} --max-cost USD`", run_id=rid,
                             stop_reason=why, status=summary)
        return {"run_id": rid, "complete": True}
    if store.exists(layout.CANCELLED):
        raise MoonbatchError(f"run {rid} was cancelled; start a new run instead")
    with translated():
        preflight.preflight(settings, output_url=output, provider=run.spec.provider)
    plan = get_json_or_none(store, layout.PLAN)
    if plan is None:
        if describe_output(store)["state"] == "planning":
            raise OutputConflict(f"run {rid} is being planned by a live producer: follow it with "
                                 f"`moonbatch wait {rid}`", run_id=rid, state="planning")
        with translated():
            return {"run_id": rid, "replanned": start_run(run.spec, settings)}
    store.delete(layout.FAILED)  # a recorded failure is retried, not inherited
    register_run(run.spec, settings)  # again: the registry or canary may be new
    counts = _tasks().reconcile_run(output, rid, full=True)
    counts["nothing"] = plan["shards"] - sum(counts.values())
    return {"run_id": rid, "counts": {action: n for action, n in counts.items() if n}}


def retry(output: str, settings: Settings, codes: list[str] | None = None, *,
          dry_run: bool = False, local_workers: bool = False,
          max_cost: float | None = None) -> dict[str, Any]:
    """Start (or continue) a retry pass of a finished run's error rows
    (``moonbatch.workers.retries``) and enqueue its work. ``codes``: only error rows with these
    codes (default every one). ``local_workers``: the caller starts workers on the run's
    queues; without them, a run whose queues no worker consumes is refused (``NoConsumer``,
    naming the command that works) before anything changes. ``max_cost``: the run's new
    budget in dollars (spend so far counts; ``moonbatch.workers.stops``).

    Returns ``{"run_id", "action", ...}``: ``action`` is ``"continued"`` (a pass that stopped:
    ``pass``, ``items``, ``codes``, ``changed_codes``), ``"under_way"`` (dry run of a pass not
    finished), ``"nothing"`` (``wanted``, ``others``), ``"would_retry"`` (dry run: ``items``,
    ``shards``, ``chosen``, ``others``) or ``"started"`` (``pass``, ``items``, ``shards``,
    ``chosen``). Raises ``MoonbatchError`` (cancelled, failed, not finished: exit 3),
    ``NoConsumer``, ``PreflightError``."""
    from moonbatch.producer import preflight
    from moonbatch.producer.runs import register_run
    from moonbatch.workers import layout, retries, stops
    from moonbatch.workers.runstate import open_run
    from moonbatch.workers.storage import get_json_or_none

    with translated():
        run = open_run(output, settings)
    store, rid = run.output, run.spec.run_id
    if store.exists(layout.CANCELLED):
        raise MoonbatchError(f"run {rid} was cancelled: its items cannot be retried; start a "
                             "new run")
    wanted = sorted(set(codes)) if codes else None
    if max_cost is not None and max_cost < 0:
        raise InvalidOption(f"--max-cost {max_cost}: must be >= 0 (dollars)",
                            option="--max-cost", value=max_cost)
    doc, applied = retries.latest_pass(store)
    finalized = store.exists(layout.FINALIZED)
    if doc is not None and not (applied and finalized):  # a pass under way, or one that stopped
        base = {"run_id": rid, "pass": doc["pass"], "items": doc["items"], "codes": doc["codes"]}
        if dry_run:
            return {**base, "action": "under_way"}
        _need_consumer(output, settings, rid, local_workers)
        with translated():
            preflight.preflight(settings, output_url=output, provider=run.spec.provider)
        register_run(run.spec, settings)
        if max_cost is not None:
            stops.set_max_cost(store, max_cost)
            stops.clear_stop(store)
        if not applied:
            retries.apply_pass(store, doc)
        store.delete(layout.FAILED)  # a recorded failure is retried, not inherited
        _tasks().reconcile_run(output, rid, full=True)
        return {**base, "action": "continued", "changed_codes": wanted != doc["codes"]}
    if not finalized:
        failure = get_json_or_none(store, layout.FAILED)
        if failure:
            raise MoonbatchError(f"run {rid} failed before it finished ({failure.get('where')}: "
                                 f"{str(failure.get('error'))[:200]}): fix the cause and "
                                 f"`moonbatch resume {rid} --workers N`, then retry its failed "
                                 "items")
        raise MoonbatchError(f"run {rid} is not finished: wait for it (`moonbatch wait {rid}`), "
                             "then retry its failed items", exit_code=3)
    found, chosen, every = retries.find_errors(run, set(wanted) if wanted else None)
    items = sum(chosen.values())
    others = {c: n for c, n in sorted(every.items()) if c not in chosen}
    if not items:
        return {"run_id": rid, "action": "nothing", "wanted": wanted, "others": others}
    if dry_run:
        return {"run_id": rid, "action": "would_retry", "items": items, "shards": len(found),
                "chosen": chosen, "others": others}
    _need_consumer(output, settings, rid, local_workers)
    with translated():
        preflight.preflight(settings, output_url=output, provider=run.spec.provider)
    if max_cost is not None:
        stops.set_max_cost(store, max_cost)  # before the run reopens: its sends see it
    stops.new_sample(run, settings)  # --max-error-rate judges the pass's own results
    doc = retries.record_pass(store, found, set(wanted) if wanted else None, chosen)
    register_run(run.spec, settings)  # on the reconciler's list before the run reopens
    retries.apply_pass(store, doc, found)
    _tasks().reconcile_run(output, rid, full=True)
    return {"run_id": rid, "action": "started", "pass": doc["pass"], "items": items,
            "shards": len(found), "chosen": chosen}


def _need_consumer(output: str, settings: Settings, run_id: str, local_workers: bool) -> None:
    """``NoConsumer`` when work enqueued now would wait on queues nobody serves: a queue of the
    run no worker consumes, or the run's private queues (``moonbatch run``'s) when the broker
    does not answer; nothing when the caller starts local workers."""
    from moonbatch.producer.runs import local_queue

    if local_workers:
        return
    missing = unconsumed(output, settings)
    queues = run_queues(output, settings)
    private = queues[0] == local_queue(run_id)
    if missing or (missing is None and private):
        if missing is None:
            missing = queues
        raise NoConsumer(no_consumer_text(missing, queues, run_id).split(": start workers")[0]
                         + f": add --workers N (moonbatch retry-failed {run_id} --workers N), "
                         f"or start workers with: celery -A moonbatch.workers worker -Q "
                         f"{','.join(queues)}; nothing was changed")
