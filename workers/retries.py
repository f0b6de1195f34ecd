"""Retry passes (``moonbatch retry-failed``): a finished run's error rows sent again into the
same OUTPUT, replacing them, on the run's own state machine.

A pass is first recorded (``_moonbatch/retries/NNNN.json``: its error codes, and for every
shard with such rows the round the pass starts it at), before anything else changes, so a
pass that stopped half-way is finished by the same command run again or by the reconciler.
Applying it (``apply_pass``, idempotent) reopens the run: each listed shard gets round K (the
shard's last round + 1) whose ``todo.json`` lists the matching items, with ``base`` K so its
items get a fresh ``max_item_attempts`` budget; the ``finalized`` marker goes, ``run.json``
says running again, the shards' ``done.json`` go; then ``NNNN.applied`` is written. From there
the pipeline's own steps run: build, poll and merge round K (and rounds after it for
retryable errors), and ``_finish_shard`` composes every round of the shard, later rounds
overriding earlier ones, so ``results/`` keeps exactly one row per item.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from moonbatch.workers import layout, writers
from moonbatch.workers.runstate import Run
from moonbatch.workers.storage import Store, get_json, get_json_or_none, put_json


def error_rows(store: Store, fmt: str, shard: int, codes: set[str] | None
               ) -> tuple[list[int], dict[str, int]]:
    """The shard's error rows: ``(indices of those whose code is in codes (None: every
    code), {code: rows} of every error row)``. Raises ``NotFound`` for a shard not merged."""
    return _error_rows(writers.read_shard(store, fmt, shard), codes)


def _error_rows(rows: Iterable[dict[str, Any]], codes: set[str] | None
                ) -> tuple[list[int], dict[str, int]]:
    """``error_rows`` of a shard's rows (dicts, in plan order)."""
    chosen: list[int] = []
    counts: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row.get("status") != "error":
            continue
        code = str((row.get("error") or {}).get("code") or "unknown_error")
        counts[code] = counts.get(code, 0) + 1
        if codes is None or code in codes:
            chosen.append(i)
    return chosen, counts


def find_errors(run: Run, codes: set[str] | None
                ) -> tuple[dict[int, list[int]], dict[str, int], dict[str, int]]:
    """Every error row of a merged run: ``({shard: item indices to retry}, {code: rows to
    retry}, {code: error rows}``), shard by shard (one shard's rows in memory at a time; the
    next shards' files read meanwhile, ``writers.read_results``). Raises ``NotFound`` for a
    shard not merged, ``StorageError``, the format's decoding errors (a damaged file)."""
    shards = get_json(run.output, layout.PLAN)["shards"]
    found: dict[int, list[int]] = {}
    chosen: dict[str, int] = {}
    every: dict[str, int] = {}
    for got in writers.read_results(run.output, run.spec.output_format, shards):
        indices, counts = _error_rows(got.rows(), codes)
        for code, n in counts.items():
            every[code] = every.get(code, 0) + n
            if codes is None or code in codes:
                chosen[code] = chosen.get(code, 0) + n
        if indices:
            found[got.shard] = indices
    return found, chosen, every


def next_round(store: Store, shard: int) -> int:
    """The shard's last round (any document under ``rK/``) + 1."""
    keys = (layout.parse_shard_key(o.key) for o in store.iter_objects(layout.shard_prefix(shard)))
    last = layout.latest_round((k.round, k.name) for k in keys if k is not None)
    return 0 if last is None else last + 1


def latest_pass(store: Store) -> tuple[dict[str, Any] | None, bool]:
    """The run's latest retry pass document (None: never retried) and whether it was
    applied."""
    keys = {k for o in store.iter_objects(layout.RETRIES) if (k := layout.parse_retry_pass(o.key))}
    numbers = [number for number, name in keys if name == "json"]
    if not numbers:
        return None, False
    number = max(numbers)
    return get_json(store, layout.retry_pass(number)), (number, "applied") in keys


def pending_pass(store: Store) -> dict[str, Any] | None:
    """The latest retry pass if it was recorded but not applied yet (its command stopped)."""
    doc, applied = latest_pass(store)
    return None if applied else doc


def record_pass(store: Store, found: dict[int, list[int]], codes: set[str] | None,
                counts: dict[str, int]) -> dict[str, Any]:
    """Record a new retry pass of the error rows ``found`` (see ``find_errors``) and return
    its document. Raises ``RuntimeError`` if another command recorded a pass at the same time."""
    last, _ = latest_pass(store)
    number = (last["pass"] if last else 0) + 1
    doc = {"pass": number, "codes": sorted(codes) if codes is not None else None,
           "shards": [[shard, next_round(store, shard)] for shard in sorted(found)],
           "counts": counts, "items": sum(len(v) for v in found.values()),
           "created_at": time.time()}
    if not put_json(store, layout.retry_pass(number), doc, if_absent=True):
        raise RuntimeError(f"another retry-failed recorded pass {number} of this run meanwhile: "
                           "follow it with `moonbatch wait`")
    return doc


def apply_pass(store: Store, doc: dict[str, Any], found: dict[int, list[int]] | None = None
               ) -> None:
    """Reopen the run for retry pass ``doc`` (idempotent; see the module docstring). ``found``
    (``find_errors``'s) saves reading the results again; without it a missing ``todo.json`` is
    computed from the shard's results, which a pass changes only after its round ran."""
    codes = set(doc["codes"]) if doc["codes"] is not None else None
    fmt = None
    for shard, rnd in doc["shards"]:
        key = layout.round_doc(shard, rnd, "todo")
        if store.exists(key):
            continue
        if found is not None and shard in found:
            items = found[shard]
        else:
            fmt = fmt or get_json(store, layout.SPEC).get("output_format", "jsonl")
            items = error_rows(store, fmt, shard, codes)[0]
        put_json(store, key, {"items": items, "reason": f"retry-failed pass {doc['pass']}",
                              "base": rnd}, if_absent=True)
    # The marker first: nothing finalises the run while its shards reopen.
    store.delete(layout.FINALIZED)
    summary = get_json_or_none(store, layout.SUMMARY) or {}
    if summary.get("status") != "running":
        put_json(store, layout.SUMMARY, {**summary, "status": "running",
                                         "retry_pass": doc["pass"]})
    store.delete(layout.FAILED)  # a recorded failure is retried, not inherited
    store.delete(layout.STOPPED)  # a stopped run carries on (workers.stops)
    for shard, rnd in doc["shards"]:
        done = get_json_or_none(store, layout.shard_doc(shard, "done"))
        if done is not None and done.get("rounds", 1) <= rnd:  # merged before this pass
            store.delete(layout.shard_doc(shard, "done"))
    store.put(layout.retry_pass(doc["pass"], "applied"), b"{}")

