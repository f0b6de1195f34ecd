"""Client of fal.ai's queue API (FACTS.md "fal queue API"; seeds 000, 001, 003, 004).

    POST {queue}/{endpoint_id}                       → {request_id, ...}
    GET  {queue}/{owner}/{alias}/requests/{id}/status → 202 IN_QUEUE | IN_PROGRESS, 200 COMPLETED
    GET  {queue}/{owner}/{alias}/requests/{id}        → 200 the output, or the request's error
    PUT  {queue}/{owner}/{alias}/requests/{id}/cancel → 202 CANCELLATION_REQUESTED | 4xx ...

Every queue call sends ``Authorization: Key <FAL_KEY>``, and only to the origin of the
configured ``queue_url``: status, result and cancel URLs are built from the endpoint and the
request id at each use (the endpoint's sub-path dropped, as fal's own URLs do), never taken from
a submit answer or from storage (a run's ledger is in OUTPUT, which others may be able to write),
and a request id must be one safe path segment (``moonbatch.workers.origins.path_id``; fal's are UUIDs).
Redirects are never followed with the key. Files an output points to (``captions_file``) are
downloaded by a second client that holds no key, size-capped, within a deadline.

Calls are short and retried only a little here (GETs twice, on 5xx and network errors): the
caller works in steps and tries again at its next step, so no worker slot sleeps. Errors carry
the action, the HTTP status and fal's ``error_type`` or 422 ``detail``; never the key, a
presigned URL, a data URI or the body a file host answered.
"""

from __future__ import annotations

import base64
import dataclasses
import http
import logging
import time
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx

from moonbatch.workers import metrics, origins
from moonbatch.workers.providers import ProviderError, TransientProviderError

log = logging.getLogger(__name__)

logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs request URLs at INFO

#: Client actions → the ``endpoint`` label of its metrics.
METRIC_ACTIONS = {"submit": "submit", "status": "status", "result": "result",
                  "file download": "download", "cancel": "cancel"}
MAX_FILE_BYTES = 16_000_000  # an output file (captions of 32 images are a few KB)


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


class FalNotSent(FalError):
    """A call refused before anything was sent; ``status`` and ``error_type`` are None."""

    def __init__(self, action: str, message: str) -> None:
        self.action, self.status, self.error_type = action, None, None
        ProviderError.__init__(self, f"fal {action} not sent: {message}")


class FalBadRequestId(FalNotSent):
    """A request id that cannot be fal's (not one safe path segment): nothing was sent."""


class FalForeignOrigin(FalNotSent):
    """A keyed call aimed at another origin than the configured queue's: nothing was sent."""


class FalGone(FalError):
    """404: fal no longer knows the request (its result outlived the retention, FACTS.md)."""


class FalRequestError(FalError):
    """The request itself failed: its result GET answered an error. ``fields`` lists the 422
    validation errors as ``"field: message"`` (empty for other errors)."""

    def __init__(self, *args: Any, fields: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields = fields or []


#: The provider options (``RunSpec.provider_options``) fal takes, and their values.
PRIORITIES = ("normal", "low")
OPTIONS = ("priority", "store_io", "request_timeout")


def queue_headers(options: dict[str, Any]) -> dict[str, str]:
    """The queue headers of a run's provider options (docs.fal.ai "common parameters";
    FACTS.md "fal queue API"), sent with every submit: ``priority`` → ``X-Fal-Queue-Priority``
    (``normal``|``low``), ``store_io`` (default False) → ``X-Fal-Store-IO: 0`` unless True
    (payloads kept 30 days otherwise), ``request_timeout`` (seconds a request may wait to start)
    → ``X-Fal-Request-Timeout``. Options not set send no header, except ``X-Fal-Store-IO``."""
    headers = {"X-Fal-Store-IO": "1" if options.get("store_io") else "0"}
    if options.get("priority"):
        headers["X-Fal-Queue-Priority"] = str(options["priority"])
    if options.get("request_timeout") is not None:
        headers["X-Fal-Request-Timeout"] = f"{float(options['request_timeout']):g}"
    return headers


@dataclasses.dataclass(frozen=True)
class Submitted:
    """A queued request: its id (the URLs are ``FalQueueClient.urls`` of it)."""

    request_id: str
    queue_position: int | None = None


@dataclasses.dataclass(frozen=True)
class RequestUrls:
    """The queue URLs of one request, on the configured queue's origin."""

    status: str
    result: str
    cancel: str


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


def _record_call(action: str, status: int | None, started: float) -> None:
    """Metrics of one call: its action's label, HTTP status (None: no answer), duration."""
    metrics.api_call("fal", metrics.endpoint_label(action, METRIC_ACTIONS), status,
                     time.monotonic() - started)


def _json_object(action: str, response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a 2xx answer; anything else is a garbled answer: ``FalTransient``."""
    try:
        body = response.json()
    except ValueError:
        raise FalTransient(action, "answer is not JSON") from None
    if not isinstance(body, dict):
        raise FalTransient(action, "answer is not an object")
    return body


def _phrase(status: int) -> str:
    """The standard reason of an HTTP status: what a file host's error keeps (never its body,
    which may quote a signed URL)."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "error"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


_noted_other_urls = False


def _note_other_urls() -> None:
    """Warn once per process that fal answered status URLs of another form than those built
    here: a change of fal's protocol to notice (polls would answer 404), never to follow."""
    global _noted_other_urls
    if not _noted_other_urls:
        _noted_other_urls = True
        log.warning("fal's submit answer names a status URL other than "
                    "{queue}/{owner}/{alias}/requests/{id}/status on MOONBATCH_FAL_QUEUE_URL; "
                    "moonbatch builds its own and sends FAL_KEY nowhere else (if polls answer "
                    "404, fal's URL scheme changed)")


class FalQueueClient:
    """Calls fal's queue at ``queue_url`` with ``key``; thread-safe (pooled httpx clients).

    ``timeout`` is per call in seconds; GETs are tried ``get_attempts`` times on 5xx and
    network errors, ``backoff`` seconds apart (doubling). File downloads (``download``) read at
    most ``max_file_bytes`` within ``timeout`` seconds in all, without the key."""

    def __init__(self, queue_url: str, key: str, *, timeout: float = 30.0,
                 get_attempts: int = 2, backoff: float = 0.2, pool: int = 64,
                 max_file_bytes: int = MAX_FILE_BYTES) -> None:
        self.queue_url = queue_url.rstrip("/")
        self.origin = origins.origin(self.queue_url)
        self.get_attempts, self.backoff = get_attempts, backoff
        self.timeout, self.max_file_bytes = timeout, max_file_bytes
        self._http = httpx.Client(
            timeout=timeout, headers={"Authorization": f"Key {key}", "User-Agent": "moonbatch"},
            follow_redirects=False,  # httpx keeps Authorization on an http→https hop elsewhere
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            transport=httpx.HTTPTransport(retries=1))  # retries failed connects only
        # Output files live on fal's CDN, which needs no key: a client that has none to leak.
        self._files = httpx.Client(timeout=timeout, headers={"User-Agent": "moonbatch"},
                                   follow_redirects=True, max_redirects=5)

    def close(self) -> None:
        """Close the connection pools."""
        self._http.close()
        self._files.close()

    def urls(self, endpoint: str, request_id: object) -> RequestUrls:
        """The status, result and cancel URLs of request ``request_id`` of ``endpoint`` (e.g.
        ``fal-ai/moondream-next/batch`` → ``{queue}/fal-ai/moondream-next/requests/{id}``).
        Raises ``FalBadRequestId`` when the id, or the endpoint's owner/alias, is not one
        safe path segment each."""
        rid = origins.path_id(request_id)
        app = endpoint.split("/")[:2]
        if rid is None or len(app) < 2 or not all(origins.path_id(p) for p in app):
            raise FalBadRequestId("request", "the request id recorded in OUTPUT's requests.json "
                                  "is not a fal request id (one path segment of letters, "
                                  "digits, '-', '_'): the document was altered")
        root = f"{self.queue_url}/{app[0]}/{app[1]}/requests/{rid}"
        return RequestUrls(status=f"{root}/status", result=root, cancel=f"{root}/cancel")

    def _send(self, action: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One keyed call; turns transport failures and error statuses into ``FalError``
        kinds. Refuses (``FalForeignOrigin``) a URL off the configured queue's origin."""
        if not origins.same_origin(url, self.origin):
            raise FalForeignOrigin(action, "the URL is not on MOONBATCH_FAL_QUEUE_URL's origin "
                                   f"({origins.describe(self.origin)}), and FAL_KEY goes "
                                   "nowhere else")
        started = time.monotonic()
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            _record_call(action, None, started)
            # A request that was written may have arrived: only a failed connect proves not.
            sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
            raise FalTransient(action, type(exc).__name__, maybe_sent=sent) from None
        _record_call(action, response.status_code, started)
        if response.status_code < 300:
            return response
        if response.status_code < 400:  # a redirect: never followed with the key
            raise FalRequestError(action, f"answered a redirect ({_phrase(response.status_code)})"
                                  "; not followed", status=response.status_code)
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

    def _retried(self, action: str, call: Any) -> Any:
        """``call()``, tried ``get_attempts`` times on ``FalTransient``."""
        for attempt in range(self.get_attempts):
            try:
                return call()
            except FalTransient as exc:
                if attempt + 1 == self.get_attempts:
                    raise
                metrics.http_retry(exc.status or "network")
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def _get(self, action: str, url: str, **kwargs: Any) -> httpx.Response:
        return self._retried(action, lambda: self._send(action, "GET", url, **kwargs))

    def submit(self, endpoint: str, payload: dict[str, Any],
               headers: dict[str, str] | None = None) -> Submitted:
        """Queue a request on ``endpoint`` (e.g. ``fal-ai/moondream3-preview/caption``) with
        the run's queue ``headers`` (``queue_headers``).

        Not retried here: a lost answer may have created a request (``FalTransient.maybe_sent``).
        An answer whose ``request_id`` is missing or not a safe id counts as lost. Raises
        ``FalLimited`` (429), ``FalTransient``, ``FalAuthError``, ``FalRequestError``.
        """
        response = self._send("submit", "POST", f"{self.queue_url}/{endpoint}", json=payload,
                              headers=headers)
        try:
            body = response.json()
            rid = origins.path_id(str(body["request_id"]))
        except (ValueError, KeyError, TypeError):
            rid = None
        if rid is None:
            raise FalTransient("submit", "answer without a usable request_id", maybe_sent=True)
        given = body.get("status_url")
        if given and given != self.urls(endpoint, rid).status:
            _note_other_urls()
        position = body.get("queue_position")
        return Submitted(request_id=rid,
                         queue_position=position if isinstance(position, int) else None)

    def status(self, endpoint: str, request_id: object) -> QueueStatus:
        """The request's status. Raises ``FalGone`` (404: forgotten), ``FalTransient``,
        ``FalBadRequestId``."""
        url = self.urls(endpoint, request_id).status
        body = _json_object("status", self._get("status", url))
        status = str(body.get("status") or "").upper() or "IN_PROGRESS"
        position = body.get("queue_position")
        error = body.get("error")
        return QueueStatus(status=status,
                           queue_position=position if isinstance(position, int) else None,
                           error=str(error)[:500] if error else None,
                           error_type=body.get("error_type") or None)

    def result(self, endpoint: str, request_id: object) -> dict[str, Any]:
        """The request's output. Raises ``FalRequestError`` (the request failed: 422 with
        ``fields``, or its error), ``FalGone`` (404), ``FalTransient`` (5xx: a transient
        failure, or the error of a request that COMPLETED with one), ``FalBadRequestId``."""
        return self.result_billed(endpoint, request_id)[0]

    def result_billed(self, endpoint: str, request_id: object
                      ) -> tuple[dict[str, Any], float | None]:
        """``result`` and the request's ``X-Fal-Billable-Units`` (None when fal did not say;
        FACTS.md "fal queue API"). Raises as ``result``."""
        url = self.urls(endpoint, request_id).result
        response = self._get("result", url)
        try:
            units: float | None = float(response.headers["x-fal-billable-units"])
        except (KeyError, ValueError):
            units = None
        return _json_object("result", response), units

    def cancel(self, endpoint: str, request_id: object) -> str:
        """Ask fal to cancel the request: ``CANCELLATION_REQUESTED``, ``ALREADY_COMPLETED`` or
        ``NOT_FOUND`` (the last two are not errors here). Raises ``FalTransient``,
        ``FalBadRequestId``."""
        url = self.urls(endpoint, request_id).cancel
        try:
            response = self._send("cancel", "PUT", url)
        except FalGone:
            return "NOT_FOUND"
        except FalRequestError:
            return "ALREADY_COMPLETED"
        try:
            return str(response.json().get("status") or "CANCELLATION_REQUESTED")
        except (ValueError, AttributeError):
            return "CANCELLATION_REQUESTED"

    def download(self, url: str) -> bytes:
        """The bytes of a File an output points to (e.g. ``captions_file``), read without the
        key; ``data:`` URIs are decoded. At most ``max_file_bytes``, within ``timeout`` seconds
        in all. Raises ``FalGone`` (404/410), ``FalTransient`` (5xx, network, too slow),
        ``FalRequestError`` (other answers, too large, not an http(s) URL); their messages keep
        the status and its standard reason, never the body."""
        if url[:5].lower() == "data:":
            header, _, payload = url[5:].partition(",")
            if len(payload) > 2 * self.max_file_bytes:
                raise FalRequestError("file download", f"larger than {self.max_file_bytes} bytes")
            try:
                data = base64.b64decode(payload) if header.lower().endswith(";base64") \
                    else unquote_to_bytes(payload)
            except ValueError:
                raise FalRequestError("file download", "data URI is not base64") from None
            if len(data) > self.max_file_bytes:
                raise FalRequestError("file download", f"larger than {self.max_file_bytes} bytes")
            return data
        if not url[:8].lower().startswith(("http://", "https://")):
            raise FalRequestError("file download", "not an http(s) URL")
        return self._retried("file download", lambda: self._fetch_file(url))

    def _fetch_file(self, url: str) -> bytes:
        action, cap = "file download", self.max_file_bytes
        started = time.monotonic()
        deadline = started + self.timeout
        status: int | None = None
        try:
            with self._files.stream("GET", url) as response:
                status = response.status_code
                if status >= 400:
                    kind = FalGone if status in (404, 410) else FalTransient \
                        if status >= 500 or status in (408, 429) else FalRequestError
                    raise kind(action, _phrase(status), status=status)
                if int(response.headers.get("content-length") or 0) > cap:
                    raise FalRequestError(action, f"larger than {cap} bytes", status=status)
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise FalRequestError(action, f"larger than {cap} bytes", status=status)
                    if time.monotonic() > deadline:
                        raise FalTransient(action, f"not done within {self.timeout:g}s")
                    chunks.append(chunk)
        except httpx.TooManyRedirects:
            raise FalRequestError(action, "too many redirects") from None
        except httpx.HTTPError as exc:  # str(exc) may quote the URL: the type says enough
            raise FalTransient(action, type(exc).__name__) from None
        finally:
            _record_call(action, status, started)
        return b"".join(chunks)
