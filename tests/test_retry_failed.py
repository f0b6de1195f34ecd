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


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_retry_failed_replaces_error_rows_of_given_codes(provider, s3, bucket, env):
    env = _env(env)
    photos = upload_photos(s3, bucket, "in/", PHOTOS)
    s3.put_object(Bucket=bucket, Key="in/notes.jpg", Body=b"a text file with an image name\n")
    out_url = f"s3://{bucket}/out/"
    run_id = run_cli(["submit", f"s3://{bucket}/in/", out_url, "--shard-size", "3",
                      *PROVIDERS[provider]], env).stdout.strip().splitlines()[-1]
    # Two objects vanish between planning and the workers' reads.
    gone = ("astronaut.png", "rocket.jpg")
    for name in gone:
        s3.delete_object(Bucket=bucket, Key="in/" + name)
    run_cli(["wait", run_id, "--workers", "2", "--timeout", "90"], env)
    rows = {r["id"]: r for r in read_results(s3, bucket, "out/")}
    codes = {k: r["error"]["code"] for k, r in rows.items() if r["status"] == "error"}
    assert codes == {"astronaut.png": "object_not_found", "rocket.jpg": "object_not_found",
                     "notes.jpg": "not_an_image"}

    proc = run_cli(["retry-failed", run_id, "object_not_found", "--dry-run"], env)
    assert "would retry 2 error row(s)" in proc.stdout and "object_not_found 2" in proc.stdout
    assert "not_an_image 1" in proc.stdout
    assert read_json(s3, bucket, "out/run.json")["status"] == "completed"  # unchanged

    upload_photos(s3, bucket, "in/", gone)  # the inputs are fixed
    proc = run_cli(["retry-failed", out_url, "object_not_found", "--workers", "2",
                    "--timeout", "90"], env)
    assert "retry pass 1: 2 item(s)" in proc.stdout and "completed" in proc.stdout

    ids = [r["id"] for r in read_results(s3, bucket, "out/")]
    assert sorted(ids) == sorted([*PHOTOS, "notes.jpg"])  # exactly one row per item
    rows = {r["id"]: r for r in read_results(s3, bucket, "out/")}
    for name in PHOTOS:
        _check_row(rows[name], photos, provider)
    assert rows["notes.jpg"]["error"]["code"] == "not_an_image"  # another code: untouched
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["status"] == "completed"
    assert summary["counts"] | {} == {**summary["counts"], "total": 7, "ok": 6, "error": 1,
                                      "done": 7, "in_flight": 0}
    status = run_cli(["status", run_id], env).stdout
    assert "completed" in status and "ok 6, error 1" in status
    # Every shard's rows are in plan order still.
    plan = s3.get_object(Bucket=bucket, Key="out/_moonbatch/plan/shard-00000.jsonl")["Body"].read()
    res = s3.get_object(Bucket=bucket, Key="out/results/shard-00000.jsonl")["Body"].read()
    assert [json.loads(x)["id"] for x in plan.splitlines()] == \
        [json.loads(x)["id"] for x in res.splitlines()]

    proc = run_cli(["retry-failed", run_id, "object_not_found"], env)
    assert "no error rows with code object_not_found" in proc.stdout
    assert "nothing to retry" in proc.stdout


def test_retry_failed_every_code_and_refusals(s3, bucket, env):
    env = _env(env)
    upload_photos(s3, bucket, "in/", PHOTOS[:3])
    s3.put_object(Bucket=bucket, Key="in/broken.png", Body=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    out_url = f"s3://{bucket}/out/"
    run_id = run_cli(["submit", f"s3://{bucket}/in/", out_url], env).stdout.strip().splitlines()[-1]
    proc = run_cli(["retry-failed", run_id], env, check=False)
    assert proc.returncode == 3 and "not finished" in proc.stderr
    run_cli(["wait", run_id, "--workers", "1", "--timeout", "90"], env)
    before = read_json(s3, bucket, "out/run.json")["counts"]
    assert (before["ok"], before["error"]) == (3, 1)

    # Nothing fixed: the pass runs, and the row is the new outcome (the same error).
    proc = run_cli(["retry-failed", run_id, "--workers", "1", "--timeout", "90"], env)
    assert "retry pass 1: 1 item(s)" in proc.stdout
    rows = read_results(s3, bucket, "out/")
    assert len(rows) == 4
    assert [r["error"]["code"] for r in rows if r["status"] == "error"] == ["image_decode_failed"]
    done = read_json(s3, bucket, "out/_moonbatch/shards/00000/done.json")
    assert done["rounds"] == 2 and (done["ok"], done["error"]) == (3, 1)
    assert read_json(s3, bucket, "out/run.json")["counts"]["ok"] == 3

    s3.put_object(Bucket=bucket, Key="in/broken.png", Body=(photos_dir() / "coins.png").read_bytes())
    run_cli(["retry-failed", run_id, "image_decode_failed", "--workers", "1", "--timeout", "90"],
            env)
    rows = {r["id"]: r for r in read_results(s3, bucket, "out/")}
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values())
    assert read_json(s3, bucket, "out/run.json")["counts"]["ok"] == 4
    assert "no error rows: nothing to retry" in run_cli(["retry-failed", run_id], env).stdout
