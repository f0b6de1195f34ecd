"""An emulator of fal.ai's queue API for the seven Moondream endpoints, served next to the Batch API.

Protocol (FACTS.md "fal queue API"; seeds 000, 001, 003, 004):

- ``POST {base}/{endpoint_id}`` with the input JSON and ``Authorization: Key <key>`` → 200
  ``{request_id, response_url, status_url, cancel_url, status: "IN_QUEUE", queue_position}``.
  The three URLs are absolute, built from the request's host, and drop the endpoint's sub-path:
  ``{base}/fal-ai/moondream-next/requests/{id}/status`` for ``fal-ai/moondream-next/batch``.
- ``GET status_url[?logs=1]`` → 202 ``IN_QUEUE`` (``queue_position``, 0-indexed) or 202
  ``IN_PROGRESS`` (``logs``: a list with ``logs=1``, else null), 200 ``COMPLETED`` (``logs``,
  ``metrics``, and ``error``/``error_type`` when the request failed). No other status exists.
- ``GET response_url`` → 200 the output; a failed request answers its error: 422
  ``{"detail": [{loc, msg, type}]}`` for invalid input, 500/503/504 ``{"detail", "error_type"}``
  (and ``X-Fal-Error-Type``) for runner failures, 400 ``client_cancelled`` for a cancelled
  request (an emulator choice: fal only says a cancelled request completes with an error). Asked
  before completion: 400 ``{"detail": "Request is still in progress"}``.
- ``PUT cancel_url`` → 202 ``CANCELLATION_REQUESTED`` (queued or running; the request completes
  with the cancellation error at once), 400 ``ALREADY_COMPLETED``, 404 ``NOT_FOUND``.
- Every queue answer carries ``x-fal-request-id``. A wrong or missing key → 401 ``{"detail"}``.
- Results are kept ``result_ttl`` seconds after completion (``result_ttl_large`` when the result
  body is 10 KB or more; fal docs "queue/result" via FACTS.md); then status, result and cancel
  answer 404.

Input is validated when the request runs, as fal does for queue requests (the submit is always
accepted; a bad input comes back as a COMPLETED request whose result is a 422). The emulator does
the work at submit time (fetching ``http(s)``/``data:`` URLs, unzipping archives, computing the
answer) and reveals it when the clock says the request completed: what a client observes is the
same.

Scheduling: per key at most ``FalConfig.concurrency`` requests run at once, in submit order (a
request sent with ``X-Fal-Queue-Priority: low`` lets every ``normal`` one waiting at the time a
slot frees go first); the others wait ``IN_QUEUE`` with a decreasing ``queue_position``. A request
sent with ``X-Fal-Request-Timeout: S`` that has not started S seconds after its submit completes
then with 504 ``request_timeout``, never having run. Every request keeps the ``X-Fal-*`` headers
of its submit (``_Req.headers``, lower-case names: ``x-fal-queue-priority``, ``x-fal-store-io``,
``x-fal-request-timeout``) and the ``model_id`` it ran (``_Req.model``), for tests to check. A
request runs ``processing_seconds`` per image (one image for the single-image endpoints). Start
and end times are computed from timestamps whenever the key's queue is observed, so a request
starts when a slot frees whether or not anyone polls it. ``FalEmulation.clock`` is the time source
(tests may swap in a manual clock).

Answers are ``emulator.inference`` computed from the decoded pixels; ``expected_output`` gives
what any endpoint answers for given arguments and image bytes, so a test can recompute it.

Faults (``FalFaults``, none by default) are counted in ``FalEmulation.injected``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import io
import json
import math
import posixpath
import random
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import httpx
from flask import Flask, Response, request

from moonbatch.emulator.inference import LineError, fingerprint_bytes, infer

#: The endpoints served, with the kind of work each does.
ENDPOINTS: dict[str, str] = {
    "fal-ai/moondream3-preview/caption": "caption",
    "fal-ai/moondream3-preview/query": "query",
    "fal-ai/moondream3-preview/detect": "detect",
    "fal-ai/moondream3-preview/point": "point",
    "fal-ai/moondream2/visual-query": "visual-query",
    "fal-ai/moondream/batched": "batched",
    "fal-ai/moondream-next/batch": "next-batch",
}

#: Keys of ``FalEmulation.injected``.
FAL_FAULT_KINDS = ("429", "503", "drop", "lost_submit", "error", "expired")

#: Request error types (fal docs "Request Error Types", FACTS.md) → (HTTP status, detail).
REQUEST_ERRORS: dict[str, tuple[int, str]] = {
    "request_timeout": (504, "Request timed out"),
    "startup_timeout": (504, "Runner did not start within the allowed time"),
    "runner_scheduling_failure": (503, "No runner could be allocated to handle the request"),
    "runner_connection_timeout": (503, "The connection to the runner timed out"),
    "runner_disconnected": (503, "The runner disconnected unexpectedly"),
    "internal_server_error": (500, "Internal server error"),
}
RUNNER_ERROR_TYPES = ("runner_scheduling_failure", "runner_connection_timeout", "runner_disconnected")
CANCELLED = (400, {"detail": "Request was cancelled by the user", "error_type": "client_cancelled"})

MAX_BATCH_IMAGES = 32  # fal-ai/moondream-next/batch (seed 000)
MAX_IMAGE_SIDE = 7000  # moondream3-preview (seed 004)
BATCHED_MODELS = ("vikhyatk/moondream2", "fal-ai/moondream2-docci")  # seed 001
DEFAULT_BATCHED_PROMPT = "Describe this image."  # seed 001


@dataclasses.dataclass(frozen=True)
class FalFaults:
    """Faults the fal emulation injects; the default injects none. Immutable, like ``Faults``:
    assign a new one to change them (the fault RNG restarts from ``seed``).

    - ``rate_429``: fraction of submits refused 429 ``{"detail": ...}`` (fal's concurrency limit);
      ``queue_limit``: also refuse a submit while the key has that many unfinished requests.
    - ``rate_503``: fraction of authenticated queue calls (submit, status, result, cancel)
      answered 503 ``{"detail", "error_type"}`` with an ``error_type`` from ``error_types_503``
      (and ``X-Fal-Error-Type``, ``x-fal-request-id``); ``rate_drop``: fraction whose connection
      closes with no answer. One draw decides between them; the call never reaches its handler.
    - ``lose_submit_answers``: fraction of submits that create the request and then close the
      connection instead of answering (the lost request id of FACTS.md).
    - ``latency``: every queue call first waits ``uniform(0, latency)`` seconds.
    - ``rate_error``: fraction of valid requests that run and end COMPLETED with ``error`` and
      ``error_type`` drawn from ``error_types`` (keys of ``REQUEST_ERRORS``); their result GET
      answers that error's status (500/503/504).
    - ``result_ttl``: when set, every result expires this many seconds after completion.
    """

    seed: int = 0
    rate_429: float = 0.0
    queue_limit: int | None = None
    rate_503: float = 0.0
    error_types_503: tuple[str, ...] = RUNNER_ERROR_TYPES
    rate_drop: float = 0.0
    lose_submit_answers: float = 0.0
    latency: float = 0.0
    rate_error: float = 0.0
    error_types: tuple[str, ...] = ("request_timeout",)
    result_ttl: float | None = None

    def __post_init__(self) -> None:
        for name in ("rate_429", "rate_503", "rate_drop", "lose_submit_answers", "rate_error"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FalFaults.{name} must be in [0, 1], not {value!r}")
        if self.rate_503 + self.rate_drop > 1.0 + 1e-9:
            raise ValueError("FalFaults.rate_503 + rate_drop must be at most 1")
        unknown = set(self.error_types) | set(self.error_types_503)
        if unknown - set(REQUEST_ERRORS) or not self.error_types or not self.error_types_503:
            raise ValueError(f"FalFaults error types must be among {sorted(REQUEST_ERRORS)}")
        if self.latency < 0 or (self.result_ttl is not None and self.result_ttl < 0):
            raise ValueError("FalFaults.latency and result_ttl must not be negative")


@dataclasses.dataclass
class FalConfig:
    """Behaviour of the fal emulation; fields may be changed while it runs.

    ``concurrency``: requests per key running at once. ``processing_seconds``: run time per image.
    ``result_ttl``/``result_ttl_large`` (seconds): retention after completion, the latter for
    results of ``large_result_bytes`` or more. ``fetch_timeout``: seconds to fetch an input URL
    (seed 004: "Timeout: 20.0s").
    """

    concurrency: int = 4
    processing_seconds: float = 0.2
    result_ttl: float = 3600.0
    result_ttl_large: float = 360.0
    large_result_bytes: int = 10 * 1024
    fetch_timeout: float = 20.0
    faults: FalFaults = dataclasses.field(default_factory=FalFaults)


class FalInputError(Exception):
    """An input fal rejects with 422: ``detail`` is one ``{loc, msg, type}`` entry."""

    def __init__(self, loc: Sequence[str | int], msg: str, type_: str) -> None:
        super().__init__(msg)
        self.detail = {"loc": ["body", *loc], "msg": msg, "type": type_}


# -- input validation (pydantic v2 style details, as fal's apps answer) --------------------------
_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class _Field:
    kind: str  # str, bool, int, float, enum, inputs
    default: Any = _REQUIRED
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()


_SCHEMAS: dict[str, dict[str, _Field]] = {
    "fal-ai/moondream3-preview/caption": {
        "image_url": _Field("str"), "length": _Field("enum", "normal", choices=("short", "normal", "long")),
        "temperature": _Field("float", None, 0, 1), "top_p": _Field("float", None, 0, 1)},
    "fal-ai/moondream3-preview/query": {
        "image_url": _Field("str"), "prompt": _Field("str"), "reasoning": _Field("bool", True),
        "temperature": _Field("float", None, 0, 1), "top_p": _Field("float", None, 0, 1)},
    "fal-ai/moondream3-preview/detect": {
        "image_url": _Field("str"), "prompt": _Field("str"), "preview": _Field("bool", False)},
    "fal-ai/moondream3-preview/point": {
        "image_url": _Field("str"), "prompt": _Field("str"), "preview": _Field("bool", False)},
    "fal-ai/moondream2/visual-query": {"image_url": _Field("str"), "prompt": _Field("str")},
    "fal-ai/moondream/batched": {
        "model_id": _Field("enum", BATCHED_MODELS[0], choices=BATCHED_MODELS),
        "inputs": _Field("inputs"), "max_tokens": _Field("int", 64, 32, 1024),
        "temperature": _Field("float", 0.2, 0, 1), "top_p": _Field("float", 1.0, 0, 1),
        "repetition_penalty": _Field("float", 1.0, 1, 2)},
    "fal-ai/moondream-next/batch": {
        "images_data_url": _Field("str"), "prompt": _Field("str"),
        "max_tokens": _Field("int", 64, 1, 512)},
}


def _check(field: _Field, value: Any, loc: list[str | int]) -> list[dict[str, Any]]:
    def err(msg: str, type_: str, **ctx: Any) -> list[dict[str, Any]]:
        out: dict[str, Any] = {"loc": ["body", *loc], "msg": msg, "type": type_}
        if ctx:
            out["ctx"] = ctx
        return [out]

    if field.kind == "str":
        if not isinstance(value, str):
            return err("Input should be a valid string", "string_type")
        if not value:  # an empty prompt or URL means nothing to the model
            return err("String should have at least 1 character", "string_too_short", min_length=1)
        return []
    if field.kind == "enum":
        if value not in field.choices:
            names = ", ".join(repr(c) for c in field.choices[:-1]) + f" or {field.choices[-1]!r}"
            return err(f"Input should be {names}", "enum", expected=names)
        return []
    if field.kind == "bool":
        return [] if isinstance(value, bool) else err("Input should be a valid boolean", "bool_type")
    if field.kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                field.kind == "int" and not isinstance(value, int)):
            return err(f"Input should be a valid {'integer' if field.kind == 'int' else 'number'}",
                       f"{field.kind}_type")
        if field.lo is not None and value < field.lo:
            return err(f"Input should be greater than or equal to {field.lo:g}",
                       "greater_than_equal", ge=field.lo)
        if field.hi is not None and value > field.hi:
            return err(f"Input should be less than or equal to {field.hi:g}",
                       "less_than_equal", le=field.hi)
        return []
    # inputs: [{image_url, prompt?}, ...]
    if not isinstance(value, list):
        return err("Input should be a valid list", "list_type")
    if not value:
        return err("List should have at least 1 item after validation, not 0", "too_short", min_length=1)
    errors: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            errors += err("Input should be a valid dictionary", "dict_type")
            errors[-1]["loc"].append(i)
            continue
        if "image_url" not in item:
            errors.append({"loc": ["body", *loc, i, "image_url"], "msg": "Field required",
                           "type": "missing"})
        else:
            errors += _check(_Field("str"), item["image_url"], [*loc, i, "image_url"])
        if "prompt" in item:
            errors += _check(_Field("str"), item["prompt"], [*loc, i, "prompt"])
    return errors


def validate_input(endpoint: str, body: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check ``body`` against ``endpoint``'s input schema (seeds 000, 001, 003, 004; FACTS.md
    "fal queue API") → ``(arguments with defaults filled in, 422 detail entries)``; the entries
    (``{loc: ["body", field, ...], msg, type[, ctx]}``) are empty when the input is valid.
    Unknown fields are ignored, as pydantic does. ``KeyError`` for an unknown endpoint."""
    schema = _SCHEMAS[endpoint]
    if not isinstance(body, dict):
        return {}, [{"loc": ["body"], "msg": "Input should be a valid dictionary",
                     "type": "model_attributes_type"}]
    args: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, field in schema.items():
        if name not in body or (body[name] is None and field.default is not _REQUIRED):
            if field.default is _REQUIRED:
                errors.append({"loc": ["body", name], "msg": "Field required", "type": "missing"})
            else:
                args[name] = field.default
            continue
        found = _check(field, body[name], [name])
        errors += found
        if not found:
            args[name] = body[name]
    if "inputs" in args:
        args["inputs"] = [{"image_url": it["image_url"],
                           "prompt": it.get("prompt", DEFAULT_BATCHED_PROMPT)} for it in args["inputs"]]
    return args, errors


# -- the model: deterministic answers from the pixels --------------------------------------------
def _usage_info(use: dict[str, int]) -> dict[str, Any]:
    """moondream3-preview ``usage_info`` (seed 004): tokens from ``emulator.inference``, timings
    derived from them so that they are deterministic."""
    i, o = use["input_tokens"], use["output_tokens"]
    prefill = round(i * 0.05, 3)
    return {"input_tokens": i, "output_tokens": o, "prefill_time_ms": prefill,
            "decode_time_ms": round(o * 12.5, 3), "ttft_ms": round(prefill + 5.0, 3)}


def _infer(line: dict[str, Any], data: bytes, loc: Sequence[str | int]
           ) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        _, w, h, _ = fingerprint_bytes(data)
    except LineError:
        raise FalInputError(loc, "Could not load the image: not a readable image file",
                            "image_load_error") from None
    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE:
        raise FalInputError(loc, f"Image is {w}x{h}; the maximum is {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}",
                            "image_too_large")
    return infer({**line, "image": base64.b64encode(data).decode()}, any_format=True)


def _truncate(text: str, max_tokens: int) -> str:
    words = text.split()
    return " ".join(words[:max_tokens]) if len(words) > max_tokens else text


def _preview(data: bytes, boxes: list[dict[str, float]] | None, points: list[dict[str, float]] | None
             ) -> tuple[dict[str, Any], bytes]:
    """The ``image`` of a ``preview`` answer: the input with the boxes or points drawn, as PNG."""
    from PIL import Image, ImageDraw

    img = Image.open(io.BytesIO(data))
    img.seek(0)
    img = img.convert("RGB")
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for b in boxes or []:
        draw.rectangle([b["x_min"] * w, b["y_min"] * h, b["x_max"] * w, b["y_max"] * h],
                       outline=(255, 0, 0), width=3)
    for p in points or []:
        x, y = p["x"] * w, p["y"] * h
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    png = buf.getvalue()
    return ({"url": None, "content_type": "image/png", "file_name": "preview.png",
             "file_size": len(png), "width": w, "height": h}, png)


def run_model(endpoint: str, args: dict[str, Any], images: Sequence[tuple[str, bytes]]
              ) -> tuple[dict[str, Any], dict[str, tuple[bytes, str]]]:
    """The output of ``endpoint`` for validated ``args`` (``validate_input``) and its images as
    ``(name, bytes)`` in input order (one for the single-image endpoints, one per ``inputs`` item
    for ``moondream/batched``, the archive's members for ``moondream-next/batch``).

    Returns ``(output, files)``: ``files`` maps an output field holding a fal ``File``
    (``captions_file``, the preview ``image``) to ``(bytes, content_type)``; in ``output`` that
    File's ``url`` is None (the emulator fills in where it serves it). Raises ``FalInputError``
    (422) for an image that does not decode or is over 7000 px a side.
    """
    kind = ENDPOINTS[endpoint]
    files: dict[str, tuple[bytes, str]] = {}
    if kind in ("caption", "query", "detect", "point", "visual-query"):
        data = images[0][1]
        loc = ["image_url"]
        if kind == "caption":
            res, use = _infer({"skill": "caption", "length": args["length"]}, data, loc)
            return {"output": res["caption"], "finish_reason": "stop",
                    "usage_info": _usage_info(use)}, files
        if kind in ("query", "visual-query"):
            reasoning = kind == "query" and args["reasoning"]
            res, use = _infer({"skill": "query", "question": args["prompt"], "reasoning": reasoning},
                              data, loc)
            if kind == "visual-query":
                return {"output": res["answer"]}, files
            out: dict[str, Any] = {"output": res["answer"]}
            if reasoning:
                out["reasoning"] = res["reasoning"]["text"]  # a string on fal (FACTS.md)
            return {**out, "finish_reason": "stop", "usage_info": _usage_info(use)}, files
        res, use = _infer({"skill": kind, "object": args["prompt"]}, data, loc)
        out = {**res, "finish_reason": "stop", "usage_info": _usage_info(use)}
        if args["preview"]:
            out["image"], png = _preview(data, res.get("objects"), res.get("points"))
            files["image"] = (png, "image/png")
        return out, files
    if kind == "batched":
        outputs, tokens = [], 0
        for i, (item, (_, data)) in enumerate(zip(args["inputs"], images, strict=True)):
            res, use = _infer({"skill": "query", "question": item["prompt"], "reasoning": False},
                              data, ["inputs", i, "image_url"])
            outputs.append(_truncate(res["answer"], args["max_tokens"]))
            tokens += min(use["output_tokens"], args["max_tokens"])
        return {"outputs": outputs, "partial": False,
                "timings": {"inference": round(tokens * 0.0125, 4)},
                "filenames": [name for name, _ in images]}, files
    # next-batch: one prompt over the archive's images; captions_file maps name → caption
    outputs = []
    for _, data in images:
        res, _ = _infer({"skill": "query", "question": args["prompt"], "reasoning": False}, data,
                        ["images_data_url"])
        outputs.append(_truncate(res["answer"], args["max_tokens"]))
    captions = json.dumps(dict(zip((n for n, _ in images), outputs, strict=True))).encode()
    files["captions_file"] = (captions, "application/json")
    return {"captions_file": {"url": None, "content_type": "application/json",
                              "file_name": "captions.json", "file_size": len(captions)},
            "outputs": outputs}, files


def expected_output(endpoint: str, arguments: dict[str, Any],
                    images: Sequence[bytes | tuple[str, bytes]]) -> dict[str, Any]:
    """What the emulator answers for ``endpoint`` called with ``arguments`` whose images have
    these bytes (in input order; give ``(name, bytes)`` where names show in the output:
    ``source_name(url, i)`` for ``moondream/batched``'s ``filenames``, the archive member names
    for ``moondream-next/batch``), with every File ``url`` None (compare with ``without_urls``).
    Raises ``ValueError`` for arguments the endpoint rejects."""
    args, errors = validate_input(endpoint, arguments)
    if errors:
        raise ValueError(f"invalid arguments for {endpoint}: {errors}")
    named = [im if isinstance(im, tuple) else (f"image_{i}", im) for i, im in enumerate(images)]
    return run_model(endpoint, args, named)[0]


def without_urls(output: dict[str, Any]) -> dict[str, Any]:
    """``output`` with the ``url`` of every top-level File set to None (for comparing a result
    with ``expected_output``)."""
    return {k: ({**v, "url": None} if isinstance(v, dict) and "url" in v else v)
            for k, v in output.items()}


# -- fetching inputs -------------------------------------------------------------------------------
def source_name(url: str, index: int) -> str:
    """The file name the emulator reports for an input URL (``filenames`` of
    ``moondream/batched``): the last path segment of an http(s) URL, ``image_<index>.<subtype>``
    for a ``data:`` URI."""
    if url.startswith("data:"):
        mime = url[5:].split(",", 1)[0].split(";", 1)[0]
        return f"image_{index}.{mime.rsplit('/', 1)[-1] if '/' in mime else 'bin'}"
    return unquote(posixpath.basename(urlsplit(url).path)) or f"image_{index}"


def load_url(url: str, timeout: float, loc: Sequence[str | int]) -> bytes:
    """The bytes behind an input URL: ``data:[<mime>][;base64],<data>`` or http(s) (fetched with
    httpx, redirects followed). Raises ``FalInputError`` (``file_download_error``) otherwise."""
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise FalInputError(loc, "Invalid data URI", "file_download_error")
        if header.endswith(";base64"):
            try:
                return base64.b64decode("".join(payload.split()), validate=True)
            except (binascii.Error, ValueError):
                raise FalInputError(loc, "Invalid base64 in data URI", "file_download_error") from None
        return unquote_to_bytes(payload)
    if urlsplit(url).scheme not in ("http", "https"):
        raise FalInputError(loc, f"Unsupported URL scheme: {url[:40]}", "file_download_error")
    try:
        resp = httpx.get(url, timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise FalInputError(loc, f"Failed to download the file: {type(exc).__name__}",
                            "file_download_error") from None
    if resp.status_code != 200:
        raise FalInputError(loc, f"Failed to download the file: HTTP {resp.status_code}",
                            "file_download_error")
    return resp.content


def archive_images(data: bytes, loc: Sequence[str | int] = ("images_data_url",)
                   ) -> list[tuple[str, bytes]]:
    """The images of a ZIP archive as ``(member name, bytes)`` in archive order, skipping
    directories and hidden or ``__MACOSX`` members (FACTS.md: ``images_data_url`` is the URL of a
    ZIP of up to 32 images). ``FalInputError`` for a bad archive, none or over 32 images."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()
                       and not m.filename.startswith("__MACOSX/")
                       and not posixpath.basename(m.filename).startswith(".")]
            if len(members) > MAX_BATCH_IMAGES:
                raise FalInputError(loc, f"Archive has {len(members)} files; the maximum is "
                                    f"{MAX_BATCH_IMAGES}", "archive_file_count_exceeds_maximum")
            out = [(m.filename, zf.read(m)) for m in members]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError):
        raise FalInputError(loc, "Could not read the archive: not a ZIP file", "invalid_archive") from None
    if not out:
        raise FalInputError(loc, "Archive has no image files", "archive_file_count_below_minimum")
    return out


# -- state ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Req:
    id: str
    endpoint: str
    app: str  # owner/alias: the part of the endpoint the request URLs keep
    key: str
    base: str  # scheme://host of the submit, for the URLs
    submitted: float
    duration: float
    units: int
    status_code: int  # of the result GET once completed
    body: dict[str, Any]
    started: float | None = None
    ends: float | None = None
    cancelled: float | None = None
    expired_counted: bool = False
    size: int = 0  # bytes of the result body: picks the retention time
    headers: dict[str, str] = dataclasses.field(default_factory=dict)  # X-Fal-* of the submit
    low: bool = False  # X-Fal-Queue-Priority: low
    timeout: float | None = None  # X-Fal-Request-Timeout: seconds it may wait to start
    model: str | None = None  # the model_id it ran (fal-ai/moondream/batched; default filled)

    @property
    def urls(self) -> dict[str, str]:
        root = f"{self.base}/{self.app}/requests/{self.id}"
        return {"response_url": root, "status_url": root + "/status", "cancel_url": root + "/cancel"}


def _json(body: Any, status: int = 200, request_id: str | None = None,
          error_type: str | None = None) -> Response:
    resp = Response(json.dumps(body), status=status, mimetype="application/json")
    if request_id:
        resp.headers["x-fal-request-id"] = request_id
    if error_type:
        resp.headers["X-Fal-Error-Type"] = error_type
    return resp


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def _dropped(sock: socket.socket | None) -> Response:
    """A response that closes the connection without answering (as ``emulator.server``'s)."""
    def body() -> Iterator[bytes]:
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        raise ConnectionAbortedError("connection dropped by fault injection")
        yield b""  # pragma: no cover - makes this a generator

    return Response(body(), status=500, mimetype="application/json")


class FalEmulation:
    """The fal queue API of one emulated account, served by an ``emulator.server.Emulator``.

    ``owner.config`` is the live ``EmulatorConfig`` (its ``fal_key`` and ``fal``, a
    ``FalConfig``). ``register(app)`` adds the routes under ``/fal-ai/``. ``requests`` holds the
    requests by id, ``injected`` counts faults by kind (``FAL_FAULT_KINDS``), ``calls`` counts
    calls by kind (downloads of produced files as ``file``, or ``file_with_key`` when they
    carried an ``Authorization`` header); ``clock`` is the time source.
    """

    def __init__(self, owner: Any) -> None:
        self._owner = owner
        self.lock = threading.RLock()
        self.requests: dict[str, _Req] = {}
        self._lines: dict[str, list[_Req]] = {}  # per key, in submit order: what may still run
        self._last_start: dict[str, float] = {}  # per key: requests start in submit order
        self._admitting: dict[str, int] = {}  # per key: submits accepted, not yet registered
        self.files: dict[str, tuple[bytes, str]] = {}
        self.injected: dict[str, int] = dict.fromkeys(FAL_FAULT_KINDS, 0)
        self.calls: dict[str, int] = {}
        self.clock: Callable[[], float] = time.time
        self._rng = random.Random(0)
        self._rng_faults: FalFaults | None = None

    @property
    def config(self) -> FalConfig:
        return self._owner.config.fal

    # -- scheduling ------------------------------------------------------------------------
    def _advance(self, key: str, now: float) -> list[_Req]:
        """Start the key's queued requests whose slot freed by ``now`` (FIFO, at most
        ``concurrency`` running); returns the requests still queued, in order. Call locked.

        A request starts at the earliest time ≥ its submit and the previous start when fewer
        than ``concurrency`` started requests are unfinished; times once set never change
        (a cancel only ends a request early)."""
        line = self._lines.setdefault(key, [])
        cap = max(1, self.config.concurrency)
        last_start = self._last_start.get(key, -math.inf)
        ends = [r.ends for r in line if r.started is not None]
        queued = [r for r in line if r.started is None and r.ends is None]
        while queued:
            t0 = max(queued[0].submitted, last_start)
            busy = sorted(e for e in ends if e > t0)  # type: ignore[operator]
            t = t0 if len(busy) < cap else busy[len(busy) - cap]
            # Whoever waited past its X-Fal-Request-Timeout before this slot frees times out.
            late = [r for r in queued if r.timeout is not None and r.submitted + r.timeout < t]
            if late:
                r = min(late, key=lambda q: q.submitted + q.timeout)  # type: ignore[operator]
                if r.submitted + r.timeout > now:  # type: ignore[operator]
                    break
                r.ends = r.submitted + r.timeout  # type: ignore[operator]
                r.status_code, r.body = 504, {"detail": REQUEST_ERRORS["request_timeout"][1],
                                              "error_type": "request_timeout"}
                r.size = len(json.dumps(r.body))
                queued.remove(r)
                continue
            if t > now:
                break
            # Of those waiting when the slot frees, a normal-priority request goes first.
            waiting = [r for r in queued if r.submitted <= t]
            head = next((r for r in waiting if not r.low), waiting[0])
            head.started, head.ends = t, t + head.duration
            ends.append(head.ends)
            last_start = t
            queued.remove(head)
        self._last_start[key] = last_start
        # What ended by the last start can no longer hold a slot that a request waits for.
        waiting = {id(r) for r in queued}
        self._lines[key] = [r for r in line if id(r) in waiting or (
            r.started is not None and r.ends > last_start)]  # type: ignore[operator]
        return queued

    def _state(self, r: _Req, now: float) -> tuple[str, int | None]:
        """``(status, queue_position)`` of ``r`` at ``now``; status "GONE" once expired. Locked."""
        queued = self._advance(r.key, now)
        if r.ends is not None and r.ends <= now:
            faults = self.config.faults
            ttl = faults.result_ttl if faults.result_ttl is not None else (
                self.config.result_ttl_large if r.size >= self.config.large_result_bytes
                else self.config.result_ttl)
            if now >= r.ends + ttl:
                if faults.result_ttl is not None and not r.expired_counted:
                    r.expired_counted = True
                    self.injected["expired"] += 1
                return "GONE", None
            return "COMPLETED", None
        if r.started is not None:
            return "IN_PROGRESS", None
        return "IN_QUEUE", queued.index(r)

    def _logs(self, r: _Req, now: float) -> list[dict[str, Any]]:
        """The runner's log lines up to ``now``: a start line, one per image done, an end line."""
        if r.started is None:
            return []
        until = min(now, r.ends if r.ends is not None else now)
        out = [{"message": f"Running {r.endpoint} on {r.units} image(s)", "level": "INFO",
                "source": "USER", "timestamp": _iso(r.started)}]
        per = self.config.processing_seconds
        for i in range(r.units):
            t = r.started + (i + 1) * per
            if t > until or (r.cancelled is not None and t >= r.cancelled):
                break
            out.append({"message": f"Processed image {i + 1}/{r.units}", "level": "INFO",
                        "source": "USER", "timestamp": _iso(t)})
        if r.ends is not None and r.ends <= now:
            msg = "Cancelled" if r.cancelled is not None else (
                "Done" if r.status_code == 200 else f"Error: {r.body.get('detail')}")
            out.append({"message": msg, "level": "INFO" if r.status_code == 200 else "ERROR",
                        "source": "USER", "timestamp": _iso(r.ends)})
        return out

    # -- faults ----------------------------------------------------------------------------
    def _fault_rng(self, faults: FalFaults) -> random.Random:
        if faults is not self._rng_faults:
            self._rng = random.Random(faults.seed)
            self._rng_faults = faults
        return self._rng

    def _call_fault(self, faults: FalFaults, request_id: str) -> Response | None:
        """503 with a runner error type, or a dropped connection, for this call, or None."""
        if faults.rate_503 + faults.rate_drop <= 0:
            return None
        with self.lock:
            rng = self._fault_rng(faults)
            r = rng.random()
            if r < faults.rate_503:
                kind, error_type = "503", rng.choice(faults.error_types_503)
            elif r < faults.rate_503 + faults.rate_drop:
                kind, error_type = "drop", ""
            else:
                return None
            self.injected[kind] += 1
        if kind == "drop":
            return _dropped(request.environ.get("werkzeug.socket"))
        request.get_data()  # read the body so the client reads our answer, not a reset
        return _json({"detail": REQUEST_ERRORS[error_type][1], "error_type": error_type}, 503,
                     request_id, error_type)

    # -- routes ----------------------------------------------------------------------------
    def register(self, app: Flask) -> None:
        """Serve the queue API under ``/fal-ai/`` on ``app`` (and produced files under
        ``/fal-ai/_files/``, without auth, as fal's CDN serves them)."""
        app.add_url_rule("/fal-ai/<path:rest>", "fal_queue", self._dispatch,
                         methods=["GET", "POST", "PUT"])

    def _count(self, kind: str) -> None:
        with self.lock:
            self.calls[kind] = self.calls.get(kind, 0) + 1

    def _authorised(self) -> bool:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        return scheme == "Key" and hmac.compare_digest(key.strip().encode(),
                                                       self._owner.config.fal_key.encode())

    def _dispatch(self, rest: str) -> Response:
        parts = [p for p in rest.split("/") if p]
        if parts and parts[0] == "_files":
            return self._file(parts[1] if len(parts) > 1 else "")
        faults = self.config.faults
        if faults.latency > 0:
            with self.lock:
                delay = self._fault_rng(faults).uniform(0, faults.latency)
            time.sleep(delay)
        if not self._authorised():
            self._count("unauthorised")
            return _json({"detail": "Invalid or missing fal key: send 'Authorization: Key <key>'"}, 401)
        if "requests" in parts[1:]:
            i = parts.index("requests", 1)
            app_id, rid, tail = "fal-ai/" + parts[0], "/".join(parts[i + 1:i + 2]), parts[i + 2:]
            fault = self._call_fault(faults, rid)
            if fault is not None:
                return fault
            if request.method == "GET" and not tail:
                return self._result(app_id, rid)
            if request.method == "GET" and tail == ["status"]:
                return self._status(app_id, rid)
            if request.method == "PUT" and tail == ["cancel"]:
                return self._cancel(app_id, rid)
            known = tail in ([], ["status"], ["cancel"])
            return _json({"detail": "Method not allowed" if known else "Not found"}, 405 if known else 404)
        if request.method != "POST":
            return _json({"detail": "Method not allowed"}, 405)
        endpoint = "fal-ai/" + "/".join(parts)
        if endpoint not in ENDPOINTS:
            return _json({"detail": f"Application '{endpoint}' not found"}, 404)
        rid = str(uuid.uuid4())
        fault = self._call_fault(faults, rid)
        return fault if fault is not None else self._submit(endpoint, rid)

    def _file(self, fid: str) -> Response:
        # fal's CDN needs no key: count downloads that carry one anyway (a client leaking it).
        self._count("file_with_key" if request.headers.get("Authorization") else "file")
        with self.lock:
            found = self.files.get(fid)
        if found is None:
            return _json({"detail": "File not found"}, 404)
        return Response(found[0], mimetype=found[1])

    def _prepare(self, endpoint: str, body: Any, base: str) -> tuple[int, dict[str, Any], int]:
        """Run the request now: ``(result status, result body, images)``."""
        args, errors = validate_input(endpoint, body)
        if errors:
            return 422, {"detail": errors}, 0
        timeout = self.config.fetch_timeout
        try:
            kind = ENDPOINTS[endpoint]
            if kind == "batched":
                images = [(source_name(it["image_url"], i),
                           load_url(it["image_url"], timeout, ["inputs", i, "image_url"]))
                          for i, it in enumerate(args["inputs"])]
            elif kind == "next-batch":
                images = archive_images(load_url(args["images_data_url"], timeout,
                                                 ["images_data_url"]))
            else:
                images = [(source_name(args["image_url"], 0),
                           load_url(args["image_url"], timeout, ["image_url"]))]
            output, files = run_model(endpoint, args, images)
        except FalInputError as exc:
            return 422, {"detail": [exc.detail]}, 0
        except Exception as exc:  # an emulator bug must not take the server down
            return 500, {"detail": f"Internal server error: {exc}",
                         "error_type": "internal_server_error"}, 0
        for field, (data, content_type) in files.items():
            fid = uuid.uuid4().hex
            with self.lock:
                self.files[fid] = (data, content_type)
            output[field] = {**output[field],
                             "url": f"{base}/fal-ai/_files/{fid}/{output[field]['file_name']}"}
        return 200, output, len(images)

    def _submit(self, endpoint: str, rid: str) -> Response:
        self._count("submit")
        cfg, faults = self.config, self.config.faults
        key = self._owner.config.fal_key
        with self.lock:
            now = self.clock()
            self._advance(key, now)
            keep = max(cfg.result_ttl, cfg.result_ttl_large, faults.result_ttl or 0)
            for old in [r for r in self.requests.values() if r.ends is not None and now >= r.ends + keep]:
                del self.requests[old.id]  # expired under any ttl: forget it
            # Submits still being prepared (fetching their images) count too: fal counts a
            # request from its arrival.
            unfinished = self._admitting.get(key, 0) + sum(
                1 for r in self.requests.values() if r.key == key and (
                    r.ends is None or r.ends > now))
            refuse = faults.queue_limit is not None and unfinished >= faults.queue_limit
            if not refuse and faults.rate_429 > 0:
                refuse = self._fault_rng(faults).random() < faults.rate_429
            if refuse:
                self.injected["429"] += 1
            else:
                self._admitting[key] = self._admitting.get(key, 0) + 1
        if refuse:
            request.get_data()
            return _json({"detail": "Too many concurrent requests for this key: retry later"}, 429, rid)
        base = request.host_url.rstrip("/")
        headers = {k.lower(): v for k, v in request.headers.items()
                   if k.lower().startswith("x-fal-")}
        try:
            timeout = float(headers["x-fal-request-timeout"])
        except (KeyError, ValueError):
            timeout = None  # absent or unreadable: no limit
        given = request.get_json(silent=True)
        try:
            status, body, units = self._prepare(endpoint, given, base)
        finally:
            with self.lock:
                self._admitting[key] -= 1
        with self.lock:
            if status == 200 and faults.rate_error > 0 and \
                    self._fault_rng(faults).random() < faults.rate_error:
                error_type = self._fault_rng(faults).choice(faults.error_types)
                status, detail = REQUEST_ERRORS[error_type]
                body = {"detail": detail, "error_type": error_type}
                self.injected["error"] += 1
            now = self.clock()
            r = _Req(id=rid, endpoint=endpoint, app="/".join(endpoint.split("/")[:2]), key=key,
                     base=base, submitted=now, duration=cfg.processing_seconds * units, units=units,
                     status_code=status, body=body, size=len(json.dumps(body)),
                     headers=headers, low=headers.get("x-fal-queue-priority") == "low",
                     timeout=timeout, model=validate_input(endpoint, given)[0].get("model_id"))
            self.requests[rid] = r
            self._advance(key, now)
            self._lines[key].append(r)
            state, position = self._state(r, now)
            if faults.lose_submit_answers > 0 and \
                    self._fault_rng(faults).random() < faults.lose_submit_answers:
                self.injected["lost_submit"] += 1
                return _dropped(request.environ.get("werkzeug.socket"))
        return _json({"request_id": rid, **r.urls, "status": "IN_QUEUE",
                      "queue_position": position or 0}, 200, rid)

    def _find(self, app_id: str, rid: str) -> _Req | None:
        r = self.requests.get(rid)
        if r is None or r.app != app_id or r.key != self._owner.config.fal_key:
            return None
        return r

    def _status(self, app_id: str, rid: str) -> Response:
        self._count("status")
        with_logs = request.args.get("logs", "").lower() in ("1", "true")
        with self.lock:
            now = self.clock()
            r = self._find(app_id, rid)
            state, position = self._state(r, now) if r is not None else ("GONE", None)
            if state == "GONE":
                return _json({"detail": "Request not found"}, 404, rid)
            out: dict[str, Any] = {"status": state, "request_id": rid, **r.urls,
                                   "logs": self._logs(r, now) if with_logs else None}
            if state == "IN_QUEUE":
                out["queue_position"] = position
                return _json(out, 202, rid)
            if state == "IN_PROGRESS":
                out["metrics"] = {}
                return _json(out, 202, rid)
            out["metrics"] = ({"inference_time": round(r.ends - r.started, 6)}  # type: ignore[operator]
                              if r.started is not None else {})
            if r.status_code != 200:
                detail = r.body.get("detail")
                if isinstance(detail, list):  # a validation error: name the fields
                    out["error"] = "; ".join(f"{'.'.join(str(x) for x in d['loc'][1:])}: {d['msg']}"
                                             for d in detail)
                    out["error_type"] = detail[0]["type"] if detail else None
                else:
                    out["error"], out["error_type"] = detail, r.body.get("error_type")
            return _json(out, 200, rid)

    def _result(self, app_id: str, rid: str) -> Response:
        self._count("result")
        with self.lock:
            r = self._find(app_id, rid)
            state, _ = self._state(r, self.clock()) if r is not None else ("GONE", None)
            if state == "GONE":
                return _json({"detail": "Request not found"}, 404, rid)
            if state != "COMPLETED":
                return _json({"detail": "Request is still in progress"}, 400, rid)
            return _json(r.body, r.status_code, rid, r.body.get("error_type"))

    def _cancel(self, app_id: str, rid: str) -> Response:
        self._count("cancel")
        with self.lock:
            now = self.clock()
            r = self._find(app_id, rid)
            state, _ = self._state(r, now) if r is not None else ("GONE", None)
            if state == "GONE":
                return _json({"status": "NOT_FOUND"}, 404, rid)
            if state == "COMPLETED":
                return _json({"status": "ALREADY_COMPLETED"}, 400, rid)
            r.cancelled = r.ends = now
            # A running request keeps its place in the line: it held its slot until now.
            r.status_code, r.body = CANCELLED[0], dict(CANCELLED[1])
            r.size = len(json.dumps(r.body))
            return _json({"status": "CANCELLATION_REQUESTED"}, 202, rid)
