"""Memory probes, run by ``bench.memory`` in child processes so that each peak RSS is its own:

    python -m bench.probe imports-plan | imports-s3 | imports-worker | imports-export
                                                             import the modules only
    python -m bench.probe plan TREE OUT                      plan TREE's items, write plan files
    python -m bench.probe plan-stream N OUT                  plan N generated keys, write plan files
    python -m bench.probe plan-s3 N URL OUT                  list bench.s3list's N keys, plan them
    python -m bench.probe list-boto3 N URL [CLIENT]          list them with a bare boto3 paginator
    python -m bench.probe plan-manifest MANIFEST TREE OUT    check, then plan a manifest of TREE
    python -m bench.probe worker TREE N STATE                build, submit, wait and merge a shard
    python -m bench.probe export STATE                       write the exports of a merged run

Each prints one JSON line: ``peak_mb`` (VmHWM from /proc/self/status) and what it measured.
``plan-s3`` and ``list-boto3`` talk to the listing server at URL (``bench.s3list``) with dummy
credentials. The worker probe reads the emulator's URL and key from ``MOONBATCH_MOONDREAM_URL`` and
``MOONDREAM_API_KEY``.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from bench.common import worker_kwargs

PLAN_MODULES = ("moonbatch.config", "moonbatch.workers.readers.prefix", "moonbatch.producer.planner",
                "moonbatch.workers.layout", "moonbatch.workers.models", "moonbatch.workers.storage")
S3_PLAN_MODULES = (*PLAN_MODULES, "boto3")
MANIFEST_MODULES = (*PLAN_MODULES, "moonbatch.workers.readers.manifest", "moonbatch.producer.runs",
                    "numpy")
WORKER_MODULES = ("moonbatch.config", "moonbatch.workers.providers.moondream.upload",
                  "moonbatch.workers.lines", "moonbatch.workers.merge", "moonbatch.workers.models",
                  "moonbatch.workers.providers.moondream.client", "moonbatch.workers.storage",
                  "moonbatch.workers.providers.moondream.download", "moonbatch.workers.rowspool",
                  "moonbatch.workers.writers", "moonbatch.workers.writers.jsonl",
                  "PIL.Image", "PIL.PngImagePlugin")
EXPORT_MODULES = ("moonbatch.workers.writers", "moonbatch.workers.writers.coco",
                  "moonbatch.workers.writers.labelstudio", "moonbatch.workers.models",
                  "moonbatch.workers.storage")


def peak_mb() -> float:
    """This process's peak resident set size (VmHWM) in MB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024 / 1e6


def plan(tree: str, out: str) -> dict[str, Any]:
    """What ``producer.runs.submit_run`` does, less the queue: list TREE, plan shards of the
    default size, write each shard's plan file to OUT."""
    from moonbatch.workers.readers import ListingStats
    from moonbatch.workers.readers.prefix import iter_items
    from moonbatch.workers.storage import LocalStore

    stats = ListingStats()
    return {**_plan_items(iter_items(LocalStore(tree), stats), out), "items": stats.items}


def _plan_items(items: Iterator[Any], out: str) -> dict[str, Any]:
    """Plan ``items`` into shards of the default size, writing each shard's plan file to OUT:
    ``{"items", "shards", "seconds", "cpu_seconds"}`` (wall and this process's CPU)."""
    from moonbatch.config import get_settings
    from moonbatch.producer.planner import plan_shards
    from moonbatch.workers import layout
    from moonbatch.workers.models import SkillOptions
    from moonbatch.workers.providers import get_provider
    from moonbatch.workers.storage import LocalStore

    settings, store = get_settings(), LocalStore(out)
    start, cpu, shards, planned = time.perf_counter(), time.process_time(), 0, 0
    limits = get_provider(settings.provider).limits(None)  # type: ignore[arg-type]  # no spec needed
    for shard in plan_shards(items, max_lines=settings.shard_size,
                             max_bytes=settings.max_shard_bytes, limits=limits,
                             fragment_len=len(SkillOptions(skill="caption").line_fragment())):
        store.put(layout.plan_items(shard.index),
                  b"".join(item.to_json() + b"\n" for item in shard.items))
        shards += 1
        planned += len(shard.items)
    return {"items": planned, "shards": shards, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def plan_stream(n: str, out: str) -> dict[str, Any]:
    """``plan`` over N generated keys (``d<dir>/IMG_<i>.jpg``, 1000 per directory, sizes
    varying) instead of a listing: the planner's own share (``plan_shards`` and the plan
    files), without the cost of listing N objects."""
    from moonbatch.workers.models import PlanItem

    def keys() -> Iterator[PlanItem]:
        for i in range(int(n)):
            yield PlanItem(id=f"d{i // 1000:05d}/IMG_{i:08d}.jpg", size=50_000 + i % 900_000)

    return _plan_items(keys(), out)


def plan_s3(n: str, url: str, out: str) -> dict[str, Any]:
    """``plan`` over the N keys of ``bench.s3list``'s server at URL: moonbatch's own S3 listing
    (``open_store`` with that endpoint, ``iter_items``), the planner and the plan files."""
    from bench.s3list import ROOT
    from moonbatch.workers.readers import ListingStats
    from moonbatch.workers.readers.prefix import iter_items
    from moonbatch.workers.storage import open_store

    stats = ListingStats()
    store = open_store(f"s3://bench/{ROOT}", endpoint_url=url)
    report = _plan_items(iter_items(store, stats), out)
    if stats.items != int(n):
        raise RuntimeError(f"listed {stats.items} keys, expected {n}")
    return {**report, "items": stats.items}


def list_boto3(n: str, url: str, client: str = "plain") -> dict[str, Any]:
    """The baselines of ``plan-s3``: a boto3 ``list_objects_v2`` paginator over the same keys,
    counting keys and summing sizes (nothing planned). ``client``: ``plain`` (``boto3.client``,
    what a user writes) or ``moonbatch`` (a client of ``storage.s3_session``, with its
    timestamp parser: botocore's own share of moonbatch's listing)."""
    import boto3

    from bench.s3list import ROOT
    from moonbatch.workers.storage import s3_session

    session = boto3.session.Session() if client == "plain" else s3_session()
    s3 = session.client("s3", endpoint_url=url, region_name="us-east-1")
    start, cpu, keys, total = time.perf_counter(), time.process_time(), 0, 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=ROOT):
        for obj in page.get("Contents", ()):
            keys += 1
            total += obj["Size"]
    if keys != int(n):
        raise RuntimeError(f"listed {keys} keys, expected {n}")
    return {"items": keys, "bytes": total, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def plan_manifest(manifest: str, tree: str, out: str) -> dict[str, Any]:
    """What ``producer.runs.start_run`` does with a manifest, less the queue: the reader's
    pre-pass (``check``: valid rows, no duplicate id), then plan its rows (image keys relative
    to ``--base`` TREE) into shards of the default size, writing each shard's plan file to OUT."""
    from moonbatch.config import get_settings
    from moonbatch.producer.planner import plan_shards
    from moonbatch.producer.runs import new_spec
    from moonbatch.workers import layout
    from moonbatch.workers.models import SkillOptions
    from moonbatch.workers.readers import ListingStats, open_reader
    from moonbatch.workers.storage import LocalStore

    settings, stats, store = get_settings(), ListingStats(), LocalStore(out)
    options = SkillOptions(skill="caption")
    spec = new_spec(manifest, out + "/run/", options, settings, input_format="manifest",
                    input_options={"base": tree})
    reader = open_reader(spec, LocalStore(tree), settings)
    start = time.perf_counter()
    reader.check()
    checked, check_peak = time.perf_counter() - start, peak_mb()
    shards = 0
    from moonbatch.workers.providers import provider_for

    for shard in plan_shards(reader.iter_items(stats), max_lines=settings.shard_size,
                             max_bytes=settings.max_shard_bytes, limits=provider_for(spec).limits(spec),
                             fragment_len=len(options.line_fragment())):
        store.put(layout.plan_items(shard.index),
                  b"".join(item.to_json() + b"\n" for item in shard.items))
        shards += 1
    return {"items": stats.items, "shards": shards, "check_seconds": checked,
            "check_peak_mb": check_peak, "seconds": time.perf_counter() - start}


def worker(tree: str, n: str, state: str) -> dict[str, Any]:
    """What a worker does for one shard of the first N objects of TREE (its plan file written to
    STATE and read back as the task does, ``PlanItems``): ``build_and_submit`` with
    the worker settings, wait for the batch, then the functions ``merge_round`` (the task) calls:
    read the round's ``build.json``, download and verify its outputs (``fetch_results``, as
    the provider's ``collect_round``), ``merge_round``, store the round's rows
    (``put_round_rows``), then ``_finish_shard``'s ``write_rounds`` (compose the final rows
    from the stored round, write the JSONL results)."""
    from moonbatch.config import get_settings
    from moonbatch.workers import layout, writers
    from moonbatch.workers.merge import merge_round
    from moonbatch.workers.models import PlanItem, PlanItems, ShardBuild, SkillOptions
    from moonbatch.workers.providers.moondream.client import BatchClient
    from moonbatch.workers.providers.moondream.download import fetch_results
    from moonbatch.workers.providers.moondream.settings import MoondreamSettings
    from moonbatch.workers.providers.moondream.upload import build_and_submit
    from moonbatch.workers.rowspool import iter_stored_lines, put_round_rows
    from moonbatch.workers.storage import LocalStore, get_json

    settings, store, out = get_settings(), LocalStore(tree), LocalStore(state)
    batch_api = settings.section(MoondreamSettings)
    # The shard's plan file, read back as the task reads it (``Run.items``).
    out.put(layout.plan_items(0), b"".join(
        PlanItem(id=o.key, size=o.size).to_json() + b"\n"
        for o in itertools.islice(store.iter_objects(), int(n))))
    items = PlanItems(out.get(layout.plan_items(0)))
    client = BatchClient(os.environ["MOONBATCH_MOONDREAM_URL"], batch_api.api_key())
    start = time.perf_counter()
    build, batch = build_and_submit(
        shard=0, items=items, options=SkillOptions(skill="caption"), model=None, input_store=store,
        state=out, client=client, part_size=batch_api.part_size,
        concurrency=settings.fetch_concurrency, **worker_kwargs(build_and_submit))
    report: dict[str, Any] = {"lines": len(build.lines), "jsonl_bytes": build.bytes,
                              "part_size": batch_api.part_size,
                              "build_seconds": time.perf_counter() - start, "build_peak_mb": peak_mb()}
    longest = 0.0
    while True:
        asked = time.perf_counter()
        status = client.get_batch(batch.batch_id)
        longest = max(longest, time.perf_counter() - asked)
        if status.done:
            break
        time.sleep(0.2)
    report["emulator_seconds"] = longest  # the status call that made the emulator process it
    start = time.perf_counter()
    del build  # the merge task reads the round's build.json, as here
    build = ShardBuild.model_validate(get_json(out, layout.round_doc(0, 0, "build")))
    files, _ = fetch_results(client, status)
    rows, stats, _ = merge_round(items, build, files,
                                 lambda item: store.url_for(item.id),
                                 key_sources=store.urls_for)  # as the task's ItemFetcher does
    with rows:
        files.close()
        put_round_rows(out, layout.round_doc(0, 0, "rows"), rows, if_absent=True)
    del files, rows
    ok, _, _ = writers.write_rounds(out, "jsonl", 0, len(items),
                                    [iter_stored_lines(out, layout.round_doc(0, 0, "rows"))])
    if ok != stats.ok:
        raise RuntimeError(f"{ok} ok rows written, {stats.ok} merged")
    report.update(merge_seconds=time.perf_counter() - start, ok=ok,
                  result_bytes=os.path.getsize(out.url_for(writers.results_key(0))))
    return report


def export(state: str) -> dict[str, Any]:
    """What the finalising task does for a run's exports (``writers.finish_run``: COCO and
    Label Studio here) over the merged run in the local OUTPUT ``STATE`` (its spec and plan
    documents name the exports and the shards)."""
    from moonbatch.workers import layout, writers
    from moonbatch.workers.models import RunSpec
    from moonbatch.workers.storage import LocalStore, get_json

    store = LocalStore(state)
    spec = RunSpec.model_validate(get_json(store, layout.SPEC))
    start = time.perf_counter()
    writers.finish_run(store, spec, int(get_json(store, layout.PLAN)["shards"]))
    return {"seconds": time.perf_counter() - start,
            "bytes": {name: os.path.getsize(store.url_for(key)) for name, key in
                      (("coco", layout.COCO), ("label-studio", layout.LABEL_STUDIO))}}


def main(argv: list[str]) -> None:
    """Run the probe named by ``argv[0]``; print its report as one JSON line."""
    kind, args = argv[0], argv[1:]
    modules = {"plan": PLAN_MODULES, "imports-plan": PLAN_MODULES, "plan-stream": PLAN_MODULES,
               "plan-s3": S3_PLAN_MODULES, "imports-s3": S3_PLAN_MODULES, "list-boto3": S3_PLAN_MODULES,
               "plan-manifest": MANIFEST_MODULES, "imports-manifest": MANIFEST_MODULES,
               "export": EXPORT_MODULES, "imports-export": EXPORT_MODULES,
               }.get(kind, WORKER_MODULES)
    for module in modules:
        importlib.import_module(module)
    probes = {"plan": plan, "plan-stream": plan_stream, "plan-s3": plan_s3,
              "list-boto3": list_boto3, "plan-manifest": plan_manifest, "worker": worker,
              "export": export}
    report = probes[kind](*args) if not kind.startswith("imports") else {}
    report["peak_mb"] = peak_mb()
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
