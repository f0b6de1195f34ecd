"""A Batch API round's claim and records, and lost-answer recovery (seed 002, "Upload and
submit"): ``submit.json`` is the round's exclusive claim of ``mpu-complete``, ``build.json`` is
written by compare-and-swap, ``batch.json`` once; an ``mpu-complete`` whose answer was lost is
found again in the batch list (by time, line count and the ids in its results) instead of paid
for twice, and a possible duplicate is counted in ``orphans.json``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from moonbatch.workers import metrics
from moonbatch.workers.models import BatchRecord, ShardBuild
from moonbatch.workers.providers import Later
from moonbatch.workers.providers.moondream.client import BatchClient
from moonbatch.workers.providers.moondream.errors import TransientError
from moonbatch.workers.providers.moondream.records import BatchClaims, SubmitRecord
from moonbatch.workers.storage import NotFound, Store, get_json, get_json_or_none, put_json

log = logging.getLogger(__name__)

# Clock skew tolerated between this machine and the API when finding a batch by its time.
CLOCK_SKEW = 300.0
# Looks for the batch of a lost mpu-complete answer while candidates still run (about two
# hours at the 120 s cap) before the round is sent again.
MAX_LOST_ANSWER_CHECKS = 70


def dumps(value: Any) -> bytes:
    """JSON as ``put_json`` writes it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _put_over(state: Store, key: str, data: bytes, version: str | None) -> bool:
    """Write ``key`` if it is still at ``version`` (None: if it is still absent)."""
    if version is None:
        return state.put(key, data, if_absent=True)
    return state.put_if_match(key, data, version)


def version_of(state: Store, key: str) -> str | None:
    """The object's version token, or None if it does not exist."""
    try:
        return state.get_versioned(key)[1]
    except NotFound:
        return None


def recorded_round(state: Store, doc: Callable[[str], str]
              ) -> tuple[ShardBuild, BatchRecord] | None:
    """The round's recorded build and batch, or None while no batch is recorded."""
    raw = get_json_or_none(state, doc("batch"))
    if raw is None:
        return None
    return ShardBuild.model_validate(get_json(state, doc("build"))), BatchRecord.model_validate(raw)


#: ``write_build``'s ``version`` when the caller did not read it.
UNREAD: Any = object()


def write_build(state: Store, doc: Callable[[str], str], build: ShardBuild, *,
                version: Any = UNREAD, before_claim: bool = False) -> None:
    """Write ``build.json`` for the claimant ``build.attempt``: compare-and-swap on the version
    read while the claim is still its own, so a claimant whose claim was dropped (it stalled
    and another execution took the round over) can never overwrite the new claimant's build.
    ``version``: the version of ``build.json`` (None: absent) as the caller read it after
    claiming, for the first try (left out: read here). ``before_claim``: ``version`` was seen
    before this execution created its claim (a listing of the round): then the first try
    needs no look at the claim, as any claimant after this one (it must drop this claim
    first) writes after that sight and the swap fails. Raises ``RoundClaimed`` when the claim
    is no longer this execution's."""
    data = build.json_bytes()  # no copy of its lists and dicts (as dumps() would make)
    look = not before_claim or version is UNREAD
    for _ in range(8):
        # The version is read before the claim is looked at: a build another claimant
        # wrote after that look changes the version, and the swap fails.
        if version is UNREAD:
            version = version_of(state, doc("build"))
        if look:
            claim = get_json_or_none(state, doc("submit"))
            if claim is None or claim.get("attempt", "") != build.attempt:
                raise RoundClaimed(f"{doc('submit')}: this execution's claim on the round was "
                                   "dropped by another execution")
        if _put_over(state, doc("build"), data, version):
            return
        version, look = UNREAD, True  # changed since: read it again, and the claim
    raise RoundClaimed(f"{doc('build')} keeps changing under this execution")


def record_unsent(state: Store, doc: Callable[[str], str], build: ShardBuild
                   ) -> tuple[ShardBuild, BatchRecord | None]:
    """Record a build that has no sendable line (only error rows), unless the round was claimed
    or submitted meanwhile by another execution: then return what it recorded, or raise
    ``RoundClaimed`` while its batch is not recorded yet. The version of ``build.json`` is read
    first, then the claim, then the batch (the reverse of a claimant's order: claim, build,
    batch, claim dropped), so no claimant's build is ever overwritten: one written after the
    version was read makes this write fail."""
    data = build.json_bytes()  # no copy of its lists and dicts (as dumps() would make)
    for _ in range(8):
        version = version_of(state, doc("build"))
        # The claim before the batch: a claimant records its batch before it drops its claim.
        claimed = state.exists(doc("submit"))
        recorded = recorded_round(state, doc)
        if recorded is not None:
            return recorded
        if claimed:
            raise RoundClaimed(f"{doc('submit')}: another execution claimed the round")
        if _put_over(state, doc("build"), data, version):
            return build, None
    raise RoundClaimed(f"{doc('build')} keeps changing under this execution")


def drop_claim(state: Store, doc: Callable[[str], str], attempt: str) -> None:
    """Delete the round's claim if it is ``attempt``'s (the caller holds the shard's lease)."""
    claim = get_json_or_none(state, doc("submit"))
    if claim is not None and claim.get("attempt", "") == attempt:
        state.delete(doc("submit"))


def update_claim(state: Store, doc: Callable[[str], str], intent: SubmitRecord,
                  changes: dict[str, Any]) -> None:
    """Apply ``changes`` to the claim of ``intent.attempt`` by compare-and-swap; raises
    ``RoundClaimed`` if the claim changed hands (another execution recovers the round)."""
    try:
        raw, version = state.get_versioned(doc("submit"))
    except NotFound:
        raw, version = b"null", ""
    claim = json.loads(raw)
    if not isinstance(claim, dict) or claim.get("attempt", "") != intent.attempt or \
            not state.put_if_match(doc("submit"), dumps({**claim, **changes}), version):
        raise RoundClaimed(f"{doc('submit')}: the claim changed under this execution")


def forget_upload(state: Store, doc: Callable[[str], str], upload_id: str) -> None:
    """Delete ``upload.json`` if it records ``upload_id`` (another execution's stays)."""
    opened = get_json_or_none(state, doc("upload"))
    if opened is not None and (not upload_id or opened.get("upload_id") == upload_id):
        state.delete(doc("upload"))


def record_batch(state: Store, doc: Callable[[str], str], claims: BatchClaims | None,
                  batch_id: str, intent: SubmitRecord, *, recovered: bool) -> BatchRecord:
    """Claim the batch, record it in ``batch.json`` (created once) and clear what led to it.
    Returns the recorded batch: another one if a batch was recorded first (then ours is
    counted as a possible duplicate in ``orphans.json``)."""
    if claims is not None and not claims.claim(batch_id) and not recovered:
        # Another round adopted our batch by mistake while our answer was in flight; ours is
        # certain (the service answered), theirs is checked against result ids at merge.
        log.error("batch %s is claimed by another round; keeping it for this one", batch_id)
    record = BatchRecord(batch_id=batch_id, file_id=intent.file_id, submitted_at=time.time(),
                         lines=intent.lines, recovered=recovered, attempt=intent.attempt)
    recorded = put_json(state, doc("batch"), record.model_dump(), if_absent=True)
    if recorded:
        metrics.batch("moondream", "submitted")
    else:
        first = BatchRecord.model_validate(get_json(state, doc("batch")))
        if first.batch_id != batch_id:
            log.error("%s: batch %s is recorded already; batch %s of attempt %s is a duplicate",
                      doc("batch"), first.batch_id, batch_id, intent.attempt)
            count_orphan(state, doc, f"batch {batch_id} submitted beside {first.batch_id}")
        record = first
    forget_upload(state, doc, intent.upload_id)
    if recorded:
        # The round's batch is recorded, by this call: every reader of a claim looks at the
        # batch first and goes by it, so the claim (this execution's, or one that replaced it
        # after a takeover) is done with, and deleted without a look at whose it is.
        state.delete(doc("submit"))
    else:
        drop_claim(state, doc, intent.attempt)
    return record


class AwaitingBatch(TransientError, Later):
    """The batch of a lost ``mpu-complete`` answer cannot be named yet: several new batches
    could be this round's and some still run. Look again after ``countdown`` seconds (the
    build task re-enqueues itself, holding no worker slot meanwhile)."""

    def __init__(self, message: str, countdown: float) -> None:
        TransientError.__init__(self, "mpu-complete", message)
        self.countdown = countdown


class RoundClaimed(TransientError, Later):
    """Another execution claimed the round's submission (``submit.json``) and its batch is not
    recorded yet, or took this execution's claim over: look again after ``countdown`` seconds
    (the build task re-enqueues itself and then finds the batch, or a dead claim to drop)."""

    def __init__(self, message: str, countdown: float = 5.0) -> None:
        TransientError.__init__(self, "mpu-complete", message)
        self.countdown = countdown


def recover_lost_submit(client: BatchClient, state: Store, doc: Callable[[str], str],
                         intent: SubmitRecord, claims: BatchClaims | None, *,
                         line_ids: set[str], shard: int, rnd: int) -> BatchRecord | None:
    """Find and adopt the batch that the ``mpu-complete`` of ``intent`` created, whose answer
    was lost (FACTS.md: "``GET /v1/batch`` ... is the only way to find that batch again").

    Candidates are the unclaimed batches created since ``intent.sent_at`` (less the tolerated
    clock skew) whose line count is ``intent.lines`` or not known yet (still chunking). Time and
    size cannot tell them apart (a run's shards have one size and go out together; other users
    of the key submit too), but their results can: they carry the ids of the items sent (seed
    002, "Output format"), so the completed candidate whose results hold only ``line_ids`` is
    this round's, and no other is ever adopted. Returns its record, or None
    when no batch is this round's (then the round is sent again; if candidates existed, a
    possible duplicate is counted in ``orphans.json``). Raises ``AwaitingBatch`` while
    candidates still run, up to ``MAX_LOST_ANSWER_CHECKS`` looks.
    """
    rejected = set(intent.rejected)
    candidates = [b for b in client.find_batches(intent.sent_at - CLOCK_SKEW)
                  if (b.total == intent.lines or (not b.done and not b.total))
                  and b.id not in rejected and not (claims and claims.taken(b.id))]
    adopt = None
    for batch in candidates:
        if batch.status != "completed":
            continue
        ids = client.result_ids(batch)
        if ids and ids <= line_ids:
            adopt = batch
            break
        rejected.add(batch.id)
    if adopt is not None and (claims is None or claims.claim(adopt.id)):
        log.warning("shard %d round %d: adopted batch %s, created by the mpu-complete whose "
                    "answer was lost", shard, rnd, adopt.id)
        return record_batch(state, doc, claims, adopt.id, intent, recovered=True)
    running = [b for b in candidates if not b.done]
    if running and intent.checks + 1 < MAX_LOST_ANSWER_CHECKS:
        update_claim(state, doc, intent, {"checks": intent.checks + 1,
                                           "rejected": sorted(rejected)})
        raise AwaitingBatch(f"answer lost; {len(running)} new batch(es) still running may be "
                            "this round's: their results will tell",
                            countdown=min(120.0, 2.0 * 1.5 ** intent.checks))
    seen = rejected | {b.id for b in candidates}
    if seen:
        count_orphan(state, doc, f"{len(seen)} batch(es) could be this round's")
        log.warning("shard %d round %d: no batch of the lost mpu-complete answer can be shown "
                    "to be this round's (%d candidate(s)); sending the round again", shard, rnd,
                    len(seen))
    else:
        log.warning("shard %d round %d: the lost mpu-complete answer created no batch; "
                    "sending the round again", shard, rnd)
    drop_claim(state, doc, intent.attempt)
    return None


def count_orphan(state: Store, doc: Callable[[str], str], reason: str) -> None:
    """Add one to the round's possible duplicate batches (``orphans.json``), by
    compare-and-swap: two executions counting at once both count."""
    for _ in range(8):
        try:
            raw, version = state.get_versioned(doc("orphans"))
            orphans, current = json.loads(raw), version
        except NotFound:
            orphans, current = {"count": 0, "reasons": []}, None
        orphans["count"] += 1
        orphans["reasons"] = (orphans["reasons"] + [reason])[-10:]
        if _put_over(state, doc("orphans"), dumps(orphans), current):
            return
    log.error("%s: could not count a possible duplicate batch (%s)", doc("orphans"), reason)
