"""A run's end, told through the broker's Redis: whoever makes a run final (``reconcile.run_final``:
the finaliser, a cancel, the reconciler) publishes on ``moonbatch:final:<run_id>`` once, and a
command following the run (``producer.follow``) waits on that channel instead of reading
``run.json`` every 0.2 s. The message is only a hint to look now: ``run.json`` stays the
source of truth, read on every wake-up, and the follower still reads it every
``FALLBACK_SECONDS`` in case a message is lost (a subscriber reconnecting, a publisher that
died between its writes and its publish). One message per run, none per shard or step.
Brokers that are not Redis have no channel: their followers read ``run.json`` as before.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from moonbatch.config import Settings
from moonbatch.workers.canary import broker_redis

log = logging.getLogger(__name__)
PREFIX = "moonbatch:final:"
#: Seconds between two reads of ``run.json`` while subscribed: a lost message costs at most
#: this much delay (without a subscription the follower reads it every 0.2 s).
FALLBACK_SECONDS = 1.0


def announce(settings: Settings, run_id: str) -> None:
    """Tell the run's followers it is final (after its ``run.json`` says so). Best effort: a
    follower that misses it reads ``run.json`` within ``FALLBACK_SECONDS``."""
    client = broker_redis(settings)
    if client is None:
        return
    try:
        client.publish(PREFIX + run_id, b"final")
    except Exception:  # the followers' fallback read finds the end
        log.debug("could not announce the end of run %s", run_id, exc_info=True)


class EndWatch:
    """A subscription to one run's end (``announce``). ``wait(seconds)`` returns True as soon
    as the end is announced, False after ``seconds`` without it; once the connection fails,
    ``alive`` is False and the caller reads ``run.json`` at its usual pace."""

    def __init__(self, pubsub: Any) -> None:
        self.pubsub = pubsub
        self.alive = True

    @classmethod
    def open(cls, settings: Settings, run_id: str) -> EndWatch | None:
        """Subscribe to ``run_id``'s end, and wait for Redis to confirm it (an announcement
        from then on is kept for ``wait``: the caller reads ``run.json`` once after this, so
        an end between its last read and the subscription is not missed); None when the
        broker is not Redis or does not confirm within a second (the caller reads
        ``run.json`` as before)."""
        client = broker_redis(settings)
        if client is None:
            return None
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(PREFIX + run_id)
            confirmed = pubsub.get_message(timeout=1.0)
        except Exception:
            log.debug("cannot subscribe to the end of run %s", run_id, exc_info=True)
            confirmed = None
        if not confirmed or confirmed.get("type") != "subscribe":
            _close(pubsub)
            return None
        return cls(pubsub)

    def wait(self, seconds: float) -> bool:
        """Block up to ``seconds`` for the end's announcement; True when it came."""
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                message = self.pubsub.get_message(timeout=left)
                if message is not None and message.get("type") == "message":
                    return True
        except Exception:  # a dropped connection: fall back to reading run.json
            log.debug("the end subscription failed", exc_info=True)
            self.close()
        return False

    def close(self) -> None:
        """Unsubscribe (the connection goes back to the client's pool)."""
        self.alive = False
        _close(self.pubsub)


def _close(pubsub: Any) -> None:
    try:
        pubsub.close()
    except Exception:  # closing a broken connection: nothing left to release
        pass
