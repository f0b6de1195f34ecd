"""The reconciler's view of a run's shards: one listing of every shard's documents per pass,
grouped by shard (end to end: tests/test_planning.py, test_reliability.py, test_retry_failed.py)."""

from __future__ import annotations

from moonbatch.workers import layout
from moonbatch.workers.reconcile import StoredShardDocs
from moonbatch.workers.runstate import listed_shards
from moonbatch.workers.storage import LocalStore, put_json


def test_one_listing_gives_every_shards_documents_grouped_by_shard(tmp_path):
    store = LocalStore(str(tmp_path))
    # Shard folders of 5 and 6 digits: "10000/" and "100000/" interleave in key order.
    shards = (0, 1, 9999, 10000, 99999, 100000, 100001)
    for shard in shards:
        put_json(store, layout.round_doc(shard, 0, "build"), {})
        put_json(store, layout.round_doc(shard, 0, "batch"), {"batch_id": f"b{shard}"})
    put_json(store, layout.shard_doc(10000, "done"), {"total": 1})
    put_json(store, layout.round_doc(10000, 1, "todo"), [0])
    store.put(layout.SHARDS + "README.txt", b"not a shard's document")
    listings = []
    iter_objects = store.iter_objects
    store.iter_objects = lambda prefix="": listings.append(prefix) or iter_objects(prefix)

    grouped = list(listed_shards(store))
    assert listings == [layout.SHARDS]
    assert sorted(s for s, _ in grouped) == sorted(shards)  # each shard once
    docs = dict(grouped)
    assert docs[10000] == {(0, "build"): layout.round_doc(10000, 0, "build"),
                           (0, "batch"): layout.round_doc(10000, 0, "batch"),
                           (1, "todo"): layout.round_doc(10000, 1, "todo"),
                           (None, "done"): layout.shard_doc(10000, "done")}
    assert set(docs[100000]) == {(0, "build"), (0, "batch")}
    # The same documents as a shard's own listing gives, read when looked up.
    own = StoredShardDocs(store, 100000)
    assert listings[-1] == layout.shard_prefix(100000)
    given = StoredShardDocs(store, 100000, docs[100000])
    assert dict(own) == dict(given) and given[(0, "batch")] == {"batch_id": "b100000"}
    assert len(StoredShardDocs(store, 7)) == 0  # a shard with no document yet
