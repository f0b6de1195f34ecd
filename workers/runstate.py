"""A run's durable state in object storage: loading it, summarising it, finalising it once.

Object storage, not Redis, is the source of truth: every document here is written by a task
before the next step is enqueued (layout in ``moonbatch.workers.layout``).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from moonbatch.config import Settings
from moonbatch.workers import layout
from moonbatch.workers.models import PlanItems, RunSpec, ShardDone
from moonbatch.workers.providers import DEFAULT_PROVIDER
from moonbatch.workers.storage import (
    NotFound,
    Store,
    get_json,
    get_json_or_none,
    open_store,
    put_json,
)

#: ``run.json`` ``counts`` field → the ``ShardDone`` field it sums over merged shards.
RESULT_LINE_COUNTS = {"duplicate_lines": "duplicate_rows", "missing_lines": "missing_rows",
                      "malformed_lines": "malformed_lines", "id_mismatch_lines": "id_mismatch_lines"}


#: The statuses of a final ``run.json`` (``stopped``: the run stopped sending, its unsent
#: items are error rows with the stop's code; ``moonbatch.workers.stops``).
FINAL = ("completed", "failed", "cancelled", "stopped")

#: Documents a progress look reads at once (the shards' done and progress documents).
READERS = 16
#: Seconds of ``maybe_finalize``'s lease (renewed while its holder works).
FINALIZE_CLAIM_SECONDS = 30.0
#: ``run.json`` ``timings`` fields that are times (ISO 8601, UTC); ``wall_seconds`` is a duration.
TIMES = ("created_at", "planned_at", "finished_at")


class RunNotFound(Exception):
    """No run at this output location (or with this id)."""


def iso_time(epoch: float | None) -> str | None:
    """Unix seconds → ISO 8601 in UTC with milliseconds (``2026-01-31T09:30:00.250+00:00``,
    what ``datetime.fromisoformat`` reads back on every supported Python); None stays None."""
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(
        timespec="milliseconds")


def epoch_seconds(value: float | int | str | None) -> float | None:
    """A ``run.json`` time → Unix seconds: an ISO 8601 string (``iso_time``'s; without an
    offset it is taken as UTC) or the epoch number that run.json held before; None stays None.
    Raises ``ValueError`` for anything else."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    if isinstance(value, str):
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        return when.timestamp()
    raise ValueError(f"not a time: {value!r}")


def with_iso_times(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` (a run.json document) with its ``timings`` times as ISO 8601, whichever
    way they were written (run.json of older versions held epoch numbers)."""
    timings = summary.get("timings")
    if not isinstance(timings, dict):
        return summary
    fixed = {k: iso_time(epoch_seconds(v)) if k in TIMES else v for k, v in timings.items()}
    return {**summary, "timings": fixed}


@dataclasses.dataclass
class Run:
    """A run opened from its OUTPUT location: its ``spec`` and both stores."""

    spec: RunSpec
    output: Store
    input: Store
    settings: Any = None
    _fetcher: Any = dataclasses.field(default=None, repr=False)
    _items: tuple[int, PlanItems] | None = dataclasses.field(default=None, repr=False)

    @property
    def fetcher(self) -> Any:
        """The run's ``moonbatch.workers.readers.ItemFetcher`` (made on first use): reads an item's
        image wherever its reader put it, and names its ``source``."""
        if self._fetcher is None:
            from moonbatch.workers.readers import ItemFetcher

            # Local files are the run's own only when its INPUT is on this machine.
            self._fetcher = ItemFetcher(self.input, self.settings,
                                        local_input=not self.spec.input.startswith("s3://"))
        return self._fetcher

    def items(self, shard: int) -> PlanItems:
        """The shard's planned items, in line order (parsed on access: ``PlanItems``). The
        last shard asked for is kept (a task asks for its shard's more than once; a shard's
        plan never changes once written): one shard's plan in memory at most."""
        if self._items is None or self._items[0] != shard:
            self._items = (shard, PlanItems(self.output.get(layout.plan_items(shard))))
        return self._items[1]

    def hold_items(self, shard: int, data: bytes | None) -> None:
        """Keep the shard's plan (``plan/shard-NNNNN.jsonl``'s bytes) that a caller read
        alongside other documents: ``items`` parses it instead of reading it. None: not read
        (``items`` reads it)."""
        if data is not None:
            self._items = (shard, PlanItems(data))


def open_output(url: str, settings: Settings) -> Store:
    """The store at a run's OUTPUT URL, with the settings' S3 endpoint."""
    return open_store(url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                      pool=max(32, settings.fetch_concurrency * 2))


def open_run(output_url: str, settings: Settings, run_id: str | None = None) -> Run:
    """Open the run whose OUTPUT is ``output_url``.

    Raises ``RunNotFound`` if no run is there, or if ``run_id`` is given and another run is.
    """
    return open_run_reading(output_url, settings, run_id)[0]


#: Specs this process read, by (OUTPUT URL, run id): a run's spec is written once and never
#: changed (a cleaned OUTPUT may hold a later run, under another id). Insertion-ordered.
_specs: dict[tuple[str, str], RunSpec] = {}
SPECS_KEPT = 64
#: ``Progress.complete`` probes done.json documents before listing in runs of more shards.
PROBE_FROM = 16
PROBE_WINDOW = 16  # HEAD requests at once while probing


def known_spec(output_url: str, run_id: str) -> RunSpec | None:
    """The spec of run ``run_id`` at ``output_url`` if this process read it already, else
    None. It tells nothing about whether the run is still there (``moonbatch clean``)."""
    return _specs.get((output_url, run_id))


def _keep_spec(output_url: str, spec: RunSpec) -> None:
    if len(_specs) >= SPECS_KEPT:
        _specs.pop(next(iter(_specs)), None)
    _specs[(output_url, spec.run_id)] = spec


def open_run_reading(output_url: str, settings: Settings, run_id: str | None,
                     *looks: Callable[[Store], Any], known: bool = False) -> tuple[Run, list[Any]]:
    """``open_run``, and what each of ``looks`` returns given the run's OUTPUT store (storage
    reads), read concurrently with the run's spec: one round trip's wait for them all. Raises
    as ``open_run`` does (before anything a look raises). ``known``: a spec this process read
    already (``known_spec``) is not read again; the caller's looks must then tell whether the
    run is still there (a document of this run that only the run's own steps write)."""
    out = open_output(output_url, settings)
    held = known_spec(output_url, run_id) if known and run_id is not None else None
    if held is not None:
        from moonbatch.workers.readers import input_root

        run = Run(held, out, open_output(input_root(held), settings), settings)
        if len(looks) < 2:
            return run, [look(out) for look in looks]
        with cf.ThreadPoolExecutor(len(looks), thread_name_prefix="looks") as pool:
            return run, list(pool.map(lambda look: look(out), looks))
    if looks:
        with cf.ThreadPoolExecutor(len(looks) + 1, thread_name_prefix="looks") as pool:
            spec_doc = pool.submit(get_json_or_none, out, layout.SPEC)
            futures = [pool.submit(look, out) for look in looks]
            cf.wait([spec_doc, *futures])
        raw = spec_doc.result()
    else:
        raw = get_json_or_none(out, layout.SPEC)
    if raw is None:
        raise RunNotFound(f"no moonbatch run at {out.url}")
    spec = RunSpec.model_validate(raw)
    if run_id is not None and spec.run_id != run_id:
        raise RunNotFound(f"{out.url} holds run {spec.run_id}, not {run_id}")
    _keep_spec(output_url, spec)
    from moonbatch.workers.readers import input_root

    run = Run(spec, out, open_output(input_root(spec), settings), settings)
    return run, [f.result() for f in futures] if looks else []


def run_queue(spec: RunSpec, settings: Settings) -> str:
    """The broker queue of the run's tasks: ``spec.queue``, or ``settings.queue`` for a spec
    written before runs recorded their queue."""
    return spec.queue or settings.queue


def control_queue(queue: str, settings: Settings | None = None) -> str:
    """The queue of a run's light control steps (polls, finalising) beside its ``queue`` of
    heavy I/O steps (builds and uploads, downloads and merges), so workers of each kind scale
    apart and a poll never waits behind a 2 GB build: ``MOONBATCH_CONTROL_QUEUE`` for the
    fleet's queue when it is set, else ``<queue>-control``."""
    if settings is not None and settings.control_queue and queue == settings.queue:
        return settings.control_queue
    return f"{queue}-control"


def record_failure(store: Store, *, where: str, error: str) -> None:
    """Record why the run cannot complete (first failure wins). ``error`` must hold no secret."""
    put_json(store, layout.FAILED, {"where": where, "error": error[:2000], "at": time.time()},
             if_absent=True)


def listed_shards(store: Store, prefix: str = layout.SHARDS
                  ) -> Iterator[tuple[int, layout.ShardDocKeys]]:
    """The shards' documents under ``prefix`` (all of a run's by default) from one listing,
    a shard at a time as the listing passes it (``layout.group_shard_keys``: ``(shard,
    {(round or None, name): key})``), so memory holds one shard's keys. Raises storage
    errors."""
    return layout.group_shard_keys(obj.key for obj in store.iter_objects(prefix))


class Progress:
    """Reads a run's progress from storage; done documents are cached (they change only when
    a ``retry-failed`` pass reopens their shard, which removes them first), so repeated calls
    cost one listing plus the in-flight shards' progress documents."""

    def __init__(self, store: Store, plan: dict[str, Any] | None = None,
                 merged: set[int] | None = None) -> None:
        self.store = store
        #: Shards this process knows merged (``complete`` probes the others first and keeps
        #: this set in step with what it reads); None: ``complete`` lists, always.
        self.merged = merged
        self._done: dict[int, ShardDone] = {}
        self._batch_ids: dict[tuple[int, int], str | None] = {}  # (shard, round) → batch id
        self._settled: dict[str, dict[str, Any]] = {}  # spend.json of settled rounds
        # Shard documents as last read, with the version read: key → (version, doc).
        self._read: dict[str, tuple[str, Any]] = {}
        self._plan: dict[str, Any] | None = plan  # plan.json once written (write-once)
        #: The run's spec document as the last snapshot read it (None: not read yet).
        self.spec: dict[str, Any] | None = None

    @property
    def plan(self) -> dict[str, Any] | None:
        """plan.json as read so far (None: not read yet, or not written yet)."""
        return self._plan

    def snapshot(self, *, look_final: bool = True) -> dict[str, Any]:
        """The run's state as a dict: the shape of ``run.json`` (see README "Output").
        ``batches`` lists merged shards' batches (``"merged": true``) and then the batches
        still at the API (``"merged": false``, status as last polled); ``shards.in_flight``
        counts the latter: shards with a submitted batch and no ``done.json``.
        ``look_final`` False: the caller has just found no final summary (``final()``), so
        it is not read again (a run that ends meanwhile is final at the next look)."""
        st = self.store
        final = self.final() if look_final else None
        if final is not None:
            return final
        with cf.ThreadPoolExecutor(READERS, thread_name_prefix="progress") as pool:
            # One round trip for the run's documents and its listing, not six in a row;
            # plan.json is written once: read until it is there.
            listing = pool.submit(lambda: list(st.iter_objects(layout.SHARDS)))
            keys = (layout.SPEC, layout.FAILED, layout.CANCELLED, layout.STOPPED) + (
                () if self._plan is not None else (layout.PLAN,))
            spec, failed, cancelled, halted, *plan = pool.map(
                lambda key: get_json(st, key) if key == layout.SPEC else get_json_or_none(st, key),
                keys)
            self.spec = spec
            if plan:
                self._plan = plan[0]
            return self._snapshot(pool, spec, self._plan, failed, cancelled, halted,
                                  listing.result())

    def _snapshot(self, pool: cf.ThreadPoolExecutor, spec: dict[str, Any],
                  plan: dict[str, Any] | None, failed: Any, cancelled: Any, halted: Any,
                  listing: list[Any]) -> dict[str, Any]:
        """``snapshot`` from the run's documents and the listing of its shards' documents
        (``pool`` reads the documents it needs, concurrently)."""
        st = self.store
        versions = {obj.key: obj.version for obj in listing}
        latest: dict[int, int] = {}  # shard → latest round with a progress document
        sent: dict[int, int] = {}  # shard → latest round with a batch
        current: dict[int, int] = {}  # shard → latest round with any document
        merged: set[int] = set()  # shards with a done.json now
        submitted: set[int] = set()
        batches = 0
        spend_keys: list[str] = []
        unread: dict[int, str] = {}  # shard → its done.json, not cached yet
        for shard, docs in layout.group_shard_keys(obj.key for obj in listing):
            if (done_key := docs.get((None, "done"))) is not None:
                merged.add(shard)
                if shard not in self._done:
                    unread[shard] = done_key
            for (rnd, name), key in docs.items():
                if rnd is None:
                    continue
                current[shard] = max(current.get(shard, 0), rnd)
                if name == "spend":
                    spend_keys.append(key)
                if name == "progress":
                    latest[shard] = max(latest.get(shard, 0), rnd)
                elif name == "batch":
                    submitted.add(shard)
                    batches += 1
                    sent[shard] = max(sent.get(shard, 0), rnd)
        for shard, doc in zip(unread, pool.map(lambda k: get_json(st, k), unread.values()),
                              strict=True):
            self._done[shard] = ShardDone.model_validate(doc)
        for shard in set(self._done) - merged:  # reopened by a retry-failed pass
            del self._done[shard]
        # Only the current round of an unmerged shard is in flight: a later round (items
        # retried, a retry-failed pass) supersedes its earlier rounds' batches.
        flying = [(s, r) for s, r in latest.items() if s not in merged and r == current[s]]
        progress = {s: doc or {} for (s, _), doc in zip(flying, self._listed(
            pool, [layout.round_doc(s, r, "progress") for s, r in flying], versions),
            strict=True)}
        out = [self._in_flight(s, r, progress.get(s, {}))
               if r == current[s] else self._queued(s, current[s])
               for s, r in sorted(sent.items()) if s not in merged]
        done = self._done
        ok = sum(d.ok for d in done.values())
        err = sum(d.error for d in done.values())
        in_flight = sum(int(p.get("completed", 0)) + int(p.get("failed", 0))
                        for p in progress.values())
        total = plan["items"] if plan else None
        status = "cancelled" if cancelled else "failed" if failed else "running"
        shards_total = plan["shards"] if plan else None
        return {
            "run_id": spec["run_id"],
            "status": status,
            "input": spec["input"],
            "output": spec["output"],
            "skill": "+".join(o["skill"] for o in [spec["options"], *spec.get("more_options", ())]),
            "options": {k: v for k, v in spec["options"].items() if v is not None},
            "model": spec.get("model"),
            "provider": spec.get("provider") or DEFAULT_PROVIDER,
            "endpoint": spec.get("endpoint"),
            "counts": {"total": total, "ok": ok, "error": err, "done": ok + err,
                       # rows served by the result cache or copied within the run
                       "cached": sum(d.cached for d in done.values()),
                       "in_flight": in_flight, "skipped": plan.get("skipped", 0) if plan else None,
                       # Result lines of merged shards the merge could not use as sent.
                       **{name: sum(getattr(d, field) for d in done.values()) for name, field in
                          RESULT_LINE_COUNTS.items()}},
            "shards": {"total": shards_total, "merged": len(done), "submitted": len(submitted),
                       "in_flight": len(out),
                       "batches_submitted": batches,
                       "duplicate_batches": sum(d.duplicate_batches for d in done.values())},
            # Error rows of merged shards per error code (shards merged by an older version
            # count in ``counts.error`` only).
            "errors_by_code": _sum_codes(done.values()),
            "usage": {"input_tokens": sum(d.input_tokens for d in done.values()),
                      "output_tokens": sum(d.output_tokens for d in done.values())},
            "timings": {"created_at": iso_time(spec["created_at"]),
                        "planned_at": iso_time(plan.get("planned_at")) if plan else None,
                        "finished_at": None},
            "batches": [{"shard": s, "batch_id": d.batch_id, "status": d.batch_status,
                         "merged": True, "items": d.total, "ok": d.ok, "error": d.error,
                         "polls": d.polls, "rounds": d.rounds, "batch_ids": d.batch_ids,
                         "requests": d.requests, "cached": d.cached,
                         "duplicate_batches": d.duplicate_batches}
                        for s, d in sorted(done.items())] + out,
            "failure": failed,
            "cancelled": cancelled,
            # The run stopped sending (``workers.stops``): final as ``stopped`` once merged.
            "stop_reason": halted,
            "spend": self._spend(spec, spend_keys, pool, versions),
        }

    def _listed(self, pool: cf.ThreadPoolExecutor, keys: list[str],
                versions: dict[str, str | None]) -> list[Any]:
        """The JSON documents at ``keys`` (None: missing), read by ``pool``: one whose listed
        version (``versions``: the listing's, key → ``ObjectInfo.version``) is the version it
        had when last read is not read again (a store that lists no version: always read)."""
        def read(key: str) -> Any:
            held = self._read.get(key)
            if held is not None and versions.get(key) is not None and held[0] == versions[key]:
                return held[1]
            try:
                data, version = self.store.get_versioned(key)
            except NotFound:
                return None
            doc = json.loads(data)
            self._read[key] = (version, doc)
            return doc

        return list(pool.map(read, keys))

    def final(self) -> dict[str, Any] | None:
        """The run's final summary (``run.json`` once ``maybe_finalize`` or a cancel wrote
        it, times as ISO 8601), or None while the run goes on: one read."""
        existing = get_json_or_none(self.store, layout.SUMMARY) or {}
        if existing.get("status") in FINAL and "counts" in existing:
            return with_iso_times(existing)
        return None

    def _spend(self, spec: dict[str, Any], keys: list[str], pool: cf.ThreadPoolExecutor,
               versions: dict[str, str | None]) -> dict[str, Any]:
        """The run's spend (``stops.spend_of`` the rounds' ``spend.json`` at ``keys``; settled
        ones are read once, the others by ``pool``, concurrently, when their listed version
        changed: ``_listed``) under its budget."""
        from moonbatch.workers import stops

        over = pool.submit(get_json_or_none, self.store, layout.LIMITS) \
            if spec.get("max_cost") is not None or keys else None
        unread = [key for key in keys if key not in self._settled]
        read = {k: doc or {} for k, doc in zip(unread, self._listed(pool, unread, versions),
                                               strict=True)}
        self._settled.update((k, doc) for k, doc in read.items() if doc.get("actual") is not None)
        docs = [self._settled.get(k) or read[k] for k in keys]
        limits = over.result() if over is not None else None
        return stops.spend_of(docs, (limits or {}).get("max_cost", spec.get("max_cost")))

    def _in_flight(self, shard: int, rnd: int, progress: dict[str, Any]) -> dict[str, Any]:
        """An entry of ``batches`` for the shard's batch at the API (round ``rnd``): its status
        as last polled (``submitted`` before the first poll) and progress."""
        batch_id = self._batch_ids.get((shard, rnd)) or progress.get("batch_id")
        if batch_id is None and (shard, rnd) not in self._batch_ids:
            doc = get_json_or_none(self.store, layout.round_doc(shard, rnd, "batch"))
            batch_id = (doc or {}).get("batch_id")
            if doc is not None:  # a round's batch never changes (an id of None too)
                self._batch_ids[(shard, rnd)] = batch_id
        if batch_id is not None:
            self._batch_ids[(shard, rnd)] = batch_id
        return {"shard": shard, "batch_id": batch_id,
                "status": progress.get("status") or "submitted", "merged": False,
                "round": rnd, "items": progress.get("total"),
                "completed": int(progress.get("completed") or 0),
                "failed": int(progress.get("failed") or 0), "polls": progress.get("polls", 0),
                "requests": int(progress.get("requests") or 0)}

    @staticmethod
    def _queued(shard: int, rnd: int) -> dict[str, Any]:
        """An entry of ``batches`` for a shard whose round ``rnd`` is not submitted yet."""
        return {"shard": shard, "batch_id": None, "status": "queued", "merged": False,
                "round": rnd, "items": None, "completed": 0, "failed": 0, "polls": 0,
                "requests": 0}

    def complete(self) -> bool:
        """True when the plan is written and every shard is merged.

        The listing of every shard's documents (about a dozen per shard: one page per ~80
        shards) is the answer. A run of more than ``PROBE_FROM`` shards that knows some shards
        merged (``merged``) first looks for the done.json of the others, highest first (shards
        are built in order: the last ones are merged last), in rounds of 1, 2, 4… up to
        ``PROBE_WINDOW`` HEAD requests at once, and answers False at the first one missing:
        while a run goes on, a merge's look costs a request or two (about 2 at 1,000 shards
        and 16 processes, 5 with merges in random order), not a listing that grows with the
        run (which, at every merge, made a run's listing pages grow with the square of its
        shards: ~10,000 pages for 1,000 shards). Only a run that looks complete is listed,
        and the listing corrects ``merged`` (a ``retry-failed`` pass reopens shards)."""
        plan = self._plan
        if plan is None:
            plan = get_json_or_none(self.store, layout.PLAN)
            if plan is None:
                return False
            self._plan = plan  # write-once: the snapshot that follows needs it too
        shards = int(plan["shards"])
        if self.merged is not None and shards > PROBE_FROM and not self._probe(shards):
            return False
        merged = {shard for shard, docs in listed_shards(self.store) if (None, "done") in docs}
        if self.merged is not None:
            self.merged.clear()
            self.merged.update(merged)
        return len(merged) >= shards

    def _probe(self, shards: int) -> bool:
        """False as soon as a shard not in ``merged`` has no done.json (highest first); True
        when every shard's was found (then in ``merged``). Raises storage errors."""
        unknown = [s for s in range(shards - 1, -1, -1) if s not in self.merged]
        window, at = 1, 0
        with cf.ThreadPoolExecutor(PROBE_WINDOW, thread_name_prefix="probe") as pool:
            while at < len(unknown):
                chunk = unknown[at:at + window]
                found = list(pool.map(
                    lambda s: self.store.exists(layout.shard_doc(s, "done")), chunk))
                self.merged.update(s for s, ok in zip(chunk, found, strict=True) if ok)
                if not all(found):
                    return False
                at += window
                window = min(2 * window, PROBE_WINDOW)
        return True


def _sum_codes(done: Any) -> dict[str, int]:
    codes: dict[str, int] = {}
    for d in done:
        for code, n in d.errors_by_code.items():
            codes[code] = codes.get(code, 0) + n
    return dict(sorted(codes.items()))


#: plan.json as this process read it, by (OUTPUT URL, run id): written once per run.
_plans: dict[tuple[str, str], dict[str, Any]] = {}
#: Shards this process knows merged, by (OUTPUT URL, run id): ``Progress.merged``.
_merged: dict[tuple[str, str], set[int]] = {}


def maybe_finalize(store: Store, on_claimed: Callable[[float], None] | None = None, *,
                   claim_seconds: float = FINALIZE_CLAIM_SECONDS,
                   run_id: str | None = None, shard: int | None = None) -> bool:
    """Write the final ``run.json`` if every shard is merged and nobody did it yet.

    Safe to call from any number of tasks at once: the summary is deterministic but for its
    ``finished_at``, and the ``finalized`` marker is written with a conditional put, so one
    caller wins. Returns True if this call wrote the marker.

    The merges of a run's last shards end together and each finds the run complete: one of
    them at a time finalises, holding the ``finalizing.json`` lease (``claim_seconds``,
    renewed while it works), so the others do not each read every shard's documents again.
    A caller that finds the lease held returns False and, when given ``on_claimed``, calls it
    with the seconds until that lease runs out: a holder that died leaves the run to be
    finalised then (or by the reconciler's pass).

    ``run_id``: the run's id, when the caller knows it: its plan.json, once this process read
    it, is not read again, and the shards it knows merged are not looked at again until the
    run looks complete (``Progress.complete``; a merge of each shard looks whether the run is
    complete). ``shard``: a shard the caller knows merged (its done.json is written).
    """
    held = (store.url, run_id) if run_id is not None else None
    merged: set[int] | None = None
    if held is not None:
        merged = _merged.get(held)
        if merged is None:
            if len(_merged) >= SPECS_KEPT:
                _merged.pop(next(iter(_merged)), None)
            merged = _merged[held] = set()
        if shard is not None:
            merged.add(shard)
    progress = Progress(store, plan=_plans.get(held) if held else None, merged=merged)
    complete = progress.complete()
    if held is not None and progress.plan is not None:
        if len(_plans) >= SPECS_KEPT:
            _plans.pop(next(iter(_plans)), None)
        _plans[held] = progress.plan
    if not complete:
        return False
    # Whether it is finalised or cancelled only once it is complete: every merge looks
    # whether its run is complete, and all but the last few find it is not (two requests
    # fewer per merge, one round trip more for the run's last merges).
    with cf.ThreadPoolExecutor(1, thread_name_prefix="finalize") as pool:
        finalized = pool.submit(store.exists, layout.FINALIZED)
        cancelled = store.exists(layout.CANCELLED)
    if finalized.result() or cancelled:
        return False
    from moonbatch.workers.lease import Lease, execution_owner

    claim = Lease(store, layout.FINALIZING, execution_owner(None), claim_seconds)
    if not claim.acquire():
        if on_claimed is not None:
            on_claimed(max(claim.holder_expires - time.time(), 0.0) + 0.5)
        return False
    try:
        with claim.kept_alive():
            return _finalize(store, progress)
    finally:
        claim.release()


def _finalize(store: Store, progress: Progress) -> bool:
    """``maybe_finalize``'s writes, once the run is complete and this caller holds the
    lease: the summary, then the marker (True if this call wrote it)."""
    # From the run's documents, not an earlier run.json: what a finaliser that stopped
    # between the summary and the marker wrote is the same but for its finished_at. Read
    # beside the look whether the last holder finished just before (then it is dropped).
    with cf.ThreadPoolExecutor(1, thread_name_prefix="finalized") as pool:
        finalized = pool.submit(store.exists, layout.FINALIZED)
        summary = progress.snapshot(look_final=False)
    if finalized.result():
        return False
    from moonbatch.workers import writers

    spec = RunSpec.model_validate(progress.spec if progress.spec is not None
                                  else get_json(store, layout.SPEC))
    writers.finish_run(store, spec, summary["shards"]["total"])  # the plan's, read by complete()
    summary["status"] = "failed" if summary["failure"] else \
        "stopped" if summary.get("stop_reason") else "completed"
    finished = time.time()
    summary["timings"]["finished_at"] = iso_time(finished)
    summary["timings"]["wall_seconds"] = round(finished - spec.created_at, 3)
    summary["counts"]["in_flight"] = 0
    # Summary first, marker second: a crash in between leaves the run to be finalised again.
    put_json(store, layout.SUMMARY, summary)
    return store.put(layout.FINALIZED, json.dumps({"at": time.time()}).encode(), if_absent=True)
