"""Where a key may go: the origin of a configured service URL, and ids safe to put in its paths.

A provider's key is sent only to the origin (scheme, host, port) of the base URL it was
configured with (``MOONBATCH_FAL_QUEUE_URL``, ``MOONBATCH_MOONDREAM_URL``). Request URLs are
built from that base and ids read from storage or from answers, so an id must be one path
segment that cannot climb out of its place or add a query (``path_id``); ``same_origin`` is
the last check before a keyed request leaves. URLs read from a run's OUTPUT are never called
with a key: whoever can write OUTPUT could otherwise point them at themselves.
"""

from __future__ import annotations

import re

import httpx

# One path segment: letters, digits, '.', '_', '-', starting with a letter or digit (so never
# '.' or '..'), and no '..' anywhere. UUIDs (fal request ids) and ULIDs (Batch API ids) fit.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def path_id(value: object) -> str | None:
    """``value`` as an id safe to interpolate into a URL path (one segment, see ``_ID``), or
    None when it is not one (not a string, empty, too long, or holding ``/ ? # % ..``,
    whitespace or any other character)."""
    if isinstance(value, str) and _ID.fullmatch(value) and ".." not in value:
        return value
    return None


def origin(url: str | httpx.URL) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an http(s) URL, the host lower-cased and the default port
    filled in. Raises ``ValueError`` for any other scheme or a URL without a host."""
    u = url if isinstance(url, httpx.URL) else httpx.URL(url)
    scheme = u.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not u.host:
        raise ValueError("not an http(s) URL with a host")
    return scheme, u.host.lower(), u.port or _DEFAULT_PORTS[scheme]


def same_origin(url: str | httpx.URL, expected: tuple[str, str, int]) -> bool:
    """True if ``url`` is on ``expected`` (an ``origin``); False for another origin and for
    anything that is not an http(s) URL."""
    try:
        return origin(url) == expected
    except (ValueError, httpx.InvalidURL):
        return False


def describe(expected: tuple[str, str, int]) -> str:
    """``scheme://host:port`` of an origin, for messages (an origin holds no secret)."""
    return f"{expected[0]}://{expected[1]}:{expected[2]}"
