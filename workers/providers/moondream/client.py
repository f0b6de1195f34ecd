"""Client of the Moondream Batch API (seed ``002_b16f4baad5ce048b.txt``; docs.moondream.ai/batch).

Every call retries 408, 425, 429, 5xx and network errors with full-jitter exponential backoff
(0.5 s → 30 s, bounded attempts, the policy of Moondream's own fine-tuning client, FACTS.md), and
honours ``Retry-After``. Errors raised never contain the API key or a presigned URL: they name the
action, the HTTP status and the API's error code; a failed result-file download keeps only the
status and its standard reason (a storage service's error body may quote the signed request).

The key (``X-Moondream-Auth``) goes only to the origin of ``base_url``: every keyed request is
checked before it leaves (``ForeignOrigin``), redirects are never followed with it (httpx would
carry a custom header to any host), and ids interpolated into paths (batch and file ids, read
from OUTPUT's documents or from answers) must be one safe path segment (``InvalidId``). Result
files are read from their presigned URLs by a second client that holds no key.

Answers are read liberally (``answers``); errors are in ``errors``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
from pydantic import ValidationError

from moonbatch.workers import metrics, origins
from moonbatch.workers.providers.moondream.answers import (
    BatchStatus,
    OutputFile,
    Part,
    Upload,
    epoch_seconds,
    safe_token,
)
from moonbatch.workers.providers.moondream.errors import (
    AnswerLost,
    AuthenticationError,
    ForeignOrigin,
    MoondreamError,
    RequestRejected,
    TransientError,
    UnexpectedAnswer,
    checked_id,
    status_phrase,
)

log = logging.getLogger(__name__)
# httpx logs every request URL at INFO; presigned URLs must not reach the logs.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

#: Client actions (``BatchClient._call``) → the ``endpoint`` label of its metrics.
METRIC_ACTIONS = {"mpu-create": "mpu-create", "mpu-uploadpart": "mpu-uploadpart",
                  "mpu-complete": "mpu-complete", "mpu-abort": "mpu-abort",
                  "batch status": "batch-status", "list batches": "batch-list",
                  "download of output": "download"}
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
T = TypeVar("T")
SEND_SLICE = 1 << 20  # bytes of a part handed to the HTTP client at a time


def _record_call(action: str, status: int | None, started: float) -> None:
    """Metrics of one call: its action's label, HTTP status (None: no answer), duration."""
    metrics.api_call("moondream", metrics.endpoint_label(action, METRIC_ACTIONS), status,
                     time.monotonic() - started)


# Network errors raised before the request left this machine: repeating it is always safe.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _api_error(response: httpx.Response) -> tuple[str | None, str]:
    """(code, message) from ``{"error": {"message", "code", ...}}`` or the raw body."""
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(err, dict):
            return err.get("code") or err.get("type"), str(err.get("message") or "")[:300]
        return None, str(err)[:300]
    except ValueError:  # an HTML page from a proxy, say: the status says enough
        return None, status_phrase(response.status_code)


def _download_error(response: httpx.Response) -> tuple[str | None, str]:
    """(code, reason) of a failed presigned download: the error code of a JSON
    ``{"error": {"code"}}`` or an S3/R2 XML ``<Code>`` body, reduced to a safe token, and the
    status's standard reason. Nothing else of the body: S3's may quote the string it signed."""
    code: object = None
    try:
        body = response.json()
        err = body.get("error") if isinstance(body, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
    except ValueError:
        found = re.search(rb"<Code>([^<]{1,64})</Code>", response.content[:4096])
        code = found.group(1).decode("ascii", "replace") if found else None
    return (safe_token(code) if code else None), status_phrase(response.status_code)


def _new_batch(body: dict[str, Any]) -> dict[str, Any]:
    """An ``mpu-complete`` answer made a status: ``status`` defaults to ``chunking``."""
    status = body.get("status")
    return {**body, "status": status if isinstance(status, str) and status else "chunking"}


def _parsed(action: str, parse: Callable[[httpx.Response], T], response: httpx.Response) -> T:
    """``parse(response)``, with an unreadable answer raised as ``UnexpectedAnswer`` naming the
    fields at fault (never their values: a status body holds presigned URLs)."""
    try:
        return parse(response)
    except ValidationError as exc:
        where = ", ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['type']}"
                          for e in exc.errors()[:5])
        raise UnexpectedAnswer(action, f"answer not understood ({where})",
                               status=response.status_code) from None
    except ValueError:  # JSON decoding
        raise UnexpectedAnswer(action, "answer is not JSON", status=response.status_code) from None


def _json_object(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object (a non-object counts as an empty one)."""
    body = response.json()
    return body if isinstance(body, dict) else {}


class BatchClient:
    """Thread-safe client of one Batch API base URL (e.g. ``https://api.moondream.ai/v1``).

    ``max_attempts`` bounds the tries of one call; ``sleep`` is injectable for tests of the
    backoff policy (the HTTP side is never mocked).
    """

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 60.0,
                 max_attempts: int = 10, backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._sleep = sleep
        self.origin = origins.origin(self.base_url)
        self._http = httpx.Client(
            headers={"X-Moondream-Auth": api_key, "User-Agent": "moonbatch"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            transport=httpx.HTTPTransport(retries=2),  # connect errors, before any byte is sent
            # httpx keeps custom headers such as X-Moondream-Auth on a redirect to any host.
            follow_redirects=False,
            event_hooks={"request": [self._check_origin]},
        )
        # Presigned downloads carry their own auth: a client with no key to send. A storage
        # service may redirect (a CDN): that is followed, keyless.
        self._plain = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0),
                                   headers={"User-Agent": "moonbatch"}, follow_redirects=True,
                                   max_redirects=5)

    def _check_origin(self, request: httpx.Request) -> None:
        """Refuse, before it is sent, a keyed request off ``base_url``'s origin."""
        if not origins.same_origin(request.url, self.origin):
            raise ForeignOrigin(origins.describe(self.origin))

    def close(self) -> None:
        """Close the connection pools."""
        self._http.close()
        self._plain.close()

    # -- retry loop -------------------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_max, self.backoff_initial * 2 ** attempt))

    def _call(self, action: str, send: Callable[[], httpx.Response],
              parse: Callable[[httpx.Response], T], *, repeat_after_lost_answer: bool = True,
              lost_answer_note: str | None = None, keyed: bool = True) -> T:
        """Run ``send`` with retries; ``parse`` the first 2xx. Raises ``MoondreamError`` kinds.

        A network error after the request was sent may have lost an answer the service acted
        on: with ``repeat_after_lost_answer=False`` that raises ``AnswerLost`` at once instead
        of repeating the request; otherwise ``lost_answer_note`` (if given) is logged before the
        retry, saying what the lost answer may have left behind. ``keyed=False`` (presigned
        downloads): an error keeps the status, the storage service's error code and the
        status's standard reason, never the body (``_download_error``).
        """
        last: MoondreamError | None = None
        for attempt in range(self.max_attempts):
            started = time.monotonic()
            try:
                response = send()
            except httpx.TooManyRedirects:
                raise RequestRejected(action, "too many redirects") from None
            except httpx.TransportError as exc:
                _record_call(action, None, started)
                retry_reason: int | BaseException = exc
                # str(exc) may quote the URL; keep only the exception type.
                if not isinstance(exc, _NOT_SENT):
                    if not repeat_after_lost_answer:
                        raise AnswerLost(action, f"{type(exc).__name__} after the request was "
                                         "sent: the service may have acted on it") from None
                    if lost_answer_note:
                        log.warning("%s: answer lost (%s); %s", action, type(exc).__name__,
                                    lost_answer_note)
                last = TransientError(action, type(exc).__name__)
                wait = self._backoff(attempt)
            else:
                _record_call(action, response.status_code, started)
                retry_reason = response.status_code
                if response.is_success:
                    return _parsed(action, parse, response)
                status = response.status_code
                if response.is_redirect:
                    raise RequestRejected(action, "answered a redirect, not followed" + (
                        " with the API key" if keyed else ""), status=status)
                code, message = _api_error(response) if keyed else _download_error(response)
                if status in (401, 403):
                    raise AuthenticationError(action, message or "unauthorised", status=status,
                                              code=code)
                if status not in RETRY_STATUS:
                    raise RequestRejected(action, message, status=status, code=code)
                last = TransientError(action, message, status=status, code=code)
                hinted = _retry_after(response)
                wait = hinted if hinted is not None else self._backoff(attempt)
            if attempt + 1 < self.max_attempts:
                log.info("%s; retry %d/%d in %.2fs", last, attempt + 1, self.max_attempts - 1, wait)
                metrics.http_retry(retry_reason)
                self._sleep(min(wait, 300.0))
        assert last is not None
        raise last

    # -- protocol ---------------------------------------------------------------------------
    def create_upload(self) -> Upload:
        """``POST /batch?action=mpu-create`` → ``Upload(file_id, upload_id)``.

        Repeated when its answer is lost: the upload the lost answer named is orphaned at the
        service (it holds no part, and nothing can find it to abort it); that is logged.
        """
        return self._call(
            "mpu-create",
            lambda: self._http.post(f"{self.base_url}/batch", params={"action": "mpu-create"}),
            lambda r: Upload.model_validate(_json_object(r)),
            lost_answer_note="an empty multipart upload may be left open at the service "
                             "(nothing can find it to abort it); creating another",
        )

    def upload_part(self, file_id: str, upload_id: str, part_number: int, data: bytes) -> Part:
        """``PUT /batch/:fileId?action=mpu-uploadpart`` with ``data`` (< 100 MB) → its ETag."""
        def parse(r: httpx.Response) -> Part:
            # Only the ETag is needed (the part number is ours); R2/S3 also send it as a header.
            etag = _json_object(r).get("etag") or r.headers.get("etag")
            if not isinstance(etag, str) or not etag.strip():
                raise UnexpectedAnswer(f"mpu-uploadpart (part {part_number})",
                                       "answer has no etag", status=r.status_code)
            return Part(partNumber=part_number, etag=etag)

        def body() -> Iterator[memoryview]:
            # Sent in slices (a new generator per try): httpcore's write loop copies what is
            # left of a buffer after each partial send (``buffer[n:]``), so a part handed over
            # whole was copied again and again, up to a second part per upload in flight.
            view = memoryview(data)
            for start in range(0, len(view), SEND_SLICE):
                yield view[start:start + SEND_SLICE]

        action = f"mpu-uploadpart (part {part_number})"
        file_id = checked_id(file_id, action, "file id")
        return self._call(
            action,
            lambda: self._http.put(
                f"{self.base_url}/batch/{file_id}",
                params={"action": "mpu-uploadpart", "uploadId": upload_id, "partNumber": part_number},
                # An explicit length: httpx then sends the iterator as is, not chunked.
                content=body(), headers={"Content-Type": "application/octet-stream",
                                         "Content-Length": str(len(data))},
            ),
            parse,
        )

    def complete_upload(self, file_id: str, upload_id: str, parts: list[Part],
                        model: str | None = None) -> BatchStatus:
        """``POST /batch/:fileId?action=mpu-complete`` with the parts (and optional model) →
        the new batch. Only its ``id`` is needed: a missing or null ``status`` reads as
        ``chunking`` (where the seed says a new batch starts), ``size`` may be absent.

        Not repeated once sent: it consumes the upload, so a repeat after a lost answer gets
        404 while the batch it created runs on. Raises ``AnswerLost`` then (find the batch with
        ``find_batches``), ``RequestRejected`` with status 404 if the upload is gone.
        """
        file_id = checked_id(file_id, "mpu-complete", "file id")
        body: dict[str, Any] = {"parts": [p.model_dump(by_alias=True) for p in parts]}
        if model:
            body["model"] = model
        return self._call(
            "mpu-complete",
            lambda: self._http.post(f"{self.base_url}/batch/{file_id}",
                                    params={"action": "mpu-complete", "uploadId": upload_id},
                                    json=body),
            lambda r: BatchStatus.model_validate(_new_batch(_json_object(r))),
            repeat_after_lost_answer=False,
        )

    def abort_upload(self, file_id: str, upload_id: str) -> None:
        """``DELETE /batch/:fileId?action=mpu-abort``; an unknown upload counts as aborted, and
        so does a file id that cannot be the API's (nothing is sent for it)."""
        if origins.path_id(file_id) is None:
            log.warning("mpu-abort not sent: the file id recorded in upload.json is not an id "
                        "the Batch API gives (the document was altered)")
            return
        try:
            self._call(
                "mpu-abort",
                lambda: self._http.delete(f"{self.base_url}/batch/{file_id}",
                                          params={"action": "mpu-abort", "uploadId": upload_id}),
                lambda r: None,
            )
        except RequestRejected as exc:
            if exc.status != 404:
                raise

    def get_batch(self, batch_id: str) -> BatchStatus:
        """``GET /batch/:id`` → status, progress, usage and (when completed) output URLs.
        Raises ``InvalidId`` (nothing sent) for an id that is not one safe path segment."""
        batch_id = checked_id(batch_id, "batch status", "batch id")
        return self._call(
            "batch status",
            lambda: self._http.get(f"{self.base_url}/batch/{batch_id}"),
            lambda r: BatchStatus.model_validate(_json_object(r)),
        )

    def list_batches(self, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        """``GET /batch?limit&cursor`` → ``{"batches", "next_cursor", "has_more"}`` as sent (each
        batch a raw dict: read one with ``BatchStatus.model_validate``)."""
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self._call("list batches",
                          lambda: self._http.get(f"{self.base_url}/batch", params=params),
                          _json_object)

    def iter_batches(self) -> Iterator[dict[str, Any]]:
        """Every batch of the account (raw dicts), following ``next_cursor``; a null
        ``batches`` is an empty page, entries that are not objects are skipped."""
        cursor = None
        while True:
            page = self.list_batches(limit=100, cursor=cursor)
            batches = page.get("batches")
            yield from (b for b in batches if isinstance(b, dict)) if isinstance(batches, list) else ()
            cursor = page.get("next_cursor")
            if not page.get("has_more") or not isinstance(cursor, str) or not cursor:
                return

    def find_batches(self, since: float) -> list[BatchStatus]:
        """Batches of the account created at or after ``since`` (unix seconds), newest first,
        read from ``GET /batch`` pages until an older batch shows (seed 002, "List batches":
        newest first with ``created_at``). Entries without a readable ``created_at`` are kept.
        """
        found: list[BatchStatus] = []
        for entry in self.iter_batches():
            try:
                batch = BatchStatus.model_validate(entry)
            except ValueError:
                log.warning("list batches: skipped an entry without id or status")
                continue
            created = epoch_seconds(batch.created_at)
            if created is not None and created < since:
                break
            found.append(batch)
        return found

    def result_ids(self, batch: BatchStatus) -> set[str]:
        """The ``id`` of every row in the first result file of a completed batch (from fresh
        URLs), the fingerprint of what was sent (seed 002: ids are "returned in results").
        Empty when the batch has no output or its rows carry no id."""
        fresh = self.get_batch(batch.id)
        if not fresh.outputs:
            return set()
        ids: set[str] = set()
        for raw in self.download(fresh.outputs[0]).splitlines():
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("id") is not None:
                ids.add(str(row["id"]))
        return ids

    def download(self, output: OutputFile) -> bytes:
        """The bytes of one result file, from its presigned URL (no API key sent; redirects
        followed). An error keeps the HTTP status and its standard reason, never the body."""
        return self._call(f"download of output {output.index}",
                          lambda: self._plain.get(output.url), lambda r: r.content, keyed=False)
