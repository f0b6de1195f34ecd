"""Planner: cut the item stream into shards that fit the provider's limits
(``moonbatch.workers.providers.Provider.limits``).

Pure and streaming: it holds one shard at a time. A shard closes at ``max_lines`` items or when
its estimated request size (``Limits.item_bytes`` of each item, e.g. a Batch API JSONL line)
would pass ``max_bytes``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from moonbatch.workers.models import PlanItem

if TYPE_CHECKING:
    from moonbatch.workers.providers import Limits


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """A planned shard: its ``index`` (0-based, dense), ``items`` and estimated JSONL ``bytes``."""

    index: int
    items: tuple[PlanItem, ...]
    bytes: int


def plan_shards(items: Iterable[PlanItem], *, max_lines: int, max_bytes: int, limits: Limits,
                fragment_len: int = 128) -> Iterator[Shard]:
    """Yield shards in order; every item lands in exactly one shard.

    ``limits`` are the provider's (``Provider.limits(spec)``). Raises ``ValueError`` if
    ``max_lines`` or ``max_bytes`` exceed them or are < 1.
    """
    lines_cap, bytes_cap, item_bytes = limits.max_lines, limits.max_bytes, limits.item_bytes
    if not 1 <= max_lines <= lines_cap:
        raise ValueError(f"max_lines={max_lines}: must be within 1..{lines_cap}")
    if not 1 <= max_bytes <= bytes_cap:
        raise ValueError(f"max_bytes={max_bytes}: must be within 1..{bytes_cap}")
    index, batch, size = 0, [], 0
    for item in items:
        line = item_bytes(item.key, item.size, fragment_len)
        if batch and (len(batch) >= max_lines or size + line > max_bytes):
            yield Shard(index, tuple(batch), size)
            index, batch, size = index + 1, [], 0
        batch.append(item)
        size += line
    if batch:
        yield Shard(index, tuple(batch), size)
