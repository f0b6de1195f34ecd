"""``moonbatch retry-failed`` and ``--skip-existing`` end to end, for both providers: real
photographs on moto's S3, the emulated Batch API and fal queue over HTTP, real Celery workers
(each command's own local workers on a queue of the test's own)."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import expected_result, photos_dir, read_json, read_results, run_cli, upload_photos

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "horse.png")
PROVIDERS = {"moondream": [], "fal": ["--provider", "fal"]}


def _env(env: dict[str, str]) -> dict[str, str]:
    """The session's environment with a broker queue nobody consumes: a submitted run waits
    until a command of the test starts workers for it."""
    return {**env, "MOONBATCH_QUEUE": "retry-" + uuid.uuid4().hex[:8]}


def _check_row(row: dict, photos: dict[str, bytes], provider: str) -> None:
    """An ok row came from its own image (the emulators answer from the pixels)."""
    assert row["status"] == "ok", row
    if provider == "moondream":
        assert row["result"] == expected_result(photos[row["id"]], {"skill": "caption"})
    else:
        assert row["result"]["caption"] and row["result"]["raw"]
    assert row["width"] and row["height"]


def _codes(s3, bucket: str, prefix: str) -> dict[str, str]:
    """{item id: error code} of the run's error rows."""
    return {r["id"]: r["error"]["code"] for r in read_results(s3, bucket, prefix)
            if r["status"] == "error"}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_retry_failed_replaces_error_rows_of_given_codes(provider, s3, bucket, env, fleet):
    photos = upload_photos(s3, bucket, "in/", PHOTOS[:4])
    s3.put_object(Bucket=bucket, Key="in/notes.jpg", Body=b"a text file with an image name\n")
    s3.put_object(Bucket=bucket, Key="in/broken.png", Body=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    out_url = f"s3://{bucket}/out/"
    run_cli(["run", f"s3://{bucket}/in/", out_url, "--shard-size", "2", "--workers", "0",
             "--timeout", "90", *PROVIDERS[provider]], env)
    run_id = read_json(s3, bucket, "out/run.json")["run_id"]
    assert _codes(s3, bucket, "out/") == {"notes.jpg": "not_an_image",
                                          "broken.png": "image_decode_failed"}

    proc = run_cli(["retry-failed", run_id, "not_an_image", "--dry-run"], env)
    assert "would retry 1 error row(s) in 1 shard(s): not_an_image 1" in proc.stdout
    assert "not retried: image_decode_failed 1" in proc.stdout
    assert read_json(s3, bucket, "out/run.json")["status"] == "completed"  # unchanged

    # The input is fixed; the fleet does the work, `wait` follows it.
    photos["notes.jpg"] = (photos_dir() / "coins.png").read_bytes()
    s3.put_object(Bucket=bucket, Key="in/notes.jpg", Body=photos["notes.jpg"])
    proc = run_cli(["retry-failed", out_url, "not_an_image"], env)
    assert f"run {run_id}: retry pass 1: 1 item(s) of 1 shard(s) sent again" in proc.stdout
    assert "completed" in run_cli(["wait", run_id, "--timeout", "90"], env).stdout

    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted([*photos, "broken.png"])  # once each
    for row in rows:
        if row["id"] != "broken.png":
            _check_row(row, photos, provider)
    assert _codes(s3, bucket, "out/") == {"broken.png": "image_decode_failed"}  # untouched
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["status"] == "completed"
    c = summary["counts"]
    assert (c["total"], c["ok"], c["error"], c["done"], c["in_flight"]) == (6, 5, 1, 6, 0)
    status = run_cli(["status", run_id], env).stdout
    assert "completed" in status and "ok 5, error 1" in status
    # Rows of every shard are in plan order still.
    for shard in range(summary["shards"]["total"]):
        plan = s3.get_object(Bucket=bucket, Key=f"out/_moonbatch/plan/shard-{shard:05d}.jsonl")
        res = s3.get_object(Bucket=bucket, Key=f"out/results/shard-{shard:05d}.jsonl")
        assert [json.loads(x)["id"] for x in plan["Body"].read().splitlines()] == \
            [json.loads(x)["id"] for x in res["Body"].read().splitlines()]

    proc = run_cli(["retry-failed", run_id, "not_an_image"], env)
    assert "no error rows with code not_an_image (its error rows: image_decode_failed 1): " \
           "nothing to retry" in proc.stdout


def test_retry_failed_with_local_workers_after_objects_vanished(s3, bucket, env):
    env = _env(env)
    photos = upload_photos(s3, bucket, "in/", PHOTOS)
    s3.put_object(Bucket=bucket, Key="in/broken.png", Body=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--shard-size",
                      "3"], env).stdout.strip().splitlines()[-1]
    proc = run_cli(["retry-failed", run_id], env, check=False)
    assert proc.returncode == 3 and "is not finished: wait for it" in proc.stderr
    gone = ("astronaut.png", "rocket.jpg")  # vanish between planning and the workers' reads
    for name in gone:
        s3.delete_object(Bucket=bucket, Key="in/" + name)
    run_cli(["wait", run_id, "--workers", "2", "--timeout", "90"], env)
    assert _codes(s3, bucket, "out/") == {"astronaut.png": "object_not_found",
                                          "rocket.jpg": "object_not_found",
                                          "broken.png": "image_decode_failed"}

    upload_photos(s3, bucket, "in/", gone)
    proc = run_cli(["retry-failed", run_id, "object_not_found", "read_failed", "--workers", "2",
                    "--timeout", "90"], env)
    assert "retry pass 1: 2 item(s) of 2 shard(s)" in proc.stdout and "completed" in proc.stdout
    rows = read_results(s3, bucket, "out/")
    assert len(rows) == len(PHOTOS) + 1
    for row in rows:
        if row["id"] != "broken.png":
            _check_row(row, photos, "moondream")
    assert read_json(s3, bucket, "out/run.json")["counts"]["ok"] == len(PHOTOS)
    for shard, rounds in ((0, 2), (1, 1), (2, 2)):  # the untouched shard kept its done.json
        done = read_json(s3, bucket, f"out/_moonbatch/shards/{shard:05d}/done.json")
        assert done["rounds"] == rounds


def test_a_stopped_retry_pass_is_finished_by_the_reconciler(s3, bucket, env, fleet):
    """A retry-failed that died after recording its pass: the reconciler reopens the run."""
    from config import get_settings
    from producer.runs import register_run
    from workers import retries
    from workers.runstate import open_run
    from workers.tasks import reconcile_run

    upload_photos(s3, bucket, "in/", PHOTOS[:2])
    s3.put_object(Bucket=bucket, Key="in/notes.jpg", Body=b"not an image")
    out_url = f"s3://{bucket}/out/"
    run_cli(["run", f"s3://{bucket}/in/", out_url, "--workers", "0", "--timeout", "90"], env)
    s3.put_object(Bucket=bucket, Key="in/notes.jpg", Body=(photos_dir() / "coins.png").read_bytes())
    settings = get_settings()
    run = open_run(out_url, settings)
    found, chosen, _ = retries.find_errors(run, None)
    retries.record_pass(run.output, found, None, chosen)
    register_run(run.spec, settings)  # ... and the command died here
    assert reconcile_run(out_url, run.spec.run_id, full=False) == {"build": 1}
    assert read_json(s3, bucket, "out/run.json")["status"] == "running"
    assert "completed" in run_cli(["wait", run.spec.run_id, "--timeout", "90"], env).stdout
    rows = read_results(s3, bucket, "out/")
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    proc = run_cli(["retry-failed", run.spec.run_id, "--dry-run"], env)
    assert "no error rows: nothing to retry" in proc.stdout
