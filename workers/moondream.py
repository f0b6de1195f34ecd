"""Client of the Moondream Batch API (seed ``002_b16f4baad5ce048b.txt``; docs.moondream.ai/batch).

Every call retries 408, 425, 429, 5xx and network errors with full-jitter exponential backoff
(0.5 s → 30 s, bounded attempts, the policy of Moondream's own fine-tuning client, FACTS.md), and
honours ``Retry-After``. Errors raised never contain the API key or a presigned URL: they name the
action, the HTTP status and the API's error code.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)
# httpx logs every request URL at INFO; presigned URLs must not reach the logs.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
T = TypeVar("T")


class MoondreamError(Exception):
    """A Batch API call failed. ``status`` is the HTTP status (None for network errors), ``code``
    the API's error code when it sent one; the message says which action failed and why."""

    def __init__(self, action: str, message: str, *, status: int | None = None,
                 code: str | None = None) -> None:
        self.action = action
        self.status = status
        self.code = code
        detail = f"HTTP {status}" if status else "network error"
        if code:
            detail += f" {code}"
        super().__init__(f"Moondream {action} failed ({detail}): {message}")


class AuthenticationError(MoondreamError):
    """401/403: the API key is missing or wrong. Retrying cannot help."""


class RequestRejected(MoondreamError):
    """A 4xx other than 408/425/429: the request itself is wrong. Retrying cannot help."""


class TransientError(MoondreamError):
    """429, 5xx or a network error that outlasted every retry; a later attempt may succeed."""


class AnswerLost(TransientError):
    """The request reached the service but its answer did not come back (the connection broke
    after sending), and the call is not safe to repeat: the service may have acted on it
    (``mpu-complete`` consumes the upload and creates a batch; FACTS.md)."""


# Network errors raised before the request left this machine: repeating it is always safe.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class Part(BaseModel):
    """A part of a multipart upload, as ``mpu-complete`` wants it."""

    model_config = ConfigDict(populate_by_name=True)
    part_number: int = Field(alias="partNumber")
    etag: str


class Upload(BaseModel):
    """Answer of ``mpu-create``."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")
    file_id: str = Field(alias="fileId")
    upload_id: str = Field(alias="uploadId")
    key: str | None = None


class OutputFile(BaseModel):
    """One result file of a completed batch; ``url`` is presigned and expires: never store it."""

    index: int
    url: str


class BatchStatus(BaseModel):
    """Answer of ``GET /v1/batch/:id`` (seed 002, "Poll for completion")."""

    model_config = ConfigDict(extra="allow")
    id: str
    status: str  # chunking | processing | completed | failed
    model: str | None = None
    progress: dict[str, int] = Field(default_factory=dict)
    usage: dict[str, int] | None = None
    outputs: list[OutputFile] = Field(default_factory=list)
    error: dict[str, Any] | str | None = None
    created_at: str | None = None
    completed_at: str | None = None
    expires_at: str | None = None

    @property
    def done(self) -> bool:
        """True once the batch is ``completed`` or ``failed``."""
        return self.status in ("completed", "failed")

    def error_code(self) -> str:
        """The batch-level error code (``processing_failed`` if the API gave none)."""
        if isinstance(self.error, dict):
            return str(self.error.get("code") or "processing_failed")
        return "processing_failed"

    def error_message(self) -> str:
        """The batch-level error message."""
        if isinstance(self.error, dict):
            return str(self.error.get("message") or self.error_code())
        return str(self.error or "batch failed")


def _epoch(iso: Any) -> float | None:
    """Unix seconds of an ISO 8601 time (``2025-01-10T12:00:00Z``), or None if unreadable."""
    import datetime

    if not isinstance(iso, str):
        return None
    try:
        value = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.timestamp()


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
    except ValueError:
        return None, response.text[:300]


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
        self._http = httpx.Client(
            headers={"X-Moondream-Auth": api_key, "User-Agent": "moonbatch"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            transport=httpx.HTTPTransport(retries=2),  # connect errors, before any byte is sent
        )
        # Presigned downloads carry their own auth: never send them our key.
        self._plain = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0),
                                   headers={"User-Agent": "moonbatch"})

    def close(self) -> None:
        """Close the connection pools."""
        self._http.close()
        self._plain.close()

    # -- retry loop -------------------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_max, self.backoff_initial * 2 ** attempt))

    def _call(self, action: str, send: Callable[[], httpx.Response],
              parse: Callable[[httpx.Response], T], *, repeat_after_lost_answer: bool = True,
              lost_answer_note: str | None = None) -> T:
        """Run ``send`` with retries; ``parse`` the first 2xx. Raises ``MoondreamError`` kinds.

        A network error after the request was sent may have lost an answer the service acted
        on: with ``repeat_after_lost_answer=False`` that raises ``AnswerLost`` at once instead
        of repeating the request; otherwise ``lost_answer_note`` (if given) is logged before the
        retry, saying what the lost answer may have left behind.
        """
        last: MoondreamError | None = None
        for attempt in range(self.max_attempts):
            try:
                response = send()
            except httpx.TransportError as exc:
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
                if response.is_success:
                    return parse(response)
                code, message = _api_error(response)
                status = response.status_code
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
            lambda r: Upload.model_validate(r.json()),
            lost_answer_note="an empty multipart upload may be left open at the service "
                             "(nothing can find it to abort it); creating another",
        )

    def upload_part(self, file_id: str, upload_id: str, part_number: int, data: bytes) -> Part:
        """``PUT /batch/:fileId?action=mpu-uploadpart`` with ``data`` (< 100 MB) → its ETag."""
        def parse(r: httpx.Response) -> Part:
            body = r.json()
            return Part(partNumber=int(body.get("partNumber", part_number)), etag=body["etag"])

        return self._call(
            f"mpu-uploadpart (part {part_number})",
            lambda: self._http.put(
                f"{self.base_url}/batch/{file_id}",
                params={"action": "mpu-uploadpart", "uploadId": upload_id, "partNumber": part_number},
                content=data, headers={"Content-Type": "application/octet-stream"},
            ),
            parse,
        )

    def complete_upload(self, file_id: str, upload_id: str, parts: list[Part],
                        model: str | None = None) -> BatchStatus:
        """``POST /batch/:fileId?action=mpu-complete`` with the parts (and optional model) →
        the new batch (status ``chunking``).

        Not repeated once sent: it consumes the upload, so a repeat after a lost answer gets
        404 while the batch it created runs on. Raises ``AnswerLost`` then (find the batch with
        ``find_batches``), ``RequestRejected`` with status 404 if the upload is gone.
        """
        body: dict[str, Any] = {"parts": [p.model_dump(by_alias=True) for p in parts]}
        if model:
            body["model"] = model
        return self._call(
            "mpu-complete",
            lambda: self._http.post(f"{self.base_url}/batch/{file_id}",
                                    params={"action": "mpu-complete", "uploadId": upload_id},
                                    json=body),
            lambda r: BatchStatus.model_validate(r.json()),
            repeat_after_lost_answer=False,
        )

    def abort_upload(self, file_id: str, upload_id: str) -> None:
        """``DELETE /batch/:fileId?action=mpu-abort``; an unknown upload counts as aborted."""
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
        """``GET /batch/:id`` → status, progress, usage and (when completed) output URLs."""
        return self._call(
            "batch status",
            lambda: self._http.get(f"{self.base_url}/batch/{batch_id}"),
            lambda r: BatchStatus.model_validate(r.json()),
        )

    def list_batches(self, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        """``GET /batch?limit&cursor`` → ``{"batches", "next_cursor", "has_more"}``."""
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self._call("list batches",
                          lambda: self._http.get(f"{self.base_url}/batch", params=params),
                          lambda r: r.json())

    def iter_batches(self) -> Iterator[dict[str, Any]]:
        """Every batch of the account, following ``next_cursor``."""
        cursor = None
        while True:
            page = self.list_batches(limit=100, cursor=cursor)
            yield from page.get("batches", [])
            cursor = page.get("next_cursor")
            if not page.get("has_more") or not cursor:
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
            created = _epoch(batch.created_at)
            if created is not None and created < since:
                break
            found.append(batch)
        return found

    def download(self, output: OutputFile) -> bytes:
        """The bytes of one result file, from its presigned URL (no API key sent)."""
        return self._call(f"download of output {output.index}",
                          lambda: self._plain.get(output.url), lambda r: r.content)
