"""A bounded, order-keeping thread pool map: how workers read many objects at once."""

from __future__ import annotations

import collections
import concurrent.futures as cf
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, window: int
                ) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, yielding results in input order with at most
    ``window`` calls in flight (so memory is bounded by the window, not the input)."""
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch") as pool:
        pending: collections.deque[cf.Future[R]] = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
