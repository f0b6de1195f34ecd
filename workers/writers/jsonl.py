"""JSONL writer: one row per line, as ``moonbatch.workers.merge`` serialised it (the default format)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import orjson

FORMAT = "jsonl"
SUFFIX = "jsonl"


def encode(rows: Sequence[bytes]) -> bytes:
    """Rows (JSON bytes) → JSONL bytes (empty for no rows)."""
    return b"\n".join(rows) + b"\n" if rows else b""


def decode(data: bytes) -> Iterator[dict[str, Any]]:
    """JSONL bytes → rows."""
    for line in data.splitlines():
        if line.strip():
            yield orjson.loads(line)
