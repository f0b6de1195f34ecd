"""The Batch API's answers, read liberally (seed 002; FACTS.md: "Treat every field as optional
except `id` and `status`"): nulls, extra fields, floats or numeric strings for counts, plain URL
strings as outputs and statuses the seed does not name are tolerated; what is not understood is
skipped and logged once per process and kind of oddity (never a URL or a body)."""

from __future__ import annotations

import logging
import math
import re
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)


# -- liberal reading of answers ----------------------------------------------------------------
# The seed shows one shape per answer; FACTS.md: "Treat every field as optional except `id` and
# `status`". What is not understood is skipped and logged once per process and kind of oddity.
KNOWN_STATUSES = frozenset({"chunking", "processing", "completed", "failed"})
_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str, *args: object) -> None:
    """Log ``message`` at WARNING the first time ``key`` is seen in this process. Callers pass
    field names, type names and sanitised tokens only: never a URL or a body."""
    with _warned_lock:
        if key in _warned or len(_warned) >= 256:  # bounded: keys may carry API-chosen tokens
            return
        _warned.add(key)
    log.warning(message, *args)


def safe_token(value: object) -> str:
    """An API-chosen word made safe to log: letters, digits, ``_``/``-``, at most 40."""
    return re.sub(r"[^A-Za-z0-9_-]", "", str(value))[:40] or "?"


def as_count(value: object, where: str) -> int | None:
    """A non-negative count read liberally: an int; a float truncated (``1500.5`` → 1500); a
    numeric string parsed (``"12"``, ``"12.0"``). None for None/absent, and (with a warning
    naming ``where``) for bools, negatives, NaN/inf and anything else."""
    if value is None:
        return None
    number: float | int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        number = value if math.isfinite(value) else None
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            try:
                number = float(value.strip())
            except ValueError:
                number = None
            if number is not None and not math.isfinite(number):
                number = None
    if number is None or number < 0:
        _warn_once(f"count:{where}:{type(value).__name__}",
                   "Batch API answer: %s is not a count (a %s); ignored", where, type(value).__name__)
        return None
    return int(number)


def _usable_url(value: object) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://"))


class Part(BaseModel):
    """A part of a multipart upload, as ``mpu-complete`` wants it."""

    model_config = ConfigDict(populate_by_name=True)
    part_number: int = Field(alias="partNumber")
    etag: str


def _id_text(value: object) -> object:
    """Ids given as numbers are read as text (bools are not ids)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Upload(BaseModel):
    """Answer of ``mpu-create`` (seed 002, "Initialize upload"): only ``fileId`` and ``uploadId``
    are needed; ``key`` and any other field are kept as sent (possibly None)."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")
    file_id: str = Field(alias="fileId", min_length=1)
    upload_id: str = Field(alias="uploadId", min_length=1)
    key: Any = None

    _ids = field_validator("file_id", "upload_id", mode="before")(_id_text)


class OutputFile(BaseModel):
    """One result file of a completed batch; ``url`` is presigned and expires: never store or
    log it (it is left out of the repr)."""

    index: int
    url: str = Field(repr=False)


def _outputs(value: object) -> list[OutputFile]:
    """``outputs`` as the seed shows it (``[{"index", "url"}]``) or liberally: plain URL strings
    (index = position), dicts missing a usable ``index`` (index = position). Entries without a
    usable http(s) URL are skipped with a warning; duplicate indices → every index = position."""
    if value is None:
        return []
    if not isinstance(value, list):
        _warn_once(f"outputs:{type(value).__name__}",
                   "Batch API answer: outputs is a %s, not a list; ignored", type(value).__name__)
        return []
    files: list[OutputFile] = []
    for position, entry in enumerate(value):
        if isinstance(entry, OutputFile):
            files.append(entry)
            continue
        url = entry.get("url") if isinstance(entry, dict) else entry
        if not _usable_url(url):
            _warn_once(f"outputs-entry:{type(entry).__name__}:{type(url).__name__}",
                       "Batch API answer: an outputs entry (a %s) has no usable URL; skipped",
                       type(entry).__name__)
            continue
        index = None
        if isinstance(entry, dict) and entry.get("index") is not None:
            index = as_count(entry["index"], "outputs[].index")
        files.append(OutputFile(index=position if index is None else index, url=url))
    if len({f.index for f in files}) < len(files):
        _warn_once("outputs:duplicate-index",
                   "Batch API answer: output indices repeat; numbering the files by position")
        files = [OutputFile(index=i, url=f.url) for i, f in enumerate(files)]
    return files


class BatchStatus(BaseModel):
    """Answer of ``GET /v1/batch/:id`` and ``mpu-complete`` (seed 002, "Poll for completion",
    "Get batch status"; FACTS.md "Moondream Batch API").

    Only ``id`` and ``status`` are required; every other field may be absent, null or oddly
    shaped and is kept as sent (``progress``, ``usage``, ``error``: raw JSON values). Read them
    through the accessors, which never raise:

    - ``total``: lines in the batch, int, or None when not known yet (no progress while
      chunking); ``completed``, ``failed``: ints, 0 when absent (``failed`` appears only once a
      line failed). Numbers may come as floats (truncated) or numeric strings (parsed).
    - ``input_tokens``, ``output_tokens``: the batch's usage, int or None when absent.
    - ``outputs``: normalised to ``[OutputFile(index, url)]`` (see ``_outputs``).
    - ``done``: True only for ``completed`` and ``failed``; any other status (``chunking``,
      ``processing``, or one the seed does not name) means "poll again".

    What is not understood is logged at WARNING once per process, without values or URLs.
    """

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1)
    status: str = Field(min_length=1)  # chunking | processing | completed | failed | (unknown)
    model: Any = None
    progress: Any = None
    usage: Any = None
    outputs: list[OutputFile] = Field(default_factory=list)
    error: Any = None
    created_at: Any = None
    completed_at: Any = None
    expires_at: Any = None

    _id = field_validator("id", mode="before")(_id_text)
    _outputs = field_validator("outputs", mode="before")(_outputs)

    @model_validator(mode="after")
    def _note_odd_shapes(self) -> BatchStatus:
        if self.status not in KNOWN_STATUSES:
            _warn_once(f"status:{safe_token(self.status)}",
                       "Batch API status %r is not one the seed names; polling again",
                       safe_token(self.status))
        for name in ("progress", "usage"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                _warn_once(f"{name}:{type(value).__name__}",
                           "Batch API answer: %s is a %s, not an object; ignored", name,
                           type(value).__name__)
        return self

    def _number(self, group: str, key: str) -> int | None:
        values = getattr(self, group)
        return as_count(values.get(key), f"{group}.{key}") if isinstance(values, dict) else None

    @property
    def total(self) -> int | None:
        """``progress.total`` (lines in the batch), or None when the answer has none."""
        return self._number("progress", "total")

    @property
    def completed(self) -> int:
        """``progress.completed`` (lines done, failed ones excluded), 0 when absent."""
        return self._number("progress", "completed") or 0

    @property
    def failed(self) -> int:
        """``progress.failed`` (lines that ended in an error row), 0 when absent."""
        return self._number("progress", "failed") or 0

    @property
    def input_tokens(self) -> int | None:
        """``usage.input_tokens`` of the whole batch, or None when absent."""
        return self._number("usage", "input_tokens")

    @property
    def output_tokens(self) -> int | None:
        """``usage.output_tokens`` of the whole batch, or None when absent."""
        return self._number("usage", "output_tokens")

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


def epoch_seconds(iso: Any) -> float | None:
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
