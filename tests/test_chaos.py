"""Chaos: 500 images in 5 shards while the API misbehaves in every way it can, workers are
SIGKILLed at random moments and Redis restarts empty. Every item must end in the results exactly
once; the test reports faults, kills and duplicate batches.

Its own Redis server (so it can be killed), its own emulator (with faults), moto's S3.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import subprocess
import time
import uuid

import pytest

from moonbatch.emulator.server import EmulatorConfig, EmulatorServer, Faults
from tests.conftest import (
    RedisServer,
    Worker,
    free_port,
    private_env,
    read_results,
    run_cli,
    tiny_jpeg,
    wait_for_completion,
)

N_IMAGES = 500
SHARD_SIZE = 100


@pytest.mark.timeout(420)
def test_chaos(s3, bucket, env, tmp_path):
    rng = random.Random(20261121)
    faults = Faults(seed=11, rate_429=0.06, retry_after=0.1, rate_5xx=0.05, rate_drop=0.03,
                    latency=0.01, rate_truncate=0.1, rate_corrupt=0.1, batch_fail_rate=0.15,
                    line_error_rate=0.03, lose_create_answers=0.05, lose_complete_answers=0.25)
    config = EmulatorConfig(api_key="chaos-" + uuid.uuid4().hex, chunking_seconds=0.3,
                            processing_seconds=1.0, lines_per_second=200, min_part_size=0,
                            lines_per_output_file=30, url_ttl=1.5, faults=faults)
    redis_server = RedisServer(free_port(), tmp_path)
    redis_server.start()
    queue = "chaos-" + uuid.uuid4().hex[:6]
    with EmulatorServer(config) as emu:
        cenv = {**private_env(env, redis_server),
                "MOONBATCH_QUEUE": queue, "MOONDREAM_API_KEY": config.api_key,
                "MOONBATCH_MOONDREAM_URL": emu.url, "MOONBATCH_VISIBILITY_TIMEOUT": "8",
                "MOONBATCH_LEASE_SECONDS": "4", "MOONBATCH_RECONCILE_INTERVAL": "2",
                "MOONBATCH_POLL_MIN_INTERVAL": "0.2", "MOONBATCH_POLL_MAX_INTERVAL": "1",
                "MOONBATCH_HTTP_MAX_ATTEMPTS": "8", "MOONBATCH_HTTP_BACKOFF_MAX": "0.3",
                "MOONBATCH_TASK_RETRY_BACKOFF_MAX": "2", "MOONBATCH_MAX_ITEM_ATTEMPTS": "5",
                "MOONBATCH_PART_SIZE": str(16 * 1024)}
        with cf.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"in/{i // 100}/img{i:04d}.jpg",
                                                  Body=tiny_jpeg(i)), range(N_IMAGES)))
        logs = tmp_path / "logs"
        logs.mkdir()
        beat = subprocess.Popen(
            ["celery", "-A", "moonbatch.workers", "beat", "-s", str(tmp_path / "beat-schedule"),
             "--loglevel", "WARNING"], env={**cenv}, stdout=open(logs / "beat.log", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)
        worker = Worker(cenv, queue, logs / "worker.log", concurrency=3).start()
        started = time.time()
        kills = 0
        try:
            proc = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/",
                            "--shard-size", str(SHARD_SIZE)], cenv)
            run_id = proc.stdout.strip().splitlines()[-1]

            def kill_worker() -> None:
                nonlocal worker, kills
                time.sleep(rng.uniform(0.5, 3.0))
                worker.kill()
                kills += 1
                worker = Worker(cenv, queue, logs / "worker.log", concurrency=3).start()

            kill_worker()
            kill_worker()
            time.sleep(rng.uniform(0.5, 2.0))
            redis_server.restart_empty()  # queues, ETAs, results and Redis keys gone
            run_cli(["resume", run_id], cenv)  # the run id outlives Redis
            kill_worker()

            summary = wait_for_completion(s3, bucket, "out/", cenv, timeout=300)
            elapsed = time.time() - started
        finally:
            worker.stop()
            beat.terminate()
            beat.wait(10)
            redis_server.kill()

        rows = read_results(s3, bucket, "out/")
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) == N_IMAGES  # every item exactly once
        assert set(ids) == {f"{i // 100}/img{i:04d}.jpg" for i in range(N_IMAGES)}
        errors = [r for r in rows if r["status"] != "ok"]
        assert len(errors) <= 5, errors  # retries absorb almost all injected failures
        assert all(r["error"]["code"] in ("processing_error", "processing_failed") for r in errors)

        rounds = sum(b["rounds"] for b in summary["batches"])
        submitted = len(emu.emulator.batches)
        report = {
            "run_id": run_id, "images": N_IMAGES, "shards": summary["shards"]["total"],
            "seconds": round(elapsed, 1), "worker_kills": kills, "redis_restarts": 1,
            "faults_injected": dict(emu.emulator.injected),
            "batches_submitted": submitted, "batches_needed": rounds,
            "duplicate_batches": submitted - rounds, "error_rows": len(errors),
        }
        print("\nchaos report:", json.dumps(report))
        (tmp_path / "chaos-report.json").write_text(json.dumps(report))
        assert summary["shards"]["total"] >= 5 and kills >= 3
        assert sum(report["faults_injected"].values()) > 0
        log = (logs / "worker.log").read_text()
        assert config.api_key not in log and "signature=" not in log
