"""The ledger of a fal round (``requests.json``, ``moonbatch.workers.stepped``): fal's own fields
(``expired``: results fal forgot; ``est``: seconds a request takes) and when the round's next
step is due (fal keeps results of 10 KB or more only 6 minutes, FACTS.md)."""

from __future__ import annotations

import logging
import time
from typing import Any

from moonbatch.workers import stepped

log = logging.getLogger(__name__)


RESULT_LIFETIME = 360.0  # fal keeps results of 10 KB or more this long (FACTS.md)
FIRST_ESTIMATE = 2.0  # seconds a request takes, until the round has measured it
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
