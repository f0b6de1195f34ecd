"""The fal provider's pure pieces: what is sent to each endpoint (strict), how answers are read
(liberal), the moondream-next/batch archive reading, and when the next step comes."""

from __future__ import annotations

import io
import json
import time
import zipfile
from types import SimpleNamespace

import pytest

from moonbatch.workers.models import RunSpec, SkillOptions
from moonbatch.workers.providers.fal import FalProvider
from moonbatch.workers.providers.fal.endpoints import ENDPOINTS, check_options
from moonbatch.workers.providers.fal.ledger import next_step_in as _next_step_in
from moonbatch.workers.providers.fal.payloads import (
    archive_answers,
    build_archive,
    member_name,
    normalize_single,
    request_payload,
)


def spec(endpoint: str | None, **options) -> RunSpec:
    return RunSpec(run_id="r", input="s3://b/in/", output="s3://b/out/",
                   options=SkillOptions(**options), shard_size=100, max_shard_bytes=10**9,
                   created_at=0, provider="fal", endpoint=endpoint)


@pytest.mark.parametrize(("endpoint", "options", "body"), [
    ("fal-ai/moondream3-preview/caption", {"skill": "caption", "length": "long", "top_p": 0.5},
     {"image_url": "U", "length": "long", "top_p": 0.5}),
    ("fal-ai/moondream3-preview/query", {"skill": "query", "question": "Q?", "reasoning": False},
     {"image_url": "U", "prompt": "Q?", "reasoning": False}),
    ("fal-ai/moondream3-preview/detect", {"skill": "detect", "object": "cat"},
     {"image_url": "U", "prompt": "cat"}),
    ("fal-ai/moondream3-preview/point", {"skill": "point", "object": "eye"},
     {"image_url": "U", "prompt": "eye"}),
    ("fal-ai/moondream2/visual-query", {"skill": "caption", "length": "short"},
     {"image_url": "U", "prompt": "Describe this image in one sentence."}),
    ("fal-ai/moondream/batched", {"skill": "query", "question": "Q?", "max_tokens": 64},
     {"inputs": [{"image_url": "U", "prompt": "Q?"}, {"image_url": "V", "prompt": "Q?"}],
      "max_tokens": 64}),
    ("fal-ai/moondream-next/batch", {"skill": "caption"},
     {"images_data_url": "U", "prompt": "Describe this image."}),
])
def test_payloads_carry_only_what_the_endpoint_takes(endpoint, options, body):
    from moonbatch.emulator.fal import validate_input

    opts = SkillOptions(**options)
    images = ["U", "V"] if endpoint.endswith("batched") else ["U"]
    got = request_payload(ENDPOINTS[endpoint], opts, images)
    assert got == body
    _, errors = validate_input(endpoint, got)  # the emulator's copy of fal's schemas
    assert errors == []


@pytest.mark.parametrize(("endpoint", "options", "says"), [
    ("fal-ai/moondream3-preview/caption", {"skill": "query", "question": "Q"},
     "serves --skill caption, not query: use --endpoint"),
    ("fal-ai/moondream-next/batch", {"skill": "detect", "object": "x"}, "not detect"),
    ("fal-ai/moondream2/visual-query", {"skill": "query", "question": "Q", "temperature": 0.5},
     "does not take --temperature"),
    ("fal-ai/moondream3-preview/query", {"skill": "query", "question": "Q", "temperature": 1.5},
     "--temperature within 0..1"),
    ("fal-ai/moondream/batched", {"skill": "caption", "max_tokens": 8}, "within 32..1024"),
    ("fal-ai/moondream-next/batch", {"skill": "caption", "max_tokens": 600}, "within 1..512"),
])
def test_refusals_name_the_endpoint_and_the_fix(endpoint, options, says):
    with pytest.raises(ValueError, match="fal endpoint") as err:
        check_options(ENDPOINTS[endpoint], SkillOptions(**options))
    assert says in str(err.value) and "\n" not in str(err.value)


def test_unknown_endpoint_and_default():
    with pytest.raises(ValueError, match="unknown fal endpoint"):
        FalProvider().check_spec(spec("fal-ai/nope", skill="caption"))
    FalProvider().check_spec(spec(None, skill="point", object="eye"))  # moondream3-preview/point


def test_answers_are_read_liberally():
    ep = ENDPOINTS["fal-ai/moondream3-preview/query"]
    result, usage = normalize_single(ep, "query", {
        "output": "yes", "reasoning": "because", "usage_info": {"input_tokens": "12",
                                                              "output_tokens": None},
        "extra": [1, 2]})
    assert result["answer"] == "yes" and result["reasoning"] == {"text": "because"}
    assert result["raw"] == {"output": "yes", "reasoning": "because", "extra": [1, 2]}
    assert usage == {"input_tokens": 12}  # a numeric string is a count; a null is no count
    result, usage = normalize_single(ENDPOINTS["fal-ai/moondream3-preview/detect"], "detect",
                                     {"objects": None, "usage_info": None})
    assert result["objects"] == [] and usage == {}
    result, _ = normalize_single(ep, "query", {"output": "x", "reasoning": {"text": "t",
                                                                         "grounding": []}})
    assert result["reasoning"] == {"text": "t", "grounding": []}


def test_archive_answers_prefer_captions_file_then_outputs_in_order():
    names = [member_name(3, "JPEG"), member_name(7, "PNG"), member_name(9, "GIF")]
    assert names == ["000003.jpg", "000007.png", "000009.gif"]
    with zipfile.ZipFile(io.BytesIO(build_archive([(n, b"x") for n in names]))) as zf:
        assert zf.namelist() == names  # members in request order, stored as named
    files = {"u": json.dumps({"000009.gif": "c", "images/000003.jpg": "a"}).encode()}
    got = archive_answers({"captions_file": {"url": "u"}, "outputs": ["z", "z", "z"]}, names,
                          files.__getitem__)
    assert got == {"000003.jpg": "a", "000009.gif": "c"}  # 000007 has no answer: missing
    got = archive_answers({"outputs": ["a", "b"]}, names, files.__getitem__)
    assert got == {"000003.jpg": "a", "000007.png": "b"}  # fallback: archive order

    def broken(url: str) -> bytes:
        return b"not json"

    got = archive_answers({"captions_file": {"url": "u"}, "outputs": ["a", "b", "c"]}, names,
                          broken)
    assert got == dict(zip(names, ["a", "b", "c"], strict=True))


def test_next_step_comes_when_requests_should_finish_within_bounds():
    settings = SimpleNamespace(poll_min_interval=0.1, poll_max_interval=120.0)
    now = time.time()
    ledger = {"inflight": {"0": {"sent_at": now - 0.5}}, "est": 2.0, "backoff_until": 0,
              "resend": [], "cursor": 5, "lines": 5}
    assert 1.3 < _next_step_in(ledger, settings) <= 1.5  # expected at 2.0 s
    ledger["inflight"] = {"0": {"sent_at": now - 1000}}  # long overdue: never past 60 s
    assert _next_step_in(ledger, settings) == 60.0  # fal keeps big results 6 minutes
    ledger["inflight"] = {}
    ledger["backoff_until"] = now + 5
    assert 4.5 < _next_step_in(ledger, settings) <= 5.0
