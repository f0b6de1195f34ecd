"""Run metadata: what a Parquet results file says about its run (key-value metadata), run.json's
ISO 8601 times (run.json files of older versions, with epoch numbers, still read) and its error
rows per code. End to end, over both providers: tests/test_writers.py
(``test_parquet_output_both_providers``)."""

from __future__ import annotations

import datetime
import io
import json
import time

import orjson
import pyarrow.parquet as pq
import pytest

from moonbatch.workers import layout, writers
from moonbatch.workers.lease import Lease
from moonbatch.workers.merge import error_codes
from moonbatch.workers.models import RunSpec, ShardDone, SkillOptions
from moonbatch.workers.runstate import Progress, epoch_seconds, iso_time, maybe_finalize, with_iso_times
from moonbatch.workers.storage import LocalStore, S3Store, put_json, s3_client
from moonbatch.workers.writers import jsonl, parquet

CREATED = 1_700_000_000.25


def spec(**extra) -> RunSpec:
    return RunSpec(run_id="20260101-abc", input="s3://in/", output="s3://out/",
                   options=SkillOptions(skill="query", question="How many cats?"),
                   more_options=[SkillOptions(skill="detect", object="cat")], shard_size=10,
                   max_shard_bytes=1 << 30, created_at=CREATED, **extra)


def rows(*statuses: str) -> list[bytes]:
    out = []
    for i, status in enumerate(statuses):
        if status == "ok":
            out.append(orjson.dumps({"id": f"{i}.jpg", "status": "ok", "result": {"answer": "2"}}))
        else:
            code = None if status == "error" else status
            out.append(orjson.dumps({"id": f"{i}.jpg", "status": "error",
                                     "error": {"code": code, "message": "m"}}))
    return out


def test_parquet_files_carry_the_run_in_their_key_value_metadata():
    fal = spec(provider="fal", endpoint="fal-ai/moondream3-preview/query", model="moondream-3")
    meta = writers.run_metadata(fal)
    data = parquet.encode(rows("ok", "not_an_image"), metadata=meta)
    got = {k.decode(): v.decode() for k, v in pq.read_metadata(io.BytesIO(data)).metadata.items()}
    assert got["moonbatch.run_id"] == "20260101-abc"
    assert got["moonbatch.provider"] == "fal"
    assert got["moonbatch.model"] == "moondream-3"
    assert got["moonbatch.endpoint"] == "fal-ai/moondream3-preview/query"
    assert json.loads(got["moonbatch.options"]) == [
        {"skill": "query", "question": "How many cats?"}, {"skill": "detect", "object": "cat"}]
    assert got["moonbatch.version"]
    # The schema is still the one of every shard, and the rows read back unchanged.
    assert pq.read_schema(io.BytesIO(data)) == parquet.SCHEMA
    assert [r["id"] for r in parquet.decode(data)] == ["0.jpg", "1.jpg"]
    # The same spec gives the same file: a redelivered merge rewrites identical bytes.
    assert parquet.encode(rows("ok"), metadata=meta) == parquet.encode(rows("ok"), metadata=meta)
    # Batch API run with the default model: empty model and endpoint, never missing keys.
    plain = writers.run_metadata(spec())
    assert plain["moonbatch.provider"] == "moondream"
    assert plain["moonbatch.model"] == "" and plain["moonbatch.endpoint"] == ""
    # JSONL has no place for it: the bytes are the rows alone.
    assert jsonl.encode(rows("ok"), metadata=plain) == jsonl.encode(rows("ok"))


def test_iso_times_round_trip_and_old_epoch_numbers_still_read():
    text = iso_time(CREATED)
    assert text == "2023-11-14T22:13:20.250+00:00"
    assert datetime.datetime.fromisoformat(text).timestamp() == CREATED
    assert epoch_seconds(text) == CREATED
    assert epoch_seconds(CREATED) == CREATED and epoch_seconds(1_700_000_000) == 1_700_000_000.0
    assert epoch_seconds("2023-11-14T22:13:20.250Z") == CREATED
    assert epoch_seconds("2023-11-14T22:13:20.250") == CREATED  # no offset: UTC
    assert iso_time(None) is None and epoch_seconds(None) is None
    with pytest.raises(ValueError):
        epoch_seconds("yesterday")
    old = {"run_id": "r", "status": "completed",
           "timings": {"created_at": CREATED, "planned_at": CREATED + 1, "finished_at": CREATED + 2,
                       "wall_seconds": 2.0}}
    new = with_iso_times(old)
    assert new["timings"] == {"created_at": text, "planned_at": iso_time(CREATED + 1),
                              "finished_at": iso_time(CREATED + 2), "wall_seconds": 2.0}
    assert with_iso_times(new) == new


def test_error_codes_count_error_rows_by_code():
    assert error_codes(rows("ok", "not_an_image", "ok", "not_an_image", "timeout", "error")) == {
        "not_an_image": 2, "timeout": 1, "unknown": 1}
    assert error_codes([b"not json"]) == {"unknown": 1}
    assert error_codes(rows("ok", "ok")) == {}


def finished_run(tmp_path, done: list[ShardDone]) -> LocalStore:
    store = LocalStore(str(tmp_path))
    run = spec()
    put_json(store, layout.SPEC, run.model_dump(mode="json"))
    put_json(store, layout.PLAN, {"items": sum(d.total for d in done), "shards": len(done),
                                  "planned_at": CREATED + 1})
    for d in done:
        store.put(layout.plan_items(d.shard), b"")
        put_json(store, layout.shard_doc(d.shard, "done"), d.model_dump())
    return store


def test_run_json_has_iso_times_and_errors_by_code(tmp_path):
    def done(shard: int, ok: int, codes: dict[str, int]) -> ShardDone:
        n = sum(codes.values())
        return ShardDone(shard=shard, batch_id=None, batch_status="completed", total=ok + n,
                         ok=ok, error=n, errors_by_code=codes, merged_at=CREATED + 2)

    # Shard 2 was merged by an older version: no errors_by_code in its done.json.
    old = done(2, 1, {}).model_dump()
    old.update(error=1, total=2)
    old.pop("errors_by_code")
    store = finished_run(tmp_path, [done(0, 3, {"not_an_image": 1, "timeout": 2}),
                                    done(1, 4, {"not_an_image": 1})])
    put_json(store, layout.shard_doc(2, "done"), old)
    store.put(layout.plan_items(2), b"")
    put_json(store, layout.PLAN, {"items": 14, "shards": 3, "planned_at": CREATED + 1})

    running = Progress(store).snapshot()
    assert running["errors_by_code"] == {"not_an_image": 2, "timeout": 2}
    assert running["timings"]["created_at"] == iso_time(CREATED)
    assert running["timings"]["planned_at"] == iso_time(CREATED + 1)
    assert running["timings"]["finished_at"] is None

    assert maybe_finalize(store)
    summary = json.loads(store.get(layout.SUMMARY))
    assert summary["status"] == "completed" and summary["counts"]["error"] == 5
    assert summary["errors_by_code"] == {"not_an_image": 2, "timeout": 2}
    finished = epoch_seconds(summary["timings"]["finished_at"])
    assert summary["timings"]["finished_at"].endswith("+00:00")
    assert summary["timings"]["wall_seconds"] == pytest.approx(finished - CREATED, abs=0.002)


def test_a_final_run_json_with_epoch_numbers_reads_as_iso(tmp_path):
    store = finished_run(tmp_path, [])
    put_json(store, layout.SUMMARY, {
        "run_id": "r", "status": "completed", "counts": {"total": 0},
        "timings": {"created_at": CREATED, "planned_at": None, "finished_at": CREATED + 9.5,
                    "wall_seconds": 9.5}})
    timings = Progress(store).snapshot()["timings"]
    assert timings == {"created_at": iso_time(CREATED), "planned_at": None,
                       "finished_at": iso_time(CREATED + 9.5), "wall_seconds": 9.5}


class CountingStore(S3Store):
    """moto's S3 through a store that counts its versioned reads by key."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[str] = []

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        self.reads.append(key)
        return super().get_versioned(key)


def test_progress_reads_again_only_the_shard_documents_that_changed(s3_endpoint, bucket):
    store = CountingStore(bucket, "out/", s3_client(s3_endpoint))
    put_json(store, layout.SPEC, spec().model_dump(mode="json"))
    put_json(store, layout.PLAN, {"items": 20, "shards": 2, "planned_at": CREATED + 1})
    for shard in (0, 1):
        put_json(store, layout.round_doc(shard, 0, "batch"), {"batch_id": f"b{shard}"})
        put_json(store, layout.round_doc(shard, 0, "spend"), {"estimate": 0.5, "actual": None})
        put_json(store, layout.round_doc(shard, 0, "progress"),
                 {"batch_id": f"b{shard}", "status": "processing", "total": 10, "completed": 0})
    assert all(o.version for o in store.iter_objects(layout.SHARDS))  # S3 lists ETags
    progress = Progress(store)
    first = progress.snapshot()
    assert first["spend"]["in_flight_usd"] == 1.0 and first["counts"]["in_flight"] == 0
    assert len(store.reads) == 4  # each shard's progress and spend
    store.reads.clear()
    assert progress.snapshot() == first
    assert store.reads == []  # nothing changed: nothing read again
    put_json(store, layout.round_doc(1, 0, "spend"), {"estimate": 0.5, "actual": 0.25,
                                                      "results": 10, "errors": 0, "codes": {}})
    put_json(store, layout.round_doc(0, 0, "progress"),
             {"batch_id": "b0", "status": "processing", "total": 10, "completed": 4})
    third = progress.snapshot()
    assert sorted(store.reads) == [layout.round_doc(0, 0, "progress"),
                                   layout.round_doc(1, 0, "spend")]
    assert third["spend"]["actual_usd"] == 0.25 and third["spend"]["in_flight_usd"] == 0.5
    assert third["counts"]["in_flight"] == 4


def test_one_caller_at_a_time_finalises_and_the_others_are_told_when_to_look_again(tmp_path):
    store = finished_run(tmp_path, [ShardDone(shard=0, batch_id=None, batch_status="completed",
                                              total=1, ok=1, error=0, merged_at=CREATED + 2)])
    holder = Lease(store, layout.FINALIZING, "another task", ttl=30)
    assert holder.acquire()  # another merge of the run's last shards finalises now
    waits: list[float] = []
    assert not maybe_finalize(store, waits.append)
    assert not store.exists(layout.SUMMARY) and len(waits) == 1 and 29 < waits[0] <= 30.5
    holder.release()
    assert maybe_finalize(store, waits.append)
    assert json.loads(store.get(layout.SUMMARY))["status"] == "completed"
    assert not store.exists(layout.FINALIZING) and len(waits) == 1
    assert not maybe_finalize(store, waits.append)  # finalised: nothing more, nobody told


def test_a_dead_finalisers_lease_is_taken_over_once_it_runs_out(tmp_path):
    store = finished_run(tmp_path, [ShardDone(shard=0, batch_id=None, batch_status="completed",
                                              total=1, ok=1, error=0, merged_at=CREATED + 2)])
    dead = Lease(store, layout.FINALIZING, "a killed task", ttl=0.2)
    assert dead.acquire()
    waits: list[float] = []
    assert not maybe_finalize(store, waits.append) and waits[0] <= 0.7
    time.sleep(waits[0])
    assert maybe_finalize(store, waits.append)
    assert json.loads(store.get(layout.SUMMARY))["status"] == "completed"


class LookingStore(LocalStore):
    """A local store that counts its listings and existence looks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.listings = 0
        self.looks: list[str] = []

    def iter_objects(self, prefix: str = ""):
        self.listings += 1
        return super().iter_objects(prefix)

    def exists(self, key: str) -> bool:
        self.looks.append(key)
        return super().exists(key)


def test_a_merges_look_at_completeness_costs_a_probe_not_a_listing_of_every_shard(tmp_path):
    shards = 40  # more than PROBE_FROM: a listing of ~12 documents per shard is pages long
    store = LookingStore(str(tmp_path))
    put_json(store, layout.PLAN, {"items": shards, "shards": shards, "planned_at": CREATED})

    def merge(*done: int) -> None:
        for shard in done:
            store.put(layout.round_doc(shard, 0, "rows"), b"")
            put_json(store, layout.shard_doc(shard, "done"), {"shard": shard})

    def complete(known: set[int]) -> bool:
        store.listings, store.looks = 0, []
        return Progress(store, merged=known).complete()

    merge(*range(10))
    known = {9}  # the shard the caller just merged
    assert not complete(known)  # the last shard is merged last: the first look finds it missing
    assert store.looks == [layout.shard_doc(shards - 1, "done")] and store.listings == 0
    merge(*range(10, 12), *range(13, shards))
    assert not complete(known)
    # Highest first, 1, 2, 4, 8… at a time, up to the first done.json missing (shard 12).
    assert store.looks[:3] == [layout.shard_doc(s, "done") for s in (39, 38, 37)]
    assert layout.shard_doc(12, "done") in store.looks and store.listings == 0
    assert 12 not in known and set(range(13, shards)) <= known
    assert not complete(known)  # what it knows is not looked at again
    assert store.looks == [layout.shard_doc(12, "done")] and store.listings == 0

    merge(12)
    assert complete(known)  # every done.json found: the listing has the last word
    assert store.listings == 1 and known == set(range(shards))

    store.delete(layout.shard_doc(5, "done"))  # a retry-failed pass reopened shard 5
    assert not complete(known) and store.listings == 1 and 5 not in known
    assert not complete(known)  # the listing corrected what it knew: one look again
    assert store.looks == [layout.shard_doc(5, "done")] and store.listings == 0

    # Without what a process knows (the reconciler's pass), or in a small run: the listing.
    assert not complete(None) and store.listings == 1 and store.looks == []


def test_maybe_finalize_keeps_what_this_process_knows_merged_per_run(tmp_path):
    store = LookingStore(str(tmp_path))
    put_json(store, layout.SPEC, spec().model_dump(mode="json"))
    put_json(store, layout.PLAN, {"items": 20, "shards": 20, "planned_at": CREATED})
    done = [ShardDone(shard=s, batch_id=None, batch_status="completed", total=1, ok=1, error=0,
                      merged_at=CREATED + 2) for s in range(20)]
    for d in done[:19]:
        put_json(store, layout.shard_doc(d.shard, "done"), d.model_dump())
    def shard_looks() -> list[str]:
        return [key for key in store.looks if key.startswith(layout.SHARDS)]

    assert not maybe_finalize(store, run_id="20260101-abc", shard=18)
    # Shard 19 has no done.json: one look, no listing.
    assert shard_looks() == [layout.shard_doc(19, "done")] and store.listings == 0
    put_json(store, layout.shard_doc(19, "done"), done[19].model_dump())
    store.looks = []
    assert maybe_finalize(store, run_id="20260101-abc", shard=19)
    # The shards the two merges named are not looked at: the others are, then listed.
    assert sorted(shard_looks()) == sorted(layout.shard_doc(s, "done") for s in range(18))
    assert json.loads(store.get(layout.SUMMARY))["counts"]["done"] == 20
