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
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import register_run
    from moonbatch.workers import retries
    from moonbatch.workers.reconcile import reconcile_run
    from moonbatch.workers.runstate import Progress, open_run

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
    snap = Progress(run.output).snapshot()  # the reopened shard is in flight, in its round 1
    assert snap["status"] == "running" and snap["shards"]["merged"] == 0
    assert snap["shards"]["in_flight"] == 1
    assert [(b["merged"], b["round"]) for b in snap["batches"]] == [(False, 1)]
    assert "completed" in run_cli(["wait", run.spec.run_id, "--timeout", "90"], env).stdout
    rows = read_results(s3, bucket, "out/")
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    proc = run_cli(["retry-failed", run.spec.run_id, "--dry-run"], env)
    assert "no error rows: nothing to retry" in proc.stdout


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_skip_existing_sends_only_items_without_an_ok_row(provider, s3, bucket, env, fleet):
    photos = upload_photos(s3, bucket, "in/", PHOTOS[:3])
    s3.put_object(Bucket=bucket, Key="in/notes.jpg", Body=b"not an image")
    run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/first/", "--workers", "0",
             "--timeout", "90", *PROVIDERS[provider]], env)
    first = read_json(s3, bucket, "first/run.json")["run_id"]
    # Photos added since, and the text file replaced by a photo: only these four are sent.
    photos.update(upload_photos(s3, bucket, "in/", PHOTOS[3:]))
    photos["notes.jpg"] = (photos_dir() / "coins.png").read_bytes()
    s3.put_object(Bucket=bucket, Key="in/notes.jpg", Body=photos["notes.jpg"])
    previous = first if provider == "moondream" else f"s3://{bucket}/first/"  # id or OUTPUT
    args = ["run", f"s3://{bucket}/in/", f"s3://{bucket}/second/", "--skip-existing", previous,
            *PROVIDERS[provider]]
    dry = run_cli([*args, "--dry-run", "--json"], env)
    report = json.loads(dry.stdout)
    assert (report["items"], report["skipped_existing"]) == (4, 3)
    assert report["skip_existing"] == f"s3://{bucket}/first/"
    proc = run_cli([*args, "--workers", "0", "--timeout", "90"], env)
    assert "3 already with an ok row (--skip-existing) left out" in proc.stderr
    rows = read_results(s3, bucket, "second/")
    assert sorted(r["id"] for r in rows) == sorted(["notes.jpg", *PHOTOS[3:]])
    for row in rows:
        _check_row(row, photos, provider)
    plan = read_json(s3, bucket, "second/_moonbatch/plan.json")
    assert (plan["items"], plan["skipped_existing"]) == (4, 3)
    spec = read_json(s3, bucket, "second/_moonbatch/spec.json")
    assert spec["skip_existing"] == f"s3://{bucket}/first/"  # a taken-over start plans the same
    assert read_json(s3, bucket, "second/run.json")["counts"]["total"] == 4
    if provider == "moondream":  # the same command again: already complete
        assert "already complete" in run_cli([*args, "--workers", "0"], env).stderr


def test_existing_ids_of_every_json_type(tmp_path):
    """Ids keep their JSON type: an ok row for id 7 does not skip id "7"."""
    import orjson

    from moonbatch.config import get_settings
    from moonbatch.producer.existing import ExistingOk
    from moonbatch.workers.models import RunSpec, SkillOptions

    spec = RunSpec(run_id="r", input=str(tmp_path / "in") + "/", output=str(tmp_path) + "/",
                   options=SkillOptions(skill="caption"), shard_size=10, max_shard_bytes=1 << 20,
                   created_at=0.0)
    state = tmp_path / "_moonbatch"
    state.mkdir()
    (state / "spec.json").write_text(spec.model_dump_json())
    (state / "plan.json").write_text(json.dumps({"shards": 2, "items": 6}))
    (tmp_path / "results").mkdir()
    ok = [7, "a.jpg", 2.5, True]
    rows = [{"id": i, "status": "ok", "result": {"caption": "x"}} for i in ok]
    rows.append({"id": "bad", "status": "error", "error": {"code": "not_an_image"}})
    (tmp_path / "results" / "shard-00000.jsonl").write_bytes(
        b"".join(orjson.dumps(r) + b"\n" for r in rows))  # shard 1 is not merged: passed over
    existing = ExistingOk.load(str(tmp_path), get_settings())
    assert len(existing) == 4
    assert all(i in existing for i in ok)
    assert not any(i in existing for i in ("7", "bad", 2, "true", False, "b.jpg"))
    with pytest.raises(ValueError, match="no planned moonbatch run there"):
        ExistingOk.load(str(tmp_path / "in"), get_settings())
