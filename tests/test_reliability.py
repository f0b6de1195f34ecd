"""Reliability, second pass (issue 7): the run id outlives Redis, resume finishes shards whose
builder died holding its lease, lost ``mpu-complete`` answers cost no duplicate batch, and a
run recovers from a broker loss with nobody calling ``resume``.

Every test that loses Redis runs its own ``redis-server`` (killed and restarted empty), its own
queue and real worker processes; S3 is moto's server and the API the emulator over HTTP.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest

from moonbatch.emulator.server import EmulatorConfig, EmulatorServer, Faults
from tests.conftest import (
    SKIMAGE_PHOTOS,
    Worker,
    expected_result,
    moonbatch_cmd,
    private_env,
    read_json,
    read_results,
    run_cli,
    upload_photos,
    wait_for_run,
)

NAMES = ("coffee.png", "rocket.jpg", "chelsea.png", "camera.png")




def check_rows(s3, bucket: str, prefix: str, photos: dict[str, bytes], request: dict) -> None:
    """Every photo exactly once, ok, with the result computed from its own pixels."""
    rows = read_results(s3, bucket, prefix)
    assert sorted(r["id"] for r in rows) == sorted(photos)
    for row in rows:
        assert row["status"] == "ok", row
        assert row["result"] == expected_result(photos[row["id"]], request)


def test_run_id_works_after_redis_restarts_empty(s3, bucket, env, broker, tmp_path):
    """submit → Redis loses everything (queue and result backend) → status, resume, wait and
    runs by run id, from the registry in the state store."""
    photos = upload_photos(s3, bucket, "in/", names=NAMES)
    renv = private_env(env, broker)
    run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--shard-size", "2"],
                     renv).stdout.strip().splitlines()[-1]
    broker.restart_empty()
    assert broker.client(1).dbsize() == 0 and broker.client(0).dbsize() == 0

    status = run_cli(["status", run_id, "--json"], renv)
    assert json.loads(status.stdout)["status"] == "running"
    resumed = run_cli(["resume", run_id], renv)
    assert "2 shard(s) build" in resumed.stdout
    with Worker(renv, renv["MOONBATCH_QUEUE"], tmp_path / "worker.log"):
        waited = run_cli(["wait", run_id, "--timeout", "120"], renv)
    assert "completed" in waited.stdout
    check_rows(s3, bucket, "out/", photos, {"skill": "caption", "length": "normal"})

    listed = json.loads(run_cli(["runs", "--json", "--limit", "500"], renv).stdout)
    mine = next(r for r in listed if r["run_id"] == run_id)
    assert mine["status"] == "completed" and mine["output"] == f"s3://{bucket}/out/"
    assert mine["counts"]["ok"] == len(NAMES)
    ids = [r["run_id"] for r in listed]
    assert ids == sorted(ids, reverse=True)  # newest first
    table = run_cli(["runs"], renv).stdout
    assert run_id in table and "completed" in table


@pytest.mark.timeout(240)
def test_resume_finishes_a_shard_whose_builder_was_killed_holding_its_lease(
        s3, bucket, env, broker, tmp_path):
    """Builders SIGKILLed mid-upload leave live leases; Redis restarts empty; ``resume`` by
    run id (no beat) must re-enqueue those shards, which move on once the lease expires."""
    lease = 6.0
    photos = upload_photos(s3, bucket, "in/")
    config = EmulatorConfig(api_key="lease-" + uuid.uuid4().hex, chunking_seconds=0.1,
                            processing_seconds=0.2, min_part_size=0,
                            faults=Faults(latency=0.25))  # slow uploads: builds take a while
    with EmulatorServer(config) as emu:
        renv = private_env(env, broker, MOONDREAM_API_KEY=config.api_key,
                           MOONBATCH_MOONDREAM_URL=emu.url, MOONBATCH_LEASE_SECONDS=str(lease),
                           MOONBATCH_PART_SIZE=str(16 * 1024))
        worker = Worker(renv, renv["MOONBATCH_QUEUE"], tmp_path / "a.log", concurrency=2).start()
        run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/",
                          "--shard-size", "3"], renv).stdout.strip().splitlines()[-1]
        deadline = time.time() + 60
        uploads = []
        while time.time() < deadline and not uploads:
            uploads = [o["Key"] for o in s3.list_objects_v2(
                Bucket=bucket, Prefix="out/_moonbatch/shards/").get("Contents", [])
                if o["Key"].endswith("/upload.json")]
            time.sleep(0.05)
        assert uploads, "no build started"
        worker.kill()  # mid-upload: its leases stay live for up to `lease` seconds
        killed = time.time()
        broker.restart_empty()
        emu.config.faults = Faults()

        resumed = run_cli(["resume", run_id], renv)
        assert "build" in resumed.stdout
        with Worker(renv, renv["MOONBATCH_QUEUE"], tmp_path / "b.log", concurrency=2):
            summary = wait_for_run(s3, bucket, "out/", timeout=120)
        took = time.time() - killed
    print(f"\nlease recovery: {len(uploads)} build(s) killed mid-upload; run complete "
          f"{took:.1f}s after the kill (lease {lease:.0f}s)")
    assert summary["status"] == "completed"
    assert took < lease + 45, took  # about a lease, plus the rebuild on a loaded machine
    check_rows(s3, bucket, "out/", photos, {"skill": "caption", "length": "normal"})


def test_lost_mpu_complete_answers_cost_no_duplicate_batch(s3, bucket, env, broker, tmp_path):
    """Every mpu-complete creates its batch and then drops the connection (and half the
    mpu-create answers are lost too): each round finds its batch in the list and adopts it."""
    photos = upload_photos(s3, bucket, "in/")
    faults = Faults(seed=7, lose_complete_answers=1.0, lose_create_answers=0.5)
    config = EmulatorConfig(api_key="lost-" + uuid.uuid4().hex, chunking_seconds=0.1,
                            processing_seconds=0.2, min_part_size=0, faults=faults)
    with EmulatorServer(config) as emu:
        renv = private_env(env, broker, MOONDREAM_API_KEY=config.api_key,
                           MOONBATCH_MOONDREAM_URL=emu.url)
        with Worker(renv, renv["MOONBATCH_QUEUE"], tmp_path / "worker.log", concurrency=3):
            run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/",
                              "--shard-size", "3"], renv).stdout.strip().splitlines()[-1]
            run_cli(["wait", run_id, "--timeout", "150"], renv)
        created = set(emu.emulator.batches)
        injected = dict(emu.emulator.injected)
    summary = read_json(s3, bucket, "out/run.json")
    shards = summary["shards"]["total"]
    print(f"\nlost answers: {injected['lost_complete']} mpu-complete, {injected['lost_create']} "
          f"mpu-create; batches created {len(created)} for {shards} shards; duplicate_batches "
          f"{summary['shards']['duplicate_batches']}")
    assert injected["lost_complete"] >= shards and injected["lost_create"] >= 1
    assert len(created) == shards  # no duplicate
    assert summary["shards"]["duplicate_batches"] == 0
    assert {bid for b in summary["batches"] for bid in b["batch_ids"]} == created
    check_rows(s3, bucket, "out/", photos, {"skill": "caption", "length": "normal"})
    log = (tmp_path / "worker.log").read_text()
    assert "adopted batch" in log and "may be left open" in log


def _decoy_batch(client, lines: int) -> str:
    """Another user's batch of ``lines`` lines, created now (its rows carry no id of ours)."""
    up = client.create_upload()
    body = b"".join(b'{"id":"other-%d","skill":"caption","image":"x"}\n' % i for i in range(lines))
    part = client.upload_part(up.file_id, up.upload_id, 1, body)
    return client.complete_upload(up.file_id, up.upload_id, [part]).id


@pytest.fixture
def one_round(s3, bucket, env, emulator):
    """``build()`` builds and submits round 0 of a 2-item shard in this process, with claims."""
    from moonbatch.config import get_settings
    from moonbatch.workers import registry
    from moonbatch.workers.models import PlanItem, SkillOptions
    from moonbatch.workers.providers.moondream import records
    from moonbatch.workers.providers.moondream.client import BatchClient
    from moonbatch.workers.providers.moondream.upload import build_and_submit
    from moonbatch.workers.runstate import open_output
    from moonbatch.workers.tasks import line_id_prefix

    # The same item ids as other tests' unclaimed batches in the session emulator (test_recovery
    # builds without claims): only the round's id prefix tells this round's batch apart.
    upload_photos(s3, bucket, "in/", names=NAMES[:2])
    settings = get_settings()
    state = open_output(f"s3://{bucket}/out/", settings)
    inputs = open_output(f"s3://{bucket}/in/", settings)
    client = BatchClient(emulator.url, emulator.config.api_key, max_attempts=2)
    items = [PlanItem(n, 0) for n in NAMES[:2]]
    claims = records.BatchClaims(registry.open_state(settings), output=state.url, shard=0, rnd=0)

    prefix = line_id_prefix("test-" + uuid.uuid4().hex, 0, 0)  # as the build task gives it

    def build():
        return build_and_submit(shard=0, items=items, options=SkillOptions(skill="caption"),
                                model=None, input_store=inputs, state=state, client=client,
                                part_size=1 << 20, concurrency=2, claims=claims, id_prefix=prefix)

    return {"build": build, "client": client, "state": state, "prefix": prefix,
            "owner": lambda bid: records.batch_owner(registry.open_state(settings), bid)}


def wait_done(client, batch_id: str) -> None:
    deadline = time.time() + 30
    while not client.get_batch(batch_id).done:
        assert time.time() < deadline
        time.sleep(0.05)


def test_a_lost_answer_is_told_apart_from_a_batch_of_the_same_size(one_round, emulator):
    """A decoy batch of the same line count is created in the same moment as the lost answer's
    batch: the round waits for the results, adopts its own batch by the ids in them and never
    the decoy (no duplicate)."""
    from moonbatch.workers.providers.moondream.recovery import AwaitingBatch

    client = one_round["client"]
    decoy = _decoy_batch(client, 2)
    wait_done(client, decoy)
    before = set(emulator.emulator.batches)
    # The lost answer's batch processes for a minute: no timing can let it finish early.
    emulator.config.faults = Faults(lose_complete_answers=1.0)
    emulator.config.processing_seconds = 60.0
    with pytest.raises(AwaitingBatch):  # two candidates, one still running: results will tell
        one_round["build"]()
    emulator.config.faults = Faults()
    emulator.config.processing_seconds = 0.2
    (lost,) = set(emulator.emulator.batches) - before
    with emulator.emulator.lock:  # now let it finish (if it chunked already)
        emulator.emulator.batches[lost].processing_end = time.time()
    wait_done(client, lost)
    _, record = one_round["build"]()
    assert record.batch_id == lost and record.recovered
    assert set(emulator.emulator.batches) - before == {lost}  # nothing sent again
    assert one_round["owner"](decoy) is None and one_round["owner"](lost)["shard"] == 0


def test_a_lost_answer_that_created_no_batch_never_adopts_another(one_round, emulator):
    """A dead attempt sent mpu-complete (``submit.json``) but no batch came of it, while a
    decoy of the same size exists: the round sends itself again, counting one possible
    duplicate, and leaves the decoy alone."""
    from moonbatch.workers import layout
    from moonbatch.workers.models import ShardBuild
    from moonbatch.workers.providers.moondream.records import SubmitRecord
    from moonbatch.workers.storage import get_json, put_json

    client, state = one_round["client"], one_round["state"]
    decoy = _decoy_batch(client, 2)
    wait_done(client, decoy)
    put_json(state, layout.round_doc(0, 0, "build"),
             ShardBuild(lines=[0, 1], id_prefix=one_round["prefix"]).model_dump())
    put_json(state, layout.round_doc(0, 0, "submit"),
             SubmitRecord(file_id="gone", lines=2, bytes=100, sent_at=time.time()).model_dump())
    before = set(emulator.emulator.batches)
    _, record = one_round["build"]()
    (new,) = set(emulator.emulator.batches) - before
    assert record.batch_id == new != decoy and not record.recovered
    assert get_json(state, layout.round_doc(0, 0, "orphans"))["count"] == 1
    assert one_round["owner"](decoy) is None


@pytest.mark.timeout(240)
def test_reconciler_recovers_a_run_after_redis_loss_without_resume(s3, bucket, env, broker,
                                                                     tmp_path):
    """submit; Redis restarts empty before any worker saw the messages; a worker and beat
    start; nobody calls resume: the beat reconciler notices the loss and finishes the run."""
    photos = upload_photos(s3, bucket, "in/", names=NAMES)
    renv = private_env(env, broker, MOONBATCH_RECONCILE_INTERVAL="1")
    run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--shard-size", "2"], renv)
    broker.restart_empty()
    beat = subprocess.Popen(
        ["celery", "-A", "moonbatch.workers", "beat", "-s", str(tmp_path / "beat-schedule"), "--loglevel",
         "WARNING"], env=renv, stdout=open(tmp_path / "beat.log", "wb"),
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with Worker(renv, renv["MOONBATCH_QUEUE"], tmp_path / "worker.log"):
            summary = wait_for_run(s3, bucket, "out/", timeout=150)
    finally:
        beat.terminate()
        beat.wait(10)
    assert summary["status"] == "completed"
    assert "broker lost its data" in (tmp_path / "worker.log").read_text()
    check_rows(s3, bucket, "out/", photos, {"skill": "caption", "length": "normal"})


@pytest.mark.timeout(240)
def test_moonbatch_run_heals_after_redis_loss(s3, bucket, env, broker, tmp_path):
    """``moonbatch run`` with local workers runs the reconciler itself: Redis restarts empty
    while the batches are processing and the command still finishes every item."""
    names = SKIMAGE_PHOTOS[:6]
    photos = upload_photos(s3, bucket, "in/", names=names)
    config = EmulatorConfig(api_key="heal-" + uuid.uuid4().hex, chunking_seconds=0.2,
                            processing_seconds=4.0, min_part_size=0)
    with EmulatorServer(config) as emu:
        renv = private_env(env, broker, MOONDREAM_API_KEY=config.api_key,
                           MOONBATCH_MOONDREAM_URL=emu.url, MOONBATCH_RECONCILE_INTERVAL="1")
        proc = subprocess.Popen(
            moonbatch_cmd() + ["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/",
                               "--shard-size", "3", "--workers", "2", "--timeout", "150"],
            env=renv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and len(emu.emulator.batches) < 2:
            time.sleep(0.1)
        assert len(emu.emulator.batches) == 2, "the batches were not submitted"
        broker.restart_empty()  # the scheduled polls are gone with it
        stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    assert "broker lost its data" in stderr
    check_rows(s3, bucket, "out/", photos, {"skill": "caption", "length": "normal"})

