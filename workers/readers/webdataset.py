"""WebDataset reader: ``.tar`` shards in img2dataset's layout; the id is the sample's
``__key__``.

INPUT is one ``.tar`` or a prefix of them (``--input-format webdataset``; ``auto`` reads a
prefix as WebDataset when it holds ``.tar`` files and no image objects, e.g. img2dataset's
output folder with its ``.parquet`` and ``_stats.json`` sidecars, see ``prefix``). Keys follow
the ``webdataset`` library (``tariterators.base_plus_ext``/``group_by_keys``): a member's key is
its path up to the first dot of its base name (``00000/000000012.jpg`` → ``00000/000000012``),
its suffix the rest, lower-cased; consecutive members with one key form a sample; members with
no dot, ``__*__`` metadata members and non-regular members belong to no sample.

A sample's image is its first member whose suffix is an image extension (``jpg``, ``png``,
``webp``, ... ``moonbatch.workers.lines.IMAGE_EXTENSIONS``), else its first member whose last extension is
one (``seg.png``). A sample without one is skipped (``ListingStats.skip("<tar>#<key>")``). A
``__key__`` met twice in a run (non-consecutive members of one tar, or two tars) is an
``InputError`` naming it and the tar: ids must be unique.

Listing never downloads a tar: ``tarfile`` walks its headers over a ``RangeFile`` (ranged GETs
of 8 MB; members larger than that are seeked over), and records each image member's data
offset and size: ``PlanItem(id=key, size=size, ref="tar:<tar key>#<offset>+<size>")``. A
worker reads the image with one ranged GET (``fetch``).
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

from moonbatch.workers.lines import IMAGE_EXTENSIONS
from moonbatch.workers.models import PlanItem
from moonbatch.workers.readers import InputError, ListingStats
from moonbatch.workers.readers.rangeio import (
    DEFAULT_BLOCK,
    RangeFile,
    files_under,
    input_file_key,
    object_info,
)
from moonbatch.workers.readers.unique import UniqueKeys
from moonbatch.workers.storage import ObjectInfo, StorageError, Store, TooLarge

# webdataset.tariterators: base_plus_ext's pattern, and the metadata members it skips.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
_IMAGE_SUFFIXES = frozenset(ext[1:] for ext in IMAGE_EXTENSIONS)


def key_and_suffix(name: str) -> tuple[str | None, str | None]:
    """``(__key__, suffix)`` of a tar member's path as ``webdataset`` splits it (suffix not
    yet lower-cased), or ``(None, None)`` for a member of no sample (no dot in its name,
    ``__*__`` metadata)."""
    if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None, None
    match = _KEY_SUFFIX.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def is_tar(key: str) -> bool:
    """True if an object's name says it is a ``.tar`` shard."""
    return key.lower().endswith(".tar")


class Reader:
    """The samples of INPUT's ``.tar`` (or of every ``.tar`` under INPUT's prefix, other
    objects skipped), in tar order."""

    def __init__(self, spec: Any, store: Store, settings: Any = None) -> None:
        self.store = store
        try:
            self.tar_key = input_file_key(spec, store)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def iter_items(self, stats: ListingStats, *, exclude_prefix: str | None = None
                   ) -> Iterator[PlanItem]:
        """See ``moonbatch.workers.readers.Reader.iter_items``. Raises ``InputError`` for a missing
        ``.tar``, one that is not an uncompressed tar, or a duplicate ``__key__``."""
        if self.tar_key is not None:
            info = object_info(self.store, self.tar_key)
            if info is None:
                raise InputError(f"{self.store.url_for(self.tar_key)}: no such file: check "
                                 "INPUT")
            return iter_tars(self.store, [info], stats)

        return iter_tars(self.store, files_under(self.store, stats, is_tar,
                                                 exclude_prefix=exclude_prefix), stats)


def iter_tars(store: Store, tars: Iterable[ObjectInfo], stats: ListingStats, *,
              block: int = DEFAULT_BLOCK) -> Iterator[PlanItem]:
    """The samples of every tar in ``tars`` (objects of ``store``), in order, ``__key__``
    unique across them all (an ``InputError`` once every sample has been read otherwise: 8
    bytes per sample, ``UniqueKeys``; a second pass over the tars' headers names the key).
    ``stats.listed`` counts tar members."""
    tars = list(tars)  # the second pass reads them again
    keys = UniqueKeys()
    for tar in tars:
        yield from iter_tar(store, tar, stats, keys, block=block)
    if suspects := keys.suspects():
        named = UniqueKeys(suspects)
        for tar in tars:  # raises at the second occurrence
            for _ in iter_tar(store, tar, ListingStats(), named, block=block):
                pass


def iter_tar(store: Store, tar: ObjectInfo, stats: ListingStats, keys: UniqueKeys | None = None,
             *, block: int = DEFAULT_BLOCK) -> Iterator[PlanItem]:
    """The samples of one tar (see the module docstring), reading only its headers; ``keys``:
    the keys of the run so far (None: this tar alone, through ``iter_tars``). Raises
    ``InputError`` for a file that is not an uncompressed tar, a duplicate key or member,
    storage errors."""
    if keys is None:
        yield from iter_tars(store, [tar], stats, block=block)
        return
    where = store.url_for(tar.key)
    f = RangeFile(store, tar.key, tar.size, block)
    try:
        archive = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as exc:
        raise InputError(f"{where} is not an uncompressed tar ({exc}): WebDataset shards must "
                         "be plain .tar files") from None
    key: str | None = None
    suffixes: set[str] = set()
    image: tuple[int, int, int] | None = None  # (rank: 0 exact suffix, 1 last extension; offset; size)

    def finish() -> Iterator[PlanItem]:
        if key is None:
            return
        if image is None:
            stats.skip(f"{tar.key}#{key}")
            return
        stats.items += 1
        yield PlanItem(id=key, size=image[2], ref=f"tar:{tar.key}#{image[1]}+{image[2]}")

    try:
        while (member := archive.next()) is not None:
            archive.members.clear()  # tarfile keeps every header otherwise
            stats.listed += 1
            if not member.isreg() or member.issparse():
                continue
            name, suffix = key_and_suffix(member.name)
            if name is None or suffix is None:
                continue
            suffix = suffix.lower()
            if name != key:
                yield from finish()
                if keys.seen_at(name) is not None:
                    raise InputError(f"{where}: sample key {name!r} appears twice in INPUT "
                                     "(__key__ must be unique: a sample's members must be "
                                     "consecutive and keys unique across shards)")
                key, suffixes, image = name, set(), None
            if suffix in suffixes:
                raise InputError(f"{where}: member {member.name!r} appears twice in sample "
                                 f"{name!r}: rebuild the tar with unique member names")
            suffixes.add(suffix)
            rank = 0 if suffix in _IMAGE_SUFFIXES else 1 if posixpath.splitext(
                "x." + suffix)[1][1:] in _IMAGE_SUFFIXES else None
            if rank is not None and (image is None or rank < image[0]):
                image = (rank, member.offset_data, member.size)
    except tarfile.TarError as exc:
        raise InputError(f"{where}: unreadable tar ({exc}): check the shard") from None
    yield from finish()


def fetch(fetcher: Any, rest: str) -> bytes:
    """The bytes of a ``tar:<key>#<offset>+<size>`` item: one ranged GET of the member's
    data from the INPUT store. Raises ``NotFound`` (the tar is gone), ``TooLarge`` (a member
    over ``fetcher.max_bytes``: a tar from the web may declare any size), ``StorageError``
    (read failed, or the tar is shorter than planned: it changed since listing)."""
    key, _, where = rest.rpartition("#")
    offset, _, size = where.partition("+")
    start, length = int(offset), int(size)
    if length > fetcher.max_bytes:
        raise TooLarge(f"{fetcher.input.url_for(key)}: member at byte {start} has {length} "
                       f"bytes, more than the {fetcher.max_bytes} allowed")
    data = fetcher.input.get_range(key, start, length)
    if len(data) != length:
        raise StorageError(f"{fetcher.input.url_for(key)}: member at byte {start} is cut short "
                           f"({len(data)} of {length} bytes): the tar changed since listing")
    return data
