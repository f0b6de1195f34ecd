"""The benchmarks cannot rot: ``python -m bench --smoke`` runs every one of them once at tiny
sizes (its own moto server, emulator, private redis-server and Celery worker), and a benchmark
that crashes against today's code fails this test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_every_benchmark_module_is_listed():
    """A module of bench/ with a ``run(servers, smoke)`` is in ``BENCHMARKS``, so --smoke runs it."""
    from bench.__main__ import BENCHMARKS

    found = sorted(p.stem for p in (REPO / "bench").glob("*.py")
                   if re.search(r"^def run\(servers: Servers, smoke: bool", p.read_text(), re.M))
    assert found == sorted(BENCHMARKS)


# About 70 s on a quiet 2-core machine; the cap leaves room for CI's load around it.
@pytest.mark.timeout(480)
def test_smoke_runs_every_benchmark(tmp_path):
    from bench.__main__ import BENCHMARKS

    # The benchmarks set up their own servers and settings: none of this session's.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOONBATCH_", "MOONDREAM_", "FAL_", "AWS_"))}
    env.update(MOONBATCH_BENCH_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path / "home"))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)
    seconds = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    ran = re.findall(r"^== (\w+) \(", proc.stdout, re.M)
    assert ran == list(BENCHMARKS), out[-4000:]
    assert "skipped:" not in proc.stdout, out[-4000:]
    assert f"== suite: {len(BENCHMARKS)} benchmark(s)" in proc.stdout
    print(f"python -m bench --smoke: {len(ran)} benchmarks in {seconds:.1f} s")
