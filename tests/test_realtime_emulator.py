"""The emulator's Moondream real-time routes (``emulator.realtime``; FACTS.md "real-time API")
over real HTTP: the official ``moondream`` client (``md.vl(endpoint=..., api_key=...)``) calls
all five skills against it, as Moondream Cloud (a key) and as Moondream Station (none); raw httpx
checks what the client hides (usage, status codes, Retry-After). Nothing is mocked."""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys
import urllib.error
from pathlib import Path

import httpx
import pytest
from PIL import Image

from moonbatch.emulator import RealtimeConfig, RealtimeFaults, expected_answer, expected_usage
from tests.conftest import free_port, photos_dir, wait_for_healthz

md = pytest.importorskip("moondream")

PHOTOS = ("coffee.png", "rocket.jpg")


def _encoded(name: str):
    """The photo as the official client sends it (JPEG quality 95, a data URI), and its bytes."""
    client = md.vl(endpoint="http://unused.invalid/v1", api_key="x")
    enc = client.encode_image(Image.open(photos_dir() / name))
    return enc, base64.b64decode(enc.image_url.split(",", 1)[1])


def _found(data: bytes) -> str:
    """An object name for which the emulator finds something in ``data`` (answers are a
    function of the pixels and the object: some names find nothing)."""
    for what in ("cup", "mug", "rocket", "spoon", "window", "person", "tree", "cloud", "handle"):
        if expected_answer("segment", {"object": what}, data)["bbox"] is not None:
            return what
    raise AssertionError("no object name finds anything")


@pytest.mark.parametrize("name", PHOTOS)
def test_official_client_calls_all_five_skills(emulator, name: str) -> None:
    emulator.config.realtime = RealtimeConfig()
    client = md.vl(endpoint=emulator.url, api_key=emulator.config.api_key)
    image, data = _encoded(name)
    what = _found(data)
    refs = [[0.5, 0.5], [0.1, 0.2, 0.6, 0.7]]

    for length in ("short", "normal", "long"):
        assert client.caption(image, length=length) == \
            expected_answer("caption", {"length": length}, data)
    assert client.query(image, "What is this?") == \
        expected_answer("query", {"question": "What is this?"}, data)
    with_reasoning = client.query(image, "What is this?", reasoning=True, spatial_refs=refs)
    assert with_reasoning == expected_answer(
        "query", {"question": "What is this?", "reasoning": True, "spatial_refs": refs}, data)
    assert "reasoning" in with_reasoning and with_reasoning["answer"] != \
        expected_answer("query", {"question": "What is this?"}, data)["answer"]
    detected = client.detect(image, what)
    assert detected == expected_answer("detect", {"object": what}, data)
    assert client.point(image, what) == expected_answer("point", {"object": what}, data)
    assert client.point(image, what, spatial_refs=refs) == \
        expected_answer("point", {"object": what, "spatial_refs": refs}, data)

    segment = client.segment(image, what)
    assert segment == expected_answer("segment", {"object": what}, data)
    # The mask's box is detect's first box of the same object, and the path lies inside it.
    assert segment["bbox"] == detected["objects"][0]
    assert re.fullmatch(r"M [0-9. ]+( [LC] [0-9. ]+)+", segment["path"])
    numbers = [float(v) for v in re.findall(r"[0-9.]+", segment["path"])]
    xs, ys = numbers[0::2], numbers[1::2]
    box = segment["bbox"]
    assert (min(xs), min(ys), max(xs), max(ys)) == pytest.approx(
        (box["x_min"], box["y_min"], box["x_max"], box["y_max"]), abs=1e-4)
    with_refs = client.segment(image, what, spatial_refs=refs)
    assert with_refs == expected_answer("segment", {"object": what, "spatial_refs": refs}, data)

    # Every call arrived with the key.
    assert all(s["keyed"] for s in emulator.emulator.realtime.seen[-10:])


def test_usage_and_fields_as_the_api_reports_them(emulator) -> None:
    emulator.config.realtime = RealtimeConfig()
    image, data = _encoded("coffee.png")
    what = _found(data)
    auth = {"X-Moondream-Auth": emulator.config.api_key}
    calls = {"caption": {"length": "normal", "stream": False},
             "query": {"question": "Colour?", "stream": False},
             "detect": {"object": what}, "point": {"object": what},
             "segment": {"object": what, "stream": False}}
    with httpx.Client(timeout=30, headers=auth) as http:
        for skill, fields in calls.items():
            r = http.post(f"{emulator.url}/{skill}", json={"image_url": image.image_url, **fields})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["request_id"]
            want = expected_usage(skill, fields, data)
            assert {k: body["metrics"][k] for k in want} == want
            assert want["input_tokens"] > 0 and want["output_tokens"] > 0
            for key, value in expected_answer(skill, fields, data).items():
                assert body[key] == value
        # A model from the table, and a finetune of it, are taken; an unknown one is a 400.
        ok = http.post(f"{emulator.url}/detect", json={
            "image_url": image.image_url, "object": what,
            "model": "moondream3-preview/ft_123@100"})
        assert ok.status_code == 200
        bad = http.post(f"{emulator.url}/detect", json={
            "image_url": image.image_url, "object": what, "model": "gpt-9"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_model"
        # A request without its required field names it.
        r = http.post(f"{emulator.url}/segment", json={"image_url": image.image_url})
        assert r.status_code == 400 and r.json()["error"]["param"] == "object"


def test_streaming_answers(emulator) -> None:
    emulator.config.realtime = RealtimeConfig()
    client = md.vl(endpoint=emulator.url, api_key=emulator.config.api_key)
    image, data = _encoded("rocket.jpg")
    what = _found(data)
    caption = "".join(client.caption(image, length="long", stream=True)["caption"])
    assert caption == expected_answer("caption", {"length": "long"}, data)["caption"]
    answer = "".join(client.query(image, "Is it a rocket?", stream=True)["answer"])
    assert answer == expected_answer("query", {"question": "Is it a rocket?"}, data)["answer"]
    updates = list(client.segment(image, what, stream=True))
    want = expected_answer("segment", {"object": what}, data)
    assert updates[0] == {"bbox": want["bbox"]}
    assert "".join(u.get("chunk", "") for u in updates) == want["path"]
    assert updates[-1] == {"path": want["path"], "bbox": want["bbox"], "completed": True}


def test_station_needs_no_key_and_cloud_refuses_none(emulator) -> None:
    image, data = _encoded("coffee.png")
    # Moondream Station: no key at all.
    emulator.config.realtime = RealtimeConfig(require_key=False)
    station = md.vl(endpoint=emulator.url)
    assert station.caption(image) == expected_answer("caption", {"length": "normal"}, data)
    assert emulator.emulator.realtime.seen[-1]["keyed"] is False
    # Moondream Cloud: none, or a wrong one, is a 401 (the client raises the HTTP error).
    emulator.config.realtime = RealtimeConfig(require_key=True)
    for client in (md.vl(endpoint=emulator.url), md.vl(endpoint=emulator.url, api_key="wrong")):
        with pytest.raises(urllib.error.HTTPError) as caught:
            client.caption(image)
        assert caught.value.code == 401
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{emulator.url}/point", json={"image_url": image.image_url, "object": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_rate_limit_answers_429_with_retry_after(emulator) -> None:
    # One request per 5 s (a bucket of one): the second at once is refused, whatever the load.
    emulator.config.realtime = RealtimeConfig(rate_limit=0.2)
    image, _ = _encoded("coffee.png")
    auth = {"X-Moondream-Auth": emulator.config.api_key}
    before = emulator.emulator.realtime.injected["rate_limited"]
    with httpx.Client(timeout=30, headers=auth) as http:
        body = {"image_url": image.image_url, "length": "short"}
        first = http.post(f"{emulator.url}/caption", json=body)
        second = http.post(f"{emulator.url}/caption", json=body)
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "rate_limited"
    assert 0 < float(second.headers["Retry-After"]) <= 5
    assert emulator.emulator.realtime.injected["rate_limited"] == before + 1
    client = md.vl(endpoint=emulator.url, api_key=emulator.config.api_key)
    with pytest.raises(urllib.error.HTTPError) as caught:
        client.caption(image)
    assert caught.value.code == 429


def test_fault_knobs(emulator) -> None:
    image, _ = _encoded("coffee.png")
    auth = {"X-Moondream-Auth": emulator.config.api_key}
    body = {"image_url": image.image_url, "object": "cup"}
    injected = emulator.emulator.realtime.injected
    with httpx.Client(timeout=30, headers=auth) as http:
        emulator.config.realtime = RealtimeConfig(faults=RealtimeFaults(rate_429=1.0,
                                                                        retry_after=2))
        r = http.post(f"{emulator.url}/detect", json=body)
        assert r.status_code == 429 and r.headers["Retry-After"] == "2"
        emulator.config.realtime = RealtimeConfig(faults=RealtimeFaults(rate_5xx=1.0))
        r = http.post(f"{emulator.url}/detect", json=body)
        assert r.status_code in (500, 502, 503) and r.json()["error"]["type"] == "server_error"
        emulator.config.realtime = RealtimeConfig(faults=RealtimeFaults(rate_drop=1.0))
        with pytest.raises(httpx.TransportError):
            http.post(f"{emulator.url}/detect", json=body)
        # Faults come after the key check: a wrong key is a 401 whatever the faults.
        r = http.post(f"{emulator.url}/detect", json=body, headers={"X-Moondream-Auth": "no"})
        assert r.status_code == 401
        emulator.config.realtime = RealtimeConfig()
        assert http.post(f"{emulator.url}/detect", json=body).status_code == 200
    assert injected["429"] >= 1 and injected["5xx"] >= 1 and injected["drop"] >= 1
    with pytest.raises(ValueError):
        RealtimeFaults(rate_429=0.8, rate_5xx=0.5)


def test_emulator_command_serves_station_without_key() -> None:
    """``moonbatch emulator --realtime-no-key``: the real-time routes need no key, as Moondream
    Station's; the Batch API still does."""
    port = free_port()
    # ``python -m moonbatch`` from this checkout: its code, not another install's.
    proc = subprocess.Popen([sys.executable, "-m", "moonbatch", "emulator", "--port", str(port),
                             "--api-key", "k", "--realtime-no-key"],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_healthz(port, proc)
        image, data = _encoded("coffee.png")
        station = md.vl(endpoint=f"http://127.0.0.1:{port}/v1")
        assert station.caption(image) == expected_answer("caption", {"length": "normal"}, data)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/batch", timeout=10).status_code == 401
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "real-time API emulator" in stderr and "no key needed" in stderr
