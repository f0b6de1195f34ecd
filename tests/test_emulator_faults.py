"""Fault injection of the Batch API emulator (``emulator.server.Faults``), over real HTTP.

Every test starts its own ``EmulatorServer`` and sets ``config.faults``; what it injects is seen on
the wire with raw httpx (status, ``Retry-After``, a dropped connection, a short or corrupted body)
and through ``moonbatch.workers.providers.moondream.client.BatchClient``'s retry loop. Exactness
comes from rates of 0 or 1 and seeded RNGs. Nothing is mocked.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from moonbatch.emulator.inference import infer
from moonbatch.emulator.server import FAULT_KINDS, EmulatorConfig, EmulatorServer, Faults
from moonbatch.workers.providers.moondream.answers import BatchStatus, Part
from moonbatch.workers.providers.moondream.client import BatchClient
from moonbatch.workers.providers.moondream.errors import TransientError
from tests.conftest import stop_later

API_KEY = "test-key-" + uuid.uuid4().hex
AUTH = {"X-Moondream-Auth": API_KEY}
ERROR_KEYS = {"message", "type", "param", "code"}
# What a client sees when the server hangs up without answering (never a timeout).
DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.ConnectError)


# -- fixtures and helpers ----------------------------------------------------------------------
@pytest.fixture
def start(_stopping: list[threading.Thread]) -> Iterator:
    """``start(**faults)`` → a running emulator with a fast configuration and those faults."""
    def _start(**faults: object) -> EmulatorServer:
        config = EmulatorConfig(api_key=API_KEY, chunking_seconds=0.05, processing_seconds=0.05,
                                min_part_size=0, faults=Faults(**faults))  # type: ignore[arg-type]
        srv = EmulatorServer(config).start()
        started.append(srv)
        return srv

    started: list[EmulatorServer] = []
    yield _start
    for srv in started:
        stop_later(srv, _stopping)


@pytest.fixture
def server(start) -> EmulatorServer:
    return start()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def client_of(server: EmulatorServer, max_attempts: int = 2, **kw: object) -> BatchClient:
    return BatchClient(server.url, API_KEY, timeout=10, max_attempts=max_attempts,
                       backoff_initial=0.01, backoff_max=0.05, **kw)  # type: ignore[arg-type]


def lines(n: int, prefix: str = "line") -> bytes:
    """``n`` caption lines on small distinct JPEGs, ids ``<prefix>-<i>``."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (16 + i, 16), (10 * i % 256, 40, 90)).save(buf, format="JPEG")
        obj = {"id": f"{prefix}-{i}", "skill": "caption", "length": "short",
               "image": base64.b64encode(buf.getvalue()).decode()}
        out.append(json.dumps(obj).encode() + b"\n")
    return b"".join(out)


def submit(client: BatchClient, data: bytes, parts: int = 1) -> BatchStatus:
    up = client.create_upload()
    size = -(-len(data) // parts)
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    done = [client.upload_part(up.file_id, up.upload_id, n, c) for n, c in enumerate(chunks, 1)]
    return client.complete_upload(up.file_id, up.upload_id, done)


def wait_final(client: BatchClient, batch_id: str, timeout: float = 10.0) -> BatchStatus:
    deadline = time.monotonic() + timeout
    while True:
        st = client.get_batch(batch_id)
        if st.done:
            return st
        assert time.monotonic() < deadline, f"batch {batch_id} still {st.status}"
        time.sleep(0.03)


def completed_batch(server: EmulatorServer, n: int = 30) -> BatchStatus:
    """A completed batch of ``n`` lines in one output file, made with the faults off."""
    saved = server.config.faults
    server.config.faults = Faults()
    client = client_of(server)
    try:
        final = wait_final(client, submit(client, lines(n)).id)
    finally:
        client.close()
        server.config.faults = saved
    assert final.status == "completed" and len(final.outputs) == 1
    return final


def api_calls(server: EmulatorServer) -> list[tuple[str, str]]:
    """One request to each authenticated endpoint (the ids need not exist)."""
    u = server.url
    return [
        ("POST", f"{u}/batch?action=mpu-create"),
        ("PUT", f"{u}/batch/01X?action=mpu-uploadpart&uploadId=u&partNumber=1"),
        ("POST", f"{u}/batch/01X?action=mpu-complete&uploadId=u"),
        ("DELETE", f"{u}/batch/01X?action=mpu-abort&uploadId=u"),
        ("GET", f"{u}/batch/01ANYTHING"),
        ("GET", f"{u}/batch?limit=5"),
    ]


def healthz(server: EmulatorServer) -> str:
    return f"http://{server.host}:{server.port}/healthz"


def zero_counts() -> dict[str, int]:
    return dict.fromkeys(FAULT_KINDS, 0)


# -- configuration -----------------------------------------------------------------------------
def test_no_faults_by_default_and_the_config_validates():
    assert EmulatorConfig().faults == Faults()
    f = Faults()
    assert (f.rate_429, f.rate_5xx, f.rate_drop, f.latency, f.rate_truncate, f.rate_corrupt,
            f.batch_fail_rate, f.line_error_rate) == (0.0,) * 8
    assert f.batch_fail_code == "processing_failed" and f.retry_after == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.rate_429 = 1.0  # type: ignore[misc]
    for bad in ({"rate_429": 1.5}, {"rate_drop": -0.1}, {"rate_429": 0.6, "rate_5xx": 0.5},
                {"rate_truncate": 0.7, "rate_corrupt": 0.7}, {"latency": -1.0},
                {"line_error_rate": 2.0}):
        with pytest.raises(ValueError):
            Faults(**bad)  # type: ignore[arg-type]


def test_a_full_flow_without_faults_injects_nothing(server):
    client = client_of(server, max_attempts=1)
    try:
        final = wait_final(client, submit(client, lines(3), parts=2).id)
        assert final.status == "completed" and final.progress["failed"] == 0
        rows = [json.loads(x) for x in client.download(final.outputs[0]).splitlines()]
        assert all(r["status"] == "ok" for r in rows) and len(rows) == 3
    finally:
        client.close()
    assert server.emulator.injected == zero_counts()


# -- 429 / 5xx / drop --------------------------------------------------------------------------
def test_rate_429_one_answers_every_endpoint_429_with_retry_after(server, http):
    server.config.faults = Faults(rate_429=1.0, retry_after=0.2)
    for method, url in api_calls(server):
        r = http.request(method, url, headers=AUTH, content=b"x" * 100 if method == "PUT" else None)
        assert r.status_code == 429, (method, url)
        assert r.headers["Retry-After"] == "0.2"
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
        assert body["error"]["code"] == "rate_limited" and body["error"]["message"]
    assert server.emulator.injected == {**zero_counts(), "429": 6}
    # Faulted requests never reach their handlers.
    assert server.emulator.requests == {}
    # /healthz never faults; a request without the key is a 401, not a fault.
    assert http.get(healthz(server)).status_code == 200
    assert http.get(f"{server.url}/batch").status_code == 401
    assert server.emulator.injected["429"] == 6

    server.config.faults = Faults(rate_429=1.0, retry_after=2)
    assert http.get(f"{server.url}/batch", headers=AUTH).headers["Retry-After"] == "2"
    server.config.faults = Faults(rate_429=1.0, retry_after=None)
    r = http.get(f"{server.url}/batch", headers=AUTH)
    assert r.status_code == 429 and "Retry-After" not in r.headers


def test_rate_5xx_one_answers_500_502_503_with_their_codes(server, http):
    server.config.faults = Faults(rate_5xx=1.0, seed=7)
    codes = {500: "internal_error", 502: "bad_gateway", 503: "service_unavailable"}
    seen = set()
    for i in range(30):
        method, url = api_calls(server)[i % 6]
        r = http.request(method, url, headers=AUTH)
        assert r.status_code in codes
        err = r.json()["error"]
        assert set(err) == ERROR_KEYS and err["code"] == codes[r.status_code]
        seen.add(r.status_code)
    assert seen == set(codes)
    assert server.emulator.injected == {**zero_counts(), "5xx": 30}


def test_rate_drop_one_hangs_up_without_a_response_and_the_server_lives_on(
        server, http, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    server.config.faults = Faults(rate_drop=1.0)
    for method, url in api_calls(server) * 2:
        content = b"y" * 2_000_000 if method == "PUT" else None  # a body still being sent
        with pytest.raises(DROPPED):
            http.request(method, url, headers=AUTH, content=content)
    assert server.emulator.injected == {**zero_counts(), "drop": 12}
    assert http.get(healthz(server)).json() == {"ok": True}
    server.config.faults = Faults()
    assert http.get(f"{server.url}/batch", headers=AUTH).status_code == 200
    # Neither tracebacks nor werkzeug log lines for the dropped requests.
    time.sleep(0.1)
    out, err = capfd.readouterr()
    assert "Traceback" not in err + out and "Error" not in err + out, err
    assert not [r for r in caplog.records if r.name.startswith("werkzeug") and
                r.levelno >= logging.WARNING]


@pytest.mark.parametrize("fault", ["rate_429", "rate_5xx", "rate_drop"])
def test_a_refused_uploadpart_stores_no_part(server, http, fault):
    client = client_of(server, max_attempts=1)
    up = client.create_upload()
    data = lines(1)
    etag = hashlib.md5(data).hexdigest()
    params = {"action": "mpu-uploadpart", "uploadId": up.upload_id, "partNumber": 1}
    server.config.faults = Faults(**{fault: 1.0})
    try:
        r = http.put(f"{server.url}/batch/{up.file_id}", params=params, content=data, headers=AUTH)
        assert r.status_code in (429, 500, 502, 503)
    except DROPPED:
        assert fault == "rate_drop"
    server.config.faults = Faults()
    assert server.emulator.uploads[up.file_id].parts == {}
    r = http.post(f"{server.url}/batch/{up.file_id}",
                  params={"action": "mpu-complete", "uploadId": up.upload_id},
                  json={"parts": [{"partNumber": 1, "etag": f'"{etag}"'}]}, headers=AUTH)
    assert r.status_code == 400  # part 1 was never stored
    part = client.upload_part(up.file_id, up.upload_id, 1, data)
    assert part.etag == f'"{etag}"'
    assert client.complete_upload(up.file_id, up.upload_id, [part]).status == "chunking"
    client.close()


def test_rate_zero_never_faults_and_a_seed_fixes_the_sequence(start, http):
    a = start(rate_429=0.0, rate_5xx=0.0, rate_drop=0.0, rate_truncate=0.0, rate_corrupt=0.0)
    assert {http.get(f"{a.url}/batch", headers=AUTH).status_code for _ in range(20)} == {200}
    assert a.emulator.injected == zero_counts()

    def statuses(srv: EmulatorServer) -> list[int | str]:
        seen: list[int | str] = []
        for _ in range(60):
            try:
                seen.append(http.get(f"{srv.url}/batch", headers=AUTH).status_code)
            except DROPPED:
                seen.append("drop")
        return seen

    faults = {"rate_429": 0.3, "rate_5xx": 0.3, "rate_drop": 0.1}
    first, second, other = start(seed=11, **faults), start(seed=11, **faults), start(seed=12, **faults)
    seq = statuses(first)
    assert seq == statuses(second) != statuses(other)
    assert {200, 429, "drop"} <= set(seq) and set(seq) & {500, 502, 503}
    counts = first.emulator.injected
    assert counts["429"] == seq.count(429) and counts["drop"] == seq.count("drop")
    assert counts["5xx"] == sum(seq.count(s) for s in (500, 502, 503))
    # Assigning a new Faults (the same values) restarts the RNG from its seed.
    first.config.faults = Faults(seed=11, **faults)  # type: ignore[arg-type]
    assert statuses(first) == seq


def test_faults_change_while_the_server_runs(server, http):
    url = f"{server.url}/batch"
    assert http.get(url, headers=AUTH).status_code == 200
    server.config.faults = Faults(rate_429=1.0)
    assert http.get(url, headers=AUTH).status_code == 429
    server.config.faults = dataclasses.replace(server.config.faults, rate_429=0.0, rate_5xx=1.0)
    assert http.get(url, headers=AUTH).status_code in (500, 502, 503)
    server.config.faults = Faults()
    assert http.get(url, headers=AUTH).status_code == 200
    assert server.emulator.injected == {**zero_counts(), "429": 1, "5xx": 1}


def test_counters_are_exact_under_concurrent_requests(server):
    server.config.faults = Faults(seed=3, rate_429=0.4, rate_5xx=0.2)
    observed: list[int] = []
    lock = threading.Lock()

    def hammer() -> None:
        with httpx.Client(timeout=10) as c:
            codes = [c.get(f"{server.url}/batch", headers=AUTH).status_code for _ in range(25)]
        with lock:
            observed.extend(codes)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(observed) == 200
    injected = server.emulator.injected
    assert injected["429"] == observed.count(429)
    assert injected["5xx"] == sum(observed.count(s) for s in (500, 502, 503))
    assert injected["429"] + injected["5xx"] + observed.count(200) == 200
    assert 40 <= injected["429"] <= 120 and 15 <= injected["5xx"] <= 70


# -- latency -----------------------------------------------------------------------------------
def test_latency_delays_api_requests_and_downloads_but_not_healthz(server, http):
    final = completed_batch(server, 2)
    server.config.faults = Faults(seed=5, latency=0.15)
    took = []
    for url, headers in [(f"{server.url}/batch", AUTH)] * 5 + [(final.outputs[0].url, {})] * 5:
        t0 = time.perf_counter()
        assert http.get(url, headers=headers).status_code == 200
        took.append(time.perf_counter() - t0)
    assert max(took) < 0.15 + 0.3
    assert sum(took[:5]) > 0.1 and sum(took[5:]) > 0.1  # five uniform(0, 0.15) draws each
    assert len({round(t, 3) for t in took}) > 5  # random, not constant
    t0 = time.perf_counter()
    for _ in range(5):
        http.get(healthz(server))
    assert time.perf_counter() - t0 < 0.1 + 5 * 0.02
    assert server.emulator.injected == zero_counts()  # latency is not counted as a fault


# -- downloads: truncated and corrupted bodies -------------------------------------------------
def test_truncated_download_announces_the_full_length_and_hangs_up_halfway(server, http):
    final = completed_batch(server)
    url = final.outputs[0].url
    full = http.get(url).content
    server.config.faults = Faults(rate_truncate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        http.get(url)
    got = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with http.stream("GET", url) as r:
            assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(full)
            for chunk in r.iter_raw():
                got += chunk
    assert got == full[:len(full) // 2]
    assert server.emulator.injected == {**zero_counts(), "truncate": 2}
    # API requests are not affected; with the rate back at 0 the body is whole again.
    assert http.get(f"{server.url}/batch", headers=AUTH).status_code == 200
    server.config.faults = Faults(rate_truncate=0.0)
    assert http.get(url).content == full


def test_the_client_retries_a_truncated_download_until_it_gives_up(server):
    final = completed_batch(server)
    server.config.faults = Faults(rate_truncate=1.0)
    client = client_of(server, max_attempts=3)
    try:
        with pytest.raises(TransientError):
            client.download(final.outputs[0])
        assert server.emulator.injected["truncate"] == 3
        server.config.faults = Faults()
        assert len(client.download(final.outputs[0]).splitlines()) == 30
    finally:
        client.close()


def test_corrupted_download_has_the_full_length_but_a_line_that_is_not_json(server, http):
    final = completed_batch(server)
    url = final.outputs[0].url
    full = http.get(url).content
    server.config.faults = Faults(rate_corrupt=1.0)
    r = http.get(url)
    assert r.status_code == 200 and len(r.content) == len(full) == int(r.headers["Content-Length"])
    assert r.content != full and sum(a != b for a, b in zip(r.content, full, strict=True)) <= 4
    bad = []
    for line in r.content.splitlines():
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    assert len(r.content.splitlines()) == 30 and 1 <= len(bad) <= 2
    assert server.emulator.injected == {**zero_counts(), "corrupt": 1}


# -- the client through a flaky API ------------------------------------------------------------
def test_batch_client_gets_through_a_flaky_api_and_honours_retry_after(server):
    waits: list[float] = []
    # 60 % of API requests fail. Seed 277 has no run of 7 faults in its first 400 requests, so
    # every call succeeds within 8 attempts however many polls the timing takes (a seed such as
    # 2024 has a run of 14 early on).
    server.config.faults = Faults(seed=277, rate_429=0.3, rate_5xx=0.2, rate_drop=0.1,
                                  latency=0.02, retry_after=0.2)
    client = client_of(server, max_attempts=8, sleep=waits.append)
    data = lines(6)
    try:
        created = submit(client, data, parts=3)
        final = wait_final(client, created.id)
        assert final.status == "completed", final.error
        assert final.progress == {"total": 6, "completed": 6, "failed": 0}
        listed = [b["id"] for b in client.list_batches()["batches"]]
        rows = [json.loads(x) for out in final.outputs for x in client.download(out).splitlines()]
    finally:
        client.close()
    assert listed == [final.id]
    sources = [json.loads(x) for x in data.splitlines()]
    assert sorted(r["line_index"] for r in rows) == list(range(6))
    for r in rows:
        assert r["status"] == "ok" and r["result"] == infer(sources[r["line_index"]])[0]

    injected = server.emulator.injected
    assert injected["429"] and injected["5xx"] and injected["drop"], injected
    # One wait per failed attempt: Retry-After (0.2 s) after each 429, backoff (≤ 0.05 s) else.
    assert len(waits) == injected["429"] + injected["5xx"] + injected["drop"]
    assert waits.count(0.2) == injected["429"]
    assert all(w <= 0.05 for w in waits if w != 0.2)
    # Only three parts were ever stored and completed; a refused part never counted.
    assert server.emulator.requests["mpu-uploadpart"] == 3
    assert server.emulator.requests["mpu-complete"] == 1


# -- batch-level and per-line faults -----------------------------------------------------------
def test_batch_fail_rate_one_fails_the_batch_with_the_configured_code(server):
    server.config.faults = Faults(batch_fail_rate=1.0, batch_fail_code="timeout")
    client = client_of(server)
    try:
        created = submit(client, lines(4))
        assert created.status == "chunking"
        final = wait_final(client, created.id)
        assert final.status == "failed"
        assert final.error_code() == "timeout" and final.error_message()
        assert final.progress == {"total": 4, "completed": 0, "failed": 0}  # chunked, then failed
        assert final.outputs == [] and final.usage is None and final.completed_at
        # The default code, and rate 0.
        server.config.faults = Faults(batch_fail_rate=1.0)
        assert wait_final(client, submit(client, lines(1)).id).error_code() == "processing_failed"
        server.config.faults = Faults(batch_fail_rate=0.0)
        assert wait_final(client, submit(client, lines(1)).id).status == "completed"
    finally:
        client.close()
    assert server.emulator.injected == {**zero_counts(), "batch_failed": 2}


def test_line_error_rate_one_makes_every_row_a_processing_error(server):
    server.config.faults = Faults(line_error_rate=1.0)
    client = client_of(server)
    try:
        final = wait_final(client, submit(client, lines(5)).id)
        rows = [json.loads(x) for x in client.download(final.outputs[0]).splitlines()]
    finally:
        client.close()
    assert final.status == "completed" and final.error is None
    assert final.progress == {"total": 5, "completed": 0, "failed": 5}
    assert final.usage == {"input_tokens": 0, "output_tokens": 0}
    assert sorted(r["line_index"] for r in rows) == list(range(5))
    for r in rows:
        assert r["status"] == "error" and "result" not in r
        assert r["error"]["code"] == "processing_error" and r["error"]["message"]
        assert r["id"] == f"line-{r['line_index']}"
    assert server.emulator.injected == {**zero_counts(), "line_error": 5}


def test_line_errors_are_drawn_afresh_for_each_batch(server):
    server.config.faults = Faults(seed=9, line_error_rate=0.5)
    client = client_of(server)
    data = lines(40)
    failed_sets = []
    try:
        for _ in range(2):
            final = wait_final(client, submit(client, data).id)
            rows = [json.loads(x) for x in client.download(final.outputs[0]).splitlines()]
            failed = {r["line_index"] for r in rows if r["status"] == "error"}
            assert all(r["error"]["code"] == "processing_error" for r in rows if r["status"] == "error")
            assert final.status == "completed"
            assert final.progress == {"total": 40, "completed": 40 - len(failed), "failed": len(failed)}
            assert 5 <= len(failed) <= 35
            failed_sets.append(failed)
    finally:
        client.close()
    # A line that failed in one batch has a fresh chance in the next.
    assert failed_sets[0] != failed_sets[1]
    assert server.emulator.injected["line_error"] == sum(len(s) for s in failed_sets)


def test_parts_of_a_flaky_upload_complete_to_the_same_bytes(server):
    """A 429/5xx/drop never leaves a half-stored part behind: what completes is the input."""
    server.config.faults = Faults(seed=77, rate_429=0.2, rate_5xx=0.2, rate_drop=0.2,
                                  retry_after=0)
    client = client_of(server, max_attempts=15, sleep=lambda s: None)
    data = lines(8)
    try:
        up = client.create_upload()
        size = -(-len(data) // 4)
        parts: list[Part] = [client.upload_part(up.file_id, up.upload_id, n, data[i:i + size])
                             for n, i in enumerate(range(0, len(data), size), 1)]
        assert [p.etag for p in parts] == [
            '"' + hashlib.md5(data[i:i + size]).hexdigest() + '"' for i in range(0, len(data), size)]
        created = client.complete_upload(up.file_id, up.upload_id, parts)
        server.config.faults = Faults()
        final = wait_final(client, created.id)
    finally:
        client.close()
    assert final.status == "completed" and final.progress["total"] == 8
    assert server.emulator.requests["mpu-uploadpart"] == 4
