"""Recovery: ``moonbatch resume`` after a crash at each stage, and ``moonbatch cancel``.

Each test plans a run onto a queue nobody consumes, brings the run's storage to the state a
crash at that stage leaves (by running the real pipeline steps, or by what a dead worker leaves
behind), deletes the queue in Redis as a broker restart would, then resumes with a worker.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from moonbatch.config import get_settings
from moonbatch.workers import layout
from moonbatch.workers.providers.moondream.client import BatchClient
from moonbatch.workers.providers.moondream.settings import MoondreamSettings
from moonbatch.workers.providers.moondream.upload import build_and_submit
from moonbatch.workers.runstate import open_run
from moonbatch.workers.storage import put_json
from tests.conftest import (
    BROKER_DB,
    Worker,
    read_json,
    read_results,
    run_cli,
    upload_photos,
    wait_for_run,
)

NAMES = ("coffee.png", "rocket.jpg", "chelsea.png", "camera.png")


@pytest.fixture
def planned(s3, bucket, env, redis_server):
    """A run of 4 photographs in 2 shards, planned onto a queue that nobody consumes."""
    upload_photos(s3, bucket, "in/", names=NAMES)
    queue = "rec-" + uuid.uuid4().hex[:8]
    qenv = {**env, "MOONBATCH_QUEUE": queue}
    proc = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--shard-size", "2"],
                   qenv)
    return {"run_id": proc.stdout.strip().splitlines()[-1], "queue": queue, "env": qenv,
            "output": f"s3://{bucket}/out/", "redis": redis_server}


def lose_queue(redis_server, queue: str) -> None:
    """What a Redis restart does to the run's messages."""
    redis_server.client(BROKER_DB).delete(queue)


def client(emulator) -> BatchClient:
    return BatchClient(emulator.url, emulator.config.api_key)


def resume_and_finish(planned, s3, bucket, tmp_path) -> dict:
    lose_queue(planned["redis"], planned["queue"])
    proc = run_cli(["resume", planned["output"]], planned["env"])
    assert "shard(s)" in proc.stdout
    with Worker(planned["env"], planned["queue"], tmp_path / "worker.log"):
        summary = wait_for_run(s3, bucket, "out/")
    assert summary["status"] == "completed"
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(NAMES)  # exactly once each
    assert all(r["status"] == "ok" for r in rows), rows
    return summary


def batches_of(emulator, since: float) -> int:
    return sum(1 for b in emulator.emulator.batches.values() if b.created >= since)


def test_resume_before_any_build(planned, s3, bucket, emulator, tmp_path):
    t0 = time.time()
    summary = resume_and_finish(planned, s3, bucket, tmp_path)
    assert summary["shards"]["batches_submitted"] == 2 == batches_of(emulator, t0)


def test_resume_after_a_crash_mid_upload(planned, s3, bucket, emulator, tmp_path):
    """A worker died after sending a part: its upload is open and its lease has expired."""
    run = open_run(planned["output"], get_settings())
    api = client(emulator)
    up = api.create_upload()
    api.upload_part(up.file_id, up.upload_id, 1, b'{"id": "x"}\n')
    put_json(run.output, layout.round_doc(0, 0, "upload"),
             {"file_id": up.file_id, "upload_id": up.upload_id, "created_at": time.time()})
    put_json(run.output, layout.shard_doc(0, "lease"),
             {"owner": "dead-worker", "heartbeat": time.time() - 600, "expires": time.time() - 1})
    t0 = time.time()
    resume_and_finish(planned, s3, bucket, tmp_path)
    assert up.file_id not in emulator.emulator.uploads  # the dead attempt's upload was aborted
    assert batches_of(emulator, t0) == 2


def test_resume_after_submit_before_polling(planned, s3, bucket, emulator, tmp_path):
    """Both batches were submitted and recorded, then the broker lost the poll messages."""
    run = open_run(planned["output"], get_settings())
    s = get_settings().section(MoondreamSettings)
    for shard in (0, 1):
        build_and_submit(shard=shard, items=run.items(shard), options=run.spec.options,
                         model=None, input_store=run.input, state=run.output,
                         client=client(emulator), part_size=s.part_size, concurrency=4)
    t0 = time.time()
    summary = resume_and_finish(planned, s3, bucket, tmp_path)
    assert batches_of(emulator, t0) == 0  # nothing submitted twice
    assert summary["shards"]["batches_submitted"] == 2


def test_resume_after_completion_before_merge(planned, s3, bucket, emulator, tmp_path):
    """The last poll saw the batch completed, then the merge message was lost."""
    run = open_run(planned["output"], get_settings())
    s = get_settings().section(MoondreamSettings)
    api = client(emulator)
    for shard in (0, 1):
        _, batch = build_and_submit(shard=shard, items=run.items(shard), options=run.spec.options,
                                    model=None, input_store=run.input, state=run.output,
                                    client=api, part_size=s.part_size, concurrency=4)
        while (status := api.get_batch(batch.batch_id)).status != "completed":
            time.sleep(0.05)
        put_json(run.output, layout.round_doc(shard, 0, "progress"),
                 {"batch_id": status.id, "status": "completed", "chain": "lost",
                  "polled_at": time.time(), "next_at": time.time(), "total": 2, "completed": 2})
    t0 = time.time()
    resume_and_finish(planned, s3, bucket, tmp_path)
    assert batches_of(emulator, t0) == 0


def test_resume_of_a_complete_run_changes_nothing(planned, s3, bucket, tmp_path):
    with Worker(planned["env"], planned["queue"], tmp_path / "w.log"):
        wait_for_run(s3, bucket, "out/")
    before = read_json(s3, bucket, "out/run.json")
    proc = run_cli(["resume", planned["output"]], planned["env"])
    assert "already complete" in proc.stdout
    assert read_json(s3, bucket, "out/run.json") == before


def test_cancel_stops_a_run_cleanly(planned, s3, bucket, tmp_path, emulator):
    t0 = time.time()
    proc = run_cli(["cancel", planned["run_id"]], planned["env"])
    assert "cancelled" in proc.stdout
    with Worker(planned["env"], planned["queue"], tmp_path / "w.log"):
        time.sleep(3)  # the queued builds run and find the run cancelled
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["status"] == "cancelled"
    assert batches_of(emulator, t0) == 0
    assert read_results(s3, bucket, "out/") == []
    waited = run_cli(["wait", planned["run_id"], "--timeout", "10"], planned["env"], check=False)
    assert waited.returncode == 1 and "cancelled" in waited.stderr
    again = run_cli(["resume", planned["run_id"]], planned["env"], check=False)
    assert again.returncode == 1 and "cancelled" in again.stderr
    assert json.loads(s3.get_object(Bucket=bucket, Key="out/_moonbatch/cancelled.json")["Body"]
                      .read())["at"] >= t0


def test_a_redelivered_poll_goes_on_as_one_chain_without_the_lease(planned, emulator,
                                                                   monkeypatch):
    """Two executions of one Batch API poll (a copy the broker delivered again), handed the
    same chain start by the build: both look, one writes the round's progress by
    compare-and-swap and goes on, the other stops. Neither takes the shard's lease."""
    from moonbatch.workers import tasks
    from moonbatch.workers.providers.moondream import RECORD

    run = open_run(planned["output"], get_settings())
    s = get_settings().section(MoondreamSettings)
    _, batch = build_and_submit(shard=0, items=run.items(0), options=run.spec.options,
                                model=None, input_store=run.input, state=run.output,
                                client=client(emulator), part_size=s.part_size, concurrency=4)
    sent: list[tuple[str, tuple]] = []
    monkeypatch.setattr(tasks, "_next", lambda task, args, countdown=None, spec=None:
                        sent.append((task.name, args)))
    fields = {"batch_id": batch.batch_id, "status": "submitted", "total": batch.lines,
              RECORD: {"batch_id": batch.batch_id, "submitted_at": batch.submitted_at,
                       "lines": batch.lines}}
    doc, version = tasks._chain_progress(run.output, 0, 0, run.spec.run_id, "c", 0, fields, 0.2,
                                         time.time(), None)
    for _ in range(2):
        tasks.poll_round(planned["output"], run.spec.run_id, 0, 0, "c", 0, None, [doc, version])
    assert len(sent) == 1, sent  # one chain goes on
    name, args = sent[0]
    assert name in ("moonbatch.poll_round", "moonbatch.merge_round")
    stored = json.loads(run.output.get(layout.round_doc(0, 0, "progress")))
    assert stored["chain"] == "c" and stored["polls"] == 1 and stored["run"] == run.spec.run_id
    assert stored["status"] != "submitted"
    assert not run.output.exists(layout.shard_doc(0, "lease"))
    if name == "moonbatch.poll_round":  # handed what it wrote: the next poll reads nothing
        held_doc, held_version = args[7]
        assert held_doc["polls"] == 1 and held_version
