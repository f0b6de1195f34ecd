"""The ledger of a fal round (``requests.json``, ``moonbatch.workers.stepped``): fal's own fields
(``expired``: results fal forgot; ``est``: seconds a request takes) and when the round's next
step is due (fal keeps results of 10 KB or more only 6 minutes, FACTS.md)."""

from __future__ import annotations

import logging
import time
from typing import Any

from moonbatch.workers import stepped
from moonbatch.workers.providers.fal.settings import FalSettings

log = logging.getLogger(__name__)


RESULT_LIFETIME = 360.0  # fal keeps results of 10 KB or more this long (FACTS.md)
FIRST_ESTIMATE = 2.0  # seconds a request takes, until the round has measured it
# A step's own time beyond its wait (the ledger's read and write, the status and result GETs,
# the submits): 0.2-0.5 s measured on 2 cores (bench fal_throughput).
STEP_SECONDS = 0.5
LEDGER_EXTRA = {"expired": 0, "est": FIRST_ESTIMATE}


def new_ledger(lines: int) -> dict[str, Any]:
    """An empty fal ledger (``moonbatch.workers.stepped.new_ledger`` plus fal's ``expired``
    count and ``est``, the seconds a request takes)."""
    return stepped.new_ledger(lines, **LEDGER_EXTRA)


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


def in_flight(ledger: dict[str, Any], settings: Any) -> int:
    """Most requests the fleet keeps at fal for the round's endpoint (``fal_in_flight``): the
    queue ahead must outlast the time the fleet takes to refill a freed runner, the next
    step (at least ``poll_min_interval`` away) and its own calls, at the round's measured
    seconds per request (``est``)."""
    return settings.section(FalSettings).fal_in_flight(
        ledger["est"], settings.poll_min_interval + STEP_SECONDS)
