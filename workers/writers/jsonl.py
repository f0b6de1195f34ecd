"""JSONL writer: one row per line, as ``moonbatch.workers.merge`` serialised it (the default format)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import orjson

from moonbatch.workers.rowspool import ShardRows

FORMAT = "jsonl"
SUFFIX = "jsonl"


def encode(rows: Sequence[bytes], metadata: Mapping[str, str] | None = None) -> bytes:
    """Rows (JSON bytes) → JSONL bytes (empty for no rows). ``metadata`` is not kept: JSONL
    has no place for it (the run's spec.json and run.json say the same)."""
    return b"\n".join(rows) + b"\n" if rows else b""


def encode_file(rows: ShardRows, metadata: Mapping[str, str] | None = None) -> IO[bytes]:
    """``encode``'s bytes for ``rows`` as a file to upload: ``rows``' own JSONL file, rewound
    (valid while ``rows`` is open)."""
    return rows.file()


def decode(data: bytes) -> Iterator[dict[str, Any]]:
    """JSONL bytes → rows."""
    for line in data.splitlines():
        if line.strip():
            yield orjson.loads(line)
