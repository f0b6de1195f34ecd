"""Prefix reader: every image object under an S3 prefix or a local directory; the id is the
object's key relative to INPUT.

An object is an item if its extension names an image (``workers.lines.IMAGE_EXTENSIONS``), or if
its extension says nothing and its first bytes carry an image signature. Known non-image types
(sidecar ``.json``/``.txt``, ``.parquet``, ...) are skipped and counted. The listing is consumed
page by page: memory does not grow with the size of the dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from workers.lines import SNIFF_BYTES, classify_key, sniff_format
from workers.models import PlanItem
from workers.readers import ListingStats
from workers.storage import NotFound, Store


class Reader:
    """The images under INPUT's prefix (``store``'s root), in listing order."""

    def __init__(self, spec: Any, store: Store, settings: Any = None) -> None:
        self.store = store

    def iter_items(self, stats: ListingStats, *, exclude_prefix: str | None = None
                   ) -> Iterator[PlanItem]:
        """See ``iter_items``."""
        return iter_items(self.store, stats, exclude_prefix=exclude_prefix)


def iter_items(store: Store, stats: ListingStats, *, exclude_prefix: str | None = None
               ) -> Iterator[PlanItem]:
    """Yield a ``PlanItem`` for every image object under the store's root, in listing order.

    ``exclude_prefix`` (relative to the store root) hides the run's own output when OUTPUT lies
    inside INPUT. Objects that vanish between listing and sniffing are still yielded when their
    extension names an image, so that they end as ``object_not_found`` error rows.
    """
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
            kind = "image" if sniff_format(head) else "skip"
        if kind == "skip":
            stats.skip(obj.key)
            continue
        stats.items += 1
        yield PlanItem(id=obj.key, size=obj.size)
