"""end_to_end: a whole run through the real pipeline, against the seed's sequential recipe.

Measures ``moonbatch run s3://…/in/ s3://…/out/ --shard-size 20 --workers 0`` (wall time of the
command, and the run's own ``run.json`` wall time) on N = 4 and N = 16 shards x 20 small
photographs in moto's S3, with a running fleet of one ``celery -A moonbatch.workers worker -c 16``
process (a private redis-server: a slot for every shard), warmed up by a run of 16 one-image
shards, and an emulator whose batches take a fixed 3 s to process (plus 0.2 s chunking).

Baseline: the seed's example done by hand, sequentially (seed 002, "Quickstart"): for each shard
read its images, build the JSONL, ``mpu-create``, upload the parts, ``mpu-complete``, poll with a
fixed sleep, download the outputs. Time is scaled down 30x: the seed's 30 s poll sleep becomes
1.0 s, moonbatch's poll bounds of 5 s / 120 s become 0.17 s / 4 s. Expected speed-up: the number
of shards processed concurrently, N (every shard has a worker slot); target >= 0.9·N.

Also shown, with no target: the same run through the Python API, ``moonbatch.run`` in a warm
process (``moonbatch_warm``: after a warm-up run in that process, so no interpreter start, no
imports, its clients made), against the same recipe, which runs in the benchmark's process.

moonbatch's bytecode is written before the timed commands (``compile_moonbatch``), as installing
it does.

Then the same 4 shards again with batches of 20 s (10 minutes at the time scale), with the
target's ratio shown and not counted: the time scale shrinks the batches and the polling, not
moonbatch's fixed costs (start-up, checks, planning, its records, finalising), so the 3 s
batches leave them about half a second in all; the longer run shows the ratio once a batch is long beside
them. Each size also notes each side's time besides the batch's own and the batch length
from which the target's ratio holds with them.

Each size also notes where moonbatch's time went, stage by stage (``stages``): start-up,
planning, build and upload, the API's own time, completion noticed, collect and merge,
finalise, the CLI noticing the end.

Also reported, for both: status requests per batch (the emulator's counters; moonbatch's include
the one ``merge_round`` makes for fresh output URLs) and the completion-detection delay per batch.
The emulator completes a batch lazily, on the first status GET after its ``processing_end``, so
``completed_at - processing_end`` is how late the poller noticed; the polling latency adds the
time the poller let a chunked batch wait before it started processing (the emulator starts it
lazily too).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import PHOTOS, Result, Servers, emulator, median, photos

SHARDS, PER_SHARD = (4, 16), 20  # run sizes (shards) and images per shard
# The same 4 shards with batches of 20 s (10 minutes at the time scale): what the target's
# ratio becomes once a batch takes long against moonbatch's fixed costs (start-up, planning,
# records, finalising), which the time scale does not shrink.
LONG_SHARDS, LONG_PROCESSING = 4, 20.0
WARM_PREFIX = "warm/"  # one image per worker slot, for the warm-up runs
WORKER_SLOTS = 4  # the fleet's slots at the least (fal_throughput's fleet); end_to_end: >= shards
TARGET = 0.9  # of N, the shards processed in parallel
PROCESSING_SECONDS = 3.0
SCALE = 30.0  # real seconds per benchmark second
SEED_POLL = 30.0 / SCALE
POLL_MIN, POLL_MAX = 5.0 / SCALE, 120.0 / SCALE
BROKER_DB, BACKEND_DB = 14, 15
# --smoke: one shard of 2 images, a 0.2 s batch (checks that the benchmark runs, measures nothing)
SMOKE_SHARDS, SMOKE_PER_SHARD, SMOKE_PROCESSING = (1,), 2, 0.2
SEED_CHUNK_SIZE = 50 * 1024 * 1024  # the seed's part size
REPO = Path(__file__).resolve().parent.parent


def small_photos(n: int) -> list[bytes]:
    """``n`` distinct small JPEGs (320x240 crops of scikit-image's photos, quality 85)."""
    from PIL import Image

    sources, out = photos(), []
    for i in range(n):
        rng = random.Random(i)
        img = sources[PHOTOS[i % len(PHOTOS)]]
        w = rng.randint(160, img.width)
        h = min(img.height, w * 3 // 4)
        x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
        buf = io.BytesIO()
        img.crop((x, y, x + w, y + h)).resize((320, 240), Image.Resampling.LANCZOS).save(
            buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def fleet_env(servers: Servers, state: str | None = None) -> dict[str, str]:
    """The settings a benchmark's fleet and CLI share: moto's credentials and endpoint, the
    private redis-server's broker and result-backend databases, a queue of its own, and the run
    registry in ``s3://<state>/state/`` (None: the default)."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "MOONBATCH_BROKER_URL": servers.redis(BROKER_DB),
            "MOONBATCH_RESULT_BACKEND": servers.redis(BACKEND_DB),
            "MOONBATCH_QUEUE": f"moonbatch-bench-{uuid.uuid4().hex[:8]}",
            "MOONBATCH_S3_ENDPOINT_URL": servers.s3(),
            **({"MOONBATCH_STATE_URL": f"s3://{state}/state/"} if state else {})}


def flush_redis(servers: Servers) -> None:
    """Empty the broker and result-backend databases of the benchmarks' private redis-server."""
    import redis

    for db in (BROKER_DB, BACKEND_DB):
        with redis.Redis.from_url(servers.redis(db)) as client:
            client.flushdb()


@contextlib.contextmanager
def worker_fleet(env: dict[str, str], slots: int = WORKER_SLOTS) -> Iterator[subprocess.Popen]:
    """A ``celery -A moonbatch.workers worker -c SLOTS`` process on ``env``'s queue, up and
    answering pings."""
    from celery import Celery

    name = f"bench-{uuid.uuid4().hex[:8]}@%h"
    log = tempfile.NamedTemporaryFile(prefix="moonbatch-bench-worker-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "moonbatch.workers", "worker", "-c", str(slots), "-Q",
         f"{env['MOONBATCH_QUEUE']},{env['MOONBATCH_QUEUE']}-control", "--loglevel", "WARNING",
         "-n", name, "--without-mingle", "--without-gossip"], env=env, cwd=REPO, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    control = Celery(broker=env["MOONBATCH_BROKER_URL"]).control
    try:
        deadline = time.time() + 60
        while not control.ping(timeout=0.5):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the Celery worker did not start:\n" + Path(log.name).read_text()[-2000:])
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` and its live descendants used so far
    (``/proc``; 0 where it is not there)."""
    tick, total, todo = os.sysconf("SC_CLK_TCK"), 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


def compile_moonbatch() -> None:
    """Write the bytecode of moonbatch's modules beside them (``__pycache__``, ignored by git),
    as installing its wheel does (pip compiles every module it installs, as it did the other
    packages'): in a checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (this machine's setting)
    each ``moonbatch`` command would otherwise compile its ~80 modules' source at every start
    (~0.1 s of CPU). Stale bytecode is never used: Python checks each source's mtime."""
    import compileall
    import importlib.util

    for name in ("moonbatch", "moonbatch.config", "moonbatch.emulator", "moonbatch.producer",
                 "moonbatch.workers"):
        spec = importlib.util.find_spec(name)
        for folder in spec.submodule_search_locations if spec else ():
            compileall.compile_dir(folder, quiet=1)


def moonbatch(env: dict[str, str], *args: str, timeout: float = 180) -> float:
    """Seconds the ``moonbatch ARGS`` command took. Raises ``RuntimeError`` if it failed,
    ``subprocess.TimeoutExpired`` if it took over ``timeout`` seconds."""
    # The console script beside this interpreter (a virtualenv's bin/), not a version
    # manager's shim on PATH (pyenv's: a bash script and a second exec, 0.2-0.6 s per call).
    beside = Path(sys.executable).parent / "moonbatch"
    found = str(beside) if beside.is_file() else shutil.which("moonbatch")
    cli = [found] if found else [sys.executable, "-m", "moonbatch"]
    start = time.perf_counter()
    proc = subprocess.run(cli + list(args), env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"moonbatch {args[0]} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


# ``moonbatch_warm``'s process: the Python API's ``moonbatch.run`` for the warm-up run, then
# for the timed one; prints when the timed one started and how long it took.
WARM_COMMAND = """\
import json, sys, time
import moonbatch

(source, output, options), timed = json.loads(sys.argv[1])
moonbatch.run(source, output, **options)
source, output, options = timed
started, start = time.time(), time.perf_counter()
moonbatch.run(source, output, **options)
print(json.dumps([started, time.perf_counter() - start]))
"""

RunArgs = tuple[str, str, dict[str, Any]]  # INPUT, OUTPUT, moonbatch.run's keyword options


def moonbatch_warm(env: dict[str, str], warm_up: RunArgs, timed: RunArgs,
                   timeout: float = 600) -> tuple[float, float]:
    """When the ``timed`` run started (``time.time()``) and the seconds it took, as
    ``moonbatch.run(INPUT, OUTPUT, **options)`` (the Python API) in a Python process with
    ``env`` that ran ``warm_up`` first: a run in a warm process (moonbatch's modules imported,
    its S3 clients and broker connection made), as a pipeline or a notebook calling the API
    runs it: no interpreter start, no imports. Raises ``RuntimeError`` if the process failed,
    ``subprocess.TimeoutExpired`` if it took over ``timeout`` seconds."""
    proc = subprocess.run([sys.executable, "-c", WARM_COMMAND, json.dumps([warm_up, timed])],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"moonbatch.run exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    started, seconds = json.loads(proc.stdout.splitlines()[-1])
    return started, seconds


def sequential(s3: Any, bucket: str, prefix: str, api_url: str, api_key: str,
               per_shard: int = PER_SHARD) -> int:
    """The seed's recipe, one shard after another; returns the result rows downloaded."""
    import requests

    headers = {"X-Moondream-Auth": api_key}
    base = f"{api_url}/batch"
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]
    rows = 0
    for start in range(0, len(keys), per_shard):
        lines = []
        for key in keys[start:start + per_shard]:
            image = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            lines.append(json.dumps({"id": key, "skill": "caption",
                                     "image": base64.b64encode(image).decode(), "length": "normal"}))
        data = ("\n".join(lines) + "\n").encode()
        init = requests.post(f"{base}?action=mpu-create", headers=headers).json()
        file_id, upload_id = init["fileId"], init["uploadId"]
        parts = []
        for number, offset in enumerate(range(0, len(data), SEED_CHUNK_SIZE), start=1):
            part = requests.put(
                f"{base}/{file_id}?action=mpu-uploadpart&uploadId={upload_id}&partNumber={number}",
                headers={**headers, "Content-Type": "application/octet-stream"},
                data=data[offset:offset + SEED_CHUNK_SIZE]).json()
            parts.append({"partNumber": number, "etag": part["etag"]})
        batch = requests.post(f"{base}/{file_id}?action=mpu-complete&uploadId={upload_id}",
                              headers=headers, json={"parts": parts}).json()
        while True:
            status = requests.get(f"{base}/{batch['id']}", headers=headers).json()
            if status["status"] in ("completed", "failed"):
                break
            time.sleep(SEED_POLL)
        for output in status.get("outputs", []):
            rows += len(requests.get(output["url"]).content.splitlines())
    return rows


def polling_cost(emu: Any, before: set[str], status_requests: int
                 ) -> tuple[float, list[float], list[float]]:
    """For the batches created since ``before``: status requests per batch, detection delays
    (``completed_at - processing_end``) and polling latencies (``completed_at - created`` less the
    chunking and processing time a batch needs at the least)."""
    cfg = emu.config
    batches = [b for i, b in emu.emulator.batches.items() if i not in before and b.completed_at]
    least = [cfg.chunking_seconds + cfg.processing_seconds + b.total / cfg.lines_per_second
             for b in batches]
    return (status_requests / max(1, len(batches)),
            [b.completed_at - b.processing_end for b in batches],
            [b.completed_at - b.created - t for b, t in zip(batches, least, strict=True)])


def stages(s3: Any, bucket: str, out: str, batches: dict[str, Any], shards: int,
           cli: tuple[float, float]) -> list[tuple[str, list[float]]]:
    """Where a run's time went, per shard: ``(stage, seconds of each shard)`` in order, from
    the run's own documents under ``out`` (spec, plan, each shard's ``batch.json`` and
    ``done.json``, ``run.json``), the emulator's ``batches`` (by id: created at
    ``mpu-complete``, ``processing_end``, ``completed_at`` at the status GET that saw it done)
    and ``cli`` (the command's start and end, unix seconds). Stages of the whole run have one
    value."""
    from moonbatch.workers import layout
    from moonbatch.workers.runstate import epoch_seconds

    def doc(key: str) -> dict[str, Any]:
        return json.loads(s3.get_object(Bucket=bucket, Key=out + key)["Body"].read())

    spec, plan, summary = doc(layout.SPEC), doc(layout.PLAN), doc(layout.SUMMARY)
    created, planned = spec["created_at"], plan["planned_at"]
    finished = epoch_seconds(summary["timings"]["finished_at"])
    sent, api, noticed, merged = [], [], [], []
    for shard in range(shards):
        batch = batches[doc(layout.round_doc(shard, 0, "batch"))["batch_id"]]
        done = doc(layout.shard_doc(shard, "done"))
        sent.append(batch.created - planned)
        api.append(batch.processing_end - batch.created)
        noticed.append(batch.completed_at - batch.processing_end)
        merged.append(done["merged_at"] - batch.completed_at)
    ends = [planned + a + b + c + d for a, b, c, d in zip(sent, api, noticed, merged, strict=True)]
    return [("CLI start-up (start to the run's spec made)", [created - cli[0]]),
            ("checks, listing, planning (spec made to plan written)", [planned - created]),
            ("enqueue, task start, build, upload, mpu-complete (plan to batch created)", sent),
            ("the API: chunking and processing (batch created to processing end)", api),
            ("completion noticed (processing end to the status GET that saw it)", noticed),
            ("collect: merge task start, download, merge, write (seen to shard merged)", merged),
            ("finalise (last shard merged to run.json)", [finished - max(ends)]),
            ("the CLI noticing the end (run.json to exit)", [cli[1] - finished])]


def one_size(emu: Any, env: dict[str, str], s3: Any, bucket: str, shards: int,
             per_shard: int, result: Result, slots: int, fleet: int, tag: str = "") -> None:
    """``moonbatch run`` and the sequential recipe on ``shards`` shards of ``per_shard`` images
    (under ``in-<shards>/``, into ``out-<shards><tag>/``); their rows and notes into ``result``.
    ``fleet``: the worker's process id (its CPU time is counted). ``tag``: the run's name in
    the output and in its rows (after the size), for a second run of a size."""
    prefix = f"in-{shards}/"
    counted, known = emu.emulator.requests.get("status", 0), set(emu.emulator.batches)
    cpu0 = (cpu_seconds(fleet), resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN))
    t0 = time.time()
    out = f"out-{shards}{tag}/"
    moonbatch_s = moonbatch(env, "run", f"s3://{bucket}/{prefix}", f"s3://{bucket}/{out}",
                            "--shard-size", str(per_shard), "--workers", "0", "--timeout", "180")
    cli = (t0, time.time())
    self_cpu, cli_cpu = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                               resource.RUSAGE_CHILDREN))
    cpu = {"the fleet": cpu_seconds(fleet) - cpu0[0],
           "the CLI": cli_cpu.ru_utime + cli_cpu.ru_stime - cpu0[2].ru_utime - cpu0[2].ru_stime,
           "moto and the emulator (this process)": self_cpu.ru_utime + self_cpu.ru_stime
           - cpu0[1].ru_utime - cpu0[1].ru_stime}
    mb_requests, mb_delays, mb_latency = polling_cost(
        emu, known, emu.emulator.requests.get("status", 0) - counted)
    summary = json.loads(s3.get_object(Bucket=bucket, Key=out + "run.json")["Body"].read())
    if summary["counts"]["ok"] != shards * per_shard:
        raise RuntimeError(f"moonbatch run: {summary['counts']}")
    breakdown = stages(s3, bucket, out, dict(emu.emulator.batches), shards, cli)

    counted, known = emu.emulator.requests.get("status", 0), set(emu.emulator.batches)
    start = time.perf_counter()
    rows = sequential(s3, bucket, prefix, emu.url, emu.config.api_key, per_shard)
    sequential_s = time.perf_counter() - start
    if rows != shards * per_shard:
        raise RuntimeError(f"sequential recipe: {rows} result rows")
    seq_requests, seq_delays, seq_latency = polling_cost(
        emu, known, emu.emulator.requests.get("status", 0) - counted)
    api_s = None
    if not tag:  # the same run through the Python API in a warm process (after a warm-up run)
        options = {"workers": 0, "timeout": 180}
        _, api_s = moonbatch_warm(
            env, (f"s3://{bucket}/{WARM_PREFIX}", f"s3://{bucket}/warm-api-{shards}/",
                  {**options, "shard_size": 1}),
            (f"s3://{bucket}/{prefix}", f"s3://{bucket}/{out}api/",
             {**options, "shard_size": per_shard}))

    parallel = min(shards, slots)
    goal = TARGET * parallel
    target = f"≥ {TARGET:g}·N× = {goal:.1f}x (N = {parallel} shards in parallel)" + (
        " (shown for comparison: the target is the 3 s batches')" if tag else "")
    run_s = summary["timings"]["wall_seconds"]
    batch_s = emu.config.chunking_seconds + emu.config.processing_seconds
    label = f"{shards} shards x {per_shard} images" + (
        f", batches of {emu.config.processing_seconds:g} s" if tag else "")
    result.add(f"{label}, wall", f"{moonbatch_s:.1f} s (moonbatch run)",
               f"{sequential_s:.1f} s (sequential seed recipe)",
               f"{sequential_s / moonbatch_s:.2f}x faster", target,
               None if tag else sequential_s / moonbatch_s >= goal)
    result.add(f"{label}, run.json wall (recorded to finalised)", f"{run_s:.1f} s",
               f"{sequential_s:.1f} s", f"{sequential_s / run_s:.2f}x faster", target,
               None if tag else sequential_s / run_s >= goal)
    if api_s is not None:
        result.add(f"{label}, moonbatch.run in a warm process (modules imported, clients made; "
                   "shown, not counted)", f"{api_s:.1f} s (Python API)",
                   f"{sequential_s:.1f} s (the recipe, in this process too)",
                   f"{sequential_s / api_s:.2f}x faster", target, None)
    result.add(f"{label}, status requests per batch", f"{mb_requests:.1f}", f"{seq_requests:.1f}",
               f"{mb_requests / seq_requests:.2f}x")

    def spread(values: list[float]) -> str:
        return f"median {median(values):.2f} s, max {max(values):.2f} s"

    result.add(f"{label}, completion-detection delay per batch", spread(mb_delays),
               spread(seq_delays), f"{median(mb_delays) / max(median(seq_delays), 1e-3):.2f}x")
    result.add(f"{label}, polling latency per batch (incl. late chunking)", spread(mb_latency),
               spread(seq_latency), f"{median(mb_latency) / max(median(seq_latency), 1e-3):.2f}x")
    per_shard_s = sequential_s / shards
    parts = "; ".join(f"{name}: " + (f"{v[0]:.2f} s" if len(v) == 1 else
                                     f"median {median(v):.2f} s, max {max(v):.2f} s")
                      for name, v in breakdown)
    cores = os.cpu_count() or 1
    result.notes += [
        f"{label}: CPU time used during moonbatch's run: "
        + ", ".join(f"{who} {sec:.1f} s" for who, sec in cpu.items())
        + f"; {sum(cpu.values()):.1f} s in all is {sum(cpu.values()) / cores:.1f} s of wall "
        f"time on this machine's {cores} cores at the least (shared with whatever else runs)",
        f"{label}: where moonbatch's {moonbatch_s:.1f} s went (run documents and the emulator's "
        f"batch times): {parts}",
        f"{label}: the target needs the command within {sequential_s / goal:.2f} s: one "
        f"sequential shard ({per_shard_s:.2f} s, its polling included) plus "
        f"{sequential_s / goal - per_shard_s:.2f} s for everything else",
        own_time(label, moonbatch_s, per_shard_s, batch_s, parallel),
    ]


def own_time(label: str, wall: float, per_shard: float, batch: float, parallel: int) -> str:
    """A note: each side's time besides a batch's own ``batch`` seconds (chunking and
    processing), moonbatch's over the whole run (``wall``: its shards in parallel) and the
    recipe's per shard, and the batch time from which the target's ratio holds with them:
    ``N (T + s) / (T + m) >= 0.9 N`` for ``T >= (0.9 m - s) / 0.1``, at ``N`` = ``parallel``
    shards whose own time does not grow with ``N``."""
    m, s = wall - batch, per_shard - batch
    least = max(0.0, (TARGET * m - s) / (1 - TARGET))
    return (f"{label}: time besides the batch's own {batch:.1f} s: moonbatch {m:.2f} s for "
            f"the run, the recipe {s:.2f} s per shard; with these the ratio reaches "
            f"{TARGET:g}·N = {TARGET * parallel:.1f}x for batches of {least:.1f} s and more "
            f"({least * SCALE / 60:.1f} minutes at full time scale), as long as the machine "
            "has the cores to run the shards' work at once")


def run(servers: Servers, smoke: bool = False) -> Result:
    """Run the benchmark (see the module docstring); ``smoke``: tiny sizes, to check it runs."""
    sizes, per_shard, processing = ((SMOKE_SHARDS, SMOKE_PER_SHARD, SMOKE_PROCESSING) if smoke
                                    else (SHARDS, PER_SHARD, PROCESSING_SECONDS))
    slots = max(WORKER_SLOTS, *sizes)
    result = Result("end_to_end")
    flush_redis(servers)
    s3 = servers.s3_client()
    bucket = servers.new_bucket("bench-e2e")
    bodies = small_photos(max(sizes) * per_shard)
    compile_moonbatch()  # as an install does: the timed commands do not compile moonbatch
    for shards in sizes:
        for i, body in enumerate(bodies[:shards * per_shard]):
            s3.put_object(Bucket=bucket, Key=f"in-{shards}/{i:03d}.jpg", Body=body)
    for i in range(slots):
        s3.put_object(Bucket=bucket, Key=f"{WARM_PREFIX}{i:03d}.jpg", Body=bodies[i % len(bodies)])

    with emulator(processing_seconds=processing, lines_per_second=1e6) as emu:
        env = {**os.environ, **fleet_env(servers),
               "MOONDREAM_API_KEY": emu.config.api_key, "MOONBATCH_MOONDREAM_URL": emu.url,
               "MOONBATCH_POLL_MIN_INTERVAL": f"{POLL_MIN:.4f}",
               "MOONBATCH_POLL_MAX_INTERVAL": f"{POLL_MAX:.4f}"}
        with worker_fleet(env, slots) as fleet:
            emu.config.processing_seconds = 0.0  # warm-up: one tiny shard per worker slot
            moonbatch(env, "run", f"s3://{bucket}/{WARM_PREFIX}", f"s3://{bucket}/warm-out/", "--shard-size",
                      "1", "--workers", "0")
            emu.config.processing_seconds = processing
            for shards in sizes:
                one_size(emu, env, s3, bucket, shards, per_shard, result, slots, fleet.pid)
            if not smoke:
                emu.config.processing_seconds = LONG_PROCESSING
                one_size(emu, env, s3, bucket, LONG_SHARDS, per_shard, result, slots, fleet.pid,
                         tag="-long")

    result.notes += [
        f"one worker process with {slots} slots (celery -c {slots}): every shard of each size "
        "has a slot, so N = the shards; the ideal is one shard's time, the target 0.9 of it",
        f"time scale 1/{SCALE:.0f}: seed poll sleep 30 s -> {SEED_POLL:.2f} s; moonbatch poll "
        f"interval bounds 5 s / 120 s -> {POLL_MIN:.2f} s / {POLL_MAX:.2f} s; a batch needs "
        f"{processing:.1f} s of processing after 0.2 s of chunking",
        "the emulator also leaves 'chunking' only when a status GET sees it is due, so with a fixed "
        "1 s poll processing starts up to 1 s late and then ends just before a poll: its detection "
        "delay looks small while its polling latency (completed_at - created - 3.2 s) does not",
    ]
    return result
