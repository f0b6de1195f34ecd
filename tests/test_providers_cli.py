"""The command line's side of providers: ``--provider``/``--endpoint`` refusals, ``--dry-run``
numbers on local and S3 INPUT for both providers, the preflight of the run's provider's key,
and the provider in ``status``.

Over real connections, as everywhere: real ``moonbatch`` processes, moto's S3 server, the
session's Redis, the emulator's fal queue over HTTP.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest

from tests.conftest import jpeg_bytes, read_json, run_cli, upload_photos
from tests.test_cli import closed_port, nothing_under, preflight_fails

#: The seven fal endpoints: (id, skill options to pass, images per request, priced?).
FAL_ENDPOINTS = [
    ("fal-ai/moondream3-preview/caption", ["--skill", "caption"], 1, True),
    ("fal-ai/moondream3-preview/query", ["--skill", "query", "--question", "Cat?"], 1, True),
    ("fal-ai/moondream3-preview/detect", ["--skill", "detect", "--object", "cat"], 1, True),
    ("fal-ai/moondream3-preview/point", ["--skill", "point", "--object", "cat"], 1, True),
    ("fal-ai/moondream2/visual-query", ["--skill", "query", "--question", "Cat?"], 1, False),
    ("fal-ai/moondream/batched", ["--skill", "caption"], 32, False),
    ("fal-ai/moondream-next/batch", ["--skill", "caption"], 32, True),
]
N_IMAGES, SHARD_SIZE = 40, 35  # shards of 35 and 5: a batched endpoint sends 2 + 1 requests


def keyless(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``env`` with no key of any provider, a broker nobody listens on and a state location
    that must stay empty: a dry run needs none of them."""
    out = {k: v for k, v in env.items() if k not in ("MOONDREAM_API_KEY", "FAL_KEY")}
    port = closed_port()
    return {**out, "MOONBATCH_BROKER_URL": f"redis://127.0.0.1:{port}/0",
            "MOONBATCH_RESULT_BACKEND": f"redis://127.0.0.1:{port}/1",
            "MOONBATCH_STATE_URL": str(tmp_path / "state"), "MOONBATCH_PROVIDER": "moondream"}


def dry(args: list[str], env: dict[str, str]) -> dict:
    """Run a ``--dry-run --json``; exit 0; return its report."""
    proc = run_cli([*args, "--dry-run", "--json"], env, timeout=60)
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def local_input(tmp_path: Path) -> Path:
    """``N_IMAGES`` small JPEGs and one sidecar under a local folder."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for i in range(N_IMAGES):
        (folder / ("sub" if i % 2 else "") / f"img-{i:03d}.jpg").write_bytes(
            jpeg_bytes(color=(i * 5, 100, 200)))
    (folder / "labels.json").write_text("{}")
    return folder


def expected_requests(per_request: int) -> int:
    shards = [SHARD_SIZE, N_IMAGES - SHARD_SIZE]
    return sum(math.ceil(n / per_request) for n in shards)


# -- dry run --------------------------------------------------------------------------------------
def test_dry_run_local_batch_api(env, tmp_path, local_input):
    e = keyless(env, tmp_path)
    out = tmp_path / "out"
    for command in ("run", "submit"):
        report = dry([command, str(local_input), str(out), "--shard-size", str(SHARD_SIZE)], e)
        assert report["provider"] == "moondream" and report["endpoint"] is None
        assert (report["items"], report["skipped"], report["listed"]) == (N_IMAGES, 1, N_IMAGES + 1)
        assert report["shards"] == 2 and report["requests"] == 2  # one batch per shard
        size = sum(p.stat().st_size for p in local_input.rglob("*.jpg"))
        assert report["image_bytes"] == size and report["upload_bytes"] > size  # base64
        assert report["input_tokens"] > 0 and report["output_tokens"] > 0
        assert report["cost_usd"] > 0 and "moondream3-preview batch: $0.15/M input" in report["basis"]
    # The text form names the figures and says nothing was written.
    proc = run_cli(["run", str(local_input), str(out), "--dry-run"], e)
    assert "nothing was written" in proc.stderr
    for label in ("items", "shards", "batches", "upload bytes", "input tokens (estimate)",
                  "cost (USD, estimate)", "basis"):
        assert label in proc.stdout, label
    assert not out.exists() and not (tmp_path / "state").exists()


@pytest.mark.parametrize("endpoint,options,per_request,priced", FAL_ENDPOINTS,
                         ids=[e[0].removeprefix("fal-ai/") for e in FAL_ENDPOINTS])
def test_dry_run_local_fal(env, tmp_path, local_input, endpoint, options, per_request, priced):
    e = keyless(env, tmp_path)
    out = tmp_path / "out"
    report = dry(["run", str(local_input), str(out), "--provider", "fal", "--endpoint", endpoint,
                  "--shard-size", str(SHARD_SIZE), *options], e)
    assert report["provider"] == "fal" and report["endpoint"] == endpoint
    assert report["items"] == N_IMAGES and report["skipped"] == 1 and report["shards"] == 2
    assert report["requests"] == expected_requests(per_request)
    if priced:
        assert report["cost_usd"] > 0
    else:
        assert report["cost_usd"] is None and "no published price" in report["basis"]
    if endpoint.endswith("moondream-next/batch"):
        assert report["compute_seconds"] > 0 and report["upload_bytes"] > report["image_bytes"]
    text = run_cli(["run", str(local_input), str(out), "--provider", "fal", "--endpoint",
                    endpoint, *options, "--dry-run"], e).stdout
    assert "requests" in text and endpoint in text
    assert ("no published price" in text) != priced
    assert not out.exists() and not (tmp_path / "state").exists()


def test_dry_run_default_endpoint_follows_the_skill(env, tmp_path, local_input):
    e = {**keyless(env, tmp_path), "MOONBATCH_PROVIDER": "fal"}  # the default --provider
    report = dry(["submit", str(local_input), str(tmp_path / "out"), "--skill", "detect",
                  "--object", "cat"], e)
    assert report["provider"] == "fal"
    assert report["endpoint"] == "fal-ai/moondream3-preview/detect"
    assert report["requests"] == N_IMAGES


def test_dry_run_local_fal_counts_data_uri_bytes(env, tmp_path, local_input):
    report = dry(["run", str(local_input), str(tmp_path / "out"), "--provider", "fal"],
                 keyless(env, tmp_path))
    assert report["upload_bytes"] > report["image_bytes"]


def test_dry_run_s3_both_providers(s3, bucket, env, tmp_path):
    photos = upload_photos(s3, bucket, "in/")
    s3.put_object(Bucket=bucket, Key="in/meta.parquet", Body=b"PAR1")
    e = {**keyless(env, tmp_path), "MOONBATCH_STATE_URL": f"s3://{bucket}/state/"}
    args = [f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--shard-size", "4"]
    n = len(photos)
    shards = math.ceil(n / 4)

    moon = dry(["run", *args], e)
    assert (moon["items"], moon["skipped"], moon["shards"]) == (n, 1, shards)
    assert moon["requests"] == shards and moon["cost_usd"] > 0
    assert moon["image_bytes"] == sum(len(b) for b in photos.values())

    fal = dry(["submit", *args, "--provider", "fal"], e)
    assert (fal["items"], fal["shards"], fal["requests"]) == (n, shards, n)
    assert fal["upload_bytes"] == 0  # the stored bytes go as presigned URLs
    assert fal["cost_usd"] > 0

    batched = dry(["run", *args, "--provider", "fal", "--endpoint", "fal-ai/moondream/batched"], e)
    assert batched["requests"] == shards and batched["cost_usd"] is None

    assert nothing_under(s3, bucket, "out/") and nothing_under(s3, bucket, "state/")


def test_dry_run_of_an_empty_or_missing_input(env, tmp_path):
    e = keyless(env, tmp_path)
    (tmp_path / "empty").mkdir()
    proc = run_cli(["run", str(tmp_path / "empty"), str(tmp_path / "out"), "--dry-run"], e,
                   check=False)
    assert proc.returncode == 3 and "--allow-empty" in proc.stderr
    report = dry(["run", str(tmp_path / "empty"), str(tmp_path / "out"), "--allow-empty"], e)
    assert (report["items"], report["shards"], report["requests"]) == (0, 0, 0)
    proc = run_cli(["run", str(tmp_path / "nope"), str(tmp_path / "out"), "--dry-run"], e,
                   check=False)
    assert proc.returncode == 3 and "does not exist" in proc.stderr
    proc = run_cli(["run", str(tmp_path / "empty"), str(tmp_path / "out"), "--json"], e,
                   check=False)
    assert proc.returncode == 2 and "--json applies to --dry-run only" in proc.stderr


# -- refusals ------------------------------------------------------------------------------------
def refused(args: list[str], env: dict[str, str]) -> str:
    """A command refused as a usage error: exit 2, one line, no traceback; its line."""
    proc = run_cli(args, env, check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc.stderr.strip()


def test_refusals_name_the_endpoint_the_cause_and_the_fix(env, tmp_path, local_input):
    e = keyless(env, tmp_path)
    io = [str(local_input), str(tmp_path / "out")]
    for command in (["run", *io], ["submit", *io], ["run", *io, "--dry-run"],
                    ["demo", "--output", str(tmp_path / "demo")]):
        line = refused([*command, "--provider", "fal", "--endpoint",
                        "fal-ai/moondream3-preview/caption", "--skill", "query", "--question",
                        "Cat?"], e)
        assert line.startswith("error: fal endpoint fal-ai/moondream3-preview/caption serves "
                               "--skill caption, not query: use --endpoint "), line
        assert "fal-ai/moondream3-preview/query" in line
    line = refused(["run", *io, "--provider", "fal", "--endpoint",
                    "fal-ai/moondream3-preview/caption", "--max-tokens", "50"], e)
    assert line == ("error: fal endpoint fal-ai/moondream3-preview/caption does not take "
                    "--max-tokens: leave it out")
    line = refused(["run", *io, "--provider", "fal", "--endpoint", "fal-ai/moondream/batched",
                    "--max-tokens", "5000"], e)
    assert "--max-tokens within 32..1024" in line
    line = refused(["submit", *io, "--endpoint", "fal-ai/moondream/batched"], e)
    assert line == ("error: --endpoint applies to --provider fal only: leave it out, or add "
                    "--provider fal")
    line = refused(["run", *io, "--provider", "fal", "--endpoint", "fal-ai/nope"], e)
    assert "unknown fal endpoint 'fal-ai/nope'" in line
    line = refused(["run", *io, "--provider", "replicate"], e)
    assert "unknown provider 'replicate': choose one of moondream, fal" in line
    line = refused(["run", *io, "--shard-size", "100001"], e)
    assert line.endswith("(the Batch API's line limit)")
    line = refused(["run", *io, "--provider", "fal", "--shard-size", "0"], e)
    assert "--shard-size must be within 1..100000" in line and "--provider fal" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "demo").exists()
    assert not (tmp_path / "state").exists()


# -- preflight: the run's provider's key, and only it ---------------------------------------------
def fal_env(env: dict[str, str], emulator, key: str | None) -> dict[str, str]:
    """``env`` for a fal run against the emulator's fal queue, without MOONDREAM_API_KEY."""
    out = {k: v for k, v in env.items() if k not in ("MOONDREAM_API_KEY", "FAL_KEY")}
    out.update(MOONBATCH_FAL_QUEUE_URL=emulator.fal_url, MOONBATCH_PROVIDER="moondream",
               MOONBATCH_QUEUE="t-" + uuid.uuid4().hex[:8])  # a queue no worker takes
    if key is not None:
        out["FAL_KEY"] = key
    return out


def test_wrong_fal_key_fails_the_preflight(s3, bucket, env, emulator):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    wrong = "wrong-" + uuid.uuid4().hex
    args = ["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--provider", "fal",
            "--workers", "1"]
    proc = preflight_fails(args, fal_env(env, emulator, wrong), "wrong FAL_KEY")
    assert proc.stderr.strip() == (f"error: FAL key: fal at {emulator.fal_url} refused the key "
                                   "in FAL_KEY: set a valid key (https://fal.ai/dashboard/keys)")
    assert wrong not in proc.stderr + proc.stdout
    proc = preflight_fails(args, fal_env(env, emulator, None), "no FAL_KEY")
    assert proc.stderr.startswith("error: FAL key: FAL_KEY is not set: export FAL_KEY=")
    assert nothing_under(s3, bucket, "out/")


def test_each_provider_needs_only_its_own_key(s3, bucket, env, emulator):
    upload_photos(s3, bucket, "in/", names=("coffee.png", "rocket.jpg"))
    e = fal_env(env, emulator, emulator.config.fal_key)  # no MOONDREAM_API_KEY
    proc = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/fal/", "--provider", "fal"], e)
    run_id = proc.stdout.strip().splitlines()[-1]
    spec = read_json(s3, bucket, "fal/_moonbatch/spec.json")
    assert (spec["provider"], spec["endpoint"]) == ("fal", "fal-ai/moondream3-preview/caption")
    status = run_cli(["status", run_id], e).stdout
    assert "provider fal (fal-ai/moondream3-preview/caption)" in status
    assert json.loads(run_cli(["status", run_id, "--json"], e).stdout)["provider"] == "fal"
    # The same command with another provider is another command.
    proc = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/fal/", "--provider", "fal",
                    "--endpoint", "fal-ai/moondream/batched"], e, check=False)
    assert proc.returncode == 3 and "endpoint: fal-ai/moondream3-preview/caption → " \
        "fal-ai/moondream/batched" in proc.stderr

    # A Batch API run with a wrong FAL_KEY: fal's key is not checked.
    moon = {**env, "FAL_KEY": "wrong", "MOONBATCH_FAL_QUEUE_URL": emulator.fal_url,
            "MOONBATCH_QUEUE": "t-" + uuid.uuid4().hex[:8]}
    run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/moon/"],
                     moon).stdout.strip().splitlines()[-1]
    assert "provider moondream (Batch API)" in run_cli(["status", run_id], moon).stdout


def test_run_with_fal_end_to_end_on_s3(s3, bucket, env, emulator):
    """``moonbatch run --provider fal`` with local workers against the emulator's fal queue:
    images go as presigned URLs of moto's S3, results land once each, the summary names fal."""
    from tests.conftest import read_results

    photos = upload_photos(s3, bucket, "in/", names=("coffee.png", "rocket.jpg", "chelsea.png"))
    e = fal_env(env, emulator, emulator.config.fal_key)
    proc = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--provider", "fal",
                    "--workers", "1", "--timeout", "120"], e, timeout=180)
    assert "fal (fal-ai/moondream3-preview/caption)" in proc.stdout
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["status"] == "completed" and summary["provider"] == "fal"
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(photos)
    assert all(r["status"] == "ok" and r["result"]["caption"] for r in rows), rows
