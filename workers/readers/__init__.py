"""Input readers: how a run's INPUT becomes items (producer side) and how a worker reads an
item's image (worker side). One module per kind of INPUT, behind one small interface:

- ``prefix``: every image object under an S3 prefix or a local directory (id: its key);
- ``manifest``: a ``.csv``, ``.jsonl`` or ``.parquet`` table with an id and an image column;
- ``webdataset``: ``.tar`` shards in img2dataset's layout (id: the sample's ``__key__``);
- ``parquet``: Parquet files with the image bytes in a column (Hugging Face datasets layout).

A reader module defines a ``Reader`` class (``Reader(spec, store, settings)`` with
``iter_items(stats, exclude_prefix)`` yielding ``PlanItem``) and, if its items carry a ``ref``
scheme of their own (``tar:``, ``parquet:``), ``fetch(fetcher, rest) -> bytes``. A reader
whose INPUT can be wrong as a whole (a manifest's duplicate ids) may also define ``check()``,
raising ``InputError``: the producer calls it before it writes anything
(``producer.runs.check_input_items``). ``READERS``
below records each module with the INPUT file suffixes it takes and ``SCHEMES`` its ref scheme,
so choosing a reader imports none. Shared code never names a reader: it calls ``open_reader``
to list and ``ItemFetcher`` to read. Importing this package does not import Celery, boto3 or
pyarrow.
"""

from __future__ import annotations

import dataclasses
import importlib
import posixpath
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from workers.lines import ItemError
from workers.models import PlanItem, SkillOptions
from workers.storage import NotFound, StorageError, Store, normalize_url

if TYPE_CHECKING:
    from workers.models import RunSpec

# kind → (module, INPUT file suffixes it takes); ``kind_of_file``: first suffix match wins.
READERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "prefix": ("workers.readers.prefix", ()),
    "manifest": ("workers.readers.manifest", (".csv", ".jsonl", ".ndjson")),
    "webdataset": ("workers.readers.webdataset", (".tar",)),
    "parquet": ("workers.readers.parquet", (".parquet",)),
}
# An item ref's own scheme → the reader whose module's ``fetch`` reads it.
SCHEMES: dict[str, str] = {"tar": "webdataset", "parquet": "parquet"}
INPUT_FORMATS = ("auto", *READERS)


@dataclasses.dataclass
class ListingStats:
    """What a reader saw: ``listed`` entries (objects, rows, tar members), ``items`` yielded,
    ``skipped`` entries that are not images or cannot be items (with a few examples;
    ``reasons`` counts the latter by reason code; ``on_skip``, if set, is called with every
    skipped one as ``(key, reason, detail)``, to record them all without holding them in
    memory)."""

    listed: int = 0
    items: int = 0
    skipped: int = 0
    skipped_examples: list[str] = dataclasses.field(default_factory=list)
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    on_skip: Callable[[str, str | None, str | None], None] | None = None

    def skip(self, key: str, reason: str | None = None, detail: str | None = None) -> None:
        """Count ``key`` as skipped: not an image (``reason`` None), or an entry that cannot be
        an item, with a ``reason`` code (e.g. ``name_not_utf8``, ``unreadable``) and a one-line
        ``detail`` (no secret). ``key`` must be printable text (valid UTF-8)."""
        self.skipped += 1
        if reason is not None:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.skipped_examples) < 10:
            self.skipped_examples.append(key)
        if self.on_skip is not None:
            self.on_skip(key, reason, detail)


class Reader(Protocol):
    """A kind of INPUT, listed into items (see the module docstring)."""

    def iter_items(self, stats: ListingStats, *, exclude_prefix: str | None = None
                   ) -> Iterator[PlanItem]:
        """Yield every item of INPUT in a stable order (the same INPUT plans the same shards);
        count what was seen in ``stats``. Raises ``InputError`` for an INPUT that cannot be
        read as this kind (one line naming the cause and the fix), storage errors."""
        ...


class InputError(ValueError):
    """INPUT cannot be read as its kind (a missing column, duplicate ids, a file that is not
    a manifest): the message names the item or row and the fix."""


def module(kind: str) -> Any:
    """The reader module of ``kind``; raises ``ValueError`` naming the known kinds."""
    try:
        return importlib.import_module(READERS[kind][0])
    except KeyError:
        raise ValueError(f"unknown input format {kind!r}: use one of "
                         f"{', '.join(INPUT_FORMATS)}") from None


def kind_of_file(url: str) -> str | None:
    """The reader kind an INPUT file's name asks for (``manifest`` for ``.csv``, ``.jsonl``;
    ``webdataset`` for ``.tar``; ``parquet`` for ``.parquet``, which the parquet reader hands
    to the manifest reader when its image column holds references, not bytes), or None when
    ``url`` does not name such a file (a prefix)."""
    path = urlsplit(url).path if "://" in url else url
    if path.endswith(("/", "\\")):
        return None
    name = posixpath.basename(path.replace("\\", "/")).lower()
    for kind, (_, suffixes) in READERS.items():
        if suffixes and name.endswith(suffixes):
            return kind
    return None


def normalize_input(url: str, input_format: str = "auto") -> tuple[str, str]:
    """``(INPUT URL as the spec records it, reader kind)``. A file INPUT (a manifest, a
    ``.tar``, a ``.parquet``) keeps its file URL (``s3://bucket/key`` or an absolute path); a
    prefix is normalised (``workers.storage.normalize_url``). ``input_format`` other than
    ``auto`` chooses the reader (e.g. ``webdataset`` for a prefix of ``.tar`` shards).

    Raises ``ValueError`` for an unknown format or a URL the stores do not take."""
    if input_format not in INPUT_FORMATS:
        module(input_format)  # raises, naming the formats
    kind = kind_of_file(url)
    if kind is None:
        if input_format == "manifest":
            raise ValueError(f"{url}: --input-format manifest takes a .csv, .jsonl or .parquet "
                             "file, not a prefix")
        return normalize_url(url), ("prefix" if input_format == "auto" else input_format)
    folder = normalize_url(_parent(url))
    name = url.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return folder + name, (kind if input_format == "auto" else input_format)


def _parent(url: str) -> str:
    return url.replace("\\", "/").rstrip("/").rsplit("/", 1)[0] + "/" if "/" in url.replace(
        "\\", "/") else "."


def split_input(spec: RunSpec) -> tuple[str, str | None]:
    """``(folder URL, file name or None)`` of a spec's INPUT: the folder is the INPUT store's
    root (``input_root``) for every kind but a manifest with ``--base``."""
    if spec.input.endswith(("/", "\\")):
        return spec.input, None
    folder, _, name = spec.input.replace("\\", "/").rpartition("/")
    return normalize_url(folder + "/"), name


def input_root(spec: RunSpec) -> str:
    """URL of the store a run's workers read items from (``Run.input``): INPUT itself for a
    prefix; ``--base`` or the file's folder for a file INPUT (a manifest's relative image keys
    are keys of this store)."""
    base = spec.input_options.get("base")
    if base:
        return normalize_url(base)
    return split_input(spec)[0]


def open_reader(spec: RunSpec, store: Store, settings: Any) -> Reader:
    """The reader of ``spec.input_kind`` over ``store`` (the INPUT folder's store, see
    ``input_root``). Raises ``ValueError`` for an unknown kind."""
    return module(spec.input_kind).Reader(spec, store, settings)


def redact_url(url: str) -> str:
    """``url`` without its query string and fragment (a presigned URL's signature must not
    reach rows, logs or metrics)."""
    if url.startswith(("http://", "https://")):
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"
    return url


class ItemFetcher:
    """Reads the image bytes of planned items, whatever their reader (one per worker process
    and run; thread-safe).

    ``ref`` forms (``PlanItem.ref``): None (the INPUT store's key ``id``); a key relative to
    the INPUT store; ``s3://bucket/key`` or ``file:///path`` (another store, opened once per
    bucket or folder with the settings' endpoint); ``http(s)://...`` (GET with the settings'
    timeout; redirects followed); ``<scheme>:<rest>`` for a reader's own scheme (``tar:``,
    ``parquet:``). Errors: ``NotFound`` (object or URL gone), ``StorageError`` (read failed).
    """

    def __init__(self, input_store: Store, settings: Any = None) -> None:
        if settings is None:
            from config import get_settings

            settings = get_settings()
        self.input, self.settings = input_store, settings
        self._stores: dict[str, Store] = {}
        self._http: Any = None
        self._lock = threading.Lock()
        self.cache: dict[str, Any] = {}  # per-reader caches (e.g. a Parquet row group)

    def get(self, item: PlanItem) -> bytes:
        """The item's image bytes."""
        ref = item.ref
        if ref is None:
            return self.input.get(item.id)
        scheme = scheme_of(ref)
        if scheme in ("s3", "file"):
            store, key = self.store_of(ref)
            return store.get(key)
        if scheme in ("http", "https"):
            return self._get_http(ref)
        if scheme:
            return _fetcher_of(scheme)(self, ref[len(scheme) + 1:])
        return self.input.get(ref)

    def store_of(self, url: str) -> tuple[Store, str]:
        """``(store, key)`` of an ``s3://`` or ``file://`` object URL, or of a key relative to
        the INPUT store (the store is opened once and kept)."""
        if not url.startswith(("s3://", "file://")):
            return self.input, url
        if url.startswith("s3://"):
            bucket, _, key = url[5:].partition("/")
            root = f"s3://{bucket}/"
        else:
            path = url[len("file://"):]
            root, key = "/", path.lstrip("/")
        with self._lock:
            store = self._stores.get(root)
            if store is None:
                from workers.storage import open_store

                store = self._stores[root] = open_store(
                    root, endpoint_url=self.settings.s3_endpoint_url,
                    region=self.settings.s3_region)
        return store, key

    def source(self, item: PlanItem) -> str:
        """The row's ``source``: where the image was read, with no secret (an http URL loses
        its query string)."""
        ref = item.ref
        if ref is None:
            return self.input.url_for(item.id)
        if ref.startswith(("http://", "https://")):
            return redact_url(ref)
        if ref.startswith(("s3://", "file://")):
            return ref
        if scheme := scheme_of(ref):
            key, _, where = ref[len(scheme) + 1:].partition("#")
            return f"{self.input.url_for(key)}#{where}" if where else self.input.url_for(key)
        return self.input.url_for(ref)

    def presigned_url(self, item: PlanItem, seconds: int) -> str | None:
        """A URL a remote service can GET the item's image from as stored: a public http(s)
        URL as it is, a presigned GET for an S3 object; None where there is none (local files,
        tar members, Parquet cells: send the bytes)."""
        ref = item.ref
        if ref is not None and ref.startswith(("http://", "https://")):
            return ref
        if ref is not None and scheme_of(ref) not in ("", "s3"):
            return None
        store, key = self.store_of(item.id if ref is None else ref)
        presign = getattr(store, "presigned_get", None)
        return presign(key, seconds) if presign is not None else None

    def _get_http(self, url: str) -> bytes:
        import httpx

        with self._lock:
            if self._http is None:
                self._http = httpx.Client(timeout=self.settings.http_timeout,
                                          follow_redirects=True,
                                          headers={"User-Agent": "moonbatch"})
        try:
            resp = self._http.get(url)
        except httpx.HTTPError as exc:
            raise StorageError(f"GET {redact_url(url)} failed: {type(exc).__name__}") from None
        if resp.status_code in (404, 410):
            raise NotFound(f"GET {redact_url(url)}: {resp.status_code}")
        if resp.status_code >= 400:
            raise StorageError(f"GET {redact_url(url)}: HTTP {resp.status_code}")
        return resp.content

    def close(self) -> None:
        """Close the HTTP client (stores need no closing)."""
        if self._http is not None:
            self._http.close()


def item_options(options: SkillOptions, item: PlanItem) -> SkillOptions:
    """The options of ``item``'s request: the run's, with the item's own ``question``,
    ``object`` or ``length`` (``PlanItem.opts``). Raises ``ItemError`` (``invalid_options``,
    naming the field) when an override is invalid."""
    if not item.opts:
        return options
    try:
        return options.with_overrides(item.opts)
    except ValueError as exc:
        raise ItemError("invalid_options", f"the item's own options are invalid: {exc}") from None


def read_item(fetch: Callable[[PlanItem], bytes], item: PlanItem) -> bytes:
    """``fetch(item)``, with storage errors as ``ItemError`` (``object_not_found``,
    ``read_failed``), so every reader's failure becomes the item's error row."""
    try:
        return fetch(item)
    except NotFound:
        raise ItemError("object_not_found",
                        "object was deleted between listing and reading") from None
    except StorageError as exc:
        raise ItemError("read_failed", str(exc)[:500]) from None


def scheme_of(ref: str) -> str:
    """The scheme of an item ``ref`` (``s3``, ``file``, ``http``, ``https`` or a reader's,
    e.g. ``tar``), or ``""`` for a key relative to the INPUT store."""
    head, sep, _ = ref.partition(":")
    if not sep or "/" in head:
        return ""
    return head if head in ("s3", "file", "http", "https") or head in SCHEMES else ""


def _fetcher_of(scheme: str) -> Callable[[ItemFetcher, str], bytes]:
    return module(SCHEMES[scheme]).fetch
