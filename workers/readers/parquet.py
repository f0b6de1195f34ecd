"""Parquet reader: image bytes in a column (the Hugging Face datasets layout), read by row
group.

INPUT is one ``.parquet`` file or a prefix of them (``--input-format parquet``; ``auto``
reads a prefix as Parquet when it holds ``.parquet`` files and no image objects nor ``.tar``
files, see ``prefix``). The image column (``--image-column``, default ``image``) is a struct
``{bytes: binary, path: string}`` (``datasets.Image``) or plain binary. A single file whose
image column holds strings is a manifest (references to images): it is handed to
``moonbatch.workers.readers.manifest``.

Ids: the ``--id-column`` (default ``id``; str, int, float or bool; null or duplicate ids are an
``InputError``); a file without that column gives each row the id ``"<file key>#<row>"`` (row:
0-based within the file, e.g. ``"train-00000-of-00002.parquet#17"``), unique across files and
stable when files are added. Optional ``question``, ``object``, ``length`` columns override the
run's options per row (``PlanItem.opts``).

Planning reads only the footer and, per row group, the id and override columns; an item's
size is an estimate (the row group's uncompressed image bytes / its rows). The ref is
``parquet:<file key>#<row group>/<row in group>`` (``/<column>``, percent-encoded, appended
when the image column is not ``image``). Several ``--image-column`` (a multi-image query;
``spec.input_options["image_columns"]``) make each row one item with an image per column: its
``ref`` the first column's cell, its ``more`` the others' (``PlanItem``). A worker reads a
row group's image column once (through ranged GETs) and keeps the last ``CACHED_ROW_GROUPS``
per process (``fetch``).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import quote, unquote

from moonbatch.workers.lines import ItemError
from moonbatch.workers.models import PlanItem
from moonbatch.workers.readers import InputError, ListingStats, image_columns
from moonbatch.workers.readers.rangeio import RangeFile, files_under, input_file_key, object_info
from moonbatch.workers.readers.unique import UniqueKeys
from moonbatch.workers.storage import ObjectInfo, Store

OVERRIDES = ("question", "object", "length")
DEFAULT_IMAGE_COLUMN = "image"
CACHED_ROW_GROUPS = 2  # decoded image columns a worker process keeps
CACHED_FILES = 8  # open files (footers read) a worker process keeps
# No readahead: pyarrow reads a footer or a column chunk in one call, and a readahead past the
# id column would pull image bytes at planning.
PARQUET_BLOCK = 1


def is_parquet(key: str) -> bool:
    """True if an object's name says it is a ``.parquet`` file."""
    return key.lower().endswith(".parquet")


def open_file(store: Store, info: ObjectInfo) -> Any:
    """``pyarrow.parquet.ParquetFile`` over ``info``'s object (footer read, nothing else).
    Raises ``InputError`` for a file that is not Parquet, storage errors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(RangeFile(store, info.key, info.size, PARQUET_BLOCK))
    except (pa.ArrowException, OSError) as exc:
        if exc.__class__.__name__ in ("NotFound", "StorageError"):
            raise
        raise InputError(f"{store.url_for(info.key)} is not a Parquet file ({exc}): check "
                         "INPUT") from None


def image_leaf(pf: Any, column: str, where: str) -> str | None:
    """The Parquet column path of the image bytes (``image.bytes`` for a ``datasets.Image``
    struct, ``image`` for plain binary), or None when the column holds strings or lists of
    strings (a manifest).
    Raises ``InputError`` naming the columns when it is missing or of another type."""
    import pyarrow as pa

    schema = pf.schema_arrow
    if column not in schema.names:
        raise InputError(f"{where}: no column {column!r} (columns: {', '.join(schema.names)}): "
                         "pass --image-column NAME")
    typ = schema.field(column).type
    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)
    if any(test(typ) for test in binary):
        return column
    if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0 and any(
            test(typ.field("bytes").type) for test in binary):
        return f"{column}.bytes"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return None
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        item = typ.value_type
        if pa.types.is_string(item) or pa.types.is_large_string(item):
            return None  # several references per row: a manifest's multi-image rows
        raise InputError(f"{where}: column {column!r} is {typ}: a list of image bytes per row "
                         "is not read; put each image in a column of its own and repeat "
                         "--image-column (or list references: strings)")
    raise InputError(f"{where}: column {column!r} is {typ}, not image bytes (binary or a "
                     "{bytes, path} struct) nor references (strings): pass --image-column NAME")


class Reader:
    """The rows of INPUT's Parquet file (or of every ``.parquet`` under INPUT's prefix, other
    objects skipped), in file and row order."""

    def __init__(self, spec: Any, store: Store, settings: Any = None) -> None:
        self.spec, self.store, self.settings = spec, store, settings
        try:
            self.file_key = input_file_key(spec, store)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        options = spec.input_options or {}
        self.id_column = options.get("id_column") or "id"
        self.image_columns = image_columns(options)
        self.image_column = self.image_columns[0]
        # Whether rows name several images (``check_multi_image``): several image columns, or
        # a manifest's list-valued column (set by ``check()``).
        self.several_images = len(self.image_columns) > 1

    def check(self) -> None:
        """A single file whose image column holds references is a manifest: run the
        manifest's pre-pass (valid rows, unique ids; ``moonbatch.workers.readers.manifest``). Files of
        image bytes are checked while planning. Raises ``InputError``."""
        if self.file_key is None:
            return
        info = object_info(self.store, self.file_key)
        where = self.store.url_for(self.file_key)
        if info is not None and image_leaf(open_file(self.store, info), self.image_column,
                                           where) is None:
            from moonbatch.workers.readers.manifest import Reader as Manifest

            manifest = Manifest(self.spec, self.store, self.settings)
            manifest.check()
            self.several_images = manifest.several_images

    def iter_items(self, stats: ListingStats, *, exclude_prefix: str | None = None
                   ) -> Iterator[PlanItem]:
        """See ``moonbatch.workers.readers.Reader.iter_items``. Raises ``InputError`` for a missing
        file, a file that is not Parquet, a missing or mistyped image column, null or
        duplicate ids, references in a prefix's file."""
        if self.file_key is None:
            files = files_under(self.store, stats, is_parquet, exclude_prefix=exclude_prefix)
            return iter_files(self.store, files, stats, id_column=self.id_column,
                              image_columns=self.image_columns)
        info = object_info(self.store, self.file_key)
        where = self.store.url_for(self.file_key)
        if info is None:
            raise InputError(f"{where}: no such file: check INPUT")
        if image_leaf(open_file(self.store, info), self.image_column, where) is None:
            from moonbatch.workers.readers.manifest import Reader as Manifest  # references, not bytes

            return Manifest(self.spec, self.store, self.settings).iter_items(
                stats, exclude_prefix=exclude_prefix)
        return iter_files(self.store, [info], stats, id_column=self.id_column,
                          image_columns=self.image_columns)


def iter_files(store: Store, files: Iterable[ObjectInfo], stats: ListingStats, *,
               id_column: str = "id", image_column: str = DEFAULT_IMAGE_COLUMN,
               image_columns: Sequence[str] | None = None) -> Iterator[PlanItem]:
    """The rows of every Parquet file in ``files`` (objects of ``store``) as items, ids unique
    across them all (see the module docstring); ``image_columns`` (default
    ``[image_column]``): each row's images. ``stats.listed`` counts rows. A duplicate id
    raises ``InputError`` once every row has been read (8 bytes per row: ``UniqueKeys``; a
    second pass over the files names it)."""
    files = list(files)  # the second pass reads them again
    image_columns = image_columns or [image_column]
    keys = UniqueKeys()
    for info in files:
        yield from iter_file(store, info, stats, keys, id_column=id_column,
                             image_columns=image_columns)
    if suspects := keys.suspects():
        named = UniqueKeys(suspects)
        for info in files:  # raises at the second occurrence
            for _ in iter_file(store, info, ListingStats(), named, id_column=id_column,
                               image_columns=image_columns):
                pass


def iter_file(store: Store, info: ObjectInfo, stats: ListingStats, keys: UniqueKeys, *,
              id_column: str, image_column: str = DEFAULT_IMAGE_COLUMN,
              image_columns: Sequence[str] | None = None) -> Iterator[PlanItem]:
    """The rows of one file, row group by row group, reading only the id and override
    columns; ``keys``: the item keys of the run so far (``UniqueKeys.seen_at``: an
    ``InputError`` for a key it says is repeated); ``image_columns`` (default
    ``[image_column]``): each row's images."""
    import pyarrow as pa

    image_columns = image_columns or [image_column]

    where = store.url_for(info.key)
    pf = open_file(store, info)
    schema = pf.metadata.schema
    leaf_indices = []
    for image_column in image_columns:
        leaf = image_leaf(pf, image_column, where)
        if leaf is None:
            raise InputError(f"{where}: column {image_column!r} holds strings (image "
                             "references): a manifest is read as one file, not a prefix, and "
                             "its image columns all hold references: pass the file as INPUT")
        leaf_indices.append(next(i for i in range(len(schema)) if schema.column(i).path == leaf))
    names = pf.schema_arrow.names
    has_id = id_column in names
    if has_id:
        typ = pf.schema_arrow.field(id_column).type
        if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)
                or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise InputError(f"{where}: id column {id_column!r} is {typ}: ids must be strings, "
                             "numbers or booleans (pass --id-column NAME)")
    overrides = [c for c in OVERRIDES if c in names and c not in image_columns]
    columns = ([id_column] if has_id else []) + overrides
    suffixes = ["" if c == DEFAULT_IMAGE_COLUMN else "/" + quote(c, safe="")
                for c in image_columns]
    first_row = 0
    for rg in range(pf.num_row_groups):
        meta = pf.metadata.row_group(rg)
        n = meta.num_rows
        size = sum(meta.column(i).total_uncompressed_size for i in leaf_indices) // max(n, 1)
        table = pf.read_row_group(rg, columns=columns) if columns else None
        values = {c: table.column(c).to_pylist() for c in columns} if table is not None else {}
        for row in range(n):
            stats.listed += 1
            item_id = values[id_column][row] if has_id else f"{info.key}#{first_row + row}"
            if item_id is None:
                raise InputError(f"{where}: row {first_row + row} has no {id_column!r}: every "
                                 "row needs an id")
            opts = {c: v for c in overrides if (v := values[c][row]) not in (None, "")}
            refs = [f"parquet:{info.key}#{rg}/{row}{suffix}" for suffix in suffixes]
            item = PlanItem(item_id, size, refs[0], opts or None, tuple(refs[1:]) or None)
            if keys.seen_at(item.key) is not None:
                raise InputError(f"{where}: id {item.key} appears twice in INPUT (row "
                                 f"{first_row + row}): ids must be unique")
            stats.items += 1
            yield item
        first_row += n


class RowGroupCache:
    """A worker process's decoded image columns (the last ``CACHED_ROW_GROUPS`` row groups)
    and open files (footers), shared by its threads. ``loads`` counts row groups read."""

    def __init__(self, groups: int = CACHED_ROW_GROUPS, files: int = CACHED_FILES) -> None:
        self.lock = threading.Lock()
        self.max_groups, self.max_files = groups, files
        self.groups: collections.OrderedDict[tuple[str, int, str], Any] = collections.OrderedDict()
        self.files: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.loads = 0

    def cell(self, store: Store, key: str, rg: int, row: int, column: str) -> bytes | None:
        """The image bytes of ``row`` of row group ``rg`` of ``key`` (None for a null cell).
        Raises ``NotFound``/``StorageError``, ``ItemError`` (``read_failed``) when the file
        no longer has that row group or column."""
        with self.lock:  # pyarrow's reader over one file object is not thread-safe
            array = self.groups.get((key, rg, column))
            if array is None:
                array = self._load(store, key, rg, column)
            else:
                self.groups.move_to_end((key, rg, column))
        if not 0 <= row < len(array):
            raise ItemError("read_failed", f"row {row} of row group {rg} is gone: the file "
                                           "changed since listing")
        return array[row].as_py()

    def _load(self, store: Store, key: str, rg: int, column: str) -> Any:
        pf = self.files.get(key)
        if pf is None:
            info = object_info(store, key)
            if info is None:
                from moonbatch.workers.storage import NotFound

                raise NotFound(f"{store.url_for(key)}: no such object")
            pf = self.files[key] = open_file(store, info)
            while len(self.files) > self.max_files:
                self.files.popitem(last=False)
        leaf = image_leaf(pf, column, store.url_for(key))
        if leaf is None or rg >= pf.num_row_groups:
            raise ItemError("read_failed", f"row group {rg} or column {column!r} is gone: the "
                                           "file changed since listing")
        chunked = pf.read_row_group(rg, columns=[leaf]).column(0)
        array = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
        if leaf != column:
            array = array.field("bytes")
        self.loads += 1
        self.groups[(key, rg, column)] = array
        while len(self.groups) > self.max_groups:
            self.groups.popitem(last=False)
        return array


def fetch(fetcher: Any, rest: str) -> bytes:
    """The bytes of a ``parquet:<key>#<row group>/<row>[/<column>]`` item, from the row
    group's image column (read once per process, cached in ``fetcher.cache``). Raises
    ``ItemError`` (``empty_object``) for a null or empty cell, ``NotFound`` (file gone),
    ``StorageError``."""
    key, _, where = rest.rpartition("#")
    parts = where.split("/", 2)
    rg, row = int(parts[0]), int(parts[1])
    column = unquote(parts[2]) if len(parts) > 2 else DEFAULT_IMAGE_COLUMN
    cache = fetcher.cache.get("parquet")
    if cache is None:
        cache = fetcher.cache.setdefault("parquet", RowGroupCache())  # atomic: one wins
    data = cache.cell(fetcher.input, key, rg, row, column)
    if not data:
        raise ItemError("empty_object", f"the image cell of row {row} of row group {rg} is "
                                        f"{'null' if data is None else 'empty'}")
    return data
