"""The Batch API client's retry policy, against a real HTTP server that misbehaves on purpose."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from moonbatch.workers.providers.moondream.client import BatchClient, _retry_after
from moonbatch.workers.providers.moondream.errors import (
    AuthenticationError,
    RequestRejected,
    TransientError,
)

SECRET = "sk-very-secret"


class Script:
    """A WSGI app answering from a script of (status, headers, body); the last one repeats."""

    def __init__(self, *steps):
        self.steps = list(steps)
        self.seen = []

    def __call__(self, environ, start_response):
        req = Request(environ)
        self.seen.append((req.method, req.full_path, req.headers.get("X-Moondream-Auth")))
        status, headers, body = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        return Response(json.dumps(body), status=status, headers=headers,
                        mimetype="application/json")(environ, start_response)


@pytest.fixture
def serve():
    servers = []

    def start(app):
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for s in servers:
        s.shutdown()


BATCH = {"id": "b1", "status": "processing", "progress": {"total": 3, "completed": 1}}


def test_retries_429_and_5xx_honouring_retry_after(serve):
    app = Script((429, {"Retry-After": "0.05"}, {"error": {"code": "rate_limited"}}),
                 (503, {}, {"error": {"message": "busy"}}), (200, {}, BATCH))
    sleeps = []
    client = BatchClient(serve(app), SECRET, max_attempts=5, backoff_initial=0.01,
                         sleep=sleeps.append)
    status = client.get_batch("b1")
    assert status.status == "processing" and status.progress["completed"] == 1
    assert len(app.seen) == 3 and all(s[2] == SECRET for s in app.seen)
    assert sleeps[0] == pytest.approx(0.05)  # Retry-After honoured
    assert 0 <= sleeps[1] <= 0.02  # full-jitter backoff otherwise


def test_gives_up_after_bounded_attempts_without_leaking_secrets(serve):
    app = Script((500, {}, {"error": {"message": "boom"}}))
    client = BatchClient(serve(app), SECRET, max_attempts=3, sleep=lambda s: None)
    with pytest.raises(TransientError) as info:
        client.get_batch("b1")
    assert len(app.seen) == 3
    assert info.value.status == 500 and SECRET not in str(info.value)


def test_client_errors_are_not_retried(serve):
    app = Script((400, {}, {"error": {"code": "invalid_request", "message": "bad parts"}}))
    client = BatchClient(serve(app), SECRET, max_attempts=5, sleep=lambda s: None)
    with pytest.raises(RequestRejected) as info:
        client.complete_upload("f", "u", [])
    assert len(app.seen) == 1 and info.value.code == "invalid_request"
    app401 = Script((401, {}, {"error": {"message": "Invalid API key"}}))
    with pytest.raises(AuthenticationError):
        BatchClient(serve(app401), SECRET, sleep=lambda s: None).get_batch("b1")


def test_network_errors_are_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = BatchClient(f"http://127.0.0.1:{port}/v1", SECRET, max_attempts=2,
                         sleep=lambda s: None)
    with pytest.raises(TransientError) as info:
        client.get_batch("b1")
    assert info.value.status is None and str(port) not in str(info.value)


def test_downloads_do_not_send_the_api_key(serve):
    app = Script((200, {}, {"line_index": 0}))
    base = serve(app)
    client = BatchClient(base, SECRET, sleep=lambda s: None)
    from moonbatch.workers.providers.moondream.answers import OutputFile

    assert client.download(OutputFile(index=0, url=base + "/out?signature=x")).startswith(b"{")
    assert app.seen[0][2] is None


def test_retry_after_forms():
    import httpx

    assert _retry_after(httpx.Response(429, headers={"Retry-After": "7"})) == 7
    assert _retry_after(httpx.Response(429)) is None
    assert _retry_after(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    date = _retry_after(httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    assert date == 0  # a date in the past: retry now


def test_upload_part_sends_the_part_with_its_length_without_copying_it():
    """A part goes out with a Content-Length (not chunked: R2 wants exact part sizes), whole on
    a retry too, and without a copy of it made to send it (httpcore copies what is left of
    a buffer after each partial send: 1 MiB slices bound that)."""
    import tracemalloc

    seen = []

    def serve_one(conn):  # a bare HTTP/1.1 server: counts the body in small reads, keeps none
        with conn, conn.makefile("rb", buffering=0) as f:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    byte = f.read(1)
                    if not byte:
                        return
                    head += byte
                fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if line)
                left, got = int(fields.get("Content-Length", 0)), 0
                while left:
                    chunk = conn.recv(min(left, 1 << 16))
                    got, left = got + len(chunk), left - len(chunk)
                seen.append((got, fields.get("Content-Length"), fields.get("Transfer-Encoding")))
                status, body = ((b"503 Busy", b"{}") if len(seen) == 1 else
                                (b"200 OK", b'{"etag": "e1"}'))
                conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def accept():
        while True:
            try:
                conn = listener.accept()[0]
            except OSError:  # closed: the test is over
                return
            serve_one(conn)

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=accept, daemon=True).start()
    data = bytes(range(256)) * (8 * 4096)  # 8 MiB
    client = BatchClient(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", SECRET,
                         max_attempts=3, sleep=lambda s: None)
    tracemalloc.start()
    try:
        part = client.upload_part("f1", "u1", 3, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        client.close()
        listener.close()
    assert (part.part_number, part.etag) == (3, "e1")
    assert seen == [(len(data), str(len(data)), None)] * 2
    assert peak < len(data) // 3, peak  # sent whole: 4-6 MB of copies of its rest
