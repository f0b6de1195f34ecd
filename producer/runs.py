"""Producer: record a run, plan it shard by shard while listing, and enqueue each shard's work.

Planning streams: a shard is written to storage and enqueued as soon as it is full, so a
10-million-object prefix never sits in memory, and workers start before the listing ends.
Run ids map to their OUTPUT location through the Celery result backend (Redis by default), so
that ``moonbatch status RUN_ID`` can find a run; the OUTPUT URL itself works everywhere too.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from config import Settings
from producer.planner import Shard, plan_shards
from producer.reader import ListingStats, iter_items
from workers import layout
from workers.models import RunSpec, SkillOptions
from workers.runstate import RunNotFound, open_output
from workers.storage import normalize_url, put_json

REGISTRY_PREFIX = "moonbatch-run-"


class RunExists(Exception):
    """OUTPUT already holds a run."""


def new_run_id() -> str:
    """A sortable, unique run id: ``YYYYmmdd-HHMMSS-<6 hex>`` (UTC)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def register_run(run_id: str, output: str) -> None:
    """Remember where run ``run_id`` keeps its state (best effort: the OUTPUT URL also works)."""
    from workers.app import app

    app.backend.set(REGISTRY_PREFIX + run_id, json.dumps({"output": output}))


def resolve_run(ref: str) -> str:
    """The OUTPUT URL of a run given its id or its OUTPUT URL.

    Raises ``RunNotFound`` if the id is unknown to the result backend.
    """
    if ref.startswith("s3://") or "/" in ref or ref.startswith("."):
        return normalize_url(ref)
    from workers.app import app

    raw = app.backend.get(REGISTRY_PREFIX + ref)
    if not raw:
        raise RunNotFound(f"run {ref} is unknown to the result backend; pass its OUTPUT URL instead")
    return json.loads(raw)["output"]


def submit_run(input_url: str, output_url: str, options: SkillOptions, settings: Settings, *,
               shard_size: int | None = None, max_pixels: int | None = None,
               run_id: str | None = None,
               on_shard: Callable[[Shard], None] | None = None) -> dict[str, Any]:
    """Record a run at ``output_url``, plan ``input_url`` into shards and enqueue them.

    Returns the plan document (``run_id``, ``shards``, ``items``, ``skipped``...). Raises
    ``RunExists`` if OUTPUT holds a run, ``ValueError`` for bad URLs or limits, storage errors
    if the stores cannot be reached.
    """
    from workers.tasks import build_shard, finalize_run, mark_active

    input_url, output_url = normalize_url(input_url), normalize_url(output_url)
    if input_url == output_url:
        raise ValueError("INPUT and OUTPUT must be different locations")
    out = open_output(output_url, settings)
    inp = open_output(input_url, settings)
    spec = RunSpec(run_id=run_id or new_run_id(), input=input_url, output=output_url, options=options,
                   model=settings.model, shard_size=shard_size or settings.shard_size,
                   max_shard_bytes=settings.max_shard_bytes,
                   max_pixels=settings.max_pixels if max_pixels is None else max_pixels,
                   created_at=time.time())
    if not put_json(out, layout.SPEC, spec.model_dump(), if_absent=True):
        existing = json.loads(out.get(layout.SPEC))
        raise RunExists(f"{output_url} already holds run {existing.get('run_id')}: "
                        "choose a new OUTPUT prefix")
    put_json(out, layout.SUMMARY, {"run_id": spec.run_id, "status": "running",
                                   "input": input_url, "output": output_url,
                                   "skill": options.skill})
    try:
        register_run(spec.run_id, output_url)
        mark_active(output_url)
    except Exception:  # the registry is a convenience; the run lives in storage
        pass

    exclude = output_url[len(input_url):] if output_url.startswith(input_url) else None
    stats = ListingStats()
    n_shards = 0
    fragment_len = len(options.line_fragment())
    for shard in plan_shards(iter_items(inp, stats, exclude_prefix=exclude),
                             max_lines=spec.shard_size, max_bytes=spec.max_shard_bytes,
                             fragment_len=fragment_len):
        body = b"".join(item.to_json() + b"\n" for item in shard.items)
        out.put(layout.plan_items(shard.index), body)
        build_shard.delay(output_url, spec.run_id, shard.index)
        n_shards += 1
        if on_shard:
            on_shard(shard)
    plan = {"run_id": spec.run_id, "shards": n_shards, "items": stats.items,
            "listed": stats.listed, "skipped": stats.skipped,
            "skipped_examples": stats.skipped_examples, "planned_at": time.time()}
    put_json(out, layout.PLAN, plan, if_absent=True)
    # The last shard may have merged before the plan existed: let a worker check.
    finalize_run.delay(output_url, spec.run_id)
    return plan
