"""``writers.read_results``: a run's results files read in shard order with the next shards'
GETs overlapped, bounded in shards and bytes, and its callers (``iter_results``, the exports,
``retry-failed``'s ``find_errors``, the report's ``read_rows``) keeping their behaviour for shards
not merged and damaged files. Real stores only: a local directory (read through a thin
subclass that records when each results file is read) and moto's S3 server."""

from __future__ import annotations

import os
import threading

import pytest

from moonbatch.producer.report import Rows, read_rows
from moonbatch.workers import layout, retries, writers
from moonbatch.workers.models import SkillOptions
from moonbatch.workers.runstate import Run
from moonbatch.workers.storage import LocalStore, NotFound, S3Store, StorageError, put_json
from moonbatch.workers.writers import exports
from tests.test_writers import OK, put_shard, spec_of

SPEC = spec_of(SkillOptions(skill="caption"))


class WatchedStore(LocalStore):
    """A local store that records, for each results file read, how many shards the caller had
    taken when the read started (``taken``: the test counts them), the most reads at once,
    and can hold a shard's read until others are done (``hold``: shard → shards to wait for)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.taken = 0
        self.started: dict[int, int] = {}
        self.finished: list[int] = []
        self.hold: dict[int, set[int]] = {}
        self.running = self.most = 0
        self._lock = threading.Condition()

    def take(self, shard: int, ahead: int, shards: int) -> None:
        """The caller took ``shard``: wait until the read ``ahead`` of it has started (the
        caller still holding it), then count it taken."""
        with self._lock:
            assert self._lock.wait_for(lambda: min(shard + ahead, shards - 1) in self.started,
                                       timeout=10)
        assert shard == self.taken
        self.taken += 1

    def get(self, key: str, **kwargs) -> bytes:
        parsed = layout.parse_results(key)
        if parsed is None:
            return super().get(key, **kwargs)
        shard = parsed[0]
        with self._lock:
            self.started[shard] = self.taken
            self.running += 1
            self.most = max(self.most, self.running)
            self._lock.notify_all()
            assert self._lock.wait_for(lambda: self.hold.get(shard, set()) <= set(self.finished),
                                       timeout=10)
        try:
            return super().get(key, **kwargs)
        finally:
            with self._lock:
                self.running -= 1
                self.finished.append(shard)
                self._lock.notify_all()


def rows_of(shard: int, n: int = 3) -> list[dict]:
    return [{**OK, "id": f"s{shard}-{i}"} for i in range(n)]


def write_run(store, shards: int, missing=(), n: int = 3) -> None:
    put_json(store, layout.PLAN, {"items": shards * n, "shards": shards})
    for shard in range(shards):
        if shard not in missing:
            put_shard(store, SPEC, shard, rows_of(shard, n))


def test_order_is_kept_when_later_shards_are_read_first(tmp_path):
    store = WatchedStore(tmp_path)
    write_run(store, 6)
    store.hold = {1: {2, 3, 4, 5}}  # shard 1's read ends only after every later one's
    got = []
    for shard in writers.read_results(store, "jsonl", 6):
        got.append(shard.shard)
        store.taken += 1
    assert got == list(range(6))
    assert store.finished.index(1) > store.finished.index(5)  # read out of order
    assert [r["id"] for r in writers.iter_results(LocalStore(tmp_path), "jsonl", 6)] == [
        r["id"] for s in range(6) for r in rows_of(s)]


def test_shards_not_merged_are_passed_over_in_place(tmp_path):
    store = LocalStore(tmp_path)
    write_run(store, 7, missing={0, 3, 6})
    got = list(writers.read_results(store, "jsonl", 7))
    assert [(g.shard, g.merged) for g in got] == [(s, s not in {0, 3, 6}) for s in range(7)]
    assert [r["id"] for r in writers.iter_results(store, "jsonl", 7)] == [
        r["id"] for s in (1, 2, 4, 5) for r in rows_of(s)]
    assert [i.position for i in exports.items(store, SPEC, 7)] == list(range(1, 13))
    rows = Rows(SPEC, 5)
    read_rows(store, SPEC, 7, rows)
    assert rows.total == 12 and rows.problems == []
    with pytest.raises(NotFound, match="shard-00000"):  # retry-failed: all merged, as before
        retries.find_errors(Run(SPEC, store, store), None)
    put_shard(store, SPEC, 0, rows_of(0) + [{"id": "bad", "status": "error",
                                             "error": {"code": "x", "message": ""}}])
    with pytest.raises(NotFound, match="shard-00003"):
        retries.find_errors(Run(SPEC, store, store), None)


def test_a_damaged_shard_is_raised_or_noted_at_its_place(tmp_path):
    store = LocalStore(tmp_path)
    write_run(store, 5)
    store.put(writers.results_key(2), b'{"id": "s2-0", "status": "ok"}\n{not json\n')
    # A results file the store refuses to read (a link out of its root): a StorageError.
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jsonl"
    outside.write_bytes(b"")
    os.remove(store.url_for(writers.results_key(4)))
    os.symlink(outside, store.url_for(writers.results_key(4)))

    got = []
    with pytest.raises(ValueError):  # orjson's decoding error, after the rows before it
        for row in writers.iter_results(store, "jsonl", 5):
            got.append(row["id"])
    assert got == [r["id"] for s in (0, 1) for r in rows_of(s)] + ["s2-0"]
    with pytest.raises(ValueError):
        list(exports.items(store, SPEC, 5))
    with pytest.raises(ValueError):
        retries.find_errors(Run(SPEC, store, store), None)

    rows = Rows(SPEC, 5)
    read_rows(store, SPEC, 5, rows)  # noted, and the shards after it still read
    assert rows.total == 3 + 3 + 1 + 3
    assert [p.split(" could")[0] for p in rows.problems] == ["results of shard 2",
                                                              "results of shard 4"]
    assert "StorageError" in rows.problems[1]

    write_run(store, 3)  # shard 2 mended: shard 4's read error is raised in its place
    got = []
    with pytest.raises(StorageError):
        for row in writers.iter_results(store, "jsonl", 5):
            got.append(row["id"])
    assert len(got) == 4 * 3


@pytest.mark.parametrize("window", [1, 3, 8])
def test_at_most_window_shards_are_read_beyond_those_taken(tmp_path, window):
    store = WatchedStore(tmp_path)
    write_run(store, 30)
    for got in writers.read_results(store, "jsonl", 30, window=window):
        store.take(got.shard, window - 1, 30)  # reads run that far ahead: no further
    assert sorted(store.started) == list(range(30))
    assert max(k - taken for k, taken in store.started.items()) == window - 1
    assert store.most <= window


def test_bytes_read_ahead_are_bounded(tmp_path):
    store = WatchedStore(tmp_path)
    write_run(store, 20, n=40)
    size = len(store.get(writers.results_key(0)))
    store.started.clear()
    # Room for the shard taken and one more: one read ahead, whatever the window.
    for got in writers.read_results(store, "jsonl", 20, window=8, max_bytes=int(2.5 * size)):
        store.take(got.shard, 1, 20)
    assert max(k - taken for k, taken in store.started.items()) == 1
    # Shards larger than the budget are still read, one ahead.
    store.started.clear()
    store.taken = 0
    for got in writers.read_results(store, "jsonl", 20, window=8, max_bytes=1):
        store.take(got.shard, 1, 20)
    assert store.taken == 20 and max(k - t for k, t in store.started.items()) == 1


def test_stopping_early_starts_no_more_reads(tmp_path):
    store = WatchedStore(tmp_path)
    write_run(store, 50)
    reading = writers.read_results(store, "jsonl", 50, window=4)
    assert next(reading).shard == 0
    reading.close()
    assert len(store.started) <= 4


def test_read_results_over_s3(s3, bucket):
    store = S3Store(bucket, "run/", s3)
    write_run(store, 12, missing={5})
    put_json(store, "other.json", {})
    got = list(writers.read_results(store, "jsonl", 12, plans=True))
    assert [(g.shard, g.merged, g.plan is not None) for g in got] == [
        (s, s != 5, s != 5) for s in range(12)]
    assert [r["id"] for r in writers.iter_results(store, "jsonl", 12)] == [
        r["id"] for s in range(12) if s != 5 for r in rows_of(s)]
