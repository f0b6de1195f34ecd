"""Leases in object storage: one worker at a time builds a shard.

A lease is a small JSON document ``{"owner", "heartbeat", "expires"}`` created with a conditional
put (create-if-absent) and renewed or taken over with compare-and-swap on its ETag (``IfMatch``;
FACTS.md, S3). A holder that stops renewing (killed, OOM, partitioned) loses the lease after
``ttl`` seconds, and the next attempt takes it over atomically: two takers cannot both win.

An owner names one execution, not one message: a broker redelivers a running task with its
task id (late acks after a lost connection, a task longer than the visibility timeout), so a
task's leases are owned by ``execution_owner(task id)``, unique to each run of the task body;
the redelivered copy then finds the lease held and waits instead of building beside it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from moonbatch.workers.storage import NotFound, Store


class LeaseLost(Exception):
    """Another worker holds the lease now: stop without writing anything more."""


def execution_owner(task_id: str | None) -> str:
    """A lease owner unique to this execution of a task: ``<task id>/<12 hex>`` (a random
    owner when there is no task id). Two deliveries of one message get two owners."""
    return f"{task_id or 'task'}/{uuid.uuid4().hex[:12]}"


def task_of(owner: str | None) -> str:
    """The task id in an ``execution_owner`` (an owner of another shape: itself)."""
    text = owner or ""
    return text.rpartition("/")[0] or text


class Lease:
    """The lease at ``key`` for ``owner``; ``ttl`` in seconds; ``clock`` is injectable."""

    def __init__(self, store: Store, key: str, owner: str, ttl: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.key, self.owner, self.ttl, self.clock = store, key, owner, ttl, clock
        self._renewed = 0.0
        self._held = False  # acquired (or renewed) by this object, not released or lost since
        self._version: str | None = None  # the version this object last wrote (None: unknown)
        self._lock = threading.Lock()  # one renewal at a time from this process
        self.holder_expires = 0.0  # when ``acquire`` fails: when the holder's lease runs out
        self.holder: str | None = None  # when ``acquire`` fails: the holder's owner

    def _doc(self) -> bytes:
        now = self.clock()
        return json.dumps({"owner": self.owner, "heartbeat": now, "expires": now + self.ttl}).encode()

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours; False if someone else holds
        it (``holder`` and ``holder_expires`` then say who and until when). Raises storage
        errors."""
        for _ in range(3):
            if (created := self.store.put_new(self.key, self._doc())) is not None:
                self._remember(created)
                return True
            try:
                data, version = self.store.get_versioned(self.key)
            except NotFound:
                continue  # released between our two calls: try to create it again
            doc = json.loads(data)
            if doc.get("owner") != self.owner and doc.get("expires", 0) > self.clock():
                self.holder, self.holder_expires = doc.get("owner"), float(doc["expires"])
                return False
            if (written := self.store.swap(self.key, self._doc(), version)) is not None:
                self._remember(written)
                return True
        return False

    def _remember(self, version: str | None) -> None:
        self._renewed = self.clock()
        self._held = True
        self._version = version

    def renew(self, *, force: bool = False) -> None:
        """Extend the lease (at most every ``ttl / 4`` unless ``force``: one renewed since is
        surely still this object's, as no other owner takes it over before it expires; one
        this object found lost or released is looked at again). Raises ``LeaseLost`` if
        another owner took it over."""
        with self._lock:
            if not force and self._held and self.clock() - self._renewed < self.ttl / 4:
                return
            # Still at the version this object wrote: nobody took it over since, so it is
            # extended without a read (compare-and-swap); else it is read to see who holds it.
            if self._version is not None and (
                    written := self.store.swap(self.key, self._doc(), self._version)) is not None:
                self._remember(written)
                return
            for _ in range(3):
                try:
                    data, version = self.store.get_versioned(self.key)
                except NotFound:
                    self._held = False
                    raise LeaseLost(f"lease {self.key} vanished") from None
                if json.loads(data).get("owner") != self.owner:
                    self._held = False
                    raise LeaseLost(f"lease {self.key} was taken over")
                if (written := self.store.swap(self.key, self._doc(), version)) is not None:
                    self._remember(written)
                    return
                # Changed between read and write: look again at who holds it.
            raise LeaseLost(f"lease {self.key} keeps changing under its owner")

    @contextlib.contextmanager
    def kept_alive(self) -> Iterator[Callable[[], None]]:
        """Renew the lease every ``ttl / 4`` from a background thread while the block runs (a
        slow request must not let it expire; a killed process stops renewing with it). Yields
        ``check()``, which raises ``LeaseLost`` once a renewal found the lease taken over."""
        lost: list[LeaseLost] = []
        stop = threading.Event()

        def renew_loop() -> None:
            while not stop.wait(self.ttl / 4):
                try:
                    self.renew(force=True)
                except LeaseLost as exc:
                    lost.append(exc)
                    return
                except Exception:  # storage hiccup: try again next time
                    continue

        def check() -> None:
            if lost:
                raise lost[0]

        thread = threading.Thread(target=renew_loop, name="lease", daemon=True)
        thread.start()
        try:
            yield check
        finally:
            stop.set()
            thread.join()

    def release(self) -> None:
        """Give the lease up if it is still ours (best effort). One this object took or renewed
        within the first three quarters of its ``ttl`` is deleted without a look (another owner
        takes a lease over only once it has expired; clocks agree within a quarter ``ttl``);
        otherwise it is read first, and deleted only if it is still ours."""
        held, self._held = self._held, False
        with self._lock:  # not while the keep-alive thread renews it
            if held and self.clock() - self._renewed < self.ttl * 3 / 4:
                self.store.delete(self.key)
                return
            try:
                data, _ = self.store.get_versioned(self.key)
                if json.loads(data).get("owner") == self.owner:
                    self.store.delete(self.key)
            except NotFound:
                pass


def is_live(doc: dict[str, Any] | None, now: float) -> bool:
    """True if the lease document ``doc`` (None: no lease) has not expired at ``now``
    (epoch seconds)."""
    return doc is not None and doc.get("expires", 0) > now


def lease_is_live(store: Store, key: str, now: float | None = None) -> bool:
    """True if someone holds an unexpired lease at ``key``."""
    try:
        doc = json.loads(store.get(key))
    except NotFound:
        return False
    return is_live(doc, time.time() if now is None else now)
