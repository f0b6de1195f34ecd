"""Output writers: a shard's merged rows → ``results/shard-NNNNN.<suffix>`` in the run's
format, and a finished run's exports. One module per format, behind one small interface:

- ``jsonl``: one JSON object per line (the default);
- ``parquet``: one table row per item with a stable schema (pandas, polars, ``datasets``).

A writer module defines ``FORMAT``, ``SUFFIX``, ``encode(rows) -> bytes`` (rows: the merged
row documents as JSON bytes, ``moonbatch.workers.merge``) and ``decode(data) -> Iterator[dict]`` (the
rows back as dicts, for commands that read a run's results: ``retry-failed``,
``--skip-existing``). Exports that need the whole run (COCO ``annotations/instances.json``)
are written by ``finish_run`` once every shard is merged. Importing this package does not
import pyarrow.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import Any

from moonbatch.workers import layout
from moonbatch.workers.storage import NotFound, Store

WRITERS: dict[str, str] = {
    "jsonl": "moonbatch.workers.writers.jsonl",
    "parquet": "moonbatch.workers.writers.parquet",
}
OUTPUT_FORMATS = tuple(WRITERS)


def module(fmt: str) -> Any:
    """The writer module of ``fmt``; raises ``ValueError`` naming the formats."""
    try:
        return importlib.import_module(WRITERS[fmt])
    except KeyError:
        raise ValueError(f"unknown output format {fmt!r}: use one of "
                         f"{', '.join(OUTPUT_FORMATS)}") from None


def results_key(shard: int, fmt: str = "jsonl") -> str:
    """Key of the shard's results file in format ``fmt``."""
    return layout.results(shard, module(fmt).SUFFIX)


def write_shard(store: Store, fmt: str, shard: int, rows: Sequence[bytes]) -> None:
    """Write the shard's rows (plan order), replacing the file if one is there: the same rows
    give the same file (a redelivered merge), and a ``retry-failed`` pass writes a shard's
    results again with its retried rows."""
    store.put(results_key(shard, fmt), module(fmt).encode(rows))


def read_shard(store: Store, fmt: str, shard: int) -> Iterator[dict[str, Any]]:
    """The shard's rows as dicts, in plan order. Raises ``NotFound`` if it is not merged."""
    return module(fmt).decode(store.get(results_key(shard, fmt)))


def iter_results(store: Store, fmt: str, shards: int) -> Iterator[dict[str, Any]]:
    """Every row of a run with ``shards`` shards, shard by shard (shards not merged yet are
    passed over)."""
    for shard in range(shards):
        try:
            yield from read_shard(store, fmt, shard)
        except NotFound:
            continue


def finish_run(store: Store, spec: Any, shards: int) -> None:
    """Write the exports of a run whose shards are all merged (idempotent: a second call
    writes the same documents): for a run with a detect or point skill, the COCO
    ``annotations/instances.json`` (``moonbatch.workers.writers.coco``)."""
    from moonbatch.workers.writers import coco

    if coco.wanted(spec):
        coco.write(store, spec, shards)
