"""Store objects as files: a read-only, seekable file over ranged GETs (what lets ``tarfile``
walk a tar's headers and ``pyarrow.parquet`` read a footer and one column chunk without
downloading the object or writing it to disk), and where a file INPUT is in its store.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

from moonbatch.workers.storage import ObjectInfo, Store

# One ranged GET reads at least this much (readahead): the headers of a tar's small members
# share a GET; a member larger than this is seeked over, not read.
DEFAULT_BLOCK = 8 * 1024 * 1024


class RangeFile(io.RawIOBase):
    """The object ``key`` of ``store`` (``size`` bytes) as a binary file: ``read``, ``seek``,
    ``tell``. A read outside the buffered block costs one ``store.get_range`` of ``block``
    bytes (the block is kept); a read of ``block`` bytes or more goes straight through.
    ``gets`` and ``bytes_read`` count the GETs and the bytes fetched. Storage errors
    (``NotFound``, ``StorageError``) propagate from reads."""

    def __init__(self, store: Store, key: str, size: int, block: int = DEFAULT_BLOCK) -> None:
        super().__init__()
        self.store, self.key, self.size, self.block = store, key, size, block
        self.pos = 0
        self._buf, self._buf_start = b"", 0
        self.gets = self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        n = min(n, self.size - self.pos)
        if n <= 0:
            return b""
        start = self.pos - self._buf_start
        if start < 0 or start + n > len(self._buf):
            if n >= self.block:
                data = self._get(self.pos, n)
                self.pos += len(data)
                return data
            self._buf = self._get(self.pos, min(self.block, self.size - self.pos))
            self._buf_start, start = self.pos, 0
        data = self._buf[start:start + n]
        self.pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _get(self, start: int, length: int) -> bytes:
        self.gets += 1
        data = self.store.get_range(self.key, start, length)
        self.bytes_read += len(data)
        return data


def input_file_key(spec: Any, store: Store) -> str | None:
    """The key in ``store`` (the store at ``input_root(spec)``) of a file INPUT (a ``.tar``,
    a ``.parquet``), or None when INPUT is a prefix. Raises ``ValueError`` when the file is
    not inside the store (a ``--base`` elsewhere)."""
    url = spec.input
    if url.endswith(("/", "\\")):
        return None
    if not url.startswith(store.url):
        raise ValueError(f"{url} is not under {store.url}: --base applies to manifests only; "
                         "leave it out")
    return url[len(store.url):]


def files_under(store: Store, stats: Any, wanted: Callable[[str], bool], *,
                exclude_prefix: str | None = None) -> Iterator[ObjectInfo]:
    """The objects of ``store`` whose key is ``wanted`` (the ``.tar`` or ``.parquet`` files of
    a prefix INPUT), in listing order; every other object is counted in ``stats``
    (``ListingStats``) as listed and skipped. Keys under ``exclude_prefix`` (the run's OUTPUT
    inside INPUT) are passed over."""
    for obj in store.iter_objects():
        if exclude_prefix and obj.key.startswith(exclude_prefix):
            continue
        if wanted(obj.key):
            yield obj
        else:
            stats.listed += 1
            stats.skip(obj.key)


def object_info(store: Store, key: str) -> ObjectInfo | None:
    """``key``'s listing entry (its size) in ``store``, or None if there is no such object
    (one LIST request on S3, a stat of a local file; stores have no HEAD)."""
    if not store.url.startswith("s3://"):
        try:
            st = os.stat(store.url_for(key))
        except OSError:
            return None
        return ObjectInfo(key, st.st_size) if stat.S_ISREG(st.st_mode) else None
    return next((o for o in store.iter_objects(key) if o.key == key), None)
