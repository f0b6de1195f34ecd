"""Keys go only where they belong (issue 16, item 4 and two of item 10).

``FAL_KEY`` reaches only the configured fal queue origin and ``MOONDREAM_API_KEY`` only the
Batch API's, whatever OUTPUT's documents (``requests.json``, ``batch.json``) or the services'
answers say; downloads of result files carry no key; exceptions and result rows carry no
storage error body, presigned URL or data URI.

Over real servers: moto, the emulator over HTTP, real Celery workers, and a recording HTTP server
on loopback (``Recorder``) standing for whoever rewrote a run's documents to point at itself.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from moonbatch.emulator.fal import FalConfig
from tests.conftest import (
    Worker,
    read_json,
    read_results,
    run_cli,
    tiny_jpeg,
    upload_photos,
    wait_for_run,
)
from tests.test_fal_provider import expected_row, start

CAPTION = "fal-ai/moondream3-preview/caption"
Answer = Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], Any]]


def _fal_in_queue(method: str, path: str, headers: dict[str, str], body: bytes
                  ) -> tuple[int, dict[str, str], bytes]:
    """What a server posing as fal's queue answers: every request waits for ever."""
    status = "CANCELLATION_REQUESTED" if method == "PUT" else "IN_QUEUE"
    return 202, {"Content-Type": "application/json"}, json.dumps(
        {"status": status, "queue_position": 0, "logs": None}).encode()


class Recorder:
    """A real HTTP server on 127.0.0.1 (a context manager) that logs every request it gets
    (``log``: method, path with query, headers) and answers with ``answer(method, path,
    headers, body)``; a body given as a list of chunks goes without a length, ``drip`` seconds
    apart
    (default: a fal queue where every request stays ``IN_QUEUE``)."""

    def __init__(self, answer: Answer = _fal_in_queue, drip: float = 0.0) -> None:
        self.answer, self.drip = answer, drip
        self.log: list[tuple[str, str, dict[str, str]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = dict(self.headers.items())
                recorder.log.append((self.command, self.path, headers))
                status, headers, out = recorder.answer(self.command, self.path, headers, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if isinstance(out, list):  # no length: chunks until the connection closes
                    self.end_headers()
                    try:
                        for chunk in out:
                            self.wfile.write(chunk)
                            self.wfile.flush()
                            time.sleep(recorder.drip)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client gave up: what a cap or a deadline does
                    return
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_PUT = do_POST = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def carrying(self, secret: str) -> list[tuple[str, str]]:
        """``(method, path)`` of every logged request with ``secret`` in a header."""
        return [(m, p) for m, p, h in self.log if any(secret in v for v in h.values())]

    def __enter__(self) -> Recorder:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _forward_to(base: str) -> Answer:
    """An ``Answer`` that relays each request to ``base`` (a logging reverse proxy)."""
    client = httpx.Client(timeout=30)

    def answer(method: str, path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, str], bytes]:
        # The key is relayed as it came: the proxy only watches where it goes.
        relayed = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}
        resp = client.request(method, base + path, content=body, headers=relayed)
        keep = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "etag",
                                                                        "retry-after")}
        return resp.status_code, keep, resp.content

    return answer



def _ledgers(s3, bucket: str, prefix: str) -> list[str]:
    resp = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "_moonbatch/shards/")
    return [o["Key"] for o in resp.get("Contents", []) if o["Key"].endswith("/requests.json")]


def _cas(s3, bucket: str, key: str, change: Callable[[dict], bool]) -> dict | None:
    """Rewrite the JSON document ``key`` with ``change`` (which says whether it changed it) if
    nobody wrote it meanwhile (``IfMatch``): a tamperer that never undoes a step's work.
    Returns the document written, or None."""
    got = s3.get_object(Bucket=bucket, Key=key)
    doc = json.loads(got["Body"].read())
    if not change(doc):
        return None
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(doc).encode(), IfMatch=got["ETag"])
    except s3.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] in ("PreconditionFailed", "412"):
            return None
        raise
    return doc


def _point_at(recorder: Recorder) -> Callable[[dict], bool]:
    """A ``change`` that points every in-flight request's URLs at ``recorder`` (the fields the
    previous version stored and used)."""
    def change(ledger: dict) -> bool:
        changed = False
        for entry in ledger.get("inflight", {}).values():
            root = f"{recorder.url}/fal-ai/moondream3-preview/requests/{entry['request_id']}"
            if entry.get("status_url") != root + "/status":
                entry.update(status_url=root + "/status", response_url=root,
                             cancel_url=root + "/cancel")
                changed = True
        return changed

    return change


def _cancel_if_running(env: dict[str, str], run_id: str, s3, bucket: str, prefix: str) -> None:
    """Leave the shared fleet idle: cancel a run a failed test left going."""
    try:
        if read_json(s3, bucket, prefix + "run.json").get("status") in ("completed", "failed",
                                                                         "cancelled"):
            return
    except s3.exceptions.NoSuchKey:
        pass
    run_cli(["cancel", run_id], env, check=False)


def _wait_for_failure(s3, bucket: str, prefix: str, timeout: float) -> dict:
    """The run's ``failed.json`` once a task recorded why the run cannot complete."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return read_json(s3, bucket, prefix + "_moonbatch/failed.json")
        except s3.exceptions.NoSuchKey:
            time.sleep(0.3)
    raise AssertionError(f"no failure recorded under {prefix} after {timeout}s")


# -- fal: the queue URLs a run uses come from the configured origin, never from storage -----------
@pytest.mark.timeout(300)
def test_rewritten_request_urls_send_no_key_and_the_run_finishes(s3, bucket, env, fleet,
                                                                  emulator):
    n = 8
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"in/{i:02d}.jpg",
                                              Body=tiny_jpeg(i)), range(n)))
    # Two requests run at a time, 1.5 s each: requests stay in flight for several steps.
    emulator.config.fal = FalConfig(concurrency=2, processing_seconds=1.5)
    submits = emulator.emulator.fal.calls.get("submit", 0)
    with Recorder() as recorder:
        run_id = start(env, f"s3://{bucket}/in/", f"s3://{bucket}/out/", CAPTION,
                       {"skill": "caption"})
        try:
            tampered = consumed = 0
            ours: dict[str, int] = {}  # ledger key → the step count of our last rewrite
            forged: list[str] = []  # the request whose id we replaced by a path, once
            picked: list[str] = []

            def rewrite(ledger: dict) -> bool:
                changed = _point_at(recorder)(ledger)
                if not forged and ledger["inflight"]:
                    entry = ledger["inflight"][min(ledger["inflight"])]
                    picked[:] = [entry["request_id"]]
                    entry["request_id"] = "../../x?y#"
                    changed = True
                return changed

            deadline = time.time() + 150
            summary: dict = {}
            while time.time() < deadline:
                try:
                    summary = read_json(s3, bucket, "out/run.json")
                except s3.exceptions.NoSuchKey:
                    summary = {}
                if summary.get("status") in ("completed", "failed", "cancelled") \
                        and "counts" in summary:
                    break
                for key in _ledgers(s3, bucket, "out/"):
                    doc = _cas(s3, bucket, key, rewrite)
                    if doc is not None:
                        tampered += 1
                        ours[key] = doc["steps"]
                        forged[:] = forged or picked
                        continue
                    ledger = read_json(s3, bucket, key)
                    if key in ours and ledger["steps"] > ours[key] and any(
                            e.get("status_url", "").startswith(recorder.url)
                            for e in ledger["inflight"].values()):
                        consumed += 1  # a step wrote back the entries it read from our rewrite
                time.sleep(0.1)
            keyed = recorder.carrying(env["FAL_KEY"])
            sent = emulator.emulator.fal.calls.get("submit", 0) - submits
            print(f"keyed requests at the recorder: {len(keyed)}; ledger rewrites: {tampered}; "
                  f"steps that read a rewritten ledger: {consumed}; submits: {sent}")
            assert not keyed, f"{len(keyed)} request(s) with FAL_KEY reached the recorder: " \
                              f"{sorted(set(keyed))[:5]}"
            assert not recorder.log  # nothing at all went there
            assert tampered and consumed and forged, (tampered, consumed, forged)
            assert summary.get("status") == "completed", summary
            rows = read_results(s3, bucket, "out/")
            assert sorted(r["id"] for r in rows) == [f"{i:02d}.jpg" for i in range(n)]
            assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
            # The line whose request id was forged ended request_failed and was sent again.
            assert sent == n + 1 and s3.list_objects_v2(
                Bucket=bucket, Prefix="out/_moonbatch/shards/00000/r1/")["KeyCount"]
        finally:
            _cancel_if_running(env, run_id, s3, bucket, "out/")


@pytest.mark.timeout(240)
def test_cancel_of_a_rewritten_ledger_sends_no_key_off_origin(s3, bucket, env, emulator, tmp_path):
    n = 6
    with cf.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"in/{i:02d}.jpg",
                                              Body=tiny_jpeg(i)), range(n)))
    emulator.config.fal = FalConfig(concurrency=4, processing_seconds=60.0)
    fal = emulator.emulator.fal
    before = set(fal.requests)
    queue = "keys-" + uuid.uuid4().hex[:8]
    qenv = {**env, "MOONBATCH_QUEUE": queue}
    with Recorder() as recorder:
        with Worker(qenv, queue, tmp_path / "worker.log") as worker:
            run_id = start(qenv, f"s3://{bucket}/in/", f"s3://{bucket}/out/", CAPTION,
                           {"skill": "caption"})
            deadline = time.time() + 90
            while time.time() < deadline:  # every request sent and recorded in the ledger
                keys = _ledgers(s3, bucket, "out/")
                if keys and len(read_json(s3, bucket, keys[0])["inflight"]) == n:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError("the requests never were all in flight")
            worker.kill()  # nobody steps the round any more: the ledger stays as we leave it
        (key,) = _ledgers(s3, bucket, "out/")
        ledger = read_json(s3, bucket, key)
        _point_at(recorder)(ledger)
        forged = sorted(ledger["inflight"])[0]
        lost_id = ledger["inflight"][forged]["request_id"]
        ledger["inflight"][forged]["request_id"] = f"../../x?cancel={lost_id}#"
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(ledger).encode())

        proc = run_cli(["cancel", run_id], qenv)
    keyed = recorder.carrying(env["FAL_KEY"])
    assert not keyed, f"{len(keyed)} request(s) with FAL_KEY reached the recorder"
    assert f"{n - 1} request(s) in flight cancelled" in proc.stdout, proc.stdout + proc.stderr
    ours = set(fal.requests) - before
    assert len(ours) == n
    assert fal.requests[lost_id].cancelled is None  # its id in the ledger was not fal's
    assert all(fal.requests[r].cancelled is not None for r in ours - {lost_id})


def test_captions_file_download_carries_no_key(s3, bucket, env, fleet, emulator):
    names = ("chelsea.png", "rocket.jpg", "coffee.png")
    photos = upload_photos(s3, bucket, "photos/", names)
    calls = dict(emulator.emulator.fal.calls)
    start(env, f"s3://{bucket}/photos/", f"s3://{bucket}/out/", "fal-ai/moondream-next/batch",
          {"skill": "caption"})
    summary = wait_for_run(s3, bucket, "out/", timeout=120)
    assert summary["status"] == "completed", summary
    after = emulator.emulator.fal.calls
    assert after.get("file_with_key", 0) == calls.get("file_with_key", 0), \
        "a captions_file download carried Authorization"
    assert after.get("file", 0) > calls.get("file", 0)  # the captions_file was read
    rows = {r["id"]: r for r in read_results(s3, bucket, "out/")}
    for name in names:
        result, _ = expected_row("fal-ai/moondream-next/batch", {"prompt": "Describe this image."},
                                 photos[name], "caption")
        assert rows[name]["result"]["caption"] == result["caption"]


# -- the Batch API: MOONDREAM_API_KEY only to its origin, on the API's own paths ------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("forged", ["../../x", "{recorder}/x", "b1?action=mpu-abort&uploadId=u"])
def test_a_forged_batch_id_is_never_requested(forged, s3, bucket, env, emulator, tmp_path):
    emulator.config.chunking_seconds = 30.0  # the batch stays in flight while we rewrite it
    upload_photos(s3, bucket, "photos/", ("chelsea.png", "coffee.png"))
    queue = "keys-" + uuid.uuid4().hex[:8]
    with Recorder() as recorder, Recorder(_forward_to(emulator.fal_url)) as proxy:
        qenv = {**env, "MOONBATCH_QUEUE": queue, "MOONBATCH_MOONDREAM_URL": proxy.url + "/v1"}
        with Worker(qenv, queue, tmp_path / "worker.log"):
            run_cli(["submit", f"s3://{bucket}/photos/", f"s3://{bucket}/out/"], qenv)
            key = "out/_moonbatch/shards/00000/r0/batch.json"
            deadline, real = time.time() + 90, None
            while time.time() < deadline and not real:
                try:
                    real = read_json(s3, bucket, key).get("batch_id")
                except s3.exceptions.NoSuchKey:
                    pass
                time.sleep(0.2)
            bad = forged.format(recorder=recorder.url)
            assert _cas(s3, bucket, key, lambda d: d.update(batch_id=bad) is None)
            mark = len(proxy.log)
            failure = _wait_for_failure(s3, bucket, "out/", timeout=90)
    api_key = env["MOONDREAM_API_KEY"]
    assert not recorder.carrying(api_key)
    # Only a poll that read batch.json before the rewrite may still name the real batch.
    after = [(m, p) for m, p, h in proxy.log[mark:] if any(api_key in v for v in h.values())]
    assert set(after) <= {("GET", f"/v1/batch/{real}")}, after
    assert "batch.json" in failure["error"] and "batch id" in failure["error"], failure
    assert bad not in failure["error"]


def _routes(table: dict[str, tuple[int, dict[str, str], Any]]) -> Answer:
    """An ``Answer`` serving ``table`` by path (query ignored); 404 for anything else."""
    def answer(method: str, path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, str], Any]:
        return table.get(path.split("?")[0], (404, {}, b"no such thing"))

    return answer


STORAGE_ERROR = (b"<?xml version='1.0'?><Error><Code>SignatureDoesNotMatch</Code><StringToSign>"
                 b"AWS4-HMAC-SHA256 MARKER-OF-THE-BODY</StringToSign></Error>")


def test_batch_api_key_never_follows_a_redirect_and_downloads_carry_none():
    from moonbatch.workers.providers.moondream.answers import OutputFile
    from moonbatch.workers.providers.moondream.client import BatchClient
    from moonbatch.workers.providers.moondream.download import fetch_results
    from moonbatch.workers.providers.moondream.errors import (
        ForeignOrigin,
        InvalidId,
        MoondreamError,
        RequestRejected,
    )

    key = "sk-" + uuid.uuid4().hex
    with Recorder(_routes({})) as store, Recorder(_routes({})) as hop, \
            Recorder(_routes({})) as api:
        rows = b'{"line_index": 0, "id": "a", "result": {"caption": "x"}}\n'
        store.answer = _routes({"/results/0.jsonl": (200, {}, rows),
                                "/expired.jsonl": (403, {"Content-Type": "application/xml"},
                                                   STORAGE_ERROR)})
        hop.answer = _routes({"/0.jsonl": (302, {"Location": store.url + "/results/0.jsonl"},
                                           b"")})
        done = {"id": "b1", "status": "completed", "progress": {"total": 1, "completed": 1},
                "outputs": [{"index": 0, "url": hop.url + "/0.jsonl?X-Amz-Signature=s"}]}
        api.answer = _routes({
            "/v1/batch/b1": (200, {"Content-Type": "application/json"}, json.dumps(done).encode()),
            "/v1/batch/b2": (307, {"Location": store.url + "/v1/batch/b2"}, b""),
        })
        client = BatchClient(api.url + "/v1", key, max_attempts=2, sleep=lambda s: None)

        # A result URL that redirects to another host: followed, with no key anywhere.
        files, _ = fetch_results(client, client.get_batch("b1"))
        assert list(files) == [rows]
        assert [p for _, p, _ in store.log] == ["/results/0.jsonl"]
        assert not store.carrying(key) and not hop.carrying(key)
        assert api.carrying(key)  # the API itself got it

        # The API answering a redirect: not followed with the key.
        with pytest.raises(RequestRejected) as info:
            client.get_batch("b2")
        assert info.value.status == 307 and "redirect" in str(info.value)
        assert "/v1/batch/b2" not in [p for _, p, _ in store.log]

        # Ids from OUTPUT's documents that would leave their path segment: nothing sent.
        seen = len(api.log)
        for forged in ("../../x", store.url + "/x", "b1?action=mpu-abort", "", "a b", "%2e%2e"):
            with pytest.raises(InvalidId) as bad:
                client.get_batch(forged)
            assert "batch id" in str(bad.value) and (not forged or forged not in str(bad.value))
            with pytest.raises(InvalidId):
                client.upload_part(forged, "u", 1, b"x")
            client.abort_upload(forged, "u")  # an upload that cannot be the API's: gone
        assert len(api.log) == seen and not store.carrying(key)
        # The last check before any keyed request leaves: its origin is the API's.
        with pytest.raises(ForeignOrigin):
            client._http.get(store.url + "/elsewhere")
        assert "/elsewhere" not in [p for _, p, _ in store.log]

        # A failed presigned download keeps the status and the error code, not the storage
        # service's body (S3's quotes the string it signed).
        with pytest.raises(MoondreamError) as info:
            client.download(OutputFile(index=0, url=store.url + "/expired.jsonl?X-Amz-Signature=s"))
        message = str(info.value)
        print("download error:", message)
        assert info.value.status == 403 and info.value.code == "SignatureDoesNotMatch"
        assert "Forbidden" in message and "MARKER" not in message and "StringToSign" not in message
        assert "X-Amz" not in message and "AWS4" not in message


def test_fal_file_downloads_carry_no_key_and_are_bounded():
    from moonbatch.workers.providers.fal.client import (
        FalBadRequestId,
        FalForeignOrigin,
        FalQueueClient,
        FalRequestError,
        FalTransient,
    )
    from moonbatch.workers.providers.fal.payloads import archive_answers

    key = "fal-" + uuid.uuid4().hex
    captions = json.dumps({"000000.png": "a cat"}).encode()
    with Recorder(_routes({})) as files, Recorder(_routes({})) as hop, \
            Recorder(_routes({})) as queue, Recorder(_routes({}), drip=0.3) as slow:
        files.answer = _routes({
            "/captions.json": (200, {"Content-Type": "application/json"}, captions),
            "/big.json": (200, {}, b"[" + b" " * 2_000_000 + b"]"),
            "/unsized.json": (200, {}, [b" " * 100_000] * 20),
            "/broken.json": (500, {}, STORAGE_ERROR),
        })
        slow.answer = _routes({"/drip.json": (200, {}, [b" "] * 30)})
        hop.answer = _routes({"/c.json": (302, {"Location": files.url + "/captions.json"}, b"")})
        queue.answer = _routes({"/fal-ai/moondream3-preview/requests/"
                                "7d3c4a1e-0b7e-4a57-9a36-5d2b1a3c9f10/status":
                                (307, {"Location": files.url + "/status"}, b"")})
        client = FalQueueClient(queue.url, key, timeout=1.0, get_attempts=1,
                                max_file_bytes=1_000_000)

        # captions_file behind a redirect to another host: read, and no key on either hop.
        got = archive_answers({"captions_file": {"url": hop.url + "/c.json?sig=s"}},
                              ["000000.png"], client.download)
        assert got == {"000000.png": "a cat"}
        assert files.log and not files.carrying(key) and not hop.carrying(key)
        assert not any("authorization" in {k.lower() for k in h} for _, _, h in files.log)

        # Too big (announced, or only counted while streaming), too slow, or an error: an
        # error naming the status and its standard reason, never the body.
        for path, kind, says in (("/big.json", FalRequestError, "larger than"),
                                 ("/unsized.json", FalRequestError, "larger than"),
                                 ("/broken.json", FalTransient, "Internal Server Error")):
            with pytest.raises(kind) as info:
                client.download(files.url + path)
            assert says in str(info.value) and "MARKER" not in str(info.value), str(info.value)
        started = time.monotonic()
        with pytest.raises(FalTransient) as info:
            client.download(slow.url + "/drip.json")
        took = time.monotonic() - started
        print(f"slow download stopped after {took:.1f}s: {info.value}")
        assert "not done within" in str(info.value) and took < 5

        # Queue calls: URLs built on the configured origin; a redirect is not followed.
        urls = client.urls("fal-ai/moondream-next/batch", "7d3c4a1e-0b7e-4a57-9a36-5d2b1a3c9f10")
        root = f"{queue.url}/fal-ai/moondream-next/requests/7d3c4a1e-0b7e-4a57-9a36-5d2b1a3c9f10"
        assert (urls.status, urls.result, urls.cancel) == (root + "/status", root, root + "/cancel")
        with pytest.raises(FalRequestError) as info:
            client.status("fal-ai/moondream3-preview/caption", "7d3c4a1e-0b7e-4a57-9a36-5d2b1a3c9f10")
        assert info.value.status == 307 and not any(p == "/status" for _, p, _ in files.log)
        seen = len(queue.log)
        for forged in ("../../x", "a/b", "x?y", "x#y", "%2e", " x", files.url, "..", None, 7):
            with pytest.raises(FalBadRequestId):
                client.cancel("fal-ai/moondream3-preview/caption", forged)
        assert len(queue.log) == seen
        with pytest.raises(FalForeignOrigin):  # the last check before a keyed call leaves
            client._send("status", "GET", files.url + "/elsewhere")
        assert "/elsewhere" not in [p for _, p, _ in files.log]
        client.close()


def test_fal_raw_outputs_keep_no_echoed_input():
    from moonbatch.workers.providers.fal.endpoints import ENDPOINTS
    from moonbatch.workers.providers.fal.payloads import normalize_single, scrub_echoes

    presigned = "https://bucket.s3.amazonaws.com/a.jpg?X-Amz-Signature=abc&X-Amz-Credential=k"
    output = {
        "objects": [{"x_min": 0.1, "y_min": 0.1, "x_max": 0.5, "y_max": 0.5}],
        "image_url": presigned, "finish_reason": "stop",
        "image": {"url": "data:image/png;base64,iVBORw0KGgo=", "content_type": "image/png"},
        "preview": {"url": "https://v3.fal.media/files/cat/preview.png", "file_name": "p.png"},
        "request": {"inputs": [{"image_url": presigned}], "sources": [presigned, "plain"]},
        "debug": "https://user:secret@internal.example/x",
        "usage_info": {"input_tokens": 3, "output_tokens": 4},
    }
    result, usage = normalize_single(ENDPOINTS["fal-ai/moondream3-preview/detect"], "detect",
                                     output)
    assert result["objects"] == output["objects"] and usage == {"input_tokens": 3,
                                                                "output_tokens": 4}
    raw = result["raw"]
    assert raw == {"objects": output["objects"], "finish_reason": "stop",
                   "image": {"content_type": "image/png"},
                   "preview": {"url": "https://v3.fal.media/files/cat/preview.png",
                               "file_name": "p.png"},
                   "request": {"sources": [None, "plain"]}}
    text = json.dumps(raw)
    assert "Signature" not in text and "base64" not in text and "secret" not in text
    assert scrub_echoes("a caption, not a URL") == "a caption, not a URL"
    assert output["image_url"] == presigned  # the answer itself is left as it was
