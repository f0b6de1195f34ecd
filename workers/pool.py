"""A bounded, order-keeping thread pool map: how workers read many objects at once."""

from __future__ import annotations

import collections
import concurrent.futures as cf
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, window: int,
                weight: Callable[[R], int] | None = None, max_weight: int = 0) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, yielding results in input order with at most
    ``window`` calls in flight or held by the caller (so memory is bounded by the window, not
    the input). An exception of ``fn`` is raised at its item's place.

    ``weight`` (e.g. a result's size in bytes) adds a second bound: a call starts only while
    the weights of the result the caller holds, of the results waiting and of the calls still
    running (each counted as the heaviest result so far) stay within ``max_weight``; until a
    first result is in, one call runs. With a ``window`` of 2 or more one call always runs
    ahead of the caller, so results heavier than ``max_weight`` are still read one ahead.

    Calls not started when the caller stops early are cancelled; those running are waited
    for."""
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch") as pool:
        pending: collections.deque[cf.Future[R]] = collections.deque()
        source = iter(items)
        end = object()
        heaviest = -1  # weight of the heaviest result so far (-1: none yet)
        held = 0  # weight of the result the caller holds
        holding = 0  # 1 while the caller holds a result

        def ahead(f: cf.Future[R]) -> int:
            if f.done() and f.exception() is None:
                return weight(f.result())  # type: ignore[misc]
            return max(heaviest, 0)

        def fill() -> None:
            while len(pending) + holding < window:
                if weight is not None and pending and (
                        heaviest < 0
                        or held + sum(map(ahead, pending)) + heaviest > max_weight):
                    return
                item = next(source, end)
                if item is end:
                    return
                pending.append(pool.submit(fn, item))  # type: ignore[arg-type]

        try:
            fill()
            while pending:
                result = pending.popleft().result()
                if weight is not None:
                    held = weight(result)
                    heaviest = max(heaviest, held)
                holding = 1
                fill()  # the first result's weight is known: the window opens
                yield result
                held = holding = 0
                fill()
        finally:
            for f in pending:
                f.cancel()
