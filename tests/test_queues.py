"""Issue 16 (1): every queue served by default, and a run whose queue nobody consumes says so.

A worker started as Celery's docs start one (``celery -A moonbatch.workers worker``, no ``-Q``) serves
both fleet queues (the I/O queue and its control queue); ``-Q`` still picks; run-private queues
stay out of a plain worker's. ``wait`` and ``status`` name a queue of the run that no worker
consumes, with the command that serves it, and keep waiting.

Real connections throughout: a private ``redis-server`` per test, moto's S3 server, the emulator
over HTTP and real worker and ``moonbatch`` processes.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

from celery import Celery

from tests.conftest import (
    Worker,
    moonbatch_cmd,
    private_env,
    read_json,
    read_results,
    run_cli,
    upload_photos,
)

NAMES = ("coffee.png", "rocket.jpg", "chelsea.png", "camera.png")


class PlainWorker(Worker):
    """``celery -A moonbatch.workers worker`` exactly as Celery's docs and README start one: no ``-Q``
    (its ``MOONBATCH_QUEUE`` env, a queue of the test's own, keeps other tests' work away)."""

    def __init__(self, env: dict[str, str], queue: str, log_path: Path) -> None:
        super().__init__(env, queue, log_path)
        i = self.args.index("-Q")
        del self.args[i:i + 2]


def queues_of_workers(broker_url: str, deadline: float = 60) -> dict[str, set[str]]:
    """Each worker's consumed queues, from Celery's remote control on ``broker_url`` (an app of
    its own: this process's app is on the session's broker); waits until one answers."""
    app = Celery("probe", broker=broker_url)
    try:
        end = time.time() + deadline
        while time.time() < end:
            replies = app.control.inspect(timeout=3).active_queues()
            if replies:
                return {w: {q["name"] for q in qs} for w, qs in replies.items()}
        raise AssertionError(f"no worker answered on {broker_url} within {deadline:.0f}s")
    finally:
        app.close()


def test_a_plain_worker_finishes_a_fleet_run(s3, bucket, env, broker, tmp_path):
    """``celery -A moonbatch.workers worker`` with no ``-Q`` takes both the builds (the I/O queue) and
    the polls and finalising (the control queue): ``run --workers 0`` completes, with no warning
    about queues. The worker consumes exactly the fleet's two queues (no run-private one)."""
    data = upload_photos(s3, bucket, "in/", names=NAMES)
    renv = private_env(env, broker)
    queue = renv["MOONBATCH_QUEUE"]
    with PlainWorker(renv, queue, tmp_path / "plain.log") as worker:
        assert "-Q" not in worker.args and "--queues" not in worker.args
        start = time.time()
        proc = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "0",
                        "--shard-size", "2", "--timeout", "120"], renv, timeout=240, check=False)
        took = time.time() - start
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
        consumed = queues_of_workers(renv["MOONBATCH_BROKER_URL"])
    print(f"plain worker: run --workers 0 completed in {took:.1f}s; it consumed {consumed}")
    assert list(consumed.values()) == [{queue, f"{queue}-control"}]
    assert "no worker consumes" not in proc.stderr
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["status"] == "completed"
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(data)
    assert all(r["status"] == "ok" for r in rows), rows
    assert summary["counts"]["ok"] == len(NAMES)


def test_a_plain_worker_leaves_run_private_queues_alone(s3, bucket, env, broker, tmp_path):
    """A run of ``moonbatch run``'s local workers (on its own ``moonbatch-run-<id>`` queues)
    completes beside a plain fleet worker on the same broker, which receives none of its
    tasks: run-private queues are published to (created on demand), never consumed by it."""
    upload_photos(s3, bucket, "in/", names=NAMES[:2])
    renv = private_env(env, broker)
    with PlainWorker(renv, renv["MOONBATCH_QUEUE"], tmp_path / "plain.log") as worker:
        proc = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/local/", "--workers", "1",
                        "--timeout", "120"], renv, timeout=240)
        assert "completed" in proc.stdout
    spec = read_json(s3, bucket, "local/_moonbatch/spec.json")
    assert spec["queue"] == f"moonbatch-run-{spec['run_id']}"
    # The worker is alone on its queues of a private broker: any task it received was the
    # local run's.
    assert not re.findall(r"Task moonbatch\.\w+\[[^\]]+\] received", worker.log_path.read_text())


def read_stderr(proc: subprocess.Popen, lines: list[tuple[float, str]]) -> threading.Thread:
    """Collect ``proc``'s stderr lines with the time each arrived, in a thread."""
    def pump() -> None:
        for line in proc.stderr:
            lines.append((time.time(), line))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def test_wait_and_status_name_the_queue_nobody_consumes(s3, bucket, env, broker, tmp_path):
    """Workers on the I/O queue only (``-Q <queue>``): the run's polls wait on
    ``<queue>-control`` forever. ``moonbatch wait RUN_ID --timeout`` says so within seconds,
    once, naming that queue and the command that serves it, and goes on waiting until its
    timeout (exit 4); ``status`` says it in text and in --json. Once a control worker starts,
    the same ``wait`` finishes the run and ``status`` names no queue."""
    upload_photos(s3, bucket, "in/", names=NAMES[:2])
    renv = private_env(env, broker)
    queue, control = renv["MOONBATCH_QUEUE"], renv["MOONBATCH_QUEUE"] + "-control"
    with Worker(renv, queue, tmp_path / "io.log", queues=("io",)):
        assert list(queues_of_workers(renv["MOONBATCH_BROKER_URL"]).values()) == [{queue}]
        run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/"],
                         renv).stdout.strip().splitlines()[-1]
        timeout = 45
        started = time.time()
        waiting = subprocess.Popen(moonbatch_cmd() + ["wait", run_id, "--timeout", str(timeout)],
                                   env=renv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        lines: list[tuple[float, str]] = []
        pump = read_stderr(waiting, lines)
        try:
            deadline = started + timeout - 5
            warned = None
            while time.time() < deadline and warned is None:
                warned = next((t for t, line in lines if "no worker consumes" in line), None)
                time.sleep(0.1)
            assert warned is not None, "".join(line for _, line in lines)
            assert waiting.poll() is None  # it warns and goes on waiting
            code = waiting.wait(timeout + 60)
        finally:
            if waiting.poll() is None:
                waiting.kill()
        pump.join(10)
        text = "".join(line for _, line in lines)
        print(f"wait warned {warned - started:.1f}s after it started, exited {code} after "
              f"{time.time() - started:.1f}s:\n{text}")
        assert code == 4
        warnings = [line for _, line in lines if "no worker consumes" in line]
        assert len(warnings) == 1, text  # once
        assert f"queue {control} (its polls and finalising wait there)" in warnings[0]
        assert f"start workers with: celery -A moonbatch.workers worker -Q {queue},{control}" in warnings[0]
        assert f"queue {queue} " not in warnings[0]  # the I/O queue has its worker
        assert f"not complete after {timeout}s" in text

        status = run_cli(["status", run_id], renv)
        print("status:", status.stdout)
        assert f"no worker consumes queue {control}" in status.stdout
        assert f"-Q {queue},{control}" in status.stdout
        doc = json.loads(run_cli(["status", run_id, "--json"], renv).stdout)
        assert doc["status"] == "running" and doc["queues_without_consumer"] == [control]

        with Worker(renv, queue, tmp_path / "control.log", queues=("control",)):
            done = run_cli(["wait", run_id, "--timeout", "120"], renv, timeout=240)
            assert "no worker consumes" not in done.stderr
    doc = json.loads(run_cli(["status", run_id, "--json"], renv).stdout)
    assert doc["status"] == "completed" and doc["queues_without_consumer"] is None
    assert doc["counts"]["ok"] == 2


def test_status_names_each_unserved_queue_and_none_when_all_are(s3, bucket, env, broker, emulator,
                                                                  tmp_path):
    """``status --json`` of a running run lists the queues without a consumer (text ``status``
    and ``resume`` without --workers name them): both with no worker, the I/O queue with a
    control worker only, none (an empty list: the look was made) with workers on both; null,
    and status still answers in bounded time, when the broker cannot be asked."""
    upload_photos(s3, bucket, "in/", names=NAMES[:1])
    renv = private_env(env, broker)
    queue, control = renv["MOONBATCH_QUEUE"], renv["MOONBATCH_QUEUE"] + "-control"
    run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/"],
                     renv).stdout.strip().splitlines()[-1]

    def unserved(environ: dict[str, str] = renv) -> list[str] | None:
        doc = json.loads(run_cli(["status", run_id, "--json"], environ).stdout)
        assert doc["status"] == "running"
        return doc["queues_without_consumer"]

    try:
        assert unserved() == [queue, control]
        both = f"no worker consumes queues {queue} (its builds and merges wait there); {control}"
        assert both in run_cli(["status", run_id], renv).stdout
        # resume without --workers re-enqueues the run's work, and says nobody will take it.
        assert both in run_cli(["resume", run_id], renv).stderr
        emulator.config.processing_seconds = 600  # the batch stays at the API: the run runs
        with Worker(renv, queue, tmp_path / "control.log", queues=("control",)):
            assert unserved() == [queue]
            start = time.time()
            assert unserved({**renv, "MOONBATCH_BROKER_URL": "redis://127.0.0.1:1/0"}) is None
            print(f"status with an unreachable broker took {time.time() - start:.1f}s")
            assert time.time() - start < 60
            with Worker(renv, queue, tmp_path / "io.log", queues=("io",)):
                assert unserved() == []
                assert "no worker consumes" not in run_cli(["status", run_id], renv).stdout
    finally:
        run_cli(["cancel", run_id], renv, check=False)
