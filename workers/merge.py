"""Merge: a batch's result lines → one output row per shard item. Pure: no I/O.

Result lines come back in any order and split across several files (FACTS.md), so they are keyed
on ``line_index`` (seed 002, "Output format"), and the ``id`` on each is cross-checked. Every item
of the shard ends in exactly one row: its result, its own error, the pre-send error recorded by
the builder, the batch's error if the whole batch failed, or ``missing_result`` if the API
returned nothing for its line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from workers.models import PlanItem, ShardBuild


@dataclasses.dataclass
class MergeStats:
    """Counts of one shard's merge: rows ``ok`` / ``error``, token ``usage`` summed over ok rows,
    result lines that were ``duplicate`` (same line_index twice), ``malformed`` (not JSON or no
    valid line_index), ``id_mismatch`` (id differs from the one sent), and items ``missing``."""

    ok: int = 0
    error: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    duplicate: int = 0
    malformed: int = 0
    id_mismatch: int = 0
    missing: int = 0


def index_result_lines(files: Iterable[bytes], n_lines: int, stats: MergeStats
                       ) -> dict[int, dict[str, Any]]:
    """Parse result JSONL files into ``{line_index: row}``; the first row for an index wins."""
    by_index: dict[int, dict[str, Any]] = {}
    for data in files:
        for raw in data.splitlines():
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                li = row["line_index"]
            except (ValueError, KeyError, TypeError):
                stats.malformed += 1
                continue
            if isinstance(li, bool) or not isinstance(li, int) or not 0 <= li < n_lines:
                stats.malformed += 1
                continue
            if li in by_index:
                stats.duplicate += 1
                continue
            by_index[li] = row
    return by_index


def merge_rows(items: Sequence[PlanItem], build: ShardBuild, result_files: Iterable[bytes],
               source_of: Callable[[str], str], *,
               batch_error: dict[str, str] | None = None) -> tuple[bytes, MergeStats]:
    """Merge a shard into its results JSONL (rows in plan order) and its stats.

    Rows: ``{"id", "source", "status": "ok", "result", "usage"}`` or
    ``{"id", "source", "status": "error", "error": {"code", "message"}}``. ``batch_error``
    (``{"code", "message"}``) marks every sent line of a failed batch.
    """
    stats = MergeStats()
    by_index = {} if batch_error else index_result_lines(result_files, len(build.lines), stats)
    line_of = {item_index: li for li, item_index in enumerate(build.lines)}
    out = []
    for i, item in enumerate(items):
        row: dict[str, Any] = {"id": item.id, "source": source_of(item.id)}
        pre = build.errors.get(str(i))
        li = line_of.get(i)
        if pre is not None:
            row.update(status="error", error=pre)
        elif li is None:  # planned but neither sent nor recorded: must not be lost
            row.update(status="error", error={"code": "not_sent",
                                              "message": "item was not included in the batch"})
        elif batch_error is not None:
            row.update(status="error", error=batch_error)
        elif (res := by_index.get(li)) is None:
            stats.missing += 1
            row.update(status="error", error={
                "code": "missing_result",
                "message": f"the batch returned no result for line_index {li}"})
        else:
            if "id" in res and res["id"] != item.id:
                stats.id_mismatch += 1
            if res.get("status") == "ok":
                usage = res.get("usage") or {}
                row.update(status="ok", result=res.get("result"), usage=usage)
                stats.input_tokens += int(usage.get("input_tokens") or 0)
                stats.output_tokens += int(usage.get("output_tokens") or 0)
            else:
                err = res.get("error") or {}
                row.update(status="error", error={
                    "code": str(err.get("code") or "unknown_error"),
                    "message": str(err.get("message") or "")})
        if row["status"] == "ok":
            stats.ok += 1
        else:
            stats.error += 1
        out.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(out) + "\n").encode() if out else b"", stats


def next_poll_interval(*, elapsed: float, total: int, completed: int,
                       last: tuple[float, int] | None, now: float,
                       min_interval: float, max_interval: float) -> float:
    """Seconds until the next status poll of a batch.

    Young batches are polled often and old ones rarely (a quarter of the batch's age, so the
    delay in noticing completion stays under ~25% of its run time); once progress moves, the
    interval aims at half the estimated time left, so the poll after completion comes soon.
    Always within ``[min_interval, max_interval]``.
    """
    interval = elapsed * 0.25
    if last is not None and total > 0:
        t0, done0 = last
        if now > t0 and completed > done0:
            rate = (completed - done0) / (now - t0)
            interval = min(interval, max(total - completed, 0) / rate * 0.5)
    return max(min_interval, min(max_interval, interval))
