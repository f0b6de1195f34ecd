"""Object storage behind one small interface: S3 (and S3-compatible stores) or a local directory.

A store is rooted at a URL (``s3://bucket/prefix/`` or a local directory); every key it takes or
yields is relative to that root, so an item's id is its key in the input store.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlparse

_READ_CHUNK = 1 << 20  # bytes per read of a body of unknown length


class StorageError(Exception):
    """A storage operation failed; the message names the URL and the reason."""


class NotFound(StorageError):
    """The object does not exist (deleted, or never written)."""


class TooLarge(StorageError):
    """The object is larger than the reader's ``max_bytes`` (nothing past it was read)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: ``key`` relative to the store root, ``size`` in bytes, ``version``
    a token that differs whenever the object's bytes do (S3: its listed ETag), or None when
    the store does not say (then a reader cannot tell a rewrite: it reads again). Two
    ``ObjectInfo`` compare by key and size only."""

    key: str
    size: int
    version: str | None = dataclasses.field(default=None, compare=False)


class Store(Protocol):
    """What moonbatch needs of a store. Keys are ``/``-separated and relative to ``url``."""

    url: str

    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object under ``prefix``, page by page (never the whole listing at once)."""
        ...

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """Return the object's bytes; raise ``NotFound`` if it is missing, ``TooLarge`` (having
        read at most ``max_bytes + 1`` bytes) if it holds more than ``max_bytes``."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return up to ``length`` bytes from offset ``start``; raise ``NotFound`` if missing."""
        ...

    def put(self, key: str, data: bytes | IO[bytes], *, if_absent: bool = False,
            content_type: str | None = None) -> bool:
        """Write the object: ``data``'s bytes, or a binary file's from its position to its end
        (a seekable file: read in chunks, rewound to that position where a retry needs it;
        never held whole). With ``if_absent``, write only if no object exists at ``key`` and
        return False (writing nothing) when one does; otherwise always write and return True.
        ``content_type``: the object's media type where the store keeps one (S3's
        ``Content-Type``, what a browser opening a presigned URL goes by; None: the store's
        default, ``binary/octet-stream`` on S3)."""
        ...

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Return the object's bytes and a version token (its ETag); raise ``NotFound``."""
        ...

    def put_new(self, key: str, data: bytes) -> str | None:
        """``put`` with ``if_absent`` that returns the version it wrote (what the writer's
        first compare-and-swap needs, without reading the object back), or None (writing
        nothing) when an object exists at ``key``."""
        ...

    def put_if_match(self, key: str, data: bytes, version: str) -> bool:
        """Compare-and-swap: write only if the object's version is still ``version``; return
        False (writing nothing) if it changed or vanished."""
        ...

    def swap(self, key: str, data: bytes, version: str) -> str | None:
        """``put_if_match`` that returns the version it wrote (the token the next
        compare-and-swap of this writer needs, without reading the object again), or None
        (writing nothing) if the object changed or vanished."""
        ...

    def exists(self, key: str) -> bool:
        """True if an object exists at ``key``."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object if it exists."""
        ...

    def url_for(self, key: str) -> str:
        """The full URL (``s3://bucket/key``) or absolute path of ``key``."""
        ...


def get_json(store: Store, key: str) -> Any:
    """Read and parse a JSON object; raise ``NotFound`` if missing."""
    return json.loads(store.get(key))


def get_json_or_none(store: Store, key: str) -> Any | None:
    """Read and parse a JSON object, or return None if it does not exist."""
    try:
        return get_json(store, key)
    except NotFound:
        return None


def put_json(store: Store, key: str, value: Any, *, if_absent: bool = False) -> bool:
    """Write ``value`` as JSON (UTF-8, non-ASCII kept); see ``Store.put`` for ``if_absent``."""
    data = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    return store.put(key, data, if_absent=if_absent)


class LocalStore:
    """A store rooted at a local directory. Writes are atomic (temp file, then rename or link)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self._root_str = str(self.root)
        # The filesystem root ("/", what file:// item refs open) already ends in a separator.
        self.url = self._root_str.rstrip(os.sep) + os.sep

    def _path(self, key: str) -> Path:
        # realpath follows symlinks anywhere on the path; a string prefix test is ~50x cheaper
        # than comparing against Path.parents.
        real = os.path.realpath(os.path.join(self._root_str, key))
        if real != self._root_str and not real.startswith(self.url):
            raise StorageError(f"key {key!r} escapes the store root {self.root}")
        return Path(real)

    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """See ``Store.iter_objects``. A name that is not valid UTF-8 comes as Python's
        ``surrogateescape`` str of it (``os.fsdecode``): ``get`` still reads it, but it cannot
        be JSON text, so the planner skips it with its reason. An entry that cannot be
        examined (a link loop, no permission to stat it) is left out, like a dangling link."""
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        root = self.url
        stack = [str(base)]
        while stack:  # depth-first, names sorted: a deterministic order, one folder in memory
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except (FileNotFoundError, NotADirectoryError):  # deleted while listing
                continue
            subdirs = []
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
                    elif entry.is_file():
                        key = entry.path[len(root):]
                        yield ObjectInfo(key if os.sep == "/" else key.replace(os.sep, "/"),
                                         entry.stat().st_size)
                except OSError:  # deleted while listing, a link loop (ELOOP), no permission
                    continue
            stack.extend(reversed(subdirs))

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            try:
                return self._path(key).read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise NotFound(f"{self.url_for(key)}: no such object") from None
        # Capped (an item read): a regular file only (O_NONBLOCK: a FIFO must not block the
        # open), its size checked by fstat before reading, and never more than the cap read.
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{self.url_for(key)}: no such object") from None
        except OSError as exc:
            raise StorageError(f"{self.url_for(key)}: {exc.strerror or type(exc).__name__}") from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise StorageError(f"{self.url_for(key)}: not a regular file")
            if info.st_size > max_bytes:
                raise TooLarge(f"{self.url_for(key)}: {info.st_size} bytes, more than the "
                               f"{max_bytes} allowed")
            # st_size + 1, not max_bytes + 1: a read of n allocates n bytes up front (a tiny
            # file would cost the whole cap); the extra byte shows a file that grew since.
            data = f.read(info.st_size + 1)
            if len(data) > info.st_size:
                data += f.read(max_bytes + 1 - len(data))
        if len(data) > max_bytes:  # grew since fstat
            raise TooLarge(f"{self.url_for(key)}: more than the {max_bytes} bytes allowed")
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{self.url_for(key)}: no such object") from None

    def put(self, key: str, data: bytes | IO[bytes], *, if_absent: bool = False,
            content_type: str | None = None) -> bool:
        path = self._path(key)  # a file has no media type: ``content_type`` is not kept
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f, 2**20)
            if if_absent:
                try:
                    os.link(tmp, path)  # atomic, and fails if the target exists
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
                tmp = ""
            return True
        finally:
            if tmp:
                os.unlink(tmp)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, hashlib.md5(data).hexdigest()

    def put_new(self, key: str, data: bytes) -> str | None:
        return hashlib.md5(data).hexdigest() if self.put(key, data, if_absent=True) else None

    def put_if_match(self, key: str, data: bytes, version: str) -> bool:
        return self.swap(key, data, version) is not None

    def swap(self, key: str, data: bytes, version: str) -> str | None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # An exclusive lock on a sidecar serialises CAS between processes of this machine.
        with open(path.parent / f".{path.name}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = hashlib.md5(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                return None
            if current != version:
                return None
            self.put(key, data)
            return hashlib.md5(data).hexdigest()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def url_for(self, key: str) -> str:
        return self.url + key  # keys are already checked relative paths; no Path() per row

    def urls_for(self, keys: list[str]) -> list[str]:
        """``[self.url_for(key) for key in keys]``, in one call (the merge names the sources of
        thousands of rows at a time). Raises ``TypeError`` for a key that is not a str."""
        url = self.url
        return [url + key for key in keys]


_s3_clients: dict[tuple[str | None, str | None, int], Any] = {}
_s3_lock = threading.Lock()
_loader: Any = None  # botocore's data loader, shared by every session (``s3_session``)
_loader_lock = threading.Lock()


def _timestamp(value: Any) -> Any:
    """botocore's timestamp parser, with S3's XML timestamps (``2026-01-01T00:00:00.000Z``: the
    ``LastModified`` of every listed key) read by ``datetime.fromisoformat`` and its HTTP dates
    (``Thu, 01 Jan 2026 00:00:00 GMT``: the ``Last-Modified`` header of every GET and HEAD) by
    ``email.utils.parsedate_to_datetime``, both UTC-aware. botocore reads them with dateutil:
    ~60% of a listing's CPU, and 47 us per GET against 3 us. Other forms go to botocore."""
    if isinstance(value, str):
        try:
            if value.endswith("Z"):
                return datetime.datetime.fromisoformat(value[:-1] + "+00:00")
            if value.endswith(" GMT"):
                return email.utils.parsedate_to_datetime(value)
        except (ValueError, TypeError):
            pass
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)


def s3_session() -> Any:
    """A new boto3 session whose clients read timestamps with ``_timestamp`` (the same datetimes,
    without dateutil's per-key cost when listing)."""
    import boto3
    import botocore.session

    global _loader
    core = botocore.session.get_session()
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
    # One loader for the process: each new session would read and parse S3's service model
    # again (~0.1 s of CPU per client; a CLI start builds several).
    with _loader_lock:
        if _loader is None:
            _loader = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _loader)
    return boto3.session.Session(botocore_session=core)


def s3_client(endpoint_url: str | None = None, region: str | None = None, pool: int = 32) -> Any:
    """A shared boto3 S3 client (thread-safe) for this endpoint; adaptive retries on throttling."""
    from botocore.config import Config

    k = (endpoint_url, region, pool)
    with _s3_lock:
        client = _s3_clients.get(k)
        if client is None:
            config = Config(
                max_pool_connections=pool,
                retries={"max_attempts": 8, "mode": "adaptive"},
                connect_timeout=10,
                read_timeout=60,
            )
            client = s3_session().client(
                "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
            )
            _s3_clients[k] = client
        return client


class S3Store:
    """A store rooted at ``s3://bucket/prefix/`` (AWS, or the endpoint in settings)."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.client = client
        self.url = f"s3://{bucket}/{prefix}"
        self.page_size = 1000  # keys per LIST request (S3's maximum)

    def _error(self, key: str, exc: Exception) -> StorageError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        cls = NotFound if code in ("NoSuchKey", "404", "NotFound") else StorageError
        return cls(f"{self.url_for(key)}: {code or type(exc).__name__}: {exc}")

    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        n = len(self.prefix)
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix,
                                       PaginationConfig={"PageSize": self.page_size}):
            for obj in page.get("Contents", ()):
                key, size = obj["Key"], obj["Size"]
                if size == 0 and key.endswith("/"):
                    continue  # a "folder" placeholder, not an object
                yield ObjectInfo(key[n:], size, obj.get("ETag") or None)

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            body = resp["Body"]
            if max_bytes is None:
                return body.read()
            try:
                length = resp.get("ContentLength")
                if length is not None and length > max_bytes:
                    raise TooLarge(f"{self.url_for(key)}: {length} bytes, more "
                                   f"than the {max_bytes} allowed")
                if length is not None:
                    # HTTP reads exactly Content-Length bytes and botocore checks the count:
                    # a plain read() spares urllib3's bounded read its extra buffer copy.
                    return body.read()
                # No length (a chunked answer): read in chunks, as a read of n would
                # allocate n bytes up front whatever the object's size.
                got = bytearray()
                for chunk in body.iter_chunks(_READ_CHUNK):
                    got += chunk
                    if len(got) > max_bytes:
                        raise TooLarge(f"{self.url_for(key)}: more than the {max_bytes} "
                                       "bytes allowed")
                data = bytes(got)
                # A read of a given size skips botocore's length check: do it here.
                if resp.get("ContentLength") not in (None, len(data)):
                    raise StorageError(f"{self.url_for(key)}: cut short ({len(data)} of "
                                       f"{resp['ContentLength']} bytes)")
                return data
            finally:
                body.close()  # unread bytes are dropped with the connection, not read
        except (ClientError, BotoCoreError) as exc:
            raise self._error(key, exc) from None

    def get_range(self, key: str, start: int, length: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        if length <= 0:
            return b""
        try:
            resp = self.client.get_object(
                Bucket=self.bucket, Key=self.prefix + key, Range=f"bytes={start}-{start + length - 1}"
            )
            return resp["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code == "InvalidRange":  # zero-byte object
                return b""
            raise self._error(key, exc) from None

    def put(self, key: str, data: bytes | IO[bytes], *, if_absent: bool = False,
            content_type: str | None = None) -> bool:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + key, "Body": data}
        if content_type:
            kwargs["ContentType"] = content_type
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        return self._put_object(key, kwargs) is not None

    def _put_object(self, key: str, kwargs: dict[str, Any]) -> str | None:
        """``put_object(**kwargs)``: the ETag S3 answered ("" from a store that sends none),
        or None when a create-if-absent (``IfNoneMatch``) found the key taken. Raises
        ``StorageError`` naming ``key``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.put_object(**kwargs).get("ETag", "")
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if "IfNoneMatch" in kwargs and (
                    status == 412 or exc.response["Error"]["Code"] == "PreconditionFailed"):
                return None
            raise self._error(key, exc) from None
        except BotoCoreError as exc:
            raise self._error(key, exc) from None

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return resp["Body"].read(), resp["ETag"]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(key, exc) from None

    def put_new(self, key: str, data: bytes) -> str | None:
        # S3's ETag answer, as ``swap`` keeps it.
        return self._put_object(key, {"Bucket": self.bucket, "Key": self.prefix + key,
                                      "Body": data, "IfNoneMatch": "*"})

    def put_if_match(self, key: str, data: bytes, version: str) -> bool:
        return self.swap(key, data, version) is not None

    def swap(self, key: str, data: bytes, version: str) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data,
                                          IfMatch=version)
            return resp["ETag"]  # not always the body's MD5 (SSE-KMS): S3's answer
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (404, 409, 412) or exc.response["Error"]["Code"] in (
                    "PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict"):
                return None
            raise self._error(key, exc) from None
        except BotoCoreError as exc:
            raise self._error(key, exc) from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise self._error(key, exc) from None

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def presigned_get(self, key: str, expires: int) -> str:
        """A presigned GET URL of ``key`` valid ``expires`` seconds. The URL is a secret: never
        log it or put it in task arguments."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.prefix + key},
            ExpiresIn=expires)

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def urls_for(self, keys: list[str]) -> list[str]:
        """``[self.url_for(key) for key in keys]``, in one call (the merge names the sources of
        thousands of rows at a time)."""
        url = f"s3://{self.bucket}/{self.prefix}"
        try:
            return [url + key for key in keys]
        except TypeError:  # a key that is not a str: url_for formats it
            return [self.url_for(key) for key in keys]


def normalize_url(url: str) -> str:
    """Canonical form of a store URL: ``s3://bucket/prefix/`` with one trailing slash, or an
    absolute local directory path ending in the separator.

    Raises ``ValueError`` for other schemes or an ``s3://`` URL without a bucket.
    """
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"{url!r}: an s3:// URL needs a bucket (s3://bucket/prefix/)")
        prefix = parsed.path.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return f"s3://{parsed.netloc}/{prefix}"
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        return str(Path(path).expanduser().resolve()) + os.sep
    raise ValueError(f"{url!r}: unsupported storage URL (use s3://bucket/prefix/ or a local path)")


def open_store(url: str, *, endpoint_url: str | None = None, region: str | None = None,
               pool: int = 32) -> Store:
    """Open the store rooted at ``url`` (see ``normalize_url``); S3 uses ``endpoint_url`` if set."""
    url = normalize_url(url)
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        return S3Store(bucket, prefix, s3_client(endpoint_url, region, pool))
    return LocalStore(url)
