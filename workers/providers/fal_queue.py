"""Client of fal.ai's queue API (FACTS.md "fal queue API"; seeds 000, 001, 003, 004).

    POST {queue}/{endpoint_id}        → {request_id, status_url, response_url, cancel_url, ...}
    GET  status_url                   → 202 IN_QUEUE | IN_PROGRESS, 200 COMPLETED
    GET  response_url                 → 200 the output, or the request's error
    PUT  cancel_url                   → 202 CANCELLATION_REQUESTED | 4xx ALREADY_COMPLETED, NOT_FOUND

Every call sends ``Authorization: Key <FAL_KEY>``. The URLs a submit answer returns are used as
given (they drop the endpoint's sub-path). Calls are short and retried only a little here (GETs
twice, on 5xx and network errors): the caller works in steps and tries again at its next step,
so no worker slot sleeps. Errors carry the action, the HTTP status and fal's ``error_type`` or
422 ``detail``; never the key, a presigned URL or a data URI.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import httpx

from workers import metrics
from workers.providers import ProviderError, TransientProviderError

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs request URLs at INFO


class FalError(ProviderError):
    """A fal call failed. ``status``: HTTP status (None: network); ``error_type``: fal's."""

    def __init__(self, action: str, message: str, *, status: int | None = None,
                 error_type: str | None = None) -> None:
        self.action, self.status, self.error_type = action, status, error_type
        detail = f"HTTP {status}" if status else "network error"
        if error_type:
            detail += f" {error_type}"
        super().__init__(f"fal {action} failed ({detail}): {message}")


class FalTransient(FalError, TransientProviderError):
    """5xx, a dropped connection or a time-out: try again later. ``maybe_sent``: the request
    may have reached fal (a submit whose answer was lost may have created a request)."""

    def __init__(self, *args: Any, maybe_sent: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.maybe_sent = maybe_sent


class FalLimited(FalTransient):
    """429: the account's concurrency limit. Back off; ``retry_after`` seconds when given."""

    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class FalAuthError(FalError):
    """401/403: ``FAL_KEY`` is missing or wrong."""


class FalGone(FalError):
    """404: fal no longer knows the request (its result outlived the retention, FACTS.md)."""


class FalRequestError(FalError):
    """The request itself failed: its result GET answered an error. ``fields`` lists the 422
    validation errors as ``"field: message"`` (empty for other errors)."""

    def __init__(self, *args: Any, fields: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields = fields or []


@dataclasses.dataclass(frozen=True)
class Submitted:
    """A queued request: its id and the URLs the submit answer gave."""

    request_id: str
    status_url: str
    response_url: str
    cancel_url: str
    queue_position: int | None = None


@dataclasses.dataclass(frozen=True)
class QueueStatus:
    """A status answer: ``status`` is ``IN_QUEUE``, ``IN_PROGRESS`` or ``COMPLETED`` (anything
    else is kept as sent and treated as still running); ``error``/``error_type`` are set when a
    COMPLETED request failed."""

    status: str
    queue_position: int | None = None
    error: str | None = None
    error_type: str | None = None

    @property
    def completed(self) -> bool:
        return self.status == "COMPLETED"


def _detail(response: httpx.Response) -> tuple[str, str | None, list[str]]:
    """``(message, error_type, fields)`` of an error answer, read liberally."""
    error_type = response.headers.get("x-fal-error-type")
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or "error", error_type, []
    if not isinstance(body, dict):
        return str(body)[:300], error_type, []
    error_type = body.get("error_type") or error_type
    detail = body.get("detail")
    fields: list[str] = []
    if isinstance(detail, list):  # 422: [{loc, msg, type}]
        for entry in detail:
            if isinstance(entry, dict):
                loc = [str(p) for p in entry.get("loc") or [] if p != "body"]
                fields.append(f"{'.'.join(loc) or 'input'}: {entry.get('msg') or entry.get('type')}")
        return "; ".join(fields)[:500] or "invalid input", error_type, fields
    return str(detail or body.get("error") or response.reason_phrase)[:300], error_type, fields


def _json_object(action: str, response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a 2xx answer; anything else is a garbled answer: ``FalTransient``."""
    try:
        body = response.json()
    except ValueError:
        raise FalTransient(action, "answer is not JSON") from None
    if not isinstance(body, dict):
        raise FalTransient(action, "answer is not an object")
    return body


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


class FalQueueClient:
    """Calls fal's queue at ``queue_url`` with ``key``; thread-safe (one pooled httpx client).

    ``timeout`` is per call in seconds; GETs are tried ``get_attempts`` times on 5xx and
    network errors, ``backoff`` seconds apart (doubling)."""

    def __init__(self, queue_url: str, key: str, *, timeout: float = 30.0,
                 get_attempts: int = 2, backoff: float = 0.2, pool: int = 64) -> None:
        self.queue_url = queue_url.rstrip("/")
        self.get_attempts, self.backoff = get_attempts, backoff
        self._http = httpx.Client(
            timeout=timeout, headers={"Authorization": f"Key {key}", "User-Agent": "moonbatch"},
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            transport=httpx.HTTPTransport(retries=1))  # retries failed connects only

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _send(self, action: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One call; turns transport failures and error statuses into ``FalError`` kinds."""
        started = time.monotonic()
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            metrics.api_call("fal", action, None, time.monotonic() - started)
            # A request that was written may have arrived: only a failed connect proves not.
            sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
            raise FalTransient(action, type(exc).__name__, maybe_sent=sent) from None
        metrics.api_call("fal", action, response.status_code, time.monotonic() - started)
        if response.status_code < 400:
            return response
        message, error_type, fields = _detail(response)
        status = response.status_code
        if status in (401, 403):
            raise FalAuthError(action, "FAL_KEY was refused", status=status)
        if status == 404:
            raise FalGone(action, message, status=status, error_type=error_type)
        if status == 429:
            raise FalLimited(action, message, status=status, error_type=error_type,
                             retry_after=_retry_after(response))
        if status == 422 or (status < 500 and status != 408):
            raise FalRequestError(action, message, status=status, error_type=error_type,
                                  fields=fields)
        raise FalTransient(action, message, status=status, error_type=error_type,
                           maybe_sent=True)

    def _get(self, action: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.get_attempts):
            try:
                return self._send(action, "GET", url, **kwargs)
            except FalTransient as exc:
                if attempt + 1 == self.get_attempts:
                    raise
                metrics.http_retry(exc.status or "network")
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def submit(self, endpoint: str, payload: dict[str, Any]) -> Submitted:
        """Queue a request on ``endpoint`` (e.g. ``fal-ai/moondream3-preview/caption``).

        Not retried here: a lost answer may have created a request (``FalTransient.maybe_sent``).
        Raises ``FalLimited`` (429), ``FalTransient``, ``FalAuthError``, ``FalRequestError``.
        """
        response = self._send("submit", "POST", f"{self.queue_url}/{endpoint}", json=payload)
        try:
            body = response.json()
            rid = str(body["request_id"])
        except (ValueError, KeyError, TypeError):
            raise FalTransient("submit", "answer without a request_id", maybe_sent=True) from None
        base = f"{self.queue_url}/{'/'.join(endpoint.split('/')[:2])}/requests/{rid}"
        position = body.get("queue_position")
        return Submitted(
            request_id=rid,
            status_url=body.get("status_url") or f"{base}/status",
            response_url=body.get("response_url") or base,
            cancel_url=body.get("cancel_url") or f"{base}/cancel",
            queue_position=position if isinstance(position, int) else None)

    def status(self, status_url: str) -> QueueStatus:
        """The request's status. Raises ``FalGone`` (404: forgotten), ``FalTransient``."""
        body = _json_object("status", self._get("status", status_url))
        status = str(body.get("status") or "").upper() or "IN_PROGRESS"
        position = body.get("queue_position")
        error = body.get("error")
        return QueueStatus(status=status,
                           queue_position=position if isinstance(position, int) else None,
                           error=str(error)[:500] if error else None,
                           error_type=body.get("error_type") or None)

    def result(self, response_url: str) -> dict[str, Any]:
        """The request's output. Raises ``FalRequestError`` (the request failed: 422 with
        ``fields``, or its error), ``FalGone`` (404), ``FalTransient`` (5xx: a transient
        failure, or the error of a request that COMPLETED with one)."""
        return _json_object("result", self._get("result", response_url))

    def download(self, url: str) -> bytes:
        """The bytes of a File an output points to (e.g. ``captions_file``; ``data:`` URIs are
        decoded). Raises ``FalGone``, ``FalTransient``, ``FalRequestError``."""
        if url.startswith("data:"):
            import base64
            from urllib.parse import unquote_to_bytes

            header, _, payload = url[5:].partition(",")
            return base64.b64decode(payload) if header.endswith(";base64") \
                else unquote_to_bytes(payload)
        return self._get("file download", url).content

    def cancel(self, cancel_url: str) -> str:
        """Ask fal to cancel the request: ``CANCELLATION_REQUESTED``, ``ALREADY_COMPLETED`` or
        ``NOT_FOUND`` (the last two are not errors here). Raises ``FalTransient``."""
        try:
            response = self._send("cancel", "PUT", cancel_url)
        except FalGone:
            return "NOT_FOUND"
        except FalRequestError:
            return "ALREADY_COMPLETED"
        try:
            return str(response.json().get("status") or "CANCELLATION_REQUESTED")
        except (ValueError, AttributeError):
            return "CANCELLATION_REQUESTED"
