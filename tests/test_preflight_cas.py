"""Issue 16 (7) and (10): preflight proves conditional writes on OUTPUT and the state store, and
never prints a password.

Leases, batch claims and write-once documents rest on S3 conditional writes (``If-None-Match:
*``, ``If-Match``; FACTS.md "S3"). A store that ignores them lets every one "succeed" for
everyone. Here a real reverse proxy (http.server in a thread) in front of moto's server drops
those request headers (moto does not check signatures, so the request stays valid), the way an
older MinIO or an S3-compatible store ignores them; ``moonbatch submit`` through it must refuse
to start (exit 3, one line naming the store and the override), through moto directly it starts,
and the documented override lets it start anyway.
"""

from __future__ import annotations

import http.client
import http.server
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.conftest import RedisServer, free_port, private_env, run_cli, upload_photos

OVERRIDE = "MOONBATCH_UNSAFE_SKIP_CONDITIONAL_WRITE_CHECK"
CONDITIONAL = ("if-none-match", "if-match")


class S3Proxy:
    """A reverse proxy on 127.0.0.1 in front of ``upstream`` (moto's server) that mistreats
    conditional writes: ``mode`` ``"drop"`` removes ``If-None-Match`` and ``If-Match`` from
    every request, ``"drop-if-match"`` only ``If-Match``, ``"reject"`` answers 501
    NotImplemented to any request carrying one (a store that does not know them);
    ``"deny-get:<text>"`` answers 403 AccessDenied to reads of a path containing ``text`` and
    forwards everything else as it is. ``seen`` counts the conditional headers it met."""

    def __init__(self, upstream: str, mode: str) -> None:
        self.upstream = urlsplit(upstream)
        self.mode = mode
        self.seen: dict[str, int] = {}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {}
                conditional = False
                for name, value in self.headers.items():
                    low = name.lower()
                    if low in CONDITIONAL:
                        proxy.seen[low] = proxy.seen.get(low, 0) + 1
                        conditional = True
                        if proxy.mode == "drop" or (proxy.mode == "drop-if-match"
                                                    and low == "if-match"):
                            continue
                    if low in ("connection", "keep-alive"):
                        continue
                    headers[name] = value
                if conditional and proxy.mode == "reject":
                    self._error(501, b"NotImplemented", b"A header you provided implies "
                                b"functionality that is not implemented")
                    return
                denied = proxy.mode.partition("deny-get:")[2]
                if denied and self.command in ("GET", "HEAD") and denied in self.path:
                    self._error(403, b"AccessDenied", b"Access Denied")
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                  timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for name, value in resp.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int, code: bytes, message: bytes) -> None:
                payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>" + code +
                           b"</Code><Message>" + message + b"</Message></Error>")
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> S3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dropping(s3_endpoint) -> Iterator[S3Proxy]:
    with S3Proxy(s3_endpoint, "drop") as proxy:
        yield proxy


def submit(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = run_cli(["submit", *args], env, check=False, timeout=60)
    return proc, time.monotonic() - t0


def listing(s3, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


# -- (7) a store that ignores conditional writes --------------------------------------------------
def test_output_ignoring_if_none_match_is_refused(s3, bucket, env, broker, dropping, tmp_path):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    # OUTPUT through the proxy; the state store local, so OUTPUT is the one store refused.
    through = private_env(env, broker, MOONBATCH_S3_ENDPOINT_URL=dropping.url,
                          MOONBATCH_STATE_URL=str(tmp_path / "state"))
    proc, wall = submit(through, f"s3://{bucket}/in/", f"s3://{bucket}/out/")
    print(f"\nthrough a proxy dropping If-None-Match/If-Match ({wall:.2f}s): {proc.stderr.strip()}")
    line = one_line(proc)
    assert line.startswith(f"error: OUTPUT: s3://{bucket}/out/ (S3 at {dropping.url}) ignores "
                           "conditional writes"), line
    assert "If-None-Match" in line and OVERRIDE in line and "unsafe" in line
    assert dropping.seen.get("if-none-match"), "the check never sent a conditional write"
    assert wall < 10
    assert listing(s3, bucket, "out/") == []  # the probe is gone, nothing was started
    assert broker.client().llen(through["MOONBATCH_QUEUE"]) == 0


def test_state_store_ignoring_if_none_match_is_refused(s3, bucket, env, broker, dropping,
                                                       tmp_path):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    state = "state-" + uuid.uuid4().hex[:8]
    s3.create_bucket(Bucket=state)
    # INPUT and OUTPUT local; the state store (run registry, batch claims) through the proxy.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "coffee.png").write_bytes(s3.get_object(
        Bucket=bucket, Key="in/coffee.png")["Body"].read())
    through = private_env(env, broker, MOONBATCH_S3_ENDPOINT_URL=dropping.url,
                          MOONBATCH_STATE_URL=f"s3://{state}/reg/")
    proc, wall = submit(through, str(tmp_path / "in"), str(tmp_path / "out"))
    print(f"\nstate store through the proxy ({wall:.2f}s): {proc.stderr.strip()}")
    line = one_line(proc)
    assert line.startswith(f"error: state: s3://{state}/reg/ (S3 at {dropping.url}) ignores "
                           "conditional writes"), line
    assert line.endswith("(the run registry, MOONBATCH_STATE_URL)")
    assert OVERRIDE in line
    assert listing(s3, state, "") == []


def test_both_stores_through_the_proxy_say_both(s3, bucket, env, broker, dropping):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    through = private_env(env, broker, MOONBATCH_S3_ENDPOINT_URL=dropping.url)
    proc, _ = submit(through, f"s3://{bucket}/in/", f"s3://{bucket}/out/")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["OUTPUT", "state"], lines


def test_a_store_that_ignores_only_if_match_is_refused(s3, bucket, env, broker, s3_endpoint,
                                                       tmp_path):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    with S3Proxy(s3_endpoint, "drop-if-match") as proxy:
        through = private_env(env, broker, MOONBATCH_S3_ENDPOINT_URL=proxy.url,
                              MOONBATCH_STATE_URL=str(tmp_path / "state"))
        proc, _ = submit(through, f"s3://{bucket}/in/", f"s3://{bucket}/out/")
    print(f"\nthrough a proxy dropping If-Match only: {proc.stderr.strip()}")
    line = one_line(proc)
    assert line.startswith(f"error: OUTPUT: s3://{bucket}/out/ (S3 at {proxy.url}) ignores "
                           "conditional writes (a compare-and-swap with If-Match"), line
    assert proxy.seen.get("if-match") and OVERRIDE in line
    assert listing(s3, bucket, "out/") == []


def test_a_store_that_rejects_conditional_headers_is_refused(s3, bucket, env, broker,
                                                             s3_endpoint, tmp_path):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    with S3Proxy(s3_endpoint, "reject") as proxy:
        through = private_env(env, broker, MOONBATCH_S3_ENDPOINT_URL=proxy.url,
                              MOONBATCH_STATE_URL=str(tmp_path / "state"))
        proc, _ = submit(through, f"s3://{bucket}/in/", f"s3://{bucket}/out/")
    print(f"\nthrough a proxy answering 501 to conditional writes: {proc.stderr.strip()}")
    line = one_line(proc)
    assert line.startswith(f"error: OUTPUT: s3://{bucket}/out/ (S3 at {proxy.url}) refuses "
                           "conditional writes (NotImplemented"), line
    assert OVERRIDE in line
    assert listing(s3, bucket, "out/") == []


def test_moto_directly_passes_and_leaves_no_probe(s3, bucket, env, broker, state_bucket):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    direct = private_env(env, broker)
    before = set(listing(s3, state_bucket, "state/probe-"))
    proc, wall = submit(direct, f"s3://{bucket}/in/", f"s3://{bucket}/out/")
    print(f"\nthrough moto directly ({wall:.2f}s): exit {proc.returncode}")
    assert proc.returncode == 0, proc.stderr
    assert not [k for k in listing(s3, bucket, "out/") if "probe" in k]
    assert set(listing(s3, state_bucket, "state/probe-")) == before
    assert broker.client().llen(direct["MOONBATCH_QUEUE"]) >= 1  # the shard was enqueued


def test_the_override_lets_a_store_without_conditional_writes_start(s3, bucket, env, broker,
                                                                    dropping, tmp_path):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    through = private_env(env, broker, MOONBATCH_S3_ENDPOINT_URL=dropping.url,
                          MOONBATCH_STATE_URL=str(tmp_path / "state"), **{OVERRIDE: "1"})
    proc, _ = submit(through, f"s3://{bucket}/in/", f"s3://{bucket}/out/")
    print(f"\nwith {OVERRIDE}=1: exit {proc.returncode}; {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert f"s3://{bucket}/out/" in proc.stderr
    assert broker.client().llen(through["MOONBATCH_QUEUE"]) >= 1


def test_local_stores_pass_the_conditional_check(tmp_path):
    from moonbatch.config import Settings
    from moonbatch.producer.preflight import check_output, check_state

    (tmp_path / "out").mkdir()
    settings = Settings(state_url=str(tmp_path / "out"))
    assert check_output(str(tmp_path / "out"), settings) is None
    assert check_state(settings) is None
    assert list((tmp_path / "out").rglob("*")) == []  # no probe, no lock sidecar, no temp file


# -- (10) safe_url never prints a piece of the password ---------------------------------------------
PIECES = ("Zq7", "Xv9", "Kp2", "Wm4", "Rt6")
HARD = "Zq7#Xv9/Kp2?Wm4@Rt6%"  # every character urlsplit mis-parses in userinfo

URLS = [
    f"redis://:{HARD}@127.0.0.1:6379/0",
    f"redis://user:{HARD}@127.0.0.1:6379/0",
    f"rediss://:{HARD}@redis.example.com:6380/1?ssl_cert_reqs=required",
    "redis://user:Zq7@Xv9@host/0",
    "redis://:Zq7#Xv9@host:6379/0",
    "redis://:Zq7/Xv9@host:6379/0",
    "redis://:Zq7?Xv9@host:6379/0",
    "redis://:Zq7%Xv9@host:6379/0",
    "redis://:Zq7%23Xv9@host:6379/0",
    f"redis://:{HARD}@[::1]:6379/0",
    f"sentinel://:{HARD}@h1:26379;sentinel://:{HARD}@h2:26379",
    f"redis://:{HARD}@h1:6379/0; redis://:Kp2;Wm4@h2:6379/0",
    f"unix://:{HARD}@/run/redis.sock?db=0",
    f"amqp://guest:{HARD}@rabbit:5672//",
]


@pytest.mark.parametrize("url", URLS)
def test_safe_url_hides_every_piece_of_the_password(url):
    from moonbatch.producer.preflight import safe_url

    shown = safe_url(url)
    print(f"\n{url}  →  {shown}")
    for piece in PIECES:
        assert piece not in shown, (url, shown)
    assert "***" in shown


def test_safe_url_keeps_what_is_not_secret():
    from moonbatch.producer.preflight import safe_url

    assert safe_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert safe_url("redis://:pw@10.0.0.5:6379/2") == "redis://:***@10.0.0.5:6379/2"
    assert safe_url(f"redis://alice:{HARD}@[::1]:6379/0") == "redis://alice:***@[::1]:6379/0"
    assert safe_url("redis://alice@host:6379/0") == "redis://alice@host:6379/0"
    assert safe_url("sentinel://:a@h1:26379;sentinel://:b@h2:26379") == \
        "sentinel://:***@h1:26379;sentinel://:***@h2:26379"
    assert safe_url("filesystem://") == "filesystem://"


def test_broker_password_with_special_characters_never_printed(s3, bucket, env, tmp_path):
    """A real redis-server that requires a password; the CLI's broker check with URLs whose
    password holds #, /, ?, @, % (unparseable, or wrong): one line, no piece of it."""
    from moonbatch.workers.embedded import find_redis_server

    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    port = free_port()
    exe = find_redis_server()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path),
                             "--requirepass", "the-right-one"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = RedisServer(port, tmp_path)
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                server.client().ping()
            except Exception as exc:  # NOAUTH: it is up
                if "auth" in str(exc).lower():
                    break
                time.sleep(0.05)
        for url in (f"redis://:{HARD}@127.0.0.1:{port}/0",          # unparseable as given
                    f"redis://:Zq7%23Xv9%2FKp2@127.0.0.1:{port}/0",   # encoded, but wrong
                    f"redis://user:Zq7@Xv9@127.0.0.1:{port}/0",
                    f"sentinel://:{HARD}@127.0.0.1:{port};sentinel://:{HARD}@127.0.0.1:1"):
            bad = {**env, "MOONBATCH_BROKER_URL": url}
            out = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/"], bad,
                          check=False, timeout=60)
            print(f"\nbroker {url}: exit {out.returncode}: {out.stderr.strip()}")
            assert out.returncode == 3, out.stderr
            text = out.stderr + out.stdout
            assert "Traceback" not in text
            for piece in PIECES[:3]:
                assert piece not in text, (url, text)
            assert re.search(r"broker: .*MOONBATCH_BROKER_URL", text), text
    finally:
        proc.kill()
        proc.wait()
