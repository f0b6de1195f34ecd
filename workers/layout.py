"""Where a run keeps its files, relative to its OUTPUT prefix.

    run.json                               summary (status running → completed | failed)
    results/shard-00000.jsonl              merged rows, one per input item, written once
    _moonbatch/spec.json                   the run spec (written once at submit)
    _moonbatch/plan.json                   {"shards": N, "items": M, ...} once listing is done
    _moonbatch/plan/shard-00000.jsonl      the shard's items: {"id", "size"} per line
    _moonbatch/shards/00000/upload.json    multipart upload in flight
    _moonbatch/shards/00000/build.json     line_index → item mapping and pre-send errors
    _moonbatch/shards/00000/batch.json     the submitted batch id
    _moonbatch/shards/00000/progress.json  last polled status (no URLs)
    _moonbatch/shards/00000/done.json      merged: counts and usage
    _moonbatch/failed.json                 why the run cannot complete
    _moonbatch/finalized                   guard: run.json was finalised

Keys are deterministic, so a retried or redelivered task finds what an earlier attempt wrote.
"""

from __future__ import annotations

STATE = "_moonbatch/"
SPEC = STATE + "spec.json"
PLAN = STATE + "plan.json"
FAILED = STATE + "failed.json"
FINALIZED = STATE + "finalized"
SUMMARY = "run.json"
RESULTS = "results/"
SHARDS = STATE + "shards/"


def plan_items(shard: int) -> str:
    """Key of the shard's item list (JSONL of ``PlanItem``)."""
    return f"{STATE}plan/shard-{shard:05d}.jsonl"


def shard_doc(shard: int, name: str) -> str:
    """Key of one of the shard's state documents: upload, build, batch, progress, done."""
    return f"{SHARDS}{shard:05d}/{name}.json"


def results(shard: int) -> str:
    """Key of the shard's merged result rows."""
    return f"{RESULTS}shard-{shard:05d}.jsonl"
