"""The real-time provider (``--provider moondream-realtime``) end to end: S3 (moto) → producer →
Redis → real Celery workers → the emulator's real-time routes over HTTP → merged rows in S3.

All five skills in one run, each row checked against the answer the emulator computes from the
photograph it came from, with 429s and 5xx survived; a refused request as an error row with the
API's code; a Moondream Station URL with no key on a fleet whose worker is SIGKILLed and whose
Redis is emptied mid-run, then ``resume``, with every item exactly once; a missing key for
Moondream Cloud refused before anything is sent; cancel stops sending; the dry run's price."""

from __future__ import annotations

import concurrent.futures as cf
import math
import time
import uuid

import orjson
import pytest

from moonbatch.emulator.realtime import RealtimeConfig, RealtimeFaults, expected_answer
from moonbatch.emulator.server import EmulatorConfig, EmulatorServer
from moonbatch.workers import layout
from tests.conftest import (
    RedisServer,
    Worker,
    free_port,
    private_env,
    read_json,
    read_results,
    run_cli,
    tiny_jpeg,
    upload_photos,
    wait_for_completion,
    wait_for_run,
)

PROVIDER = ["--provider", "moondream-realtime"]
# Every skill in one run; detect, point and segment share --object.
SKILLS = {"caption": {"length": "short"}, "query": {"question": "What is shown?"},
          "detect": {"object": "face"}, "point": {"object": "face"}, "segment": {"object": "face"}}
ARGS = ["--skill", "caption", "--length", "short", "--skill", "query", "--question",
        "What is shown?", "--skill", "detect", "--skill", "point", "--skill", "segment",
        "--object", "face"]


def test_request_bodies_follow_the_official_client():
    """The body of each skill has the fields ``CloudVL`` sends (FACTS.md), ``stream: false``
    where the client sends ``stream``, and ``spatial_refs`` only where the skill takes them."""
    from moonbatch.workers.models import SkillOptions
    from moonbatch.workers.providers.realtime.payloads import request_payload

    uri = "data:image/jpeg;base64,AAAA"
    cases = {
        "caption": ({"length": "short", "temperature": 0.5},
                    {"image_url", "length", "stream", "settings"}),
        "query": ({"question": "q?", "reasoning": True, "spatial_refs": [[0.5, 0.5]]},
                  {"image_url", "question", "stream", "reasoning", "spatial_refs"}),
        "detect": ({"object": "cat"}, {"image_url", "object"}),
        "point": ({"object": "cat", "spatial_refs": [[0.1, 0.1, 0.4, 0.4]]},
                  {"image_url", "object", "spatial_refs"}),
        "segment": ({"object": "cat"}, {"image_url", "object", "stream"}),
    }
    for skill, (fields, keys) in cases.items():
        body = request_payload(SkillOptions(skill=skill, **fields), uri)
        assert set(body) == keys, (skill, body)
        assert body.get("stream", False) is False
    body = request_payload(SkillOptions(skill="detect", object="x"), uri, "moondream3.1")
    assert body["model"] == "moondream3.1"


def test_the_key_is_needed_for_moondream_cloud_only(monkeypatch):
    from moonbatch.workers.providers.realtime.settings import RealtimeSettings

    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    monkeypatch.delenv("MOONBATCH_API_KEY", raising=False)
    cloud = RealtimeSettings(realtime_url="https://api.moondream.ai/v1/")
    assert cloud.realtime_url == "https://api.moondream.ai/v1" and cloud.needs_key()
    assert "MOONDREAM_API_KEY is not set" in cloud.missing_key()
    assert "\n" not in cloud.missing_key()
    station = RealtimeSettings(realtime_url="http://localhost:2020/v1")
    assert not station.needs_key() and station.missing_key() is None
    assert RealtimeSettings(realtime_url="https://api.moondream.ai.example.com/v1").needs_key() \
        is False  # a look-alike host is not Moondream Cloud


def test_the_rate_is_shared_by_every_holder(env):
    """Two workers' ``Rate`` on the same broker share one window: at most the rate per second."""
    from moonbatch.config import get_settings
    from moonbatch.workers.slots import Rate

    name = "test-" + uuid.uuid4().hex
    a, b = Rate(get_settings(), name, 5), Rate(get_settings(), name, 5)
    got_a, _ = a.take(4, "a")
    got_b, wait = b.take(4, "b")
    assert (got_a, got_b) == (4, 1) and 0 < wait <= 1.0
    assert a.take(1, "c")[0] == 0
    time.sleep(wait + 0.05)
    assert b.take(9, "d")[0] >= 1  # the window slid on


def put_tiny(s3, bucket: str, prefix: str, n: int) -> None:
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"{prefix}img{i:04d}.jpg",
                                              Body=tiny_jpeg(i)), range(n)))


def test_all_five_skills_with_faults(s3, bucket, env, fleet, emulator, tmp_path):
    """One multi-skill run over real photographs while the API answers some requests 429 (with
    Retry-After) and 5xx: every row holds every skill's answer for its own image."""
    photos = upload_photos(s3, bucket, "photos/")
    emulator.config.realtime = RealtimeConfig(faults=RealtimeFaults(
        seed=5, rate_429=0.1, retry_after=0.2, rate_5xx=0.1))
    realtime = emulator.emulator.realtime
    before = dict(realtime.injected)
    run_cli(["submit", f"s3://{bucket}/photos/", f"s3://{bucket}/out/", *PROVIDER,
             "--shard-size", "5", *ARGS], env)
    summary = wait_for_run(s3, bucket, "out/", timeout=120)
    assert summary["status"] == "completed", summary
    assert summary["skill"] == "caption+query+detect+point+segment"
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(photos)  # each exactly once
    for row in rows:
        assert row["status"] == "ok", row
        image = photos[row["id"]]
        for skill, fields in SKILLS.items():
            want = expected_answer(skill, fields, image)
            assert row["result"][skill] == want, (row["id"], skill)
        assert row["usage"]["input_tokens"] > 0 and row["usage"]["output_tokens"] > 0
    found = [r["result"]["segment"] for r in rows if r["result"]["segment"]["bbox"]]
    assert found, "no photograph had a face to segment"
    for segment in found:  # rows keep the SVG path and its bbox
        assert segment["path"].startswith("M ") and set(segment["bbox"]) == {
            "x_min", "y_min", "x_max", "y_max"}
    injected = {k: realtime.injected[k] - before.get(k, 0) for k in realtime.injected}
    assert injected["429"] > 0 and injected["5xx"] > 0, injected  # faults were met, and survived
    check_coco_segments(s3, bucket, tmp_path, rows)
    merged = [read_json(s3, bucket, f"out/_moonbatch/shards/{s:05d}/r0/merged.json")
              for s in range(summary["shards"]["total"])]
    assert sum(m["rate_limited"] for m in merged) > 0
    assert sum(m["transient_errors"] for m in merged) > 0
    assert all(s["keyed"] for s in realtime.seen[-20:])  # the key went to the configured URL


def check_coco_segments(s3, bucket: str, tmp_path, rows: list[dict]) -> None:
    """The run's COCO export (the default of a spatial run): a segment annotation per row
    that found the object, whose polygons (pycocotools' ``annToMask``) lie inside its bbox."""
    import numpy as np
    from pycocotools.coco import COCO

    path = tmp_path / "instances.json"
    path.write_bytes(s3.get_object(Bucket=bucket, Key="out/" + layout.COCO)["Body"].read())
    coco = COCO(str(path))
    (seg_cat,) = [c["id"] for c in coco.loadCats(coco.getCatIds()) if c["supercategory"] == "segment"]
    anns = coco.loadAnns(coco.getAnnIds(catIds=[seg_cat]))
    assert len(anns) == sum(1 for r in rows if r["result"]["segment"]["bbox"])
    for ann in anns:
        mask = coco.annToMask(ann)
        assert mask.sum() > 0
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert xs.min() >= math.floor(x) and xs.max() <= math.ceil(x + w)
        assert ys.min() >= math.floor(y) and ys.max() <= math.ceil(y + h)
        assert ann["area"] == pytest.approx(float(mask.sum()), rel=0.1)


def test_a_refused_request_is_an_error_row_with_the_apis_code(s3, bucket, env, fleet, emulator):
    """A 4xx other than 429 (here an unknown model) ends the item as an error row carrying the
    API's code and message; nothing is retried."""
    put_tiny(s3, bucket, "in/", 3)
    run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", *PROVIDER],
            {**env, "MOONBATCH_MODEL": "no-such-model"})
    summary = wait_for_run(s3, bucket, "out/", timeout=60)
    rows = read_results(s3, bucket, "out/")
    assert len(rows) == 3 and summary["counts"]["error"] == 3
    for row in rows:
        assert row["error"]["code"] == "invalid_model", row
        assert "no-such-model" in row["error"]["message"]


def test_missing_key_for_moondream_cloud_is_refused_in_preflight(s3, bucket, env):
    put_tiny(s3, bucket, "in/", 1)
    cenv = {k: v for k, v in env.items() if k not in ("MOONDREAM_API_KEY", "MOONBATCH_API_KEY")}
    cenv["MOONBATCH_REALTIME_URL"] = "https://api.moondream.ai/v1"
    proc = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", *PROVIDER], cenv,
                   check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "MOONDREAM_API_KEY is not set" in ln]
    assert len(lines) == 1, proc.stderr
    assert "MOONBATCH_REALTIME_URL" in lines[0]
    assert not s3.list_objects_v2(Bucket=bucket, Prefix="out/_moonbatch/shards/").get("KeyCount")


def test_dry_run_prices_the_model_at_real_time_rates(s3, bucket, env):
    put_tiny(s3, bucket, "in/", 4)
    cenv = {**env, "MOONBATCH_REALTIME_URL": "https://api.moondream.ai/v1"}
    proc = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", *PROVIDER,
                    "--dry-run"], cenv)
    text = proc.stdout + proc.stderr
    assert "moondream3-preview realtime: $0.3/M input, $2.5/M output tokens" in text, text
    assert "requests/s" in text


def test_cancel_stops_sending(s3, bucket, env, fleet, emulator):
    n = 150  # 15 s at the session's 10 requests/s
    put_tiny(s3, bucket, "in/", n)
    emulator.config.realtime = RealtimeConfig(processing_seconds=0.2)
    realtime = emulator.emulator.realtime
    before = realtime.calls.get("caption", 0)
    run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", *PROVIDER],
                     env).stdout.strip().splitlines()[-1]
    deadline = time.time() + 30
    while time.time() < deadline and realtime.calls.get("caption", 0) - before < 5:
        time.sleep(0.1)
    proc = run_cli(["cancel", run_id], env)
    assert "shard(s) stopped sending" in proc.stdout, proc.stdout
    time.sleep(2.0)  # a step looks at the cancel marker every second; answers in flight land
    stopped_at = realtime.calls.get("caption", 0)
    time.sleep(2.0)
    assert realtime.calls.get("caption", 0) == stopped_at  # nothing more is sent
    assert stopped_at - before < n
    assert read_json(s3, bucket, "out/run.json")["status"] == "cancelled"


def test_per_row_options_from_a_manifest(tmp_path, s3, bucket, env, fleet):
    """A manifest's ``object`` column overrides the run's for that row (segment), and an empty
    cell keeps the run's."""
    import json

    from tests.conftest import photos_dir

    rows = [("astronaut.png", "wheel"), ("chelsea.png", ""), ("rocket.jpg", "sky")]
    for name, _ in rows:
        (tmp_path / name).write_bytes((photos_dir() / name).read_bytes())
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": n, "image": n, "object": o}) + "\n"
                                for n, o in rows))
    run_cli(["submit", str(manifest), f"s3://{bucket}/out/", *PROVIDER, "--skill", "segment",
             "--object", "face"], env)
    summary = wait_for_run(s3, bucket, "out/", timeout=60)
    assert summary["counts"]["ok"] == 3
    got = {r["id"]: r["result"] for r in read_results(s3, bucket, "out/")}
    for name, obj in rows:
        want = expected_answer("segment", {"object": obj or "face"},
                               (photos_dir() / name).read_bytes())
        assert got[name] == want, name


@pytest.mark.timeout(300)
def test_station_fleet_survives_kills_and_an_emptied_redis(s3, bucket, env, tmp_path):
    """A Moondream Station (the emulator taking no key) with MOONDREAM_API_KEY unset, answering
    some requests 5xx and 429, on a private fleet: the worker is SIGKILLed mid-round, Redis
    restarted empty (queues, slots and rate windows gone), a new worker and ``resume``. Every
    item ends exactly once, no request carried a key, and the dry run
    says there is no token cost."""
    n_images, shard_size = 80, 20
    config = EmulatorConfig(api_key="unused-" + uuid.uuid4().hex, realtime=RealtimeConfig(
        require_key=False, processing_seconds=0.05,
        faults=RealtimeFaults(seed=9, rate_5xx=0.05, rate_429=0.03, retry_after=0.2)))
    redis_server = RedisServer(free_port(), tmp_path)
    redis_server.start()
    queue = "station-" + uuid.uuid4().hex[:6]
    put_tiny(s3, bucket, "in/", n_images)
    with EmulatorServer(config) as station:
        cenv = {k: v for k, v in private_env(env, redis_server).items()
                if k not in ("MOONDREAM_API_KEY", "MOONBATCH_API_KEY")}
        cenv.update({"MOONBATCH_QUEUE": queue, "MOONBATCH_REALTIME_URL": station.url,
                     "MOONBATCH_REALTIME_RATE": "12", "MOONBATCH_VISIBILITY_TIMEOUT": "8",
                     "MOONBATCH_LEASE_SECONDS": "4", "MOONBATCH_RECONCILE_INTERVAL": "2",
                     "MOONBATCH_TASK_RETRY_BACKOFF_MAX": "2"})
        args = ["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", *PROVIDER,
                "--shard-size", str(shard_size), "--skill", "segment", "--object", "face"]
        dry = run_cli([*args, "--dry-run"], cenv)
        assert "no token cost" in dry.stdout + dry.stderr, dry.stdout + dry.stderr
        realtime = station.emulator.realtime

        def wait_calls(n: int) -> None:
            deadline = time.time() + 60
            while time.time() < deadline and realtime.calls.get("segment", 0) < n:
                time.sleep(0.05)

        logs = tmp_path / "logs"
        logs.mkdir()
        worker = Worker(cenv, queue, logs / "worker.log", concurrency=3).start()
        try:
            run_id = run_cli(args, cenv).stdout.strip().splitlines()[-1]
            wait_calls(10)
            worker.kill()  # SIGKILL mid-step: its lines are sent again by a later step
            assert realtime.calls.get("segment", 0) < n_images  # killed mid-run
            redis_server.restart_empty()
            worker = Worker(cenv, queue, logs / "worker.log", concurrency=3).start()
            run_cli(["resume", run_id], cenv)
            summary = wait_for_completion(s3, bucket, "out/", cenv, timeout=180)
        finally:
            worker.stop()
            redis_server.kill()
        rows = read_results(s3, bucket, "out/")
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) == n_images  # every item exactly once
        assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
        assert all(set(r["result"]) == {"path", "bbox"} for r in rows)
        assert summary["counts"]["ok"] == n_images
        assert sum(realtime.injected[k] for k in ("5xx", "429")) > 0
        assert not any(s["keyed"] for s in realtime.seen)  # no key was configured or sent
        log = (logs / "worker.log").read_text()
        assert "base64," not in log


def test_steps_come_at_their_own_pace_not_the_poll_interval(s3, bucket, env, emulator, tmp_path):
    """A real-time round's next step is due when its step says (at once after a step that
    spent its time sending, within a second when the fleet's slots were all held), not after
    the Batch API's poll interval: with MOONBATCH_POLL_MIN_INTERVAL=30, a run whose first step
    finds every slot held elsewhere sends once they are freed and ends within seconds."""
    from moonbatch.config import Settings
    from moonbatch.workers.providers.realtime.rounds import fleet_name
    from moonbatch.workers.providers.realtime.settings import RealtimeSettings
    from moonbatch.workers.slots import Slots

    n = 6
    put_tiny(s3, bucket, "in/", n)
    emulator.config.realtime = RealtimeConfig()
    redis_server = RedisServer(free_port(), tmp_path)
    redis_server.start()
    cenv = private_env(env, redis_server, MOONBATCH_POLL_MIN_INTERVAL="30",
                       MOONBATCH_REALTIME_CONCURRENCY="2")
    slots = Slots(Settings(broker_url=cenv["MOONBATCH_BROKER_URL"]),
                  fleet_name(RealtimeSettings(realtime_url=emulator.url)), 2, ttl=120)
    held = slots.acquire(["other-run/1", "other-run/2"])
    assert len(held) == 2
    before = emulator.emulator.realtime.calls.get("caption", 0)
    worker = Worker(cenv, cenv["MOONBATCH_QUEUE"], tmp_path / "worker.log").start()
    try:
        run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", *PROVIDER], cenv)
        deadline = time.time() + 60
        while not s3.list_objects_v2(Bucket=bucket, Prefix="out/_moonbatch/shards/00000/r0/"
                                     "requests.json").get("KeyCount"):
            assert time.time() < deadline, "the round was never recorded"
            time.sleep(0.1)
        time.sleep(1.5)  # the first step found no slot: nothing was sent
        assert emulator.emulator.realtime.calls.get("caption", 0) == before
        slots.release(held)
        freed = time.time()
        summary = wait_for_run(s3, bucket, "out/", timeout=60)
        took = time.time() - freed
    finally:
        worker.stop()
        redis_server.kill()
    assert summary["status"] == "completed" and summary["counts"]["ok"] == n, summary
    assert took < 15, f"the run ended {took:.1f} s after the slots were freed (poll interval 30 s)"


# -- checkpoints: a long step records the round as it goes --------------------------------------
@pytest.fixture
def realtime_run(s3, bucket, env, redis_server, emulator, monkeypatch):
    """A real-time run of 24 tiny images in one shard, planned onto a queue nobody consumes
    (its messages are removed afterwards) and opened in this process; steps of 0.3 s that
    checkpoint for up to 30 s, 4 requests at a time, each answered after 0.25 s (the rate
    never the bound): sending takes ~1.5 s, so a step checkpoints several times even when a
    checkpoint's own writes are slow on a loaded machine."""
    from moonbatch.config import get_settings, reload_settings
    from moonbatch.workers.providers.realtime import rounds
    from moonbatch.workers.runstate import open_run
    from tests.conftest import BROKER_DB

    monkeypatch.setattr(rounds, "STEP_SECONDS", 0.3)
    monkeypatch.setattr(rounds, "CHECKPOINT_SECONDS", 30.0)
    monkeypatch.setenv("MOONBATCH_REALTIME_RATE", "1000")
    monkeypatch.setenv("MOONBATCH_REALTIME_CONCURRENCY", "4")
    reload_settings()
    emulator.config.realtime = RealtimeConfig(processing_seconds=0.25)
    put_tiny(s3, bucket, "in/", 24)
    queue = "checkpoints-" + uuid.uuid4().hex[:8]
    qenv = {**env, "MOONBATCH_QUEUE": queue}
    run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", *PROVIDER],
                     qenv).stdout.strip().splitlines()[-1]
    yield open_run(f"s3://{bucket}/out/", get_settings(), run_id)
    redis_server.client(BROKER_DB).delete(queue, queue + "-control")
    monkeypatch.undo()
    reload_settings()


def results_files(store) -> list[str]:
    return [o.key for o in store.iter_objects(layout.round_prefix(0, 0)) if "/results-" in o.key]


def test_a_long_step_records_the_round_at_each_checkpoint(realtime_run, emulator):
    """One step (the build's) sends the whole round without ending: every 0.3 s it records its
    finished lines and its ledger (a next step would start there, the requests in flight sent
    again) and the round's progress under the build's poll chain, then sends on. The round
    ends with every line once, in several results documents, and no request twice."""
    from moonbatch.workers.providers.realtime import RealtimeProvider
    from moonbatch.workers.storage import get_json
    from moonbatch.workers.tasks import _context, _progress

    store = realtime_run.output
    seen: list[dict] = []

    def checkpointed(fields: dict, next_in: float) -> None:
        _progress(store, 0, 0, "chain-a", 0)(fields, next_in)
        seen.append(get_json(store, layout.round_doc(0, 0, "progress")))

    before = emulator.emulator.realtime.calls.get("caption", 0)
    provider = RealtimeProvider()
    provider.submit_round(_context(realtime_run, 0, 0, checkpointed=checkpointed))
    ledger = get_json(store, layout.round_doc(0, 0, "requests"))
    assert ledger["cursor"] == ledger["lines"] == 24 and not ledger["resend"]  # one step sent all
    assert len(seen) >= 2 and ledger["steps"] == len(seen) + 1  # a record per checkpoint
    assert all(p["chain"] == "chain-a" and p["status"] == "in_progress" for p in seen)
    finished = [p["finished"] for p in seen]
    assert finished == sorted(finished) and finished[-1] < 24
    # A results document per checkpoint that finished lines (one that found none on a loaded
    # machine writes none), and the step's last record's.
    grew = sum(1 for a, b in zip([0, *finished], finished, strict=False) if b > a)
    assert grew >= 1 and len(results_files(store)) == grew + 1
    results = provider.collect_round(_context(realtime_run, 0, 0))
    assert sorted(line["line_index"] for line in results.lines) == list(range(24))
    assert emulator.emulator.realtime.calls.get("caption", 0) - before == 24
    assert results.stats["requests"] == 24 and results.stats["possible_duplicate_requests"] == 0


def test_a_step_that_loses_the_ledger_race_at_a_checkpoint_stops_sending(realtime_run):
    """Another step records the ledger after this step's first checkpoint (it moved nothing):
    this step's next checkpoint must not land. It stops sending, the lines it finished since
    its first checkpoint are dropped (their documents removed) and its answers since then count
    as possible duplicates; the next steps finish the round with every line once."""
    from moonbatch.workers.providers.realtime import RealtimeProvider
    from moonbatch.workers.storage import get_json
    from moonbatch.workers.tasks import _context

    store = realtime_run.output
    key = layout.round_doc(0, 0, "requests")
    recorded: list[dict] = []

    def other_step_records(fields: dict, next_in: float) -> None:
        # At this step's first checkpoint that finished lines (on a loaded machine an earlier
        # one may find none answered yet: it writes no results document).
        if not recorded and fields["finished"]:
            ledger = get_json(store, key)
            recorded.append(ledger)
            store.put(key, orjson.dumps({**ledger, "rate_limited": 1}))

    provider = RealtimeProvider()
    provider.submit_round(_context(realtime_run, 0, 0, checkpointed=other_step_records))
    ledger = get_json(store, key)
    first = recorded[0]
    assert first["ok"] < 24  # lines were left to send at the first checkpoint
    # The other step's record stands, with this step's answers since counted as duplicates.
    assert {**ledger, "possible_duplicates": 0} == {**first, "rate_limited": 1}
    assert ledger["possible_duplicates"] > 0  # answered after the first checkpoint
    assert len(results_files(store)) == 1  # the first checkpoint's lines only
    deadline = time.time() + 60
    while not provider.poll_round(_context(realtime_run, 0, 0), None).done:
        assert time.time() < deadline, "the round did not finish"
    results = provider.collect_round(_context(realtime_run, 0, 0))
    assert sorted(line["line_index"] for line in results.lines) == list(range(24))
    assert results.stats["possible_duplicate_requests"] == ledger["possible_duplicates"]
