"""The fal provider's guarantees: bad input as error rows, data URIs for local input, 422s that
name the field, 429s backed off, cancel that reaches fal, and a chaos run (every fal fault,
workers SIGKILLed and kept down past fal's result retention, Redis restarted empty, then
``resume``) that ends with every item exactly once."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import random
import subprocess
import sys
import time
import uuid

import pytest
from PIL import Image

from moonbatch.emulator.fal import FalConfig, FalFaults
from moonbatch.emulator.server import EmulatorConfig, EmulatorServer
from tests.conftest import (
    RedisServer,
    Worker,
    free_port,
    photos_dir,
    private_env,
    read_json,
    read_results,
    run_cli,
    tiny_jpeg,
    wait_for_completion,
    wait_for_run,
)
from tests.test_fal_provider import expected_row, start

CAPTION = "fal-ai/moondream3-preview/caption"


def test_local_input_bad_items_and_422s_become_error_rows(tmp_path, s3, bucket, env, fleet,
                                                          emulator):
    src = tmp_path / "in"
    src.mkdir()
    photos = {}
    for name in ("chelsea.png", "rocket.jpg", "coffee.png"):
        photos[name] = (photos_dir() / name).read_bytes()
        (src / name).write_bytes(photos[name])
    (src / "notes.jpg").write_bytes(b"this is a text file named .jpg\n")  # not an image
    big = Image.new("RGB", (7100, 10), (10, 200, 10))  # fal takes at most 7000 px a side
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    (src / "wide.png").write_bytes(buf.getvalue())

    calls = dict(emulator.emulator.fal.calls)
    start(env, str(src), f"s3://{bucket}/out/", CAPTION, {"skill": "caption"}, max_pixels=0)
    summary = wait_for_run(s3, bucket, "out/", timeout=120)
    assert summary["status"] == "completed"
    rows = {r["id"]: r for r in read_results(s3, bucket, "out/")}
    assert sorted(rows) == sorted([*photos, "notes.jpg", "wide.png"])  # each exactly once
    for name, data in photos.items():  # sent as data URIs: fal cannot reach a local path
        result, usage = expected_row(CAPTION, {"length": "normal"}, data, "caption")
        assert {k: v for k, v in rows[name]["result"].items() if k != "raw"} == result
        assert rows[name]["usage"] == usage
    assert rows["notes.jpg"]["error"]["code"] == "not_an_image"  # never sent
    wide = rows["wide.png"]["error"]
    assert wide["code"] == "invalid_input" and "image_url" in wide["message"], wide
    assert summary["counts"] == {**summary["counts"], "ok": 3, "error": 2, "total": 5}
    # Exactly one request per sendable image: bad input costs nothing.
    assert emulator.emulator.fal.calls.get("submit", 0) - calls.get("submit", 0) == 4


def test_concurrency_limit_429s_are_backed_off(s3, bucket, env, fleet, emulator):
    from tests.conftest import upload_photos

    photos = upload_photos(s3, bucket, "photos/")
    emulator.config.fal = FalConfig(concurrency=2, processing_seconds=1.0,
                                    faults=FalFaults(seed=3, queue_limit=2))
    start(env, f"s3://{bucket}/photos/", f"s3://{bucket}/out/", CAPTION, {"skill": "caption"})
    summary = wait_for_run(s3, bucket, "out/", timeout=120)
    assert summary["status"] == "completed" and summary["counts"]["ok"] == len(photos)
    assert emulator.emulator.fal.injected["429"] > 0  # the cap (10) was above fal's limit (2)
    merged = [read_json(s3, bucket, f"out/_moonbatch/shards/{s:05d}/r0/merged.json")
              for s in range(summary["shards"]["total"])]
    assert sum(m["rate_limited"] for m in merged) > 0
    assert sum(m["requests"] for m in merged) == len(photos)  # a 429 creates no request


def test_cancel_cancels_requests_in_flight(s3, bucket, env, fleet, emulator):
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"in/{i:03d}.jpg",
                                              Body=tiny_jpeg(i)), range(12)))
    emulator.config.fal = FalConfig(concurrency=4, processing_seconds=30.0)
    fal = emulator.emulator.fal
    before = set(fal.requests)
    run_id = start(env, f"s3://{bucket}/in/", f"s3://{bucket}/out/", CAPTION,
                   {"skill": "caption"})
    deadline = time.time() + 30
    while time.time() < deadline and len(set(fal.requests) - before) < 12:  # 10 + 10 ahead
        time.sleep(0.2)
    time.sleep(0.5)  # the ledger is written once the step's submits have answered
    ours = set(fal.requests) - before
    assert len(ours) == 12, len(ours)
    proc = run_cli(["cancel", run_id], env)
    assert "12 request(s) in flight cancelled" in proc.stdout, proc.stdout
    assert all(fal.requests[r].cancelled is not None for r in ours)
    assert read_json(s3, bucket, "out/run.json")["status"] == "cancelled"


@pytest.mark.timeout(540)
def test_fal_chaos(s3, bucket, env, tmp_path):
    n_images, shard_size = 160, 40
    rng = random.Random(20261122)
    faults = FalFaults(seed=7, rate_429=0.05, rate_503=0.05, rate_drop=0.03,
                       lose_submit_answers=0.03, latency=0.01, rate_error=0.08,
                       error_types=("request_timeout", "runner_disconnected"))
    config = EmulatorConfig(api_key="unused-" + uuid.uuid4().hex, fal_key="fal-" + uuid.uuid4().hex,
                            fal=FalConfig(concurrency=6, processing_seconds=0.3, result_ttl=3.0,
                                          result_ttl_large=3.0, faults=faults))
    redis_server = RedisServer(free_port(), tmp_path)
    redis_server.start()
    queue = "falchaos-" + uuid.uuid4().hex[:6]
    with EmulatorServer(config) as emu:
        cenv = {**private_env(env, redis_server),
                "MOONBATCH_QUEUE": queue, "FAL_KEY": config.fal_key,
                "MOONBATCH_FAL_QUEUE_URL": emu.fal_url, "MOONBATCH_FAL_CONCURRENCY": "6",
                "MOONBATCH_VISIBILITY_TIMEOUT": "8", "MOONBATCH_LEASE_SECONDS": "4",
                "MOONBATCH_RECONCILE_INTERVAL": "2", "MOONBATCH_POLL_MIN_INTERVAL": "0.2",
                "MOONBATCH_POLL_MAX_INTERVAL": "1", "MOONBATCH_TASK_RETRY_BACKOFF_MAX": "2",
                "MOONBATCH_MAX_ITEM_ATTEMPTS": "6"}
        with cf.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"in/img{i:04d}.jpg",
                                                  Body=tiny_jpeg(i)), range(n_images)))
        logs = tmp_path / "logs"
        logs.mkdir()
        beat = subprocess.Popen(  # the fleet's reconciler: it re-enqueues the killed work
            [sys.executable, "-m", "celery", "-A", "moonbatch.workers", "beat", "-s",
             str(tmp_path / "beat-schedule"), "--loglevel", "WARNING"], env=cenv,
            stdout=open(logs / "beat.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        worker = Worker(cenv, queue, logs / "worker.log", concurrency=3).start()
        started = time.time()
        kills = 0
        try:
            proc = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/",
                            "--provider", "fal", "--endpoint", CAPTION,
                            "--shard-size", str(shard_size)], cenv)
            run_id = proc.stdout.strip().splitlines()[-1]

            def requests_in_flight() -> int:
                n = 0
                for obj in s3.list_objects_v2(Bucket=bucket, Prefix="out/_moonbatch/shards/"
                                              ).get("Contents", []):
                    if obj["Key"].endswith("/requests.json"):
                        n += len(read_json(s3, bucket, obj["Key"])["inflight"])
                return n

            deadline = time.time() + 60
            while time.time() < deadline and requests_in_flight() < 3:
                time.sleep(0.05)
            worker.kill()  # SIGKILL with recorded requests in flight ...
            kills += 1
            time.sleep(5.0)  # ... kept down past fal's 3 s result retention: results are lost
            redis_server.restart_empty()  # queues, ETAs and slots gone
            worker = Worker(cenv, queue, logs / "worker.log", concurrency=3).start()
            run_cli(["resume", run_id], cenv)
            time.sleep(rng.uniform(2.0, 4.0))
            worker.kill()  # and once more, mid-run: its tasks come back after the visibility timeout
            kills += 1
            worker = Worker(cenv, queue, logs / "worker.log", concurrency=3).start()

            # ~60 s alone; under a CI neighbour's load polls come late, fal's 3 s retention
            # loses more results and the retried items take more rounds (up to 6): one run
            # took over 240 s that way, every shard at round 3 or 4 and advancing.
            summary = wait_for_completion(s3, bucket, "out/", cenv, timeout=360)
            elapsed = time.time() - started
        finally:
            worker.stop()
            beat.terminate()
            beat.wait(10)
            redis_server.kill()

        rows = read_results(s3, bucket, "out/")
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) == n_images  # every item exactly once
        errors = [r for r in rows if r["status"] != "ok"]
        assert len(errors) <= 2, errors  # retries absorb the injected failures
        merged = []
        for s in range(summary["shards"]["total"]):
            for r in range(6):
                try:
                    merged.append(read_json(s3, bucket,
                                            f"out/_moonbatch/shards/{s:05d}/r{r}/merged.json"))
                except s3.exceptions.NoSuchKey:
                    break
        report = {
            "run_id": run_id, "images": n_images, "shards": summary["shards"]["total"],
            "seconds": round(elapsed, 1), "worker_kills": kills, "redis_restarts": 1,
            "faults_injected": dict(emu.emulator.fal.injected),
            "requests_submitted": emu.emulator.fal.calls.get("submit", 0),
            "requests_recorded": sum(m.get("requests", 0) for m in merged),
            "results_expired": sum(m.get("expired_results", 0) for m in merged),
            "possible_duplicate_requests": sum(m.get("possible_duplicate_requests", 0)
                                               for m in merged),
            "rounds": len(merged), "error_rows": len(errors)}
        print("\nfal chaos report:", json.dumps(report))
        assert report["results_expired"] > 0  # the workers were down past the retention
        assert sum(report["faults_injected"].values()) > 0
        log = (logs / "worker.log").read_text()
        assert config.fal_key not in log and "base64," not in log and "Signature=" not in log
