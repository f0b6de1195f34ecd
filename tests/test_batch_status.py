"""Liberal reading of Batch API answers (FACTS.md: "Treat every field as optional except `id` and
`status`"): ``BatchStatus`` on every shape the contract allows, the client on thin ``mpu-*``
answers from a real HTTP server, and the emulator's ``loose_answers`` over HTTP."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

import moonbatch.workers.providers.moondream.answers as answers
from moonbatch.emulator.inference import infer
from moonbatch.emulator.server import EmulatorConfig, EmulatorServer
from moonbatch.workers.models import SkillOptions
from moonbatch.workers.providers.moondream.answers import BatchStatus
from moonbatch.workers.providers.moondream.client import BatchClient
from moonbatch.workers.providers.moondream.errors import TransientError, UnexpectedAnswer
from moonbatch.workers.providers.moondream.lines import encode_line
from tests.conftest import jpeg_bytes

URL = "https://r2.example/out/0.jsonl?X-Amz-Signature=deadbeefsecret"


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    """Oddities are logged once per process: forget the ones earlier tests saw."""
    with answers._warned_lock:
        answers._warned.clear()
    yield


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    messages = [r.getMessage() for r in caplog.records
                if r.name == "moonbatch.workers.providers.moondream.answers" and r.levelno == logging.WARNING]
    for m in messages:  # output URLs are presigned secrets
        assert "http" not in m and "Signature" not in m and "secret" not in m, m
    return messages


def status(**fields: object) -> BatchStatus:
    return BatchStatus.model_validate({"id": "b1", "status": "processing", **fields})


# -- BatchStatus: progress ---------------------------------------------------------------------
def test_seed_shape_reads_as_before(caplog):
    st = BatchStatus.model_validate({
        "id": "01JQ", "status": "completed", "model": "moondream3-preview",
        "progress": {"total": 1000, "completed": 998, "failed": 2},
        "usage": {"input_tokens": 1500000, "output_tokens": 50000},
        "outputs": [{"index": 0, "url": URL}, {"index": 1, "url": URL + "1"}],
        "created_at": "2025-01-10T12:00:00Z", "completed_at": "2025-01-10T12:45:00Z",
        "expires_at": "2025-01-17T12:45:00Z"})
    assert (st.total, st.completed, st.failed) == (1000, 998, 2)
    assert (st.input_tokens, st.output_tokens) == (1500000, 50000)
    assert [(o.index, o.url) for o in st.outputs] == [(0, URL), (1, URL + "1")]
    assert st.done and warnings(caplog) == []


@pytest.mark.parametrize("progress", [None, {}, {"eta": None}], ids=["null", "empty", "only-eta"])
def test_progress_absent_or_null_while_chunking(progress, caplog):
    st = BatchStatus.model_validate({"id": "b1", "status": "chunking", "progress": progress,
                                     "outputs": None, "usage": None, "error": None})
    assert st.total is None and st.completed == 0 and st.failed == 0
    assert st.outputs == [] and st.input_tokens is None and st.output_tokens is None
    assert not st.done and warnings(caplog) == []
    assert BatchStatus.model_validate({"id": "b1", "status": "chunking"}).total is None


@pytest.mark.parametrize("raw, want", [
    (1500, 1500), (1500.5, 1500), (1500.999, 1500), (0.0, 0), ("1500", 1500), (" 42 ", 42),
    ("1500.5", 1500), ("1e3", 1000),
])
def test_counts_as_floats_or_numeric_strings(raw, want, caplog):
    st = status(progress={"total": raw, "completed": raw, "failed": raw, "eta": None},
                usage={"input_tokens": raw, "output_tokens": raw})
    assert (st.total, st.completed, st.failed) == (want, want, want)
    assert (st.input_tokens, st.output_tokens) == (want, want)
    assert warnings(caplog) == []


@pytest.mark.parametrize("raw", [True, False, "many", "", [3], {"n": 3}, -1, -0.5, math.nan,
                                 math.inf, "nan"], ids=repr)
def test_counts_that_are_not_numbers_are_ignored_with_one_warning(raw, caplog):
    st = status(progress={"total": raw, "completed": raw, "failed": raw},
                usage={"input_tokens": raw})
    for _ in range(3):  # read often, warned once per oddity
        assert st.total is None and st.completed == 0 and st.failed == 0
        assert st.input_tokens is None
    got = warnings(caplog)
    assert len(got) == 4 and len(set(got)) == 4  # progress.total/completed/failed, usage.input_tokens
    assert all("ignored" in m for m in got)


def test_failed_omitted_when_zero_and_extra_fields_kept(caplog):
    st = status(progress={"total": 10.0, "completed": 4.0, "eta": None, "rate": "fast"},
                object="batch", metadata=None, request_counts={"x": 1})
    assert (st.total, st.completed, st.failed) == (10, 4, 0)
    assert st.model_extra == {"object": "batch", "metadata": None, "request_counts": {"x": 1}}
    assert warnings(caplog) == []


@pytest.mark.parametrize("field, value", [("progress", [1, 2]), ("progress", "half"),
                                          ("usage", 12), ("usage", ["a"])])
def test_progress_or_usage_not_an_object_is_ignored(field, value, caplog):
    st = status(**{field: value})
    assert st.total is None and st.completed == 0 and st.input_tokens is None
    assert len(warnings(caplog)) == 1


# -- BatchStatus: status -----------------------------------------------------------------------
@pytest.mark.parametrize("name, done", [("chunking", False), ("processing", False),
                                        ("completed", True), ("failed", True), ("queued", False),
                                        ("validating", False), ("cancelling", False)])
def test_only_completed_and_failed_are_done(name, done, caplog):
    for _ in range(2):
        assert status(status=name).done is done
    got = warnings(caplog)
    if name in answers.KNOWN_STATUSES:
        assert got == []
    else:  # an unknown status: poll again, said once
        assert len(got) == 1 and name in got[0] and "polling again" in got[0]


def test_unknown_status_is_logged_sanitised(caplog):
    status(status="weird status <script>")
    [message] = warnings(caplog)
    assert "<script>" not in message and " " not in message.split("'")[1]


@pytest.mark.parametrize("body", [{"status": "completed"}, {"id": "b1"}, {"id": None, "status": "x"},
                                  {"id": "b1", "status": None}, {"id": "", "status": "completed"},
                                  {"id": "b1", "status": ""}])
def test_id_and_status_stay_required(body):
    with pytest.raises(ValidationError):
        BatchStatus.model_validate(body)


def test_numeric_id_reads_as_text():
    assert BatchStatus.model_validate({"id": 17, "status": "processing"}).id == "17"


# -- BatchStatus: outputs ----------------------------------------------------------------------
def test_outputs_as_plain_url_strings_take_their_position(caplog):
    st = status(status="completed", outputs=[URL + "a", URL + "b", URL + "c"])
    assert [(o.index, o.url) for o in st.outputs] == [(0, URL + "a"), (1, URL + "b"), (2, URL + "c")]
    assert warnings(caplog) == []


def test_outputs_dicts_missing_or_odd_index(caplog):
    st = status(status="completed", outputs=[
        {"url": URL + "0"}, {"index": 1.0, "url": URL + "1"}, {"index": "2", "url": URL + "2"},
        {"index": None, "url": URL + "3", "size": 10}, URL + "4"])
    assert [(o.index, o.url) for o in st.outputs] == [(i, URL + str(i)) for i in range(5)]
    assert warnings(caplog) == []


def test_outputs_entries_without_a_usable_url_are_skipped(caplog):
    st = status(status="completed", outputs=[
        {"index": 0, "url": URL + "0"}, {"index": 1}, {"index": 2, "url": None}, None, 7,
        {"index": 3, "url": "ftp://example/3"}, "not a url", {"index": 4, "url": URL + "4"}])
    assert [(o.index, o.url) for o in st.outputs] == [(0, URL + "0"), (4, URL + "4")]
    assert warnings(caplog)  # said, without the URLs (checked by warnings())


def test_repeated_output_indices_fall_back_to_positions(caplog):
    st = status(status="completed", outputs=[{"index": 0, "url": URL + "a"}, {"url": URL + "b"},
                                             {"index": 0, "url": URL + "c"}])
    assert [(o.index, o.url) for o in st.outputs] == [(0, URL + "a"), (1, URL + "b"), (2, URL + "c")]
    assert len(warnings(caplog)) == 1


@pytest.mark.parametrize("outputs", [{"0": URL}, URL, 3])
def test_outputs_not_a_list_are_ignored(outputs, caplog):
    assert status(status="completed", outputs=outputs).outputs == []
    assert len(warnings(caplog)) == 1


def test_output_url_is_not_in_reprs():
    st = status(status="completed", outputs=[URL])
    assert "Signature" not in repr(st) and "Signature" not in repr(st.outputs[0])


# -- the client on thin answers, from a real HTTP server ---------------------------------------
class Script:
    """A WSGI app answering each request with the next (status, headers, body); the last repeats.
    A ``bytes`` body is sent as it is."""

    def __init__(self, *steps: tuple[int, dict[str, str], object]) -> None:
        self.steps = list(steps)

    def __call__(self, environ, start_response):  # noqa: ANN001
        Request(environ).get_data()
        status, headers, body = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return Response(data, status=status, headers=headers,
                        mimetype="application/json")(environ, start_response)


@pytest.fixture
def scripted() -> Iterator:
    servers = []

    def start(*steps: tuple[int, dict[str, str], object]) -> BatchClient:
        server = make_server("127.0.0.1", 0, Script(*steps), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return BatchClient(f"http://127.0.0.1:{server.server_port}/v1", "sk-secret",
                           max_attempts=1)

    yield start
    for s in servers:
        s.shutdown()


def test_mpu_create_needs_only_file_and_upload_ids(scripted):
    client = scripted((200, {}, {"fileId": 42, "uploadId": "u1", "key": None, "expires": 1.5}))
    up = client.create_upload()
    assert (up.file_id, up.upload_id, up.key) == ("42", "u1", None)
    client = scripted((200, {}, {"uploadId": "u1"}))
    with pytest.raises(UnexpectedAnswer) as info:
        client.create_upload()
    assert "fileId" in str(info.value) and isinstance(info.value, TransientError)


def test_mpu_uploadpart_needs_only_an_etag(scripted):
    client = scripted((200, {}, {"etag": '"e1"', "partNumber": None}))
    part = client.upload_part("f", "u", 3, b"data")
    assert (part.part_number, part.etag) == (3, '"e1"')  # the part number is ours
    client = scripted((200, {"ETag": '"from-header"'}, {}))  # S3/R2 style: in the header
    assert client.upload_part("f", "u", 1, b"x").etag == '"from-header"'
    client = scripted((200, {}, {"partNumber": 1, "etag": None}))
    with pytest.raises(UnexpectedAnswer, match="no etag"):
        client.upload_part("f", "u", 1, b"x")


@pytest.mark.parametrize("body", [{"id": "b9"}, {"id": "b9", "status": None, "size": None},
                                  {"id": "b9", "status": "chunking"}])
def test_mpu_complete_needs_only_an_id(scripted, body):
    st = scripted((200, {}, body)).complete_upload("f", "u", [])
    assert st.id == "b9" and st.status == "chunking" and not st.done


def test_unreadable_answers_raise_without_the_body(scripted):
    client = scripted((200, {}, {"status": "completed", "outputs": [URL]}))
    with pytest.raises(UnexpectedAnswer) as info:
        client.get_batch("b1")
    assert "id" in str(info.value) and "Signature" not in str(info.value)
    client = scripted((200, {}, b"<html>" + URL.encode()))
    with pytest.raises(UnexpectedAnswer, match="not JSON") as info:
        client.get_batch("b1")
    assert "Signature" not in str(info.value)


def test_list_with_null_batches_is_an_empty_page(scripted):
    client = scripted((200, {}, {"batches": None, "next_cursor": None, "has_more": None}))
    assert list(client.iter_batches()) == []
    client = scripted((200, {}, {"batches": [{"id": "a", "status": "queued"}, None, "x"],
                                 "has_more": False}))
    assert list(client.iter_batches()) == [{"id": "a", "status": "queued"}]


# -- the emulator's loose answers over HTTP ----------------------------------------------------
API_KEY = "test-loose-" + uuid.uuid4().hex


@pytest.fixture
def loose() -> Iterator[EmulatorServer]:
    # No time to wait: the phases advance on status answers alone (each shape shown once).
    config = EmulatorConfig(api_key=API_KEY, chunking_seconds=0, processing_seconds=0,
                            lines_per_second=1e9, min_part_size=0, loose_answers=True,
                            lines_per_output_file=2)
    with EmulatorServer(config) as server:
        yield server


def test_loose_emulator_full_flow(loose, caplog):
    frag = SkillOptions(skill="caption").line_fragment()
    images = [jpeg_bytes(size=(20 + i, 16), color=(30 * i, 60, 90)) for i in range(4)]
    lines = [encode_line(f"img-{i}", img, frag) for i, img in enumerate(images)]
    lines.append(b'{"id": "broken", "skill": "caption", "image": "bm90IGFuIGltYWdl"}\n')
    data = b"".join(lines)
    client = BatchClient(loose.url, API_KEY, timeout=10, max_attempts=2, backoff_initial=0.01)
    http = httpx.Client(timeout=10, headers={"X-Moondream-Auth": API_KEY})
    try:
        up = client.create_upload()
        assert up.key is None
        part = client.upload_part(up.file_id, up.upload_id, 1, data)
        created = client.complete_upload(up.file_id, up.upload_id, [part])
        assert created.status == "chunking"

        raw, seen = [], []
        while not seen or not seen[-1].done:
            answer = http.get(f"{loose.url}/batch/{created.id}").json()
            raw.append(answer)
            seen.append(BatchStatus.model_validate(answer))
            assert len(seen) < 10
        assert [s.status for s in seen] == ["queued", "chunking", "processing", "completed"]
        for answer in raw[:2]:
            assert answer["progress"] is None and answer["outputs"] is None
            assert answer["object"] == "batch" and answer["usage"] is None
        assert isinstance(raw[2]["progress"]["total"], float) and raw[2]["progress"]["eta"] is None
        assert seen[2].total == 5 and 0 <= seen[2].completed < 5
        final = seen[-1]
        assert all(isinstance(u, str) for u in raw[-1]["outputs"])
        assert isinstance(raw[-1]["usage"]["input_tokens"], float)
        assert (final.total, final.completed, final.failed) == (5, 4, 1)
        assert final.input_tokens and final.input_tokens > 0
        assert [o.index for o in final.outputs] == [0, 1, 2]
        rows = [json.loads(x) for o in final.outputs for x in client.download(o).splitlines()]
        assert sorted(r["line_index"] for r in rows) == list(range(5))
        for r in rows:
            if r["id"] == "broken":
                assert r["error"]["code"] == "image_decode_failed"
            else:
                assert r["result"] == infer(json.loads(lines[r["line_index"]]))[0]

        # A failed line shows ``failed``; with none failed it is left out.
        listed = list(client.iter_batches())
        assert [b["id"] for b in listed] == [final.id]
        assert listed[0]["progress"]["failed"] == 1.0
        assert (BatchStatus.model_validate(listed[0]).outputs[0].url.split("?")[0]
                == final.outputs[0].url.split("?")[0])  # the signature renews each second
        [warned] = warnings(caplog)
        assert "'queued'" in warned
    finally:
        client.close()
        http.close()


def test_default_emulator_answers_are_unchanged():
    with EmulatorServer(EmulatorConfig(api_key=API_KEY, chunking_seconds=0, processing_seconds=0,
                                       min_part_size=0)) as server:
        client = BatchClient(server.url, API_KEY, timeout=10, max_attempts=2)
        try:
            up = client.create_upload()
            assert up.key
            part = client.upload_part(up.file_id, up.upload_id, 1,
                                      encode_line("a", jpeg_bytes(), b'"skill":"caption"'))
            created = client.complete_upload(up.file_id, up.upload_id, [part])
            assert created.model_extra == {"size": created.model_extra["size"]}
            for _ in range(100):
                body = httpx.get(f"{server.url}/batch/{created.id}",
                                 headers={"X-Moondream-Auth": API_KEY}).json()
                assert body["status"] in ("chunking", "processing", "completed")
                if body["status"] == "completed":
                    break
                time.sleep(0.01)
            assert body["status"] == "completed" and body["outputs"][0]["index"] == 0
            assert body["progress"] == {"total": 1, "completed": 1, "failed": 0}
            assert set(body) == {"id", "status", "model", "created_at", "progress", "completed_at",
                                 "usage", "outputs", "expires_at"}
        finally:
            client.close()
