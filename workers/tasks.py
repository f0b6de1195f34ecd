"""Celery tasks of the shard pipeline: thin wrappers that load state, call the provider and the
pure pieces, save. Provider-blind: the run's provider (``moonbatch.workers.providers``) does the talking.

    build_shard(r) ──► poll_round(r) ──(countdown, re-enqueued)──► merge_round(r) ──► finish
        ▲                 (never sleeps in a worker slot)              │
        └──── round r+1: a failed submission, or items with retryable errors ─┘

Arguments are keyword arguments ``output``, ``run`` (the run id), ``shard``, ``round`` and small
values: no API key, no presigned URL, no payload (Flower shows them). Delivery is at-least-once, so
every task is idempotent: it first looks at what storage already holds. Decisions are the pure
functions of ``moonbatch.workers.shard``; routing is ``moonbatch.workers.enqueue`` (by task name);
recovery (``advance_shard``, ``reconcile_run``, ``run_final``) is ``moonbatch.workers.reconcile``,
which ``moonbatch resume``, ``cancel`` and ``clean`` use without this module.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from moonbatch.config import Settings, get_settings
from moonbatch.workers import attempts, cache, layout, logs, metrics, stops, writers
from moonbatch.workers import shard as shard_state
from moonbatch.workers.app import app
from moonbatch.workers.enqueue import (
    BUILD_SHARD,
    FINALIZE_RUN,
    MERGE_ROUND,
    PARAMS,
    POLL_ROUND,
    RECONCILE,
    enqueue,
)
from moonbatch.workers.lease import Lease, LeaseLost, execution_owner, task_of
from moonbatch.workers.merge import fill_cached, merge_round
from moonbatch.workers.models import BatchRecord, RunSpec, ShardBuild, ShardDone
from moonbatch.workers.providers import (
    Later,
    ProviderError,
    Resend,
    RoundContext,
    TransientProviderError,
    provider_for,
)
from moonbatch.workers.reconcile import reconcile_active_runs, run_final
from moonbatch.workers.rowspool import iter_kept_lines, iter_stored_lines, put_round_rows
from moonbatch.workers.runstate import (
    Run,
    known_spec,
    maybe_finalize,
    open_output,
    open_run_reading,
    record_failure,
    run_queue,
)
from moonbatch.workers.storage import NotFound, StorageError, Store, get_json, get_json_or_none, put_json

log = logging.getLogger(__name__)

# A soft time limit is a clean retry (the build aborts its upload); workers.attempts caps it.
RETRYABLE = (TransientProviderError, StorageError, ConnectionError, TimeoutError, OSError,
             SoftTimeLimitExceeded)


class RunCancelled(Exception):
    """The run was cancelled: stop quietly."""


class RunTask(Task):
    """Base of pipeline tasks: a failure that outlasts its retries marks the run failed, with a
    message naming the shard and the error (errors of this project never carry secrets)."""

    abstract = True
    autoretry_for = RETRYABLE
    retry_backoff = 2
    retry_backoff_max = get_settings().task_retry_backoff_max
    retry_jitter = True
    max_retries = 8
    acks_late = True

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # noqa: ANN001
        try:
            call = {**dict(zip(PARAMS.get(self.name, ()), args, strict=False)), **(kwargs or {})}
            shard = call.get("shard")
            where = f"{self.name} shard {shard}" if shard is not None else self.name
            store = open_output(call["output"], get_settings())
            spec = get_json_or_none(store, layout.SPEC)
            if spec is None or spec.get("run_id") != call.get("run", spec.get("run_id")):
                # The run was cleaned (moonbatch clean), maybe for another run at the same
                # OUTPUT: a stale task's failure must not land in it.
                log.warning("%s of run %s failed after the run left %s: %s", self.name,
                            call.get("run", "?"), call["output"], type(exc).__name__)
                return
            record_failure(store, where=where, error=f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("could not record the failure of %s", self.name)


def _next(task: Task, args: tuple[Any, ...], countdown: float | None = None, *,
          spec: RunSpec | None = None) -> None:
    """Enqueue the pipeline's next step on the run's queue (``spec``: the run's, when the
    caller holds it, saves a read of it). Storage already records what that step is, so a
    publish the broker refuses (restarting, unreachable) is logged and left to the reconciler
    instead of failing the run; kombu's own reconnect is tried a few times."""
    queue = run_queue(spec, get_settings()) if spec is not None else None
    for attempt in range(3):
        try:
            enqueue(task.name, args, countdown=countdown, queue=queue)
            return
        except Exception as exc:
            error = exc
            time.sleep(0.5 * (attempt + 1))
    log.warning("shard %s round %s: could not enqueue %s (%s: %s); the reconciler will",
                args[2], args[3] if len(args) > 3 else 0, task.name, type(error).__name__,
                str(error)[:200])


def _unsent(ctx: RoundContext, error: dict[str, str]) -> None:
    """Record round ``ctx.rnd`` as built with nothing sent: every item of it gets ``error``
    (a stopped run's code). Replaces a build that stopped before sending (held lease)."""
    errors = {str(i): error for i in ctx.indices()}
    put_json(ctx.store, ctx.doc("build"),
             ShardBuild(lines=[], errors=errors, id_prefix=ctx.id_prefix).model_dump())


def line_id_prefix(run_id: str, shard: int, rnd: int) -> str:
    """The prefix of every line ``id`` a round sends (``"<10 hex>:"``): unique to the round, so
    a batch's results tell which round it belongs to (item ids repeat across runs)."""
    return hashlib.sha256(f"{run_id}/{shard}/{rnd}".encode()).hexdigest()[:10] + ":"


def _open(output: str, settings: Settings, run_id: str, shard: int, *docs: str,
          items: bool = False, reads: Sequence[Callable[[Store], Any]] = ()
          ) -> tuple[Run, bool, list[Any]]:
    """Open the run (``open_run``), and look whether it was cancelled or the shard is already
    merged, and read the JSON documents at ``docs`` (None: missing), what ``reads`` return,
    and, with ``items``, the shard's plan (``Run.hold_items``), all at once: one round trip's
    wait instead of one per look. Returns ``(run, stopped, docs + reads)``. Raises
    ``RunNotFound`` and storage errors."""
    plan = [lambda st: _get_or_none(st, layout.plan_items(shard))] if items else []
    run, (cancelled, done, *read) = open_run_reading(
        output, settings, run_id, lambda st: st.exists(layout.CANCELLED),
        lambda st: st.exists(layout.shard_doc(shard, "done")),
        *[lambda st, doc=doc: get_json_or_none(st, doc) for doc in docs], *reads, *plan)
    if items:
        run.hold_items(shard, read.pop())
    return run, cancelled or done, read


def _next_round(store: Store, output: str, run_id: str, shard: int, rnd: int, items: list[int],
                reason: str, base: int = 0) -> None:
    doc: dict[str, Any] = {"items": items, "reason": reason}
    if base:
        doc["base"] = base
    put_json(store, layout.round_doc(shard, rnd + 1, "todo"), doc, if_absent=True)
    _next(build_shard, (output, run_id, shard, rnd + 1))


def _context(run: Run, shard: int, rnd: int,
             heartbeat: Callable[[], None] = lambda: None, base: int = 0,
             lease: Lease | None = None,
             checkpointed: Callable[[dict[str, Any], float], None] | None = None,
             progress: Mapping[str, Any] | None = None) -> RoundContext:
    """The provider's view of round ``rnd`` of the shard (``base``: see ``shard.round_base``; the
    provider's settings count attempts from it; ``lease``: the shard's, renewed at once by the
    context's ``renew`` before a call that bills; ``checkpointed``: see ``_progress``;
    ``progress``: the round's progress document a poll read)."""
    logs.bind(provider=run.spec.provider)
    settings = get_settings()
    if base:
        settings = settings.model_copy(
            update={"max_item_attempts": settings.max_item_attempts + base})
    return RoundContext(run=run, shard=shard, rnd=rnd, settings=settings,
                        id_prefix=line_id_prefix(run.spec.run_id, shard, rnd),
                        heartbeat=heartbeat,
                        renew=(lambda force=True: lease.renew(force=force)) if lease
                        else lambda force=True: None,
                        progress=progress,
                        **({"checkpointed": checkpointed} if checkpointed else {}))


def _progress(store: Store, shard: int, rnd: int, chain: str, polls: int
              ) -> Callable[[dict[str, Any], float], None]:
    """Writes round ``rnd``'s ``progress.json`` for chain ``chain`` after ``polls`` polls (0:
    the build's, before the chain's first poll): the poll's ``fields`` (``Poll.progress``), the
    next look due in ``next_in`` seconds. A step that records the round as it goes calls it at each
    record (``RoundContext.checkpointed``), so the chain shows alive to ``poll_turn`` and the
    reconciler while it runs."""
    def write(fields: dict[str, Any], next_in: float) -> None:
        now = time.time()
        put_json(store, layout.round_doc(shard, rnd, "progress"), {
            **fields, "chain": chain, "polls": polls, "polled_at": now, "next_at": now + next_in})

    return write


def _leased(store: Store, shard: int, task_id: str | None, settings: Settings) -> Lease:
    """The shard's lease for this execution of task ``task_id`` (every build of a shard holds
    it, and every poll of a provider whose polls send: ``polls_only_look`` False). Owned by
    the execution, not the task id: a redelivered copy of a running task (same id) must not
    hold it beside the running one."""
    return Lease(store, layout.shard_doc(shard, "lease"), execution_owner(task_id),
                 settings.lease_seconds)


def _wait_note(lease: Lease, task_id: str | None, shard: int, rnd: int, step: str,
               wait: float) -> None:
    """Log why a step of the shard waits for its lease: loudly when the holder is another
    execution of this very task (a redelivered copy of a running step)."""
    if task_id and task_of(lease.holder) == task_id:
        log.warning("shard %d round %d: another execution of this task holds the shard's lease "
                    "(this %s is a redelivered copy of a running one): waiting %.0fs instead of "
                    "running beside it", shard, rnd, step, wait)
    else:
        log.info("shard %d round %d: the shard's lease is held (%s): %s again in %.0fs", shard,
                 rnd, lease.holder, step, wait)


def _holder_done_in(lease: Lease, settings: Settings) -> float:
    """Seconds until another holder's lease of the shard runs out (a live holder renews it
    and the waiting task waits again), at most one lease."""
    return min(max(lease.holder_expires - time.time(), 0.0) + 0.5, settings.lease_seconds)


def _watchful(lease_check: Callable[[], None], store: Store, run_id: str,
              settings: Settings) -> Callable[[], None]:
    """A heartbeat for a provider: renews the lease, and stops the round (``RunCancelled``)
    when the run was cancelled (looked at every quarter lease)."""
    last_check = [time.monotonic()]

    def heartbeat() -> None:
        lease_check()
        if time.monotonic() - last_check[0] >= settings.lease_seconds / 4:
            last_check[0] = time.monotonic()
            if store.exists(layout.CANCELLED):
                raise RunCancelled(run_id)

    return heartbeat


def _later(settings: Settings, countdown: float, paced: bool = False) -> float:
    """A provider's "look again in" within the poll bounds (and the visibility timeout); a
    ``paced`` countdown (``Poll.paced``: the provider's own pace between steps) has no lower
    bound."""
    lo = 0.0 if paced else settings.poll_min_interval
    return max(lo, min(countdown, settings.poll_max_interval, settings.visibility_timeout / 4))


def _cache_pass(run: Run, ctx: RoundContext) -> bool:
    """Round 0's cache pass (``cache.scan``), once per shard: its outcome is the round's
    ``cache.json`` (kept, so a resume repeats it exactly; the provider sends ``ctx.todo``, its
    ``send``). Returns False when nothing is left to send: then it records an empty build,
    so the round goes to its merge (only served rows)."""
    store, key = run.output, ctx.doc("cache")
    doc = get_json_or_none(store, key)
    if doc is None:
        t0 = time.monotonic()
        reading, fetcher = cache.reads(run.spec), run.fetcher
        budget = run.settings.cache_read_memory

        def fetch(item: Any) -> bytes:  # kept for the build, within the budget: read once
            data = fetcher.get(item)
            fetcher.keep(item, data, budget)
            return data

        # Run-wide claims (a write per key sent) only where another shard could share a key:
        # a plan of one shard needs none (no plan yet, while a producer still lists: claims).
        plan = get_json_or_none(store, layout.PLAN) if reading else None
        claims = reading and (plan is None or plan.get("shards", 2) > 1)
        doc = cache.scan(ctx.items, run.spec, fetch,
                         cache.open_cache(run.spec, run.settings) if reading else None,
                         concurrency=run.settings.fetch_concurrency, heartbeat=ctx.heartbeat,
                         claim=cache.run_claims(store, ctx.shard) if claims else None)
        doc["counts"]["seconds"] = round(time.monotonic() - t0, 3)
        put_json(store, key, doc, if_absent=True)
        doc = get_json(store, key)  # another execution's, if it wrote first
        counts = doc["counts"]
        log.info("shard %d: cache pass: %d item(s), %d served by the cache, %d copies, %d "
                 "copies of other shards, %d to send (%.1fs)", ctx.shard, counts["items"],
                 counts["hits"], counts["copies"], counts.get("waits", 0), counts["send"],
                 counts.get("seconds", 0))
    ctx.__dict__.pop("todo", None)  # the context's todo is cache.json's send from now on
    items = ctx.items
    run.fetcher.release({(items[i].key, items[i].ref) for i in doc["send"]})
    if doc["send"]:
        return True
    empty = ShardBuild(lines=[], id_prefix=ctx.id_prefix)
    put_json(store, ctx.doc("build"), empty.model_dump(), if_absent=True)
    return False


@app.task(bind=True, base=RunTask, name=BUILD_SHARD)
def build_shard(self: Task, output: str, run: str, shard: int, round: int = 0) -> None:  # noqa: A002
    """Send round ``round`` of the shard (the provider builds, uploads, submits) under its
    lease, then schedule the first poll. If another live worker holds the lease, check back
    later. ``run`` is the run id."""
    run_id, rnd = run, round
    settings = get_settings()
    opened = time.time()  # the run seen not cancelled (the progress' looked_at)
    run, stopped, _ = _open(output, settings, run_id, shard, items=True)
    store = run.output
    if stopped:
        return
    lease = _leased(store, shard, self.request.id, settings)
    if not lease.acquire():
        # Another execution builds it (maybe a copy of this very message), or a dead one's
        # lease has not expired yet: look again when it would expire (a live holder renews it,
        # and this message waits again).
        wait = _holder_done_in(lease, settings)
        _wait_note(lease, self.request.id, shard, rnd, "build", wait)
        _next(build_shard, (output, run_id, shard, rnd), countdown=wait, spec=run.spec)
        return
    provider = provider_for(run.spec)
    chain = uuid.uuid4().hex  # the round's poll chain, alive from the build's checkpoints on
    try:
        with lease.kept_alive() as lease_check:
            ctx = _context(run, shard, rnd, _watchful(lease_check, store, run_id, settings),
                           lease=lease, checkpointed=_progress(store, shard, rnd, chain, 0))
            try:
                if rnd == 0 and run.spec.cache and not _cache_pass(run, ctx):
                    sent = False  # every item is served by the cache or copies one
                elif (refusal := stops.before_send(ctx, provider)) is not None:
                    _unsent(ctx, refusal)  # stopped (budget, error rate): nothing is sent
                    sent = False
                else:
                    sent = attempts.counted(ctx, "build", provider.submit_round, provider)
                # Every line answered within the build: record the round's end as its poll
                # would, under the lease, and merge (a poll would only find it done: one task
                # hop and its reads, ~0.2 s off a run's end).
                done = provider.done_at_submit(ctx) if sent else None
                if done is not None:
                    _progress(store, shard, rnd, chain, 0)(done, 0.0)
            except Later:
                raise
            except ProviderError:
                lease.renew(force=True)  # an upload aborted by a new holder: LeaseLost, quiet
                raise
    except (LeaseLost, RunCancelled) as exc:
        log.info("shard %d: build stopped: %s", shard, exc)
        return
    except Later as exc:
        wait = _later(settings, exc.countdown)
        log.info("shard %d round %d: %s; looking again in %.0fs", shard, rnd, exc, wait)
        _next(build_shard, (output, run_id, shard, rnd), countdown=wait, spec=run.spec)
        return
    finally:
        lease.release()
        run.fetcher.release()  # what the cache pass kept and the build did not take
    if not sent:  # nothing sendable: only error rows to write
        _next(merge_round_task, (output, run_id, shard, rnd), spec=run.spec)
    elif done is not None:
        _next(merge_round_task, (output, run_id, shard, rnd, 0), spec=run.spec)
    else:
        # A provider that steps at its own pace says when its first poll (its next step) is
        # due; the others are looked at no sooner than the poll interval.
        first = provider.first_poll_in(ctx)
        countdown = settings.poll_min_interval if first is None else \
            _later(settings, first, paced=True)
        held = None  # a provider that only looks: the chain's start, handed to its first poll
        fields = provider.progress_at_submit(ctx) \
            if provider.polls_only_look else None
        if fields is not None:
            doc, written = _chain_progress(store, shard, rnd, run_id, chain, 0, fields,
                                           countdown, opened, None)
            held = [doc, written] if written is not None else None
        _next(poll_round, (output, run_id, shard, rnd, chain, 0, None, held),
              countdown=countdown, spec=run.spec)


@app.task(bind=True, base=RunTask, name=POLL_ROUND)
def poll_round(self: Task, output: str, run: str, shard: int, round: int = 0,  # noqa: A002
               chain: str = "", polls: int = 0, last: list[float] | None = None,
               held: list[Any] | None = None) -> None:
    """Poll round ``round`` of run ``run`` once (the provider looks, and moves it on if it
    sends in steps: then under the shard's lease); re-enqueue itself with the provider's
    countdown until the round is done, then hand over to ``merge_round``.

    Each chain of polls has an id; a chain that finds another one alive (its next poll is due
    soon) stops, so resumes and reconciles never leave two chains polling one round. A
    provider whose polls only look (``polls_only_look``) is polled without the lease: the
    progress is written by compare-and-swap (``_look``), and a chain's next poll reads only
    the progress while it shows the chain's own last poll (``shard.chain_goes_on``; the
    spec as this process read it, the cancel looked at every quarter lease), or none at all
    when it is handed what its last poll wrote, ``held`` (``[progress, version]``: the
    compare-and-swap of the poll's own write shows whether it is still the round's).
    """
    run_id, rnd = run, round
    settings = get_settings()
    key = layout.round_doc(shard, rnd, "progress")
    spec = known_spec(output, run_id)
    provider = provider_for(spec) if spec is not None else None
    now = time.time()
    progress = version = None
    goes_on = False
    if held and (provider is None or provider.polls_only_look):
        # What the chain's last poll wrote, and its version: no read (the spec, once per
        # process); the write's compare-and-swap tells whether it is still the round's.
        run = open_run_reading(output, settings, run_id, known=True)[0]
        provider = provider_for(run.spec)
        if provider.polls_only_look:
            progress, version = held
            goes_on = shard_state.chain_goes_on(progress, run_id=run_id, chain=chain,
                                                polls=polls)
    elif polls and provider is not None and provider.polls_only_look:
        # A chain's next poll of a provider that only looks: the round's progress alone,
        # unless it shows another writer (see shard.chain_goes_on).
        run, ((progress, version),) = open_run_reading(
            output, settings, run_id, lambda st: _versioned_json(st, key), known=True)
        goes_on = shard_state.chain_goes_on(progress, run_id=run_id, chain=chain, polls=polls)
    if goes_on:
        looked = float(progress.get("looked_at") or 0.0)
        if shard_state.cancel_look_due(progress, now=now, every=settings.lease_seconds / 4):
            if run.output.exists(layout.CANCELLED):
                return
            looked = now
    else:
        run, stopped, ((progress, version),) = _open(
            output, settings, run_id, shard, reads=[lambda st: _versioned_json(st, key)])
        if stopped:
            return
        stop = shard_state.poll_turn(progress, chain=chain, polls=polls, now=now,
                                     poll_min_interval=settings.poll_min_interval)
        if stop:
            log.info("shard %d round %d: %s; stopping", shard, rnd, stop)
            return
        provider, looked = provider_for(run.spec), now
    store = run.output
    if provider.polls_only_look:
        _look(run, provider, shard, rnd, chain, polls, last, progress, version, looked)
        return
    lease = _leased(store, shard, self.request.id, settings)
    if not lease.acquire():  # a build, or another chain's poll, is at work: come back
        wait = _holder_done_in(lease, settings)
        _wait_note(lease, self.request.id, shard, rnd, "poll", wait)
        _next(poll_round, (output, run_id, shard, rnd, chain, polls, last), countdown=wait,
              spec=run.spec)
        return
    try:
        with lease.kept_alive() as lease_check:
            # Checkpoints record this poll as still running (``polls``): a redelivered copy of
            # a poll killed mid-step still runs (and waits for the lease).
            ctx = _context(run, shard, rnd, _watchful(lease_check, store, run_id, settings),
                           lease=lease, checkpointed=_progress(store, shard, rnd, chain, polls),
                           progress=progress)
            provider = provider_for(run.spec)
            result = attempts.counted(ctx, "poll", lambda c: provider.poll_round(
                c, (last[0], int(last[1])) if last else None), provider)
            countdown = 0.0 if result.done else _later(settings, result.countdown,
                                                       result.paced)
            _progress(store, shard, rnd, chain, polls + 1)(result.progress, countdown)
            now = time.time()
    except (LeaseLost, RunCancelled) as exc:
        log.info("shard %d: poll stopped: %s", shard, exc)
        return
    finally:
        lease.release()
    metrics.run_progress(run)
    if result.done:
        _next(merge_round_task, (output, run_id, shard, rnd, polls + 1), spec=run.spec)
    else:
        since = shard_state.rate_since(last, now=now, finished=result.progress.get("finished", 0))
        _next(poll_round, (output, run_id, shard, rnd, chain, polls + 1, since),
              countdown=countdown, spec=run.spec)


def _versioned_json(store: Store, key: str) -> tuple[Any, str | None]:
    """The JSON document at ``key`` and its version, or ``(None, None)`` when it is missing."""
    try:
        data, version = store.get_versioned(key)
    except NotFound:
        return None, None
    return json.loads(data), version


def _chain_progress(store: Store, shard: int, rnd: int, run_id: str, chain: str, polls: int,
                    fields: Mapping[str, Any], next_in: float, looked: float,
                    version: str | None) -> tuple[dict[str, Any], str | None]:
    """Write round ``rnd``'s ``progress.json`` for poll ``polls`` of chain ``chain`` (0: the
    chain's start, written by the build) of a provider whose polls only look: ``fields``
    (``Poll.progress``), the next poll due in ``next_in`` seconds, the run seen not cancelled
    at ``looked``; by compare-and-swap on ``version`` (None: created, if absent). Returns the
    document and the version written (None: another writer came first; nothing written)."""
    now = time.time()
    doc = {**fields, "chain": chain, "polls": polls, "polled_at": now, "next_at": now + next_in,
           "run": run_id, "looked_at": looked}
    data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    key = layout.round_doc(shard, rnd, "progress")
    return doc, store.put_new(key, data) if version is None else store.swap(key, data, version)


def _look(run: Run, provider: Any, shard: int, rnd: int, chain: str, polls: int,
          last: list[float] | None, progress: dict[str, Any] | None, version: str | None,
          looked: float) -> None:
    """Poll ``polls + 1`` of chain ``chain`` for a provider whose polls only look
    (``Provider.polls_only_look``): no lease (nothing is sent, nothing but the progress is
    written). The round's progress (read at ``version``; None: absent) is written by
    compare-and-swap on that version: a poll that loses it (another chain, or a redelivered
    copy of this poll, wrote since; or the run was cleaned) stops, so one chain goes on.
    ``looked``: when the run was last seen not cancelled.

    A poll that finds only counts moved writes nothing while the stored progress still
    promises the chain's next write (``shard.progress_write_due``); a write promises the next one
    within ``shard.grace`` (or the next poll, if later), so the chain shows alive to the
    reconciler throughout. The next poll is handed the chain's progress as this poll left
    it, with the version stored (``held``)."""
    settings, store = get_settings(), run.output
    run_id, output = run.spec.run_id, run.spec.output
    ctx = _context(run, shard, rnd, progress=progress)
    result = provider.poll_round(ctx, (last[0], int(last[1])) if last else None)
    countdown = 0.0 if result.done else _later(settings, result.countdown, result.paced)
    now = time.time()
    if result.done or shard_state.progress_write_due(progress, result.progress,
                                                     next_poll=now + countdown):
        promise = countdown if result.done else \
            max(countdown, shard_state.grace(settings.poll_min_interval))
        doc, version = _chain_progress(store, shard, rnd, run_id, chain, polls + 1,
                                       result.progress, promise, looked, version)
        if version is None:
            log.info("shard %d round %d: another poll wrote the round's progress since this "
                     "one read it; this chain stops", shard, rnd)
            return
        now = doc["polled_at"]
    else:  # only counts moved: the stored progress (at ``version``) stands until it is due
        doc = {**(progress or {}), "polls": polls + 1, "polled_at": now, "looked_at": looked}
    metrics.run_progress(run)
    if result.done:
        _next(merge_round_task, (output, run_id, shard, rnd, polls + 1), spec=run.spec)
    else:
        since = shard_state.rate_since(last, now=now, finished=result.progress.get("finished", 0))
        _next(poll_round, (output, run_id, shard, rnd, chain, polls + 1, since, [doc, version]),
              countdown=countdown, spec=run.spec)


@app.task(bind=True, base=RunTask, name=MERGE_ROUND)
def merge_round_task(self: Task, output: str, run: str, shard: int, round: int = 0,  # noqa: A002
                     polls: int = 0) -> None:
    """Merge round ``round`` of run ``run``: collect its results from the provider, write the
    round's rows, then start the next round for what can be retried, or finish the shard."""
    run_id, rnd = run, round
    settings = get_settings()
    # The round's documents a merge reads are read with the looks, at once: one round
    # trip's wait instead of one per document (wasted only by a merge that stops early).
    # The ledger only of a provider that moves in steps (one known to only look keeps none).
    # A spec this process read already is not read again when the round's progress shows
    # the run (``run``, written by its polls): it is still there, and it is this run.
    known = known_spec(output, run_id)
    stepped = known is None or not provider_for(known).polls_only_look
    run, (cancelled, done, todo, merged, plan, build, raw, progress, spend,
          ledger) = open_run_reading(
        output, settings, run_id, lambda st: st.exists(layout.CANCELLED),
        lambda st: st.exists(layout.shard_doc(shard, "done")),
        lambda st: get_json_or_none(st, layout.round_doc(shard, rnd, "todo")) if rnd else None,
        lambda st: get_json_or_none(st, layout.round_doc(shard, rnd, "merged")),
        lambda st: _get_or_none(st, layout.plan_items(shard)),
        *[lambda st, name=name: get_json_or_none(st, layout.round_doc(shard, rnd, name))
          for name in ("build", "batch", "progress", "spend")],
        lambda st: get_json_or_none(st, layout.round_doc(shard, rnd, "requests"))
        if stepped else None, known=known is not None)
    if known is not None and (progress or {}).get("run") != run_id:
        run = open_run_reading(output, settings, run_id)[0]  # is the run still there?
    store = run.output
    run.hold_items(shard, plan)
    if cancelled:
        return
    if done:
        maybe_finalize(store, _finalize_later(output, run_id, run.spec), run_id=run_id,
                       shard=shard)
        return
    base = shard_state.round_base(rnd, todo)
    held: dict[str, Any] = {}  # documents of the round this task holds: _finish_shard's
    kept: Any = None  # the round's rows as this task stored them (a temporary file)
    if merged is None or not store.exists(layout.round_doc(shard, rnd, "rows")):
        ctx = _context(run, shard, rnd, base=base)
        ctx.ledger = ledger  # a provider that moves in steps: its round's ledger, as read
        ctx.batch = raw  # written once: its collect need not read it again
        todo, items = ctx.todo, ctx.items
        if build is None:
            raise NotFound(f"{store.url_for(layout.round_doc(shard, rnd, 'build'))}: no such "
                           "object")
        build = ShardBuild.model_validate(build)
        if raw is not None:  # written once (create-if-absent), never changed
            held[layout.round_doc(shard, rnd, "batch")] = raw
        record = BatchRecord.model_validate(raw) if raw else None
        blocked = shard_state.merge_blocker(rnd, build, record)
        if blocked is not None and blocked.round == rnd:
            _next(build_shard, (output, run_id, shard, rnd), spec=run.spec)
            return
        if blocked is not None:
            stops.release(ctx)
            log.error("shard %d round %d: %s (build attempt %s, batch attempt %s); sending the "
                      "round again", shard, rnd, blocked.why, build.attempt, record.attempt)
            _next_round(store, output, run_id, shard, rnd,
                        todo if todo is not None else list(range(len(items))), blocked.why, base)
            return
        cache_doc = get_json_or_none(store, layout.round_doc(shard, 0, "cache")) \
            if run.spec.cache else None
        originals = _originals(store, cache_doc) if rnd == 0 else {}
        if originals is None:  # items that copy another shard's: its row is not merged yet
            _next(merge_round_task, (output, run_id, shard, rnd, polls),
                  countdown=settings.poll_min_interval, spec=run.spec)
            return
        provider = provider_for(run.spec)
        collected = provider.collect_round(ctx) if record is not None else None
        if record is not None and collected is None:  # too early: back to polling
            _next(poll_round, (output, run_id, shard, rnd, uuid.uuid4().hex),
                  countdown=settings.poll_min_interval, spec=run.spec)
            return
        if isinstance(collected, Resend):
            stops.release(ctx)
            _next_round(store, output, run_id, shard, rnd,
                        todo if todo is not None else list(range(len(items))), collected.reason,
                        base)
            return
        rows, stats, retryable = merge_round(
            items, build, collected.lines if collected else (), run.fetcher.source,
            batch_error=collected.batch_error if collected else None, todo=todo,
            retryable_codes=provider.retryable_codes,
            skills=[o.skill for o in run.spec.all_options], key_sources=run.fetcher.key_sources)
        with rows:  # a temporary file: the round's rows are not held in memory
            rejected = provider.reject_merge(ctx, record, stats)
            if rejected is not None:  # e.g. foreign results: send the round again
                stops.release(ctx)
                _next_round(store, output, run_id, shard, rnd,
                            todo if todo is not None else list(range(len(items))), rejected,
                            base)
                return
            stops.after_merge(ctx, provider, rows, build, spend)  # spend settled; maybe a stop
            progress = progress or {}
            merged = {"batch_id": record.batch_id if record else None,
                      "batch_status": progress.get("status") if record else None,
                      "polls": polls, "ok": stats.ok, "error": stats.error,
                      "input_tokens": stats.input_tokens, "output_tokens": stats.output_tokens,
                      "duplicate": stats.duplicate, "missing": stats.missing,
                      "malformed": stats.malformed, "id_mismatch": stats.id_mismatch,
                      "retryable": retryable, **(collected.stats if collected else {})}
            if cache_doc is not None:
                sent_rows = rows.snapshot()  # the merged rows, before the cache's are added
                merged["cached"] = fill_cached(items, rows, cache_doc, run.fetcher.source,
                                               rnd=rnd, originals=originals)
            with cf.ThreadPoolExecutor(1, thread_name_prefix="merged") as pool:
                # The round's merge record and its rows at once: one round trip's wait. In
                # either order a stop in between leaves one without the other, and the
                # round is merged again (``merged`` missing, or rows missing: see above).
                recorded = pool.submit(put_json, store, layout.round_doc(shard, rnd, "merged"),
                                       merged)
                kept = put_round_rows(store, layout.round_doc(shard, rnd, "rows"), rows,
                                      if_absent=True, keep=True) or None
                try:
                    recorded.result()
                except BaseException:
                    if kept is not None:
                        kept.close()
                    raise
            if cache_doc is not None:  # after the merge is stored: only merged ok rows are cached
                _write_cache(run, cache_doc, sent_rows, shard, rnd)
    try:
        step = shard_state.after_merge(merged["retryable"], rnd=rnd, base=base,
                                       max_item_attempts=settings.max_item_attempts)
        if step.action is shard_state.Action.BUILD:
            _next_round(store, output, run_id, shard, rnd, merged["retryable"], step.why, base)
            return
        held[layout.round_doc(shard, rnd, "merged")] = merged
        _finish_shard(run, shard, rnd, held, kept)
    finally:
        if kept is not None:
            kept.close()


def _get_or_none(store: Store, key: str) -> bytes | None:
    """The object's bytes, or None if it does not exist. Raises ``StorageError``."""
    try:
        return store.get(key)
    except NotFound:
        return None


def _originals(store: Store, doc: dict[str, Any] | None) -> dict[str, bytes] | None:
    """The rows of the other shards' items that round 0's ``waits`` copy (``cache.json``:
    item index → ``[shard, index]``), by item index; None while one is not merged yet."""
    out: dict[str, bytes] = {}
    for i, (other, j) in ((doc or {}).get("waits") or {}).items():
        row = cache.original_row(store, int(other), int(j))
        if row is None:
            return None
        out[i] = row
    return out


def _write_cache(run: Run, doc: dict[str, Any], rows: Mapping[int, bytes], shard: int,
                 rnd: int) -> None:
    """Write the cache entries of a merged round's ok rows (``cache.write_entries``). A
    failure is logged, not raised: a missing entry only costs a later run a request."""
    try:
        new = cache.write_entries(cache.open_cache(run.spec, run.settings), doc, rows,
                                  run.spec.run_id, concurrency=run.settings.fetch_concurrency)
    except (StorageError, OSError, ValueError) as exc:
        log.warning("shard %d round %d: cache entries not written (%s: %s)", shard, rnd,
                    type(exc).__name__, str(exc)[:200])
        return
    if new:
        log.info("shard %d round %d: %d cache entr%s written", shard, rnd, new,
                 "y" if new == 1 else "ies")


def _finish_shard(run: Run, shard: int, last_round: int,
                  held: Mapping[str, Any] | None = None, kept: Any = None) -> None:
    """Compose the shard's final rows from its rounds (later rounds override earlier ones),
    write them (a ``retry-failed`` pass writes a shard's results again), record it done.
    ``held``: round documents the caller already holds (key → document), not read again;
    ``kept``: the last round's stored rows as the caller stored them (``put_round_rows``'s
    kept file), not read again."""
    store = run.output
    held = held or {}
    provider = provider_for(run.spec)
    contexts = [_context(run, shard, r) for r in range(last_round + 1)]
    with cf.ThreadPoolExecutor(2, thread_name_prefix="finish") as pool:
        # The look for a later round and each round's duplicate count (a read) at once: one
        # round trip's wait, not one per look (the counts are wasted on a stale merge).
        reopened = pool.submit(store.exists, layout.round_doc(shard, last_round + 1, "todo"))
        duplicates = sum(pool.map(provider.duplicate_submissions, contexts))
    if reopened.result():
        # A stale merge of an earlier round (a retry pass reopened the shard since): the
        # latest round finishes the shard.
        return
    items = run.items(shard)
    rounds: list[Any] = []  # each round's stored rows, as lines read in chunks
    merged: list[dict[str, Any]] = []
    batches: list[dict[str, Any]] = []  # every batch sent, failed ones included
    for r in range(last_round + 1):
        key = layout.round_doc(shard, r, "batch")
        batch = held[key] if key in held else get_json_or_none(store, key)
        if batch is not None:
            batches.append(batch)
        try:  # a round whose batch failed and was resubmitted has no rows
            rounds.append(iter_kept_lines(kept) if kept is not None and r == last_round
                          else iter_stored_lines(store, layout.round_doc(shard, r, "rows")))
        except NotFound:
            continue
        key = layout.round_doc(shard, r, "merged")
        merged.append(held[key] if key in held else get_json(store, key))
    ok, by_code, cached = writers.write_rounds(store, run.spec.output_format, shard, len(items),
                                               rounds, metadata=writers.run_metadata(run.spec))
    done = ShardDone(
        shard=shard, batch_id=batches[0]["batch_id"] if batches else None,
        batch_status=merged[-1]["batch_status"] if merged else None, total=len(items), ok=ok,
        error=len(items) - ok, input_tokens=sum(m["input_tokens"] for m in merged),
        output_tokens=sum(m["output_tokens"] for m in merged),
        duplicate_rows=sum(m["duplicate"] for m in merged),
        missing_rows=sum(m["missing"] for m in merged), duplicate_batches=duplicates,
        malformed_lines=sum(m.get("malformed", 0) for m in merged),
        id_mismatch_lines=sum(m.get("id_mismatch", 0) for m in merged),
        errors_by_code=by_code, cached=cached,
        polls=sum(m["polls"] for m in merged), requests=sum(m.get("requests", 0) for m in merged),
        rounds=last_round + 1, batch_ids=[b["batch_id"] for b in batches if b["batch_id"]],
        submitted_at=batches[0]["submitted_at"] if batches else None, completed_at=time.time(),
        merged_at=time.time())
    if put_json(store, layout.shard_doc(shard, "done"), done.model_dump(), if_absent=True):
        metrics.shard_merged(run.spec.provider, done)
    log.info("shard %d merged: %d ok, %d error, %d round(s)", shard, ok, len(items) - ok,
             last_round + 1)
    final = maybe_finalize(store, _finalize_later(run.spec.output, run.spec.run_id, run.spec),
                           run_id=run.spec.run_id, shard=shard)
    # The gauges list the run's shards: at most every RUN_GAUGE_SECONDS per process (at every
    # merge, a run's listings would grow with the square of its shards), and once at its end.
    metrics.run_progress(run, force=final)
    if final:
        run_final(get_settings(), run.spec.run_id)


def _finalize_later(output: str, run_id: str, spec: RunSpec | None = None
                    ) -> Callable[[float], None]:
    """``maybe_finalize``'s ``on_claimed``: another task finalises the run now; look again
    (``finalize_run``) once its lease would have run out, in case it died."""
    return lambda wait: _next(finalize_run, (output, run_id), countdown=wait, spec=spec)


@app.task(bind=True, base=RunTask, name=FINALIZE_RUN)
def finalize_run(self: Task, output: str, run: str) -> None:
    """Finalise run ``run`` if every shard is merged (idempotent; see ``maybe_finalize``)."""
    run_id = run
    settings = get_settings()
    if maybe_finalize(open_output(output, settings), _finalize_later(output, run_id)):
        run_final(settings, run_id)


@app.task(name=RECONCILE, ignore_result=True)
def reconcile() -> dict[str, int]:
    """Periodic (Celery beat): for every active run of the registry, re-enqueue stale work —
    polls whose chain stopped (a lost ETA message), merges that never ran, builds whose worker
    died — or, when the run's broker canary is gone (the broker restarted empty), every
    unfinished step, so a run recovers from a broker loss with nobody calling ``resume``."""
    return reconcile_active_runs()
