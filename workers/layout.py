"""Where a run keeps its files, relative to its OUTPUT prefix.

    run.json                               summary (status running → completed | failed)
    results/shard-00000.jsonl              merged rows, one per input item (written again
                                           by a retry-failed pass)
                                           (.parquet with --format parquet; workers.writers)
    annotations/instances.json             --export coco (the default of detect/point/segment
                                           runs): COCO export (workers.writers.coco)
    annotations/label-studio/tasks.json    --export label-studio: pre-annotation import JSON
    annotations/label-studio/config.xml    its labeling configuration (workers.writers.labelstudio)
    annotations/yolo/data.yaml             --export yolo: class names (workers.writers.yolo)
    annotations/yolo/labels/<name>.txt     one per ok image: class cx cy w h per box
    report.html                            moonbatch report / --report: the run in a browser
                                           (producer.report)
    _moonbatch/spec.json                   the run spec (written once at submit)
    _moonbatch/plan.json                   {"shards": N, "items": M, ...} once listing is done
    _moonbatch/plan/shard-00000.jsonl      the shard's items: {"id", "size"} per line
    _moonbatch/shards/00000/lease.json     who builds the shard now (see workers.lease)
    _moonbatch/shards/00000/r0/todo.json   items of round r (r > 0: those to retry)
    _moonbatch/shards/00000/r0/cache.json  round 0's cache pass: items to send, their cache
                                           keys, hits and in-run copies (workers.cache)
    _moonbatch/shards/00000/r0/upload.json    multipart upload in flight
    _moonbatch/shards/00000/r0/build.json     line_index → item mapping and pre-send errors
    _moonbatch/shards/00000/r0/submit.json    mpu-complete sent, answer not yet recorded
    _moonbatch/shards/00000/r0/batch.json     the submitted batch id
    _moonbatch/shards/00000/r0/orphans.json   batches lost with their mpu-complete answer
    _moonbatch/shards/00000/r0/progress.json  last polled status (no URLs)
    _moonbatch/shards/00000/r0/merged.json    the round's merge counts
    _moonbatch/shards/00000/r0/rows.jsonl     the round's merged rows
    _moonbatch/shards/00000/r0/requests.json  fal: the round's requests (cursor, in flight, resends)
    _moonbatch/shards/00000/r0/results-000000.jsonl  fal: result lines finished in one step
    _moonbatch/shards/00000/r0/attempts-build.json   starts and ends of the round's build (and
                                           attempts-poll.json of its fal steps; workers.attempts)
    _moonbatch/shards/00000/done.json      merged: counts and usage
    _moonbatch/shards/00000/r0/spend.json     the round's estimated and actual cost (workers.stops)
    _moonbatch/failed.json                 why the run cannot complete
    _moonbatch/stopped.json                the run stopped sending: {"code", "reason"} (workers.stops)
    _moonbatch/limits.json                 {"max_cost"} given to retry-failed, over the spec's
    _moonbatch/cancelled.json              the run was cancelled
    _moonbatch/claims/ab/<cache key>.json  the shard that sends a cache key for the whole run:
                                           {"shard", "index"} (workers.cache, create-if-absent)
    _moonbatch/finalized                   guard: run.json was finalised
    _moonbatch/planning.json               lease of the producer planning the run (see runs.py)
    _moonbatch/enqueued                    the producer enqueued every shard of plan.json
    _moonbatch/skipped/part-00000.jsonl    skipped keys: {"key"} (not an image) or
                                           {"key", "reason", "detail"} per line
    _moonbatch/probe-<token>               written and deleted at once by the preflight check
    _moonbatch/retries/0001.json           a retry-failed pass: its codes and (shard, first
                                           round) pairs, written before the run is reopened
    _moonbatch/retries/0001.applied        the pass reopened its shards (workers.retries)

A round is one batch for a set of the shard's items: round 0 sends every item; a batch that
failed transiently, or lines that came back ``processing_error``, go into the next round.

Keys are deterministic, so a retried or redelivered task finds what an earlier attempt wrote.
Every key of these is built here, and parsed back here (``parse_shard_key``, ``parse_results``,
``parse_retry_pass``): no other module formats or splits them.

The state store (``MOONBATCH_STATE_URL``), shared by every run of a fleet, holds the registry:

    runs/<run_id>.json          run id → OUTPUT (and input, skill, created_at), written at submit
    active/<run_id>.json        the run is not final yet: the reconciler sweeps these
    batches/<batch_id>.json     which run, shard and round a batch belongs to (its claim)
    probe-<token>               written and deleted at once by the preflight check
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator

STATE = "_moonbatch/"
SPEC = STATE + "spec.json"
PLAN = STATE + "plan.json"
FAILED = STATE + "failed.json"
CANCELLED = STATE + "cancelled.json"
STOPPED = STATE + "stopped.json"  # the run stopped sending (budget, error rate): workers.stops
LIMITS = STATE + "limits.json"  # a later --max-cost (retry-failed) over the spec's
CLAIMS = STATE + "claims/"
FINALIZED = STATE + "finalized"
FINALIZING = STATE + "finalizing.json"  # the lease of the caller writing the final run.json
SUMMARY = "run.json"
REPORT = "report.html"  # moonbatch report's default place (producer.report)
RESULTS = "results/"
ANNOTATIONS = "annotations/"
COCO = ANNOTATIONS + "instances.json"
LABEL_STUDIO = ANNOTATIONS + "label-studio/tasks.json"
LABEL_STUDIO_CONFIG = ANNOTATIONS + "label-studio/config.xml"
YOLO_DATA = ANNOTATIONS + "yolo/data.yaml"
YOLO_LABELS = ANNOTATIONS + "yolo/labels/"
SHARDS = STATE + "shards/"
PLANNING = STATE + "planning.json"
ENQUEUED = STATE + "enqueued"  # the producer enqueued every shard of the plan
SKIPPED = STATE + "skipped/"
RETRIES = STATE + "retries/"
SKIPPED_PART_KEYS = 10_000  # keys per part: memory stays bounded while listing


REGISTRY_RUNS = "runs/"
REGISTRY_ACTIVE = "active/"
REGISTRY_BATCHES = "batches/"


def registry_run(run_id: str) -> str:
    """Key (in the state store) of a run's registry entry."""
    return f"{REGISTRY_RUNS}{run_id}.json"


def registry_active(run_id: str) -> str:
    """Key (in the state store) of a run's active marker."""
    return f"{REGISTRY_ACTIVE}{run_id}.json"


def registry_batch(batch_id: str) -> str:
    """Key (in the state store) of a batch's claim."""
    return f"{REGISTRY_BATCHES}{batch_id}.json"


def run_id_of(key: str) -> str:
    """The run id in a ``runs/`` or ``active/`` key."""
    return key.rsplit("/", 1)[-1].removesuffix(".json")


def plan_items(shard: int) -> str:
    """Key of the shard's item list (JSONL of ``PlanItem``)."""
    return f"{STATE}plan/shard-{shard:05d}.jsonl"


def shard_prefix(shard: int) -> str:
    """Prefix of every state document of the shard."""
    return f"{SHARDS}{shard:05d}/"


def shard_doc(shard: int, name: str) -> str:
    """Key of a shard-level state document: ``done`` or ``lease``."""
    return f"{SHARDS}{shard:05d}/{name}.json"


def round_prefix(shard: int, rnd: int) -> str:
    """Prefix (a folder) of every document of a round."""
    return f"{SHARDS}{shard:05d}/r{rnd}/"


def claim(key: str) -> str:
    """Key of the run's claim of cache key ``key`` (64 hex): which shard sends it."""
    return f"{CLAIMS}{key[0:2]}/{key}.json"


def round_doc(shard: int, rnd: int, name: str) -> str:
    """Key of a round's document: todo, upload, build, submit, batch, orphans, progress, merged
    (``.json``) or rows (``rows.jsonl``)."""
    ext = "jsonl" if name == "rows" else "json"
    return f"{SHARDS}{shard:05d}/r{rnd}/{name}.{ext}"


def round_results_part(shard: int, rnd: int, number: int) -> str:
    """Key of the ``number``-th part of a round's result lines written step by step (fal:
    ``results-000000.jsonl``, write-once)."""
    return f"{round_prefix(shard, rnd)}{RESULTS_PART}{number:06d}.jsonl"


def step_attempts(shard: int, rnd: int, kind: str) -> str:
    """Key of the count of attempts of round ``rnd``'s ``build`` or ``poll`` steps
    (``moonbatch.workers.attempts``)."""
    return f"{SHARDS}{shard:05d}/r{rnd}/attempts-{kind}.json"


RESULTS_PART = "results-"  # a round's result-line parts: see round_results_part


@dataclasses.dataclass(frozen=True)
class ShardKey:
    """A key under ``_moonbatch/shards/``, parsed (see ``parse_shard_key``): the ``shard``,
    the ``round`` (None for a shard-level document: ``done``, ``lease``) and the document's
    ``name`` without its extension (``batch``, ``rows``, ``results-000003``,
    ``attempts-build``)."""

    shard: int
    round: int | None
    name: str


_SHARD_KEY = re.compile(re.escape(SHARDS) + r"(\d+)/(?:r(\d+)/)?([^/]+)\.jsonl?")


def parse_shard_key(key: str) -> ShardKey | None:
    """The shard, round and document name of a state key (the inverse of ``shard_doc``,
    ``round_doc``, ``round_results_part`` and ``step_attempts``); None for a key that is not
    a shard's document (another file under the folder, say)."""
    m = _SHARD_KEY.fullmatch(key)
    if m is None:
        return None
    return ShardKey(int(m[1]), int(m[2]) if m[2] is not None else None, m[3])


#: A shard's documents as a listing gives them: ``(round or None, name)`` → key.
ShardDocKeys = dict[tuple[int | None, str], str]


def group_shard_keys(keys: Iterable[str]) -> Iterator[tuple[int, ShardDocKeys]]:
    """Listed keys (in a listing's order) grouped by shard: ``(shard, {(round or None,
    name): key})`` as each shard's keys go by (a shard's keys share its folder, so they are
    adjacent in key order, whatever the widths of the shard numbers); keys that are not a
    shard's document are passed over, and shards with none are not given."""
    shard: int | None = None
    docs: ShardDocKeys = {}
    for key in keys:
        parsed = parse_shard_key(key)
        if parsed is None:
            continue
        if parsed.shard != shard:
            if shard is not None:
                yield shard, docs
            shard, docs = parsed.shard, {}
        docs[(parsed.round, parsed.name)] = key
    if shard is not None:
        yield shard, docs


def latest_round(docs: Iterable[tuple[int | None, str]]) -> int | None:
    """The highest round among one shard's ``(round or None, name)`` documents (a
    ``group_shard_keys`` group, or ``ShardKey``'s last two fields); None: no round document."""
    return max((rnd for rnd, _ in docs if rnd is not None), default=None)


def results(shard: int, suffix: str = "jsonl") -> str:
    """Key of the shard's merged result rows (``suffix``: the output format's, see
    ``moonbatch.workers.writers``)."""
    return f"{RESULTS}shard-{shard:05d}.{suffix}"


_RESULTS_KEY = re.compile(re.escape(RESULTS) + r"shard-(\d{5,})\.([a-z0-9]+)")


def parse_results(key: str) -> tuple[int, str] | None:
    """``(shard, suffix)`` of a key ``results`` builds (``results/shard-00003.jsonl`` →
    ``(3, "jsonl")``); None for any other key (a user's own file under ``results/``)."""
    m = _RESULTS_KEY.fullmatch(key)
    return (int(m[1]), m[2]) if m else None


def yolo_label(name: str) -> str:
    """Key of a YOLO label file: ``name`` is the image's relative name without its extension
    (``a/b`` → ``annotations/yolo/labels/a/b.txt``)."""
    return f"{YOLO_LABELS}{name}.txt"


def export_keys(keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` (a listing of OUTPUT's ``annotations/``) that an export wrote
    (``--export``: COCO, Label Studio, YOLO), for ``moonbatch clean``; a user's own files
    under ``annotations/`` are not among them."""
    fixed = {COCO, LABEL_STUDIO, LABEL_STUDIO_CONFIG, YOLO_DATA}
    return [k for k in keys if k in fixed or (k.startswith(YOLO_LABELS) and k.endswith(".txt"))]


def skipped_part(index: int) -> str:
    """Key of the ``index``-th part of the list of skipped keys (JSONL of ``{"key"}``)."""
    return f"{SKIPPED}part-{index:05d}.jsonl"


def retry_pass(number: int, name: str = "json") -> str:
    """Key of retry pass ``number``'s document (``json``) or its ``applied`` marker."""
    return f"{RETRIES}{number:04d}.{name}"


def parse_retry_pass(key: str) -> tuple[int, str] | None:
    """``(number, name)`` of a key ``retry_pass`` builds (``_moonbatch/retries/0002.applied``
    → ``(2, "applied")``); None for any other key."""
    m = re.fullmatch(re.escape(RETRIES) + r"(\d+)\.(json|applied)", key)
    return (int(m[1]), m[2]) if m else None


def probe(token: str) -> str:
    """Key of a preflight probe object in OUTPUT (deleted right after it is written)."""
    return f"{STATE}probe-{token}"


def registry_probe(token: str) -> str:
    """Key of a preflight probe object in the state store."""
    return f"probe-{token}"
