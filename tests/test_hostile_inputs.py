"""Inputs from elsewhere are data, not trusted paths: a manifest written by another team, a
dataset downloaded from the web. Over real servers: moto's S3, a real Redis, real Celery
workers with default settings, the emulators over HTTP, and real local HTTP servers (an
internal "secret" server that records every request, a redirector, a slow-drip server).

- A hostile CSV manifest on S3 (malformed URLs, the worker's own files, loopback services,
  a redirect to one, a 64-character DNS label, a NUL) on workers with default settings: the
  good photos are annotated, every hostile row is an error row with its code, no request
  reaches the internal server, the worker's local image is in no result, workers stay up.
  Both providers.
- A slow-drip URL ends as ``read_timeout`` within the item deadline; a body over the size cap
  as ``object_too_large`` (http, S3 and local files).
- The address policy (every address class, IPv6 forms, the allow-list), checked at connect
  time, so a name resolving to loopback is refused as its address is.
- Manifest lines and fields have a length limit.
"""

from __future__ import annotations

import csv
import http.server
import io
import json
import random
import threading
import time
import uuid
from collections.abc import Callable

import pytest
from PIL import Image

from tests.conftest import (
    Worker,
    expected_result,
    photos_dir,
    read_results,
    run_cli,
)

ALLOW_SETTINGS = ("MOONBATCH_ALLOW_PRIVATE_HOSTS", "MOONBATCH_ALLOW_LOCAL_FILES",
                  "MOONBATCH_ITEM_MAX_BYTES", "MOONBATCH_ITEM_DEADLINE", "MOONBATCH_ITEM_BUCKETS")


# -- real local HTTP servers ---------------------------------------------------------------------
class LocalServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1:0 (a context manager). ``routes`` maps a path to
    ``handler(request) -> None`` (it writes the answer); every request's path is recorded in
    ``requests``, whether it has a route or not (404)."""

    def __init__(self, routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]
                 ) -> None:
        self.routes = routes
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's name
                outer.requests.append(self.path)
                route = outer.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (what a capped or timed-out fetch does)

            def log_message(self, format, *args):  # noqa: A002 - the base class's name
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_bytes(data: bytes, content_type: str = "image/png"):
    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return route


def redirect_to(location: str):
    def route(h):
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def slow_drip(interval: float = 0.25, size: int = 10_000_000):
    """Headers at once, then one byte every ``interval`` seconds (until the client leaves)."""
    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(size))
        h.end_headers()
        for _ in range(size):
            h.wfile.write(b"\x89")
            h.wfile.flush()
            time.sleep(interval)
    return route


def endless(chunk: int = 64 * 1024, total: int = 1 << 40):
    """A chunked body without a length that never ends (bounded only by ``total``)."""
    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        block = b"\0" * chunk
        sent = 0
        while sent < total:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            sent += len(block)
    return route


def noise_png(seed: int, size=(64, 48)) -> bytes:
    """A PNG no other image in the test shares (random pixels)."""
    rng = random.Random(seed)
    img = Image.new("RGB", size)
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256))
                 for _ in range(size[0] * size[1])])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def photo(name: str) -> bytes:
    return (photos_dir() / name).read_bytes()


def default_env(env: dict[str, str], queue: str, **extra: str) -> dict[str, str]:
    """The session env with a queue of the test's own and none of the allow settings (the
    defaults a fleet ships with), plus ``extra``."""
    return {**{k: v for k, v in env.items() if k not in ALLOW_SETTINGS},
            "MOONBATCH_QUEUE": queue, **extra}


def write_csv(rows: list[tuple[str, str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["id", "image"])
    writer.writerows(rows)
    return buf.getvalue().encode()


def expected(provider: str, image: bytes) -> dict:
    """The caption an emulator answers for ``image`` (without ``raw``)."""
    if provider == "moondream":
        return expected_result(image, {"skill": "caption"})
    from tests.test_fal_provider import expected_row

    return expected_row("fal-ai/moondream3-preview/caption", {"length": "normal"}, image,
                        "caption")[0]


# -- the hostile manifest ------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["moondream", "fal"])
def test_hostile_manifest_on_s3_with_default_settings(provider, s3, bucket, env, tmp_path):
    secret = noise_png(1)  # what the internal server holds
    local = noise_png(2)  # an image on the worker's own disk
    local_path = tmp_path / "worker-local.png"
    local_path.write_bytes(local)
    s3.put_object(Bucket=bucket, Key="in/imgs/astronaut.png", Body=photo("astronaut.png"))
    s3.put_object(Bucket=bucket, Key="in/imgs/coffee.png", Body=photo("coffee.png"))

    with LocalServer({"/secret.png": serve_bytes(secret)}) as internal, \
            LocalServer({"/photo.png": serve_bytes(photo("chelsea.png")),
                         "/redirect": redirect_to(f"{internal.url}/secret.png"),
                         "/to-localhost": redirect_to(
                             f"http://localhost:{internal.port}/secret.png")}) as allowed:
        good = {"astronaut": ("imgs/astronaut.png", photo("astronaut.png")),
                "coffee": (f"s3://{bucket}/in/imgs/coffee.png", photo("coffee.png")),
                "chelsea": (f"{allowed.url}/photo.png", photo("chelsea.png"))}
        hostile = {
            "ipv6-unclosed": ("http://[::1/a.jpg", "invalid_reference"),
            "s3-unclosed": ("s3://[x/y.jpg", "invalid_reference"),
            "long-label": (f"http://{'a' * 64}.example.com/x.jpg", "invalid_reference"),
            "nul-file": ("file:///tmp/a\x00b.png", "invalid_reference"),
            "nul-http": ("http://exa\x00mple.com/a.jpg", "invalid_reference"),
            "bad-port": ("http://example.com:99999/x.jpg", "invalid_reference"),
            "file-url": ("file://" + str(local_path), "reference_refused"),
            "abs-path": (str(local_path), "reference_refused"),
            "loopback": (f"{internal.url}/secret.png?token=s3cr3t", "reference_refused"),
            "localhost": (f"http://localhost:{internal.port}/secret.png", "reference_refused"),
            "decimal": (f"http://2130706433:{internal.port}/secret.png", "reference_refused"),
            "short-v4": (f"http://127.1:{internal.port}/secret.png", "reference_refused"),
            "mapped-v6": (f"http://[::ffff:127.0.0.1]:{internal.port}/secret.png",
                          "reference_refused"),
            "unspecified": (f"http://0.0.0.0:{internal.port}/secret.png", "reference_refused"),
            "redirect": (f"{allowed.url}/redirect", "reference_refused"),
            "redirect-name": (f"{allowed.url}/to-localhost", "reference_refused"),
        }
        rows = [(k, v[0]) for k, v in good.items()] + [(k, v[0]) for k, v in hostile.items()]
        s3.put_object(Bucket=bucket, Key="in/m.csv", Body=write_csv(rows))

        queue = "hostile-" + uuid.uuid4().hex[:8]
        # Defaults, but for one door: the redirecting server's own host:port (both servers are
        # on loopback: its redirects to the other one must still be refused).
        wenv = default_env(env, queue, MOONBATCH_ALLOW_PRIVATE_HOSTS=f"127.0.0.1:{allowed.port}")
        with Worker(wenv, queue, tmp_path / "worker.log") as worker:
            started = time.time()
            proc = run_cli(["run", f"s3://{bucket}/in/m.csv", f"s3://{bucket}/out/",
                            "--provider", provider, "--workers", "0", "--timeout", "240"],
                           default_env(env, queue), check=False)
            elapsed = time.time() - started
            assert worker.proc.poll() is None, "the worker died"
        print(f"{provider}: run took {elapsed:.1f}s; exit {proc.returncode}; "
              f"{proc.stdout.strip()[-300:]} {proc.stderr.strip()[-500:]}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert internal.requests == [], internal.requests  # nothing reached the internal server

    got = {r["id"]: r for r in read_results(s3, bucket, "out/")}
    assert sorted(got) == sorted([*good, *hostile])  # every row exactly once
    for key, (_, image) in good.items():
        row = got[key]
        assert row["status"] == "ok", row
        assert {k: v for k, v in row["result"].items() if k != "raw"} == expected(provider, image)
    for key, (_, code) in hostile.items():
        row = got[key]
        assert row["status"] == "error" and row["error"]["code"] == code, row
        print(f"  {key}: {code}: {row['error']['message']}")
    text = json.dumps(list(got.values()))
    for image in (local, secret):  # neither image's pixels went to the API
        assert json.dumps(expected(provider, image)["caption"]) not in text
    assert "s3cr3t" not in text and "token=" not in text
    refused = got["loopback"]["error"]["message"]
    assert "loopback" in refused and "MOONBATCH_ALLOW_PRIVATE_HOSTS" in refused
    assert "MOONBATCH_ALLOW_LOCAL_FILES" in got["abs-path"]["error"]["message"]
