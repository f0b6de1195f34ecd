"""Client of the real-time Moondream API (FACTS.md "Moondream real-time API"; the official
client ``moondream`` 2.6.1, ``moondream/cloud_vl.py``, class ``CloudVL``, is the reference).

    POST {base}/caption | /query | /detect | /point | /segment   JSON body → JSON answer

``X-Moondream-Auth: <key>`` is sent when a key is configured, and only to the origin of the
configured base URL (``moonbatch.workers.origins``); redirects are never followed. Errors are
``{"error": {"message", "type", "param", "code"}}`` (400, 401, 413, 429, 500), read liberally.

One call is one attempt: the provider's round steps retry (429 and 5xx with back-off, honouring
``Retry-After``) so no worker slot sleeps on a back-off. Errors carry the skill, the HTTP status
and the API's code and message (cut short); never the key or the body sent (a data URI).
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from moonbatch.workers import metrics, origins
from moonbatch.workers.providers import ProviderError, TransientProviderError

PROVIDER = "moondream-realtime"  # its metric label (``RealtimeProvider.name``)
SKILLS = ("caption", "query", "detect", "point", "segment")
#: Client actions → the ``endpoint`` label of its metrics (one per route).
METRIC_ACTIONS = {s: s for s in SKILLS}
USER_AGENT = "moonbatch"


class RealtimeError(ProviderError):
    """A call failed. ``status``: HTTP status (None: network); ``code``/``detail``: the API's
    error code and message (None when it gave none)."""

    def __init__(self, skill: str, detail: str, *, status: int | None = None,
                 code: str | None = None) -> None:
        self.skill, self.status, self.code, self.detail = skill, status, code, detail
        what = f"HTTP {status}" if status else "network error"
        super().__init__(f"real-time {skill} failed ({what}{' ' + code if code else ''}): "
                         f"{detail}")


class RealtimeTransient(RealtimeError, TransientProviderError):
    """5xx, 408, a dropped connection or a time-out: send it again later."""


class RealtimeLimited(RealtimeTransient):
    """429: the key's rate limit. ``retry_after``: seconds, when the answer gave them."""

    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class RealtimeAuthError(RealtimeError):
    """401/403: the key is missing or wrong; no request of the run can succeed."""


class RealtimeRejected(RealtimeError):
    """Any other 4xx (or a redirect): the API refused this request (bad input, too large)."""


def _detail(response: httpx.Response) -> tuple[str, str | None]:
    """``(message, code)`` of an error answer, read liberally."""
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or "error", None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or response.reason_phrase
            code = err.get("code") or err.get("type")
            return str(message)[:300], (str(code)[:60] if code else None)
        return str(err)[:300], None
    return str(body)[:300], None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


class RealtimeClient:
    """Calls the real-time API at ``base_url`` (``.../v1``) with ``key`` (None: no key, a
    Moondream Station); thread-safe (a pooled httpx client). ``timeout``: seconds per call."""

    def __init__(self, base_url: str, key: str | None, *, timeout: float = 60.0,
                 pool: int = 64) -> None:
        self.base_url = base_url.rstrip("/")
        self.origin = origins.origin(self.base_url)
        headers = {"User-Agent": USER_AGENT}
        if key:
            headers["X-Moondream-Auth"] = key
        self._http = httpx.Client(
            timeout=timeout, headers=headers, follow_redirects=False,
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            transport=httpx.HTTPTransport(retries=1))  # retries failed connects only

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def call(self, skill: str, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST {base}/{skill}`` with ``payload``; the answer's JSON object.

        Raises ``RealtimeLimited`` (429), ``RealtimeTransient`` (5xx, 408, network, an answer
        that is not a JSON object), ``RealtimeAuthError`` (401/403), ``RealtimeRejected``
        (other 4xx, redirects), ``ValueError`` for a skill that is not a route."""
        if skill not in SKILLS:
            raise ValueError(f"not a real-time skill: {skill!r}")
        url = f"{self.base_url}/{skill}"
        if not origins.same_origin(url, self.origin):  # cannot happen; the last check
            raise RealtimeRejected(skill, "URL off the configured origin: not sent")
        started = time.monotonic()
        try:
            response = self._http.post(url, json=payload)
        except httpx.TransportError as exc:
            metrics.api_call(PROVIDER, metrics.endpoint_label(skill, METRIC_ACTIONS), None,
                             time.monotonic() - started)
            raise RealtimeTransient(skill, type(exc).__name__) from None
        status = response.status_code
        metrics.api_call(PROVIDER, metrics.endpoint_label(skill, METRIC_ACTIONS), status,
                         time.monotonic() - started)
        if status < 300:
            try:
                body = response.json()
            except ValueError:
                raise RealtimeTransient(skill, "answer is not JSON", status=status) from None
            if not isinstance(body, dict):
                raise RealtimeTransient(skill, "answer is not an object", status=status)
            return body
        if status < 400:
            raise RealtimeRejected(skill, "answered a redirect; not followed", status=status)
        message, code = _detail(response)
        if status in (401, 403):
            raise RealtimeAuthError(skill, message, status=status, code=code)
        if status == 429:
            raise RealtimeLimited(skill, message, status=status, code=code,
                                  retry_after=_retry_after(response))
        if status >= 500 or status in (408, 425):
            raise RealtimeTransient(skill, message, status=status, code=code)
        raise RealtimeRejected(skill, message, status=status, code=code)
