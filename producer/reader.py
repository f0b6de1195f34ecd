"""Reader: turn a listing of the INPUT prefix into the stream of items to annotate.

An object is an item if its extension names an image (``workers.lines.IMAGE_EXTENSIONS``), or if
its extension says nothing and its first bytes carry an image signature. Known non-image types
(sidecar ``.json``/``.txt``, ``.parquet``, ...) are skipped and counted. The listing is consumed
page by page: memory does not grow with the size of the dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from workers.lines import SNIFF_BYTES, classify_key, sniff_format
from workers.models import PlanItem
from workers.storage import NotFound, Store


@dataclasses.dataclass
class ListingStats:
    """What the reader saw: ``listed`` objects, ``items`` yielded, ``skipped`` non-images (with a
    few example keys; ``on_skip``, if set, is called with every skipped key, to record them all
    without holding them in memory)."""

    listed: int = 0
    items: int = 0
    skipped: int = 0
    skipped_examples: list[str] = dataclasses.field(default_factory=list)
    on_skip: Callable[[str], None] | None = None

    def skip(self, key: str) -> None:
        """Count ``key`` as skipped (not an image)."""
        self.skipped += 1
        if len(self.skipped_examples) < 10:
            self.skipped_examples.append(key)
        if self.on_skip is not None:
            self.on_skip(key)


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
