"""Item references as data: syntax checks, the local-file and bucket rules, and how a
reference is shown without its secrets. Pure: no I/O but ``os.path.realpath``.

An image reference read from a manifest or a Parquet file was written by someone else. Before
a worker reads one:

- it must be well formed (``check_syntax``; ``InvalidReference``): no NUL or other control
  character, an ``http(s)`` URL with a host that is a valid DNS name or an IP address (labels
  of 1-63 characters, 253 in all) and a port within 1..65535, an ``s3://`` URI with a bucket
  name and a key, an absolute ``file://`` path;
- a local file (``file://``, an absolute path) is read only when the run's INPUT is itself a
  local file or folder on this machine, or when it lies in a folder of
  ``MOONBATCH_ALLOW_LOCAL_FILES`` (``local_file_refusal``);
- an ``s3://`` URI may name any bucket, unless ``MOONBATCH_ITEM_BUCKETS`` lists the buckets
  allowed besides INPUT's own (``bucket_refusal``);
- ``http(s)`` addresses are checked at connect time (``moonbatch.workers.netguard``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import httpx

LOCAL_FILES_SETTING = "MOONBATCH_ALLOW_LOCAL_FILES"
BUCKETS_SETTING = "MOONBATCH_ITEM_BUCKETS"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Bucket names S3 and S3-compatibles accept (legacy buckets may hold capitals and underscores).
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#@]*@")


class InvalidReference(ValueError):
    """An image reference that is not well formed; the message names the defect."""


def show(ref: str, limit: int = 200) -> str:
    """``ref`` as it may appear in a row, an error or a log: an http(s) URL without user
    info, query string or fragment, control characters escaped, at most ``limit`` characters.
    Never raises."""
    text = str(ref)
    if text[:8].lower().startswith(("http://", "https://")):
        text = _USERINFO.sub(r"\1", text.split("?", 1)[0].split("#", 1)[0])
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_syntax(ref: str) -> None:
    """Raise ``InvalidReference`` unless ``ref`` (an ``http(s)://``, ``s3://`` or
    ``file://`` reference, or a key) is well formed (see the module docstring)."""
    if _CONTROL.search(ref):
        raise InvalidReference("it holds a control character (NUL, newline...)")
    lower = ref[:8].lower()
    if lower.startswith(("http://", "https://")):
        check_http_url(ref)
    elif lower.startswith("s3://"):
        bucket, _, key = ref[5:].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise InvalidReference(f"{bucket[:70]!r} is not a bucket name")
        if not key:
            raise InvalidReference("it names no object (s3://bucket/key)")
    elif lower.startswith("file://") and not ref[7:].startswith("/"):
        raise InvalidReference("a file:// URL needs an absolute path (file:///abs/path)")


def check_http_url(url: str) -> httpx.URL:
    """The parsed URL of an http(s) item reference; ``InvalidReference`` naming the defect
    (an unparsable URL, no host, a host that is neither a DNS name nor an IP address, a
    label longer than 63 characters, a port outside 1..65535)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
        raise InvalidReference(f"not a URL ({show(str(exc), 120)})") from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidReference("not an http(s) URL")
    host = parsed.raw_host.decode("ascii", "replace")
    if not host:
        raise InvalidReference("the URL has no host")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise InvalidReference(f"port {parsed.port} is outside 1..65535")
    if ":" not in host:  # not an IPv6 literal (httpx checked those)
        name = host.rstrip(".")
        if len(name) > 253:
            raise InvalidReference("the host name is longer than 253 characters")
        for label in name.split("."):
            if not _DNS_LABEL.fullmatch(label):
                raise InvalidReference(
                    f"host label {show(label, 70)!r} is not a DNS label (1-63 letters, digits "
                    "or hyphens)")
    return parsed


def parse_folders(text: str | None) -> tuple[str, ...]:
    """The folders of a ``MOONBATCH_ALLOW_LOCAL_FILES`` value (comma-separated absolute
    paths; ``/`` for any), each resolved and ending in ``/``. Raises ``ValueError`` naming a
    relative entry."""
    folders = []
    for entry in (e.strip() for e in (text or "").split(",")):
        if not entry:
            continue
        if not entry.startswith("/"):
            raise ValueError(f"{LOCAL_FILES_SETTING}: {entry!r} is not an absolute folder: give "
                             "absolute paths (/data/images), / for any")
        folders.append(os.path.realpath(entry).rstrip("/") + "/")
    return tuple(folders)


def local_file_refusal(path: str, *, local_input: bool, folders: Iterable[str]) -> str | None:
    """Why the local file ``path`` (absolute) may not be read, or None when it may: a run
    whose INPUT is local reads any; otherwise only files whose real path (symlinks followed)
    is in one of ``folders``."""
    if local_input:
        return None
    real = os.path.realpath(path)
    if any(real.startswith(f) for f in folders):
        return None
    return (f"file://{show(path)}: local files are read only for a manifest on the workers' "
            "own disk (this run's INPUT is on S3): to allow a folder, set "
            f"{LOCAL_FILES_SETTING}=/that/folder on the workers")


def parse_buckets(text: str | None) -> frozenset[str]:
    """The bucket names of a ``MOONBATCH_ITEM_BUCKETS`` value (comma-separated). Raises
    ``ValueError`` naming an entry that is not a bucket name."""
    names = frozenset(e.strip() for e in (text or "").split(",") if e.strip())
    for name in names:
        if not _BUCKET.fullmatch(name):
            raise ValueError(f"{BUCKETS_SETTING}: {name!r} is not a bucket name: give bucket "
                             "names, comma-separated")
    return names


def bucket_refusal(bucket: str, *, allowed: frozenset[str], input_bucket: str | None
                   ) -> str | None:
    """Why ``s3://bucket/...`` may not be read, or None: any bucket when ``allowed`` is
    empty; else INPUT's own bucket and those of ``allowed``."""
    if not allowed or bucket in allowed or bucket == input_bucket:
        return None
    return (f"bucket {bucket!r} is not one item references may name: add it to "
            f"{BUCKETS_SETTING} on the workers")
