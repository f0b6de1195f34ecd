"""Planner: cut the item stream into shards that fit the provider's limits (by default the
Moondream Batch API's; ``moonbatch.workers.providers.Provider.limits`` gives each provider's).

Pure and streaming: it holds one shard at a time. A shard closes at ``max_lines`` items or when
its estimated JSONL size would pass ``max_bytes`` (seed 002, "Limits": 100,000 lines, 2 GB file,
10 MB line; every line's estimate is capped at the line limit because bigger images are
downscaled to fit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from moonbatch.config import API_MAX_FILE_BYTES, API_MAX_LINES
from moonbatch.workers.lines import estimate_line_bytes
from moonbatch.workers.models import PlanItem

if TYPE_CHECKING:
    from moonbatch.workers.providers import Limits


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """A planned shard: its ``index`` (0-based, dense), ``items`` and estimated JSONL ``bytes``."""

    index: int
    items: tuple[PlanItem, ...]
    bytes: int


def plan_shards(items: Iterable[PlanItem], *, max_lines: int, max_bytes: int,
                fragment_len: int = 128, limits: Limits | None = None) -> Iterator[Shard]:
    """Yield shards in order; every item lands in exactly one shard.

    ``limits`` are the provider's (``Provider.limits(spec)``); None: the Batch API's (100,000
    lines, 2 GB). Raises ``ValueError`` if ``max_lines`` or ``max_bytes`` exceed them or are < 1.
    """
    lines_cap = API_MAX_LINES if limits is None else limits.max_lines
    bytes_cap = API_MAX_FILE_BYTES if limits is None else limits.max_bytes
    if not 1 <= max_lines <= lines_cap:
        raise ValueError(f"max_lines={max_lines}: must be within 1..{lines_cap}")
    if not 1 <= max_bytes <= bytes_cap:
        raise ValueError(f"max_bytes={max_bytes}: must be within 1..{bytes_cap}")
    index, batch, size = 0, [], 0
    for item in items:
        line = estimate_line_bytes(item.key, item.size, fragment_len)
        if batch and (len(batch) >= max_lines or size + line > max_bytes):
            yield Shard(index, tuple(batch), size)
            index, batch, size = index + 1, [], 0
        batch.append(item)
        size += line
    if batch:
        yield Shard(index, tuple(batch), size)
