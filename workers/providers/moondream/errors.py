"""Errors of the Batch API client: each names the action, the HTTP status and the API's error
code, never the key or a presigned URL (seed 002, "Errors")."""

from __future__ import annotations

import http

from moonbatch.workers import origins
from moonbatch.workers.providers import ProviderError, TransientProviderError


class MoondreamError(ProviderError):
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


class TransientError(MoondreamError, TransientProviderError):
    """429, 5xx or a network error that outlasted every retry; a later attempt may succeed."""


class AnswerLost(TransientError):
    """The request reached the service but its answer did not come back (the connection broke
    after sending), and the call is not safe to repeat: the service may have acted on it
    (``mpu-complete`` consumes the upload and creates a batch; FACTS.md)."""


class InvalidId(MoondreamError):
    """A batch or file id that is not one path segment of the API's alphabet: nothing was sent.
    Ids come from OUTPUT's documents, so one that is wrong means a document was altered."""

    def __init__(self, action: str, what: str) -> None:
        self.action, self.status, self.code = action, None, "invalid_id"
        ProviderError.__init__(
            self, f"Moondream {action} not sent: the {what} recorded in OUTPUT (batch.json or "
            "upload.json) is not an id the Batch API gives (one path segment of letters, digits, "
            "'.', '_', '-'): the document was altered; restore it, or run again into a new OUTPUT")


class ForeignOrigin(MoondreamError):
    """A keyed request aimed at another origin than ``base_url``'s: nothing was sent."""

    def __init__(self, expected: str) -> None:
        self.action, self.status, self.code = "request", None, "foreign_origin"
        ProviderError.__init__(
            self, f"Moondream request not sent: its URL is not on MOONBATCH_MOONDREAM_URL's "
            f"origin ({expected}), and MOONDREAM_API_KEY goes nowhere else")


def checked_id(value: object, action: str, what: str) -> str:
    rid = origins.path_id(value)
    if rid is None:
        raise InvalidId(action, what)
    return rid


def status_phrase(status: int) -> str:
    """The standard reason of an HTTP status (what a failed download keeps of the answer)."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "error"


class UnexpectedAnswer(TransientError):
    """A 2xx answer without what the call needs (not JSON, no ``id``/``status``, no ETag). The
    message names the missing field, never the body (it may hold presigned URLs)."""
