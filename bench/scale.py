"""scale: 10,000 small real photographs through the whole Batch API pipeline on one machine.

10,000 distinct small JPEGs (random crops of scikit-image's photographs, resized to 192-480 px
wide, quality 75-90, about 10-30 kB each, a fixed seed; cached under the bench cache) in moto's
S3, annotated by ``moonbatch run s3://…/in/ s3://…/out/ --shard-size 1000 --workers 2`` (the
default Batch API provider; two local worker processes started by the command, a private
redis-server as broker, the run registry in S3) against an emulator whose batches take a fixed
``PROCESSING`` = 2 s (plus its 0.2 s of chunking). Time is scaled as in ``end_to_end``: poll
bounds 5 s / 120 s become ``POLL_MIN`` / ``POLL_MAX`` (1/30), the seed's 30 s poll sleep 1 s.

Measured: items/s end to end (the command's wall time, from starting the CLI to its exit after
the run is final), and the time spent outside the emulator: the wall time less the time at
least one of the run's batches was inside the emulator's minimum (chunking and processing,
``created`` to ``processing_end``, the union over batches), as a share of the wall time. moonbatch's
bytecode is written before the timed command (``end_to_end.compile_moonbatch``), as installing it
does.

Baselines, in the same run: a plain boto3 read of the same 10,000 objects (list, then GET each
with 16 threads: the I/O any pipeline pays), and the seed's sequential recipe (seed 002,
"Quickstart": read every image, one JSONL, upload, poll every 1 s, download;
``end_to_end.sequential``) on the same images and emulator.

Target: moonbatch's time outside the emulator at most 2x the plain boto3 read of the images
(everything moonbatch does besides reading them, listing, planning, building, uploading,
polling, merging and writing the results, costs at most as much again as the bare read); and
the run at least as fast as the seed's recipe. The share outside the emulator is printed
without a target: it depends mostly on the emulator's chosen processing time (a real batch
takes minutes, so moonbatch's share there is small).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from bench.common import (
    CACHE,
    PHOTOS,
    Result,
    Servers,
    cached_dir,
    dir_files,
    emulator,
    mark_complete,
    photos,
)
from bench.end_to_end import (
    POLL_MAX,
    POLL_MIN,
    SEED_POLL,
    compile_moonbatch,
    fleet_env,
    flush_redis,
    moonbatch,
    sequential,
)

N, SHARD_SIZE, WORKERS, PROCESSING = 10_000, 1000, 2, 2.0
# --smoke: 50 images in 2 shards, a 0.2 s batch (checks that the benchmark runs, measures nothing)
SMOKE_N, SMOKE_SHARD_SIZE, SMOKE_PROCESSING = 50, 25, 0.2
READ_THREADS = 16
TARGET_OUTSIDE = 2.0  # moonbatch's time outside the emulator / the plain boto3 read
SET = "scale-photos-v1"


def scale_photos(n: int) -> list[Path]:
    """``n`` small JPEGs (files under the bench cache, built once per ``n``; the first ``n``
    of any larger set): random crops (a fixed seed) of scikit-image's photographs, 192-480 px
    wide, JPEG quality 75-90."""
    from PIL import Image

    path, complete = cached_dir(f"{SET}-{n}")
    if not complete:
        sources = photos()
        rng = random.Random(20)
        for i in range(n):
            img = sources[PHOTOS[i % len(PHOTOS)]]
            w = rng.randint(min(160, img.width), img.width)
            h = rng.randint(min(120, img.height), img.height)
            x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
            width = rng.randint(192, 480)
            height = max(1, round(width * h / w))
            buf = io.BytesIO()
            img.crop((x, y, x + w, y + h)).resize((width, height), Image.Resampling.BILINEAR,
                                                  reducing_gap=2.0).save(
                buf, "JPEG", quality=rng.randint(75, 90))
            (path / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        mark_complete(path)
    return dir_files(path)


def upload(s3: Any, bucket: str, prefix: str, files: list[Path]) -> int:
    """Put ``files`` under ``prefix`` (16 threads); returns their bytes."""
    def put(f: Path) -> int:
        body = f.read_bytes()
        s3.put_object(Bucket=bucket, Key=prefix + f.name, Body=body)
        return len(body)

    with cf.ThreadPoolExecutor(16) as pool:
        return sum(pool.map(put, files))


def plain_read(s3: Any, bucket: str, prefix: str) -> tuple[float, int]:
    """Seconds to list ``prefix`` and GET every object with ``READ_THREADS`` threads, and the
    objects read."""
    start = time.perf_counter()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]
    with cf.ThreadPoolExecutor(READ_THREADS) as pool:
        sizes = list(pool.map(lambda k: len(s3.get_object(Bucket=bucket, Key=k)["Body"].read()),
                              keys))
    return time.perf_counter() - start, len(sizes)


def inside(batches: list[Any]) -> float:
    """Seconds at least one of ``batches`` was in the emulator's minimum time (``created`` to
    ``processing_end``: chunking and processing), the union of their intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted((b.created, b.processing_end) for b in batches):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def run(servers: Servers, smoke: bool = False) -> Result:
    """Run the benchmark (see the module docstring); ``smoke``: tiny sizes, to check it runs."""
    n, shard_size, processing = ((SMOKE_N, SMOKE_SHARD_SIZE, SMOKE_PROCESSING) if smoke
                                 else (N, SHARD_SIZE, PROCESSING))
    result = Result("scale")
    flush_redis(servers)
    s3 = servers.s3_client(pool=READ_THREADS)
    bucket = servers.new_bucket("bench-scale")
    state = servers.new_bucket("bench-scale-state")
    files = scale_photos(n)
    size = upload(s3, bucket, "in/", files)
    compile_moonbatch()  # as an install does: the timed command does not compile moonbatch

    with emulator(processing_seconds=processing, lines_per_second=1e6) as emu:
        env = {**os.environ, **fleet_env(servers, state),
               "MOONDREAM_API_KEY": emu.config.api_key, "MOONBATCH_MOONDREAM_URL": emu.url,
               "MOONBATCH_POLL_MIN_INTERVAL": f"{POLL_MIN:.4f}",
               "MOONBATCH_POLL_MAX_INTERVAL": f"{POLL_MAX:.4f}"}
        known = set(emu.emulator.batches)
        moonbatch_s = moonbatch(env, "run", f"s3://{bucket}/in/", f"s3://{bucket}/out/",
                                "--shard-size", str(shard_size), "--workers", str(WORKERS),
                                "--timeout", "1200", timeout=1300)
        batches = [b for i, b in emu.emulator.batches.items() if i not in known]
        summary = json.loads(s3.get_object(Bucket=bucket, Key="out/run.json")["Body"].read())
        if summary["counts"]["ok"] != n:
            raise RuntimeError(f"moonbatch run: {summary['counts']}")

        read_s, read_n = plain_read(s3, bucket, "in/")
        if read_n != n:
            raise RuntimeError(f"plain read: {read_n} objects")
        start = time.perf_counter()
        rows = sequential(s3, bucket, "in/", emu.url, emu.config.api_key, per_shard=n)
        sequential_s = time.perf_counter() - start
        if rows != n:
            raise RuntimeError(f"sequential recipe: {rows} result rows")

    in_emulator = inside(batches)
    outside = moonbatch_s - in_emulator
    result.add(f"{n} photographs ({size / n / 1000:.1f} kB on average), end to end",
               f"{n / moonbatch_s:.0f} items/s ({moonbatch_s:.1f} s, moonbatch run, {len(batches)} "
               f"batches, {WORKERS} worker processes)",
               f"{n / sequential_s:.0f} items/s ({sequential_s:.1f} s, sequential seed recipe)",
               f"{sequential_s / moonbatch_s:.2f}x faster", ">= 1.0x", moonbatch_s <= sequential_s)
    result.add("time outside the emulator (wall less the batches' chunking and processing)",
               f"{outside:.1f} s ({outside / moonbatch_s:.0%} of the wall; {in_emulator:.1f} s "
               "inside)",
               f"{read_s:.1f} s (plain boto3 read of the {n} objects, {READ_THREADS} threads, "
               f"{n / read_s:.0f} objects/s)",
               f"{outside / read_s:.2f}x the read", f"<= {TARGET_OUTSIDE:.1f}x",
               outside <= TARGET_OUTSIDE * read_s)
    timings = summary["timings"]
    run_s = timings["wall_seconds"]
    result.add("run.json wall (recorded to finalised)", f"{run_s:.1f} s ({n / run_s:.0f} items/s)",
               f"{sequential_s:.1f} s", f"{sequential_s / run_s:.2f}x faster")

    def at(field: str) -> float:
        from datetime import datetime

        return datetime.fromisoformat(timings[field]).timestamp()

    planned = at("planned_at") - at("created_at")
    first = min(b.created for b in batches) - at("created_at")
    last = at("finished_at") - max(b.processing_end for b in batches)
    result.notes += [
        f"stages of the run (run.json and the emulator's batches): planned {planned:.1f} s "
        f"after the run was recorded; first batch submitted at {first:.1f} s; the last batch's "
        f"processing ended {last:.1f} s before the run was final (noticing it, downloading, "
        f"merging, finalising); the command's start and exit around the run: "
        f"{moonbatch_s - run_s:.1f} s",
        f"{n} distinct JPEGs (random crops of scikit-image's photographs, 192-480 px wide), "
        f"{size / 1e6:.0f} MB in moto's S3; the emulator's batches take {processing:g} s plus "
        "0.2 s of chunking; moto and the emulator run in threads of the benchmark process, the "
        f"{WORKERS} worker processes (one `celery worker --concurrency {WORKERS}` started by the "
        "command) and the CLI in their own: all on the machine's cores",
        f"time scale 1/30 as in end_to_end: moonbatch's poll bounds {POLL_MIN:.2f} s / "
        f"{POLL_MAX:.2f} s, the seed recipe's poll sleep {SEED_POLL:.2f} s",
        f"photo set cached at {CACHE / SET}-{n}",
    ]
    return result
