"""Poison items over real servers (moto, Redis, the emulator over HTTP, real Celery workers): an
image or a step that would take a worker down ends as error rows, and the run goes on.

- a decompression bomb (a 13000x13000 RGBA PNG of under a MB) and a header claiming more pixels
  than the limit end as ``image_too_large`` rows from their headers, with the worker's process
  tree not growing by more than a few hundred MB;
- large legitimate images decode one budget at a time (``MOONBATCH_DECODE_MEMORY``);
- a build that loses its worker every time (the test SIGKILLs the pool process whenever it
  starts building one shard) ends, after ``MOONBATCH_MAX_WORKER_LOSSES``, as ``worker_lost``
  rows for that shard's items, on the Batch API and on fal;
- a build past the soft time limit is retried cleanly (its upload aborted) and capped the same
  way, the run completing instead of failing.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from moonbatch.config import Settings
from moonbatch.workers import attempts, layout
from moonbatch.workers.app import celery_config
from moonbatch.workers.storage import open_store
from tests.conftest import (
    Worker,
    moonbatch_cmd,
    photos_dir,
    read_json,
    read_results,
    run_cli,
    tiny_jpeg,
)

CAP = 3  # MOONBATCH_MAX_WORKER_LOSSES's default


def png(size: tuple[int, int], mode: str = "RGBA") -> bytes:
    """A flat-coloured PNG: huge in pixels, tiny on disk (a decompression bomb's shape)."""
    buf = io.BytesIO()
    Image.new(mode, size, (30, 120, 200, 255)[:len(mode)]).save(buf, format="PNG")
    return buf.getvalue()


def forged_jpeg(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose header (SOF0) claims ``width`` x ``height``: its pixels cannot be
    decoded to that size, so only a check of the header can refuse it as too large."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = png((13000, 13000))  # 169 MP, 676 MB once decoded
    assert len(data) < 1_000_000
    return data


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A legitimate large image: 8000x8000 RGBA (64 MP, 256 MB decoded), under the limit."""
    return png((8000, 8000))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakRss:
    """Samples a process tree's RSS every 50 ms while the block runs: ``base`` and ``peak``."""

    def __init__(self, pid: int) -> None:
        self.pid, self.base, self.peak = pid, tree_rss(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, tree_rss(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.base)


@pytest.fixture
def queue_env(env) -> Iterator[tuple[dict[str, str], str]]:
    """The session environment with a queue of the test's own."""
    queue = "poison-" + uuid.uuid4().hex[:8]
    yield {**env, "MOONBATCH_QUEUE": queue}, queue


# -- the counting itself, over moto's S3 ------------------------------------------------------
class Round:
    """The parts of a ``RoundContext`` that counting uses, for round 0 of shard 0 of 3 items."""

    def __init__(self, store, **settings) -> None:
        self.store, self.shard, self.rnd, self.id_prefix = store, 0, 0, "p:"
        self.settings = Settings(**settings)
        self.run = type("Run", (), {"spec": type("Spec", (), {"run_id": "r1"})})
        self.beats = 0

    def heartbeat(self) -> None:
        self.beats += 1

    def doc(self, name: str) -> str:
        return layout.round_doc(self.shard, self.rnd, name)

    def indices(self) -> range:
        return range(3)


@pytest.fixture
def store(env, bucket):
    return open_store(f"s3://{bucket}/out/", endpoint_url=env["MOONBATCH_S3_ENDPOINT_URL"])


def test_each_exit_but_a_lost_worker_ends_an_attempt(store):
    ctx = Round(store)
    key = layout.step_attempts(0, 0, "build")
    assert attempts.counted(ctx, "build", lambda c: "sent", None) == "sent"
    with pytest.raises(ValueError):
        attempts.counted(ctx, "build", lambda c: (_ for _ in ()).throw(ValueError("x")), None)
    doc = json.loads(store.get(key))
    assert (doc["starts"], doc["ends"], doc["open"]) == (2, 2, 0)
    with pytest.raises(SoftTimeLimitExceeded):  # out of time: counted as lost
        attempts.counted(ctx, "build", lambda c: (_ for _ in ()).throw(SoftTimeLimitExceeded()),
                         None)
    doc = json.loads(store.get(key))
    assert (doc["starts"], doc["ends"], doc["open"]) == (3, 2, 1)
    assert doc["last"]["pid"] == os.getpid()


def test_after_the_cap_a_build_gives_its_round_up_once_for_all(store):
    ctx = Round(store, max_worker_losses=2)
    key = layout.step_attempts(0, 0, "build")
    ran = []
    for _ in range(2):  # two attempts whose worker was killed: a start, no end
        attempts._update(store, key, attempts._started)
    assert attempts.counted(ctx, "build", ran.append, None) is None
    assert ran == []  # not run a third time
    build = json.loads(store.get(ctx.doc("build")))
    assert build["lines"] == [] and sorted(build["errors"]) == ["0", "1", "2"]
    assert {e["code"] for e in build["errors"].values()} == {"worker_lost"}
    assert "lost its worker 2 times in a row" in build["errors"]["0"]["message"]
    assert "moonbatch retry-failed r1 worker_lost" in build["errors"]["0"]["message"]
    # A copy delivered later (a reconciler's, a redelivery) only merges: nothing is sent.
    assert attempts.counted(ctx, "build", ran.append, None) is None and ran == []
    doc = json.loads(store.get(key))
    assert doc["gave_up"] == 1 and doc["abandoned"] and doc["open"] == 0 and doc["starts"] == 4


class SendsInSteps:
    """A provider that sends in steps (as fal does): what ``give_up`` asks it to end."""

    def __init__(self) -> None:
        self.abandoned: list[dict] = []

    def abandon_unsent(self, ctx, error: dict) -> int:
        self.abandoned.append(error)
        return 2


def test_a_poll_step_that_loses_its_worker_runs_on_and_losses_need_to_be_in_a_row(store):
    ctx = Round(store, max_worker_losses=2)
    provider = SendsInSteps()
    store.put(ctx.doc("batch"), b"{}")
    key = layout.step_attempts(0, 0, "poll")
    attempts._update(store, key, attempts._started)  # lost
    assert attempts.counted(ctx, "poll", lambda c: "polled", provider) == "polled"  # resets
    attempts._update(store, key, attempts._started)  # lost
    assert attempts.counted(ctx, "poll", lambda c: "polled", provider) == "polled"
    assert json.loads(store.get(key)).get("gave_up") is None and provider.abandoned == []
    for _ in range(2):
        attempts._update(store, key, attempts._started)
    # At the cap with the round at the provider: the provider ends the lines it has not sent,
    # and the step runs on (its requests in flight finish).
    assert attempts.counted(ctx, "poll", lambda c: "polled", provider) == "polled"
    assert [e["code"] for e in provider.abandoned] == ["worker_lost"]
    assert json.loads(store.get(key))["gave_up"] == 1 and not store.exists(ctx.doc("build"))
    # A poll that only looks at a batch (the Batch API's) reads no item and is not counted.
    other = Round(store)
    other.rnd = 1
    assert attempts.counted(other, "poll", lambda c: "looked", None) == "looked"
    assert not store.exists(layout.step_attempts(0, 1, "poll"))


def test_concurrent_counts_are_all_kept(store):
    key = layout.step_attempts(0, 0, "build")
    threads = [threading.Thread(target=lambda: [attempts._update(store, key, attempts._started)
                                                for _ in range(5)]) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert json.loads(store.get(key))["starts"] == 30


def test_the_heartbeat_enforces_the_soft_limit_when_celerys_signal_is_lost(store):
    ctx = Round(store, task_soft_time_limit=0.2, task_time_limit=10)

    def slow_step(c) -> None:
        c.heartbeat()
        time.sleep(0.3)
        c.heartbeat()  # past the soft limit: raises

    with pytest.raises(SoftTimeLimitExceeded, match="MOONBATCH_TASK_SOFT_TIME_LIMIT"):
        attempts.counted(ctx, "build", slow_step, None)
    assert ctx.beats == 2  # the round's own heartbeat still ran
    assert json.loads(store.get(layout.step_attempts(0, 0, "build")))["open"] == 1


def test_celery_time_limits_come_from_settings():
    conf = celery_config(Settings(task_soft_time_limit=100, task_time_limit=130))
    assert (conf["task_soft_time_limit"], conf["task_time_limit"]) == (100, 130)
    defaults = Settings()
    assert defaults.task_time_limit < defaults.visibility_timeout
    with pytest.raises(ValueError, match="MOONBATCH_TASK_TIME_LIMIT must be above"):
        Settings(task_soft_time_limit=100, task_time_limit=100)


# -- runs on real workers ------------------------------------------------------------------------
def rows_by_id(s3, bucket: str, prefix: str) -> dict[str, dict]:
    rows = read_results(s3, bucket, prefix)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an item has two rows"
    return {r["id"]: r for r in rows}


def test_decompression_bomb_is_an_image_too_large_row(s3, bucket, queue_env, bomb, tmp_path):
    wenv, queue = queue_env
    photos = ("astronaut.png", "rocket.jpg", "coffee.png")
    for name in photos:
        s3.put_object(Bucket=bucket, Key=f"in/{name}", Body=(photos_dir() / name).read_bytes())
    s3.put_object(Bucket=bucket, Key="in/bomb.png", Body=bomb)
    s3.put_object(Bucket=bucket, Key="in/forged.jpg", Body=forged_jpeg(12000, 10100))  # 121 MP

    with Worker(wenv, queue, tmp_path / "worker.log", concurrency=2) as worker:
        with PeakRss(worker.proc.pid) as rss:
            started = time.time()
            run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "0",
                     "--timeout", "240"], wenv, timeout=300)
            elapsed = time.time() - started
        alive = worker.proc.poll() is None
    rows = rows_by_id(s3, bucket, "out/")
    build = read_json(s3, bucket, "out/_moonbatch/shards/00000/r0/build.json")
    print(f"\nbomb run: {elapsed:.1f}s, build {build['build_seconds']}s, worker tree RSS "
          f"{rss.base / 1e6:.0f} MB -> peak {rss.peak / 1e6:.0f} MB (+{rss.growth / 1e6:.0f} MB); "
          f"bomb row: {rows['bomb.png'].get('error') or rows['bomb.png']['status']}")
    assert alive
    assert all(rows[name]["status"] == "ok" for name in photos), rows
    for name, size in (("bomb.png", "13000x13000"), ("forged.jpg", "12000x10100")):
        assert rows[name]["status"] == "error", rows[name]
        assert rows[name]["error"]["code"] == "image_too_large"
        assert size in rows[name]["error"]["message"]
        assert "MOONBATCH_MAX_IMAGE_PIXELS" in rows[name]["error"]["message"]
    # Refused from the headers: nothing was decoded (one decode of the bomb is 676 MB, and
    # more than 2 GB with the copies of a conversion).
    assert rss.growth < 400_000_000
    assert build["build_seconds"] < 15


def test_large_images_decode_within_the_memory_budget(s3, bucket, queue_env, big_png, tmp_path):
    wenv, queue = queue_env
    for i in range(4):
        s3.put_object(Bucket=bucket, Key=f"in/big{i}.png", Body=big_png)
    budget = 320 * 1024 * 1024  # one 8000x8000 RGBA decode (256 MB) and its small copies
    wenv = {**wenv, "MOONBATCH_DECODE_MEMORY": str(budget)}
    with Worker(wenv, queue, tmp_path / "worker.log", concurrency=1) as worker:
        with PeakRss(worker.proc.pid) as rss:
            run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "0",
                     "--timeout", "400"], wenv, timeout=460)
    rows = rows_by_id(s3, bucket, "out/")
    build = read_json(s3, bucket, "out/_moonbatch/shards/00000/r0/build.json")
    print(f"\n4 x 8000x8000 RGBA PNG, 16 fetch threads, budget {budget / 2**20:.0f} MiB: build "
          f"{build['build_seconds']}s, worker tree RSS +{rss.growth / 1e6:.0f} MB")
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert all((r["width"], r["height"]) == (8000, 8000) for r in rows.values())
    assert all(r["sent_width"] * r["sent_height"] <= 2_000_000 for r in rows.values())
    # Four at once would hold four decodes (and, before strips, three copies of each).
    assert rss.growth < 2 * budget


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def attempts_doc(s3, bucket: str, key: str) -> dict | None:
    try:
        return read_json(s3, bucket, key)
    except s3.exceptions.NoSuchKey:
        return None


def poison_inputs(s3, bucket: str, big: bytes, per_shard: int, n_big: int) -> None:
    """Three shards of ``per_shard`` items: a/ and c/ small photos; b/ (shard 1) small ones
    then ``n_big`` large images (seconds of decoding)."""
    for i in range(per_shard):
        s3.put_object(Bucket=bucket, Key=f"in/a/{i}.jpg", Body=tiny_jpeg(i))
        s3.put_object(Bucket=bucket, Key=f"in/c/{i}.jpg", Body=tiny_jpeg(100 + i))
        small = i < per_shard - n_big
        s3.put_object(Bucket=bucket, Key=f"in/b/{i}.{'jpg' if small else 'png'}",
                      Body=tiny_jpeg(200 + i) if small else big)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("provider", ["moondream", "fal"])
def test_a_build_that_keeps_killing_its_worker_ends_as_worker_lost_rows(
        s3, bucket, queue_env, big_png, tmp_path, provider):
    wenv, queue = queue_env
    poison_inputs(s3, bucket, big_png, per_shard=4, n_big=4)
    # One image at a time: shard 1's build lasts seconds, long enough to be killed in.
    wenv = {**wenv, "MOONBATCH_FETCH_CONCURRENCY": "1", "MOONBATCH_LEASE_SECONDS": "3"}
    key = "out/_moonbatch/shards/00001/r0/attempts-build.json"
    batch_key = "out/_moonbatch/shards/00001/r0/batch.json"
    kills: list[int] = []
    with Worker(wenv, queue, tmp_path / "worker.log", concurrency=2) as worker:
        cli = subprocess.Popen(
            moonbatch_cmd() + ["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers",
                               "0", "--shard-size", "4", "--provider", provider, "--timeout",
                               "400"], env=wenv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        try:
            # Every time shard 1's build starts, SIGKILL the pool process running it (as the
            # kernel's OOM killer would): the main worker process stays up and the message is
            # delivered again (late acks, reject on worker lost).
            while len(kills) < CAP:
                doc = wait_for(lambda: (d := attempts_doc(s3, bucket, key)) and
                               d["starts"] > len(kills) and d, 240, "shard 1's build to start")
                if provider == "fal":  # killed while preparing images, the round recorded
                    wait_for(lambda: attempts_doc(s3, bucket, batch_key), 60, "the fal round")
                pid = doc["last"]["pid"]
                children = {p.pid for p in psutil.Process(worker.proc.pid).children(recursive=True)}
                assert pid in children, (pid, children)  # one of our worker's pool processes
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)
                assert doc["starts"] == len(kills), doc  # killed before it could end
            out, _ = cli.communicate(timeout=400)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        alive = worker.proc.poll() is None
    log = (tmp_path / "worker.log").read_text()
    doc = read_json(s3, bucket, key)
    rows = rows_by_id(s3, bucket, "out/")
    summary = read_json(s3, bucket, "out/run.json")
    print(f"\n{provider}: killed pool processes {kills}; attempts {doc}; run {summary['status']}, "
          f"counts {summary['counts']}; a row: {rows['b/3.png']['error']}")
    assert cli.returncode == 0, out
    assert alive and "WorkerLostError" in log
    assert summary["status"] == "completed"
    assert doc["starts"] >= CAP + 1 and doc["gave_up"] == 1 and doc["open"] == 0, doc
    if provider == "fal":  # the round was recorded: its ledger ended the lines not sent
        ledger = read_json(s3, bucket, "out/_moonbatch/shards/00001/r0/requests.json")
        assert not doc["abandoned"] and ledger["requests"] == 0, ledger
        assert ledger["cursor"] == ledger["lines"] == ledger["failed"] == 4, ledger
    else:  # nothing was sent: the build holds every item's error
        build = read_json(s3, bucket, "out/_moonbatch/shards/00001/r0/build.json")
        assert doc["abandoned"] and build["lines"] == [] and len(build["errors"]) == 4
    for i in range(4):
        assert rows[f"a/{i}.jpg"]["status"] == "ok" and rows[f"c/{i}.jpg"]["status"] == "ok"
        b = rows[f"b/{i}.png"]
        assert b["status"] == "error" and b["error"]["code"] == "worker_lost", b
        assert "lost its worker 3 times" in b["error"]["message"]
        assert "retry-failed" in b["error"]["message"]


@pytest.mark.timeout(600)
def test_a_build_past_the_soft_time_limit_retries_cleanly_then_is_capped(
        s3, bucket, queue_env, big_png, emulator, tmp_path):
    wenv, queue = queue_env
    # b/0.jpg first: its line opens an upload; then 19 large images, ~0.7 s of decoding each
    # on a quick idle core (13 s): well past the 8 s soft limit on any machine (9 of them,
    # 6 s, passed it only when the machine was loaded).
    per_shard = 20
    poison_inputs(s3, bucket, big_png, per_shard=per_shard, n_big=per_shard - 1)
    uploads_before = set(emulator.emulator.uploads)
    wenv = {**wenv, "MOONBATCH_FETCH_CONCURRENCY": "1", "MOONBATCH_PART_SIZE": "1024",
            "MOONBATCH_TASK_SOFT_TIME_LIMIT": "8", "MOONBATCH_TASK_TIME_LIMIT": "300",
            "MOONBATCH_TASK_RETRY_BACKOFF_MAX": "2"}
    with Worker(wenv, queue, tmp_path / "worker.log", concurrency=2):
        run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "0",
                 "--shard-size", str(per_shard), "--timeout", "400"], wenv, timeout=460)
    log = (tmp_path / "worker.log").read_text()
    doc = read_json(s3, bucket, "out/_moonbatch/shards/00001/r0/attempts-build.json")
    rows = rows_by_id(s3, bucket, "out/")
    summary = read_json(s3, bucket, "out/run.json")
    print(f"\nsoft limit: attempts {doc}; {log.count('SoftTimeLimitExceeded')} log lines name "
          f"the soft limit; run {summary['status']} {summary['counts']}")
    assert summary["status"] == "completed"
    assert "Retry in" in log and "SoftTimeLimitExceeded" in log
    assert doc["starts"] >= CAP + 1 and doc["gave_up"] == 1 and doc["open"] == 0, doc
    # Each soft-limited attempt aborted its own upload: none left open, none found stale.
    assert set(emulator.emulator.uploads) <= uploads_before
    assert "aborting the upload a dead attempt left open" not in log
    shard1 = [k for k in rows if k.startswith("b/")]
    assert len(shard1) == per_shard
    assert all(rows[k]["error"]["code"] == "worker_lost" for k in shard1), rows
    assert all(rows[f"{p}/{i}.jpg"]["status"] == "ok" for p in "ac" for i in range(per_shard))
    assert not any(o["Key"].endswith("failed.json") for o in s3.list_objects_v2(
        Bucket=bucket, Prefix="out/_moonbatch/").get("Contents", []))
    json.dumps(doc)  # the document is plain JSON an operator can read
