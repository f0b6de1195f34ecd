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
import os
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
                    self.close_connection = True  # the client gave up (a capped fetch does)

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a client that left mid-answer (a capped fetch) is no error here

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


# -- the address policy --------------------------------------------------------------------------
@pytest.mark.parametrize(("address", "kind"), [
    ("8.8.8.8", None), ("1.1.1.1", None), ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None), ("2002:808:808::1", None), ("64:ff9b::808:808", None),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("100.64.0.1", "private"), ("fd12:3456::1", "private"), ("fec0::1", "private"),
    ("0.1.2.3", "reserved"), ("192.0.2.1", "reserved"), ("198.18.0.1", "reserved"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("2001:db8::1", "reserved"),
    ("::127.0.0.1", "reserved"), ("64:ff9b:1::1", "reserved"), ("100::1", "reserved"),
    ("2001::1", "reserved"),
    # IPv4 inside IPv6 is judged as the IPv4 it carries.
    ("::ffff:127.0.0.1", "loopback (IPv4 127.0.0.1 inside IPv6)"),
    ("::ffff:10.0.0.1", "private (IPv4 10.0.0.1 inside IPv6)"),
    ("::ffff:0.0.0.0", "unspecified (IPv4 0.0.0.0 inside IPv6)"),
    ("::ffff:169.254.169.254", "link-local (IPv4 169.254.169.254 inside IPv6)"),
    ("64:ff9b::a00:1", "private (IPv4 10.0.0.1 inside IPv6)"),
    ("64:ff9b::7f00:1", "loopback (IPv4 127.0.0.1 inside IPv6)"),
    ("2002:7f00:1::", "loopback (IPv4 127.0.0.1 inside IPv6)"),
    ("2002:c0a8:101::1", "private (IPv4 192.168.1.1 inside IPv6)"),
])
def test_address_classes(address, kind):
    import ipaddress

    from moonbatch.workers.netguard import address_class

    assert address_class(ipaddress.ip_address(address)) == kind


def test_allow_rules_open_exactly_what_they_name():
    import ipaddress

    from moonbatch.workers.netguard import Refused, check_addresses, parse_rules

    def allowed(rules: str, host: str, address: str, port: int) -> bool:
        try:
            check_addresses(host, port, [ipaddress.ip_address(address)], parse_rules(rules))
            return True
        except Refused:
            return False

    assert allowed("", "example.com", "93.184.216.34", 443)  # public: no rule needed
    assert not allowed("", "localhost", "127.0.0.1", 8080)
    assert allowed("127.0.0.1:8080", "localhost", "127.0.0.1", 8080)
    assert not allowed("127.0.0.1:8080", "localhost", "127.0.0.1", 8081)  # another port
    assert allowed("127.0.0.1:8080", "::ffff:127.0.0.1", "::ffff:127.0.0.1", 8080)  # mapped
    assert allowed("10.0.0.0/8", "nas", "10.9.8.7", 80)
    assert not allowed("10.0.0.0/8", "nas", "192.168.0.1", 80)
    assert allowed("[::1]:8080, fd00::/8", "x", "fd00::5", 1)
    assert allowed("[::1]:8080", "x", "::1", 8080) and not allowed("[::1]:8080", "x", "::1", 80)
    assert allowed("images.internal", "Images.Internal.", "10.0.0.1", 80)  # a name: any address
    assert allowed("images.internal:8443", "images.internal", "10.0.0.1", 8443)
    assert not allowed("images.internal:8443", "images.internal", "10.0.0.1", 80)
    assert not allowed("images.internal", "other.internal", "10.0.0.1", 80)
    # Every address of a name must pass: one public address does not carry a private one.
    with pytest.raises(Refused, match="resolves to 10.0.0.1, a private address"):
        check_addresses("mixed.example", 80, [ipaddress.ip_address("93.184.216.34"),
                                              ipaddress.ip_address("10.0.0.1")], ())
    with pytest.raises(Refused, match="add 169.254.169.254:80 to MOONBATCH_ALLOW_PRIVATE_HOSTS"):
        check_addresses("169.254.169.254", 80, [ipaddress.ip_address("169.254.169.254")], ())

    for bad in ("127.0.0.1:0", "127.0.0.1:99999", "[::1", "[::1]x", "bad_host!", "-a.com",
                "a..b", "10.0.0.0/33:80"):
        with pytest.raises(ValueError, match="MOONBATCH_ALLOW_PRIVATE_HOSTS"):
            parse_rules(bad)
    # Settings refuse them at start, naming the variable.
    from pydantic import ValidationError

    from moonbatch.config import Settings

    for field, value in (("allow_private_hosts", "127.0.0.1:x"), ("allow_local_files", "data"),
                         ("item_buckets", "a/b")):
        with pytest.raises(ValidationError, match=field):
            Settings(**{field: value})


def test_names_are_resolved_once_and_the_checked_address_is_the_one_connected(monkeypatch):
    """DNS rebinding: a name that answers a public address to the check and a loopback one to
    the connection (or both at once) never reaches loopback: the backend resolves once, checks
    every address and connects to a checked one."""
    import socket

    from moonbatch.workers.netguard import guarded_client

    real = socket.getaddrinfo
    answers: dict[str, list[list[str]]] = {}
    asked: list[str] = []

    def resolver(host, port, *args, **kwargs):  # a DNS of the test's own for *.test names
        if isinstance(host, str) and host.endswith(".test"):
            asked.append(host)
            ips = answers[host].pop(0)
            return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6,
                     "", (ip, port)) for ip in ips]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with LocalServer({"/x.png": serve_bytes(b"pixels")}) as server, \
            guarded_client((), timeout=10) as client:
        # First answer loopback only: refused before any connection.
        answers["rebind.test"] = [["127.0.0.1"], ["127.0.0.1"]]
        from moonbatch.workers.netguard import Refused

        with pytest.raises(Refused, match="rebind.test resolves to 127.0.0.1, a loopback"):
            client.get(f"http://rebind.test:{server.port}/x.png")
        # A public address and a loopback one in one answer: refused (every address counts).
        answers["mixed.test"] = [["93.184.216.34", "127.0.0.1"]]
        with pytest.raises(Refused, match="127.0.0.1, a loopback"):
            client.get(f"http://mixed.test:{server.port}/x.png")
        assert server.requests == []
        assert asked == ["rebind.test", "mixed.test"]  # one resolution per connection

        # Allowed by name: the connection goes to the address the check saw (127.0.0.1), not
        # to a second answer (which would be a public address the server is not on).
        from moonbatch.workers.netguard import parse_rules

        with guarded_client(parse_rules(f"allowed.test:{server.port}"), timeout=10) as trusted:
            answers["allowed.test"] = [["127.0.0.1"], ["203.0.113.9"]]
            assert trusted.get(f"http://allowed.test:{server.port}/x.png").content == b"pixels"
        assert server.requests == ["/x.png"] and answers["allowed.test"] == [["203.0.113.9"]]


# -- reads are capped in size and time -----------------------------------------------------------
def fetcher_for(store, local_input: bool = False, **settings):
    from moonbatch.config import Settings
    from moonbatch.workers.readers import ItemFetcher

    return ItemFetcher(store, Settings(**settings), local_input=local_input)


def read(fetcher, ref: str):
    """``read_item`` of one ref: ``(bytes or None, error code or None, message, seconds)``."""
    from moonbatch.workers.lines import ItemError
    from moonbatch.workers.models import PlanItem
    from moonbatch.workers.readers import read_item

    started = time.monotonic()
    try:
        data = read_item(fetcher.get, PlanItem("x", 0, ref))
        return data, None, "", time.monotonic() - started
    except ItemError as exc:
        return None, exc.code, exc.message, time.monotonic() - started


def test_slow_drip_ends_within_the_deadline_and_bodies_are_capped(tmp_path, s3, bucket, env):
    from moonbatch.workers.storage import open_store

    good = photo("coffee.png")
    with LocalServer({"/drip.png": slow_drip(0.2, size=1_000_000), "/big.png": serve_bytes(b"\0" * 3_000_000),
                      "/endless.png": endless(), "/ok.png": serve_bytes(good),
                      "/hop": redirect_to("/drip.png")}) as server:
        store = open_store(f"s3://{bucket}/", endpoint_url=env["MOONBATCH_S3_ENDPOINT_URL"])
        fetcher = fetcher_for(store, item_deadline=2, item_max_bytes=2_000_000, http_timeout=60,
                              allow_private_hosts=f"127.0.0.1:{server.port}")
        data, code, _, _ = read(fetcher, f"{server.url}/ok.png")
        assert data == good and code is None

        # A byte every 0.2 s: each read is quick, the whole is not (the per-read timeout of
        # 60 s would never fire). The deadline counts the redirect hop too.
        for ref in (f"{server.url}/drip.png", f"{server.url}/hop"):
            _, code, message, took = read(fetcher, ref)
            print(f"slow drip {ref.rsplit('/', 1)[1]}: {code} after {took:.2f}s: {message}")
            assert code == "read_timeout" and "MOONBATCH_ITEM_DEADLINE (2 s)" in message
            assert 1.9 <= took < 4.5, took

        _, code, message, took = read(fetcher, f"{server.url}/big.png")  # Content-Length
        print(f"declared 3 MB: {code} after {took:.3f}s: {message}")
        assert code == "object_too_large" and "MOONBATCH_ITEM_MAX_BYTES" in message
        _, code, message, took = read(fetcher, f"{server.url}/endless.png")  # no length
        print(f"endless chunked body: {code} after {took:.3f}s: {message}")
        assert code == "object_too_large" and took < 2

    # S3: the object's size is checked before its body is read.
    s3.put_object(Bucket=bucket, Key="big.bin", Body=b"\0" * 2_500_000)
    s3.put_object(Bucket=bucket, Key="ok.png", Body=good)
    assert read(fetcher, f"s3://{bucket}/ok.png")[0] == good
    _, code, message, _ = read(fetcher, f"s3://{bucket}/big.bin")
    print(f"S3 object: {code}: {message}")
    assert code == "object_too_large" and "2500000 bytes" in message
    assert read(fetcher, "big.bin")[1] == "object_too_large"  # a key of the INPUT store

    # Local files (a local INPUT): by stat; a device or a FIFO is not read at all.
    from moonbatch.workers.storage import LocalStore

    (tmp_path / "big.bin").write_bytes(b"\0" * 2_500_000)
    os.mkfifo(tmp_path / "fifo.png")
    local = fetcher_for(LocalStore(tmp_path), local_input=True, item_max_bytes=2_000_000)
    assert read(local, "file://" + str(tmp_path / "big.bin"))[1] == "object_too_large"
    assert read(local, "big.bin")[1] == "object_too_large"
    for ref in ("file:///dev/zero", "file://" + str(tmp_path / "fifo.png")):
        _, code, message, took = read(local, ref)
        assert code == "read_failed" and "not a regular file" in message and took < 2, message

    # A tar member that declares more than the cap is not read.
    (tmp_path / "x.tar").write_bytes(b"\0" * 1024)
    assert read(local, "tar:x.tar#512+3000000")[1] == "object_too_large"


def test_item_fetches_ignore_proxies_and_refuse_compressed_bodies(monkeypatch, tmp_path):
    """``HTTP_PROXY`` would let a proxy resolve (and reach) what the address check refused:
    item fetches connect directly. A body the server compressed although identity was asked
    is refused (it could inflate past the cap)."""
    import gzip

    from moonbatch.workers.storage import LocalStore

    good = photo("coffee.png")

    def gzipped(h):
        body = gzip.compress(b"\0" * 5_000_000)
        h.send_response(200)
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    with LocalServer({}) as proxy, \
            LocalServer({"/ok.png": serve_bytes(good), "/gz.png": gzipped}) as server:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        fetcher = fetcher_for(LocalStore(tmp_path), item_max_bytes=2_000_000,
                              allow_private_hosts=f"127.0.0.1:{server.port}")
        assert read(fetcher, f"{server.url}/ok.png")[0] == good
        _, code, message, _ = read(fetcher, f"{server.url}/gz.png")
        assert code == "read_failed" and "Content-Encoding gzip" in message, message
        # Refused addresses stay refused whatever the proxy could reach.
        assert read(fetcher, f"http://127.0.0.2:{server.port}/ok.png")[1] == "reference_refused"
    assert proxy.requests == []
    assert server.requests == ["/ok.png", "/gz.png"]


def test_local_files_and_buckets_open_only_what_settings_name(tmp_path, s3, bucket, env):
    from moonbatch.workers.storage import open_store

    endpoint = env["MOONBATCH_S3_ENDPOINT_URL"]
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "a.png").write_bytes(b"in")
    (outside / "b.png").write_bytes(b"out")
    (allowed / "link.png").symlink_to(outside / "b.png")  # inside by name, outside in fact
    other, third = "o-" + uuid.uuid4().hex[:8], "x-" + uuid.uuid4().hex[:8]
    for name in (other, third):
        s3.create_bucket(Bucket=name)
        s3.put_object(Bucket=name, Key="k.png", Body=name.encode())
    s3.put_object(Bucket=bucket, Key="k.png", Body=b"own")

    fetcher = fetcher_for(open_store(f"s3://{bucket}/", endpoint_url=endpoint),
                          allow_local_files=str(allowed), item_buckets=other)
    assert read(fetcher, "file://" + str(allowed / "a.png"))[0] == b"in"
    for ref in (str(outside / "b.png"), str(allowed / "link.png"), "/etc/passwd"):
        _, code, message, _ = read(fetcher, "file://" + ref)
        assert code == "reference_refused" and "MOONBATCH_ALLOW_LOCAL_FILES" in message, ref
    assert read(fetcher, f"s3://{bucket}/k.png")[0] == b"own"  # INPUT's own bucket
    assert read(fetcher, f"s3://{other}/k.png")[0] == other.encode()
    _, code, message, _ = read(fetcher, f"s3://{third}/k.png")
    assert code == "reference_refused" and "MOONBATCH_ITEM_BUCKETS" in message
    assert fetcher.presigned_url(_item(f"s3://{third}/k.png"), 60) is None  # nor presigned

    # Without MOONBATCH_ITEM_BUCKETS any bucket is read (the credentials are the boundary).
    open_fetcher = fetcher_for(open_store(f"s3://{bucket}/", endpoint_url=endpoint))
    assert read(open_fetcher, f"s3://{third}/k.png")[0] == third.encode()
    assert read(open_fetcher, "file://" + str(allowed / "a.png"))[1] == "reference_refused"


def _item(ref: str):
    from moonbatch.workers.models import PlanItem

    return PlanItem("x", 0, ref)


def test_slow_drip_and_oversize_rows_on_a_worker(s3, bucket, env, tmp_path):
    """On a fleet worker: a slow-drip URL holds its fetch slot no longer than the deadline
    (``read_timeout``), bodies and objects over the cap are ``object_too_large``, the rest of
    the shard is annotated."""
    good = photo("coffee.png")
    s3.put_object(Bucket=bucket, Key="in/coffee.png", Body=good)
    s3.put_object(Bucket=bucket, Key="in/huge.png", Body=b"\x89PNG" + b"\0" * 3_000_000)
    with LocalServer({"/drip.png": slow_drip(0.5, size=1_000_000),
                      "/big.png": serve_bytes(b"\0" * 3_000_000),
                      "/endless.png": endless()}) as server:
        rows = [{"id": "coffee", "image": "coffee.png"}, {"id": "huge", "image": "huge.png"},
                *({"id": name, "image": f"{server.url}/{name}.png"}
                  for name in ("drip", "big", "endless"))]
        s3.put_object(Bucket=bucket, Key="in/m.jsonl",
                      Body="".join(json.dumps(r) + "\n" for r in rows).encode())
        queue = "limits-" + uuid.uuid4().hex[:8]
        wenv = default_env(env, queue, MOONBATCH_ALLOW_PRIVATE_HOSTS=f"127.0.0.1:{server.port}",
                           MOONBATCH_ITEM_DEADLINE="3", MOONBATCH_ITEM_MAX_BYTES="2000000")
        with Worker(wenv, queue, tmp_path / "worker.log") as worker:
            run_cli(["run", f"s3://{bucket}/in/m.jsonl", f"s3://{bucket}/out/", "--workers", "0",
                     "--timeout", "180"], default_env(env, queue))
            assert worker.proc.poll() is None
    got = {r["id"]: r for r in read_results(s3, bucket, "out/")}
    assert got["coffee"]["status"] == "ok"
    assert got["coffee"]["result"] == expected_result(good, {"skill": "caption"})
    codes = {k: r["error"]["code"] for k, r in got.items() if r["status"] == "error"}
    assert codes == {"drip": "read_timeout", "huge": "object_too_large", "big": "object_too_large",
                     "endless": "object_too_large"}, codes
    build = json.loads(s3.get_object(Bucket=bucket, Key="out/_moonbatch/shards/00000/r0/build.json"
                                     )["Body"].read())
    print(f"build of 5 items (one slow drip at 2 bytes/s, deadline 3 s): {build['build_seconds']}s; "
          f"drip: {got['drip']['error']['message']}")
    assert build["build_seconds"] < 3 + 30  # the drip gave up at its deadline, not hours later


def test_every_failure_of_one_item_is_its_error_row(s3, bucket, env):
    """``read_item``, ``source`` and ``presigned_url`` never raise for any reference; the
    builder's per-item boundary turns whatever one item raises into that item's error."""
    from moonbatch.workers.lines import ItemError
    from moonbatch.workers.models import PlanItem, SkillOptions
    from moonbatch.workers.providers.moondream.upload import iter_lines
    from moonbatch.workers.readers import read_item
    from moonbatch.workers.storage import open_store

    fetcher = fetcher_for(open_store(f"s3://{bucket}/in/",
                                     endpoint_url=env["MOONBATCH_S3_ENDPOINT_URL"]))
    weird = ["http://[::1/a.jpg", "s3://[x/y.jpg", "file:///a\x00b.png", "tar:", "parquet:#",
             "parquet:k#x/y", "tar:k#a+b", "s3://", "s3://b", "http://", "https://u:pw@h/x?sig=1",
             "http://h:0/x", "file://relative", "\x00", "a" * 5000, "http://xn--/x",
             "http://" + "a." * 130 + "com/x", "https://[fe80::1%25eth0]/x"]
    for ref in weird:
        item = PlanItem("x", 0, ref)
        source = fetcher.source(item)
        assert "sig=" not in source and "pw@" not in source, source
        url = fetcher.presigned_url(item, 60)  # None, the URL itself, or a presigned GET
        assert url is None or url == ref or url.startswith(env["MOONBATCH_S3_ENDPOINT_URL"])
        with pytest.raises(ItemError) as info:
            read_item(fetcher.get, item)
        assert info.value.code in ("invalid_reference", "reference_refused", "object_not_found",
                                   "read_failed"), (ref, info.value.code)
        assert "sig=" not in info.value.message and "pw@" not in info.value.message

    def explode(item: PlanItem) -> bytes:
        raise {"value": ValueError("bad"), "unicode": UnicodeError("label too long"),
               "runtime": RuntimeError("https://h/x?sig=1"),
               "memory": MemoryError()}[item.id]

    codes = {}
    for name in ("value", "unicode", "runtime", "memory"):
        with pytest.raises(ItemError) as info:
            read_item(explode, PlanItem(name, 0, "k"))
        codes[name] = info.value.code
        assert "sig=" not in info.value.message
    assert codes == {"value": "invalid_reference", "unicode": "invalid_reference",
                     "runtime": "read_failed", "memory": "image_too_large"}

    # One round: a good image, an item whose read raises anything, one whose bytes are not an
    # image: the good line is built, the others are error rows, the round goes on.
    good = photo("coffee.png")

    def fetch(item: PlanItem) -> bytes:
        if item.id == "boom":
            raise KeyError("anything")
        return {"good": good, "junk": b"GIF89a" + b"\0" * 10}[item.id]

    errors: dict = {}
    items = [PlanItem("good", 0), PlanItem("boom", 0), PlanItem("junk", 0)]
    lines = list(iter_lines(items, fetch, SkillOptions(skill="caption"), concurrency=2,
                            errors=errors))
    assert [index for index, *_ in lines] == [0]
    assert errors["1"]["code"] == "read_failed" and "KeyError" in errors["1"]["message"]
    assert errors["2"]["code"] in ("image_decode_failed", "not_an_image")


# -- manifest lines ------------------------------------------------------------------------------
class CountingStore:
    """A real store with the bytes of its ranged GETs counted."""

    def __init__(self, store) -> None:
        self.inner, self.url, self.bytes = store, store.url, 0

    def get_range(self, key: str, start: int, length: int) -> bytes:
        data = self.inner.get_range(key, start, length)
        self.bytes += len(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_lines_are_bounded(fmt, tmp_path, s3, bucket, env):
    import tracemalloc

    from moonbatch.config import get_settings
    from moonbatch.producer.runs import check_input_items, new_spec
    from moonbatch.workers.models import SkillOptions
    from moonbatch.workers.readers import InputError, input_root
    from moonbatch.workers.storage import open_store

    long = "x" * 50_000_000  # one 50 MB line: no line break
    if fmt == "jsonl":
        body = '{"id": 1, "image": "a.png"}\n{"id": 2, "image": "' + long + '"}\n'
    else:
        body = "id,image\n1,a.png\n2," + long + "\n"
    for where in ("local", "s3"):
        if where == "local":
            (tmp_path / f"m.{fmt}").write_text(body)
            url = str(tmp_path / f"m.{fmt}")
        else:
            s3.put_object(Bucket=bucket, Key=f"m.{fmt}", Body=body.encode())
            url = f"s3://{bucket}/m.{fmt}"
        spec = new_spec(url, str(tmp_path / "out"), SkillOptions(skill="caption"), get_settings(),
                        input_format="manifest")
        store = CountingStore(open_store(input_root(spec),
                                         endpoint_url=env["MOONBATCH_S3_ENDPOINT_URL"]))
        tracemalloc.start()
        with pytest.raises(InputError) as info:
            check_input_items(spec, store, get_settings())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{fmt} {where}: {info.value} (peak {peak / 1e6:.1f} MB, {store.bytes / 1e6:.1f} "
              "MB read from S3)")
        assert f"m.{fmt} line {2 if fmt == 'jsonl' else 3}: longer than 1048576 bytes" \
            in str(info.value)
        # The 50 MB line was never held: locally by memory; on S3 (moto serves it from this
        # process) by the bytes read: two of the manifest reader's 8 MB ranged GETs.
        assert peak < 40_000_000 if where == "local" else store.bytes <= 2 * 8 * 2**20

    # A quoted CSV field that runs over many short lines stops at the csv field limit.
    (tmp_path / "q.csv").write_text('id,image\n1,"a.png\n' + "y\n" * 100_000 + '"\n')
    spec = new_spec(str(tmp_path / "q.csv"), str(tmp_path / "out"), SkillOptions(skill="caption"),
                    get_settings(), input_format="manifest")
    with pytest.raises(InputError, match=r"q.csv line \d+: a field is longer than 131072"):
        check_input_items(spec, open_store(input_root(spec)), get_settings())
