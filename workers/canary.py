"""Noticing that the broker lost its data: a canary key per run in the broker's Redis.

A Redis broker that restarts empty (no persistence, a failover, a flush) drops every queued and
scheduled message, and no task is left to say so. The producer sets ``moonbatch:canary:<run_id>``
when it enqueues a run; a reconciler that finds the key gone knows the run's messages may be
gone with it, sets it again and re-enqueues every unfinished step of the run (duplicates are
harmless: leases, poll-chain ids and write-once results absorb them). Brokers that are not
Redis (the filesystem transport of the demo keeps its messages on disk) have no canary.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from moonbatch.config import Settings

log = logging.getLogger(__name__)
PREFIX = "moonbatch:canary:"


@functools.cache
def _client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)


def broker_redis(settings: Settings) -> Any | None:
    """A Redis client on the broker, or None when the broker is not Redis."""
    if not settings.broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        return None
    return _client(settings.broker_url)


def arm(settings: Settings, run_id: str) -> None:
    """Set the run's canary (at submit and resume). Raises ``redis`` errors."""
    client = broker_redis(settings)
    if client is not None:
        client.set(PREFIX + run_id, str(time.time()))


def broker_lost(settings: Settings, run_id: str) -> bool:
    """True if the run's canary is gone (the broker lost its data since it was set); sets it
    again, so one caller sees each loss. False for brokers that are not Redis.

    Raises ``redis`` errors when the broker cannot be reached.
    """
    client = broker_redis(settings)
    if client is None:
        return False
    lost = bool(client.set(PREFIX + run_id, str(time.time()), nx=True))
    if lost:
        log.warning("run %s: the broker lost its data (canary gone); re-enqueuing its work", run_id)
    return lost


def disarm(settings: Settings, run_id: str) -> None:
    """Remove the run's canary (the run is final). Best effort."""
    client = broker_redis(settings)
    if client is not None:
        try:
            client.delete(PREFIX + run_id)
        except Exception:  # a final run's canary is only a small key left behind
            log.debug("could not delete the canary of run %s", run_id, exc_info=True)
