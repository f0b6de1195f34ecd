"""Which broker queues have a consumer: asked of the workers through Celery's remote control.

A queue nobody consumes makes a run wait forever without a word (say, workers started with
``-Q moonbatch`` only: the polls on ``moonbatch-control`` are never taken). Celery's
``inspect().active_queues()`` broadcasts one request on the broker and gathers, for ``timeout``
seconds, each worker's answer: the queues it consumes; a look stops early once every queue it
asks about was seen, so it costs a round trip when all is well. A prefork worker's main process answers
while every pool slot runs a long task (checked: ``-c 1`` running a 25 s CPU-bound task answered
in time); a ``--pool solo`` worker busy in a task does not, and a worker with remote control
disabled never does, so a look can miss a consumer that exists: ``ConsumerWatch`` reports a
queue only after two looks in a row missed it, and callers only warn, never stop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

LOOK_TIMEOUT = 2.0  # seconds workers get to answer a look


class _AllSeen(Exception):
    """Raised from the reply callback to stop gathering once every wanted queue was seen."""


def consumed_queues(app: Any, timeout: float = LOOK_TIMEOUT,
                    wanted: Iterable[str] | None = None) -> set[str]:
    """The names of the queues consumed by the workers of ``app``'s broker that answer within
    ``timeout`` seconds (an empty set when none answers). Takes ``timeout`` seconds, as any
    worker may still answer, unless every queue of ``wanted`` was seen before: then it returns
    at once (the usual case costs a round trip, only a missing queue the whole ``timeout``).
    Raises the broker's errors (kombu ``OperationalError``, after Celery's connection retries:
    about 6 s for a refused connection)."""
    want = set(wanted or ())
    seen: set[str] = set()

    def on_reply(reply: dict[str, Any]) -> None:  # {worker: [{"name": queue, ...}, ...]}
        for queues in reply.values():
            seen.update(q["name"] for q in queues or () if isinstance(q, dict) and q.get("name"))
        if want and want <= seen:
            # Celery gathers until its timeout; an exception from the callback ends the
            # gathering (kombu closes the reply consumer in its finally blocks).
            raise _AllSeen

    try:
        app.control.inspect(timeout=timeout, callback=on_reply).active_queues()
    except _AllSeen:
        pass
    return seen


def without_consumer(app: Any, queues: Iterable[str], timeout: float = LOOK_TIMEOUT,
                     give_up: float | None = None) -> list[str] | None:
    """The names of ``queues`` (in their order) that no answering worker consumes; None when
    the broker could not be asked within ``give_up`` seconds (default ``timeout + 3``): the
    look runs in a daemon thread, so an unreachable broker costs the caller at most that."""
    names = list(dict.fromkeys(queues))
    found: list[set[str]] = []
    thread = threading.Thread(target=_look, args=(app, names, timeout, found), daemon=True,
                              name="moonbatch-consumers")
    thread.start()
    thread.join(timeout + 3.0 if give_up is None else give_up)
    if not found:
        return None
    return [name for name in names if name not in found[0]]


def _look(app: Any, names: list[str], timeout: float, found: list[set[str]]) -> None:
    try:
        found.append(consumed_queues(app, timeout, names))
    except Exception:  # a broker out of reach means "unknown", not "no consumer"
        pass


class ConsumerWatch:
    """Looks, in a background thread, whether each of ``queues`` has a consumer while a command
    waits for a run: first ``first`` seconds after ``start()``, then every ``every`` seconds; after
    a look that missed a queue, again ``recheck`` seconds later. ``unconsumed()`` names the
    queues missed by the last two looks in a row, so a worker that is still starting, or slow to
    answer once, is not reported. A look that cannot reach the broker changes nothing. Use it as
    a context manager (``start()``/``stop()``)."""

    def __init__(self, app: Any, queues: Iterable[str], *, first: float = 2.0,
                 every: float = 30.0, recheck: float = 3.0,
                 timeout: float = LOOK_TIMEOUT) -> None:
        self.app, self.queues = app, list(dict.fromkeys(queues))
        self.first, self.every, self.recheck, self.timeout = first, every, recheck, timeout
        self.looks = 0  # completed looks (those that reached the broker)
        self._missed: list[set[str]] = []  # the last two looks' missing queues
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="moonbatch-consumer-watch")

    def start(self) -> ConsumerWatch:
        """Start looking (in a daemon thread)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop looking; a look under way ends on its own (the thread is a daemon)."""
        self._stop.set()

    def __enter__(self) -> ConsumerWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def unconsumed(self) -> list[str]:
        """The queues (in their given order) that the last two looks found without a consumer;
        empty before two looks completed."""
        with self._lock:
            if len(self._missed) < 2:
                return []
            both = self._missed[0] & self._missed[1]
        return [q for q in self.queues if q in both]

    def _loop(self) -> None:
        wait = self.first
        while not self._stop.wait(wait):
            try:
                consumed = consumed_queues(self.app, self.timeout, self.queues)
            except Exception:  # the broker is out of reach for now: look later
                wait = self.every
                continue
            missing = {q for q in self.queues if q not in consumed}
            with self._lock:
                before = self._missed[-1] if self._missed else set()
                self._missed = [*self._missed[-1:], missing]
                self.looks += 1
            # A queue missed for the first time is looked at again soon, to confirm it.
            wait = self.recheck if missing - before else self.every
