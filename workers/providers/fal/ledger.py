"""The ledger of a fal round (``requests.json``): its cursor, the requests in flight with their
ids, the lines to send again and the round's counts; the finished lines written beside it
(``results-NNNNNN.jsonl``), and when the round's next step is due (fal keeps results of 10 KB
or more only 6 minutes, FACTS.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson

from moonbatch.workers import layout
from moonbatch.workers.lines import skill_line_id
from moonbatch.workers.models import ShardBuild
from moonbatch.workers.providers import (
    RoundContext,
)

log = logging.getLogger(__name__)


RESULT_LIFETIME = 360.0  # fal keeps results of 10 KB or more this long (FACTS.md)
FIRST_ESTIMATE = 2.0  # seconds a request takes, until the round has measured it


def new_ledger(lines: int) -> dict[str, Any]:
    return {"lines": lines, "cursor": 0, "resend": [], "inflight": {}, "ok": 0, "failed": 0,
            "requests": 0, "possible_duplicates": 0, "rate_limited": 0, "expired": 0,
            "est": FIRST_ESTIMATE, "backoff_until": 0.0, "limited_streak": 0, "steps": 0}


def ledger_done(ledger: dict[str, Any]) -> bool:
    return (ledger["cursor"] >= ledger["lines"] and not ledger["resend"]
            and not ledger["inflight"])


def results_key(ctx: RoundContext, n: int) -> str:
    return layout.round_results_part(ctx.shard, ctx.rnd, n)


def finish_line(ctx: RoundContext, build: ShardBuild, ledger: dict[str, Any], out: list[bytes],
            line: dict[str, Any]) -> None:
    """A line is final: give it the id it was sent under, count it, add it to ``out``."""
    line_id = build.id_prefix + ctx.items[build.lines[line["line_index"]]].key
    if build.skills:
        line_id = skill_line_id(line_id, ctx.run.spec.all_options[build.skills[line["line_index"]]].skill)
    line["id"] = line_id
    ledger["ok" if line["status"] == "ok" else "failed"] += 1
    out.append(orjson.dumps(line))


def error_lines(lines: Sequence[int], code: str, message: str) -> list[dict[str, Any]]:
    return [{"line_index": li, "status": "error", "error": {"code": code, "message": message}}
            for li in lines]


def next_step_in(ledger: dict[str, Any], settings: Any) -> float:
    """Seconds to the next step: when the first request in flight is expected to finish (or a
    quarter of how late it is, once overdue), when a back-off ends, or soon when lines wait for slots;
    within the poll bounds and well within fal's 6-minute result retention."""
    now = time.time()
    hi = min(settings.poll_max_interval, RESULT_LIFETIME / 6)
    lo = settings.poll_min_interval
    waits = []
    for entry in ledger["inflight"].values():
        overdue = now - entry["sent_at"] - ledger["est"]
        waits.append(-overdue if overdue < 0 else max(lo, 0.25 * overdue))
    if ledger["backoff_until"] > now:
        waits.append(ledger["backoff_until"] - now)
    elif ledger["resend"] or ledger["cursor"] < ledger["lines"]:
        waits.append(max(lo, ledger["est"] / 4))  # slots held elsewhere may free soon
    return max(lo, min(hi, min(waits) if waits else lo))
