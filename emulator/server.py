"""An emulator of the Moondream Batch API over real HTTP (seed ``002_b16f4baad5ce048b.txt``),
with fal's queue API (``emulator.fal``) and the Moondream real-time API (``emulator.realtime``,
``/v1/caption|query|detect|point|segment``) on the same port.

The whole protocol: ``mpu-create``, ``mpu-uploadpart``, ``mpu-complete``, ``mpu-abort``, list with
cursor, status moving ``chunking`` → ``processing`` → ``completed``/``failed`` with progress and
usage, output files behind expiring presigned-style URLs, ``X-Moondream-Auth`` checked. The seed's
limits and batch-level and per-line error codes apply; R2's rule that every part but the last has
the same size is enforced. Inference is ``emulator.inference`` (deterministic, from the pixels).

Time is virtual only in that it is fast: a batch chunks for ``chunking_seconds`` and then
processes ``lines_per_second`` lines after ``processing_seconds``; state advances when observed.

``EmulatorConfig.loose_answers`` makes the answers use every shape the contract allows besides
the seed's examples (FACTS.md: every field but ``id`` and ``status`` is optional): see
``Emulator._loose_view``.

Faults are injected on demand (``EmulatorConfig.faults``, a ``Faults``; none by default): 429s with
``Retry-After``, 5xx, dropped connections, latency, truncated or silently corrupted downloads,
failed batches and per-line ``processing_error`` rows. ``Emulator.injected`` counts them by kind.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import random
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import ClientDisconnected
from werkzeug.serving import make_server

from moonbatch.emulator.fal import FalConfig, FalEmulation
from moonbatch.emulator.inference import LineError, infer
from moonbatch.emulator.realtime import PATHS as REALTIME_PATHS
from moonbatch.emulator.realtime import RealtimeConfig, RealtimeEmulation

logging.getLogger("werkzeug").setLevel(logging.WARNING)

MB = 1_000_000

#: Keys of ``Emulator.injected``.
FAULT_KINDS = ("429", "5xx", "drop", "truncate", "corrupt", "batch_failed", "line_error",
               "lost_create", "lost_complete")

_5XX = {500: ("internal_error", "Internal server error"),
        502: ("bad_gateway", "Bad gateway"),
        503: ("service_unavailable", "Service temporarily unavailable")}


@dataclasses.dataclass(frozen=True)
class Faults:
    """Faults the emulator injects; the default injects none.

    Immutable: change the faults of a running emulator by assigning a new one
    (``server.config.faults = Faults(...)`` or ``dataclasses.replace(...)``); the next request
    uses it, and the emulator's fault RNG restarts from its ``seed``.

    - ``rate_429``, ``rate_5xx``, ``rate_drop``: fractions of authenticated API requests (every
      ``/v1/batch`` endpoint; not output downloads, not ``/healthz``, not 401s) answered 429 (with
      ``Retry-After: retry_after`` unless it is None), 500/502/503, or with the connection closed
      and no response at all. One draw per request decides among them (their sum is at most 1).
      The request never reaches its handler: an uploadpart so refused stores no part.
    - ``latency``: every request but ``/healthz`` (downloads and 401s included) first waits
      ``uniform(0, latency)`` seconds.
    - ``rate_truncate``, ``rate_corrupt``: fractions of output downloads (the 200s) whose body is
      cut after half (full ``Content-Length`` announced, then the connection closes), or has the
      right length with a few bytes in the middle replaced by NUL (that JSON line no longer parses).
    - ``batch_fail_rate``: fraction of batches that end ``failed`` with ``error.code =
      batch_fail_code`` at the moment they would complete (after chunking).
    - ``line_error_rate``: fraction of the lines of a completing batch whose row is a
      ``processing_error``; drawn from an RNG seeded with (``seed``, batch id), so the same line
      in another batch has a fresh chance.
    - ``lose_create_answers``, ``lose_complete_answers``: fractions of ``mpu-create`` and
      ``mpu-complete`` requests that succeed (the upload, or the batch, is created) and then
      have their connection closed with no answer: the lost answer FACTS.md describes.

    Request-level faults draw from one ``random.Random(seed)`` (under the emulator's lock), in
    the order requests arrive; batch and line faults from per-batch RNGs.
    """

    seed: int = 0
    rate_429: float = 0.0
    retry_after: float | None = 1.0
    rate_5xx: float = 0.0
    rate_drop: float = 0.0
    latency: float = 0.0
    rate_truncate: float = 0.0
    rate_corrupt: float = 0.0
    batch_fail_rate: float = 0.0
    batch_fail_code: str = "processing_failed"
    line_error_rate: float = 0.0
    lose_create_answers: float = 0.0
    lose_complete_answers: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rate_429", "rate_5xx", "rate_drop", "rate_truncate", "rate_corrupt",
                     "batch_fail_rate", "line_error_rate", "lose_create_answers",
                     "lose_complete_answers"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Faults.{name} must be in [0, 1], not {value!r}")
        if self.rate_429 + self.rate_5xx + self.rate_drop > 1.0 + 1e-9:
            raise ValueError("Faults.rate_429 + rate_5xx + rate_drop must be at most 1")
        if self.rate_truncate + self.rate_corrupt > 1.0 + 1e-9:
            raise ValueError("Faults.rate_truncate + rate_corrupt must be at most 1")
        if self.latency < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("Faults.latency and retry_after must not be negative")


@dataclasses.dataclass
class EmulatorConfig:
    """Behaviour of an emulator; fields may be changed while it runs (tests do)."""

    api_key: str = "emulator-key"
    chunking_seconds: float = 0.2
    processing_seconds: float = 0.3
    lines_per_second: float = 5000.0
    lines_per_output_file: int = 1000
    shuffle_outputs: bool = True
    url_ttl: float = 3600.0
    min_part_size: int = 5 * 1024 * 1024  # R2's minimum for every part but the last
    max_part_size: int = 100 * MB
    max_file_bytes: int = 2000 * MB
    max_lines: int = 100_000
    max_line_bytes: int = 10 * MB
    # The models a batch may name (FACTS.md: 3 Preview, the default, and 3.1 in both spellings
    # the price list uses); a finetune ``<model>/<id>@<step>`` of one of them too. Any other
    # fails the batch with ``invalid_model``.
    models: tuple[str, ...] = ("moondream3-preview", "moondream3.1", "moondream3.1-9B-A2B")
    faults: Faults = dataclasses.field(default_factory=Faults)
    # Answers in the thinner and odder shapes the contract allows (see Emulator._loose_view).
    loose_answers: bool = False
    # The fal queue API served on the same port (emulator.fal): its key and behaviour.
    fal_key: str = "emulator-fal-key"
    fal: FalConfig = dataclasses.field(default_factory=FalConfig)
    # The real-time API (emulator.realtime) at /v1/<skill>, with ``api_key`` as its key unless
    # ``realtime.require_key`` is False (Moondream Station). Assign a new RealtimeConfig to change it.
    realtime: RealtimeConfig = dataclasses.field(default_factory=RealtimeConfig)


@dataclasses.dataclass
class _Upload:
    file_id: str
    upload_id: str
    parts: dict[int, tuple[str, str, int]]  # number → (path, etag, size)
    created: float


@dataclasses.dataclass
class _Batch:
    id: str
    path: str
    size: int
    model: str
    created: float
    # Uploaded part files, concatenated into ``path`` when chunking starts (not inside the
    # mpu-complete request, which would then take as long as copying the whole file).
    parts: list[str] = dataclasses.field(default_factory=list)
    status: str = "chunking"
    total: int = 0
    failed_lines: int = 0
    processing_end: float = 0.0
    completed_at: float | None = None
    error: dict[str, str] | None = None
    usage: dict[str, int] | None = None
    outputs: list[bytes] = dataclasses.field(default_factory=list)
    views: int = 0  # status answers given in the current status


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _new_id() -> str:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    return "01" + "".join(secrets.choice(alphabet) for _ in range(18))


def _error(status: int, code: str, message: str, type_: str = "invalid_request_error",
           param: str | None = None) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _hang_up(sock: socket.socket | None) -> None:
    """Close a client's TCP connection (FIN) under werkzeug's feet. The handler's own file
    objects keep the descriptor open until it finishes, so it reads EOF rather than EBADF."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _save_body(path: str, limit: int) -> tuple[int, str] | None:
    """Write the current request's body to ``path`` as it arrives and return its size and
    quoted MD5 (the part's ETag, as R2 gives it), or None (nothing written; the rest of the
    body read and dropped) if it reaches ``limit`` bytes. The body goes to a file of its own
    first: a part sent again and cut short never spoils the copy already received.

    1 MiB reads into one buffer: the socket read, the hash and the write each release the GIL,
    so receiving a part costs the process that hosts the emulator (a benchmark's, a test's)
    little interpreter time, where a whole-body ``get_data`` held it for 64 KiB reads, two
    copies and the hash."""
    stream = request.stream
    buf = bytearray(1024 * 1024)
    view = memoryview(buf)
    md5 = hashlib.md5()
    size = 0
    partial = f"{path}.{secrets.token_hex(4)}"
    try:
        with open(partial, "wb") as f:
            while n := stream.readinto(buf):
                size += n
                if size >= limit:
                    break
                md5.update(view[:n])
                f.write(view[:n])
        if size < limit:
            os.replace(partial, path)
            return size, '"' + md5.hexdigest() + '"'
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    while stream.readinto(buf):
        pass
    return None


def _dropped(sock: socket.socket | None) -> Response:
    """A response that sends nothing: iterating it hangs up and raises ``ConnectionAbortedError``,
    which werkzeug's dev server takes for a client that went away (no log, no traceback)."""
    def body() -> Iterator[bytes]:
        _hang_up(sock)
        raise ConnectionAbortedError("connection dropped by fault injection")
        yield b""  # pragma: no cover - makes this a generator

    return Response(body(), status=500, mimetype="application/json")


def request_fault(owner: Any, faults: Any, discard_body: Callable[[], object]
                  ) -> Response | None:
    """429, 5xx or a dropped connection for the current request, or None, drawn once from
    ``owner._fault_rng(faults)`` by ``faults``' ``rate_429``, ``rate_5xx`` and ``rate_drop``
    (a 429 carries ``Retry-After: retry_after`` unless None) and counted in
    ``owner.injected`` under ``owner.lock``. ``discard_body`` reads the request's body before
    an answer (so the client reads it, not a reset); a drop hangs up before."""
    total = faults.rate_429 + faults.rate_5xx + faults.rate_drop
    if total <= 0:
        return None
    with owner.lock:
        rng = owner._fault_rng(faults)
        r = rng.random()
        if r < faults.rate_429:
            kind = "429"
        elif r < faults.rate_429 + faults.rate_5xx:
            kind, status = "5xx", rng.choice(sorted(_5XX))
        elif r < total:
            kind = "drop"
        else:
            return None
        owner.injected[kind] += 1
    if kind == "drop":  # before the body is read: the client may still be sending it
        return _dropped(request.environ.get("werkzeug.socket"))
    discard_body()
    if kind == "429":
        response = _error(429, "rate_limited", "Rate limit exceeded; retry later",
                          type_="rate_limit_error")
        if faults.retry_after is not None:
            response.headers["Retry-After"] = f"{faults.retry_after:g}"
        return response
    code, message = _5XX[status]
    return _error(status, code, message, type_="server_error")


def _truncated(data: bytes, sock: socket.socket | None) -> Response:
    """``data``'s full ``Content-Length``, then half of it, then the connection closes."""
    def body() -> Iterator[bytes]:
        yield data[:len(data) // 2]
        _hang_up(sock)

    return Response(body(), mimetype="application/x-ndjson",
                    headers={"Content-Length": str(len(data))})


def _corrupted(data: bytes) -> bytes:
    """``data`` with up to 4 bytes from the middle on replaced by NUL (newlines kept): the same
    length and line count, but that line is no longer JSON (NUL is valid in no JSON context)."""
    buf = bytearray(data)
    changed, i = 0, len(buf) // 2
    while changed < 4 and i < len(buf):
        if buf[i] != 0x0A:
            buf[i] = 0
            changed += 1
        i += 1
    return bytes(buf)


class Emulator:
    """State and behaviour of one emulated account; ``app`` is its Flask application."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.dir = tempfile.mkdtemp(prefix="moonbatch-emulator-")
        self.uploads: dict[str, _Upload] = {}
        self.batches: dict[str, _Batch] = {}
        self.lock = threading.RLock()
        self.secret = secrets.token_bytes(16)
        self.requests: dict[str, int] = {}
        self.injected: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self._rng = random.Random(0)
        self._rng_faults: Faults | None = None
        self.app = self._make_app()

    def close(self) -> None:
        """Delete the emulator's files."""
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------
    def _count(self, action: str) -> None:
        with self.lock:
            self.requests[action] = self.requests.get(action, 0) + 1

    def _inject(self, kind: str) -> None:
        with self.lock:
            self.injected[kind] += 1

    def _fault_rng(self, faults: Faults) -> random.Random:
        """The request-fault RNG (call with ``self.lock`` held); a new ``Faults`` reseeds it."""
        if faults is not self._rng_faults:
            self._rng = random.Random(faults.seed)
            self._rng_faults = faults
        return self._rng

    def _delay(self, faults: Faults) -> None:
        if faults.latency > 0:
            with self.lock:
                delay = self._fault_rng(faults).uniform(0, faults.latency)
            time.sleep(delay)

    def _request_fault(self, faults: Faults) -> Response | None:
        """429, 5xx or a dropped connection for this API request, or None."""
        return request_fault(self, faults, self._discard_body)

    @staticmethod
    def _discard_body() -> None:
        try:
            while request.stream.read(1024 * 1024):
                pass
        except (ClientDisconnected, OSError):
            pass

    def _download_fault(self, faults: Faults, data: bytes) -> Response | None:
        total = faults.rate_truncate + faults.rate_corrupt
        if total <= 0:
            return None
        with self.lock:
            r = self._fault_rng(faults).random()
            if r < faults.rate_truncate:
                kind = "truncate"
            elif r < total:
                kind = "corrupt"
            else:
                return None
            self.injected[kind] += 1
        if kind == "truncate":
            return _truncated(data, request.environ.get("werkzeug.socket"))
        return Response(_corrupted(data), mimetype="application/x-ndjson")

    def _lose_answer(self, rate: float, kind: str) -> Response | None:
        """With probability ``rate``: a response that closes the connection instead of
        answering (the caller has already acted on the request)."""
        if rate <= 0:
            return None
        with self.lock:
            if self._fault_rng(self.config.faults).random() >= rate:
                return None
            self.injected[kind] += 1
        return _dropped(request.environ.get("werkzeug.socket"))

    def _authorised(self) -> bool:
        key = request.headers.get("X-Moondream-Auth", "")
        return hmac.compare_digest(key.encode(), self.config.api_key.encode())

    def _sign(self, batch_id: str, index: int, expires: int) -> str:
        msg = f"{batch_id}/{index}/{expires}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:32]

    def _advance(self, b: _Batch) -> None:
        """Move a batch along its lifecycle to where the clock says it is."""
        cfg, now = self.config, time.time()
        # Loose answers: every shape is shown at least once (queued, chunking, processing).
        hold = cfg.loose_answers
        if b.status == "chunking" and now >= b.created + cfg.chunking_seconds and (
                not hold or b.views >= 2):
            self._chunk(b)
            b.views = 0
        if b.status == "processing" and now >= b.processing_end and (not hold or b.views >= 1):
            self._process(b)
            b.views = 0

    def _chunk(self, b: _Batch) -> None:
        cfg = self.config
        with open(b.path, "wb") as out:  # assemble the file from its parts
            for part_path in b.parts:
                with open(part_path, "rb") as f:
                    shutil.copyfileobj(f, out, 1024 * 1024)
                os.unlink(part_path)
        b.parts = []
        fail = None
        if b.model not in cfg.models and b.model.split("/", 1)[0] not in cfg.models:
            fail = ("invalid_model", f"Unknown model: {b.model}")
        elif b.size > cfg.max_file_bytes:
            fail = ("limit_exceeded", f"File is {b.size} bytes; the limit is {cfg.max_file_bytes}")
        else:
            n = 0
            with open(b.path, "rb") as f:
                for n, raw in enumerate(f, start=1):
                    if len(raw.rstrip(b"\n")) > cfg.max_line_bytes:  # the newline is not content
                        fail = ("limit_exceeded", f"Line {n - 1} exceeds {cfg.max_line_bytes} bytes")
                        break
                    line = raw.rstrip(b"\n")
                    if not line.strip():
                        fail = ("validation_error", f"Blank line at line {n - 1}")
                        break
                    try:
                        obj = json.loads(line.decode("utf-8"))
                    except (UnicodeDecodeError, ValueError):
                        fail = ("validation_error", f"Invalid JSON or UTF-8 at line {n - 1}")
                        break
                    if not isinstance(obj, dict):
                        fail = ("validation_error", f"Line {n - 1} is not a JSON object")
                        break
            if fail is None and n > cfg.max_lines:
                fail = ("limit_exceeded", f"{n} lines; the limit is {cfg.max_lines}")
            elif fail is None and n == 0:
                fail = ("empty_batch", "No valid lines in file")
            b.total = n
        if fail:
            b.status, b.error = "failed", {"code": fail[0], "message": fail[1]}
            b.completed_at = time.time()
            os.unlink(b.path)
            return
        b.status = "processing"
        b.processing_end = time.time() + cfg.processing_seconds + b.total / cfg.lines_per_second

    def _process(self, b: _Batch) -> None:
        cfg = self.config
        faults = cfg.faults
        if faults.batch_fail_rate > 0 and \
                random.Random(f"{faults.seed}:{b.id}:batch").random() < faults.batch_fail_rate:
            b.status = "failed"
            b.error = {"code": faults.batch_fail_code,
                       "message": f"Batch processing failed (injected fault: {faults.batch_fail_code})"}
            b.completed_at = time.time()
            os.unlink(b.path)
            self._inject("batch_failed")
            return
        line_rng = (random.Random(f"{faults.seed}:{b.id}:lines") if faults.line_error_rate > 0
                    else None)
        rows: list[bytes] = []
        usage = {"input_tokens": 0, "output_tokens": 0}
        with open(b.path, "rb") as f:
            for index, raw in enumerate(f):
                obj = json.loads(raw)
                row: dict[str, Any] = {"line_index": index}
                if "id" in obj:
                    row["id"] = obj["id"]
                if line_rng is not None and line_rng.random() < faults.line_error_rate:
                    row.update(status="error", error={
                        "code": "processing_error",
                        "message": "Failed during inference (injected fault)"})
                    b.failed_lines += 1
                    self._inject("line_error")
                    rows.append(json.dumps(row).encode())
                    continue
                try:
                    result, use = infer(obj)
                    row.update(status="ok", result=result, usage=use)
                    usage["input_tokens"] += use["input_tokens"]
                    usage["output_tokens"] += use["output_tokens"]
                except LineError as exc:
                    row.update(status="error", error={"code": exc.code, "message": exc.message})
                    b.failed_lines += 1
                except Exception as exc:  # an emulator bug must not wedge the batch
                    row.update(status="error", error={"code": "processing_error",
                                                      "message": f"Inference failed: {exc}"})
                    b.failed_lines += 1
                rows.append(json.dumps(row).encode())
        os.unlink(b.path)  # "Input files are deleted immediately after processing completes"
        if cfg.shuffle_outputs:
            random.Random(b.id).shuffle(rows)
        per = max(1, cfg.lines_per_output_file)
        b.outputs = [b"\n".join(rows[i:i + per]) + b"\n" for i in range(0, len(rows), per)]
        b.usage = usage
        b.status = "completed"
        b.completed_at = time.time()

    def _view(self, b: _Batch) -> dict[str, Any]:
        cfg, now = self.config, time.time()
        out: dict[str, Any] = {"id": b.id, "status": b.status, "model": b.model,
                               "created_at": _iso(b.created)}
        if b.status == "chunking":
            out["progress"] = {"total": 0, "completed": 0}
        elif b.status == "processing":
            span = max(b.processing_end - (b.created + cfg.chunking_seconds), 1e-6)
            frac = min(1.0, max(0.0, 1 - (b.processing_end - now) / span))
            out["progress"] = {"total": b.total, "completed": int(b.total * frac * 0.999)}
        else:
            if b.status == "failed":  # nothing was processed
                out["progress"] = {"total": b.total, "completed": 0, "failed": 0}
            else:
                out["progress"] = {"total": b.total, "completed": b.total - b.failed_lines,
                                   "failed": b.failed_lines}
            out["completed_at"] = _iso(b.completed_at or now)
        if b.status == "failed":
            out["error"] = b.error
        if b.status == "completed":
            out["usage"] = b.usage
            expires = math.ceil(now + cfg.url_ttl)
            base = request.host_url.rstrip("/")
            out["outputs"] = [
                {"index": i, "url": f"{base}/v1/_outputs/{b.id}/{i}.jsonl?expires={expires}"
                                    f"&signature={self._sign(b.id, i, expires)}"}
                for i in range(len(b.outputs))]
            out["expires_at"] = _iso((b.completed_at or now) + 7 * 86400)
        if cfg.loose_answers:
            out = self._loose_view(b, out)
        b.views += 1
        return out

    def _loose_view(self, b: _Batch, out: dict[str, Any]) -> dict[str, Any]:
        """``out`` (a ``_view``) in the other shapes a client must accept: ``queued`` (a status
        the seed does not name) for the first answer while chunking; ``progress``, ``outputs``,
        ``usage`` and ``error`` null until there is something to say; counts as floats,
        ``failed`` left out while 0, extra null fields (``eta``); outputs as plain URL
        strings; unknown top-level fields. ``_advance`` holds a batch in chunking for two
        answers and in processing for one, so that a poller sees each shape."""
        out = {**out, "object": "batch", "metadata": None, "request_counts": None,
               "completed_at": out.get("completed_at"), "expires_at": out.get("expires_at"),
               "usage": out.get("usage"), "error": out.get("error")}
        if b.status == "chunking":
            if b.views == 0:
                out["status"] = "queued"
            out["progress"], out["outputs"] = None, None
            return out
        progress = out["progress"]
        loose = {"total": float(progress["total"]), "completed": progress["completed"] + 0.5,
                 "eta": None}
        if b.status != "processing":
            loose["completed"] = float(progress["completed"])
            if progress["failed"]:
                loose["failed"] = float(progress["failed"])
        out["progress"] = loose
        if out["usage"] is not None:
            out["usage"] = {k: float(v) for k, v in out["usage"].items()}
        out["outputs"] = [o["url"] for o in out["outputs"]] if "outputs" in out else None
        return out

    # -- routes -----------------------------------------------------------------------------
    def _make_app(self) -> Flask:
        app = Flask("moonbatch-emulator")
        app.config["MAX_CONTENT_LENGTH"] = None
        self.fal = FalEmulation(self)  # fal's queue API under /fal-ai/, with its own auth
        self.fal.register(app)
        # The real-time API under /v1/<skill>, with its own auth, rate limit and faults.
        self.realtime = RealtimeEmulation(self)
        self.realtime.register(app)

        @app.before_request
        def _auth() -> Response | None:
            if request.path == "/healthz" or request.path.startswith("/fal-ai/") or \
                    request.path in REALTIME_PATHS:
                return None
            faults = self.config.faults
            self._delay(faults)
            if request.path.startswith("/v1/_outputs/"):
                return None
            if not self._authorised():
                self._count("unauthorised")
                return _error(401, "unauthorized", "Invalid or missing API key",
                              type_="authentication_error")
            return self._request_fault(faults)

        @app.get("/healthz")
        def healthz() -> Response:
            return _json({"ok": True})

        @app.route("/v1/batch", methods=["POST", "GET"])
        def batch_root() -> Response:
            if request.method == "GET":
                return self.list_batches()
            if request.args.get("action") != "mpu-create":
                return _error(400, "invalid_request", "Unknown action", param="action")
            return self.mpu_create()

        @app.route("/v1/batch/<ident>", methods=["PUT", "POST", "DELETE", "GET"])
        def batch_item(ident: str) -> Response:
            action = request.args.get("action")
            if request.method == "GET" and action is None:
                return self.get_batch(ident)
            if request.method == "PUT" and action == "mpu-uploadpart":
                return self.upload_part(ident)
            if request.method == "POST" and action == "mpu-complete":
                return self.complete(ident)
            if request.method == "DELETE" and action == "mpu-abort":
                return self.abort(ident)
            return _error(400, "invalid_request", "Unknown action or method", param="action")

        @app.get("/v1/_outputs/<batch_id>/<int:index>.jsonl")
        def output(batch_id: str, index: int) -> Response:
            self._count("download")
            try:
                expires = int(request.args.get("expires", "0"))
            except ValueError:
                expires = 0
            sig = request.args.get("signature", "")
            if not hmac.compare_digest(sig, self._sign(batch_id, index, expires)):
                return _error(403, "signature_mismatch", "Invalid signature",
                              type_="authentication_error")
            if time.time() > expires:
                return _error(403, "url_expired", "Request has expired",
                              type_="authentication_error")
            with self.lock:
                b = self.batches.get(batch_id)
                if b is None or b.status != "completed" or index >= len(b.outputs):
                    return _error(404, "not_found", "No such output file")
                data = b.outputs[index]
            return (self._download_fault(self.config.faults, data)
                    or Response(data, mimetype="application/x-ndjson"))

        return app

    def mpu_create(self) -> Response:
        self._count("mpu-create")
        with self.lock:
            up = _Upload(_new_id(), secrets.token_hex(16), {}, time.time())
            self.uploads[up.file_id] = up
        lost = self._lose_answer(self.config.faults.lose_create_answers, "lost_create")
        if lost is not None:
            return lost
        if self.config.loose_answers:  # only fileId and uploadId are needed
            return _json({"fileId": up.file_id, "uploadId": up.upload_id, "key": None,
                          "expires_at": None})
        return _json({"fileId": up.file_id, "uploadId": up.upload_id,
                      "key": f"requests/org_emulator/{up.file_id}.jsonl"})

    def _upload_of(self, file_id: str) -> tuple[_Upload | None, Response | None]:
        up = self.uploads.get(file_id)
        if up is None or request.args.get("uploadId") != up.upload_id:
            return None, _error(404, "not_found", "No such upload (fileId/uploadId)")
        return up, None

    def upload_part(self, file_id: str) -> Response:
        self._count("mpu-uploadpart")
        cfg = self.config
        try:
            number = int(request.args.get("partNumber", ""))
        except ValueError:
            number = 0
        if not 1 <= number <= 10_000:
            return _error(400, "invalid_request", "partNumber must be 1..10000", param="partNumber")
        declared = request.content_length
        if declared is not None and declared >= cfg.max_part_size:
            return _error(413, "payload_too_large", "Part must be under 100MB")
        with self.lock:
            up, err = self._upload_of(file_id)
        if err:
            return err
        path = os.path.join(self.dir, f"{file_id}.part{number}")
        saved = _save_body(path, cfg.max_part_size)
        if saved is None:
            return _error(413, "payload_too_large", "Part must be under 100MB")
        size, etag = saved
        with self.lock:
            up.parts[number] = (path, etag, size)
        if cfg.loose_answers:  # only the etag is needed
            return _json({"etag": etag, "partNumber": None, "size": float(size)})
        return _json({"etag": etag, "partNumber": number})

    def complete(self, file_id: str) -> Response:
        self._count("mpu-complete")
        cfg = self.config
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("parts"), list) or not body["parts"]:
            return _error(400, "invalid_request", "Body must be {\"parts\": [...]}", param="parts")
        model = body.get("model") or "moondream3-preview"
        if not isinstance(model, str):
            return _error(400, "invalid_request", "model must be a string", param="model")
        with self.lock:
            up, err = self._upload_of(file_id)
            if err:
                return err
            chosen: list[tuple[str, str, int]] = []
            last = 0
            for p in body["parts"]:
                try:
                    n, etag = int(p["partNumber"]), str(p["etag"])
                except (KeyError, TypeError, ValueError):
                    return _error(400, "invalid_request", "Each part needs partNumber and etag")
                if n <= last:
                    return _error(400, "invalid_request", "Parts must be in ascending order")
                last = n
                have = up.parts.get(n)
                if have is None or have[1].strip('"') != etag.strip('"'):
                    return _error(400, "invalid_request", f"Part {n} not found or ETag mismatch")
                chosen.append(have)
            sizes = [c[2] for c in chosen]
            if len(set(sizes[:-1])) > 1 or (len(sizes) > 1 and sizes[-1] > sizes[0]):
                return _error(400, "invalid_request",
                              "All non-trailing parts must have the same length")
            if len(sizes) > 1 and sizes[0] < cfg.min_part_size:
                return _error(400, "invalid_request", "Your proposed upload is smaller than the "
                              "minimum allowed object size")
            del self.uploads[file_id]
            path = os.path.join(self.dir, f"{file_id}.jsonl")
            keep = {c[0] for c in chosen}
            for part_path, _, _ in up.parts.values():
                if part_path not in keep:  # uploaded but not named in the complete call
                    os.unlink(part_path)
            b = _Batch(id=_new_id(), path=path, size=sum(sizes), model=model, created=time.time(),
                       parts=[c[0] for c in chosen])
            self.batches[b.id] = b
        lost = self._lose_answer(self.config.faults.lose_complete_answers, "lost_complete")
        if lost is not None:
            return lost
        if cfg.loose_answers:  # only the id is needed
            return _json({"id": b.id, "status": None, "object": "batch"})
        return _json({"id": b.id, "status": "chunking", "size": b.size})

    def abort(self, file_id: str) -> Response:
        self._count("mpu-abort")
        with self.lock:
            up, err = self._upload_of(file_id)
            if err:
                return err
            del self.uploads[file_id]
            for part_path, _, _ in up.parts.values():
                os.unlink(part_path)
        return _json({"ok": True})

    def get_batch(self, batch_id: str) -> Response:
        self._count("status")
        with self.lock:
            b = self.batches.get(batch_id)
            if b is None:
                return _error(404, "not_found", "No such batch")
            self._advance(b)
            return _json(self._view(b))

    def list_batches(self) -> Response:
        self._count("list")
        try:
            limit = int(request.args.get("limit", "50"))
        except ValueError:
            return _error(400, "invalid_request", "limit must be an integer", param="limit")
        if not 1 <= limit <= 100:
            return _error(400, "invalid_request", "limit must be 1..100", param="limit")
        cursor = request.args.get("cursor")
        with self.lock:
            ordered = sorted(self.batches.values(), key=lambda b: (-b.created, b.id))
            start = 0
            if cursor:
                try:
                    after = base64.urlsafe_b64decode(cursor.encode()).decode()
                    start = next(i for i, b in enumerate(ordered) if b.id == after) + 1
                except (ValueError, StopIteration):
                    return _error(400, "invalid_request", "Invalid cursor", param="cursor")
            page = ordered[start:start + limit]
            for b in page:
                self._advance(b)
            views = [self._view(b) for b in page]
        has_more = start + limit < len(ordered)
        nxt = base64.urlsafe_b64encode(page[-1].id.encode()).decode() if has_more and page else None
        return _json({"batches": views, "next_cursor": nxt, "has_more": has_more})


class EmulatorServer:
    """An ``Emulator`` served over HTTP on ``host:port`` (port 0: any free port) in a thread.

    ``url`` is the API base (``http://127.0.0.1:PORT/v1``, also the real-time API's, what
    ``md.vl(endpoint=...)`` and ``MOONBATCH_REALTIME_URL`` name); ``fal_url`` the fal queue base
    (``http://127.0.0.1:PORT``, what ``MOONBATCH_FAL_QUEUE_URL`` names). Use as a context manager,
    or ``start()``/``stop()``.
    """

    def __init__(self, config: EmulatorConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.emulator = Emulator(config)
        self._server = make_server(host, port, self.emulator.app, threaded=True)
        self.host, self.port = host, self._server.server_port
        self.url = f"http://{host}:{self.port}/v1"
        self.fal_url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> EmulatorConfig:
        """The live configuration (changes apply to the next request)."""
        return self.emulator.config

    def start(self) -> EmulatorServer:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="moonbatch-emulator")
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and delete the emulator's files."""
        self._server.shutdown()
        self._server.server_close()
        self.emulator.close()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
