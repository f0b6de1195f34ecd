"""The fal provider end to end: S3 (moto) → producer → Redis → real Celery workers → the emulated
fal queue over HTTP → merged results in S3, for every endpoint of the seeds; each row is checked
against the answer the emulator computes from the image it came from."""

from __future__ import annotations

import pytest

from tests.conftest import read_results, upload_photos, wait_for_run

# endpoint → (skill options, fal arguments the emulator is expected to have been sent)
CASES = {
    "fal-ai/moondream3-preview/caption": ({"skill": "caption", "length": "short"},
                                          {"length": "short"}),
    "fal-ai/moondream3-preview/query": ({"skill": "query", "question": "What is shown?"},
                                        {"prompt": "What is shown?"}),
    "fal-ai/moondream3-preview/detect": ({"skill": "detect", "object": "face"}, {"prompt": "face"}),
    "fal-ai/moondream3-preview/point": ({"skill": "point", "object": "eye"}, {"prompt": "eye"}),
    "fal-ai/moondream2/visual-query": ({"skill": "query", "question": "What is shown?"},
                                       {"prompt": "What is shown?"}),
    "fal-ai/moondream/batched": ({"skill": "caption"}, {"prompt": "Describe this image."}),
    "fal-ai/moondream-next/batch": ({"skill": "query", "question": "Any animal?", "max_tokens": 512},
                                    {"prompt": "Any animal?", "max_tokens": 512}),
}


def start(env, input_url: str, output_url: str, endpoint: str, options: dict, **spec) -> str:
    """``moonbatch submit INPUT OUTPUT --provider fal --endpoint ENDPOINT ...`` for the session
    fleet; returns the run id. ``options`` are skill options, ``spec`` ``shard_size`` and
    ``max_pixels``."""
    from tests.conftest import run_cli

    args = ["submit", input_url, output_url, "--provider", "fal", "--endpoint", endpoint]
    for name, value in {**options, **spec}.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return run_cli(args, env).stdout.strip().splitlines()[-1]


def expected_row(endpoint: str, args: dict, image: bytes, skill: str) -> tuple[dict, dict]:
    """``(result without raw, usage)`` the emulator's answer for this image gives."""
    from moonbatch.emulator.fal import expected_output

    if endpoint.endswith("/batched"):
        out = expected_output(endpoint, {"inputs": [{"image_url": "x", "prompt": args["prompt"]}]},
                              [("x", image)])
        text = out["outputs"][0]
        return ({"caption": text} if skill == "caption" else {"answer": text}), {}
    if endpoint.endswith("next/batch"):
        out = expected_output(endpoint, {"images_data_url": "x", **args}, [("000000.png", image)])
        text = out["outputs"][0]
        return ({"caption": text} if skill == "caption" else {"answer": text}), {}
    out = expected_output(endpoint, {"image_url": "x", **args}, [image])
    usage = {k: out["usage_info"][k] for k in ("input_tokens", "output_tokens")} \
        if "usage_info" in out else {}
    if skill in ("detect", "point"):
        key = "objects" if skill == "detect" else "points"
        return {key: out[key]}, usage
    result = {"caption": out["output"]} if skill == "caption" else {"answer": out["output"]}
    if "reasoning" in out:
        result["reasoning"] = {"text": out["reasoning"]}
    return result, usage


@pytest.mark.parametrize("endpoint", list(CASES))
def test_every_endpoint_annotates_real_photographs(endpoint, s3, bucket, env, fleet):
    photos = upload_photos(s3, bucket, "photos/")
    options, args = CASES[endpoint]
    run_id = start(env, f"s3://{bucket}/photos/", f"s3://{bucket}/out/", endpoint, options,
                   shard_size=5)
    summary = wait_for_run(s3, bucket, "out/", timeout=120)
    assert summary["status"] == "completed", summary
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(photos)  # each exactly once
    for row in rows:
        assert row["status"] == "ok", row
        result, usage = expected_row(endpoint, args, photos[row["id"]], options["skill"])
        got = dict(row["result"])
        raw = got.pop("raw")
        assert got == result, (row["id"], got, result)  # the row came from this image
        assert isinstance(raw, dict) and raw
        assert row["usage"] == usage
    assert summary["counts"]["ok"] == len(photos)
    assert summary["run_id"] == run_id
