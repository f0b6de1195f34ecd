"""Recovery: re-enqueue what a run's shards need from storage alone, and take final runs off
the reconciler's list. Used by the periodic ``moonbatch.reconcile`` task, ``moonbatch resume``,
``cancel`` and ``clean``; it never imports the tasks (``enqueue`` sends by name), so a
producer uses it without building the Celery app.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from moonbatch.config import Settings, get_settings
from moonbatch.workers import canary, ends, layout, metrics, registry, retries
from moonbatch.workers.enqueue import BUILD_SHARD, FINALIZE_RUN, MERGE_ROUND, POLL_ROUND, enqueue
from moonbatch.workers.lease import lease_is_live
from moonbatch.workers.runstate import (
    Run,
    listed_shards,
    maybe_finalize,
    open_output,
    open_run,
    run_queue,
)
from moonbatch.workers.shard import Action, next_step
from moonbatch.workers.storage import NotFound, Store, get_json_or_none

log = logging.getLogger(__name__)


class StoredShardDocs(Mapping[tuple[int | None, str], Any]):
    """A shard's documents in storage as ``shard.ShardDocs``: listed at creation (or given:
    ``listed``, from ``listed_shards``); a document is read (JSON) the first time it is looked
    up, so deciding costs only the reads the decision needs. A document listed and gone since
    reads as absent (``KeyError``)."""

    def __init__(self, store: Store, shard: int, listed: layout.ShardDocKeys | None = None
                 ) -> None:
        self.store = store
        self._keys = listed if listed is not None else \
            next(listed_shards(store, layout.shard_prefix(shard)), (shard, {}))[1]
        self._read: dict[tuple[int | None, str], Any] = {}

    def __getitem__(self, name: tuple[int | None, str]) -> Any:
        if name not in self._read:
            if name[1] == "rows":  # JSONL, large: only its presence is asked
                self._read[name] = True if name in self._keys else None
            else:
                try:
                    self._read[name] = json.loads(self.store.get(self._keys[name]))
                except NotFound:
                    self._read[name] = None
        if self._read[name] is None:
            raise KeyError(name)
        return self._read[name]

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[tuple[int | None, str]]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def advance_shard(run: Run, shard: int, *, only_stale: bool, now: float | None = None,
                  listed: layout.ShardDocKeys | None = None) -> str | None:
    """Enqueue the shard's next step as its documents in storage give it
    (``shard.next_step``); return what was enqueued (``"build"``, ``"poll"``, ``"merge"``) or
    None. ``only_stale``: see ``next_step``. ``listed``: the shard's documents as a listing of
    the run's shards gave them (``listed_shards``; default: listed now). Duplicates are
    harmless: leases, poll-chain ids and write-once results absorb them. Raises broker and
    storage errors."""
    settings = get_settings()
    step = next_step(StoredShardDocs(run.output, shard, listed), only_stale=only_stale,
                     now=time.time() if now is None else now,
                     poll_min_interval=settings.poll_min_interval)
    args = (run.spec.output, run.spec.run_id, shard, step.round)
    queue = run_queue(run.spec, settings)
    if step.action is Action.MERGE:
        enqueue(MERGE_ROUND, args, queue=queue)
    elif step.action is Action.POLL:
        enqueue(POLL_ROUND, (*args, uuid.uuid4().hex), queue=queue)
    elif step.action is Action.BUILD:
        enqueue(BUILD_SHARD, args, queue=queue)
    else:
        return None
    return step.action.value


def run_final(settings: Settings, run_id: str) -> None:
    """Take a final (completed, failed or cancelled) run off the reconciler's list: its
    active marker, its broker canary, its metric series; first tell the commands following
    it (``ends.announce``, best effort). Raises state-store and broker errors."""
    ends.announce(settings, run_id)  # its run.json is final: the followers read it now
    registry.forget_active(registry.open_state(settings), run_id)
    canary.disarm(settings, run_id)
    metrics.run_final(run_id)


def reconcile_run(output: str, run_id: str, *, full: bool) -> dict[str, int]:
    """One reconciler pass over one run: re-enqueue its stale work (every unfinished step when
    ``full``, after the broker lost its messages), finalise it if it is complete, and take it
    off the active list once it is final. A ``retry-failed`` pass recorded and not applied
    yet (``moonbatch.workers.retries``) is applied first. Returns ``{action: shards}``."""
    settings = get_settings()
    store = open_output(output, settings)
    counts: dict[str, int] = {}
    pending = retries.pending_pass(store)
    if pending is not None and not store.exists(layout.CANCELLED):
        # A retry-failed that stopped before its pass reopened the run: finish reopening,
        # then enqueue every step (none of the reopened shards' is queued yet).
        retries.apply_pass(store, pending)
        full = True
    if store.exists(layout.FINALIZED) or store.exists(layout.CANCELLED):
        run_final(settings, run_id)
        return counts
    plan = get_json_or_none(store, layout.PLAN)
    if plan is None:
        return counts  # still listing (or the producer died: resume says so)
    unannounced = not store.exists(layout.ENQUEUED)
    if unannounced and lease_is_live(store, layout.PLANNING):
        return counts  # the producer is enqueueing the plan's shards right now
    full = full or unannounced  # it died while enqueueing: some shards were never queued
    run = open_run(output, settings, run_id)
    # One listing of every shard's documents, not one per shard: a pass over a run of 10,000
    # shards lists ~120 pages, not 10,000 prefixes (which took longer than the beat's interval).
    unlisted = set(range(plan["shards"]))  # then advanced: shards with no document yet

    def advance(shard: int, docs: dict[tuple[int | None, str], str]) -> None:
        action = advance_shard(run, shard, only_stale=not full, listed=docs)
        if action:
            counts[action] = counts.get(action, 0) + 1

    for shard, docs in listed_shards(store):
        if shard in unlisted:
            unlisted.discard(shard)
            advance(shard, docs)
    for shard in sorted(unlisted):
        advance(shard, {})
    if full:
        enqueue(FINALIZE_RUN, (output, run_id), queue=run_queue(run.spec, settings))
        if unannounced:
            store.put(layout.ENQUEUED, b"", if_absent=True)
    elif maybe_finalize(store):
        run_final(settings, run_id)
    return counts


def reconcile_active_run(output: str, run_id: str) -> tuple[bool, dict[str, int]]:
    """The reconciler's pass over one active run (the beat's, and ``moonbatch run``'s for its
    own run): a full pass when the run's broker canary is gone, a stale-work pass otherwise.
    Returns ``(broker lost its data, {action: shards})``; raises broker and storage errors."""
    lost = canary.broker_lost(get_settings(), run_id)
    return lost, reconcile_run(output, run_id, full=lost)


def reconcile_active_runs() -> dict[str, int]:
    """One reconciler pass over every active run of the registry (``reconcile_active_run``;
    a run whose pass fails is logged and left to the next pass). Returns ``{action: shards}``
    summed over the runs."""
    counts: dict[str, int] = {}
    for run_id, output in registry.iter_active(registry.open_state(get_settings())):
        try:
            _, done = reconcile_active_run(output, run_id)
        except Exception:
            log.exception("reconcile of run %s failed", run_id)
            continue
        for action, n in done.items():
            counts[action] = counts.get(action, 0) + n
    if counts:
        log.warning("reconcile re-enqueued %s", counts)
    return counts
