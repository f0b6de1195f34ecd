"""cache: what the result cache (``moonbatch.workers.cache``) costs a build, and what it saves.

1. Lookups for 100,000 items on a local store holding 50,000 entries (half the items hit):
   ``cache.scan`` over the items with 16 threads (the build's cache pass without the image
   reads), counting the store's requests: requests per item (a lookup per distinct key, and
   for each miss the run-wide claim, a create-if-absent write), lookups/s. Two layouts of the same
   entries: the chosen fan-out ``v1/<k[0:2]>/<k[2:4]>/<k>.json`` and a flat ``v1/<k>.json``
   (one folder of every entry; what the fan-out avoids).
2. The same on moto's S3 server (a sample of ``S3_ITEMS`` items, extrapolated to 100,000:
   moto answers a few hundred requests/s on this machine, real S3 thousands per prefix).
3. Share of build time, per store: a build's per-item work every provider does (read the
   image, base64 it) with the cache pass before it (read the image once and keep it for the
   build, SHA-256, one lookup, one claim) against the same build without it (the baseline, same run, same
   ~150 KB images, every item a miss). The real build also re-encodes and uploads, so the
   share printed is an upper bound.
4. Dedup saving on a dataset with 15 % exact duplicates under other names: items the round
   sends with the cache against without (baseline: every item), and the estimated Batch API
   cost saved; a second run on the same images (everything a hit).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import os
import random
import shutil
import tempfile
import threading
import time
from typing import Any

from bench.common import Result, Servers

N_ITEMS = 100_000
S3_ITEMS = 3_000
IMAGE_BYTES = 150_000
BUILD_IMAGES = 400
DEDUP_ITEMS = 4_000
DUP_SHARE = 0.15
CONCURRENCY = 16
SMOKE = {"n": 300, "s3": 60, "images": 20, "dedup": 100}


class Counted:
    """A store that counts its requests (``get``, ``put``) and passes them on."""

    def __init__(self, store: Any) -> None:
        self.store, self.gets, self.puts = store, 0, 0
        self._lock = threading.Lock()

    def get(self, key: str, **kw: Any) -> bytes:
        with self._lock:
            self.gets += 1
        return self.store.get(key, **kw)

    def put(self, key: str, data: bytes, **kw: Any) -> bool:
        with self._lock:
            self.puts += 1
        return self.store.put(key, data, **kw)


def _spec() -> Any:
    from moonbatch.workers.models import RunSpec, SkillOptions

    return RunSpec(run_id="bench", input="s3://b/in/", output="s3://b/out/", shard_size=10_000,
                   max_shard_bytes=10**12, created_at=0, provider="moondream",
                   options=SkillOptions(skill="caption"), cache=True, max_pixels=2_000_000)


def _entry(i: int) -> bytes:
    import orjson

    return orjson.dumps({"v": 1, "of": f"img/{i:06d}.jpg", "run": "bench", "created_at": 0,
                         "result": {"caption": "a photograph of a thing " * 3},
                         "usage": {"input_tokens": 2000, "output_tokens": 40},
                         "width": 1600, "height": 1200})


def _fill(store: Any, keys: list[str], path: Any) -> float:
    """Write one entry per key (16 threads); returns seconds."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda ik: store.put(path(ik[1]), _entry(ik[0]), if_absent=True),
                      enumerate(keys)))
    return time.perf_counter() - t0


def lookups(store: Any, n: int, path: Any = None) -> dict[str, float]:
    """Fill ``store`` with entries for half of ``n`` items, then time ``cache.scan`` over the
    ``n`` items (image reads left out: the items' bytes are their index)."""
    from moonbatch.workers import cache
    from moonbatch.workers.models import PlanItem

    spec = _spec()
    fp = cache.fingerprint(spec)
    data = [str(i).encode() for i in range(n)]
    keys = [cache.item_key(d, fp) for d in data]
    original = cache.entry_path
    if path is not None:
        cache.entry_path = path  # the flat layout, for comparison
    try:
        fill = _fill(store, keys[::2], cache.entry_path)
        items = [PlanItem(i, 1) for i in range(n)]
        counted = Counted(store)
        t0 = time.perf_counter()
        doc = cache.scan(items, spec, lambda it: data[it.id], counted, concurrency=CONCURRENCY,
                         claim=cache.run_claims(counted, 0))
        seconds = time.perf_counter() - t0
    finally:
        cache.entry_path = original
    if doc["counts"]["hits"] != len(keys[::2]):
        raise RuntimeError(f"expected {len(keys[::2])} hits: {doc['counts']}")
    return {"items": n, "seconds": seconds, "requests": counted.gets + counted.puts,
            "fill_seconds": fill, "entries": len(keys[::2])}


def build_share(store: Any, n_images: int) -> dict[str, float]:
    """Seconds per item of a build's read + base64 without the cache (baseline) and with the
    cache pass before it (read, kept for the build, SHA-256, one lookup; then the build takes
    the kept bytes), on the same ``n_images`` random ~150 KB images, all misses (sent)."""
    from moonbatch.config import get_settings
    from moonbatch.workers import cache
    from moonbatch.workers.models import PlanItem
    from moonbatch.workers.readers import ItemFetcher

    rng = random.Random(1)
    keys = [f"img/{i:05d}.jpg" for i in range(n_images)]
    with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda k: store.put(k, rng.randbytes(IMAGE_BYTES)), keys))
    items = [PlanItem(k, IMAGE_BYTES) for k in keys]
    settings = get_settings()

    def build(fetcher: Any) -> None:
        with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda it: len(base64.b64encode(fetcher.get(it))), items))

    fetcher = ItemFetcher(store, settings)
    t0 = time.perf_counter()
    build(fetcher)
    baseline = (time.perf_counter() - t0) / n_images
    spec = _spec()
    fetcher = ItemFetcher(store, settings)

    def fetch(it: Any) -> bytes:
        data = fetcher.get(it)
        fetcher.keep(it, data, settings.cache_read_memory)
        return data

    t0 = time.perf_counter()
    cache.scan(items, spec, fetch, store, concurrency=CONCURRENCY,
               claim=cache.run_claims(store, 0))
    build(fetcher)
    with_pass = (time.perf_counter() - t0) / n_images
    return {"build": baseline, "with": with_pass}


def dedup(store: Any, n: int) -> dict[str, Any]:
    """A dataset of ``n`` items, 15 % of them exact copies of others under other names:
    items sent in a first run (in-run copies) and in a second (cross-run hits)."""
    from moonbatch.workers import cache
    from moonbatch.workers.models import PlanItem
    from moonbatch.workers.providers import get_provider

    rng = random.Random(2)
    unique = n - int(n * DUP_SHARE)
    blobs = [rng.randbytes(64) for _ in range(unique)]
    data = blobs + [blobs[rng.randrange(unique)] for _ in range(n - unique)]
    rng.shuffle(data)
    items = [PlanItem(i, IMAGE_BYTES) for i in range(n)]
    spec = _spec()
    t0 = time.perf_counter()
    first = cache.scan(items, spec, lambda it: data[it.id], store, concurrency=CONCURRENCY)
    seconds = time.perf_counter() - t0
    # the first run's results are merged ok: every sent item's entry is written
    import orjson

    rows = {i: orjson.dumps({"id": i, "source": "s", "status": "ok",
                             "result": {"caption": "x"}, "usage": {}}) for i in first["send"]}
    cache.write_entries(store, first, rows, "bench", concurrency=CONCURRENCY)
    second = cache.scan(items, spec, lambda it: data[it.id], store, concurrency=CONCURRENCY)
    provider = get_provider("moondream")
    cost = provider.estimate(spec, n, n * IMAGE_BYTES, 1).cost_usd
    return {"items": n, "distinct": len(set(data)), "first": len(first["send"]),
            "second": len(second["send"]), "seconds": seconds, "cost": cost}


def run(servers: Servers, smoke: bool = False) -> Result:
    """Run the benchmark (see the module docstring); ``smoke``: tiny sizes, to check it runs."""
    from moonbatch.workers import cache
    from moonbatch.workers.storage import LocalStore, open_store

    n = SMOKE["n"] if smoke else N_ITEMS
    n_s3 = SMOKE["s3"] if smoke else S3_ITEMS
    n_img = SMOKE["images"] if smoke else BUILD_IMAGES
    n_dedup = SMOKE["dedup"] if smoke else DEDUP_ITEMS
    result = Result("cache")
    tmp = tempfile.mkdtemp(prefix="moonbatch-bench-cache-")
    try:
        fan = lookups(LocalStore(os.path.join(tmp, "fan")), n)
        flat = lookups(LocalStore(os.path.join(tmp, "flat")), n,
                       path=lambda k: f"{cache.VERSION}/{k}.json")
        result.add(f"lookups, local, {n:,} items ({fan['entries']:,} entries, v1/ab/cd/)",
                   f"{fan['seconds']:.2f} s ({n / fan['seconds']:,.0f} items/s), "
                   f"{fan['requests'] / n:.2f} requests/item",
                   f"flat v1/<k>.json: {flat['seconds']:.2f} s "
                   f"({n / flat['seconds']:,.0f} items/s)",
                   f"{fan['seconds'] / flat['seconds']:.2f}x flat's time")
        result.add("entry writes, local", f"{fan['entries'] / fan['fill_seconds']:,.0f}/s "
                   "(create-if-absent)", f"flat: {flat['entries'] / flat['fill_seconds']:,.0f}/s")
        bucket = servers.new_bucket("cache")
        s3 = open_store(f"s3://{bucket}/cache/", endpoint_url=servers.s3(), pool=32)
        on_s3 = lookups(s3, n_s3)
        rate = n_s3 / on_s3["seconds"]
        result.add(f"lookups, moto S3, {n_s3:,} items (sample)",
                   f"{on_s3['seconds']:.2f} s ({rate:,.0f} items/s), "
                   f"{on_s3['requests'] / n_s3:.2f} requests/item",
                   f"local: {n / fan['seconds']:,.0f} items/s",
                   f"100,000 items: {N_ITEMS / rate:,.0f} s at this rate")
        for name, store in (("local", LocalStore(os.path.join(tmp, "img"))),
                            ("moto S3", open_store(f"s3://{bucket}/img/",
                                                   endpoint_url=servers.s3(), pool=32))):
            share = build_share(store, n_img)
            added = share["with"] - share["build"]
            result.add(f"build with the cache pass, {name}, {n_img} images of "
                       f"{IMAGE_BYTES // 1000} kB, all sent",
                       f"{share['with'] * 1000:.2f} ms/item (pass: read once, SHA-256, lookup, claim)",
                       f"build's read + base64 alone: {share['build'] * 1000:.2f} ms/item",
                       f"pass = {max(added, 0) / share['with']:.0%} of build time")
        d = dedup(LocalStore(os.path.join(tmp, "dedup")), n_dedup)
        saved = 1 - d["first"] / d["items"]
        cost = d["cost"]
        result.add(f"dedup, {d['items']:,} items with {DUP_SHARE:.0%} duplicates",
                   f"{d['first']:,} sent ({saved:.1%} saved"
                   + (f", ${cost * saved:,.2f} of ${cost:,.2f}" if cost else "") + ")",
                   f"no cache: {d['items']:,} sent", f"{d['first'] / d['items']:.2f}x",
                   f"= distinct images ({d['distinct']:,})", d["first"] == d["distinct"])
        result.add("second run on the same images", f"{d['second']:,} sent",
                   f"no cache: {d['items']:,} sent", "", "0", d["second"] == 0)
        result.notes.append("requests/item counts the store's requests during the pass: a GET "
                            "per distinct key and a claim (create-if-absent PUT) per miss; none "
                            "for an in-run copy")
        result.notes.append(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
