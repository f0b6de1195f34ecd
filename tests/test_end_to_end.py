"""The main job end to end: S3 (moto) → producer → Redis → real Celery workers → the emulated
Batch API over HTTP → merged results in S3."""

from __future__ import annotations

import io
import json
import time

import pytest

from tests.conftest import (
    expected_result,
    jpeg_bytes,
    photos_dir,
    read_json,
    read_results,
    run_cli,
    upload_photos,
)

SKILLS = {
    "caption": (["--length", "long"], {"skill": "caption", "length": "long"}),
    "query": (["--question", "What is shown?", "--no-reasoning"],
              {"skill": "query", "question": "What is shown?", "reasoning": False}),
    "detect": (["--object", "face"], {"skill": "detect", "object": "face"}),
    "point": (["--object", "eye"], {"skill": "point", "object": "eye"}),
}


@pytest.mark.parametrize("skill", list(SKILLS))
def test_real_photographs_each_skill(skill, s3, bucket, env, fleet):
    photos = upload_photos(s3, bucket, "photos/")
    s3.put_object(Bucket=bucket, Key="photos-elsewhere/astronaut.png", Body=photos["astronaut.png"])
    args, request = SKILLS[skill]
    proc = run_cli(["run", f"s3://{bucket}/photos/", f"s3://{bucket}/annotations/run-1/",
                    "--skill", skill, *args, "--workers", "0", "--timeout", "120"], env)
    assert "completed" in proc.stdout

    rows = read_results(s3, bucket, "annotations/run-1/")
    assert sorted(r["id"] for r in rows) == sorted(photos)  # each exactly once, nothing outside
    for row in rows:
        assert row["status"] == "ok", row
        assert row["source"] == f"s3://{bucket}/photos/{row['id']}"
        # The emulator's answer is a function of the pixels: this row came from this image.
        assert row["result"] == expected_result(photos[row["id"]], request)
        assert row["usage"]["input_tokens"] > 0

    summary = read_json(s3, bucket, "annotations/run-1/run.json")
    assert summary["status"] == "completed"
    assert summary["skill"] == skill
    assert summary["counts"]["total"] == summary["counts"]["ok"] == len(photos)
    assert summary["counts"]["error"] == 0
    assert summary["usage"]["input_tokens"] == sum(r["usage"]["input_tokens"] for r in rows)
    assert [b["batch_id"] for b in summary["batches"]] and all(b["batch_id"] for b in summary["batches"])
    assert summary["timings"]["wall_seconds"] > 0


def test_odd_keys_nested_prefixes(s3, bucket, env, fleet):
    body = (photos_dir() / "chelsea.png").read_bytes()
    keys = ["data set/a cat.png", "data set/ünïcödé/猫 photo.png", "data set/deep/er/x+y=z&?.png",
            "data set/deep/er/'quote\" #1.PNG", "data set/no-extension-photo"]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=bucket, Key=key, Body=body if i % 2 == 0 else jpeg_bytes(color=(i, 9, 9)))
    s3.put_object(Bucket=bucket, Key="data set/notes.txt", Body=b"not an image")
    s3.put_object(Bucket=bucket, Key="data setter/outside.png", Body=body)  # shares the prefix text

    run_cli(["run", f"s3://{bucket}/data set", f"s3://{bucket}/out/", "--skill", "caption",
             "--workers", "0", "--timeout", "120"], env)
    rows = read_results(s3, bucket, "out/")
    want = sorted(k[len("data set/"):] for k in keys)
    assert sorted(r["id"] for r in rows) == want
    assert all(r["status"] == "ok" for r in rows), rows
    by_id = {r["id"]: r for r in rows}
    assert by_id["ünïcödé/猫 photo.png"]["source"] == f"s3://{bucket}/data set/ünïcödé/猫 photo.png"
    plan = read_json(s3, bucket, "out/_moonbatch/plan.json")
    assert plan["skipped"] == 1 and plan["skipped_examples"] == ["notes.txt"]


def test_several_shards_with_shuffled_split_outputs(s3, bucket, env, fleet, emulator):
    emulator.config.lines_per_output_file = 2
    emulator.config.shuffle_outputs = True
    photos = upload_photos(s3, bucket, "in/")
    run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--skill", "caption",
             "--shard-size", "3", "--workers", "0", "--timeout", "120"], env)
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["shards"]["total"] == 3 and len(summary["batches"]) == 3
    assert len({b["batch_id"] for b in summary["batches"]}) == 3
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(photos)
    for row in rows:
        assert row["result"] == expected_result(photos[row["id"]], {"skill": "caption"})
    # Rows of a shard come out in plan order whatever order the API returned them in.
    plan0 = s3.get_object(Bucket=bucket, Key="out/_moonbatch/plan/shard-00000.jsonl")["Body"].read()
    res0 = s3.get_object(Bucket=bucket, Key="out/results/shard-00000.jsonl")["Body"].read()
    ids = [json.loads(x)["id"] for x in res0.splitlines()]
    assert [json.loads(x)["id"] for x in plan0.splitlines()] == ids


def test_corrupt_and_non_image_objects_become_error_rows(s3, bucket, env, fleet):
    good = jpeg_bytes(size=(320, 200))
    objects = {
        "good.jpg": good,
        "empty.jpg": b"",
        "text.jpg": b"hello, I am a text file with an image name\n",
        "truncated.jpg": good[: len(good) // 2],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
        "html.gif": b"<html><body>not found</body></html>",
    }
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key="mixed/" + key, Body=body)
    run_cli(["run", f"s3://{bucket}/mixed/", f"s3://{bucket}/out/", "--workers", "0",
             "--timeout", "120"], env)
    rows = {r["id"]: r for r in read_results(s3, bucket, "out/")}
    assert sorted(rows) == sorted(objects)
    assert rows["good.jpg"]["status"] == "ok"
    codes = {k: r["error"]["code"] for k, r in rows.items() if r["status"] == "error"}
    assert codes == {
        "empty.jpg": "empty_object",
        "text.jpg": "not_an_image",
        "truncated.jpg": "image_decode_failed",  # header is fine: the API rejects the pixels
        "garbage.png": "image_decode_failed",
        "html.gif": "not_an_image",
    }
    for r in rows.values():
        if r["status"] == "error":
            assert r["error"]["message"]
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["counts"] == {**summary["counts"], "total": 6, "ok": 1, "error": 5}


def test_submit_status_wait(s3, bucket, env, fleet):
    upload_photos(s3, bucket, "p/", names=("coffee.png", "rocket.jpg"))
    proc = run_cli(["submit", f"s3://{bucket}/p/", f"s3://{bucket}/o/", "--skill", "query",
                    "--question", "Is there a cup?"], env)
    run_id = proc.stdout.strip().splitlines()[-1]
    assert run_id and " " not in run_id
    st = run_cli(["status", run_id], env)
    assert run_id in st.stdout
    run_cli(["wait", run_id, "--timeout", "120"], env)
    st = run_cli(["status", run_id, "--json"], env)
    snap = json.loads(st.stdout)
    assert snap["status"] == "completed" and snap["counts"]["ok"] == 2
    # The same OUTPUT cannot take a second run.
    again = run_cli(["submit", f"s3://{bucket}/p/", f"s3://{bucket}/o/"], env, check=False)
    assert again.returncode != 0 and run_id in again.stderr


def test_bad_options_are_refused_clearly(env):
    proc = run_cli(["submit", "s3://b/in/", "s3://b/out/", "--skill", "query"], env, check=False)
    assert proc.returncode == 2 and "--question is required" in proc.stderr
    proc = run_cli(["submit", "s3://b/in/", "s3://b/out/", "--skill", "detect", "--object", "x",
                    "--temperature", "0.5"], env, check=False)
    assert proc.returncode == 2 and "caption and query only" in proc.stderr


def test_wrong_api_key_fails_the_run_clearly(s3, bucket, env, fleet, emulator):
    upload_photos(s3, bucket, "k/", names=("coffee.png",))
    real = emulator.config.api_key
    emulator.config.api_key = "another-key"
    try:
        proc = run_cli(["run", f"s3://{bucket}/k/", f"s3://{bucket}/o/", "--workers", "0",
                        "--timeout", "60"], env, check=False)
    finally:
        emulator.config.api_key = real
    # Refused before anything is written (issue 9: the key is checked before work).
    assert proc.returncode == 3, proc.stderr
    assert "refused the key in MOONDREAM_API_KEY (HTTP 401)" in proc.stderr
    assert real not in proc.stderr + proc.stdout
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="o/")


def test_local_directories_with_own_workers(tmp_path, env):
    """``run`` on local directories, starting its own worker processes (--workers 2)."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for name in ("astronaut.png", "rocket.jpg"):
        (src / "sub" / name).write_bytes((photos_dir() / name).read_bytes())
    (src / "multipage.tif").write_bytes((photos_dir() / "multipage.tif").read_bytes())
    own = {**env, "MOONBATCH_QUEUE": env["MOONBATCH_QUEUE"] + "-own"}
    run_cli(["run", str(src), str(tmp_path / "out"), "--workers", "2", "--timeout", "120"], own)
    rows = []
    for f in sorted((tmp_path / "out" / "results").glob("*.jsonl")):
        rows += [json.loads(x) for x in f.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["multipage.tif", "sub/astronaut.png", "sub/rocket.jpg"]
    assert all(r["status"] == "ok" for r in rows), rows  # the TIFF is converted to PNG
    tif = next(r for r in rows if r["id"] == "multipage.tif")
    assert tif["result"] == expected_result((photos_dir() / "multipage.tif").read_bytes(),
                                            {"skill": "caption"})


def test_empty_prefix_completes_with_zero_items(s3, bucket, env, fleet):
    s3.put_object(Bucket=bucket, Key="only-text/readme.txt", Body=b"nothing to see")
    proc = run_cli(["run", f"s3://{bucket}/only-text/", f"s3://{bucket}/out/", "--workers", "0",
                    "--timeout", "60"], env)
    assert "completed" in proc.stdout
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["counts"]["total"] == 0 and summary["counts"]["skipped"] == 1
    assert read_results(s3, bucket, "out/") == []


def test_status_of_unknown_run_is_a_clear_error(env):
    proc = run_cli(["status", "20990101-000000-abcdef"], env, check=False)
    assert proc.returncode == 1 and "not in the registry" in proc.stderr


def test_loose_status_answers_do_not_stop_a_run(s3, bucket, env, fleet, emulator):
    """Status answers in every shape the contract allows (an unknown status, null progress and
    outputs while chunking, float counts, outputs as plain URL strings, extra fields; thin
    mpu-* answers) still give every row."""
    emulator.config.loose_answers = True
    photos = upload_photos(s3, bucket, "loose/")
    proc = run_cli(["run", f"s3://{bucket}/loose/", f"s3://{bucket}/out/", "--skill", "caption",
                    "--shard-size", "5", "--workers", "0", "--timeout", "120"], env)
    assert "completed" in proc.stdout

    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(photos)
    for row in rows:
        assert row["status"] == "ok", row
        assert row["result"] == expected_result(photos[row["id"]], {"skill": "caption"})
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["status"] == "completed"
    assert summary["counts"]["ok"] == summary["counts"]["total"] == len(photos)
    assert len(summary["batches"]) == 2
    for batch in summary["batches"]:  # queued, chunking, processing, completed: one poll each
        assert batch["polls"] >= 4 and batch["rounds"] == 1
        progress = read_json(s3, bucket, f"out/_moonbatch/shards/{batch['shard']:05d}/r0/progress.json")
        assert progress["status"] == "completed"
        assert progress["total"] == progress["completed"] == batch["items"]
        assert progress["failed"] == 0
        # What the chain's next poll needs of batch.json, kept for it (no read of batch.json)
        assert progress["record"]["batch_id"] == batch["batch_id"]
    deadline = time.monotonic() + 10
    while "is not one the seed names; polling again" not in fleet.log_path.read_text():
        assert time.monotonic() < deadline, "the unknown status was not logged"
        time.sleep(0.1)


def test_webp_is_sent_converted_and_annotated(s3, bucket, env, fleet):
    """The API documents JPEG, PNG and GIF only (the emulator refuses anything else): WebP,
    still or animated, reaches it converted, with the pixels the WebP decodes to."""
    from PIL import Image

    from moonbatch.emulator.inference import fingerprint_bytes
    from moonbatch.workers.lines import prepare_image

    def encode(img, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="WEBP", **kw)
        return buf.getvalue()

    photo = Image.open(photos_dir() / "chelsea.png").convert("RGB")
    frames = [photo, photo.rotate(90), Image.new("RGB", photo.size, (0, 0, 200))]
    objects = {
        "cat-lossy.webp": encode(photo, quality=80),
        "cat-lossless.webp": encode(photo, lossless=True),
        "cat-animated.webp": encode(frames[0], save_all=True, append_images=frames[1:],
                                    lossless=True, duration=100),
        "cat.png": (photos_dir() / "chelsea.png").read_bytes(),
    }
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key="webp/" + key, Body=body)
    run_cli(["run", f"s3://{bucket}/webp/", f"s3://{bucket}/out/", "--skill", "query",
             "--question", "What animal?", "--workers", "0", "--timeout", "120"], env)

    request = {"skill": "query", "question": "What animal?"}
    rows = {r["id"]: r for r in read_results(s3, bucket, "out/")}
    assert sorted(rows) == sorted(objects)
    for key, body in objects.items():
        assert rows[key]["status"] == "ok", rows[key]
        # The emulator's answer for the WebP's decoded pixels (first frame, RGB, size).
        assert rows[key]["result"] == expected_result(body, request)
        if key.endswith(".webp"):
            # Lossless conversion: the PNG sent has the fingerprint of the decoded WebP.
            sent = prepare_image(body, limit=10**7).data
            assert fingerprint_bytes(sent) == fingerprint_bytes(body)
    build = read_json(s3, bucket, "out/_moonbatch/shards/00000/r0/build.json")
    assert build["transformed"] == 3  # the three WebPs; the PNG went byte for byte
