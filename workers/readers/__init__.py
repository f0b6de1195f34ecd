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
import logging
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from moonbatch.workers import netguard
from moonbatch.workers.lines import ItemError
from moonbatch.workers.models import PlanItem, SkillOptions
from moonbatch.workers.readers import refs
from moonbatch.workers.storage import LocalStore, NotFound, StorageError, Store, TooLarge, normalize_url

if TYPE_CHECKING:
    from moonbatch.workers.models import RunSpec

log = logging.getLogger(__name__)

# kind → (module, INPUT file suffixes it takes); ``kind_of_file``: first suffix match wins.
READERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "prefix": ("moonbatch.workers.readers.prefix", ()),
    "manifest": ("moonbatch.workers.readers.manifest", (".csv", ".jsonl", ".ndjson")),
    "webdataset": ("moonbatch.workers.readers.webdataset", (".tar",)),
    "parquet": ("moonbatch.workers.readers.parquet", (".parquet",)),
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


def image_columns(input_options: Any) -> list[str]:
    """The image columns a manifest or Parquet INPUT is read with (``RunSpec.input_options``):
    ``image_columns`` (several ``--image-column``: each row's images, in that order), else
    ``[image_column]``, default ``["image"]``."""
    opts = input_options or {}
    several = opts.get("image_columns")
    if several:
        return list(several)
    return [opts.get("image_column") or "image"]


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
    prefix is normalised (``moonbatch.workers.storage.normalize_url``). ``input_format`` other than
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
    """``url`` without user info, query string and fragment (a presigned URL's signature must
    not reach rows, logs or metrics). Never raises."""
    return refs.show(url, limit=2000)


class ItemFetcher:
    """Reads the image bytes of planned items, whatever their reader (one per worker process
    and run; thread-safe).

    ``ref`` forms (``PlanItem.ref``): None (the INPUT store's key ``id``); a key relative to
    the INPUT store; ``s3://bucket/key`` or ``file:///path`` (another store, opened once per
    bucket or folder with the settings' endpoint); ``http(s)://...``; ``<scheme>:<rest>`` for a
    reader's own scheme (``tar:``, ``parquet:``).

    References are data (``moonbatch.workers.readers.refs``, ``moonbatch.workers.netguard``): a
    malformed one is never read; a local file is read only when ``local_input`` (the run's INPUT is on this
    machine; default: ``input_store`` is a local folder) or in a folder of
    ``MOONBATCH_ALLOW_LOCAL_FILES``; an ``s3://`` bucket must pass ``MOONBATCH_ITEM_BUCKETS``;
    an http(s) URL connects only to public addresses or those of
    ``MOONBATCH_ALLOW_PRIVATE_HOSTS`` (every redirect hop too). Every read is capped at
    ``MOONBATCH_ITEM_MAX_BYTES``; an http(s) read must end within ``MOONBATCH_ITEM_DEADLINE``
    seconds in all (connect, redirects, every read).

    Errors: ``ItemError`` (``invalid_reference``, ``reference_refused``,
    ``object_too_large``, ``read_timeout``), ``NotFound`` (object or URL gone),
    ``StorageError`` (read failed); ``read_item`` turns anything else into an ``ItemError``.
    """

    def __init__(self, input_store: Store, settings: Any = None, *,
                 local_input: bool | None = None) -> None:
        if settings is None:
            from moonbatch.config import get_settings

            settings = get_settings()
        self.input, self.settings = input_store, settings
        self.local_input = isinstance(input_store, LocalStore) if local_input is None \
            else local_input
        self.max_bytes: int = settings.item_max_bytes
        self._rules = netguard.parse_rules(settings.allow_private_hosts)
        self._folders = refs.parse_folders(settings.allow_local_files)
        self._buckets = refs.parse_buckets(settings.item_buckets)
        input_url = getattr(input_store, "url", "")
        self._input_bucket = input_url[5:].partition("/")[0] if input_url.startswith("s3://") \
            else None
        self._stores: dict[str, Store] = {}
        self._http: Any = None
        self._lock = threading.Lock()
        self.cache: dict[str, Any] = {}  # per-reader caches (e.g. a Parquet row group)
        # Bytes read ahead for a later ``get`` of the same item (``keep``): the result cache's
        # pass reads each image once, and the build takes what it kept instead of reading again.
        self._kept: dict[tuple[str, str | None], bytes] = {}
        self._kept_bytes = 0

    def keep(self, item: PlanItem, data: bytes, budget: int) -> bool:
        """Hold ``data`` (the item's bytes, just read) for the next ``get`` of the item, while
        everything held stays within ``budget`` bytes; True if it was kept."""
        with self._lock:
            if self._kept_bytes + len(data) > budget:
                return False
            self._kept[(item.key, item.ref)] = data
            self._kept_bytes += len(data)
            return True

    def release(self, wanted: Any = None) -> None:
        """Drop the bytes ``keep`` holds: all of them, or those of items not in ``wanted``
        (a container of ``(item.key, item.ref)``)."""
        with self._lock:
            for k in [k for k in self._kept if wanted is None or k not in wanted]:
                self._kept_bytes -= len(self._kept.pop(k))

    def get(self, item: PlanItem) -> bytes:
        """The item's image bytes (see the class docstring for the rules and errors)."""
        if self._kept:
            with self._lock:
                data = self._kept.pop((item.key, item.ref), None)
                if data is not None:
                    self._kept_bytes -= len(data)
                    return data
        ref = item.ref
        if ref is None:
            return self.input.get(item.id, max_bytes=self.max_bytes)
        try:
            refs.check_syntax(ref)
        except refs.InvalidReference as exc:
            raise ItemError("invalid_reference", f"'{refs.show(ref)}' is not a valid image "
                            f"reference: {exc}: fix the row") from None
        scheme = scheme_of(ref)
        if scheme in ("s3", "file"):
            store, key = self.store_of(ref)
            return store.get(key, max_bytes=self.max_bytes)
        if scheme in ("http", "https"):
            return self._get_http(ref)
        if scheme:
            data = _fetcher_of(scheme)(self, ref[len(scheme) + 1:])
            if len(data) > self.max_bytes:
                raise ItemError("object_too_large", f"{self.source(item)}: {len(data)} bytes, "
                                f"more than MOONBATCH_ITEM_MAX_BYTES ({self.max_bytes})")
            return data
        return self.input.get(ref, max_bytes=self.max_bytes)

    def store_of(self, url: str) -> tuple[Store, str]:
        """``(store, key)`` of an ``s3://`` or ``file://`` object URL, or of a key relative to
        the INPUT store (the store is opened once and kept). Raises ``ItemError``
        (``reference_refused``) for a local file or a bucket the rules refuse (see the class
        docstring), ``ValueError`` for a malformed URL."""
        if not url.startswith(("s3://", "file://")):
            return self.input, url
        if url.startswith("s3://"):
            bucket, _, key = url[5:].partition("/")
            why = refs.bucket_refusal(bucket, allowed=self._buckets,
                                      input_bucket=self._input_bucket)
            root = f"s3://{bucket}/"
        else:
            path = url[len("file://"):]
            why = refs.local_file_refusal(path, local_input=self.local_input,
                                          folders=self._folders)
            root, key = "/", path.lstrip("/")
        if why:
            raise ItemError("reference_refused", why)
        with self._lock:
            store = self._stores.get(root)
            if store is None:
                from moonbatch.workers.storage import open_store

                store = self._stores[root] = open_store(
                    root, endpoint_url=self.settings.s3_endpoint_url,
                    region=self.settings.s3_region)
        return store, key

    def source(self, item: PlanItem) -> str:
        """The row's ``source``: where the image was read, with no secret (an http URL loses
        its user info and query string). Never raises, whatever the ref."""
        ref = item.ref
        try:
            if ref is None:
                return self.input.url_for(item.id)
            if ref.startswith(("http://", "https://", "s3://", "file://")):
                return refs.show(ref, limit=2000)
            if scheme := scheme_of(ref):
                key, _, where = ref[len(scheme) + 1:].partition("#")
                return f"{self.input.url_for(key)}#{where}" if where else self.input.url_for(key)
            return self.input.url_for(ref)
        except Exception:  # a ref no store can name: show it as it is
            return refs.show(str(ref if ref is not None else item.id), limit=2000)

    def key_sources(self, ids: list[Any]) -> list[str]:
        """The ``source`` of each item without a ref (the INPUT store's key ``id``) from its id
        alone: ``[self.source(PlanItem(id, 0)) for id in ids]``, in one call (the merge asks
        for thousands at a time), by the INPUT store's ``urls_for`` where it has one. Never
        raises."""
        urls_for = getattr(self.input, "urls_for", None)
        try:
            if urls_for is not None:
                return urls_for(ids)  # type: ignore[no-any-return]
            url_for = self.input.url_for
            return [url_for(i) for i in ids]
        except Exception:  # an id no store can name: ``source`` shows it as it is
            return [self.source(PlanItem(i, 0)) for i in ids]

    def presigned_url(self, item: PlanItem, seconds: int) -> str | None:
        """A URL a remote service can GET the item's image from as stored: a public http(s)
        URL as it is, a presigned GET for an S3 object; None where there is none (local files,
        tar members, Parquet cells, a ref the rules refuse or that is malformed: send the
        bytes). Never raises."""
        ref = item.ref
        try:
            if ref is not None and ref.startswith(("http://", "https://")):
                return ref
            if ref is not None and scheme_of(ref) not in ("", "s3"):
                return None
            if ref is not None:
                refs.check_syntax(ref)
            store, key = self.store_of(item.id if ref is None else ref)
            presign = getattr(store, "presigned_get", None)
            return presign(key, seconds) if presign is not None else None
        except Exception:
            return None

    def _client(self) -> Any:
        with self._lock:
            if self._http is None:
                self._http = netguard.guarded_client(
                    self._rules, timeout=self.settings.http_timeout,
                    connections=max(16, 2 * self.settings.fetch_concurrency))
            return self._http

    def _get_http(self, url: str) -> bytes:
        """GET ``url`` under the address policy, streamed, at most ``max_bytes`` bytes and
        ``item_deadline`` seconds in all. Raises ``ItemError`` (``reference_refused``,
        ``object_too_large``, ``read_timeout``), ``NotFound`` (404, 410), ``StorageError``."""
        import httpx

        shown = refs.show(url)
        client = self._client()
        limit, seconds = self.max_bytes, self.settings.item_deadline
        token = netguard.DEADLINE.set(time.monotonic() + seconds)
        try:
            with client.stream("GET", url) as resp:
                if resp.status_code in (404, 410):
                    raise NotFound(f"GET {shown}: {resp.status_code}")
                if not 200 <= resp.status_code < 300:
                    raise StorageError(f"GET {shown}: HTTP {resp.status_code}")
                encoding = resp.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise StorageError(f"GET {shown}: the server sent Content-Encoding "
                                       f"{encoding[:20]} although identity was asked")
                length = resp.headers.get("content-length", "")
                if length.isdigit() and int(length) > limit:
                    raise ItemError("object_too_large", f"GET {shown}: {length} bytes, more "
                                    f"than MOONBATCH_ITEM_MAX_BYTES ({limit})")
                body = bytearray()
                for chunk in resp.iter_raw():
                    body += chunk
                    if len(body) > limit:
                        raise ItemError("object_too_large", f"GET {shown}: more than "
                                        f"MOONBATCH_ITEM_MAX_BYTES ({limit}) bytes")
                return bytes(body)
        except netguard.Refused as exc:
            raise ItemError("reference_refused", f"GET {shown}: {exc}") from None
        except httpx.TimeoutException:
            if time.monotonic() >= (netguard.DEADLINE.get() or 0):
                raise ItemError("read_timeout", f"GET {shown}: not read within "
                                f"MOONBATCH_ITEM_DEADLINE ({seconds:g} s)") from None
            raise ItemError("read_timeout", f"GET {shown}: no answer within "
                            f"MOONBATCH_HTTP_TIMEOUT ({self.settings.http_timeout:g} s)") from None
        except httpx.TooManyRedirects:
            raise StorageError(f"GET {shown}: more than {netguard.MAX_REDIRECTS} "
                               "redirects") from None
        except httpx.HTTPError as exc:
            raise StorageError(f"GET {shown} failed: {type(exc).__name__}") from None
        finally:
            netguard.DEADLINE.reset(token)

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
    """``fetch(item)``, with whatever it raises as the item's ``ItemError`` (the per-item
    boundary: nothing about one item's reference or bytes fails its round). Codes:
    ``object_not_found`` (``NotFound``), ``object_too_large`` (``TooLarge``), ``read_failed``
    (``StorageError``, other errors), ``invalid_reference`` (a malformed URL: ``ValueError``,
    ``UnicodeError``, ``httpx.InvalidURL``), ``read_timeout``, ``reference_refused`` and any
    code the fetch raised itself. Messages hold no query string."""
    try:
        return fetch(item)
    except ItemError:
        raise
    except NotFound:
        raise ItemError("object_not_found",
                        "object was deleted between listing and reading") from None
    except TooLarge as exc:
        raise ItemError("object_too_large", f"{refs.show(str(exc), 400)}: raise "
                        "MOONBATCH_ITEM_MAX_BYTES on the workers to read it") from None
    except StorageError as exc:
        raise ItemError("read_failed", refs.show(str(exc), 500)) from None
    except netguard.Refused as exc:
        raise ItemError("reference_refused", refs.show(str(exc), 500)) from None
    except (ValueError, UnicodeError) as exc:  # httpx.InvalidURL is a ValueError
        raise ItemError("invalid_reference", f"'{refs.show(str(item.ref), 200)}' is not a "
                        f"valid image reference ({type(exc).__name__}: "
                        f"{refs.show(str(exc), 200)}): fix the row") from None
    except Exception as exc:
        raise unexpected_error(exc, "reading", "read_failed") from None


def unexpected_error(exc: BaseException, doing: str, code: str) -> ItemError:
    """An ``ItemError`` for an error nobody expected while ``doing`` something to one item
    (``MemoryError``: ``image_too_large``); logged with where it was raised (type and line, no
    message: it may hold a URL)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{posixpath.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
    log.warning("unexpected %s while %s an item (at %s)", type(exc).__name__, doing, where)
    if isinstance(exc, MemoryError):
        return ItemError("image_too_large", f"out of memory while {doing} the image")
    return ItemError(code, f"unexpected {type(exc).__name__} while {doing} the image")


def scheme_of(ref: str) -> str:
    """The scheme of an item ``ref`` (``s3``, ``file``, ``http``, ``https`` or a reader's,
    e.g. ``tar``), or ``""`` for a key relative to the INPUT store."""
    head, sep, _ = ref.partition(":")
    if not sep or "/" in head:
        return ""
    return head if head in ("s3", "file", "http", "https") or head in SCHEMES else ""


def _fetcher_of(scheme: str) -> Callable[[ItemFetcher, str], bytes]:
    return module(SCHEMES[scheme]).fetch
