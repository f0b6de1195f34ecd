"""memory: peak RSS of the producer planning a huge listing and of a worker handling a big shard.

Measures, in child processes (``bench.probe``), the peak resident set size (VmHWM):

- planning: ``moonbatch.workers.readers.prefix.iter_items`` + ``producer.planner.plan_shards`` + writing every
  shard's plan file to a LocalStore (what ``submit_run`` does, less the queue) over a local tree of
  1,000,000 empty ``.jpg`` files in 1000 directories (target: a few hundred MB at most);
- planning a manifest: ``Reader.check`` (the duplicate-id pre-pass) then the same planning, for a
  1,000,000-row CSV (string ids) and JSONL (int ids, a per-row ``length`` on every 10th row)
  local manifest whose image column holds keys of that tree (``--base``; each size read with
  ``stat``), compared with the prefix planning's peak measured in the same run;
- planning at scale: the same planning and plan files over 1,000,000 and 10,000,000 generated
  keys (no listing: the planner's own share, ``probe plan-stream``); the 10M peak must stay
  within 1.25x the 1M one (flat: nothing held per key), items/s reported;
- planning listed S3 keys: the same planning and plan files over keys listed from
  ``bench.s3list`` (a ListObjectsV2 server in its own process that makes its keys up per page:
  moto cannot hold millions of objects) through moonbatch's own ``S3Store`` and ``iter_items``
  (``probe plan-s3``), at 100,000 and 1,000,000 keys: peak RSS, time, keys/s, and the larger
  peak within 1.25x the smaller (flat), with the bytes per key it grows by and what that slope
  and rate give at 10,000,000. Against, in the same run over the same server at 100,000 keys:
  a bare boto3 ``list_objects_v2`` paginator (what a user writes; target: moonbatch's listing
  *and* planning at least 0.9x its keys/s), and the same paginator on moonbatch's client
  (botocore's share: what is left is moonbatch's). The server's CPU seconds are noted (a few %
  of the wall: it is not what is measured). Why not 10,000,000 by default: the client side is
  botocore's XML parse, ~40 us of CPU a key on this machine (~120 with botocore's default
  dateutil timestamps, which moonbatch's client skips), so 10,000,000 keys take many minutes
  (30 under a load of 10 here) and a boto3 baseline three times that: too long for a
  ~20-minute bench, and neither the peak (one page and one shard at a time) nor the rate per
  key depends on the count. ``MOONBATCH_BENCH_LIST_KEYS=10000000 python -m bench memory``
  measures 1,000,000 and 10,000,000 (the baselines stay at 100,000);
- a worker: ``build_and_submit`` of a shard of tiny PNGs (8x8, local files) to the emulator with
  the worker settings (fetch concurrency, ...; 8 MiB parts so that the JSONL of the larger shard,
  ~43 MB, spans several parts), then waiting for the batch and what the merge task calls:
  downloading and verifying its outputs (``fetch_results``), ``merge_round``, storing the round's
  rows, composing and writing the JSONL results (``write_rounds``); for shards of 20,000 and of
  100,000 lines,
  so that growth with the shard shows (target: the 100,000-line shard's peak within 1.25x the
  20,000-line one's, i.e. bounded rather than growing with the shard);
- the exports of a finished run: ``writers.finish_run`` (COCO ``instances.json`` and Label
  Studio ``tasks.json``) over merged detect runs of 50,000 and 250,000 rows of 4 boxes each,
  written to a local OUTPUT first (target: the larger run's peak within 1.25x the smaller's:
  the documents are not held in memory).

Baseline for both: a child that only imports the same modules. The input trees are made once and
cached; the time that took is reported when it happens. The emulator (in the benchmark process,
so not in the worker's RSS) processes 100,000 lines in seconds: its decode time is noted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Result, Servers, cached_dir, emulator, mark_complete
from bench.s3list import listing_server

PLAN_ITEMS, PLAN_DIRS = 1_000_000, 1000
STREAM_SIZES = (1_000_000, 10_000_000)
SMOKE_STREAM_SIZES = (200, 2_000)
# listed S3 keys (bench.s3list), the larger 10x the smaller; MOONBATCH_BENCH_LIST_KEYS sets the larger
LIST_KEYS = int(os.environ.get("MOONBATCH_BENCH_LIST_KEYS", 1_000_000))
SMOKE_LIST_KEYS = 2_000
BASELINE_KEYS = 100_000  # the boto3 baselines list at most this many
LIST_TARGET = 0.9  # moonbatch's listing + planning against a bare boto3 listing, keys/s
SHARD_SIZES = (20_000, 100_000)
# exports of a merged detect run (COCO and Label Studio), rows of EXPORT_BOXES boxes each
EXPORT_ROWS, SMOKE_EXPORT_ROWS = (50_000, 250_000), (200, 1_000)
EXPORT_SHARD_ROWS = 2_000
EXPORT_BOXES = 4
TINY_DIRS = 100
# --smoke: 2,000 files in 10 directories, shards of 50 and 100 lines (checks that it runs)
SMOKE_ITEMS, SMOKE_DIRS, SMOKE_SHARD_SIZES = 2000, 10, (50, 100)
PLAN_TARGET_MB = 300.0
GROWTH_TARGET = 1.25
PART_SIZE = 8 * 2**20  # so that the larger shard spans several parts
REPO = Path(__file__).resolve().parent.parent


def empty_tree(items: int = PLAN_ITEMS, dirs: int = PLAN_DIRS) -> tuple[Path, float | None]:
    """``items`` (1,000,000) empty ``.jpg`` files in ``dirs`` (1000) directories (cached); seconds
    it took to make, or None if it was cached."""
    path, ready = cached_dir("tree-1m-v1" if items == PLAN_ITEMS else f"tree-{items}-{dirs}-v1")
    if ready:
        return path, None
    start, per_dir = time.perf_counter(), items // dirs
    for d in range(dirs):
        folder = path / f"d{d:04d}"
        folder.mkdir()
        for i in range(per_dir):
            os.close(os.open(folder / f"IMG_{d * per_dir + i:07d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    mark_complete(path)
    return path, time.perf_counter() - start


def tiny_tree(n: int = max(SHARD_SIZES)) -> tuple[Path, float | None]:
    """``n`` distinct 8x8 PNGs in ``TINY_DIRS`` directories (cached); seconds it took to make, or
    None if it was cached."""
    import io

    from PIL import Image

    path, ready = cached_dir("tiny-100k-v1" if n == max(SHARD_SIZES) else f"tiny-{n}-v1")
    if ready:
        return path, None
    start = time.perf_counter()
    rng = random.Random(0)
    for d in range(TINY_DIRS):
        (path / f"d{d:03d}").mkdir()
    for i in range(n):
        buf = io.BytesIO()
        Image.frombytes("RGB", (8, 8), rng.randbytes(192)).save(buf, "PNG")
        (path / f"d{i * TINY_DIRS // n:03d}" / f"{i:06d}.png").write_bytes(buf.getvalue())
    mark_complete(path)
    return path, time.perf_counter() - start


def manifests(tree: Path, items: int = PLAN_ITEMS, dirs: int = PLAN_DIRS
              ) -> tuple[dict[str, Path], float | None]:
    """``{"csv": ..., "jsonl": ...}``: ``items``-row manifests of ``tree``'s files (cached);
    seconds it took to make them, or None if they were cached."""
    path, ready = cached_dir("manifest-1m-v1" if items == PLAN_ITEMS else f"manifest-{items}-{dirs}-v1")
    files = {"csv": path / "m.csv", "jsonl": path / "m.jsonl"}
    if ready:
        return files, None
    start, per_dir = time.perf_counter(), items // dirs
    with open(files["csv"], "w") as c, open(files["jsonl"], "w") as j:
        c.write("id,image,length\n")
        for i in range(items):
            key = f"d{i // per_dir:04d}/IMG_{i:07d}.jpg"
            length = "long" if i % 10 == 0 else ""
            c.write(f"img-{i:07d},{key},{length}\n")
            j.write(json.dumps({"id": i, "image": key, **({"length": length} if length else {})})
                    + "\n")
    mark_complete(path)
    return files, time.perf_counter() - start


def plan_manifests(result: Result, tree: Path, prefix_peak: float, items: int = PLAN_ITEMS,
                   dirs: int = PLAN_DIRS) -> None:
    """Rows of the manifest planning probes, against the prefix planning's ``prefix_peak``."""
    files, made = manifests(tree, items, dirs)
    if made is not None:
        result.notes.append(f"made the {items:,}-row manifests in {made:.0f} s (cached)")
    base = probe("imports-manifest")["peak_mb"]
    for fmt, path in files.items():
        with tempfile.TemporaryDirectory(prefix="moonbatch-bench-manifest-") as out:
            got = probe("plan-manifest", str(path), str(tree), out)
        if got["items"] != items:
            raise RuntimeError(f"planned {got['items']} manifest rows, expected {items}")
        result.add(f"{fmt} manifest, {items:,} rows: check + plan, peak RSS",
                   f"{got['peak_mb']:.0f} MB (check {got['check_seconds']:.1f} s, peak "
                   f"{got['check_peak_mb']:.0f} MB; all {got['seconds']:.1f} s, "
                   f"{got['shards']} shards)",
                   f"prefix planning: {prefix_peak:.0f} MB (imports only: {base:.0f} MB)",
                   f"{got['peak_mb'] / prefix_peak:.2f}x", f"<= {PLAN_TARGET_MB:.0f} MB",
                   got["peak_mb"] <= PLAN_TARGET_MB)


def plan_at_scale(result: Result, sizes: tuple[int, int], base: float) -> None:
    """Rows of the planner's own share at two sizes (``probe plan-stream``): each one's peak
    RSS and items/s, and the larger's peak against the smaller's (target: flat)."""
    peaks = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="moonbatch-bench-plan-") as out:
            got = probe("plan-stream", str(n), out)
        if got["items"] != n:
            raise RuntimeError(f"planned {got['items']} generated keys, expected {n}")
        peaks[n] = got["peak_mb"]
        result.add(f"planning {n:,} generated keys (planner + plan files, no listing), peak RSS",
                   f"{got['peak_mb']:.0f} MB ({got['shards']:,} shards, {got['seconds']:.1f} s, "
                   f"{n / got['seconds']:,.0f} items/s)", f"imports only: {base:.0f} MB",
                   f"{got['peak_mb'] / base:.2f}x")
    small, large = sizes
    ratio = peaks[large] / peaks[small]
    result.add(f"planning peak growth, {small:,} -> {large:,} keys", f"{peaks[large]:.0f} MB",
               f"{peaks[small]:.0f} MB", f"{ratio:.2f}x", f"<= {GROWTH_TARGET}x",
               ratio <= GROWTH_TARGET)


def plan_listed(result: Result, large: int, base: float) -> None:
    """Rows of planning listed S3 keys (``probe plan-s3`` against ``bench.s3list``'s server, in
    its own process) at ``large // 10`` and ``large`` keys: peak RSS, time and keys/s, the peak's
    growth (target: flat), and the keys/s of the smaller against bare boto3 paginators' over the
    same server in the same run."""
    sizes, peaks, rates, cpu = (large // 10, large), {}, {}, {}
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}  # the server checks no signature
    for n in sizes:
        with listing_server(n) as server, \
                tempfile.TemporaryDirectory(prefix="moonbatch-bench-plan-") as out:
            before = server.cpu_seconds()
            got = probe("plan-s3", str(n), server.url, out, env=env, timeout=max(600, n // 5000))
            served = server.cpu_seconds() - before
        peaks[n], rates[n], cpu[n] = got["peak_mb"], n / got["seconds"], got["cpu_seconds"]
        result.add(f"planning {n:,} listed S3 keys (S3Store listing + planner + plan files), "
                   "peak RSS",
                   f"{got['peak_mb']:.0f} MB ({got['shards']:,} shards, {got['seconds']:.1f} s, "
                   f"{rates[n]:,.0f} keys/s)", f"imports only: {base:.0f} MB",
                   f"{got['peak_mb'] / base:.2f}x")
        result.notes.append(f"{n:,} listed keys: the listing server (its own process) used "
                            f"{served:.1f} CPU s making its {-(-n // 1000):,} pages, "
                            f"{served / got['seconds']:.0%} of the probe's wall time")
    # The baselines: a rate per key, which does not depend on the count (pages of 1000).
    n, small = min(sizes[0], BASELINE_KEYS), sizes[0]
    with listing_server(n) as server:
        bare = probe("list-boto3", str(n), server.url, "plain", env=env)
        floor = probe("list-boto3", str(n), server.url, "moonbatch", env=env)
    bare_rate, floor_rate = n / bare["seconds"], n / floor["seconds"]
    result.add("listing + planning S3 keys, keys/s", f"{rates[small]:,.0f} keys/s ({small:,} keys)",
               f"bare boto3 paginator, listing only: {bare_rate:,.0f} keys/s ({n:,} keys, "
               f"{bare['seconds']:.1f} s)", f"{rates[small] / bare_rate:.2f}x boto3",
               f">= {LIST_TARGET}x boto3", rates[small] / bare_rate >= LIST_TARGET)
    result.add("listing + planning S3 keys vs botocore's share",
               f"{rates[small]:,.0f} keys/s ({small:,} keys)",
               f"the same paginator on moonbatch's client (s3_session): {floor_rate:,.0f} keys/s "
               f"({n:,} keys)", f"{rates[small] / floor_rate:.2f}x")
    us = {k: got_cpu * 1e6 / keys for k, (got_cpu, keys) in
          {"ours": (cpu[small], small), "bare": (bare["cpu_seconds"], n),
           "floor": (floor["cpu_seconds"], n)}.items()}
    result.notes.append(f"CPU per key (less sensitive to load than keys/s): moonbatch's listing + "
                        f"planning {us['ours']:.1f} us, bare boto3 {us['bare']:.1f} us, the paginator "
                        f"on moonbatch's client {us['floor']:.1f} us (botocore's parse)")
    small, large = sizes
    ratio = peaks[large] / peaks[small]
    result.add(f"listed-keys planning peak growth, {small:,} -> {large:,} keys",
               f"{peaks[large]:.0f} MB", f"{peaks[small]:.0f} MB", f"{ratio:.2f}x",
               f"<= {GROWTH_TARGET}x", ratio <= GROWTH_TARGET)
    per_key = (peaks[large] - peaks[small]) * 1e6 / (large - small)
    note = f"the listed-keys planning peak grows by {per_key:.1f} B per key"
    if 1_000_000 <= large < 10_000_000:  # (smoke sizes are too small to extrapolate)
        at_10m = peaks[large] + per_key * (10_000_000 - large) / 1e6
        note += (f"; at that slope and the {large:,}-key rate, 10,000,000 listed keys: "
                 f"~{at_10m:.0f} MB, ~{10_000_000 / rates[large]:.0f} s "
                 "(MOONBATCH_BENCH_LIST_KEYS=10000000 measures it)")
    result.notes.append(note)


def merged_run(folder: str, rows: int) -> None:
    """A merged detect run of ``rows`` rows (``EXPORT_BOXES`` boxes each, shards of
    ``EXPORT_SHARD_ROWS``) in the local OUTPUT ``folder``: its spec (COCO and Label Studio
    exports), plan.json, plan files and JSONL results."""
    import orjson

    from moonbatch.workers import layout, writers
    from moonbatch.workers.models import RunSpec, SkillOptions
    from moonbatch.workers.storage import LocalStore, put_json

    store = LocalStore(folder)
    spec = RunSpec(run_id="bench-export", input="s3://in/", output="s3://out/",
                   options=SkillOptions(skill="detect", object="car"),
                   exports=["coco", "label-studio"], shard_size=EXPORT_SHARD_ROWS,
                   max_shard_bytes=1 << 30, created_at=1_700_000_000.0)
    shards = -(-rows // EXPORT_SHARD_ROWS)
    put_json(store, layout.SPEC, spec.model_dump(mode="json"))
    put_json(store, layout.PLAN, {"shards": shards, "items": rows})
    rng = random.Random(0)
    for shard in range(shards):
        ids = [f"photos/{i:07d}.jpg" for i in range(shard * EXPORT_SHARD_ROWS,
                                                    min(rows, (shard + 1) * EXPORT_SHARD_ROWS))]
        store.put(layout.plan_items(shard), b"".join(
            orjson.dumps({"id": i, "size": 50_000}) + b"\n" for i in ids))
        lines = []
        for i in ids:
            boxes = []
            for _ in range(EXPORT_BOXES):
                x, y = rng.random() * 0.8, rng.random() * 0.8
                boxes.append({"x_min": x, "y_min": y, "x_max": x + 0.1, "y_max": y + 0.15})
            lines.append(orjson.dumps({"id": i, "source": "s3://in/" + i, "status": "ok",
                                       "result": {"objects": boxes},
                                       "usage": {"input_tokens": 1458, "output_tokens": 40},
                                       "width": 640, "height": 480}))
        writers.write_shard(store, "jsonl", shard, lines)


def export_peaks(result: Result, sizes: tuple[int, int]) -> None:
    """The finalising task's exports (COCO and Label Studio) of merged detect runs of
    ``sizes`` rows, each in a child (``probe export``): peak RSS, and the larger run's peak
    within ``GROWTH_TARGET`` of the smaller's (the documents are written through temporary
    files, not held)."""
    base = probe("imports-export")["peak_mb"]
    peaks = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="moonbatch-bench-export-") as folder:
            merged_run(folder, n)
            got = probe("export", folder)
        peaks[n] = got["peak_mb"]
        size = ", ".join(f"{name} {b / 1e6:.0f} MB" for name, b in got["bytes"].items())
        result.add(f"exports of a {n:,}-row detect run ({EXPORT_BOXES} boxes a row), peak RSS",
                   f"{got['peak_mb']:.0f} MB ({size}; {got['seconds']:.1f} s)",
                   f"imports only: {base:.0f} MB", f"{got['peak_mb'] / base:.2f}x")
    small, large = sizes
    result.add(f"exports peak growth, {small:,} -> {large:,} rows", f"{peaks[large]:.0f} MB",
               f"{peaks[small]:.0f} MB", f"{peaks[large] / peaks[small]:.2f}x",
               f"<= {GROWTH_TARGET}x", peaks[large] / peaks[small] <= GROWTH_TARGET)


def probe(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> dict[str, Any]:
    """Run ``python -m bench.probe ARGS`` (at most ``timeout`` seconds) and return its JSON
    report."""
    proc = subprocess.run([sys.executable, "-m", "bench.probe", *args], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(servers: Servers, smoke: bool = False) -> Result:
    """Run the benchmark (see the module docstring); ``smoke``: tiny sizes, to check it runs."""
    items, dirs, shard_sizes = ((SMOKE_ITEMS, SMOKE_DIRS, SMOKE_SHARD_SIZES) if smoke
                                else (PLAN_ITEMS, PLAN_DIRS, SHARD_SIZES))
    result = Result("memory")
    tree, made = empty_tree(items, dirs)
    if made is not None:
        result.notes.append(f"made the {items:,}-file tree in {made:.0f} s (cached for later runs)")
    base = probe("imports-plan")["peak_mb"]
    with tempfile.TemporaryDirectory(prefix="moonbatch-bench-plan-") as out:
        got = probe("plan", str(tree), out)
    if got["items"] != items:
        raise RuntimeError(f"planned {got['items']} items, expected {items}")
    result.add(f"planning {items:,} items, peak RSS",
               f"{got['peak_mb']:.0f} MB ({got['shards']} shards, {got['seconds']:.1f} s, "
               f"{got['items'] / got['seconds']:,.0f} items/s)", f"imports only: {base:.0f} MB",
               f"{got['peak_mb'] / base:.2f}x", f"<= {PLAN_TARGET_MB:.0f} MB",
               got["peak_mb"] <= PLAN_TARGET_MB)
    plan_manifests(result, tree, got["peak_mb"], items, dirs)
    plan_at_scale(result, SMOKE_STREAM_SIZES if smoke else STREAM_SIZES, base)
    plan_listed(result, SMOKE_LIST_KEYS if smoke else LIST_KEYS, probe("imports-s3")["peak_mb"])

    tiny, made = tiny_tree(max(shard_sizes))
    if made is not None:
        result.notes.append(f"made the {max(shard_sizes):,} tiny PNGs in {made:.0f} s (cached)")
    base = probe("imports-worker")["peak_mb"]
    peaks = {}
    with emulator(chunking_seconds=0.0, processing_seconds=0.0, lines_per_second=1e7) as emu:
        env = {"MOONBATCH_MOONDREAM_URL": emu.url, "MOONDREAM_API_KEY": emu.config.api_key,
               "MOONBATCH_PART_SIZE": str(PART_SIZE)}
        for n in shard_sizes:
            state = tempfile.mkdtemp(prefix="moonbatch-bench-worker-")
            try:
                got = probe("worker", str(tiny), str(n), state, env=env)
            finally:
                shutil.rmtree(state, ignore_errors=True)
            if got["ok"] != n:
                raise RuntimeError(f"worker probe: {got['ok']} of {n} rows ok")
            peaks[n] = got["peak_mb"]
            mb = got["jsonl_bytes"] / 1e6
            result.add(f"worker, {n:,}-line shard: build_and_submit, peak RSS",
                       f"{got['build_peak_mb']:.0f} MB (JSONL {mb:.0f} MB, {got['build_seconds']:.1f} s)",
                       f"imports only: {base:.0f} MB", f"{got['build_peak_mb'] / base:.2f}x")
            result.add(f"worker, {n:,}-line shard: + wait, download, merge, write, peak RSS",
                       f"{got['peak_mb']:.0f} MB (merge {got['merge_seconds']:.1f} s)",
                       f"imports only: {base:.0f} MB", f"{got['peak_mb'] / base:.2f}x")
            result.notes.append(f"{n:,}-line shard ({got['part_size'] / 2**20:.0f} MiB parts): the "
                                f"emulator took {got['emulator_seconds']:.1f} s to decode and answer "
                                f"its lines (in the benchmark process, not in the worker's RSS)")
    small, large = shard_sizes
    growth = (peaks[large] - base) / max(peaks[small] - base, 1e-6)
    ratio = peaks[large] / peaks[small]
    result.add(f"worker peak growth, {small:,} -> {large:,} lines", f"{peaks[large]:.0f} MB",
               f"{peaks[small]:.0f} MB", f"{ratio:.2f}x ({growth:.2f}x above imports)",
               f"<= {GROWTH_TARGET}x", ratio <= GROWTH_TARGET)
    per_line = (peaks[large] - peaks[small]) * 1e3 / (large - small)
    result.notes.append(f"the worker's peak grows by {per_line:.1f} KB per line of the shard")
    export_peaks(result, SMOKE_EXPORT_ROWS if smoke else EXPORT_ROWS)
    return result
