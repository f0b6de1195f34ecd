"""When to poll a Batch API batch next: young batches often, old ones rarely, sooner as progress
moves (seed 002, "Check status": a batch has no push notification, so it is polled)."""

from __future__ import annotations


def next_poll_interval(*, elapsed: float, total: int, completed: int,
                       last: tuple[float, int] | None, now: float,
                       min_interval: float, max_interval: float) -> float:
    """Seconds until the next status poll of a batch.

    Young batches are polled often and old ones rarely (a quarter of the batch's age, so the
    delay in noticing completion stays under ~25% of its run time); once progress moves, the
    interval aims at half the estimated time left, so the poll after completion comes soon.
    The rate is taken from ``last``, ``(time, finished)`` of an earlier poll (the chain's
    earliest that saw progress: ``shard.rate_since``). Seconds throughout, always within
    ``[min_interval, max_interval]``.
    """
    interval = elapsed * 0.25
    if last is not None and total > 0:
        t0, done0 = last
        if now > t0 and completed > done0:
            rate = (completed - done0) / (now - t0)
            interval = min(interval, max(total - completed, 0) / rate * 0.5)
    return max(min_interval, min(max_interval, interval))
