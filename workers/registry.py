"""The run registry in the state store (``MOONBATCH_STATE_URL``): durable, shared by a fleet.

A run id is the user's handle on a run (``moonbatch submit`` prints it); it must keep working
after the broker and the result backend lose everything, from any machine. So the map run id →
OUTPUT lives in object storage next to the runs' own truth, never only in Redis. The same store
lists the runs that are not final yet (what the reconciler sweeps); a provider may keep its own
claims there (the Batch API's: ``moonbatch.workers.providers.moondream.records``). Keys are in
``moonbatch.workers.layout``.
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
