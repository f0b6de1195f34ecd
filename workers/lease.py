"""Leases in object storage: one worker at a time builds a shard.

A lease is a small JSON document ``{"owner", "heartbeat", "expires"}`` created with a conditional
put (create-if-absent) and renewed or taken over with compare-and-swap on its ETag (``IfMatch``;
FACTS.md, S3). A holder that stops renewing (killed, OOM, partitioned) loses the lease after
``ttl`` seconds, and the next attempt takes it over atomically: two takers cannot both win.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from workers.storage import NotFound, Store


class LeaseLost(Exception):
    """Another worker holds the lease now: stop without writing anything more."""


class Lease:
    """The lease at ``key`` for ``owner``; ``ttl`` in seconds; ``clock`` is injectable."""

    def __init__(self, store: Store, key: str, owner: str, ttl: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.key, self.owner, self.ttl, self.clock = store, key, owner, ttl, clock
        self._version: str | None = None
        self._renewed = 0.0

    def _doc(self) -> bytes:
        now = self.clock()
        return json.dumps({"owner": self.owner, "heartbeat": now, "expires": now + self.ttl}).encode()

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours; False if someone else holds
        it. Raises storage errors."""
        for _ in range(3):
            if self.store.put(self.key, self._doc(), if_absent=True):
                self._remember()
                return True
            try:
                data, version = self.store.get_versioned(self.key)
            except NotFound:
                continue  # released between our two calls: try to create it again
            doc = json.loads(data)
            if doc.get("owner") != self.owner and doc.get("expires", 0) > self.clock():
                return False
            if self.store.put_if_match(self.key, self._doc(), version):
                self._remember()
                return True
        return False

    def _remember(self) -> None:
        _, self._version = self.store.get_versioned(self.key)
        self._renewed = self.clock()

    def renew(self, *, force: bool = False) -> None:
        """Extend the lease (at most every ``ttl / 4`` unless ``force``). Raises ``LeaseLost``
        if another owner took it over."""
        if not force and self.clock() - self._renewed < self.ttl / 4:
            return
        try:
            data, version = self.store.get_versioned(self.key)
        except NotFound:
            raise LeaseLost(f"lease {self.key} vanished") from None
        if json.loads(data).get("owner") != self.owner or not self.store.put_if_match(
                self.key, self._doc(), version):
            raise LeaseLost(f"lease {self.key} was taken over")
        self._remember()

    def release(self) -> None:
        """Give the lease up if it is still ours (best effort)."""
        try:
            data, _ = self.store.get_versioned(self.key)
            if json.loads(data).get("owner") == self.owner:
                self.store.delete(self.key)
        except NotFound:
            pass


def lease_is_live(store: Store, key: str, now: float | None = None) -> bool:
    """True if someone holds an unexpired lease at ``key``."""
    try:
        doc = json.loads(store.get(key))
    except NotFound:
        return False
    return doc.get("expires", 0) > (time.time() if now is None else now)
