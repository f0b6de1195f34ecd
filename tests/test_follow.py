"""Following a run (``moonbatch.producer.follow``): its end is noticed soon, however slowly its
progress is looked at."""

from __future__ import annotations

import threading
import time

from moonbatch.config import Settings
from moonbatch.producer import ops
from moonbatch.producer.follow import _await_end
from moonbatch.workers import ends, layout
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
    looked, found = _await_end(reader, 10.0, 0.05)  # a look every 10 s, an end every 0.05 s
    took = time.monotonic() - t0
    writer.join()
    assert 0.25 < took < 5.0, took
    assert not looked and found == reader.final()  # the next snapshot, as found
    final = reader.final()
    assert final["status"] == "completed"
    assert final["timings"]["finished_at"].startswith("1970-01-01T00:00:01")
    assert ops.snapshot(str(out), Settings(), reader) == final  # the final summary, as read


def test_a_run_that_goes_on_is_waited_for_the_whole_pause(tmp_path):
    out = tmp_path / "out"
    put_json(open_store(str(out)), layout.SUMMARY, {"run_id": "r1", "status": "running"})
    t0 = time.monotonic()
    assert _await_end(ops.progress_reader(str(out), Settings()), 0.3, 0.05) == (True, None)
    assert time.monotonic() - t0 >= 0.3


def _finish_later(store, settings: Settings, run_id: str, after: float, announce: bool
                  ) -> threading.Thread:
    """Write the run's final summary after ``after`` seconds, then (``announce``) tell its
    followers as a finaliser does (``reconcile.run_final`` calls ``ends.announce``)."""
    def finish() -> None:
        time.sleep(after)
        put_json(store, layout.SUMMARY, {"run_id": run_id, "status": "completed",
                                         "counts": {"ok": 1}, "timings": {}})
        if announce:
            ends.announce(settings, run_id)

    writer = threading.Thread(target=finish)
    writer.start()
    return writer


def test_an_announced_end_is_noticed_at_once_without_polling(tmp_path, broker):
    out = tmp_path / "out"
    store = open_store(str(out))
    put_json(store, layout.SUMMARY, {"run_id": "r-end", "status": "running"})
    settings = Settings(broker_url=broker.url(0))
    reader = ops.progress_reader(str(out), settings)
    watch = ends.EndWatch.open(settings, "r-end")
    assert watch is not None
    reads = []
    final = reader.final
    reader.final = lambda: reads.append(1) or final()
    try:
        writer = _finish_later(store, settings, "r-end", 0.3, announce=True)
        t0 = time.monotonic()
        looked, found = _await_end(reader, 10.0, 0.05, watch)
        took = time.monotonic() - t0
        writer.join()
    finally:
        watch.close()
    assert found is not None and found["status"] == "completed"
    assert 0.25 < took < 0.8, took  # at the announcement, not the 1 s fallback
    assert len(reads) == 1  # no read of run.json every 0.05 s meanwhile


def test_a_lost_announcement_is_made_up_for_by_the_fallback_read(tmp_path, broker):
    out = tmp_path / "out"
    store = open_store(str(out))
    put_json(store, layout.SUMMARY, {"run_id": "r-lost", "status": "running"})
    settings = Settings(broker_url=broker.url(0))
    watch = ends.EndWatch.open(settings, "r-lost")
    try:
        writer = _finish_later(store, settings, "r-lost", 0.2, announce=False)
        t0 = time.monotonic()
        looked, found = _await_end(ops.progress_reader(str(out), settings), 10.0, 0.05, watch)
        took = time.monotonic() - t0
        writer.join()
    finally:
        watch.close()
    assert found is not None and found["status"] == "completed"
    assert ends.FALLBACK_SECONDS - 0.1 < took < ends.FALLBACK_SECONDS + 1.0, took


def test_no_subscription_without_a_redis_broker(tmp_path):
    settings = Settings(broker_url="filesystem://")
    assert ends.EndWatch.open(settings, "r1") is None
    ends.announce(settings, "r1")  # nothing to tell, nothing raised
