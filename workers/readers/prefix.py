"""Prefix reader: every image object under an S3 prefix or a local directory; the id is the
object's key relative to INPUT.

An object is an item if its extension names an image (``moonbatch.workers.lines.IMAGE_EXTENSIONS``), or if
its extension says nothing and its first bytes carry an image signature. Known non-image types
(sidecar ``.json``/``.txt``, ``.parquet``, ...) are skipped and counted. The listing is consumed
page by page: memory does not grow with the size of the dataset.

A prefix with no image object but ``.tar`` files (img2dataset's output: shards with
``.parquet`` and ``_stats.json`` sidecars) is read as WebDataset shards
(``moonbatch.workers.readers.webdataset``); one with no image object and no ``.tar`` but ``.parquet``
files as Parquet files of image bytes (``moonbatch.workers.readers.parquet``). Telling costs no request:
the non-image objects met before the first image are held (at most ``AUTO_HOLD``; past that
they are skipped and the prefix stays a prefix of images).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from moonbatch.workers.lines import SNIFF_BYTES, classify_key, sniff_format
from moonbatch.workers.models import PlanItem
from moonbatch.workers.readers import ListingStats
from moonbatch.workers.storage import NotFound, ObjectInfo, StorageError, Store

log = logging.getLogger(__name__)
AUTO_HOLD = 100_000  # non-image objects held before the first image (~100 B each)


class Reader:
    """The images under INPUT's prefix (``store``'s root), in listing order."""

    def __init__(self, spec: Any, store: Store, settings: Any = None) -> None:
        self.store = store
        self.input_options = dict(getattr(spec, "input_options", None) or {})

    def iter_items(self, stats: ListingStats, *, exclude_prefix: str | None = None
                   ) -> Iterator[PlanItem]:
        """See ``iter_items``."""
        return iter_items(self.store, stats, exclude_prefix=exclude_prefix,
                          input_options=self.input_options)


def iter_items(store: Store, stats: ListingStats, *, exclude_prefix: str | None = None,
               input_options: dict[str, Any] | None = None) -> Iterator[PlanItem]:
    """Yield a ``PlanItem`` for every image object under the store's root, in listing order
    (or the samples of its ``.tar`` shards, or the rows of its ``.parquet`` files, when it
    holds no image: see the module docstring; ``input_options``: the Parquet reader's).

    ``exclude_prefix`` (relative to the store root) hides the run's own output when OUTPUT lies
    inside INPUT. Objects that vanish between listing and sniffing are still yielded when their
    extension names an image, so that they end as ``object_not_found`` error rows; an object
    without one whose first bytes cannot be read is skipped with the reason ``unreadable``.
    """
    held: list[ObjectInfo] | None = []  # non-image objects before the first image
    for obj in store.iter_objects():
        stats.listed += 1
        if exclude_prefix and obj.key.startswith(exclude_prefix):
            continue
        kind = classify_key(obj.key)
        if kind == "sniff":
            try:
                head = store.get_range(obj.key, 0, SNIFF_BYTES)
            except NotFound:
                head = b""
            except (StorageError, OSError) as exc:
                # Its type cannot be told (denied, a link loop...): one key, not the plan.
                stats.skip(obj.key, "unreadable", _one_line(exc))
                continue
            kind = "image" if sniff_format(head) else "skip"
        if kind == "skip":
            if held is None:
                stats.skip(obj.key)
                continue
            held.append(obj)
            if len(held) > AUTO_HOLD:
                held = _skip_all(held, stats)
            continue
        if held is not None:
            held = _skip_all(held, stats)
        stats.items += 1
        yield PlanItem(obj.key, obj.size)  # (id, size): positional, a third cheaper a key
    if held:
        yield from _archives(store, held, stats, input_options or {})


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters (storage errors name the object
    and the cause, never a credential)."""
    text = " ".join(str(exc).split())
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:300]


def _skip_all(held: list[ObjectInfo], stats: ListingStats) -> None:
    for obj in held:
        stats.skip(obj.key)
    return None


def _archives(store: Store, held: list[ObjectInfo], stats: ListingStats,
              input_options: dict[str, Any]) -> Iterator[PlanItem]:
    """The items of a prefix with no image: its ``.tar`` shards, else its ``.parquet`` files
    (other objects skipped), else nothing (everything skipped)."""
    from moonbatch.workers.readers import image_columns, parquet, webdataset

    tars = [o for o in held if webdataset.is_tar(o.key)]
    files = [] if tars else [o for o in held if parquet.is_parquet(o.key)]
    kept = {o.key for o in tars or files}
    for obj in held:
        if obj.key not in kept:
            stats.skip(obj.key)
    if tars:
        log.info("INPUT %s holds %d .tar file(s) and no image: reading them as WebDataset "
                 "shards", store.url, len(tars))
        yield from webdataset.iter_tars(store, tars, stats)
    elif files:
        log.info("INPUT %s holds %d .parquet file(s) and no image: reading them as Parquet "
                 "files of image bytes", store.url, len(files))
        yield from parquet.iter_files(
            store, files, stats, id_column=input_options.get("id_column") or "id",
            image_columns=image_columns(input_options))
