"""merge: how fast a worker merges a batch's result files back into one row per shard item.

Measures ``moonbatch.workers.merge.merge_round`` (what the worker's merge task calls: every row
written to the round's local spool file, ``workers.rowspool.RowSpool``) single-threaded on a
synthetic 100,000-line shard: caption rows of ~200-400 bytes (1 % per-line errors), shuffled and
split across 10 result files as the API returns them (the files' text handed over as it is, as
the Batch API provider's ``collect_round`` does), merged against the matching ``ShardBuild``
and plan items as the task has them (``PlanItems`` of the plan file: each item decoded when the
merge asks for it), the rows' sources named as the task names them (``ItemFetcher.source`` and
``key_sources`` of an S3 INPUT). Reported as result rows per second on one core (best of 5).
Also shown, with no target: ``merge_rows``, the same merge read back from the spool into one
results JSONL in memory.

Baseline: a parse-only pass over the same bytes (``orjson.loads`` of every line, what a user
would write instead, and the least any merge that reads the rows must do); the ratio says what
the merge costs on top of parsing. Target: at least half the parse-only rate (0.5x). A
``json.loads`` parse-only pass is shown too, for scale.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable

import orjson

from bench.common import MB, Result, Servers

N_LINES = 100_000
N_FILES = 10
REPEATS = 5
SMOKE_LINES = 200  # --smoke: checks that the benchmark runs, measures nothing
TARGET = 0.5  # merge rows/s over orjson.loads-only rows/s
WORDS = ("a", "the", "small", "large", "red", "wooden", "table", "with", "two", "cups", "of",
         "coffee", "cat", "sitting", "on", "sofa", "next", "to", "window", "astronaut", "in",
         "white", "suit", "holding", "flag", "rocket", "launch", "pad", "under", "clear", "blue",
         "sky", "motorcycle", "parked", "street", "galaxy", "field", "stars", "photograph")


def make_shard(n: int) -> tuple[list, object, list[bytes]]:
    """``(items, build, files)``: ``n`` plan items, a build that sent all of them in order, and
    their result lines shuffled into ``N_FILES`` JSONL files."""
    from moonbatch.workers.models import PlanItem, ShardBuild

    rng = random.Random(0)
    items = [PlanItem(id=f"photos/{i // 1000:03d}/IMG_{i:06d}.jpg", size=rng.randint(50_000, 900_000))
             for i in range(n)]
    rows = []
    for li, item in enumerate(items):
        row: dict[str, object] = {"line_index": li, "id": item.id}
        if rng.random() < 0.01:
            row.update(status="error", error={"code": "image_decode_failed",
                                              "message": "Invalid image data"})
        else:
            caption = " ".join(rng.choices(WORDS, k=rng.randint(15, 45))).capitalize() + "."
            row.update(status="ok", result={"caption": caption},
                       usage={"input_tokens": 729 * rng.randint(2, 13),
                              "output_tokens": rng.randint(12, 60)})
        rows.append(json.dumps(row).encode())
    rng.shuffle(rows)
    per = -(-n // N_FILES)
    files = [b"\n".join(rows[i:i + per]) + b"\n" for i in range(0, n, per)]
    return items, ShardBuild(lines=list(range(n))), files


def run(servers: Servers, smoke: bool = False) -> Result:
    """Run the benchmark (see the module docstring); ``smoke``: tiny sizes, to check it runs."""
    n_lines, repeats = (SMOKE_LINES, 1) if smoke else (N_LINES, REPEATS)
    from moonbatch.workers.merge import merge_round, merge_rows
    from moonbatch.workers.readers import ItemFetcher
    from moonbatch.workers.storage import S3Store

    result = Result("merge")
    from moonbatch.workers.models import PlanItems

    listed, build, files = make_shard(n_lines)
    # What the worker's task hands the merge: the shard's plan file (``Run.items``), its items
    # decoded on access; made once, as the task does before it merges.
    plan = b"".join(item.to_json() + b"\n" for item in listed)
    start = time.perf_counter()
    items = PlanItems(plan)
    plan_seconds = time.perf_counter() - start
    del listed
    # Rows' sources as the worker's task names them (an S3 INPUT): ``ItemFetcher.source``,
    # and ``key_sources`` for items that are the INPUT's keys.
    fetcher = ItemFetcher(S3Store("bucket", "photos/", client=None))
    source_of, key_sources = fetcher.source, fetcher.key_sources

    def parse_only(loads: Callable[[bytes], object]) -> Callable[[], None]:
        def parse() -> None:
            for data in files:
                for raw in data.splitlines():
                    loads(raw)
        return parse

    def check(stats: object) -> None:
        if stats.ok + stats.error != n_lines or stats.missing:  # type: ignore[attr-defined]
            raise RuntimeError(f"merge lost rows: {stats}")

    def merge() -> None:
        rows, stats, _ = merge_round(items, build, files, source_of, key_sources=key_sources)
        rows.close()
        check(stats)

    def merge_joined() -> None:
        check(merge_rows(items, build, files, source_of)[1])

    passes = {"merge": merge, "merge_rows": merge_joined, "orjson.loads": parse_only(orjson.loads),
              "json.loads": parse_only(json.loads)}
    best = dict.fromkeys(passes, float("inf"))
    for _ in range(repeats):  # interleaved, so that a burst of load hits every pass alike
        for name, fn in passes.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    rate = {name: n_lines / t for name, t in best.items()}
    size = sum(map(len, files))
    for name in ("orjson.loads", "json.loads"):
        result.add("merge_round, 1 core", f"{rate['merge']:,.0f} rows/s ({best['merge']:.2f} s)",
                   f"{name} only: {rate[name]:,.0f} rows/s ({best[name]:.2f} s)",
                   f"{rate['merge'] / rate[name]:.2f}x parse-only",
                   *((f">= {TARGET}x orjson.loads only", rate["merge"] >= TARGET * rate[name])
                     if name == "orjson.loads" else ()))
    result.add("merge_rows (read back into one JSONL), 1 core",
               f"{rate['merge_rows']:,.0f} rows/s ({best['merge_rows']:.2f} s)",
               f"orjson.loads only: {rate['orjson.loads']:,.0f} rows/s",
               f"{rate['merge_rows'] / rate['orjson.loads']:.2f}x parse-only")
    result.notes.append(f"{n_lines:,} result lines, {size / MB:.1f} MB ({size / n_lines:.0f} B/line) "
                        f"in {len(files)} files; plan items as the task gets them (PlanItems of "
                        f"the plan file, {len(plan) / MB:.1f} MB, read and checked in "
                        f"{plan_seconds:.2f} s, not counted in the merge)")
    return result
