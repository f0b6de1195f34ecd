"""Producer: record a run, plan it shard by shard while listing, and enqueue each shard's work.

Planning streams: a shard is written to storage and enqueued as soon as it is full, so a
10-million-object prefix never sits in memory, and workers start before the listing ends.
Run ids map to their OUTPUT location through the registry in the state store
(``workers.registry``), so ``moonbatch status RUN_ID`` finds a run from any machine of the fleet
even after Redis lost everything; the OUTPUT URL itself works everywhere too.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from config import Settings
from producer.planner import Shard, plan_shards
from producer.reader import ListingStats, iter_items
from workers import canary, layout, registry
from workers.models import RunSpec, SkillOptions
from workers.runstate import RunNotFound, open_output
from workers.storage import normalize_url, put_json

log = logging.getLogger(__name__)


class RunExists(Exception):
    """OUTPUT already holds a run."""


def new_run_id() -> str:
    """A sortable, unique run id: ``YYYYmmdd-HHMMSS-<6 hex>`` (UTC)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def local_queue(run_id: str) -> str:
    """The private broker queue of a run whose workers ``moonbatch run`` starts itself:
    ``moonbatch-run-<run_id>``, consumed by no fleet."""
    return f"moonbatch-run-{run_id}"


def register_run(spec: RunSpec, settings: Settings) -> None:
    """Record the run in the state store's registry and on its list of active runs, and arm
    the broker canary that lets a reconciler notice a broker that lost the run's messages.

    Raises storage errors when the state store cannot be written (the run id would be
    useless); a broker that cannot be reached only loses the canary (logged).
    """
    state = registry.open_state(settings)
    registry.record_run(state, run_id=spec.run_id, output=spec.output, input=spec.input,
                        skill=spec.options.skill, created_at=spec.created_at)
    registry.mark_active(state, spec.run_id, spec.output)
    try:
        canary.arm(settings, spec.run_id)
    except Exception as exc:
        log.warning("run %s: could not set the broker canary: %s", spec.run_id, exc)


def looks_like_url(ref: str) -> bool:
    """True if ``ref`` is a store URL or path rather than a run id."""
    return ref.startswith(("s3://", "file://", ".", "~")) or "/" in ref or "\\" in ref


def resolve_run(ref: str, settings: Settings) -> str:
    """The OUTPUT URL of a run given its id or its OUTPUT URL.

    Raises ``RunNotFound`` if the id is not in the registry of ``settings.state_url``.
    """
    if looks_like_url(ref):
        return normalize_url(ref)
    state = registry.open_state(settings)
    entry = registry.lookup_run(state, ref)
    if entry is None:
        raise RunNotFound(f"run {ref} is not in the registry at {state.url}: pass its OUTPUT "
                          "URL, or set MOONBATCH_STATE_URL to the state location it was "
                          "submitted with")
    return entry["output"]


def submit_run(input_url: str, output_url: str, options: SkillOptions, settings: Settings, *,
               shard_size: int | None = None, max_pixels: int | None = None,
               run_id: str | None = None, queue: str | None = None,
               on_shard: Callable[[Shard], None] | None = None) -> dict[str, Any]:
    """Record a run at ``output_url``, plan ``input_url`` into shards and enqueue them on the
    run's broker ``queue`` (default ``settings.queue``, the fleet's; ``moonbatch run`` with
    local workers passes ``local_queue(run_id)``), which every later step of the run uses.

    Returns the plan document (``run_id``, ``shards``, ``items``, ``skipped``...). Raises
    ``RunExists`` if OUTPUT holds a run, ``ValueError`` for bad URLs or limits, storage errors
    if the stores cannot be reached.
    """
    from workers.tasks import build_shard, enqueue, finalize_run

    input_url, output_url = normalize_url(input_url), normalize_url(output_url)
    if input_url == output_url:
        raise ValueError("INPUT and OUTPUT must be different locations")
    out = open_output(output_url, settings)
    inp = open_output(input_url, settings)
    spec = RunSpec(run_id=run_id or new_run_id(), input=input_url, output=output_url, options=options,
                   model=settings.model, shard_size=shard_size or settings.shard_size,
                   max_shard_bytes=settings.max_shard_bytes,
                   max_pixels=settings.max_pixels if max_pixels is None else max_pixels,
                   created_at=time.time(), queue=queue or settings.queue)
    if not put_json(out, layout.SPEC, spec.model_dump(), if_absent=True):
        existing = json.loads(out.get(layout.SPEC))
        raise RunExists(f"{output_url} already holds run {existing.get('run_id')}: "
                        "choose a new OUTPUT prefix")
    put_json(out, layout.SUMMARY, {"run_id": spec.run_id, "status": "running",
                                   "input": input_url, "output": output_url,
                                   "skill": options.skill})
    register_run(spec, settings)

    exclude = output_url[len(input_url):] if output_url.startswith(input_url) else None
    stats = ListingStats()
    n_shards = 0
    fragment_len = len(options.line_fragment())
    for shard in plan_shards(iter_items(inp, stats, exclude_prefix=exclude),
                             max_lines=spec.shard_size, max_bytes=spec.max_shard_bytes,
                             fragment_len=fragment_len):
        body = b"".join(item.to_json() + b"\n" for item in shard.items)
        out.put(layout.plan_items(shard.index), body)
        enqueue(build_shard, (output_url, spec.run_id, shard.index), queue=spec.queue)
        n_shards += 1
        if on_shard:
            on_shard(shard)
    plan = {"run_id": spec.run_id, "shards": n_shards, "items": stats.items,
            "listed": stats.listed, "skipped": stats.skipped,
            "skipped_examples": stats.skipped_examples, "planned_at": time.time()}
    put_json(out, layout.PLAN, plan, if_absent=True)
    # The last shard may have merged before the plan existed: let a worker check.
    enqueue(finalize_run, (output_url, spec.run_id), queue=spec.queue)
    return plan
