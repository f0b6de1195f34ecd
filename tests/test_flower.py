"""``moonbatch flower``: Flower on the real broker, behind basic auth, showing a run's tasks."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx

from tests.browser import dump_dom, screenshot
from tests.conftest import free_port, moonbatch_cmd, run_cli, upload_photos


def browse_tasks_page(url: str, run_id: str) -> None:
    """Log in to Flower with Debian's chromium (headless; basic auth in the URL), load the tasks
    page, save a screenshot (``flower-tasks.png``) and check the run's tasks are on it."""
    budget = ["--virtual-time-budget=8000"]
    dom = dump_dom(url, window=(1600, 1000), extra=budget)
    shot = screenshot(url, "flower-tasks.png", window=(1600, 1000), extra=budget)
    assert "Tasks" in dom and run_id in dom, dom[-2000:]
    assert shot.stat().st_size > 10_000


def test_flower_refuses_to_start_without_auth(env):
    proc = run_cli(["flower"], {k: v for k, v in env.items() if k != "FLOWER_BASIC_AUTH"},
                   check=False, timeout=60)
    assert proc.returncode == 2
    assert "FLOWER_BASIC_AUTH is not set" in proc.stderr and "--no-auth" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_flower_requires_auth_and_shows_the_runs_tasks(s3, bucket, env, fleet):
    port = free_port()
    user, password = "ops", "pw-" + os.urandom(4).hex()
    fenv = {**env, "FLOWER_BASIC_AUTH": f"{user}:{password}"}
    proc = subprocess.Popen(moonbatch_cmd() + ["flower", "--port", str(port)], env=fenv,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            raise AssertionError("Flower did not answer /healthcheck within 60 s")
        for path in ("/", "/tasks", "/tasks/datatable", "/api/tasks", "/api/workers"):
            assert httpx.get(base + path, timeout=10).status_code == 401, path
            assert httpx.get(base + path, auth=(user, "wrong"), timeout=10).status_code == 401

        upload_photos(s3, bucket, "in/", names=("coffee.png",))
        out = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "0",
                       "--timeout", "120"], env)
        run_id = next(line.split()[-1] for line in out.stdout.splitlines()
                      if line.strip().startswith("run "))
        deadline = time.time() + 30
        names: set[str] = set()
        while time.time() < deadline:
            tasks = httpx.get(f"{base}/api/tasks", auth=(user, password), timeout=10).json()
            ours = [t for t in tasks.values() if f"'run': '{run_id}'" in str(t.get("kwargs"))]
            names = {t["name"] for t in ours}
            if {"moonbatch.build_shard", "moonbatch.merge_round"} <= names:
                break
            time.sleep(0.5)
        assert {"moonbatch.build_shard", "moonbatch.poll_round", "moonbatch.merge_round"} <= names
        workers = httpx.get(f"{base}/api/workers", auth=(user, password), timeout=30).json()
        assert workers and all(name.startswith("test-") for name in workers), list(workers)
        series = [line for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
                  if 'worker="' in line]
        # Every series names the fleet's worker: no "gen<pid>@host" series per process that
        # published a task (the CLI, each pool process).
        assert series and all('worker="test-' in line for line in series), series[:5]
        assert password not in " ".join(subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                       text=True).stdout.splitlines())
        browse_tasks_page(f"http://{user}:{password}@127.0.0.1:{port}/tasks", run_id)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
