"""Issue 9, the broker: ``moonbatch run``'s local workers take only their own run's work (a run's
queue is in its spec, and every enqueue goes there), the embedded broker for ``run`` without
Redis, and clean exits (SIGTERM) that leave no process and no temporary file behind.

Real connections throughout: private ``redis-server``s, moto's S3 server, the emulator over
HTTP and real ``moonbatch`` and worker processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from moonbatch.emulator.server import EmulatorConfig, EmulatorServer
from tests.conftest import (
    Worker,
    free_port,
    moonbatch_cmd,
    photos_dir,
    private_env,
    read_json,
    run_cli,
    upload_photos,
    wait_for_healthz,
    wait_for_run,
)

NAMES = ("coffee.png", "rocket.jpg", "chelsea.png")




def spec_of(s3, bucket: str, prefix: str) -> dict:
    return read_json(s3, bucket, prefix + "_moonbatch/spec.json")


def leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("moonbatch-"))


def processes_with_tmpdir(tmp: Path) -> list[psutil.Process]:
    """Live processes started with ``TMPDIR=tmp`` (this test's children and theirs)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("TMPDIR") == str(tmp) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_local_workers_and_a_fleet_never_take_each_others_work(s3, bucket, env, broker, tmp_path):
    """A fleet run waits on the fleet's queue while ``moonbatch run`` completes with local
    workers: they leave it alone. Then a fleet worker with a wrong API key runs beside another
    ``moonbatch run``: it fails the fleet run it takes, and never touches the local run."""
    upload_photos(s3, bucket, "in/", names=NAMES)
    renv = private_env(env, broker)
    fleet_queue = renv["MOONBATCH_QUEUE"]
    run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/fleet/"], renv)
    assert spec_of(s3, bucket, "fleet/")["queue"] == fleet_queue
    queued = broker.client(0).llen(fleet_queue), broker.client(0).llen(fleet_queue + "-control")
    assert queued == (1, 0)  # build_shard; its merge finalises (no finalize_run message)

    proc = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/local1/", "--workers", "1",
                    "--timeout", "120"], renv)
    assert "completed" in proc.stdout
    spec = spec_of(s3, bucket, "local1/")
    assert spec["queue"] == f"moonbatch-run-{spec['run_id']}"
    # The fleet's run was not taken.
    assert (broker.client(0).llen(fleet_queue),
            broker.client(0).llen(fleet_queue + "-control")) == queued
    assert read_json(s3, bucket, "fleet/run.json")["status"] == "running"

    with Worker({**renv, "MOONDREAM_API_KEY": "not-the-key"}, fleet_queue,
                tmp_path / "fleet.log", concurrency=2):
        proc = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/local2/", "--workers", "1",
                        "--timeout", "120"], renv)
        assert "completed" in proc.stdout  # no task of it went to the keyless fleet
        deadline = time.time() + 60  # the fleet was consuming all along: it failed its run
        while time.time() < deadline and not s3.list_objects_v2(
                Bucket=bucket, Prefix="fleet/_moonbatch/failed.json").get("KeyCount"):
            time.sleep(0.3)
    failure = read_json(s3, bucket, "fleet/_moonbatch/failed.json")
    assert "AuthenticationError" in failure["error"]


def test_enqueues_go_to_the_runs_queues_and_old_specs_to_the_settings_queue(
        s3, bucket, env, redis_server, monkeypatch):
    """``enqueue`` (and the reconciler through ``advance_shard``) publish on the spec's queue,
    light steps (polls, finalising) on its control queue ``<queue>-control``; a spec written
    before runs recorded a queue falls back to ``MOONBATCH_QUEUE``. Queues of this test's own on
    the session's Redis (no worker consumes them), deleted afterwards."""
    from moonbatch.config import reload_settings
    from moonbatch.workers import layout
    from moonbatch.workers.enqueue import FINALIZE_RUN, POLL_ROUND, enqueue
    from moonbatch.workers.models import RunSpec, SkillOptions
    from moonbatch.workers.reconcile import reconcile_run
    from moonbatch.workers.runstate import open_output
    from moonbatch.workers.storage import put_json

    default_queue = "default-" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("MOONBATCH_QUEUE", default_queue)
    settings = reload_settings()  # the app keeps its broker: only the fallback queue changes
    redis = redis_server.client(0)
    outputs = {}
    try:
        upload_photos(s3, bucket, "in/", names=NAMES[:1])
        for name, queue in (("old", None), ("new", "own-" + uuid.uuid4().hex[:8])):
            output = f"s3://{bucket}/{name}/"
            spec = RunSpec(run_id=f"{name}-run", input=f"s3://{bucket}/in/", output=output,
                           options=SkillOptions(skill="caption"), shard_size=10,
                           max_shard_bytes=10**6, created_at=time.time(), queue=queue)
            doc = spec.model_dump()
            if queue is None:
                del doc["queue"]  # as written before the field existed
            store = open_output(output, settings)
            put_json(store, layout.SPEC, doc)
            store.put(layout.plan_items(0), b'{"id":"coffee.png","size":1}\n')
            put_json(store, layout.PLAN, {"run_id": spec.run_id, "shards": 1, "items": 1})
            outputs[name] = (output, spec.run_id, queue or default_queue)
        for output, run_id, queue in outputs.values():
            enqueue(FINALIZE_RUN, (output, run_id))
            enqueue(POLL_ROUND, (output, run_id, 0, 0, "chain"))
            assert (redis.llen(queue), redis.llen(queue + "-control")) == (0, 2)
            # The reconciler after a broker loss: the shard's build, and a finalize.
            assert reconcile_run(output, run_id, full=True) == {"build": 1}
            assert (redis.llen(queue), redis.llen(queue + "-control")) == (1, 3)

        def tasks(queue: str) -> set[str]:
            return {json.loads(m)["headers"]["task"] for m in redis.lrange(queue, 0, -1)}

        assert tasks(outputs["new"][2]) == {"moonbatch.build_shard"}
        assert tasks(outputs["new"][2] + "-control") == {"moonbatch.finalize_run",
                                                         "moonbatch.poll_round"}
    finally:
        for _, run_id, queue in outputs.values():
            redis.delete(queue, queue + "-control")
            redis.delete(f"moonbatch:canary:{run_id}")
        monkeypatch.undo()
        reload_settings()


def test_io_and_control_workers_split_the_work(s3, bucket, env, broker, tmp_path):
    """Workers of the I/O queue build and merge; workers of the control queue poll and
    finalise: a run needs both, and each kind only ever runs its own steps."""
    upload_photos(s3, bucket, "in/", names=NAMES)
    renv = private_env(env, broker)
    queue = renv["MOONBATCH_QUEUE"]
    io_log, control_log = tmp_path / "io.log", tmp_path / "control.log"
    with Worker(renv, queue, io_log, queues=("io",)):
        run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--shard-size", "2"],
                renv)
        deadline = time.time() + 60  # the builds are done, the polls wait for their workers
        while time.time() < deadline and broker.client(0).llen(queue + "-control") < 3:
            time.sleep(0.2)
        assert read_json(s3, bucket, "out/run.json")["status"] == "running"
        with Worker(renv, queue, control_log, queues=("control",)):
            wait_for_run(s3, bucket, "out/", timeout=120)
    assert read_json(s3, bucket, "out/run.json")["status"] == "completed"
    def ran(log: Path) -> set[str]:  # "Task moonbatch.build_shard[<id>] received"
        return set(re.findall(r"Task (moonbatch\.\w+)\[[^\]]+\] received", log.read_text()))

    assert ran(io_log) == {"moonbatch.build_shard", "moonbatch.merge_round"}
    assert {"moonbatch.poll_round", "moonbatch.finalize_run"} >= ran(control_log) >= {
        "moonbatch.poll_round"}


def test_run_with_an_unreachable_broker_names_the_way_out(env, tmp_path):
    """No Redis where the settings say: one line, no traceback, naming --embedded-broker; and
    the options that cannot work with an embedded broker say so in one line."""
    dead = {**env, "MOONBATCH_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
            "MOONBATCH_RESULT_BACKEND": f"redis://127.0.0.1:{free_port()}/1",
            "TMPDIR": str(tmp_path)}
    photos = tmp_path / "in"
    photos.mkdir()
    (photos / "coffee.png").write_bytes((photos_dir() / "coffee.png").read_bytes())
    proc = run_cli(["run", str(photos), str(tmp_path / "out"), "--workers", "1"], dead,
                   check=False, timeout=60)
    assert proc.returncode == 3, proc.stderr  # a check before work failed
    assert "cannot reach Redis" in proc.stderr and "--embedded-broker" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    for args in (["run", str(tmp_path), str(tmp_path / "o2"), "--workers", "0",
                  "--embedded-broker"],
                 ["submit", str(tmp_path), str(tmp_path / "o3")]):
        proc = run_cli(args, {**dead, "MOONBATCH_BROKER_URL": "embedded"}, check=False,
                       timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert leftovers(tmp_path) == [] and not processes_with_tmpdir(tmp_path)


def test_run_with_the_embedded_broker_without_redis(s3, bucket, env, tmp_path):
    """``moonbatch run --embedded-broker``: no Redis configured or reachable, the run completes
    on a private redis-server, which is gone afterwards with its folder."""
    upload_photos(s3, bucket, "in/", names=NAMES)
    renv = {**env, "MOONBATCH_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
            "MOONBATCH_RESULT_BACKEND": f"redis://127.0.0.1:{free_port()}/1",
            "TMPDIR": str(tmp_path)}
    proc = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "2",
                    "--shard-size", "2", "--embedded-broker", "--timeout", "120"], renv)
    assert "completed" in proc.stdout
    assert read_json(s3, bucket, "out/run.json")["counts"]["ok"] == len(NAMES)
    assert leftovers(tmp_path) == [] and not processes_with_tmpdir(tmp_path)


@pytest.mark.timeout(120)
def test_sigterm_stops_run_its_workers_and_broker_and_removes_temporary_files(
        s3, bucket, env, tmp_path):
    """SIGTERM to ``moonbatch run --embedded-broker`` mid-run: it exits through its clean-up;
    no worker, no redis-server and no ``moonbatch-*`` temporary file is left."""
    upload_photos(s3, bucket, "in/", names=NAMES)
    config = EmulatorConfig(api_key="term-" + uuid.uuid4().hex, chunking_seconds=0.1,
                            processing_seconds=60, min_part_size=0)
    with EmulatorServer(config) as emu:
        renv = {**env, "MOONDREAM_API_KEY": config.api_key, "MOONBATCH_MOONDREAM_URL": emu.url,
                "MOONBATCH_BROKER_URL": "embedded", "TMPDIR": str(tmp_path)}
        proc = subprocess.Popen(moonbatch_cmd() + ["run", f"s3://{bucket}/in/",
                                                   f"s3://{bucket}/out/", "--workers", "1"],
                                env=renv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not emu.emulator.batches:
            time.sleep(0.1)
        assert emu.emulator.batches, "no batch was submitted"
        assert any(n.startswith("moonbatch-workers-") for n in leftovers(tmp_path))
        assert any(n.startswith("moonbatch-broker-") for n in leftovers(tmp_path))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr, stderr
    deadline = time.time() + 15
    while time.time() < deadline and processes_with_tmpdir(tmp_path):
        time.sleep(0.2)
    assert not processes_with_tmpdir(tmp_path)
    assert leftovers(tmp_path) == []


def test_embedded_redis_is_private_and_leaves_nothing(tmp_path, monkeypatch):
    """The embedded broker answers only with its password, which is not on its command line
    (``ps`` shows that to everyone); ``stop()`` ends it and deletes its folder."""
    import redis

    from moonbatch.workers.embedded import EmbeddedRedis

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    with EmbeddedRedis() as server:
        assert redis.Redis.from_url(server.url(0)).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis("127.0.0.1", server.port).ping()
        assert server.password not in " ".join(psutil.Process(server.proc.pid).cmdline())
        assert leftovers(tmp_path) and server.alive()
        proc = server.proc
    assert proc.poll() is not None and leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_emulator_deletes_its_folder_on_sigterm_and_sigint(tmp_path, sig):
    """``moonbatch emulator`` stopped by a signal deletes its ``moonbatch-emulator-*`` folder."""
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    # SIGINT as in a terminal, even when pytest runs in the background (where the shell
    # ignores it, and children inherit that).
    proc = subprocess.Popen(moonbatch_cmd() + ["emulator", "--port", str(port), "--api-key", "k"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for_healthz(port, proc)
        (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("moonbatch-emulator-")]
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert str(folder) in stderr  # it says where its files are
    assert not folder.exists() and leftovers(tmp_path) == []
    assert "Traceback" not in stderr


@pytest.mark.timeout(240)
def test_resume_with_workers_finishes_a_run_that_run_left(s3, bucket, env, emulator, tmp_path):
    """``moonbatch run --embedded-broker`` times out (its workers and broker stop, taking the
    scheduled polls with them); ``moonbatch resume RUN_ID --workers 1 --embedded-broker``
    re-enqueues everything on the run's own queue of a new private broker and completes it."""
    upload_photos(s3, bucket, "in/", names=NAMES)
    emulator.config.processing_seconds = 8.0
    renv = {**env, "MOONBATCH_BROKER_URL": "embedded", "TMPDIR": str(tmp_path)}
    proc = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "1",
                    "--timeout", "4"], renv, check=False)
    assert proc.returncode == 4 and "not complete after 4s" in proc.stderr, proc.stderr
    run_id = spec_of(s3, bucket, "out/")["run_id"]
    hint = run_cli(["resume", run_id], {**env, "TMPDIR": str(tmp_path)})
    assert f"moonbatch-run-{run_id}" in hint.stderr and "--workers" in hint.stderr
    emulator.config.processing_seconds = 0.2
    proc = run_cli(["resume", run_id, "--workers", "1", "--timeout", "120"], renv)
    assert "completed" in proc.stdout
    assert read_json(s3, bucket, "out/run.json")["counts"]["ok"] == len(NAMES)
    assert leftovers(tmp_path) == [] and not processes_with_tmpdir(tmp_path)
