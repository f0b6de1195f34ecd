"""A per-process budget of bytes: how many decoded pixels a worker's fetch threads hold at once.

A shard build reads and prepares up to ``MOONBATCH_FETCH_CONCURRENCY`` images at once, on
threads; decoding an image allocates width x height x (1 to 4) bytes whatever its file size, so
a few large images at once could take the process to gigabytes. Each decode first takes its
bytes from this budget and waits (first come, first served) while they are not free.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
from collections.abc import Iterator


class ByteBudget:
    """A weighted semaphore of ``capacity`` bytes (0: unbounded), fair in arrival order.

    ``hold(n)`` takes ``n`` bytes for the block and gives them back after it; a request for
    more than ``capacity`` takes all of it (the request then runs alone, never deadlocks).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()
        self.peak = 0  # most bytes ever held at once (for tests and benchmarks)

    @property
    def in_use(self) -> int:
        """Bytes held now."""
        return self.capacity - self._free

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        """Hold ``n`` bytes (clamped to ``0..capacity``) while the block runs."""
        n = min(max(int(n), 0), self.capacity)
        if n == 0:
            yield
            return
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._free < n:
                    self._cond.wait()
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._free -= n
            self.peak = max(self.peak, self.capacity - self._free)
            self._cond.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._cond:
                self._free += n
                self._cond.notify_all()


@functools.cache
def decode_budget() -> ByteBudget:
    """This process's budget for decoded pixels (``MOONBATCH_DECODE_MEMORY``)."""
    from moonbatch.config import get_settings

    return ByteBudget(get_settings().decode_memory)


# A forked pool process starts with a fresh budget: the parent's may be held by its threads.
os.register_at_fork(after_in_child=decode_budget.cache_clear)
