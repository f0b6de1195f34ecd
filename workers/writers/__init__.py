"""Output writers: a shard's merged rows → ``results/shard-NNNNN.<suffix>`` in the run's
format, and a finished run's exports. One module per format, behind one small interface:

- ``jsonl``: one JSON object per line (the default);
- ``parquet``: one table row per item with a stable schema (pandas, polars, ``datasets``).

A writer module defines ``FORMAT``, ``SUFFIX``, ``encode(rows, metadata=None) -> bytes`` (rows:
the merged row documents as JSON bytes, ``moonbatch.workers.merge``, a sequence or a
``ShardRows``: only ``len`` and one pass over them are used; metadata: ``run_metadata``,
kept in the file where its format has a place for it), optionally ``encode_file(rows,
metadata=None) -> file`` (the same bytes as a file to upload, from a ``ShardRows``, never
joined in memory) and ``decode(data) -> Iterator[dict]``
(the rows back as dicts, for commands that read a run's results: ``retry-failed``,
``--skip-existing``). Exports that need the whole run (``--export``: COCO, Label Studio, YOLO
under ``annotations/``; ``exports``) are written by ``finish_run`` once every shard is
merged. Importing this package does not import pyarrow.

Commands that read a whole run (``iter_results``, the exports, ``retry-failed``, the report)
read it through ``read_results``: shard by shard in order, the next shards' files fetched on a
few threads while the caller decodes the current one.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import orjson

from moonbatch.workers import layout
from moonbatch.workers.rowspool import ShardRows
from moonbatch.workers.storage import NotFound, Store

WRITERS: dict[str, str] = {
    "jsonl": "moonbatch.workers.writers.jsonl",
    "parquet": "moonbatch.workers.writers.parquet",
}
OUTPUT_FORMATS = tuple(WRITERS)
#: Shards ``read_results`` reads at once. At 20-50 ms per S3 GET, 8 reads deliver 160-400
#: shards a second, more than a caller decodes (orjson: tens of ms for a shard of 10,000
#: rows), while taking 8 of the S3 client's 32 pooled connections (``storage.s3_client``).
READ_AHEAD = 8
#: Bytes ``read_results`` holds at most, besides one shard read ahead (see
#: ``pool.ordered_map``'s ``max_weight``): the shard being decoded and those read ahead. A
#: default shard (10,000 rows of 0.5-5 KB) is 5-50 MB: a few at once; a larger one is
#: transfer-bound, where a single read ahead already overlaps its decoding.
READ_AHEAD_BYTES = 64 << 20


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


def run_metadata(spec: Any) -> dict[str, str]:
    """What a results file says about the run that wrote it (Parquet key-value metadata):
    ``moonbatch.run_id``, ``moonbatch.provider``, ``moonbatch.model`` (empty: the provider's
    default), ``moonbatch.endpoint`` (empty when the provider has none), ``moonbatch.options``
    (JSON: a list of each skill's options, as in spec.json) and ``moonbatch.version``. The same
    spec always gives the same metadata, so a redelivered merge writes the same file."""
    from importlib import metadata

    try:
        version = metadata.version("moonbatch")
    except metadata.PackageNotFoundError:
        version = ""
    options = [o.model_dump(mode="json", exclude_none=True) for o in spec.all_options]
    return {"moonbatch.run_id": spec.run_id, "moonbatch.provider": spec.provider,
            "moonbatch.model": spec.model or "", "moonbatch.endpoint": spec.endpoint or "",
            "moonbatch.options": orjson.dumps(options).decode(), "moonbatch.version": version}


def write_shard(store: Store, fmt: str, shard: int, rows: Sequence[bytes] | ShardRows,
                metadata: Mapping[str, str] | None = None) -> None:
    """Write the shard's rows (plan order; a sequence of row bytes, or ``merge.compose``'s
    ``ShardRows``, streamed where the format's writer can), replacing the file if one is there:
    the same rows give the same file (a redelivered merge), and a ``retry-failed`` pass writes
    a shard's results again with its retried rows. ``metadata`` (``run_metadata``) goes into
    the file where the format has a place for it (Parquet)."""
    writer = module(fmt)
    if isinstance(rows, ShardRows) and hasattr(writer, "encode_file"):
        store.put(results_key(shard, fmt), writer.encode_file(rows, metadata=metadata))
    else:
        store.put(results_key(shard, fmt), writer.encode(rows, metadata=metadata))


def write_rounds(store: Store, fmt: str, shard: int, n_items: int,
                 rounds: Iterable[Iterable[bytes]], metadata: Mapping[str, str] | None = None
                 ) -> tuple[int, dict[str, int], int]:
    """Compose the shard's final rows from its rounds' stored rows (``merge.compose``: each
    round its lines, e.g. ``rowspool.iter_stored_lines``) and write them (``write_shard``),
    through a temporary file: ``(ok rows, errors by code (merge.error_codes), cached rows)``.
    Raises ``ValueError`` if an item has no row (see ``compose``)."""
    from moonbatch.workers.merge import compose, error_codes

    final, ok = compose(n_items, rounds)
    with final:
        write_shard(store, fmt, shard, final, metadata=metadata)
        by_code = error_codes(final)
        cached = sum(1 for row in final if b'"cached":true' in row)
    return ok, by_code, cached


def read_shard(store: Store, fmt: str, shard: int) -> Iterator[dict[str, Any]]:
    """The shard's rows as dicts, in plan order. Raises ``NotFound`` if it is not merged."""
    return module(fmt).decode(store.get(results_key(shard, fmt)))


@dataclasses.dataclass(frozen=True, slots=True)
class ShardResults:
    """One shard as ``read_results`` read it: ``shard`` (its number), ``fmt`` (the output
    format), ``data`` (its results file's bytes; None when unread), ``error`` (why its files
    could not be read: ``NotFound`` when the shard is not merged; None when read) and ``plan``
    (its plan file's bytes, ``layout.plan_items``, when asked for and there; else None)."""

    shard: int
    fmt: str
    data: bytes | None
    error: Exception | None = None
    plan: bytes | None = None

    @property
    def merged(self) -> bool:
        """The shard has a results file (it may still be unreadable: see ``rows``)."""
        return not isinstance(self.error, NotFound)

    @property
    def size(self) -> int:
        """Bytes held: the results and plan files'."""
        return len(self.data or b"") + len(self.plan or b"")

    def rows(self) -> Iterator[dict[str, Any]]:
        """The shard's rows as dicts, in plan order (decoded as iterated). Raises ``error``
        (``NotFound`` for a shard not merged, ``StorageError``), or the format's decoding
        error for a damaged file (possibly after some rows)."""
        if self.error is not None:
            raise self.error
        return module(self.fmt).decode(self.data)


def read_results(store: Store, fmt: str, shards: int | Iterable[int], *, plans: bool = False,
                 window: int = READ_AHEAD, max_bytes: int = READ_AHEAD_BYTES
                 ) -> Iterator[ShardResults]:
    """Each shard's results file (format ``fmt``), as a ``ShardResults`` in shard order:
    ``shards`` (a run's count: every shard from 0; or the shard numbers in the order
    wanted). ``plans``: the plan file of each merged shard too (``ShardResults.plan``).

    The files of the next shards are read on ``window`` threads while the caller holds the
    current one; at most ``window`` shards are read or held at once, and no more than
    ``max_bytes`` bytes besides one shard read ahead (``pool.ordered_map``). A read's failure
    is not raised here but kept in its shard's ``error``, for the caller to raise or note in
    order. Stores are shared across the threads (boto3 clients are thread-safe)."""
    from moonbatch.workers.pool import ordered_map

    def read(shard: int) -> ShardResults:
        try:
            data = store.get(results_key(shard, fmt))
        except Exception as exc:  # raised by ShardResults.rows, in order
            return ShardResults(shard, fmt, None, exc)
        if not plans:
            return ShardResults(shard, fmt, data)
        try:
            return ShardResults(shard, fmt, data, plan=store.get(layout.plan_items(shard)))
        except NotFound:
            return ShardResults(shard, fmt, data)
        except Exception as exc:  # as above
            return ShardResults(shard, fmt, data, exc)

    numbers = range(shards) if isinstance(shards, int) else shards
    return ordered_map(read, numbers, workers=window, window=window,
                       weight=lambda got: got.size, max_weight=max_bytes)


def iter_results(store: Store, fmt: str, shards: int) -> Iterator[dict[str, Any]]:
    """Every row of a run with ``shards`` shards, shard by shard (shards not merged yet are
    passed over; ``read_results``). Raises ``StorageError`` and the format's decoding errors
    (a damaged file)."""
    for got in read_results(store, fmt, shards):
        if got.merged:
            yield from got.rows()


def finish_run(store: Store, spec: Any, shards: int) -> None:
    """Write the exports of a run whose shards are all merged (idempotent: a second call
    writes the same documents): each of ``spec.exports`` (``moonbatch.workers.writers.exports``;
    by default the COCO ``annotations/instances.json`` of a run with a detect, point or segment
    skill)."""
    from moonbatch.workers.writers import exports

    exports.write(store, spec, shards)
