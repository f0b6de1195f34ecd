"""The command line a data engineer trusts (issue 9): checks before work, clean failures,
idempotent reruns, ``clean``, truthful ``status``, Ctrl-C, ``--workers`` on resume, help.

Everything over real connections: the session's Redis (or a closed port), moto's S3 server, the
emulator over HTTP, real ``moonbatch`` processes and Celery workers.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
import uuid

import pytest

from moonbatch.workers import layout
from tests.conftest import moonbatch_cmd, read_json, read_results, run_cli, upload_photos

NAMES = ("coffee.png", "rocket.jpg", "chelsea.png", "camera.png")
KEYS_PAGE = "https://moondream.ai/c/cloud/api-keys"


def closed_port() -> int:
    """A port nothing listens on: bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preflight_fails(args: list[str], env: dict[str, str], label: str
                    ) -> subprocess.CompletedProcess:
    """Run a command that must fail its checks: exit 3, one line, no traceback, and soon: the
    checks are bounded (the key checks by ``KEY_CHECK_SECONDS``, 8 s); the 30 s bound leaves a
    loaded machine room to start the interpreter and still catches a check that retries on."""
    t0 = time.monotonic()
    proc = run_cli(args, env, check=False, timeout=60)
    wall = time.monotonic() - t0
    print(f"\npreflight failure [{label}]: {wall:.2f}s: {proc.stderr.strip()}")
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert wall < 30, f"{label}: {wall:.1f}s"
    return proc


def nothing_under(s3, bucket: str, prefix: str) -> bool:
    return "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)


# -- checks before work -------------------------------------------------------------------------
def test_redis_down_is_one_line(s3, bucket, env):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    port = closed_port()
    down = {**env, "MOONBATCH_BROKER_URL": f"redis://127.0.0.1:{port}/0",
            "MOONBATCH_RESULT_BACKEND": f"redis://127.0.0.1:{port}/1"}
    proc = preflight_fails(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "1"],
                           down, "Redis down")
    assert proc.stderr.startswith(f"error: broker: cannot reach Redis at redis://127.0.0.1:{port}/0 (")
    assert proc.stderr.rstrip().endswith(
        "start Redis there, point MOONBATCH_BROKER_URL at a running one, or (moonbatch run on "
        "this machine) pass --embedded-broker")
    assert nothing_under(s3, bucket, "out/")


def test_missing_input_bucket(s3, bucket, env):
    missing = "no-such-" + uuid.uuid4().hex[:8]
    proc = preflight_fails(["run", f"s3://{missing}/photos/", f"s3://{bucket}/out/"], env,
                           "missing input bucket")
    assert proc.stderr.strip() == (f"error: INPUT: bucket '{missing}' of s3://{missing}/photos/ "
                                   "does not exist (NoSuchBucket): check the bucket name")
    assert nothing_under(s3, bucket, "out/")


def test_typo_input_fails_and_allow_empty_accepts_it(s3, bucket, env, fleet):
    upload_photos(s3, bucket, "photos/", names=("coffee.png",))
    proc = preflight_fails(["run", f"s3://{bucket}/photoz/", f"s3://{bucket}/out/", "--workers",
                            "0"], env, "typo in INPUT")
    assert proc.stderr.strip() == (
        f"error: INPUT: no objects under s3://{bucket}/photoz/ (s3://b/photos means the prefix "
        "s3://b/photos/): check the path, or pass --allow-empty to accept an empty run")
    assert nothing_under(s3, bucket, "out/")
    ok = run_cli(["run", f"s3://{bucket}/photoz/", f"s3://{bucket}/out/", "--workers", "0",
                  "--allow-empty", "--timeout", "60"], env)
    assert "completed" in ok.stdout
    assert read_json(s3, bucket, "out/run.json")["counts"]["total"] == 0


def test_wrong_api_key(s3, bucket, env, emulator):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    wrong = {**env, "MOONDREAM_API_KEY": "wrong-" + uuid.uuid4().hex}
    proc = preflight_fails(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/"], wrong,
                           "wrong API key")
    assert proc.stderr.strip() == (
        f"error: API key: the Moondream Batch API at {emulator.url} refused the key in "
        f"MOONDREAM_API_KEY (HTTP 401): set a valid key (see {KEYS_PAGE})")
    assert wrong["MOONDREAM_API_KEY"] not in proc.stderr + proc.stdout
    assert nothing_under(s3, bucket, "out/")


def test_missing_api_key(s3, bucket, env):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    nokey = {k: v for k, v in env.items() if k not in ("MOONDREAM_API_KEY", "MOONBATCH_API_KEY")}
    proc = preflight_fails(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/"], nokey,
                           "missing API key")
    assert proc.stderr.strip() == ("error: API key: MOONDREAM_API_KEY is not set: export "
                                   f"MOONDREAM_API_KEY=<your key> (create one at {KEYS_PAGE})")
    assert nothing_under(s3, bucket, "out/")


def test_unwritable_output(s3, bucket, env, tmp_path):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = preflight_fails(["run", f"s3://{bucket}/in/", str(blocker / "out")], env,
                           "unwritable output (local)")
    assert proc.stderr.strip() == (f"error: OUTPUT: {blocker / 'out'}/ cannot be created: "
                                   f"{blocker} is a file, not a directory")
    missing = "no-such-" + uuid.uuid4().hex[:8]
    proc = preflight_fails(["run", f"s3://{bucket}/in/", f"s3://{missing}/out/"], env,
                           "missing output bucket")
    assert proc.stderr.strip() == (f"error: OUTPUT: bucket '{missing}' of s3://{missing}/out/ "
                                   f"does not exist (NoSuchBucket): create it (aws s3 mb "
                                   f"s3://{missing})")


def test_unwritable_state_location(s3, bucket, env):
    upload_photos(s3, bucket, "in/", names=("coffee.png",))
    missing = "no-such-" + uuid.uuid4().hex[:8]
    proc = preflight_fails(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/"],
                           {**env, "MOONBATCH_STATE_URL": f"s3://{missing}/state/"},
                           "unwritable state location")
    assert proc.stderr.strip() == (
        f"error: state: bucket '{missing}' of s3://{missing}/state/ does not exist "
        f"(NoSuchBucket): create it (aws s3 mb s3://{missing}) (the run registry, "
        "MOONBATCH_STATE_URL)")
    assert nothing_under(s3, bucket, "out/")


# -- idempotent reruns --------------------------------------------------------------------------
def test_same_command_twice_is_already_complete(s3, bucket, env, fleet, emulator):
    upload_photos(s3, bucket, "in/", names=NAMES[:2])
    args = ["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "0", "--timeout",
            "120"]
    first = run_cli(args, env)
    run_id = read_json(s3, bucket, "out/run.json")["run_id"]
    batches = len(emulator.emulator.batches)

    again = run_cli(args, env)  # an orchestrator's retry after success: exit 0
    assert (f"run {run_id} at s3://{bucket}/out/ is already complete (same input and options): "
            "nothing to do") in again.stderr
    assert "completed" in again.stdout and run_id in again.stdout
    assert f"s3://{bucket}/out/results/" in first.stdout
    assert len(emulator.emulator.batches) == batches  # nothing sent again

    sub = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/"], env)
    assert sub.stdout.strip().splitlines()[-1] == run_id

    other = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--skill", "detect",
                     "--object", "cup", "--workers", "0"], env, check=False)
    assert other.returncode == 3
    assert (f"s3://{bucket}/out/ holds run {run_id} (completed) of another command "
            "(object: None → cup; skill: caption → detect): choose a new OUTPUT, or pass "
            f"--force to start a new run in s3://{bucket}/out/<new run id>/") in other.stderr

    forced = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--skill", "detect",
                      "--object", "cup", "--workers", "0", "--force", "--timeout", "120"], env)
    new = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]
           if o["Key"].endswith("/run.json") and o["Key"] != "out/run.json"]
    assert len(new) == 1 and "completed" in forced.stdout
    assert read_json(s3, bucket, new[0])["skill"] == "detect"
    assert read_json(s3, bucket, "out/run.json")["run_id"] == run_id  # the first run untouched


def write_dead_start(s3, bucket: str, args: dict) -> str:
    """What a producer that died before its plan was complete leaves: spec.json and run.json,
    an expired planning lease; returns its run id."""
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import new_spec
    from moonbatch.workers.models import SkillOptions
    from moonbatch.workers.runstate import open_output
    from moonbatch.workers.storage import put_json

    spec = new_spec(f"s3://{bucket}/in/", f"s3://{bucket}/out/", SkillOptions(**args),
                    get_settings())
    store = open_output(spec.output, get_settings())
    put_json(store, layout.SPEC, spec.model_dump())
    put_json(store, layout.SUMMARY, {"run_id": spec.run_id, "status": "running"})
    put_json(store, layout.PLANNING, {"owner": "dead", "heartbeat": time.time() - 90,
                                      "expires": time.time() - 60})
    return spec.run_id


def test_a_dead_start_is_taken_over_by_the_same_command(s3, bucket, env, fleet):
    upload_photos(s3, bucket, "in/", names=NAMES[:2])
    run_id = write_dead_start(s3, bucket, {"skill": "caption"})
    other = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--skill", "query",
                     "--question", "why?", "--workers", "0"], env, check=False)
    assert other.returncode == 3 and run_id in other.stderr and "choose a new OUTPUT" in other.stderr

    # A live producer's lease: refused, nothing touched.
    from moonbatch.config import get_settings
    from moonbatch.workers.runstate import open_output
    from moonbatch.workers.storage import put_json

    store = open_output(f"s3://{bucket}/out/", get_settings())
    put_json(store, layout.PLANNING, {"owner": "alive", "heartbeat": time.time(),
                                      "expires": time.time() + 30})
    live = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "0"], env,
                   check=False)
    assert live.returncode == 3
    assert f"holds run {run_id}, being planned by a live producer" in live.stderr
    store.delete(layout.PLANNING)  # the producer died

    proc = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "0",
                    "--timeout", "120"], env)
    assert "completed" in proc.stdout
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["run_id"] == run_id and summary["counts"]["ok"] == 2
    assert sorted(r["id"] for r in read_results(s3, bucket, "out/")) == sorted(NAMES[:2])


def test_resume_plans_a_dead_start_again(s3, bucket, env):
    upload_photos(s3, bucket, "in/", names=NAMES[:2])
    run_id = write_dead_start(s3, bucket, {"skill": "caption"})
    qenv = {**env, "MOONBATCH_QUEUE": "replan-" + uuid.uuid4().hex[:8]}
    proc = run_cli(["resume", f"s3://{bucket}/out/", "--workers", "1", "--timeout", "120"], qenv)
    assert f"run {run_id}: planned again: 2 images in 1 shard(s)" in proc.stdout
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["run_id"] == run_id and summary["status"] == "completed"
    assert summary["counts"]["ok"] == 2


def test_clean(s3, bucket, env, fleet):
    upload_photos(s3, bucket, "in/", names=NAMES[:1])
    s3.put_object(Bucket=bucket, Key="out/notes.txt", Body=b"mine")
    s3.put_object(Bucket=bucket, Key="out/results/mine.txt", Body=b"mine too")
    run_id = write_dead_start(s3, bucket, {"skill": "query", "question": "what?"})
    proc = run_cli(["clean", f"s3://{bucket}/out/"], env)
    assert f"of run {run_id} (unplanned) deleted" in proc.stdout
    left = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"])
    assert left == ["out/notes.txt", "out/results/mine.txt"]  # only what moonbatch wrote went

    args = ["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "0", "--timeout",
            "120"]
    run_cli(args, env)
    refused = run_cli(["clean", f"s3://{bucket}/out/"], env, check=False)
    assert refused.returncode == 3 and "is complete" in refused.stderr and "--force" in refused.stderr
    run_cli(["clean", f"s3://{bucket}/out/", "--force"], env)
    left = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"])
    assert left == ["out/notes.txt", "out/results/mine.txt"]
    run_cli(args, env)  # OUTPUT takes a new run
    assert read_json(s3, bucket, "out/run.json")["status"] == "completed"


# -- status -------------------------------------------------------------------------------------
@pytest.fixture
def parked(s3, bucket, env):
    """A run submitted onto a queue nobody consumes (it stays running)."""
    upload_photos(s3, bucket, "in/", names=NAMES)
    qenv = {**env, "MOONBATCH_QUEUE": "parked-" + uuid.uuid4().hex[:8]}
    proc = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--shard-size", "2"],
                   qenv)
    return {"run_id": proc.stdout.strip().splitlines()[-1], "env": qenv}


def test_status_exit_codes_for_failed_and_cancelled_runs(parked, s3, bucket):
    from moonbatch.config import get_settings
    from moonbatch.workers.runstate import open_output, record_failure

    run_id, qenv = parked["run_id"], parked["env"]
    assert run_cli(["status", run_id], qenv).returncode == 0  # running
    record_failure(open_output(f"s3://{bucket}/out/", get_settings()), where="test",
                   error="it broke")
    failed = run_cli(["status", run_id], qenv, check=False)
    assert failed.returncode == 1 and "failure: test: it broke" in failed.stdout
    s3.delete_object(Bucket=bucket, Key="out/" + layout.FAILED)
    run_cli(["cancel", run_id], qenv)
    cancelled = run_cli(["status", run_id, "--json"], qenv, check=False)
    assert cancelled.returncode == 1 and json.loads(cancelled.stdout)["status"] == "cancelled"


def test_resume_with_workers_finishes_a_run(parked, s3, bucket):
    proc = run_cli(["resume", parked["run_id"], "--workers", "1", "--timeout", "120"],
                   parked["env"])
    assert "completed" in proc.stdout
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["status"] == "completed" and summary["counts"]["ok"] == len(NAMES)


def test_status_skipped_lists_every_skipped_key(s3, bucket, env, monkeypatch):
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import submit_run
    from moonbatch.workers.models import SkillOptions

    upload_photos(s3, bucket, "in/", names=NAMES[:1])
    skipped = [f"in/notes-{i}.txt" for i in range(5)] + ["in/deep/meta.json"]
    for key in skipped:
        s3.put_object(Bucket=bucket, Key=key, Body=b"{}")
    monkeypatch.setattr(layout, "SKIPPED_PART_KEYS", 2)  # several parts
    monkeypatch.setenv("MOONBATCH_QUEUE", "skip-" + uuid.uuid4().hex[:8])  # nobody consumes it
    plan = submit_run(f"s3://{bucket}/in/", f"s3://{bucket}/out/", SkillOptions(skill="caption"),
                      get_settings())
    assert plan["skipped"] == 6 and plan["skipped_parts"] == 3
    proc = run_cli(["status", plan["run_id"], "--skipped"], env)
    assert sorted(proc.stdout.split()) == sorted(k[len("in/"):] for k in skipped)
    assert "6 object(s) under" in proc.stderr
    text = run_cli(["status", plan["run_id"]], env).stdout
    assert f"6 object(s) skipped (not images): moonbatch status {plan['run_id']} --skipped" in text


def test_status_counts_batches_in_flight(s3, bucket, env, fleet, emulator):
    # Batches stay at the API until the test has looked (a loaded machine takes seconds per
    # status command), then finish at once.
    emulator.config.processing_seconds = 600.0
    upload_photos(s3, bucket, "in/", names=NAMES)
    run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--shard-size",
                      "2"], env).stdout.strip().splitlines()[-1]
    deadline = time.time() + 60
    while True:
        snap = json.loads(run_cli(["status", run_id, "--json"], env).stdout)
        if snap["shards"]["in_flight"] == 2:
            break
        assert snap["status"] == "running" and time.time() < deadline, snap
        time.sleep(0.3)
    out = [b for b in snap["batches"] if not b["merged"]]
    assert len(out) == 2 and all(b["batch_id"] for b in out)
    assert {b["status"] for b in out} <= {"submitted", "chunking", "processing"}
    text = run_cli(["status", run_id], env).stdout
    assert "batches at the API 2" in text
    emulator.config.processing_seconds = 0.0  # batches still chunking: none to wait for
    for batch in list(emulator.emulator.batches.values()):
        batch.processing_end = min(batch.processing_end, time.time())
    run_cli(["wait", run_id, "--timeout", "120"], env)
    done = json.loads(run_cli(["status", run_id, "--json"], env).stdout)
    assert done["shards"]["in_flight"] == 0 and all(b["merged"] for b in done["batches"])


# -- Ctrl-C -------------------------------------------------------------------------------------
def start_run(s3, bucket: str, env: dict[str, str], tmp_path) -> tuple[subprocess.Popen, str]:
    """A ``moonbatch run --workers 1`` subprocess, once its batch is at the API; its run id."""
    upload_photos(s3, bucket, "in/", names=NAMES[:2])
    qenv = {**env, "MOONBATCH_QUEUE": "int-" + uuid.uuid4().hex[:8]}
    log = open(tmp_path / "run.err", "w+")
    proc = subprocess.Popen(moonbatch_cmd() + ["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/",
                                               "--workers", "1"],
                            env=qenv, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.time() + 90
    while True:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/_moonbatch/shards/"
                                                     ).get("Contents", [])]
        if any(k.endswith("/batch.json") for k in keys):
            break
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "run.err").read_text()
        time.sleep(0.2)
    proc.qenv = qenv  # type: ignore[attr-defined]
    proc.log = log  # type: ignore[attr-defined]
    return proc, read_json(s3, bucket, "out/" + layout.SPEC)["run_id"]


def test_ctrl_c_says_what_is_in_flight_and_how_to_resume(s3, bucket, env, emulator, tmp_path):
    emulator.config.processing_seconds = 8.0
    proc, run_id = start_run(s3, bucket, env, tmp_path)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    proc.log.seek(0)
    stderr = proc.log.read()
    print(stderr)
    assert proc.returncode == 130, stderr
    assert (f"interrupted: run {run_id} goes on without this process: 1 shard(s) with batches "
            "out at the API") in stderr
    assert f"continue it with `moonbatch resume {run_id} --workers 1`" in stderr
    assert "Traceback" not in stderr
    # ... and that command finishes it.
    resumed = run_cli(["resume", run_id, "--workers", "1", "--timeout", "120"], proc.qenv)
    assert "completed" in resumed.stdout
    assert sorted(r["id"] for r in read_results(s3, bucket, "out/")) == sorted(NAMES[:2])


def test_a_second_ctrl_c_stops_at_once(s3, bucket, env, emulator, tmp_path):
    emulator.config.processing_seconds = 8.0
    proc, run_id = start_run(s3, bucket, env, tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert time.monotonic() - t0 < 5
    proc.log.seek(0)
    assert "Ctrl-C again to stop at once" in proc.log.read()
    run_cli(["cancel", run_id], proc.qenv)  # leave nothing running


# -- help ---------------------------------------------------------------------------------------
def test_version_and_help(env):
    from importlib.metadata import version

    assert run_cli(["--version"], env).stdout.strip() == f"moonbatch {version('moonbatch')}"
    top = " ".join(run_cli(["--help"], env).stdout.split())
    assert "[env var: MOONBATCH_DEBUG]" in top and "Exit codes:" in top and "130" in top
    for command in ("run", "submit", "status", "runs", "wait", "resume", "cancel", "clean",
                    "demo"):
        text = run_cli([command, "--help"], env).stdout
        assert "<bool>" not in text, command
        assert "Examples:" in text and f"moonbatch {command}" in text, command
    text = run_cli(["run", "--help"], env).stdout
    for flag in ("--temperature FLOAT", "--top-p FLOAT", "--max-tokens INTEGER",
                 "--timeout SECONDS", "--workers INTEGER", "INPUT <URL>", "--allow-empty",
                 "MOONBATCH_SHARD_SIZE", "MOONDREAM_API_KEY"):
        assert flag in text, flag
    assert "the run goes\n" in text or "the run goes on" in " ".join(text.split())


def test_every_option_has_help():
    import typer

    from moonbatch.producer.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            assert (getattr(param, "help", None) or "").strip(), f"{name} {param.name}"
            assert "<bool>" not in str(param.metavar or "")


def test_summary_never_cuts_a_path():
    from rich.console import Console

    from moonbatch.producer.cli import render

    long_prefix = "s3://bucket/" + "/".join(f"very-long-folder-name-{i}" for i in range(8)) + "/"
    snap = {"run_id": "r", "status": "completed", "skill": "caption", "output": long_prefix,
            "counts": {"total": 1, "ok": 1, "error": 0, "skipped": 0, "done": 1, "in_flight": 0},
            "batches": [], "usage": {"input_tokens": 1, "output_tokens": 1},
            "timings": {"wall_seconds": 1.0}}
    saved = render.out
    for width in (40, 100):
        buf = io.StringIO()
        render.out = Console(file=buf, width=width, force_terminal=True, color_system=None)
        try:
            render.print_summary(snap)
        finally:
            render.out = saved
        text = buf.getvalue()
        assert "…" not in text
        joined = "".join(line.rstrip().split("  ")[-1].strip() for line in text.splitlines())
        assert long_prefix + "results/" in joined, text


def test_debug_shows_tracebacks_only_when_asked(env):
    bad = {**env, "MOONBATCH_STATE_URL": "ftp://nowhere/"}
    proc = run_cli(["runs"], bad, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "ftp://" in proc.stderr
    assert os.environ.get("MOONBATCH_DEBUG") is None
