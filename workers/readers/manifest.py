"""Manifest reader: a table (``.csv``, ``.jsonl``/``.ndjson`` or ``.parquet``, local or on S3)
with one row per item: an id column (``--id-column``, default ``id``) and an image column
(``--image-column``, default ``image``), plus optional per-row ``question``, ``object`` and
``length`` columns that override the run's options for that row.

A row may name several images (a multi-image query; seed 002, "Common fields"): a list-valued
image column (a JSON array in JSONL, ``list<string>`` in Parquet), or several image columns
(``--image-column`` repeated: ``spec.input_options["image_columns"]``), whose images are taken
in column order (a list value's in its order). The item's first image is its ``ref``, the
others its ``more`` (``PlanItem``).

The image column holds an ``s3://`` URI, an ``http(s)://`` URL, an absolute local path (or a
``file://`` URL), or a key relative to the INPUT store (``--base``, else the manifest's folder).
Ids keep their type: CSV ids are strings, JSONL and Parquet ids are str, int, float or bool.

The manifest is streamed (CSV and JSONL line by line through a buffered reader, Parquet by
record batch, only the needed columns), so memory does not grow with its rows. ``check()`` is a
pre-pass the producer runs before it writes anything: every row is valid and no two rows share
an id (8 bytes per row; a second pass only when a duplicate is found, to name it).

Sizes: a local image's size is read with ``stat`` (cheap); an S3 object's or a URL's would cost
a request per row (a million HEADs), so it is planned at ``REMOTE_SIZE_ESTIMATE`` bytes.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections.abc import Iterator
from typing import IO, Any

import orjson

from moonbatch.workers.models import PlanItem, id_text
from moonbatch.workers.readers import (
    InputError,
    ListingStats,
    image_columns,
    scheme_of,
    split_input,
)
from moonbatch.workers.readers.rangeio import RangeFile, object_info
from moonbatch.workers.readers.unique import UniqueKeys
from moonbatch.workers.storage import LocalStore, Store, open_store

# Planning size of an image whose size is not known without a request (S3, http): the shard
# byte limit (2 GB, the Batch API's) is what it bounds, so it errs on the large side. With the
# default 2 MP downscale budget a sent JPEG is at most about this big; smaller images only make
# shards smaller than they could be (~1,400 lines instead of 10,000), never too big.
REMOTE_SIZE_ESTIMATE = 1_000_000
OVERRIDE_COLUMNS = ("question", "object", "length")
READ_BUFFER = 8 * 2**20  # bytes per read of the manifest (one ranged GET on S3)
# A manifest row is an id, a reference and a few short options: a line longer than this is not
# one, and is refused without reading it whole. CSV fields keep the csv module's own limit.
MAX_LINE_BYTES = 2**20
PARQUET_BATCH_ROWS = 8192
_ID_TYPES = (str, int, float, bool)
_TAKES = {"caption": ("length",), "query": ("question",), "detect": ("object",),
          "point": ("object",), "segment": ("object",)}


class Reader:
    """The rows of the manifest at ``spec.input``; relative image keys are keys of ``store``
    (the store at ``input_root(spec)``). Reads ``spec.input_options`` ``id_column`` and
    ``image_column``. Raises nothing until read."""

    def __init__(self, spec: Any, store: Store, settings: Any = None) -> None:
        if settings is None:
            from moonbatch.config import get_settings

            settings = get_settings()
        self.spec, self.store, self.settings = spec, store, settings
        self.url = spec.input
        opts = spec.input_options or {}
        self.id_column = opts.get("id_column") or "id"
        self.image_columns = image_columns(opts)
        self.image_column = self.image_columns[0]
        # Rows the last ``check()`` found with several images (``check_multi_image``).
        self.several_images = len(self.image_columns) > 1
        takes = {f for o in spec.all_options for f in _TAKES.get(o.skill, ())}
        self.overrides = tuple(c for c in OVERRIDE_COLUMNS if c in takes)
        self.name = self.url.replace("\\", "/").rsplit("/", 1)[-1]
        self._local_root = store.root if isinstance(store, LocalStore) else None

    # -- producer side ---------------------------------------------------------------------
    def iter_items(self, stats: ListingStats, *, exclude_prefix: str | None = None
                   ) -> Iterator[PlanItem]:
        """Yield one ``PlanItem`` per row, in file order (``exclude_prefix`` does not apply:
        a manifest names its images). Raises ``InputError`` naming the row for a missing or
        nested id, a missing image or a bad image reference; ``InputError`` when the manifest
        does not exist or lacks a column; storage errors."""
        for where, item_id, images, opts in self._rows():
            stats.listed += 1
            refs = [self._ref(image, where) for image in images]
            stats.items += 1
            yield PlanItem(item_id, sum(self._size(ref) for ref in refs), refs[0], opts,
                           tuple(refs[1:]) or None)

    def check(self) -> None:
        """Read the whole manifest once before anything is written: every row is valid (see
        ``iter_items``) and ids are unique, where ids that print the same (``1`` and ``"1"``,
        ``PlanItem.key``) count as the same. Raises ``InputError`` naming the duplicate id and
        both rows. Memory: 8 bytes per row."""
        keys = UniqueKeys()
        for where, item_id, images, _ in self._rows():
            for image in images:
                self._ref(image, where)
            if len(images) > 1:
                self.several_images = True
            keys.seen_at(id_text(item_id))
        if not (suspects := keys.suspects()):
            return
        named = UniqueKeys(suspects)
        for where, item_id, _, _ in self._rows():
            key = id_text(item_id)
            if (first := named.seen_at(key, where)) is not None:
                raise InputError(f"{self.name}: duplicate id {key!r} ({self.id_column} at "
                                 f"{first} and {where}): ids must be unique; fix the "
                                 "manifest")

    def _rows(self) -> Iterator[tuple[str, Any, list[str], dict[str, Any] | None]]:
        """``(where, id, image values, overrides)`` per row (one image value or more, in
        column order); ``where`` is ``line N`` (CSV, JSONL: the file's line) or ``row N``
        (Parquet, 1-based)."""
        lower = self.name.lower()
        if lower.endswith(".parquet"):
            rows = self._parquet_rows()
        elif lower.endswith(".csv"):
            rows = self._csv_rows()
        else:
            rows = self._jsonl_rows()
        idc = self.id_column
        for where, row in rows:
            item_id = row.get(idc)
            if item_id is None or item_id == "" or (item_id.__class__ is float and item_id != item_id):
                raise InputError(f"{self.name} {where}: no {idc!r}: every row needs an id; fill it "
                                 "in or drop the row")
            if item_id.__class__ not in _ID_TYPES:
                raise InputError(f"{self.name} {where}: {idc!r} is a "
                                 f"{type(item_id).__name__}, not a string, number or boolean: "
                                 "use scalar ids")
            images: list[str] = []
            for imc in self.image_columns:
                images.extend(self._images(row.get(imc), imc, where, item_id))
            opts = {c: v for c in self.overrides if (v := row.get(c)) is not None and v != ""}
            yield where, item_id, images, opts or None

    def _images(self, value: Any, imc: str, where: str, item_id: Any) -> list[str]:
        """The image values of column ``imc`` of a row: ``[value]``, or a list value's items.
        Raises ``InputError`` naming the row for an empty or non-string value."""
        if value is None or value == "" or value == []:
            raise InputError(f"{self.name} {where}: no {imc!r} for id {id_text(item_id)!r}: every "
                             "row needs an image; fill it in or drop the row")
        values = value if value.__class__ in (list, tuple) else [value]
        for image in values:
            if image.__class__ is not str or not image:
                raise InputError(f"{self.name} {where}: {imc!r} holds a "
                                 f"{type(image).__name__ if image != '' else 'empty string'}, "
                                 "not an image reference: give an s3:// URI, an http(s) URL, "
                                 "a path or a key (or a list of them)")
        return list(values)

    def _open(self) -> IO[bytes]:
        """The manifest as a buffered binary stream (local: the file; S3: ranged GETs of
        ``READ_BUFFER`` bytes). Raises ``InputError`` when it does not exist."""
        folder, name = split_input(self.spec)
        if not folder.startswith("s3://"):
            try:
                return open(os.path.join(folder, name), "rb", buffering=READ_BUFFER)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise InputError(f"manifest {self.url} does not exist: check the path") from None
        store = self.store if self.store.url == folder else open_store(
            folder, endpoint_url=self.settings.s3_endpoint_url, region=self.settings.s3_region)
        info = object_info(store, name)
        if info is None:
            raise InputError(f"manifest {self.url} does not exist: check the path")
        # Reads of READ_BUFFER bytes go straight to one ranged GET each (no second buffer).
        return io.BufferedReader(RangeFile(store, name, info.size, block=READ_BUFFER),
                                 buffer_size=READ_BUFFER)

    def _missing(self, found: list[str]) -> None:
        wanted = [c for c in (self.id_column, *self.image_columns) if c not in found]
        if wanted:
            flag = "--id-column" if self.id_column in wanted else "--image-column"
            raise InputError(f"{self.name}: no column {', '.join(map(repr, wanted))} (columns: "
                             f"{', '.join(found) or 'none'}): pass {flag} NAME")

    def _csv_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        with self._open() as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            # Characters, not bytes, once decoded: a line may hold 4 bytes per character.
            reader = csv.DictReader(self._bounded(iter(lambda: text.readline(MAX_LINE_BYTES + 2),
                                                       "")))
            try:
                self._missing(list(reader.fieldnames or []))
                for row in reader:
                    yield f"line {reader.line_num}", row
            except (csv.Error, UnicodeDecodeError) as exc:
                if "field larger than field limit" in str(exc):
                    raise InputError(f"{self.name} line {reader.line_num}: a field is longer "
                                     f"than {csv.field_size_limit()} characters (an unclosed "
                                     "quote?): fix the row") from None
                raise InputError(f"{self.name} line {reader.line_num}: not CSV ({exc}): save "
                                 "it as UTF-8 CSV with a header row") from None

    def _bounded(self, lines: Iterator[Any]) -> Iterator[Any]:
        """``lines`` (read with ``readline(MAX_LINE_BYTES + 2)``), raising ``InputError``
        naming the line at the first one longer than ``MAX_LINE_BYTES`` (its line break
        aside): it is never read whole."""
        for n, line in enumerate(lines, 1):
            if len(line) > MAX_LINE_BYTES and \
                    len(line.rstrip(b"\r\n" if isinstance(line, bytes) else "\r\n")) > MAX_LINE_BYTES:
                raise InputError(f"{self.name} line {n}: longer than {MAX_LINE_BYTES} bytes: a "
                                 "manifest row holds an id, an image reference and short "
                                 "options; fix the line (a missing line break?)")
            yield line

    def _jsonl_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        first = True
        with self._open() as raw:
            lines = self._bounded(iter(lambda: raw.readline(MAX_LINE_BYTES + 2), b""))
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise InputError(f"{self.name} line {n}: not JSON: write one JSON object "
                                     "per line") from None
                if not isinstance(row, dict):
                    raise InputError(f"{self.name} line {n}: a JSON {type(row).__name__}, not "
                                     "an object: write one object per line")
                if first:  # the first row says which columns the file has
                    self._missing(list(row))
                    first = False
                yield f"line {n}", row

    def _parquet_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self._open() as raw:
            try:
                pf = pq.ParquetFile(raw)
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(f"{self.url}: not a Parquet file ({str(exc)[:200]}): check "
                                 "the file") from None
            found = pf.schema_arrow.names
            self._missing(found)
            for imc in self.image_columns:
                typ = pf.schema_arrow.field(imc).type
                if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
                    raise InputError(f"{self.name}: column {imc!r} holds image bytes, not "
                                     "references: pass --input-format parquet")
            columns = [self.id_column, *self.image_columns,
                       *(c for c in self.overrides if c in found)]
            n = 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    n += 1
                    yield f"row {n}", row

    # -- image references ------------------------------------------------------------------
    def _ref(self, image: str, where: str) -> str:
        """``PlanItem.ref`` of an image column value (see the module docstring)."""
        value = image
        if value.startswith(("s3://", "http://", "https://")):
            if value.startswith("s3://") and not value[5:].partition("/")[2]:
                raise InputError(f"{self.name} {where}: {value!r} names no object: use "
                                 "s3://bucket/key")
            return value
        if value.startswith("file://"):
            value = value[len("file://"):]
            if not value.startswith("/"):
                raise InputError(f"{self.name} {where}: {image!r} is not an absolute file:// "
                                 "URL: use file:///abs/path or a relative key")
        if value.startswith("/"):
            return "file://" + posixpath.normpath(value)
        if "://" in value:
            raise InputError(f"{self.name} {where}: {image!r}: unsupported URL scheme: use "
                             "s3://, http(s)://, a local path or a key relative to the base")
        key = posixpath.normpath(value.replace("\\", "/"))
        if key == "." or scheme_of(key):
            raise InputError(f"{self.name} {where}: {image!r} does not name a file: give an "
                             "s3:// URI, an http(s) URL, a path or a key")
        if key == ".." or key.startswith("../"):
            raise InputError(f"{self.name} {where}: {image!r} is outside the base folder "
                             f"{self.store.url}: pass --base with a folder that holds it, or "
                             "an absolute path")
        return key

    def _size(self, ref: str) -> int:
        """A local image's bytes (``stat``; a missing file or an unusable path: the estimate,
        the worker makes it an error row), else ``REMOTE_SIZE_ESTIMATE``. A manifest on S3
        gets no ``stat`` of local paths: its local files are not this machine's to look at
        (workers refuse them by default)."""
        if ref.startswith("file://") and not self.url.startswith("s3://"):
            path = ref[len("file://"):]
        elif self._local_root is not None and not scheme_of(ref):
            path = os.path.join(self._local_root, ref)
        else:
            return REMOTE_SIZE_ESTIMATE
        try:
            return os.stat(path).st_size
        except (OSError, ValueError):  # ValueError: a NUL in the path
            return REMOTE_SIZE_ESTIMATE


