"""The run registry in the state store (``MOONBATCH_STATE_URL``): durable, shared by a fleet.

A run id is the user's handle on a run (``moonbatch submit`` prints it); it must keep working
after the broker and the result backend lose everything, from any machine. So the map run id →
OUTPUT lives in object storage next to the runs' own truth, never only in Redis. The same store
lists the runs that are not final yet (what the reconciler sweeps) and records which run owns
each submitted batch (so a batch found again after a lost ``mpu-complete`` answer is adopted by
one round only). Keys are in ``moonbatch.workers.layout``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from moonbatch.config import Settings
from moonbatch.workers import layout
from moonbatch.workers.storage import Store, get_json_or_none, open_store, put_json


def open_state(settings: Settings) -> Store:
    """The state store named by ``settings.state_url`` (S3 uses the settings' endpoint).

    Raises ``ValueError`` for an unsupported URL.
    """
    return open_store(settings.state_url, endpoint_url=settings.s3_endpoint_url,
                      region=settings.s3_region)


def record_run(state: Store, *, run_id: str, output: str, input: str, skill: str,
               created_at: float) -> None:
    """Record run ``run_id`` → ``output`` (idempotent: an existing entry is kept)."""
    put_json(state, layout.registry_run(run_id),
             {"run_id": run_id, "output": output, "input": input, "skill": skill,
              "created_at": created_at}, if_absent=True)


def forget_run(state: Store, run_id: str) -> None:
    """Remove the registry entry and active marker of ``run_id`` (``moonbatch clean``)."""
    state.delete(layout.registry_run(run_id))
    state.delete(layout.registry_active(run_id))


def lookup_run(state: Store, run_id: str) -> dict[str, Any] | None:
    """The registry entry of ``run_id`` (``{"run_id", "output", "input", "skill",
    "created_at"}``), or None if the state store does not know it."""
    if not run_id or "/" in run_id or run_id.startswith("."):
        return None
    return get_json_or_none(state, layout.registry_run(run_id))


def iter_runs(state: Store, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Registry entries, newest first (run ids start with their UTC creation time).

    Holds the run ids in memory (about 30 bytes each), not the entries.
    """
    keys = sorted((o.key for o in state.iter_objects(layout.REGISTRY_RUNS)
                   if o.key.endswith(".json")), reverse=True)
    for key in keys[:limit]:
        entry = get_json_or_none(state, key)
        if entry is not None:
            yield entry


def mark_active(state: Store, run_id: str, output: str) -> None:
    """Put the run on the reconciler's list."""
    put_json(state, layout.registry_active(run_id), {"run_id": run_id, "output": output,
                                                     "since": time.time()})


def forget_active(state: Store, run_id: str) -> None:
    """Take the run off the reconciler's list (it is final)."""
    state.delete(layout.registry_active(run_id))


def iter_active(state: Store) -> Iterator[tuple[str, str]]:
    """``(run_id, output)`` of every run on the reconciler's list."""
    for obj in state.iter_objects(layout.REGISTRY_ACTIVE):
        doc = get_json_or_none(state, obj.key)  # None: taken off the list meanwhile
        if doc and doc.get("output"):
            yield layout.run_id_of(obj.key), doc["output"]


def claim_batch(state: Store, batch_id: str, *, output: str, shard: int, rnd: int) -> bool:
    """Record that round ``rnd`` of ``shard`` of the run at ``output`` owns ``batch_id``.

    True if this call made the claim or the same round held it already; False if another
    round owns the batch.
    """
    if put_json(state, layout.registry_batch(batch_id),
                {"output": output, "shard": shard, "round": rnd, "at": time.time()},
                if_absent=True):
        return True
    return _owned_by(batch_owner(state, batch_id), output, shard, rnd)


def _owned_by(claim: dict[str, Any] | None, output: str, shard: int, rnd: int) -> bool:
    """True if ``claim`` (a ``batches/`` document, or None) names this round."""
    return claim is not None and (claim.get("output"), claim.get("shard"),
                                  claim.get("round")) == (output, shard, rnd)


def batch_owner(state: Store, batch_id: str) -> dict[str, Any] | None:
    """The claim on ``batch_id`` (``{"output", "shard", "round", "at"}``), or None."""
    return get_json_or_none(state, layout.registry_batch(batch_id))


class BatchClaims:
    """The claims of one round (run at ``output``, ``shard``, ``rnd``) in the state store."""

    def __init__(self, state: Store, *, output: str, shard: int, rnd: int) -> None:
        self.state, self.output, self.shard, self.rnd = state, output, shard, rnd

    def claim(self, batch_id: str) -> bool:
        """Claim ``batch_id`` for this round; False if another round owns it."""
        return claim_batch(self.state, batch_id, output=self.output, shard=self.shard,
                           rnd=self.rnd)

    def taken(self, batch_id: str) -> bool:
        """True if another round owns ``batch_id``."""
        owner = batch_owner(self.state, batch_id)
        return owner is not None and not _owned_by(owner, self.output, self.shard, self.rnd)
