"""An emulator of the Moondream real-time API, served next to the Batch API on the same port.

Protocol (FACTS.md "Moondream real-time API"; the official client ``moondream`` 2.6.1,
``moondream/cloud_vl.py`` ``CloudVL``, is the reference):

- ``POST {base}/caption {image_url, length, stream, settings?, model?}`` →
  ``{request_id, caption, metrics, finish_reason}``
- ``POST {base}/query {image_url, question, stream, reasoning?, spatial_refs?, settings?, model?}``
  → ``{request_id, answer, reasoning?, metrics, finish_reason}`` (``reasoning``, an object
  ``{text, grounding}``, only when asked for: the client sends ``reasoning`` only when true)
- ``POST {base}/detect {image_url, object, settings?, model?}`` → ``{request_id, objects, metrics}``
- ``POST {base}/point {image_url, object, spatial_refs?, settings?, model?}`` →
  ``{request_id, points, metrics}``
- ``POST {base}/segment {image_url, object, stream, spatial_refs?, settings?, model?}`` →
  ``{request_id, path, bbox, metrics}``: ``path`` an SVG path ``d`` string in normalised 0..1
  coordinates with M, L and C commands, ``bbox`` ``{x_min, y_min, x_max, y_max}`` (docs
  "skills/segment"); an object not found answers ``path: ""`` and ``bbox: null``.

``base`` is ``http://host:port/v1``. ``image_url`` is a ``data:image/...;base64,`` URI (JPEG, PNG
or GIF, as the API documents). Coordinates are normalised 0..1 with (0, 0) top-left.

Usage: every answer carries ``metrics`` ``{input_tokens, output_tokens, prefill_time_ms,
decode_time_ms, ttft_ms}`` (FACTS.md: caption answers ``metrics``; the emulator reports them for
every skill, timings derived from the token counts so they are deterministic).

Streaming (``stream: true``; the client reads server-sent events ``data: <json>``, each with
``request_id``): caption and query send ``{"chunk": "<text>", "completed": false}`` events, then
``{"chunk": "", "completed": true, "metrics", "finish_reason"}`` (docs "skills/caption");
segment sends ``{"type": "bbox", "bbox"}``, ``{"type": "path_delta", "chunk", "completed":
false}`` events, then ``{"type": "final", "path", "bbox", "completed": true, "metrics"}``.
Detect and point ignore ``stream``.

Errors: ``{"error": {"message", "type", "param", "code"}}`` with 400 (invalid request, an image
that does not decode, an unknown model), 401 (``X-Moondream-Auth`` missing or wrong while
``RealtimeConfig.require_key``: Moondream Cloud; without it, Moondream Station, no key is needed
and any is ignored), 413 (body over ``max_body_bytes``), 429 (``rate_limit`` requests/s per key
exceeded, with ``Retry-After`` in seconds), 500/502/503 (injected).

Answers come from ``emulator.inference`` (the pixels' fingerprint, size and dominant colour):
detect's boxes and point's points are the Batch API emulator's for the same image and object,
and segment's ``bbox`` is detect's first box for the same object (its path is a rounded
rectangle inscribed in that box). ``expected_answer`` and ``expected_usage`` recompute them.

Faults (``RealtimeFaults``, none by default) are counted in ``RealtimeEmulation.injected``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import math
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, request

from moonbatch.emulator.inference import LineError, _boxes, _tokens, fingerprint_bytes, infer

#: The skills served, each at ``/v1/<skill>``.
SKILLS = ("caption", "query", "detect", "point", "segment")
#: The paths the real-time routes own on the emulator's app.
PATHS = frozenset(f"/v1/{s}" for s in SKILLS)
#: Keys of ``RealtimeEmulation.injected``: injected faults, and ``rate_limited`` for 429s of
#: the configured rate limit (not a fault: what the real API does past its limit).
REALTIME_FAULT_KINDS = ("429", "5xx", "drop", "rate_limited")
#: Models accepted when ``RealtimeConfig.models`` is left at its default (prices.py's names; a
#: finetune is ``<model>/<finetune id>@<step>``).
DEFAULT_MODELS = ("moondream3-preview", "moondream3.1", "moondream3.1-9B-A2B")
#: The API's documented image formats (md-docs ``docs/skills/caption.md``), as Pillow names them.
_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF"})

@dataclasses.dataclass(frozen=True)
class RealtimeFaults:
    """Faults the real-time routes inject; the default injects none. Immutable, like
    ``Faults``: assign a new one (or a new ``RealtimeConfig``) to change them; the fault RNG
    restarts from ``seed``.

    - ``rate_429``, ``rate_5xx``, ``rate_drop``: fractions of authenticated requests answered
      429 (with ``Retry-After: retry_after`` unless None), 500/502/503, or with the connection
      closed and no answer. One draw per request decides among them (their sum is at most 1);
      such a request is not served (no answer computed).
    - ``latency``: every request first waits ``uniform(0, latency)`` seconds.
    """

    seed: int = 0
    rate_429: float = 0.0
    retry_after: float | None = 1.0
    rate_5xx: float = 0.0
    rate_drop: float = 0.0
    latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rate_429", "rate_5xx", "rate_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RealtimeFaults.{name} must be in [0, 1], not {value!r}")
        if self.rate_429 + self.rate_5xx + self.rate_drop > 1.0 + 1e-9:
            raise ValueError("RealtimeFaults.rate_429 + rate_5xx + rate_drop must be at most 1")
        if self.latency < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("RealtimeFaults.latency and retry_after must not be negative")


@dataclasses.dataclass(frozen=True)
class RealtimeConfig:
    """Behaviour of the real-time routes. Immutable: assign a new one to
    ``EmulatorConfig.realtime`` to change it (tests' config resets copy the emulator config
    shallowly).

    ``require_key``: True (Moondream Cloud) checks ``X-Moondream-Auth`` against
    ``EmulatorConfig.api_key``; False (Moondream Station) needs no key and ignores one.
    ``rate_limit``: requests per second per key (a token bucket of ``max(1, rate_limit)``
    requests; the key ``""`` when none is sent), None for no limit. ``models``: the models a
    request may name (``model``; a finetune ``<model>/<id>@<step>`` of one of them), None for
    any. ``processing_seconds``: time each answer takes. ``max_body_bytes``: larger bodies get
    413.
    """

    require_key: bool = True
    rate_limit: float | None = None
    models: tuple[str, ...] | None = DEFAULT_MODELS
    processing_seconds: float = 0.0
    max_body_bytes: int = 10 * 1024 * 1024
    faults: RealtimeFaults = dataclasses.field(default_factory=RealtimeFaults)

    def __post_init__(self) -> None:
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("RealtimeConfig.rate_limit must be positive (None: no limit)")


class RequestError(Exception):
    """A request the API refuses: ``status`` and the error body's ``code``/``message``/``param``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def _error(status: int, code: str, message: str, type_: str = "invalid_request_error",
           param: str | None = None) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(json.dumps(body), status=status, mimetype="application/json")


# -- the model: deterministic answers from the pixels ------------------------------------------------
def image_bytes(image_url: Any) -> bytes:
    """The bytes of a ``data:[<mime>];base64,<data>`` URI. ``RequestError`` (400) otherwise."""
    if not isinstance(image_url, str) or not image_url.startswith("data:"):
        raise RequestError(400, "invalid_image", "image_url must be a base64 data URI "
                           "(data:image/jpeg;base64,...)", "image_url")
    header, sep, payload = image_url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestError(400, "invalid_image", "image_url must be a base64 data URI",
                           "image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid_image", "Invalid base64 image data", "image_url") from None


def _num(v: float) -> str:
    """A coordinate as the path writes it: at most 4 decimals, no trailing zeros."""
    text = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def segment_path(box: tuple[float, float, float, float]) -> str:
    """An SVG path ``d`` (M, L, C commands, normalised coordinates) of a rounded rectangle
    inscribed in ``box`` = ``(x_min, y_min, x_max, y_max)``: its bounding box is ``box``
    exactly (the corners' control points lie inside it). It starts and ends at the same point."""
    x0, y0, x1, y1 = box
    r = 0.3 * min(x1 - x0, y1 - y0)
    k = r * (1 - 0.5523)  # control points of a quarter circle (cubic approximation)
    p = [("M", (x0 + r, y0)), ("L", (x1 - r, y0)),
         ("C", (x1 - k, y0, x1, y0 + k, x1, y0 + r)), ("L", (x1, y1 - r)),
         ("C", (x1, y1 - k, x1 - k, y1, x1 - r, y1)), ("L", (x0 + r, y1)),
         ("C", (x0 + k, y1, x0, y1 - k, x0, y1 - r)), ("L", (x0, y0 + r)),
         ("C", (x0, y0 + k, x0 + k, y0, x0 + r, y0))]
    return " ".join(f"{cmd} " + " ".join(_num(v) for v in vals) for cmd, vals in p)


def _refs_suffix(refs: Any) -> str:
    return "" if refs is None else "|refs=" + json.dumps(refs, separators=(",", ":"))


def _check_refs(refs: Any) -> None:
    if refs is None:
        return
    ok = isinstance(refs, list) and all(
        isinstance(r, list) and len(r) in (2, 4) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in r)
        for r in refs)
    if not ok:
        raise RequestError(400, "invalid_request", "spatial_refs must be a list of [x, y] points "
                           "or [x_min, y_min, x_max, y_max] boxes, normalised 0..1",
                           "spatial_refs")


def _settings(payload: dict[str, Any]) -> dict[str, Any]:
    settings = payload.get("settings")
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise RequestError(400, "invalid_request", "settings must be an object", "settings")
    return settings


def compute(skill: str, payload: dict[str, Any], data: bytes, *, any_format: bool = False
            ) -> tuple[dict[str, Any], dict[str, int]]:
    """The answer of ``POST /v1/<skill>`` for ``payload`` (its fields but ``image_url``) and the
    image's bytes → ``(result fields, {"input_tokens", "output_tokens"})``; the result is what
    the official client returns and a moonbatch row keeps (``{"caption"}``, ``{"answer"[,
    "reasoning"]}``, ``{"objects"}``, ``{"points"}``, ``{"path", "bbox"}``).

    Raises ``RequestError`` (400) for a missing or invalid field, or an image that does not
    decode (or, unless ``any_format``, is not JPEG, PNG or GIF)."""
    if skill not in SKILLS:
        raise RequestError(404, "not_found", f"Unknown skill: {skill}")
    settings = _settings(payload)
    refs = payload.get("spatial_refs")
    if refs is not None and skill not in ("query", "point", "segment"):
        raise RequestError(400, "invalid_request", f"spatial_refs does not apply to {skill}",
                           "spatial_refs")
    _check_refs(refs)
    b64 = base64.b64encode(data).decode()
    line: dict[str, Any] = {"skill": skill, "image": b64}
    sampling = {k: settings[k] for k in ("temperature", "top_p", "max_tokens") if k in settings}
    try:
        if skill in ("caption", "query") and sampling:
            line["settings"] = sampling
        if skill == "caption":
            line["length"] = payload.get("length", "normal")
        elif skill == "query":
            question = payload.get("question")
            if isinstance(question, str) and refs is not None:
                question += f" [spatial refs: {len(refs)}]"
            line["question"] = question
            line["reasoning"] = bool(payload.get("reasoning", False))
        else:
            what = payload.get("object")
            if not isinstance(what, str) or not what.strip():
                raise RequestError(400, "invalid_request", "Missing required field: object",
                                   "object")
            # Detect and point are the Batch API's answers for the object; spatial refs make
            # them another object (an answer that shows the refs were sent).
            line["skill"] = "detect" if skill == "segment" else skill
            line["object"] = what + _refs_suffix(refs)
        if skill != "segment":
            result, usage = infer(line, any_format=any_format)
        else:
            fp = fingerprint_bytes(data, formats=None if any_format else _FORMATS)
            boxes = _boxes(fp[0], line["object"])
            if boxes:
                path = segment_path(boxes[0])
                a, b, c, d = boxes[0]
                result = {"path": path, "bbox": {"x_min": a, "y_min": b, "x_max": c, "y_max": d}}
            else:
                path, result = "", {"path": "", "bbox": None}
            usage = {"input_tokens": _tokens(fp[1], fp[2]), "output_tokens": len(path.split()) + 1}
    except LineError as exc:
        param = "image_url" if exc.code == "image_decode_failed" else None
        raise RequestError(400, exc.code, exc.message, param) from None
    max_objects = settings.get("max_objects")
    if isinstance(max_objects, int) and not isinstance(max_objects, bool) and max_objects >= 0:
        for key in ("objects", "points"):
            if key in result:
                result[key] = result[key][:max_objects]
    return result, usage


def _as_bytes(image: bytes | str) -> bytes:
    return image if isinstance(image, bytes) else image_bytes(image)


def expected_answer(skill: str, payload: dict[str, Any], image: bytes | str, *,
                    any_format: bool = False) -> dict[str, Any]:
    """What the emulator answers (and the official client returns) for ``POST /v1/<skill>``
    with ``payload``'s fields (``object``, ``question``, ``length``, ``reasoning``,
    ``spatial_refs``, ``settings``; ``image_url`` is ignored) on ``image``: the bytes sent, or
    the ``data:`` URI. E.g. ``{"path": "M ...", "bbox": {...}}`` for segment. Raises
    ``RequestError`` for a request the emulator refuses."""
    return compute(skill, payload, _as_bytes(image), any_format=any_format)[0]


def expected_usage(skill: str, payload: dict[str, Any], image: bytes | str, *,
                   any_format: bool = False) -> dict[str, int]:
    """``{"input_tokens", "output_tokens"}`` the emulator reports in ``metrics`` for the same
    request as ``expected_answer``."""
    return compute(skill, payload, _as_bytes(image), any_format=any_format)[1]


def metrics(usage: dict[str, int]) -> dict[str, Any]:
    """The ``metrics`` of an answer: the token counts and timings derived from them."""
    i, o = usage["input_tokens"], usage["output_tokens"]
    prefill = round(i * 0.05, 3)
    return {"input_tokens": i, "output_tokens": o, "prefill_time_ms": prefill,
            "decode_time_ms": round(o * 12.5, 3), "ttft_ms": round(prefill + 5.0, 3)}


def _chunks(text: str, words: int = 3) -> list[str]:
    parts = text.split(" ")
    return [" ".join(parts[i:i + words]) + (" " if i + words < len(parts) else "")
            for i in range(0, len(parts), words)] or [""]


def _sse(events: list[dict[str, Any]]) -> Response:
    def body() -> Iterator[bytes]:
        for event in events:
            yield f"data: {json.dumps(event)}\n\n".encode()

    return Response(body(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache"})


# -- the routes -----------------------------------------------------------------------------------
class RealtimeEmulation:
    """The real-time API of one emulated account, served by an ``emulator.server.Emulator``.

    ``owner.config`` is the live ``EmulatorConfig`` (its ``api_key`` and ``realtime``, a
    ``RealtimeConfig``). ``register(app)`` adds the routes. ``calls`` counts answered requests by
    skill (and ``unauthorised``); ``injected`` counts faults and rate-limit refusals by kind
    (``REALTIME_FAULT_KINDS``); ``seen`` keeps the last 1000 requests that reached a skill as
    ``{"skill", "model", "keyed", "fields"}`` (``keyed``: an ``X-Moondream-Auth`` header was
    sent; ``fields``: the payload's field names) for tests.
    """

    def __init__(self, owner: Any) -> None:
        self._owner = owner
        self.lock = threading.RLock()
        self.calls: dict[str, int] = {}
        self.injected: dict[str, int] = dict.fromkeys(REALTIME_FAULT_KINDS, 0)
        self.seen: list[dict[str, Any]] = []
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, at)
        self._rng = random.Random(0)
        self._rng_faults: RealtimeFaults | None = None

    @property
    def config(self) -> RealtimeConfig:
        return self._owner.config.realtime

    def register(self, app: Flask) -> None:
        """Serve ``POST /v1/<skill>`` for the five skills on ``app``."""
        for skill in SKILLS:
            app.add_url_rule(f"/v1/{skill}", f"realtime_{skill}",
                             lambda skill=skill: self._serve(skill), methods=["POST"])

    def _count(self, kind: str) -> None:
        with self.lock:
            self.calls[kind] = self.calls.get(kind, 0) + 1

    def _fault_rng(self, faults: RealtimeFaults) -> random.Random:
        if faults is not self._rng_faults:
            self._rng = random.Random(faults.seed)
            self._rng_faults = faults
        return self._rng

    def _authorised(self, cfg: RealtimeConfig) -> bool:
        if not cfg.require_key:
            return True
        key = request.headers.get("X-Moondream-Auth", "")
        return bool(key) and hmac.compare_digest(key.encode(), self._owner.config.api_key.encode())

    def _rate_limited(self, cfg: RealtimeConfig) -> float | None:
        """Seconds until the key may send again when this request is over ``rate_limit``, else
        None (a token taken)."""
        if cfg.rate_limit is None:
            return None
        key = request.headers.get("X-Moondream-Auth", "") if cfg.require_key else ""
        cap = max(1.0, cfg.rate_limit)
        with self.lock:
            now = time.monotonic()
            tokens, at = self._buckets.get(key, (cap, now))
            tokens = min(cap, tokens + (now - at) * cfg.rate_limit)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return None
            self._buckets[key] = (tokens, now)
            self.injected["rate_limited"] += 1
            return (1.0 - tokens) / cfg.rate_limit

    def _fault(self, faults: RealtimeFaults) -> Response | None:
        from moonbatch.emulator.server import request_fault  # server imports this module

        return request_fault(self, faults, request.get_data)

    def _serve(self, skill: str) -> Response:
        cfg = self.config
        faults = cfg.faults
        if faults.latency > 0:
            with self.lock:
                delay = self._fault_rng(faults).uniform(0, faults.latency)
            time.sleep(delay)
        if not self._authorised(cfg):
            self._count("unauthorised")
            request.get_data()
            return _error(401, "unauthorized", "Invalid or missing API key (X-Moondream-Auth)",
                          type_="authentication_error")
        wait = self._rate_limited(cfg)
        if wait is not None:
            request.get_data()
            response = _error(429, "rate_limited", f"Rate limit of {cfg.rate_limit:g} requests "
                              "per second exceeded; retry later", type_="rate_limit_error")
            response.headers["Retry-After"] = f"{max(0.001, wait):.3g}"
            return response
        fault = self._fault(faults)
        if fault is not None:
            return fault
        if (request.content_length or 0) > cfg.max_body_bytes:
            request.get_data()
            return _error(413, "payload_too_large", "Request body too large")
        payload = request.get_json(silent=True)
        if not isinstance(payload, dict):
            return _error(400, "invalid_request", "Body must be a JSON object")
        model = payload.get("model")
        with self.lock:
            self.seen.append({"skill": skill, "model": model,
                              "keyed": bool(request.headers.get("X-Moondream-Auth")),
                              "fields": sorted(payload)})
            del self.seen[:-1000]
        if model is not None and (not isinstance(model, str) or (
                cfg.models is not None and model.split("/", 1)[0] not in cfg.models)):
            return _error(400, "invalid_model", f"Unknown model: {model}", param="model")
        try:
            result, usage = compute(skill, payload, image_bytes(payload.get("image_url")))
        except RequestError as exc:
            return _error(exc.status, exc.code, exc.message, param=exc.param)
        if cfg.processing_seconds > 0:
            time.sleep(cfg.processing_seconds)
        self._count(skill)
        request_id = str(uuid.uuid4())
        mx = metrics(usage)
        if payload.get("stream") is True and skill in ("caption", "query", "segment"):
            return _sse(self._events(skill, result, mx, request_id))
        body: dict[str, Any] = {"request_id": request_id, **result, "metrics": mx}
        if skill in ("caption", "query"):
            body["finish_reason"] = "stop"
        return Response(json.dumps(body), mimetype="application/json")

    @staticmethod
    def _events(skill: str, result: dict[str, Any], mx: dict[str, Any], request_id: str
                ) -> list[dict[str, Any]]:
        """The server-sent events of a streamed answer (docs "skills/caption" and
        "skills/segment"; the client's ``_stream_response``/``_stream_segment_response``)."""
        rid = {"request_id": request_id}
        if skill == "segment":
            path = result["path"]
            n = max(1, math.ceil(len(path) / 40))
            deltas = [{"type": "path_delta", "chunk": path[i * 40:(i + 1) * 40],
                       "completed": False, **rid}
                      for i in range(n) if path[i * 40:(i + 1) * 40]]
            return [{"type": "bbox", "bbox": result["bbox"], "completed": False, **rid}, *deltas,
                    {"type": "final", "path": path, "bbox": result["bbox"], "completed": True,
                     "metrics": mx, **rid}]
        text = result["caption"] if skill == "caption" else result["answer"]
        final: dict[str, Any] = {"chunk": "", "completed": True, "metrics": mx,
                                 "finish_reason": "stop", **rid}
        if "reasoning" in result:
            final["reasoning"] = result["reasoning"]
        return [*({"chunk": c, "completed": False, **rid} for c in _chunks(text)), final]
