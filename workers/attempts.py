"""A cap on how often one step of a round may lose its worker.

A task whose worker dies (OOM-killed, SIGKILLed, past the hard time limit) is delivered again
(late acks, reject on worker lost) or re-enqueued by the reconciler, and the input that killed
it kills it again: without a cap, for ever. So each counted step of a round (its ``build``,
and its ``poll`` steps when the provider sends in steps, as fal does: they read and send images
too) records its start in the run's storage before it works, and its end at every exit that
is not a lost worker (returned, raised, retried, ``Later``, lease lost). A soft time limit is
not an end: a step that keeps running out of time is poison the same way, and the cap is what
bounds its retries.

Starts since the last end are attempts that lost their worker. Once
``MOONBATCH_MAX_WORKER_LOSSES`` of them are in a row, the next attempt gives the round up
instead of running it again (``give_up``): the items the round has not sent become
``worker_lost`` error rows, what the provider already has goes on, and the round is merged as
usual. Only a step under the shard's lease counts (the tasks count after acquiring it), so a
copy that waits for the lease is not an attempt; two copies counting at once (a lease taken
over) are serialised by compare-and-swap on the document.

The document (``layout.step_attempts``): ``{"starts", "ends", "open", "gave_up", "abandoned",
"last": {"at", "host", "pid"}}`` — ``open`` the starts since the last end, ``abandoned`` true
once a build gave its round up before anything was sent (later copies then only merge).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded

from moonbatch.workers import layout
from moonbatch.workers.models import ShardBuild
from moonbatch.workers.storage import NotFound, StorageError, Store, put_json

log = logging.getLogger(__name__)

T = TypeVar("T")
LOST_CODE = "worker_lost"
CAS_TRIES = 20


def counted(ctx: Any, kind: str, step: Callable[[Any], T], provider: Any) -> T | None:
    """Run ``step(ctx)`` (``ctx``: the round's ``RoundContext``) as a counted attempt of the
    round's ``kind`` step (``"build"`` or ``"poll"``), under the shard's lease.

    Returns what ``step`` returns, or None for a build whose round was given up before
    anything was sent (only error rows are left: merge the round). Raises what ``step``
    raises, and ``StorageError`` when the start cannot be recorded.
    """
    if kind == "poll" and not hasattr(provider, "abandon_unsent"):
        return step(ctx)  # a poll that only looks (the Batch API's) reads no item: not counted
    store, key = ctx.store, layout.step_attempts(ctx.shard, ctx.rnd, kind)
    # A round's build counter is new at its first build (a poll's exists after the first
    # poll): created without a look first.
    doc, version = _update(store, key, _started, fresh=kind == "build")
    if doc.get("abandoned"):
        _end(store, key, doc, version)
        return None
    lost = doc["open"] - 1  # attempts before this one that never ended
    if lost >= ctx.settings.max_worker_losses:
        sent = give_up(ctx, kind, provider, lost)
        doc, version = _update(store, key, lambda d: {
            **d, "open": 1, "gave_up": d.get("gave_up", 0) + 1,
            "abandoned": d.get("abandoned", False) or not sent})
        if not sent:
            _end(store, key, doc, version)
            return None
    _soft_deadline(ctx, kind)
    try:
        result = step(ctx)
    except SoftTimeLimitExceeded:
        raise  # not an end: it counts as a lost attempt (the task retries it)
    except BaseException:
        _end(store, key, doc, version)
        raise
    _end(store, key, doc, version)
    return result


def _soft_deadline(ctx: Any, kind: str) -> None:
    """Make the round's heartbeat (called between lines and parts) raise
    ``SoftTimeLimitExceeded`` once the step is past ``MOONBATCH_TASK_SOFT_TIME_LIMIT``: Celery
    signals its soft limit, and a signal that lands in a finalizer (``__del__``) is ignored,
    leaving the step to run until the hard limit kills it."""
    limit = ctx.settings.task_soft_time_limit
    deadline = time.monotonic() + limit
    beat = ctx.heartbeat

    def heartbeat() -> None:
        beat()
        if time.monotonic() > deadline:
            raise SoftTimeLimitExceeded(f"the {kind} is past MOONBATCH_TASK_SOFT_TIME_LIMIT "
                                        f"({limit:g}s)")

    ctx.heartbeat = heartbeat


def give_up(ctx: Any, kind: str, provider: Any, lost: int) -> bool:
    """Give round ``ctx.rnd`` up after ``lost`` attempts of its ``kind`` step lost their
    worker: the items it has not sent become ``worker_lost`` errors. Returns True when the
    provider has some of the round (the step then runs on, sending nothing new), False when
    nothing was sent (the round's ``build.json`` now holds only errors)."""
    spec = ctx.run.spec
    error = {"code": LOST_CODE, "message": (
        f"not sent: shard {ctx.shard} round {ctx.rnd}'s {kind} lost its worker {lost} times in a "
        "row (killed, out of memory or past MOONBATCH_TASK_SOFT_TIME_LIMIT); remove or shrink "
        f"the image that does it, then moonbatch retry-failed {spec.run_id} {LOST_CODE}")}
    if ctx.store.exists(ctx.doc("batch")) or kind != "build":
        abandon = getattr(provider, "abandon_unsent", None)  # providers that send in steps
        ended = abandon(ctx, error) if abandon else 0
        log.error("shard %d round %d: the %s lost its worker %d times in a row; %d line(s) not "
                  "sent yet end as %s, what the provider has goes on", ctx.shard, ctx.rnd, kind,
                  lost, ended, LOST_CODE)
        return True
    if ctx.store.exists(ctx.doc("submit")):
        log.error("shard %d round %d: giving up while an mpu-complete answer is unaccounted "
                  "for: the batch it may have created is not merged", ctx.shard, ctx.rnd)
    indices = list(ctx.indices())
    put_json(ctx.store, ctx.doc("build"), ShardBuild(
        lines=[], errors={str(i): error for i in indices}, id_prefix=ctx.id_prefix).model_dump())
    log.error("shard %d round %d: the build lost its worker %d times in a row; its %d item(s) "
              "end as %s", ctx.shard, ctx.rnd, lost, len(indices), LOST_CODE)
    return False


def _started(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "starts": doc.get("starts", 0) + 1, "open": doc.get("open", 0) + 1,
            "last": {"at": time.time(), "host": socket.gethostname(), "pid": os.getpid()}}


def _ended(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "ends": doc.get("ends", 0) + 1, "open": 0}


def _end(store: Store, key: str, doc: dict[str, Any], version: str | None) -> None:
    """Record an end, on ``doc`` (what this attempt wrote, at ``version``) without reading
    it again when nobody wrote it since; a failure to write it is logged (it then counts as
    one loss)."""
    try:
        if version is None or store.swap(key, json.dumps(_ended(doc)).encode(), version) is None:
            _update(store, key, _ended)
    except Exception:
        log.warning("could not record the end of a step in %s", key, exc_info=True)


def _update(store: Store, key: str, change: Callable[[dict[str, Any]], dict[str, Any]], *,
            fresh: bool = False) -> tuple[dict[str, Any], str | None]:
    """Apply ``change`` to the document at ``key`` by compare-and-swap (created when
    missing; ``fresh``: most likely missing, so created before any read); return the
    document written and its version. Raises ``StorageError``."""
    if fresh and (made := _create(store, key, change)) is not None:
        return made
    for _ in range(CAS_TRIES):
        try:
            data, version = store.get_versioned(key)
        except NotFound:
            if (made := _create(store, key, change)) is not None:
                return made
            continue
        doc = change(json.loads(data))
        written = store.swap(key, json.dumps(doc).encode(), version)
        if written is not None:
            return doc, written
    raise StorageError(f"{key}: changed by others {CAS_TRIES} times in a row")


def _create(store: Store, key: str, change: Callable[[dict[str, Any]], dict[str, Any]]
            ) -> tuple[dict[str, Any], str] | None:
    """``change({})`` written to ``key`` if nothing is there: the document and its version,
    or None (nothing written) when an object exists."""
    doc = change({})
    created = store.put_new(key, json.dumps(doc).encode())
    return None if created is None else (doc, created)
