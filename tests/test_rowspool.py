"""moonbatch.workers.rowspool (rows in temporary files), the merge's use of it, streamed puts of
files to LocalStore and to S3 (moto's real server), and the Batch API's spooled result files."""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest

import moonbatch.workers.rowspool as rowspool
import moonbatch.workers.storage as storage_module
from moonbatch.workers import writers
from moonbatch.workers.merge import compose, encode_round, merge_round
from moonbatch.workers.models import PlanItem, ShardBuild
from moonbatch.workers.providers.moondream.download import ResultFiles
from moonbatch.workers.rowspool import (
    RowSpool,
    ShardRows,
    iter_stored_lines,
    newline_pieces,
    put_round_rows,
    read_chunks,
)
from moonbatch.workers.storage import LocalStore, NotFound, S3Store


def row(i: int, status: str = "ok") -> bytes:
    doc = {"id": f"img/{i}.jpg", "source": f"s3://b/img/{i}.jpg", "status": status}
    if status == "ok":
        doc["result"] = {"caption": "x" * (i % 50)}
    else:
        doc["error"] = {"code": "timeout", "message": "m"}
    return orjson.dumps(doc)


def test_spool_is_a_mapping_in_item_order():
    rows = {i: row(i) for i in range(50)}
    order = list(rows)
    random.Random(3).shuffle(order)
    with RowSpool(60) as spool:
        for i in order:
            spool[i] = rows[i]
        assert len(spool) == 50 and 55 not in spool and 7 in spool and "7" not in spool
        assert list(spool) == sorted(rows)
        assert dict(spool.items()) == rows and list(spool.values()) == [rows[i] for i in sorted(rows)]
        assert spool[7] == rows[7]
        with pytest.raises(KeyError):
            spool[55]
        with pytest.raises(KeyError):
            spool[600]
        before = spool.snapshot()
        spool[7] = b"replaced"  # appended; the snapshot keeps the old row
        spool[55] = b"new"
        del spool[8]
        assert spool[7] == b"replaced" and spool[55] == b"new" and 8 not in spool
        assert before[7] == rows[7] and 55 not in before and before[8] == rows[8]
        assert len(spool) == 50 and len(before) == 50
        spool.keep_only([7, 55, 1])
        assert list(spool) == [1, 7, 55]


def test_stored_rows_round_trip_through_a_store_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(rowspool, "CHUNK", 100)  # many chunks, cut inside lines
    store = LocalStore(tmp_path)
    rows = {i: row(i, "ok" if i % 3 else "error") for i in range(40)}
    with RowSpool(40) as spool:
        for i in reversed(range(40)):
            spool.add(i, rows[i])
        assert put_round_rows(store, "r0.jsonl", spool, if_absent=True) is True
        assert put_round_rows(store, "r0.jsonl", spool, if_absent=True) is False
    assert store.get("r0.jsonl") == encode_round(rows)  # the same bytes as encode_round's
    lines = list(iter_stored_lines(store, "r0.jsonl"))
    assert lines == encode_round(rows).splitlines()
    with pytest.raises(NotFound):
        iter_stored_lines(store, "missing.jsonl")


def test_compose_later_rounds_override_and_every_item_needs_a_row(tmp_path, monkeypatch):
    monkeypatch.setattr(rowspool, "CHUNK", 64)
    store = LocalStore(tmp_path)
    first = {i: row(i, "error") for i in range(10)}
    second = {i: row(i) for i in (2, 5)}
    store.put("r0", encode_round(first))
    store.put("r1", encode_round(second))
    final, ok = compose(10, [iter_stored_lines(store, "r0"), iter_stored_lines(store, "r1")])
    with final:
        expected = [second.get(i, first[i]) for i in range(10)]
        assert ok == 2 and len(final) == 10 and list(final) == expected
        assert final.file().read() == b"".join(r + b"\n" for r in expected)
    with pytest.raises(ValueError, match="item 3 of the shard has no row"):
        compose(5, [[b"0\t" + row(0), b"1\t" + row(1), b"2\t" + row(2)]])


def test_write_rounds_streams_jsonl_and_counts(tmp_path):
    store = LocalStore(tmp_path)
    rows = {0: row(0), 1: row(1, "error"), 2: row(2)[:-1] + b',"cached":true}'}
    store.put("r0", encode_round(rows))
    ok, codes, cached = writers.write_rounds(store, "jsonl", 3, 3, [iter_stored_lines(store, "r0")])
    assert (ok, codes, cached) == (2, {"timeout": 1}, 1)
    assert store.get(writers.results_key(3)) == b"".join(rows[i] + b"\n" for i in range(3))
    shard_rows = ShardRows()
    with shard_rows:
        for i in range(3):
            shard_rows.append(rows[i])
        writers.write_shard(store, "parquet", 3, shard_rows)  # a writer without encode_file
    assert [r["id"] for r in writers.read_shard(store, "parquet", 3)] == [
        orjson.loads(rows[i])["id"] for i in range(3)]


def test_merge_round_rows_are_spooled_and_keep_only_the_round_items():
    items = [PlanItem(id=f"img/{i}.jpg", size=10) for i in range(6)]
    build = ShardBuild(lines=[1, 3, 4])
    lines = [{"line_index": 0, "id": "img/1.jpg", "status": "ok", "result": {"caption": "a"}},
             {"line_index": 0, "id": "img/1.jpg", "status": "ok", "result": {"caption": "b"}},
             {"line_index": 2, "id": "img/4.jpg", "status": "error",
              "error": {"code": "processing_error", "message": "m"}}]
    rows, stats, retryable = merge_round(items, build, lines, lambda it: "s/" + it.key,
                                         todo=[1, 3, 4], retryable_codes=frozenset({"processing_error"}))
    with rows:
        assert isinstance(rows, RowSpool) and list(rows) == [1, 3, 4]
        assert orjson.loads(rows[1])["result"] == {"caption": "a"}  # the first wins
        assert orjson.loads(rows[3])["error"]["code"] == "missing_result"
        assert (stats.ok, stats.error, stats.duplicate, stats.missing) == (1, 2, 1, 1)
        assert retryable == [4]


def test_result_files_come_back_in_index_order_cut_at_line_ends():
    files = ResultFiles(chunk=50)
    data = {i: b"".join(orjson.dumps({"line_index": i * 10 + k, "id": "x" * k}) + b"\n"
                        for k in range(8)) for i in range(3)}
    files.add(2, data[2])
    files.add(0, b"garbage")
    files.clear()  # read everything again
    for i in (2, 0, 1):
        files.add(i, data[i])
    assert len(files) == 3
    pieces = list(files)
    assert all(p.endswith(b"\n") for p in pieces) and len(pieces) > 3
    assert b"".join(pieces) == data[0] + data[1] + data[2]
    assert [orjson.loads(r)["line_index"] for p in files for r in p.splitlines()] == [
        i * 10 + k for i in range(3) for k in range(8)]
    files.close()


def test_newline_pieces_and_lines_do_not_depend_on_where_chunks_are_cut(tmp_path):
    rng = random.Random(5)
    stream = b"".join(rng.choice([b"ab", b"\n", b"\n\n", b" ", b"\r", b"\r\n", b"x" * 30])
                      for _ in range(400)) + b"\n  "
    whole = list(rowspool._lines([stream]))
    assert whole[-1] != b"  " and b"\r" not in b"".join(whole)  # a blank unterminated end is dropped
    path = tmp_path / "s"
    path.write_bytes(stream)
    with open(path, "rb") as f:
        for size in (1, 2, 7, 64, 5000):
            chunks = list(read_chunks(f.fileno(), size, 3, len(stream) - 5))
            assert b"".join(chunks) == stream[3:-2] and max(map(len, chunks)) <= size
            chunks = list(read_chunks(f.fileno(), size))
            pieces = list(newline_pieces(chunks))
            assert b"".join(pieces) == stream and all(p.endswith(b"\n") for p in pieces[:-1])
            assert list(rowspool._lines(chunks)) == whole


def test_put_of_a_file_streams_it_to_local_and_s3(tmp_path, s3_endpoint, bucket, monkeypatch):
    import tempfile

    monkeypatch.setattr(rowspool, "CHUNK", 4096)  # ranged reads, one ending at the object's end
    body = b"".join(b"%d\t%b\n" % (i, row(i)) for i in range(2000))
    body += b"9" * (-len(body) % 4096 - 1) + b"\n"
    s3 = S3Store(bucket, "pre/", storage_module.s3_client(s3_endpoint))
    for store in (LocalStore(tmp_path), s3):
        with tempfile.TemporaryFile() as f:
            f.write(body)
            f.seek(0)
            assert store.put("rows.jsonl", f, if_absent=True) is True
            f.seek(0)
            assert store.put("rows.jsonl", f, if_absent=True) is False
        assert store.get("rows.jsonl") == body
        assert b"\n".join(iter_stored_lines(store, "rows.jsonl")) + b"\n" == body


def test_add_packed_sets_rows_as_add_does():
    with RowSpool(6) as spool:
        spool[4] = b"old"
        rows = [b'{"a":1}', b"", b'{"c":"\\u00e9"}', b"x" * 3000]
        spool.add_packed([5, 0, 4, 2], [7, 7, 21, 3021], b"".join(rows))
        assert len(spool) == 4 and dict(spool.items()) == {0: b"", 2: b"x" * 3000,
                                                           4: rows[2], 5: rows[0]}
        spool.add_packed([], [], b"")
        spool[1] = b"later"
        assert spool[1] == b"later" and spool[5] == rows[0] and len(spool) == 5
        with pytest.raises(ValueError):
            spool.add_packed([3], [2], b"abc")


def test_add_lines_sets_one_row_per_line():
    with RowSpool(6) as spool:
        spool[4] = b"old"
        rows = [b'{"a":1}', b"", b'{"c":"\\n\\u00e9"}', b"x" * 3000]
        spool.add_lines(np.array([5, 0, 4, 2]), b"\n".join(rows) + b"\n")
        assert len(spool) == 4 and dict(spool.items()) == {0: b"", 2: b"x" * 3000,
                                                           4: rows[2], 5: rows[0]}
        spool.add_lines([], b"")
        spool.add_lines([1], b"later\n")
        assert spool[1] == b"later" and spool[5] == rows[0] and len(spool) == 5
        for indices, data in (([3], b"abc"), ([3], b"a\nb\n"), ([3, 0], b"a\n"), ([], b"a\n")):
            with pytest.raises(ValueError):
                spool.add_lines(indices, data)
