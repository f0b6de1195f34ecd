"""Worker logs: plain text by default, one JSON object per line with ``MOONBATCH_LOG_FORMAT=json``.

A JSON line carries ``ts``, ``level``, ``logger``, ``message`` and the context of the task that
logged it: ``task``, ``task_id``, ``run``, ``shard``, ``round`` (from the task's arguments),
``provider`` (once the run is opened), and ``batch_id`` or ``request_id`` when the call names
one (``log.info(..., extra={"batch_id": ...})``). Messages never hold a key or a presigned URL
by construction; as a second guard the formatter redacts anything shaped like a URL signature
or a data URI.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
from typing import Any

# The context of the task this thread runs (set by the task_prerun signal in workers.tasks).
# Never mutated in place: ``bind`` and the signal handlers set a new dict.
context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "moonbatch_log", default={})  # noqa: B039
_RECORD_FIELDS = ("batch_id", "request_id")
_SECRETS = re.compile(r"(?i)((?:x-amz-)?signature=|x-amz-credential=|sig=)[^&\s\"']+"
                      r"|data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+")


def redact(text: str) -> str:
    """``text`` with URL signatures and data URIs replaced by ``[redacted]``."""
    return _SECRETS.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


def bind(**fields: Any) -> None:
    """Add ``fields`` (e.g. ``provider="fal"``) to this task's log context."""
    context.set({**context.get(), **{k: v for k, v in fields.items() if v is not None}})


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": redact(record.getMessage())}
        doc.update(context.get())
        for name in _RECORD_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["error"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, ensure_ascii=False, default=str)


def use_json(logger: logging.Logger) -> None:
    """Give every handler of ``logger`` the JSON formatter."""
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
