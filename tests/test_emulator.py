"""The Moondream Batch API emulator (seed 002, FACTS.md "Moondream Batch API") over real HTTP.

Every test starts its own ``EmulatorServer`` with a fast configuration and talks to it through
``moonbatch.workers.providers.moondream.client.BatchClient`` or, where the client hides the wire,
raw httpx. Nothing is mocked.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from moonbatch.emulator.inference import infer
from moonbatch.emulator.server import EmulatorConfig, EmulatorServer
from moonbatch.workers.models import SkillOptions
from moonbatch.workers.providers.moondream.answers import BatchStatus, OutputFile, Part
from moonbatch.workers.providers.moondream.client import BatchClient
from moonbatch.workers.providers.moondream.errors import AuthenticationError, RequestRejected
from moonbatch.workers.providers.moondream.lines import encode_line
from tests.conftest import jpeg_bytes, photos_dir, stop_later

API_KEY = "test-key-" + uuid.uuid4().hex
ERROR_KEYS = {"message", "type", "param", "code"}


# -- fixtures and helpers ----------------------------------------------------------------------
def fast_config(**overrides: object) -> EmulatorConfig:
    values: dict[str, object] = dict(api_key=API_KEY, chunking_seconds=0.05, processing_seconds=0.05,
                                     min_part_size=0)
    values.update(overrides)
    return EmulatorConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def server(_stopping: list[threading.Thread]) -> Iterator[EmulatorServer]:
    srv = EmulatorServer(fast_config()).start()
    yield srv
    stop_later(srv, _stopping)


@pytest.fixture
def client(server: EmulatorServer) -> Iterator[BatchClient]:
    c = BatchClient(server.url, API_KEY, timeout=10, max_attempts=2, backoff_initial=0.01,
                    backoff_max=0.05)
    yield c
    c.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A raw HTTP client with no default headers."""
    with httpx.Client(timeout=10) as c:
        yield c


AUTH = {"X-Moondream-Auth": API_KEY}


@functools.cache
def photo(name: str) -> bytes:
    return (photos_dir() / name).read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jsonl(*objs: dict) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def tiny_lines(n: int) -> bytes:
    """``n`` valid caption lines on small distinct JPEGs, ids ``line-<i>``."""
    frag = SkillOptions(skill="caption", length="short").line_fragment()
    return b"".join(encode_line(f"line-{i}", jpeg_bytes(size=(16 + i, 16), color=(10 * i, 40, 90)),
                                frag) for i in range(n))


def upload(client: BatchClient, data: bytes, part_size: int | None = None
           ) -> tuple[str, str, list[Part]]:
    """mpu-create and upload ``data`` in fixed-size parts (one part if ``part_size`` is None)."""
    up = client.create_upload()
    size = part_size or max(1, len(data))
    chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
    parts = [client.upload_part(up.file_id, up.upload_id, n, chunk)
             for n, chunk in enumerate(chunks, start=1)]
    return up.file_id, up.upload_id, parts


def submit(client: BatchClient, data: bytes, part_size: int | None = None,
           model: str | None = None) -> BatchStatus:
    file_id, upload_id, parts = upload(client, data, part_size)
    return client.complete_upload(file_id, upload_id, parts, model=model)


def wait_final(client: BatchClient, batch_id: str, timeout: float = 10.0
               ) -> tuple[BatchStatus, list[BatchStatus]]:
    """Poll every 10 ms until the batch is completed or failed → (final, every status seen)."""
    seen: list[BatchStatus] = []
    deadline = time.monotonic() + timeout
    while True:
        st = client.get_batch(batch_id)
        seen.append(st)
        if st.done:
            return st, seen
        if time.monotonic() > deadline:
            pytest.fail(f"batch {batch_id} still {st.status} after {timeout}s")
        time.sleep(0.01)


def run_batch(client: BatchClient, data: bytes, **kw: object) -> BatchStatus:
    created = submit(client, data, **kw)  # type: ignore[arg-type]
    return wait_final(client, created.id)[0]


def parse_rows(body: bytes) -> list[dict]:
    assert body.endswith(b"\n")
    return [json.loads(line) for line in body.splitlines()]


def download_rows(client: BatchClient, status: BatchStatus) -> list[dict]:
    rows: list[dict] = []
    for out in status.outputs:
        rows += parse_rows(client.download(out))
    return rows


def object_with_boxes(image: bytes, skill: str) -> str:
    """An object word for which the (deterministic) inference finds at least one box/point."""
    key = "objects" if skill == "detect" else "points"
    for word in ("face", "person", "rocket", "cup", "eye", "window", "hand", "sky", "car", "tree",
                 "door", "light"):
        if infer({"skill": skill, "object": word, "image": b64(image)})[0][key]:
            return word
    raise AssertionError("no object word with boxes")  # pragma: no cover


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def url_expires(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["expires"][0])


# -- 1. auth -----------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"X-Moondream-Auth": "wrong-key"},
                                     {"X-Moondream-Auth": ""}], ids=["missing", "wrong", "empty"])
def test_missing_or_wrong_key_is_401_with_error_body(server, http, headers):
    calls = [
        ("POST", f"{server.url}/batch?action=mpu-create"),
        ("GET", f"{server.url}/batch"),
        ("GET", f"{server.url}/batch/01ANYTHING"),
        ("PUT", f"{server.url}/batch/01X?action=mpu-uploadpart&uploadId=u&partNumber=1"),
        ("POST", f"{server.url}/batch/01X?action=mpu-complete&uploadId=u"),
        ("DELETE", f"{server.url}/batch/01X?action=mpu-abort&uploadId=u"),
    ]
    for method, url in calls:
        r = http.request(method, url, headers=headers)
        assert r.status_code == 401, (method, url)
        body = r.json()
        assert set(body) == {"error"}
        assert set(body["error"]) == ERROR_KEYS
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["message"]
    # With the key, the same list call works.
    assert http.get(f"{server.url}/batch", headers=AUTH).status_code == 200


def test_client_raises_authentication_error_without_the_key(server):
    wrong = "sk-wrong-" + uuid.uuid4().hex
    bad = BatchClient(server.url, wrong, max_attempts=3, backoff_initial=0.01, backoff_max=0.05)
    try:
        for call in (bad.create_upload, lambda: bad.get_batch("01NOPE"), bad.list_batches):
            with pytest.raises(AuthenticationError) as info:
                call()
            assert info.value.status == 401
            assert wrong not in str(info.value) and API_KEY not in str(info.value)
            assert wrong not in repr(info.value.args)
    finally:
        bad.close()
    # 401 is final: three calls, three requests, no retries.
    assert server.emulator.requests.get("unauthorised") == 3


# -- 2. the full flow --------------------------------------------------------------------------
def test_full_flow_three_parts_real_photographs(server, client):
    server.config.chunking_seconds = 0.4
    server.config.processing_seconds = 0.2
    astronaut, rocket, coffee = photo("astronaut.png"), photo("rocket.jpg"), photo("coffee.png")
    specs = [
        ("cap-astronaut", astronaut, SkillOptions(skill="caption")),
        ("cap-rocket", rocket, SkillOptions(skill="caption")),
        ("cap-coffee-long", coffee, SkillOptions(skill="caption", length="long")),
        ("query-coffee", coffee, SkillOptions(skill="query", question="What is in the cup?")),
        ("query-astronaut-noreason", astronaut,
         SkillOptions(skill="query", question="Who is this?", reasoning=False)),
        ("query-rocket-reason", rocket,
         SkillOptions(skill="query", question="What flies?", reasoning=True, max_tokens=64)),
        ("detect-rocket", rocket, SkillOptions(skill="detect", object=object_with_boxes(rocket, "detect"))),
        ("point-astronaut", astronaut,
         SkillOptions(skill="point", object=object_with_boxes(astronaut, "point"))),
    ]
    lines = [encode_line(id_, img, opts.line_fragment()) for id_, img, opts in specs]
    data = b"".join(lines)

    # mpu-create → 3 parts of equal size, the last shorter → mpu-complete.
    up = client.create_upload()
    assert up.file_id and up.upload_id and up.key
    part_size = len(data) // 3 + 1
    chunks = [data[i:i + part_size] for i in range(0, len(data), part_size)]
    assert len(chunks) == 3 and len(chunks[0]) == len(chunks[1]) > len(chunks[2]) > 0
    parts = [client.upload_part(up.file_id, up.upload_id, n, c) for n, c in enumerate(chunks, 1)]
    assert [p.part_number for p in parts] == [1, 2, 3]
    assert all(p.etag.startswith('"') and p.etag.endswith('"') for p in parts)
    created = client.complete_upload(up.file_id, up.upload_id, parts)
    assert created.status == "chunking"
    assert created.model_extra["size"] == len(data)

    first = client.get_batch(created.id)
    assert first.status == "chunking"
    assert first.model == "moondream3-preview"
    assert first.progress == {"total": 0, "completed": 0}
    assert first.created_at and first.created_at.endswith("Z")

    final, seen = wait_final(client, created.id)
    statuses = [s.status for s in seen]
    order = ["chunking", "processing", "completed"]
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)
    processing = [s for s in seen if s.status == "processing"]
    assert processing, statuses
    for s in processing:
        assert s.progress["total"] == len(lines)
        assert 0 <= s.progress["completed"] < len(lines)
        assert not s.outputs and s.usage is None

    assert final.status == "completed"
    assert final.progress == {"total": len(lines), "completed": len(lines), "failed": 0}
    assert final.completed_at and final.expires_at and final.error is None
    assert [o.index for o in final.outputs] == list(range(len(final.outputs))) and final.outputs
    for o in final.outputs:
        assert o.url.startswith(f"http://127.0.0.1:{server.port}/v1/_outputs/{final.id}/")
        assert "signature=" in o.url and "expires=" in o.url

    rows = download_rows(client, final)
    assert sorted(r["line_index"] for r in rows) == list(range(len(lines)))
    by_index = {r["line_index"]: r for r in rows}
    usage = {"input_tokens": 0, "output_tokens": 0}
    for i, (id_, _img, opts) in enumerate(specs):
        row = by_index[i]
        assert row["id"] == id_ and row["status"] == "ok", row
        # Deterministic: the same inference on the same line gives the same answer.
        expected, expected_usage = infer(json.loads(lines[i]))
        assert row["result"] == expected
        assert row["usage"] == expected_usage and expected_usage["input_tokens"] > 0
        for k in usage:
            usage[k] += row["usage"][k]
        result = row["result"]
        if opts.skill == "caption":
            assert set(result) == {"caption"} and isinstance(result["caption"], str) and result["caption"]
        elif opts.skill == "query":
            assert isinstance(result["answer"], str) and result["answer"]
            assert ("reasoning" in result) == (opts.reasoning is not False)
        elif opts.skill == "detect":
            assert set(result) == {"objects"} and result["objects"]
            for box in result["objects"]:
                assert set(box) == {"x_min", "y_min", "x_max", "y_max"}
                assert 0 <= box["x_min"] <= box["x_max"] <= 1 and 0 <= box["y_min"] <= box["y_max"] <= 1
        else:
            assert set(result) == {"points"} and result["points"]
            for pt in result["points"]:
                assert set(pt) == {"x", "y"} and 0 <= pt["x"] <= 1 and 0 <= pt["y"] <= 1
    assert final.usage == usage
    # Different images, same request → different answers.
    assert by_index[0]["result"] != by_index[1]["result"]
    q = {"skill": "query", "question": "Same?"}
    assert infer({**q, "image": b64(astronaut)})[0] != infer({**q, "image": b64(coffee)})[0]


def test_finetune_model_name_is_accepted(client):
    final = run_batch(client, tiny_lines(2), model="moondream3-preview/ft-abc@100")
    assert final.status == "completed", final.error
    assert final.model == "moondream3-preview/ft-abc@100"


# -- 3. output splitting and shuffling ---------------------------------------------------------
def test_outputs_split_into_files_cover_every_line_once(server, client):
    server.config.lines_per_output_file = 2
    final = run_batch(client, tiny_lines(5))
    assert final.status == "completed"
    assert [o.index for o in final.outputs] == [0, 1, 2]
    per_file = [parse_rows(client.download(o)) for o in final.outputs]
    assert [len(rows) for rows in per_file] == [2, 2, 1]
    rows = [r for rows in per_file for r in rows]
    assert sorted(r["line_index"] for r in rows) == [0, 1, 2, 3, 4]
    assert all(r["id"] == f"line-{r['line_index']}" and r["status"] == "ok" for r in rows)


def test_outputs_are_shuffled_unless_disabled(server, client):
    final = run_batch(client, tiny_lines(20))
    rows = download_rows(client, final)
    indexes = [r["line_index"] for r in rows]
    assert sorted(indexes) == list(range(20)) and indexes != list(range(20))
    assert all(r["id"] == f"line-{r['line_index']}" for r in rows)

    server.config.shuffle_outputs = False
    final = run_batch(client, tiny_lines(20))
    assert [r["line_index"] for r in download_rows(client, final)] == list(range(20))


# -- 4. multipart rules ------------------------------------------------------------------------
def test_unequal_non_trailing_parts_are_rejected(client):
    data = tiny_lines(3)
    for sizes in ([100, 120, len(data) - 220], [100, len(data) - 100]):
        # second case: the last part is larger than the first
        assert sizes[-1] > 0
        up = client.create_upload()
        parts, pos = [], 0
        for n, size in enumerate(sizes, start=1):
            parts.append(client.upload_part(up.file_id, up.upload_id, n, data[pos:pos + size]))
            pos += size
        with pytest.raises(RequestRejected) as info:
            client.complete_upload(up.file_id, up.upload_id, parts)
        assert info.value.status == 400 and info.value.code == "invalid_request"
    # Equal parts with a shorter last one are fine.
    assert run_batch(client, data, part_size=len(data) // 2 + 1).status == "completed"


def test_wrong_etag_is_rejected_and_reupload_replaces_a_part(client):
    data = tiny_lines(2)
    file_id, upload_id, parts = upload(client, data)
    with pytest.raises(RequestRejected) as info:
        client.complete_upload(file_id, upload_id, [Part(partNumber=1, etag='"' + "0" * 32 + '"')])
    assert info.value.status == 400
    with pytest.raises(RequestRejected) as info:  # a part that was never uploaded
        client.complete_upload(file_id, upload_id, [parts[0], Part(partNumber=2, etag=parts[0].etag)])
    assert info.value.status == 400
    # Re-uploading part 1 gives it a new ETag; the old one no longer completes.
    fresh = client.upload_part(file_id, upload_id, 1, tiny_lines(1))
    assert fresh.etag != parts[0].etag
    with pytest.raises(RequestRejected):
        client.complete_upload(file_id, upload_id, parts)
    created = client.complete_upload(file_id, upload_id, [fresh])
    final, _ = wait_final(client, created.id)
    assert final.progress["total"] == 1


def test_parts_out_of_order_or_bad_part_numbers_are_rejected(client):
    data = tiny_lines(2)
    file_id, upload_id, parts = upload(client, data, part_size=len(data) // 2 + 1)
    with pytest.raises(RequestRejected) as info:
        client.complete_upload(file_id, upload_id, list(reversed(parts)))
    assert info.value.status == 400
    for bad in (0, 10_001):
        with pytest.raises(RequestRejected) as info:
            client.upload_part(file_id, upload_id, bad, b"x")
        assert info.value.status == 400
    assert client.complete_upload(file_id, upload_id, parts).status == "chunking"


def test_part_at_or_over_max_part_size_is_413(server, client):
    server.config.max_part_size = 1000
    up = client.create_upload()
    for size in (1000, 5000):
        with pytest.raises(RequestRejected) as info:
            client.upload_part(up.file_id, up.upload_id, 1, b"x" * size)
        assert info.value.status == 413
    assert client.upload_part(up.file_id, up.upload_id, 1, b"x" * 999).part_number == 1


def test_min_part_size_applies_to_multi_part_uploads_only(server, client):
    server.config.min_part_size = 1000
    data = tiny_lines(3)
    assert len(data) > 2000
    file_id, upload_id, parts = upload(client, data, part_size=999)
    assert len(parts) > 1
    with pytest.raises(RequestRejected) as info:
        client.complete_upload(file_id, upload_id, parts)
    assert info.value.status == 400
    # Parts of at least the minimum, and a single small part, are accepted.
    assert run_batch(client, data, part_size=1000).status == "completed"
    small = tiny_lines(1)
    assert len(small) < 1000
    assert run_batch(client, small).status == "completed"


def test_unknown_upload_is_404(client):
    up = client.create_upload()
    cases = [
        lambda: client.upload_part(up.file_id, "not-the-upload-id", 1, b"x"),
        lambda: client.upload_part("01UNKNOWNFILE", up.upload_id, 1, b"x"),
        lambda: client.complete_upload(up.file_id, "not-the-upload-id", [Part(partNumber=1, etag="x")]),
        lambda: client.complete_upload("01UNKNOWNFILE", up.upload_id, [Part(partNumber=1, etag="x")]),
        lambda: client.get_batch("01UNKNOWNBATCH"),
    ]
    for call in cases:
        with pytest.raises(RequestRejected) as info:
            call()
        assert info.value.status == 404 and info.value.code == "not_found"


def test_abort_then_complete_is_404(client, http, server):
    file_id, upload_id, parts = upload(client, tiny_lines(1))
    client.abort_upload(file_id, upload_id)
    with pytest.raises(RequestRejected) as info:
        client.complete_upload(file_id, upload_id, parts)
    assert info.value.status == 404
    with pytest.raises(RequestRejected) as info:
        client.upload_part(file_id, upload_id, 2, b"x")
    assert info.value.status == 404
    # A second abort answers 404 on the wire; the client treats it as done.
    r = http.delete(f"{server.url}/batch/{file_id}", params={"action": "mpu-abort", "uploadId": upload_id},
                    headers=AUTH)
    assert r.status_code == 404
    client.abort_upload(file_id, upload_id)


def test_complete_twice_is_404(client):
    file_id, upload_id, parts = upload(client, tiny_lines(1))
    client.complete_upload(file_id, upload_id, parts)
    with pytest.raises(RequestRejected) as info:
        client.complete_upload(file_id, upload_id, parts)
    assert info.value.status == 404


def test_complete_without_parts_is_400(server, client, http):
    up = client.create_upload()
    url = f"{server.url}/batch/{up.file_id}"
    params = {"action": "mpu-complete", "uploadId": up.upload_id}
    for body in ({}, {"parts": []}, {"parts": "nope"}, {"parts": [{"partNumber": 1}]}):
        r = http.post(url, params=params, json=body, headers=AUTH)
        assert r.status_code == 400, body
        assert set(r.json()["error"]) == ERROR_KEYS


# -- 5. batch-level failures -------------------------------------------------------------------
GOOD = json.dumps({"id": "a", "skill": "caption", "image": b64(jpeg_bytes())}).encode()

BATCH_FAILURES = {
    "blank-line": (GOOD + b"\n\n" + GOOD + b"\n", {}, None, "validation_error"),
    "whitespace-line": (GOOD + b"\n   \n" + GOOD + b"\n", {}, None, "validation_error"),
    "trailing-blank-line": (GOOD + b"\n\n", {}, None, "validation_error"),
    "invalid-json": (GOOD + b'\n{"skill": "caption",\n', {}, None, "validation_error"),
    "bad-utf8": (GOOD + b'\n{"id": "\xff\xfe", "skill": "caption"}\n', {}, None, "validation_error"),
    "not-an-object": (GOOD + b"\n[1, 2, 3]\n", {}, None, "validation_error"),
    "too-many-lines": (b"\n".join([GOOD] * 4) + b"\n", {"max_lines": 3}, None, "limit_exceeded"),
    "line-too-long": (GOOD + b"\n" + json.dumps({"skill": "caption", "pad": "x" * 5000}).encode() + b"\n",
                      {"max_line_bytes": 2000}, None, "limit_exceeded"),
    "file-too-large": (GOOD + b"\n", {"max_file_bytes": 10}, None, "limit_exceeded"),
    "unknown-model": (GOOD + b"\n", {}, "nope", "invalid_model"),
    "unknown-finetune-base": (GOOD + b"\n", {}, "nope/ft@1", "invalid_model"),
    # The only way to an empty batch: a zero-byte upload (whitespace is a blank line).
    "empty-file": (b"", {}, None, "empty_batch"),
}


@pytest.mark.parametrize("case", list(BATCH_FAILURES))
def test_batch_level_failures(server, client, case):
    data, overrides, model, code = BATCH_FAILURES[case]
    for k, v in overrides.items():
        setattr(server.config, k, v)
    created = submit(client, data, model=model)
    assert created.status == "chunking"  # the batch is accepted, then fails while chunking
    final, _ = wait_final(client, created.id)
    assert final.status == "failed"
    assert isinstance(final.error, dict) and final.error["code"] == code
    assert final.error_code() == code and final.error["message"]
    assert final.outputs == [] and final.usage is None
    assert final.completed_at


def test_the_same_lines_pass_without_the_limits(client):
    """Control for the limit cases above: the default limits accept the same lines."""
    final = run_batch(client, b"\n".join([GOOD] * 4) + b"\n")
    assert final.status == "completed" and final.progress["total"] == 4


# -- 6. per-line errors ------------------------------------------------------------------------
def test_per_line_errors_leave_the_batch_completed(client):
    img = b64(jpeg_bytes())
    cases = [
        ({"id": "ok-caption", "skill": "caption", "image": img}, None),
        ({"id": "no-skill", "image": img}, "invalid_request"),
        ({"id": "paint", "skill": "paint", "image": img}, "unknown_skill"),
        ({"id": "bad-b64", "skill": "caption", "image": "this is not base64!!"}, "image_decode_failed"),
        ({"id": "not-image", "skill": "caption", "image": b64(b"hello, these are not pixels")},
         "image_decode_failed"),
        ({"id": "no-question", "skill": "query", "image": img}, "invalid_request"),
        ({"id": "no-object", "skill": "detect", "image": img}, "invalid_request"),
        ({"id": "no-image", "skill": "caption"}, "invalid_request"),
        ({"id": "bad-length", "skill": "caption", "image": img, "length": "epic"}, "invalid_request"),
        ({"skill": "query", "image": img, "question": "No id?"}, None),
    ]
    final = run_batch(client, jsonl(*(c for c, _ in cases)))
    assert final.status == "completed"
    n_err = sum(1 for _, code in cases if code)
    assert final.progress == {"total": len(cases), "completed": len(cases) - n_err, "failed": n_err}
    rows = {r["line_index"]: r for r in download_rows(client, final)}
    assert sorted(rows) == list(range(len(cases)))
    for i, (line, code) in enumerate(cases):
        row = rows[i]
        if "id" in line:
            assert row["id"] == line["id"]
        else:
            assert "id" not in row
        if code is None:
            assert row["status"] == "ok" and row["result"] == infer(line)[0]
        else:
            assert row["status"] == "error", row
            assert row["error"]["code"] == code and row["error"]["message"]
            assert "result" not in row


def test_formats_the_api_does_not_document_are_image_decode_failed(client):
    """JPEG, PNG and GIF only (FACTS.md "real-time API"): WebP, BMP and TIFF are refused."""
    from PIL import Image

    def encode(fmt: str) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (24, 16), (200, 40, 40)).save(buf, format=fmt)
        return b64(buf.getvalue())

    formats = ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"]
    final = run_batch(client, jsonl(*({"id": f, "skill": "caption", "image": encode(f)}
                                       for f in formats)))
    rows = {r["id"]: r for r in download_rows(client, final)}
    for fmt in ("JPEG", "PNG", "GIF"):
        assert rows[fmt]["status"] == "ok", rows[fmt]
    for fmt in ("WEBP", "BMP", "TIFF"):
        assert rows[fmt]["status"] == "error"
        assert rows[fmt]["error"]["code"] == "image_decode_failed"
        assert fmt in rows[fmt]["error"]["message"]


# -- 7. list with cursor -----------------------------------------------------------------------
def test_list_follows_cursor_across_pages(client):
    ids = [submit(client, tiny_lines(1)).id for _ in range(5)]
    seen: list[str] = []
    pages = []
    cursor = None
    for _ in range(10):
        page = client.list_batches(limit=2, cursor=cursor)
        pages.append(page)
        assert len(page["batches"]) <= 2
        seen += [b["id"] for b in page["batches"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
        assert cursor
    assert [len(p["batches"]) for p in pages] == [2, 2, 1]
    assert [p["has_more"] for p in pages] == [True, True, False]
    assert seen == list(reversed(ids))  # newest first, each once
    for page in pages:
        for b in page["batches"]:
            assert {"id", "status", "model", "progress", "created_at"} <= set(b)
    assert sorted(b["id"] for b in client.iter_batches()) == sorted(ids)


def test_iter_batches_follows_cursor_past_one_page(client):
    ids = {submit(client, tiny_lines(1)).id for _ in range(103)}
    first = client.list_batches(limit=100)
    assert len(first["batches"]) == 100 and first["has_more"] and first["next_cursor"]
    listed = [b["id"] for b in client.iter_batches()]
    assert len(listed) == len(set(listed)) == 103 and set(listed) == ids


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"limit": "ten"},
                                    {"limit": 2, "cursor": "not-a-cursor"}])
def test_list_rejects_bad_limit_or_cursor(server, client, http, params):
    r = http.get(f"{server.url}/batch", params=params, headers=AUTH)
    assert r.status_code == 400
    assert set(r.json()["error"]) == ERROR_KEYS
    if isinstance(params["limit"], int) and "cursor" not in params:
        with pytest.raises(RequestRejected) as info:
            client.list_batches(limit=params["limit"])
        assert info.value.status == 400


def test_list_limit_bounds_are_inclusive(client):
    submit(client, tiny_lines(1))
    assert len(client.list_batches(limit=1)["batches"]) == 1
    page = client.list_batches(limit=100)
    assert len(page["batches"]) == 1 and page["has_more"] is False and page["next_cursor"] is None


# -- 8. presigned-style output URLs ------------------------------------------------------------
def test_output_urls_expire_and_a_fresh_status_renews_them(server, client):
    server.config.url_ttl = 0.5
    final = run_batch(client, tiny_lines(3))
    out = final.outputs[0]
    deadline = time.monotonic() + 5
    while time.time() <= url_expires(out.url) + 0.05:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(AuthenticationError) as info:
        client.download(out)
    assert info.value.status == 403 and info.value.code == "url_expired"
    assert "signature" not in str(info.value) and out.url not in str(info.value)

    server.config.url_ttl = 60
    fresh = client.get_batch(final.id)
    assert fresh.outputs[0].url != out.url
    rows = download_rows(client, fresh)
    assert sorted(r["line_index"] for r in rows) == [0, 1, 2]


def test_tampered_output_urls_are_403(server, client, http):
    final = run_batch(client, tiny_lines(2))
    url = final.outputs[0].url
    assert http.get(url).status_code == 200
    sig = parse_qs(urlsplit(url).query)["signature"][0]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    tampered = [
        with_query(url, signature=flipped),
        with_query(url, signature=""),
        with_query(url, expires=str(url_expires(url) + 3600)),  # extend the lifetime
        url.replace(f"/{final.id}/0.jsonl", f"/{final.id}/1.jsonl"),  # another file, same signature
    ]
    for bad in tampered:
        r = http.get(bad)
        assert r.status_code == 403, bad
        assert r.json()["error"]["code"] == "signature_mismatch"
    with pytest.raises(AuthenticationError):
        client.download(OutputFile(index=0, url=tampered[0]))


def test_outputs_are_fetched_without_the_api_key(server, client, http):
    final = run_batch(client, tiny_lines(2))
    r = http.get(final.outputs[0].url)  # no X-Moondream-Auth at all
    assert r.status_code == 200 and "X-Moondream-Auth" not in r.request.headers
    assert r.content == client.download(final.outputs[0])
    # BatchClient.download sends no key: on an authenticated endpoint it gets the 401 of a
    # keyless request (the same URL through the client's API calls succeeds).
    with pytest.raises(AuthenticationError) as info:
        client.download(OutputFile(index=0, url=f"{server.url}/batch"))
    assert info.value.status == 401
    assert client.list_batches()["batches"]


# -- regressions of bugs found by these tests -------------------------------------------------
def test_subsecond_url_ttl_gives_a_url_that_is_live_when_issued(server, client):
    server.config.url_ttl = 0.5
    final = run_batch(client, tiny_lines(1))
    deadline = time.monotonic() + 3
    while not 0.05 <= time.time() % 1 <= 0.3:  # issue the URL early in a second
        assert time.monotonic() < deadline
        time.sleep(0.01)
    fresh = client.get_batch(final.id)
    client.download(fresh.outputs[0])  # within ~ms of issue, well inside 0.5 s


def test_non_numeric_settings_value_is_a_per_line_error(server, client, http):
    img = b64(jpeg_bytes())
    data = jsonl({"id": "hot", "skill": "caption", "image": img, "settings": {"temperature": "hot"}},
                 {"id": "fine", "skill": "caption", "image": img})
    created = submit(client, data)
    deadline = time.monotonic() + 3
    while True:
        r = http.get(f"{server.url}/batch/{created.id}", headers=AUTH)
        assert r.status_code == 200, r.status_code
        if r.json()["status"] == "completed":
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    rows = {row["id"]: row for row in download_rows(client, BatchStatus.model_validate(r.json()))}
    assert rows["hot"]["error"]["code"] == "invalid_request"
    assert rows["fine"]["status"] == "ok"


def test_non_string_model_is_rejected_cleanly(server, client, http):
    file_id, upload_id, parts = upload(client, tiny_lines(1))
    r = http.post(f"{server.url}/batch/{file_id}", params={"action": "mpu-complete", "uploadId": upload_id},
                  json={"parts": [p.model_dump(by_alias=True) for p in parts], "model": 123},
                  headers=AUTH)
    if r.status_code == 200:  # accepted: then it must fail as invalid_model, not break the API
        batch_id = r.json()["id"]
        deadline = time.monotonic() + 3
        while True:
            r = http.get(f"{server.url}/batch/{batch_id}", headers=AUTH)
            assert r.status_code == 200, r.status_code
            if r.json()["status"] in ("completed", "failed"):
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert r.json()["error"]["code"] == "invalid_model"
    else:
        assert r.status_code == 400
    r = http.get(f"{server.url}/batch", headers=AUTH)
    assert r.status_code == 200, r.status_code


def test_line_limit_does_not_depend_on_the_trailing_newline(server, client):
    line = json.dumps({"id": "x", "skill": "caption", "image": b64(jpeg_bytes())}).encode()
    server.config.max_line_bytes = len(line)
    without_newline = run_batch(client, line)
    with_newline = run_batch(client, line + b"\n")
    assert without_newline.status == "completed"
    assert with_newline.status == without_newline.status, with_newline.error
