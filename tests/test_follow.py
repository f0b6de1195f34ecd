"""Following a run (``moonbatch.producer.follow``): its end is noticed soon, however slowly its
progress is looked at."""

from __future__ import annotations

import threading
import time

from moonbatch.config import Settings
from moonbatch.producer import ops
from moonbatch.producer.follow import _await_end
from moonbatch.workers import layout
from moonbatch.workers.storage import open_store, put_json


def test_the_end_is_noticed_between_two_looks_at_the_progress(tmp_path):
    out = tmp_path / "out"
    store = open_store(str(out))
    put_json(store, layout.SUMMARY, {"run_id": "r1", "status": "running"})
    reader = ops.progress_reader(str(out), Settings())
    assert reader.final() is None  # running: no final summary yet

    def finish() -> None:
        time.sleep(0.3)
        put_json(store, layout.SUMMARY, {"run_id": "r1", "status": "completed",
                                         "counts": {"ok": 1}, "timings": {"finished_at": 1.0}})

    writer = threading.Thread(target=finish)
    writer.start()
    t0 = time.monotonic()
    _await_end(reader, 10.0, 0.05)  # a look every 10 s, an end looked for every 0.05 s
    took = time.monotonic() - t0
    writer.join()
    assert 0.25 < took < 5.0, took
    final = reader.final()
    assert final["status"] == "completed"
    assert final["timings"]["finished_at"].startswith("1970-01-01T00:00:01")
    assert ops.snapshot(str(out), Settings(), reader) == final  # the final summary, as read


def test_a_run_that_goes_on_is_waited_for_the_whole_pause(tmp_path):
    out = tmp_path / "out"
    put_json(open_store(str(out)), layout.SUMMARY, {"run_id": "r1", "status": "running"})
    t0 = time.monotonic()
    _await_end(ops.progress_reader(str(out), Settings()), 0.3, 0.05)
    assert time.monotonic() - t0 >= 0.3
