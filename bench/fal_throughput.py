"""fal_throughput: how close a fleet keeps fal's concurrency limit busy.

Measures a fal run (``provider = "fal"``, endpoint ``fal-ai/moondream3-preview/caption``, started
as ``producer.runs.start_run`` does for ``moonbatch run --provider fal``) of 240 small distinct
photographs in moto's S3, in 4 shards of 60, through a running fleet of one
``celery -A moonbatch.workers worker -c 4`` process (a private redis-server), warmed up by a run of 4
one-image shards. The emulator's fal queue runs at most ``CAP`` = 8 requests at once for the key,
each taking ``T`` seconds, and queues the rest. ``MOONBATCH_FAL_CONCURRENCY`` = 8 (fal's limit;
the fleet's slots are shared by the 4 shards through Redis). Runs: T = 0.5 s with no queue ahead
(``MOONBATCH_FAL_QUEUE_AHEAD`` = 0: at most 8 in flight), then T = 0.5 s with the default queue
ahead (unset: requests waiting in fal's queue to start the moment a runner frees, twice the
cap, or more when a request is shorter than the fleet's refill of a freed runner,
``FalSettings.fal_in_flight``) and with only the cap once ahead (8, the default before the
measurements of 2026-12-03), and T = 1.0 s with the default. Poll bounds:
``MOONBATCH_POLL_MIN_INTERVAL`` 0.05 s, ``MOONBATCH_POLL_MAX_INTERVAL`` 2 s.

Achieved: requests / (start of the first submit to the end of the last result GET), from the
emulator's own record of every queue call (its ``_submit``/``_status``/``_result`` are wrapped in
this process to time them). Baseline, in the same run: one request done alone (submit with the
same presigned S3 URL moonbatch sends, poll its status every 5 ms until COMPLETED, GET the
result; median of 5), and the ideal ``CAP / that time`` requests/s: what a client that keeps
every slot busy and notices each completion at once would reach. Target: >= 0.90x the ideal.

Also reported: the mean slot occupancy (fal's busy request-seconds / (CAP x wall), and the share
of the fleet's slots held, submit to result) and where a request's time goes: submit, queued at
fal, processing, completion noticed late; and the time a fal slot idled per request.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from bench.common import Result, Servers, emulator, median
from bench.end_to_end import fleet_env, flush_redis, small_photos, worker_fleet

CAP = 8
SHARDS, PER_SHARD = 4, 60
# (seconds per request, requests in flight) of each run: fal's cap alone
# (MOONBATCH_FAL_QUEUE_AHEAD=0), the default queue ahead of it (unset: twice as many again, more
# for requests shorter than a step's refill), and the cap once ahead
DEFAULT = 0  # a run's fleet cap when MOONBATCH_FAL_QUEUE_AHEAD is unset (moonbatch's default)
RUNS = ((0.5, CAP), (0.5, DEFAULT), (0.5, 2 * CAP), (1.0, DEFAULT))
POLL_MIN, POLL_MAX = 0.05, 2.0
ENDPOINT = "fal-ai/moondream3-preview/caption"
ALONE_RUNS = 5
# --smoke: one run of 2 shards x 2 images at 0.05 s per request, 2 requests alone
SMOKE_RUNS, SMOKE_SHARDS, SMOKE_PER_SHARD, SMOKE_ALONE = ((0.05, DEFAULT),), 2, 2, 2
ALONE_POLL = 0.005
TARGET = 0.90


class CallLog:
    """Wall-clock times of the emulated fal queue's calls, by request id: ``submit`` (start and
    end of the call), ``status`` (end of each call and what it answered), ``result`` (end of
    the call that answered 200)."""

    def __init__(self, fal: Any) -> None:
        self.submit: dict[str, tuple[float, float]] = {}
        self.completed_seen: dict[str, float] = {}  # first status call that answered 200
        self.status_calls: dict[str, int] = {}
        self.result: dict[str, float] = {}
        self.image: dict[str, str] = {}  # the path of the image URL a request was sent
        self.events: list[tuple[str, str, float, float, int]] = []  # kind, id, start, end, HTTP
        self._wrap(fal)

    def _wrap(self, fal: Any) -> None:
        submit, status, result = fal._submit, fal._status, fal._result

        @functools.wraps(submit)
        def timed_submit(endpoint: str, rid: str) -> Any:
            from flask import request

            body = request.get_json(silent=True) or {}
            self.image[rid] = urlsplit(str(body.get("image_url", ""))[:2000]).path
            t0 = time.time()
            resp = submit(endpoint, rid)
            self.submit[rid] = (t0, time.time())
            self.events.append(("submit", rid, t0, time.time(), resp.status_code))
            return resp

        @functools.wraps(status)
        def timed_status(app_id: str, rid: str) -> Any:
            t0 = time.time()
            resp = status(app_id, rid)
            self.events.append(("status", rid, t0, time.time(), resp.status_code))
            self.status_calls[rid] = self.status_calls.get(rid, 0) + 1
            if resp.status_code == 200:
                self.completed_seen.setdefault(rid, time.time())
            return resp

        @functools.wraps(result)
        def timed_result(app_id: str, rid: str) -> Any:
            t0 = time.time()
            resp = result(app_id, rid)
            self.events.append(("result", rid, t0, time.time(), resp.status_code))
            if resp.status_code == 200:
                self.result.setdefault(rid, time.time())
            return resp

        fal._submit, fal._status, fal._result = timed_submit, timed_status, timed_result


def alone(emu: Any, image_url: str, runs: int, calls: CallLog) -> tuple[list[float], list[float]]:
    """Seconds each of ``runs`` requests takes done one at a time (submit, poll the status
    every ``ALONE_POLL`` s until COMPLETED, GET the result), and the seconds each submit took
    in the emulator."""
    import httpx

    headers = {"Authorization": f"Key {emu.config.fal_key}"}
    times, submits = [], []
    with httpx.Client(timeout=30) as client:
        for _ in range(runs):
            t0 = time.perf_counter()
            sub = client.post(f"{emu.fal_url}/{ENDPOINT}", headers=headers,
                              json={"image_url": image_url, "length": "normal"})
            sub.raise_for_status()
            sub_json = sub.json()
            while client.get(sub_json["status_url"], headers=headers).status_code != 200:
                time.sleep(ALONE_POLL)
            client.get(sub_json["response_url"], headers=headers).raise_for_status()
            times.append(time.perf_counter() - t0)
            begun, ended = calls.submit[sub_json["request_id"]]
            submits.append(ended - begun)
    return times, submits


@contextlib.contextmanager
def applied(env: dict[str, str]) -> Iterator[None]:
    """``env`` in this process's environment, settings and Celery app (``start_run`` runs here);
    restored afterwards."""
    from moonbatch.config import reload_settings
    from moonbatch.workers.app import reconfigure

    saved = dict(os.environ)
    os.environ.update(env)
    reconfigure(reload_settings())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        reconfigure(reload_settings())


def start(input_url: str, output_url: str, shard_size: int) -> str:
    """Start a fal caption run as ``moonbatch run --provider fal`` does (tests.test_fal_provider)."""
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import new_spec, start_run
    from moonbatch.workers.models import SkillOptions

    settings = get_settings()
    spec = new_spec(input_url, output_url, SkillOptions(skill="caption"), settings,
                    shard_size=shard_size)
    spec = spec.model_copy(update={"provider": "fal", "endpoint": ENDPOINT})
    start_run(spec, settings)
    return spec.run_id


def wait_for_run(s3: Any, bucket: str, prefix: str, timeout: float) -> dict[str, Any]:
    """``run.json`` once the run is final."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(s3.exceptions.NoSuchKey):
            doc = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "run.json")["Body"].read())
            if doc.get("status") in ("completed", "failed", "cancelled") and "counts" in doc:
                return doc
        time.sleep(0.1)
    raise RuntimeError(f"fal run at {prefix} not final after {timeout:.0f} s")


def analyse(fal: Any, calls: CallLog, rids: list[str]) -> dict[str, float]:
    """The run's numbers from the emulator's requests and the call log."""
    reqs = [fal.requests[r] for r in rids]
    first = min(calls.submit[r][0] for r in rids)
    last = max(calls.result[r] for r in rids)
    wall = last - first
    busy = sum(r.ends - r.started for r in reqs)
    held = sum(calls.result[r] - calls.submit[r][0] for r in rids)
    queued = sum(r.started - r.submitted for r in reqs)
    submit_s = [calls.submit[r][1] - calls.submit[r][0] for r in rids]
    late = [calls.result[r] - fal.requests[r].ends for r in rids]
    return {"n": len(rids), "wall": wall, "rate": len(rids) / wall, "busy": busy / (CAP * wall),
            "held": held / (CAP * wall), "cycle": CAP * wall / len(rids),
            "submit": sum(submit_s) / len(rids), "late": sum(late) / len(rids),
            "late_max": max(late), "queued": queued / len(rids),
            "idle": (CAP * wall - held) / len(rids),
            "status_per_request": sum(calls.status_calls.get(r, 0) for r in rids) / len(rids)}


def ledgers(s3: Any, bucket: str, out: str, shards: int) -> list[dict[str, Any]]:
    """Each shard's round-0 fal ledger (``requests.json``) with its ``polls`` (progress.json)."""
    from moonbatch.workers import layout

    found = []
    for shard in range(shards):
        ledger, polled = (out + layout.round_doc(shard, 0, n) for n in ("requests", "progress"))
        with contextlib.suppress(s3.exceptions.NoSuchKey):
            doc = json.loads(s3.get_object(Bucket=bucket, Key=ledger)["Body"].read())
            progress = json.loads(s3.get_object(Bucket=bucket, Key=polled)["Body"].read())
            found.append({**doc, "polls": progress.get("polls")})
    return found


def run(servers: Servers, smoke: bool = False, keep: dict[Any, Any] | None = None) -> Result:
    """Run the benchmark; see the module docstring. ``smoke``: tiny sizes, to check it runs;
    ``keep``, when given, receives each run's call log, emulator requests and ledgers (for a
    closer look)."""
    runs, shards, per_shard, alone_runs = ((SMOKE_RUNS, SMOKE_SHARDS, SMOKE_PER_SHARD, SMOKE_ALONE)
                                           if smoke else (RUNS, SHARDS, PER_SHARD, ALONE_RUNS))
    result = Result("fal_throughput")
    flush_redis(servers)
    s3 = servers.s3_client()
    bucket = servers.new_bucket("bench-fal")
    state = servers.new_bucket("bench-fal-state")
    n = shards * per_shard
    for i, body in enumerate(small_photos(n)):
        s3.put_object(Bucket=bucket, Key=f"in/{i:03d}.jpg", Body=body)
        if i < 4:
            s3.put_object(Bucket=bucket, Key=f"warm/{i:03d}.jpg", Body=body)
    image_url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "in/000.jpg"},
                                          ExpiresIn=3600)
    alone_s: dict[float, tuple[list[float], list[float]]] = {}
    submit_s: list[float] = []

    with emulator() as emu:
        fal = emu.emulator.fal
        emu.config.fal.concurrency = CAP
        calls = CallLog(fal)
        for fleet_cap in sorted({c for _, c in runs}):
            flush_redis(servers)
            env = {**fleet_env(servers, state),
                   "FAL_KEY": emu.config.fal_key, "MOONBATCH_FAL_QUEUE_URL": emu.fal_url,
                   "MOONBATCH_FAL_CONCURRENCY": str(CAP),
                   "MOONBATCH_POLL_MIN_INTERVAL": f"{POLL_MIN}",
                   "MOONBATCH_POLL_MAX_INTERVAL": f"{POLL_MAX}",
                   **({"MOONBATCH_FAL_QUEUE_AHEAD": str(fleet_cap - CAP)}
                      if fleet_cap != DEFAULT else {})}
            with applied(env), worker_fleet({**os.environ, **env}):
                emu.config.fal.processing_seconds = 0.05  # warm-up: one tiny shard per worker slot
                warm = f"warm-out-{fleet_cap}/"
                start(f"s3://{bucket}/warm/", f"s3://{bucket}/{warm}", 1)
                wait_for_run(s3, bucket, warm, 60)
                for seconds in [t for t, c in runs if c == fleet_cap]:
                    emu.config.fal.processing_seconds = seconds
                    if seconds not in alone_s:
                        alone_s[seconds] = alone(emu, image_url, alone_runs, calls)
                    submit_s.append(measure(result, s3, bucket, fal, calls, seconds, fleet_cap,
                                            median(alone_s[seconds][0]), keep, shards, per_shard))
    for seconds, (solo, _) in alone_s.items():
        result.notes.append(f"T = {seconds:g} s: requests alone took "
                            f"{', '.join(f'{t:.3f}' for t in solo)} s")
    lone = [t for _, subs in alone_s.values() for t in subs]
    result.notes += [
        f"{shards} shards x {per_shard} images (320x240 JPEGs), one worker process with 4 slots; "
        f"the emulator runs {CAP} requests at once and queues the rest (as fal does: requests "
        "waiting IN_QUEUE do not count toward an account's concurrency limit and are never refused "
        f"for it, fal docs 'Concurrency limits'); poll bounds {POLL_MIN:g} s / {POLL_MAX:g} s",
        f"in flight: MOONBATCH_FAL_CONCURRENCY ({CAP}) + MOONBATCH_FAL_QUEUE_AHEAD, the requests "
        "the fleet keeps submitted and not yet collected; the queue ahead waits in fal's queue "
        "and starts the moment a running request ends, without waiting for a poll; unset, it "
        "is the cap times ceil((poll min interval + 0.5 s a step takes) / the measured seconds "
        "per request), 2 to 8 times",
        "fal slot cycle = CAP x wall / requests = processing + the time a fal slot idled per "
        "request; a request from submit to result = submit (the emulator fetches the image and "
        "computes the answer inside the call) + queued at fal + processing + noticed late (its "
        "end to the end of its result GET)",
        "the ideal counts one client round trip per request (alone - T: submit, 5 ms polls, result "
        "GET); a fleet that queues ahead hides it, so it can pass 1.0x: fal's own bound is CAP / T "
        "(the occupancy row is the share of it reached)",
        "moto and the emulator run in threads of the benchmark process, on 2 cores shared with "
        f"the worker's 4 processes: a submit takes {median(lone):.3f} s alone (median) and "
        f"{min(submit_s):.3f}-{max(submit_s):.3f} s on average during a run",
    ]
    return result


def measure(result: Result, s3: Any, bucket: str, fal: Any, calls: CallLog, seconds: float,
            fleet_cap: int, per_request: float, keep: dict[Any, Any] | None,
            shards: int = SHARDS, per_shard: int = PER_SHARD) -> float:
    """One run of every image at ``seconds`` per request; its rows into ``result``. Returns the
    mean seconds a submit took in the emulator."""
    n = shards * per_shard
    ideal = CAP / per_request
    known = set(fal.requests)
    out = f"out-{seconds:g}-{fleet_cap}/"
    start(f"s3://{bucket}/in/", f"s3://{bucket}/{out}", per_shard)
    summary = wait_for_run(s3, bucket, out, 120)
    if summary["status"] != "completed" or summary["counts"]["ok"] != n:
        raise RuntimeError(f"fal run (T = {seconds:g} s, fleet cap {fleet_cap}): "
                           f"{summary['status']}, {summary['counts']}")
    rids = [r for r in fal.requests if r not in known]
    m = analyse(fal, calls, rids)
    books = ledgers(s3, bucket, out, shards)
    if keep is not None:
        keep[(seconds, fleet_cap)] = {"calls": calls, "ledgers": books, "summary": summary,
                                      "requests": {r: fal.requests[r] for r in rids}}
    ratio = m["rate"] / ideal
    run_wall = summary["timings"]["wall_seconds"]
    label = (f"T = {seconds:g} s, the default queue ahead" if fleet_cap == DEFAULT else
             f"T = {seconds:g} s, queue ahead {fleet_cap - CAP}" + (
                 " (at most fal's cap in flight)" if fleet_cap == CAP else ""))
    result.add(f"{label}: achieved requests/s",
               f"{m['rate']:.2f} req/s ({m['n']} requests, first submit to last result "
               f"{m['wall']:.1f} s)",
               f"ideal {CAP} / {per_request:.3f} s alone = {ideal:.2f} req/s",
               f"{ratio:.2f}x ideal",
               # the target is the default's; other queue depths are there to compare with it
               *((f">= {TARGET:.2f}x", ratio >= TARGET) if fleet_cap == DEFAULT else ()))
    result.add(f"{label}: run.json wall (recorded to finalised)",
               f"{run_wall:.1f} s ({n / run_wall:.2f} items/s)",
               f"{n / ideal:.1f} s at the ideal rate", f"{n / run_wall / ideal:.2f}x ideal")
    result.add(f"{label}: mean slot occupancy",
               f"{m['busy']:.0%} of fal's {CAP} running; " + (
                   f"{m['held'] * CAP / fleet_cap:.0%} of the fleet's {fleet_cap} held"
                   if fleet_cap != DEFAULT else f"{m['held'] * CAP:.1f} held on average"),
               "100 %", f"{m['busy']:.2f}x")
    whole = m["submit"] + m["queued"] + seconds + m["late"]
    result.add(f"{label}: per request",
               f"fal slot cycle {m['cycle']:.3f} s = processing {seconds:.3f} + idle "
               f"{m['cycle'] - seconds:.3f}; submit to result {whole:.3f} s = "
               f"submit {m['submit']:.3f} + queued {m['queued']:.3f} + processing {seconds:.3f} + "
               f"noticed late {m['late']:.3f} (max {m['late_max']:.2f})",
               f"alone: {per_request:.3f} s", f"{m['cycle'] / per_request:.2f}x")
    result.notes.append(
        f"{label}: {m['status_per_request']:.1f} status calls per request; steps per shard "
        f"{', '.join(str(b['polls']) for b in books)}; the shards' final estimates of a request's "
        f"time (ledger 'est') {', '.join(format(b['est'], '.2f') for b in books)} s")
    return m["submit"]
