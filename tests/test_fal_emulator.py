"""The fal queue API emulation (``emulator.fal``; FACTS.md "fal queue API", seeds 000, 001, 003,
004) over real HTTP: raw httpx for the protocol and its faults, the official ``fal-client`` to
prove the emulator speaks fal's protocol.

Protocol tests swap the emulation's clock for a manual one, so every state (queued, running,
completed, expired) is reached by advancing time, not by sleeping: nothing depends on how fast
the machine is. The fal-client tests run on the real clock with short processing times and wait
for completion without deadlines tighter than the test timeout. Images are scikit-image
photographs, sent as ``data:`` URIs or as presigned URLs of moto's S3. Nothing is mocked.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import random
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator

import httpx
import pytest

from moonbatch.emulator.fal import (
    FAL_FAULT_KINDS,
    RUNNER_ERROR_TYPES,
    FalConfig,
    FalFaults,
    expected_output,
    source_name,
    without_urls,
)
from moonbatch.emulator.server import EmulatorConfig, EmulatorServer
from tests.conftest import jpeg_bytes, photos_dir, stop_later

FAL_KEY = "fal-test-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Key {FAL_KEY}"}
DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.ConnectError)

CAPTION = "fal-ai/moondream3-preview/caption"
QUERY = "fal-ai/moondream3-preview/query"
DETECT = "fal-ai/moondream3-preview/detect"
POINT = "fal-ai/moondream3-preview/point"
VISUAL_QUERY = "fal-ai/moondream2/visual-query"
BATCHED = "fal-ai/moondream/batched"
NEXT_BATCH = "fal-ai/moondream-next/batch"
ENDPOINTS = (CAPTION, QUERY, DETECT, POINT, VISUAL_QUERY, BATCHED, NEXT_BATCH)
PHOTOS = ("coffee.png", "rocket.jpg", "chelsea.png")
MIME = {"png": "image/png", "jpg": "image/jpeg", "zip": "application/zip"}
T0 = 1_000_000.0


# -- fixtures and helpers ----------------------------------------------------------------------
class ManualClock:
    """The emulation's time source, moved only by ``advance``."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def start(_stopping: list[threading.Thread]) -> Iterator[Callable[..., EmulatorServer]]:
    """``start(clock=True, **fal_config)`` → a running emulator; with ``clock`` its fal
    emulation runs on a ``ManualClock`` (``server.clock``)."""
    started: list[EmulatorServer] = []

    def _start(clock: bool = True, **fal: object) -> EmulatorServer:
        values: dict[str, object] = {"concurrency": 1, "processing_seconds": 1.0, **fal}
        srv = EmulatorServer(EmulatorConfig(fal_key=FAL_KEY, fal=FalConfig(**values)))  # type: ignore[arg-type]
        if clock:
            srv.clock = srv.emulator.fal.clock = ManualClock()  # type: ignore[attr-defined]
        started.append(srv.start())
        return srv

    yield _start
    for srv in started:
        stop_later(srv, _stopping)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30, headers=AUTH) as c:
        yield c


def photo(name: str) -> bytes:
    return (photos_dir() / name).read_bytes()


def data_uri(name: str, blob: bytes) -> str:
    return f"data:{MIME[name.rsplit('.', 1)[-1]]};base64,{base64.b64encode(blob).decode()}"


def zip_of(members: list[tuple[str, bytes]], junk: bool = True) -> bytes:
    """A ZIP of ``members``; with ``junk`` also a directory, a hidden file and a ``__MACOSX``
    member, which the endpoint skips."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        if junk:
            zf.writestr("imgs/", b"")
            zf.writestr("__MACOSX/imgs/._coffee.png", b"junk")
            zf.writestr("imgs/.DS_Store", b"junk")
        for name, blob in members:
            zf.writestr(name, blob)
    return buf.getvalue()


UrlOf = Callable[[str, bytes], str]


def build(endpoint: str, url_of: UrlOf) -> tuple[dict, list]:
    """``(arguments, images for expected_output)`` of a typical call of ``endpoint``."""
    blobs = {n: photo(n) for n in PHOTOS}
    if endpoint == NEXT_BATCH:
        members = [(f"imgs/{n}", b) for n, b in blobs.items()]
        # max_tokens below the answers' length: the captions come back cut to 8 words.
        return ({"images_data_url": url_of("batch.zip", zip_of(members)),
                 "prompt": "Describe this image in detail, with its colours and objects.",
                 "max_tokens": 8}, members)
    if endpoint == BATCHED:
        urls = [url_of(n, b) for n, b in blobs.items()]
        return ({"inputs": [{"image_url": u, "prompt": f"What is in picture {i}?"}
                            for i, u in enumerate(urls[:-1])] + [{"image_url": urls[-1]}],
                 "max_tokens": 32, "temperature": 0.5},
                [(source_name(u, i), b) for i, (u, b) in enumerate(zip(urls, blobs.values(), strict=True))])
    url = url_of(PHOTOS[0], blobs[PHOTOS[0]])
    args = {CAPTION: {"image_url": url, "length": "long"},
            QUERY: {"image_url": url, "prompt": "What is on the table?"},
            DETECT: {"image_url": url, "prompt": "cup", "preview": True},
            POINT: {"image_url": url, "prompt": "cup"},
            VISUAL_QUERY: {"image_url": url, "prompt": "What colour is the cup?"}}[endpoint]
    return args, [blobs[PHOTOS[0]]]


def by_data_uri(name: str, blob: bytes) -> str:
    return data_uri(name, blob)


@pytest.fixture
def by_s3(s3, bucket: str) -> UrlOf:
    """Put the object in moto's S3 and hand out a presigned GET URL."""
    def url_of(name: str, blob: bytes) -> str:
        key = f"in/{uuid.uuid4().hex[:6]}/{name}"
        s3.put_object(Bucket=bucket, Key=key, Body=blob)
        return s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                         ExpiresIn=3600)
    return url_of


def units(endpoint: str) -> int:
    return len(PHOTOS) if endpoint in (BATCHED, NEXT_BATCH) else 1


def check_files(http: httpx.Client, endpoint: str, result: dict, images: list) -> None:
    """The Files in a result are served where their ``url`` says, with the announced size."""
    if endpoint == NEXT_BATCH:
        f = result["captions_file"]
        body = httpx.get(f["url"], timeout=30)
        assert body.status_code == 200 and len(body.content) == f["file_size"]
        assert f["content_type"] == "application/json"
        assert body.json() == dict(zip([n for n, _ in images], result["outputs"], strict=True))
    if endpoint == DETECT:
        f = result["image"]
        body = httpx.get(f["url"], timeout=30)
        assert body.status_code == 200 and body.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(body.content) == f["file_size"]


def submit(http: httpx.Client, server: EmulatorServer, endpoint: str, args: dict) -> dict:
    r = http.post(f"{server.fal_url}/{endpoint}", json=args)
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-fal-request-id"] == body["request_id"]
    return body


def status(http: httpx.Client, sub: dict, logs: bool = False) -> httpx.Response:
    r = http.get(sub["status_url"], params={"logs": 1} if logs else None)
    assert r.headers["x-fal-request-id"] == sub["request_id"]
    return r


def tiny() -> str:
    return data_uri("x.jpg", jpeg_bytes())


# -- protocol, per endpoint --------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_lifecycle_and_result(start, http: httpx.Client, endpoint: str) -> None:
    """Submit behind a running request (concurrency 1): IN_QUEUE at position 0, IN_PROGRESS with
    logs once the slot frees, COMPLETED after ``processing_seconds`` per image; the result is what
    ``expected_output`` computes from the image bytes."""
    server = start()
    clock = server.clock  # type: ignore[attr-defined]
    blocker = submit(http, server, VISUAL_QUERY, {"image_url": tiny(), "prompt": "hi"})
    args, images = build(endpoint, by_data_uri)
    sub = submit(http, server, endpoint, args)
    assert sub["status"] == "IN_QUEUE" and sub["queue_position"] == 0
    app = "/".join(endpoint.split("/")[:2])  # the URLs drop the endpoint's sub-path
    root = f"{server.fal_url}/{app}/requests/{sub['request_id']}"
    assert (sub["response_url"], sub["status_url"], sub["cancel_url"]) == (
        root, root + "/status", root + "/cancel")

    r = status(http, sub, logs=True)
    assert r.status_code == 202 and r.json()["status"] == "IN_QUEUE"
    assert r.json()["queue_position"] == 0
    assert status(http, blocker).json()["status"] == "IN_PROGRESS"
    early = http.get(sub["response_url"])
    assert early.status_code == 400 and "progress" in early.json()["detail"]

    clock.advance(1.0)  # the blocker ends; the request starts
    assert status(http, blocker).json()["status"] == "COMPLETED"
    r = status(http, sub, logs=True)
    assert r.status_code == 202 and r.json()["status"] == "IN_PROGRESS"
    assert r.json()["logs"][0]["message"].startswith(f"Running {endpoint}")
    assert status(http, sub).json()["logs"] is None  # logs only when asked for

    n = units(endpoint)
    clock.advance(n * 0.5 + 0.01)
    r = status(http, sub, logs=True)
    assert r.json()["status"] == "IN_PROGRESS"
    assert sum("Processed image" in log["message"] for log in r.json()["logs"]) == n // 2

    clock.advance(n * 0.5)
    r = status(http, sub, logs=True)
    assert r.status_code == 200
    done = r.json()
    assert done["status"] == "COMPLETED" and "error" not in done
    assert done["metrics"]["inference_time"] == pytest.approx(n * 1.0)
    assert [log["message"] for log in done["logs"]][-1] == "Done"
    result = http.get(sub["response_url"])
    assert result.status_code == 200 and result.headers["x-fal-request-id"] == sub["request_id"]
    assert without_urls(result.json()) == expected_output(endpoint, args, images)
    check_files(http, endpoint, result.json(), images)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_images_from_presigned_s3_urls(start, http: httpx.Client, by_s3: UrlOf,
                                       endpoint: str) -> None:
    """The emulator fetches http(s) inputs (moto's S3, presigned); the answers come from the
    fetched pixels, and batched filenames from the URLs' paths."""
    server = start()
    args, images = build(endpoint, by_s3)
    sub = submit(http, server, endpoint, args)
    server.clock.advance(units(endpoint) * 1.0)  # type: ignore[attr-defined]
    assert status(http, sub).json()["status"] == "COMPLETED"
    result = http.get(sub["response_url"]).json()
    assert without_urls(result) == expected_output(endpoint, args, images)
    if endpoint == BATCHED:
        assert result["filenames"] == list(PHOTOS)
    check_files(http, endpoint, result, images)


def test_expected_outputs_tell_images_apart() -> None:
    """Different photographs give different answers (so a result names its image)."""
    outs = {json.dumps(expected_output(QUERY, {"image_url": "x", "prompt": "what?"}, [photo(n)]))
            for n in PHOTOS}
    assert len(outs) == len(PHOTOS)
    usage = expected_output(CAPTION, {"image_url": "x"}, [photo(PHOTOS[0])])["usage_info"]
    assert set(usage) == {"input_tokens", "output_tokens", "prefill_time_ms", "decode_time_ms",
                          "ttft_ms"}
    assert usage["input_tokens"] == 729 * (1 + 2 * 2)  # 600x400: 2x2 crops + the global view
    no_reasoning = expected_output(QUERY, {"image_url": "x", "prompt": "what?", "reasoning": False},
                                   [photo(PHOTOS[0])])
    assert "reasoning" not in no_reasoning


# -- scheduling --------------------------------------------------------------------------------
def test_queue_positions_under_the_concurrency_limit(start, http: httpx.Client) -> None:
    """Concurrency 2: two run, the others wait with positions 0, 1, 2 that go down as slots
    free; a queued request starts when a slot frees even though nobody polls it."""
    server = start(concurrency=2)
    clock = server.clock  # type: ignore[attr-defined]
    subs = [submit(http, server, VISUAL_QUERY, {"image_url": tiny(), "prompt": f"q{i}"})
            for i in range(5)]
    assert [s["queue_position"] for s in subs] == [0, 0, 0, 1, 2]

    def states() -> list[tuple[str, int | None]]:
        out = []
        for s in subs:
            body = status(http, s).json()
            out.append((body["status"], body.get("queue_position")))
        return out

    assert states() == [("IN_PROGRESS", None)] * 2 + [("IN_QUEUE", 0), ("IN_QUEUE", 1),
                                                      ("IN_QUEUE", 2)]
    clock.advance(1.0)
    assert states() == [("COMPLETED", None)] * 2 + [("IN_PROGRESS", None)] * 2 + [("IN_QUEUE", 0)]
    clock.advance(5.0)  # nobody polls while the last one runs and ends
    last = status(http, subs[-1], logs=True).json()
    assert last["status"] == "COMPLETED"
    # It started when the third and fourth ended (T0 + 2), not when it was polled.
    assert last["logs"][0]["timestamp"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                 time.gmtime(T0 + 2)))


def test_cancel_in_each_state(start, http: httpx.Client) -> None:
    """Cancel: queued or running → 202 CANCELLATION_REQUESTED and the request completes with an
    error at once (a running one frees its slot); done → 400 ALREADY_COMPLETED; unknown → 404."""
    server = start()
    clock = server.clock  # type: ignore[attr-defined]
    running = submit(http, server, QUERY, {"image_url": tiny(), "prompt": "a"})
    queued = submit(http, server, QUERY, {"image_url": tiny(), "prompt": "b"})
    third = submit(http, server, QUERY, {"image_url": tiny(), "prompt": "c"})
    assert status(http, third).json()["queue_position"] == 1

    r = http.put(queued["cancel_url"])
    assert (r.status_code, r.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    done = status(http, queued).json()
    assert done["status"] == "COMPLETED" and done["error_type"] == "client_cancelled"
    res = http.get(queued["response_url"])
    assert res.status_code == 400 and res.json()["error_type"] == "client_cancelled"
    assert status(http, third).json()["queue_position"] == 0

    clock.advance(0.5)
    assert status(http, running).json()["status"] == "IN_PROGRESS"
    r = http.put(running["cancel_url"])
    assert (r.status_code, r.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert status(http, running).json()["status"] == "COMPLETED"
    assert http.get(running["response_url"]).status_code == 400
    assert status(http, third).json()["status"] == "IN_PROGRESS"  # the freed slot

    clock.advance(1.0)
    for sub in (third, running):
        r = http.put(sub["cancel_url"])
        assert (r.status_code, r.json()) == (400, {"status": "ALREADY_COMPLETED"})
    assert http.get(third["response_url"]).status_code == 200
    unknown = third["cancel_url"].replace(third["request_id"], str(uuid.uuid4()))
    r = http.put(unknown)
    assert (r.status_code, r.json()) == (404, {"status": "NOT_FOUND"})


def test_unauthorised(start) -> None:
    """No key, a wrong key or another scheme → 401 on every queue call; nothing is created."""
    server = start()
    with httpx.Client(timeout=30, headers=AUTH) as good:
        sub = submit(good, server, CAPTION, {"image_url": tiny()})
    for headers in ({}, {"Authorization": "Key wrong"}, {"Authorization": f"Bearer {FAL_KEY}"},
                    {"Authorization": FAL_KEY}):
        with httpx.Client(timeout=30, headers=headers) as bad:
            calls = [bad.post(f"{server.fal_url}/{CAPTION}", json={"image_url": tiny()}),
                     bad.get(sub["status_url"]), bad.get(sub["response_url"]),
                     bad.put(sub["cancel_url"])]
        assert [c.status_code for c in calls] == [401] * 4
        assert all("detail" in c.json() for c in calls)
    assert len(server.emulator.fal.requests) == 1
    assert server.emulator.fal.calls["unauthorised"] == 16


def test_unknown_endpoint_and_batch_api_untouched(start, http: httpx.Client) -> None:
    server = start()
    assert http.post(f"{server.fal_url}/fal-ai/moondream9/none", json={}).status_code == 404
    # The Batch API keeps its own auth on the same port.
    assert httpx.get(server.url + "/batch").status_code == 401
    assert httpx.get(server.url + "/batch", headers={
        "X-Moondream-Auth": server.config.api_key}).status_code == 200


# -- validation (422 at run time) -----------------------------------------------------------------
def _archive(n: int) -> str:
    return data_uri("a.zip", zip_of([(f"{i}.jpg", jpeg_bytes()) for i in range(n)], junk=False))


INVALID = [
    (QUERY, {"image_url": "IMG"}, ["body", "prompt"], "missing"),
    (QUERY, {"image_url": "IMG", "prompt": "x", "reasoning": "yes"}, ["body", "reasoning"], "bool_type"),
    (CAPTION, {"image_url": "IMG", "length": "huge"}, ["body", "length"], "enum"),
    (CAPTION, {"image_url": "IMG", "temperature": 1.5}, ["body", "temperature"], "less_than_equal"),
    (CAPTION, {"image_url": "IMG", "top_p": -0.1}, ["body", "top_p"], "greater_than_equal"),
    (CAPTION, {}, ["body", "image_url"], "missing"),
    (DETECT, {"image_url": "IMG", "prompt": ""}, ["body", "prompt"], "string_too_short"),
    (POINT, {"image_url": "IMG", "prompt": "x", "preview": 1}, ["body", "preview"], "bool_type"),
    (VISUAL_QUERY, {"image_url": 7, "prompt": "x"}, ["body", "image_url"], "string_type"),
    (BATCHED, {"inputs": []}, ["body", "inputs"], "too_short"),
    (BATCHED, {"inputs": [{"prompt": "x"}]}, ["body", "inputs", 0, "image_url"], "missing"),
    (BATCHED, {"inputs": [{"image_url": "IMG"}], "max_tokens": 16}, ["body", "max_tokens"],
     "greater_than_equal"),
    (BATCHED, {"inputs": [{"image_url": "IMG"}], "max_tokens": 64.5}, ["body", "max_tokens"],
     "int_type"),
    (BATCHED, {"inputs": [{"image_url": "IMG"}], "repetition_penalty": 2.5},
     ["body", "repetition_penalty"], "less_than_equal"),
    (BATCHED, {"inputs": [{"image_url": "IMG"}], "model_id": "gpt"}, ["body", "model_id"], "enum"),
    (NEXT_BATCH, {"images_data_url": "ZIP", "prompt": "x", "max_tokens": 600}, ["body", "max_tokens"],
     "less_than_equal"),
    (NEXT_BATCH, {"images_data_url": "ZIP33", "prompt": "x"}, ["body", "images_data_url"],
     "archive_file_count_exceeds_maximum"),
    (NEXT_BATCH, {"images_data_url": "IMG", "prompt": "x"}, ["body", "images_data_url"],
     "invalid_archive"),
    (CAPTION, {"image_url": "data:text/plain;base64,aGVsbG8="}, ["body", "image_url"],
     "image_load_error"),
    (CAPTION, {"image_url": "ftp://example.invalid/x.png"}, ["body", "image_url"],
     "file_download_error"),
    (BATCHED, {"inputs": [{"image_url": "IMG"}, {"image_url": "MISSING"}]},
     ["body", "inputs", 1, "image_url"], "file_download_error"),
]


@pytest.mark.parametrize(("endpoint", "args", "loc", "type_"), INVALID,
                         ids=[f"{e.rsplit('/', 1)[-1]}-{t}-{i}" for i, (e, _, _, t) in enumerate(INVALID)])
def test_validation_error_names_the_field(start, http: httpx.Client, endpoint: str, args: dict,
                                          loc: list, type_: str) -> None:
    """fal validates a queue request when it runs: the submit is accepted, the request
    completes with an error naming the field, and its result is a 422 ``detail`` list."""
    server = start()
    fill = {"IMG": tiny(), "ZIP": _archive(2), "ZIP33": _archive(33),
            "MISSING": server.fal_url + "/fal-ai/_files/nope/x.png"}

    def resolve(value):
        if isinstance(value, str):
            return fill.get(value, value)
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    sub = submit(http, server, endpoint, resolve(args))
    done = status(http, sub).json()
    assert done["status"] == "COMPLETED" and done["error_type"] == type_
    assert ".".join(str(x) for x in loc[1:]) in done["error"]
    r = http.get(sub["response_url"])
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail[0]["loc"] == loc and detail[0]["type"] == type_ and detail[0]["msg"]


def test_non_json_body_is_a_validation_error(start, http: httpx.Client) -> None:
    server = start()
    r = http.post(f"{server.fal_url}/{CAPTION}", content=b"not json",
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    res = http.get(r.json()["response_url"])
    assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body"]


# -- retention ---------------------------------------------------------------------------------
def test_results_expire(start, http: httpx.Client) -> None:
    """A result is kept an hour, one of 10 KB or more six minutes; then status, result and
    cancel answer 404."""
    server = start(concurrency=4)
    clock = server.clock  # type: ignore[attr-defined]
    small = submit(http, server, VISUAL_QUERY, {"image_url": tiny(), "prompt": "hi"})
    many = [{"image_url": tiny(), "prompt": "p" * 200} for _ in range(60)]
    large = submit(http, server, BATCHED, {"inputs": many})
    clock.advance(60.0)  # both done (the large one ran 60 images)
    big = http.get(large["response_url"])
    assert big.status_code == 200 and len(big.content) >= 10 * 1024
    clock.advance(360.0)
    assert status(http, large).status_code == 404
    assert http.get(large["response_url"]).status_code == 404
    assert http.put(large["cancel_url"]).json() == {"status": "NOT_FOUND"}
    assert status(http, small).status_code == 200
    clock.advance(3600.0 - 360.0)
    assert status(http, small).status_code == 404
    assert http.get(small["response_url"]).status_code == 404


# -- faults --------------------------------------------------------------------------------------
def set_faults(server: EmulatorServer, **faults: object) -> None:
    server.config.fal = dataclasses.replace(server.config.fal, faults=FalFaults(**faults))  # type: ignore[arg-type]


def test_fault_429_on_submit(start, http: httpx.Client) -> None:
    server = start()
    set_faults(server, rate_429=1.0)
    r = http.post(f"{server.fal_url}/{CAPTION}", json={"image_url": tiny()})
    assert r.status_code == 429 and "detail" in r.json()
    assert server.emulator.fal.injected["429"] == 1 and not server.emulator.fal.requests


def test_fault_429_queue_limit(start, http: httpx.Client) -> None:
    """``queue_limit``: a submit is refused while the key has that many unfinished requests."""
    server = start()
    set_faults(server, queue_limit=2)
    for _ in range(2):
        submit(http, server, CAPTION, {"image_url": tiny()})
    assert http.post(f"{server.fal_url}/{CAPTION}", json={"image_url": tiny()}).status_code == 429
    server.clock.advance(1.0)  # type: ignore[attr-defined]  # one done, one running
    submit(http, server, CAPTION, {"image_url": tiny()})
    assert server.emulator.fal.injected["429"] == 1


def test_fault_503_on_every_call(start, http: httpx.Client) -> None:
    server = start()
    sub = submit(http, server, CAPTION, {"image_url": tiny()})
    set_faults(server, rate_503=1.0)
    calls = [http.post(f"{server.fal_url}/{CAPTION}", json={"image_url": tiny()}),
             http.get(sub["status_url"]), http.get(sub["response_url"]), http.put(sub["cancel_url"])]
    for r in calls:
        assert r.status_code == 503
        assert r.json()["error_type"] in RUNNER_ERROR_TYPES
        assert r.headers["X-Fal-Error-Type"] == r.json()["error_type"]
        assert r.headers["x-fal-request-id"]
    assert server.emulator.fal.injected["503"] == 4
    assert len(server.emulator.fal.requests) == 1  # the refused submit created nothing
    set_faults(server)
    assert status(http, sub).json()["status"] == "IN_PROGRESS"  # the refused cancel did nothing


def test_fault_dropped_connections(start, http: httpx.Client) -> None:
    server = start()
    sub = submit(http, server, CAPTION, {"image_url": tiny()})
    set_faults(server, rate_drop=1.0)
    with pytest.raises(DROPPED):
        http.post(f"{server.fal_url}/{CAPTION}", json={"image_url": tiny()})
    with pytest.raises(DROPPED):
        http.get(sub["status_url"])
    assert server.emulator.fal.injected["drop"] == 2
    assert len(server.emulator.fal.requests) == 1


def test_fault_lost_submit_answer(start, http: httpx.Client) -> None:
    """The request is created, but the client never learns its id."""
    server = start()
    set_faults(server, lose_submit_answers=1.0)
    with pytest.raises(DROPPED):
        http.post(f"{server.fal_url}/{CAPTION}", json={"image_url": tiny()})
    assert server.emulator.fal.injected["lost_submit"] == 1
    assert len(server.emulator.fal.requests) == 1


def test_fault_latency(start, http: httpx.Client) -> None:
    """Each call waits ``uniform(0, latency)`` from the seeded RNG: at least the first draw."""
    server = start()
    set_faults(server, latency=0.4, seed=3)
    first = random.Random(3).uniform(0, 0.4)
    t = time.monotonic()
    submit(http, server, CAPTION, {"image_url": tiny()})
    assert time.monotonic() - t >= first


@pytest.mark.parametrize(("error_type", "code"), [("request_timeout", 504),
                                                  ("internal_server_error", 500),
                                                  ("runner_disconnected", 503)])
def test_fault_completed_with_error(start, http: httpx.Client, error_type: str, code: int) -> None:
    server = start()
    set_faults(server, rate_error=1.0, error_types=(error_type,))
    sub = submit(http, server, QUERY, {"image_url": tiny(), "prompt": "x"})
    server.clock.advance(1.0)  # type: ignore[attr-defined]
    done = status(http, sub, logs=True).json()
    assert done["status"] == "COMPLETED" and done["error_type"] == error_type and done["error"]
    assert done["logs"][-1]["level"] == "ERROR"
    r = http.get(sub["response_url"])
    assert r.status_code == code and r.json()["error_type"] == error_type
    assert r.headers["X-Fal-Error-Type"] == error_type
    assert server.emulator.fal.injected["error"] == 1


def test_fault_forced_result_expiry(start, http: httpx.Client) -> None:
    server = start()
    set_faults(server, result_ttl=5.0)
    sub = submit(http, server, CAPTION, {"image_url": tiny()})
    server.clock.advance(1.0)  # type: ignore[attr-defined]
    assert http.get(sub["response_url"]).status_code == 200
    server.clock.advance(5.0)  # type: ignore[attr-defined]
    assert status(http, sub).status_code == 404
    assert http.get(sub["response_url"]).status_code == 404
    assert server.emulator.fal.injected["expired"] == 1


def test_queue_headers_recorded_and_honoured(start, http: httpx.Client) -> None:
    """moonbatch's fal client sends the run's queue headers (``queue_headers``) and the
    emulation keeps them per request; ``X-Fal-Queue-Priority: low`` lets a later normal request
    go first, and ``X-Fal-Request-Timeout`` ends a request that waited longer with 504
    ``request_timeout`` without running it. Concurrency 1, 1 s per image, a manual clock."""
    from moonbatch.workers.providers.fal.client import FalQueueClient, queue_headers

    server = start()
    clock = server.clock  # type: ignore[attr-defined]
    client = FalQueueClient(server.fal_url, FAL_KEY)
    try:
        def send(**options: object) -> dict:
            sub = client.submit(VISUAL_QUERY, {"image_url": tiny(), "prompt": "q"},
                                queue_headers(options))
            urls = client.urls(VISUAL_QUERY, sub.request_id)
            return {"request_id": sub.request_id, "status_url": urls.status,
                    "response_url": urls.result}

        running = send()  # takes the only slot until T0 + 1
        low = send(priority="low", store_io=True)
        clock.advance(0.1)
        normal = send(priority="normal", request_timeout=30)
        late = send(request_timeout=0.5)  # the slot frees at T0 + 1: too late for it
    finally:
        client.close()
    got = {rid: r.headers for rid, r in server.emulator.fal.requests.items()}
    assert got[running["request_id"]] == {"x-fal-store-io": "0"}  # the default: not kept
    assert got[low["request_id"]] == {"x-fal-store-io": "1", "x-fal-queue-priority": "low"}
    assert got[normal["request_id"]] == {"x-fal-store-io": "0", "x-fal-queue-priority": "normal",
                                         "x-fal-request-timeout": "30"}
    assert got[late["request_id"]]["x-fal-request-timeout"] == "0.5"
    clock.advance(1.0)  # T0 + 1.1: the slot freed at T0 + 1
    assert status(http, running).json()["status"] == "COMPLETED"
    assert status(http, normal).json()["status"] == "IN_PROGRESS"  # ahead of the low one
    assert status(http, low).json()["status"] == "IN_QUEUE"
    timed_out = status(http, late, logs=True).json()
    assert timed_out["status"] == "COMPLETED" and timed_out["error_type"] == "request_timeout"
    assert timed_out["logs"] == []  # it never ran
    r = http.get(late["response_url"])
    assert r.status_code == 504 and r.json()["error_type"] == "request_timeout"
    clock.advance(1.0)
    assert status(http, low).json()["status"] == "IN_PROGRESS"


def test_fault_values_are_checked() -> None:
    for bad in ({"rate_503": 1.5}, {"rate_503": 0.6, "rate_drop": 0.6}, {"latency": -1},
                {"error_types": ("nope",)}, {"result_ttl": -1}):
        with pytest.raises(ValueError):
            FalFaults(**bad)  # type: ignore[arg-type]
    assert set(FAL_FAULT_KINDS) >= {"429", "503", "drop", "error", "expired"}


# -- the official client ---------------------------------------------------------------------------
fal_client = pytest.importorskip("fal_client")


@pytest.fixture
def fal(start) -> Iterator[tuple[EmulatorServer, object]]:
    """A real-clock emulator and a ``fal_client.SyncClient`` aimed at it (through
    ``fal_client.client.QUEUE_URL_FORMAT``, read at call time; FACTS.md)."""
    import fal_client.client as fc

    server = start(clock=False, concurrency=2, processing_seconds=0.05)
    saved = fc.QUEUE_URL_FORMAT
    fc.QUEUE_URL_FORMAT = server.fal_url + "/"
    client = fal_client.SyncClient(key=FAL_KEY, default_timeout=60)
    try:
        yield server, client
    finally:
        fc.QUEUE_URL_FORMAT = saved


@pytest.mark.parametrize("source", ["data", "s3"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_fal_client_subscribe(fal, http: httpx.Client, request, endpoint: str, source: str) -> None:
    server, client = fal
    url_of = by_data_uri if source == "data" else request.getfixturevalue("by_s3")
    args, images = build(endpoint, url_of)
    updates: list = []
    result = client.subscribe(endpoint, arguments=args, with_logs=True,
                              on_queue_update=updates.append, interval=0.05)
    assert without_urls(result) == expected_output(endpoint, args, images)
    check_files(http, endpoint, result, images)
    assert isinstance(updates[-1], fal_client.Completed) and updates[-1].error is None
    assert isinstance(updates[-1].logs, list)
    kinds = [type(u).__name__ for u in updates]
    assert kinds == sorted(kinds, key=["Queued", "InProgress", "Completed"].index)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_fal_client_submit_status_result(fal, endpoint: str) -> None:
    """``submit`` + ``status`` + ``result``, the latter two through the URLs the client builds
    itself from the endpoint id (sub-path dropped) as well as the handle's."""
    server, client = fal
    args, images = build(endpoint, by_data_uri)
    handle = client.submit(endpoint, arguments=args)
    st = client.status(endpoint, handle.request_id, with_logs=True)
    assert isinstance(st, (fal_client.Queued, fal_client.InProgress, fal_client.Completed))
    result = client.result(endpoint, handle.request_id)
    assert without_urls(result) == expected_output(endpoint, args, images)
    assert handle.get() == result
    done = handle.status(with_logs=True)
    assert isinstance(done, fal_client.Completed) and done.metrics["inference_time"] > 0


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_fal_client_cancel(fal, endpoint: str) -> None:
    """Concurrency 1 and long runs: cancel a queued and a running request through the client;
    both complete with an error; cancelling a finished one raises (400 ALREADY_COMPLETED)."""
    server, client = fal
    server.config.fal.concurrency = 1
    server.config.fal.processing_seconds = 600.0
    args, _ = build(endpoint, by_data_uri)
    running = client.submit(endpoint, arguments=args)
    queued = client.submit(endpoint, arguments=args)
    assert client.status(endpoint, queued.request_id) == fal_client.Queued(position=0)
    assert isinstance(running.status(with_logs=True), fal_client.InProgress)
    for handle in (queued, running):
        client.cancel(endpoint, handle.request_id)
        st = handle.status()
        assert isinstance(st, fal_client.Completed) and st.error_type == "client_cancelled"
        with pytest.raises(fal_client.FalClientHTTPError) as exc:
            handle.get()
        assert exc.value.status_code == 400 and exc.value.error_type == "client_cancelled"
        with pytest.raises(fal_client.FalClientHTTPError) as exc:
            handle.cancel()
        assert exc.value.status_code == 400


def test_fal_client_sees_faults(fal) -> None:
    """Through the client: a request completed with an error raises with its ``error_type``; a
    runner 503 on a poll is not retried (it carries ``x-fal-request-id``); 429s and dropped
    connections are retried until the call goes through."""
    server, client = fal
    args, images = build(QUERY, by_data_uri)
    set_faults(server, rate_error=1.0, error_types=("request_timeout",))
    with pytest.raises(fal_client.FalClientHTTPError) as exc:
        client.subscribe(QUERY, arguments=args, interval=0.05)
    assert exc.value.status_code == 504 and exc.value.error_type == "request_timeout"

    set_faults(server)
    handle = client.submit(QUERY, arguments=args)
    set_faults(server, rate_503=1.0)
    with pytest.raises(fal_client.FalClientHTTPError) as exc:
        handle.status()
    assert exc.value.status_code == 503 and exc.value.error_type in RUNNER_ERROR_TYPES

    def first_submit_refused(seed: int) -> bool:  # one draw for 503/drop, then one for 429
        rng = random.Random(seed)
        return rng.random() >= 0.2 and rng.random() < 0.5

    seed = next(s for s in range(100) if first_submit_refused(s))
    set_faults(server, rate_429=0.5, rate_drop=0.2, seed=seed)
    result = client.subscribe(QUERY, arguments=args, interval=0.05)
    assert without_urls(result) == expected_output(QUERY, args, images)
    assert server.emulator.fal.injected["429"] >= 1
