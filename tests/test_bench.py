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


def test_listing_server_speaks_list_objects_v2(monkeypatch):
    """``bench.s3list`` (memory's listing at scale) answers boto3 and moonbatch's S3Store as S3
    would: pages of at most 1000 in key order, a prefix, start-after, the sizes it promises."""
    import boto3

    from bench.s3list import ROOT, key, listing_server, size
    from moonbatch.workers.storage import S3Store

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "bench")
    with listing_server(2_500) as server:
        s3 = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
        pages = list(s3.get_paginator("list_objects_v2").paginate(Bucket="b", Prefix=ROOT))
        assert [p["KeyCount"] for p in pages] == [1000, 1000, 500]
        assert [o["Key"] for p in pages for o in p["Contents"]] == [key(i) for i in range(2_500)]
        got = s3.list_objects_v2(Bucket="b", Prefix=ROOT + "d00001/", StartAfter=key(1_100),
                                 MaxKeys=50)
        assert [o["Key"] for o in got["Contents"]] == [key(i) for i in range(1_101, 1_151)]
        assert got["IsTruncated"] is True
        assert s3.list_objects_v2(Bucket="b", Prefix="elsewhere/")["KeyCount"] == 0
        listed = list(S3Store("b", ROOT, s3).iter_objects())
        assert [(o.key, o.size) for o in listed[:2]] == [(key(i)[len(ROOT):], size(i)) for i in (0, 1)]
        assert len(listed) == 2_500
