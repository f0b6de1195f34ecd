"""The shard's state machine (``moonbatch.workers.shard``) on plain dicts, branch by branch, and
the key parsing of ``moonbatch.workers.layout`` it is fed by. No storage, broker or clock."""

from __future__ import annotations

import pytest

from moonbatch.workers import layout
from moonbatch.workers.models import BatchRecord, ShardBuild
from moonbatch.workers.shard import (
    Action,
    Step,
    after_merge,
    cancel_look_due,
    chain_goes_on,
    grace,
    latest_round,
    merge_blocker,
    next_step,
    poll_turn,
    progress_write_due,
    rate_since,
    round_base,
)

NOW = 1_000_000.0
POLL = 5.0  # poll_min_interval
LATE = grace(POLL)  # 15 s


def batch_record(attempt: str) -> BatchRecord:
    return BatchRecord(batch_id="batch-1", file_id=None, submitted_at=NOW, lines=1, attempt=attempt)


def step(docs: dict, *, only_stale: bool = False) -> Step:
    return next_step(docs, only_stale=only_stale, now=NOW, poll_min_interval=POLL)


# -- next_step -----------------------------------------------------------------------------------
@pytest.mark.parametrize("only_stale", [False, True])
def test_a_merged_shard_is_done(only_stale):
    docs = {(None, "done"): {"ok": 3}, (0, "rows"): True, (1, "todo"): {"items": [2]}}
    assert step(docs, only_stale=only_stale) == Step(Action.DONE, 1, "merged")


@pytest.mark.parametrize("only_stale", [False, True])
def test_a_shard_with_nothing_yet_is_built_unless_its_first_message_is_queued(only_stale):
    got = step({}, only_stale=only_stale)
    # A shard with no lease never started: in a stale pass its queued message is left alone.
    assert got.action is (Action.WAIT if only_stale else Action.BUILD)
    assert got.round == 0


def test_the_latest_round_is_the_one_acted_on():
    docs = {(0, "build"): {"lines": [0]}, (0, "batch"): {"submitted_at": NOW},
            (0, "merged"): {}, (0, "rows"): True, (2, "todo"): {"items": [1]}}
    assert step(docs) == Step(Action.BUILD, 2, "round not sent")
    assert latest_round(docs) == 2


@pytest.mark.parametrize("only_stale", [False, True])
def test_rows_written_means_merge(only_stale):
    docs = {(0, "build"): {"lines": [0]}, (0, "batch"): {}, (0, "rows"): True}
    assert step(docs, only_stale=only_stale).action is Action.MERGE


@pytest.mark.parametrize("only_stale", [False, True])
def test_a_build_with_no_sendable_line_is_merged(only_stale):
    docs = {(None, "lease"): {"expires": NOW + 60}, (1, "todo"): {"items": [4]},
            (1, "build"): {"lines": []}}
    assert step(docs, only_stale=only_stale) == \
        Step(Action.MERGE, 1, "nothing was sendable: only error rows")


def test_a_build_that_stopped_before_its_batch_is_built_again():
    docs = {(None, "lease"): {"expires": NOW - 1}, (0, "build"): {"lines": [0, 1]}}
    assert step(docs) == Step(Action.BUILD, 0, "round not sent")
    assert step(docs, only_stale=True) == Step(Action.BUILD, 0, "round not sent")


def test_a_build_under_a_live_lease_waits_in_a_stale_pass_only():
    docs = {(None, "lease"): {"expires": NOW + 1}, (0, "upload"): {"upload_id": "u"}}
    assert step(docs, only_stale=True) == Step(Action.WAIT, 0, "a live builder holds the lease")
    assert step(docs).action is Action.BUILD  # resume: the build task waits for the lease


def test_a_lease_listed_and_released_since_counts_as_expired():
    class Released(dict):
        def __contains__(self, key):  # listed...
            return key == (None, "lease") or super().__contains__(key)

    docs = Released({(0, "todo"): {"items": [0]}})  # ...but gone when read
    assert step(docs, only_stale=True).action is Action.BUILD


def test_a_submitted_batch_is_polled():
    docs = {(0, "build"): {"lines": [0]}, (0, "batch"): {"submitted_at": NOW - 100},
            (0, "progress"): {"status": "in_progress", "next_at": NOW - 100}}
    assert step(docs) == Step(Action.POLL, 0, "batch at the provider")
    assert step(docs, only_stale=True).action is Action.POLL  # overdue


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_a_finished_batch_is_merged(status):
    docs = {(0, "batch"): {"submitted_at": NOW - 100},
            (0, "progress"): {"status": status, "next_at": NOW - 100}}
    assert step(docs) == Step(Action.MERGE, 0, f"batch {status}")
    assert step(docs, only_stale=True) == Step(Action.MERGE, 0, f"batch {status}")


def test_a_poll_chain_on_schedule_is_left_alone_in_a_stale_pass():
    docs = {(0, "batch"): {"submitted_at": NOW - 100},
            (0, "progress"): {"status": "completed", "next_at": NOW - LATE + 1}}
    assert step(docs, only_stale=True) == Step(Action.WAIT, 0, "poll chain on schedule")
    assert step(docs).action is Action.MERGE


def test_a_first_poll_not_due_yet_is_left_alone_in_a_stale_pass():
    docs = {(0, "batch"): {"submitted_at": NOW - POLL - LATE + 1}}
    assert step(docs, only_stale=True) == Step(Action.WAIT, 0, "first poll not due yet")
    overdue = {(0, "batch"): {"submitted_at": NOW - POLL - LATE - 1}}
    assert step(overdue, only_stale=True) == Step(Action.POLL, 0, "batch at the provider")
    assert step(docs) == Step(Action.POLL, 0, "batch at the provider")


def test_grace_is_three_poll_intervals_with_a_floor():
    assert grace(5.0) == 30.0
    assert grace(20.0) == 60.0
    assert grace(0.2) == 3.0  # the tests' sub-second polls


# -- poll_turn -----------------------------------------------------------------------------------
def test_a_first_poll_runs():
    assert poll_turn(None, chain="a", polls=0, now=NOW, poll_min_interval=POLL) is None


def test_a_poll_stops_when_another_chain_is_alive_and_runs_when_it_is_lost():
    alive = {"chain": "b", "polls": 3, "next_at": NOW}
    assert poll_turn(alive, chain="a", polls=0, now=NOW, poll_min_interval=POLL) == \
        "another poll chain of the round is alive"
    lost = {"chain": "b", "polls": 3, "next_at": NOW - LATE - 1}
    assert poll_turn(lost, chain="a", polls=0, now=NOW, poll_min_interval=POLL) is None


def test_a_redelivered_poll_of_the_same_chain_stops():
    progress = {"chain": "a", "polls": 4, "next_at": NOW}
    assert poll_turn(progress, chain="a", polls=3, now=NOW, poll_min_interval=POLL) == \
        "poll 4 of this chain already ran"
    assert poll_turn(progress, chain="a", polls=4, now=NOW, poll_min_interval=POLL) is None


# -- a chain of polls that only look -----------------------------------------------------------
def test_a_chain_goes_on_only_from_its_own_last_poll_of_this_run():
    mine = {"run": "r1", "chain": "a", "polls": 3, "status": "processing", "next_at": NOW}
    assert chain_goes_on(mine, run_id="r1", chain="a", polls=3)
    assert not chain_goes_on(None, run_id="r1", chain="a", polls=3)  # cleaned, or never written
    assert not chain_goes_on(mine, run_id="r2", chain="a", polls=3)  # another run at OUTPUT
    assert not chain_goes_on(mine, run_id="r1", chain="b", polls=3)  # another chain wrote
    assert not chain_goes_on(mine, run_id="r1", chain="a", polls=2)  # a redelivered copy
    assert not chain_goes_on({**mine, "status": "completed"}, run_id="r1", chain="a", polls=3)
    assert not chain_goes_on({k: v for k, v in mine.items() if k != "run"}, run_id="r1",
                             chain="a", polls=3)  # written by an older version: look again


def test_a_chain_looks_at_the_cancel_once_per_period():
    assert cancel_look_due(None, now=NOW, every=15.0)
    assert cancel_look_due({"looked_at": NOW - 15.0}, now=NOW, every=15.0)
    assert not cancel_look_due({"looked_at": NOW - 14.0}, now=NOW, every=15.0)


def test_a_poll_writes_what_moved_and_otherwise_only_to_keep_its_promise():
    stored = {"status": "processing", "total": 20, "completed": 3, "batch_id": "b",
              "next_at": NOW + 3}
    fields = {"status": "processing", "total": 20, "completed": 9, "batch_id": "b"}
    assert progress_write_due(None, fields, next_poll=NOW)
    assert not progress_write_due(stored, fields, next_poll=NOW + 2)  # counts only, promise held
    assert progress_write_due(stored, fields, next_poll=NOW + 4)  # the promise would lapse
    assert progress_write_due(stored, {**fields, "status": "completed"}, next_poll=NOW)
    assert progress_write_due(stored, {**fields, "total": 21}, next_poll=NOW)


# -- merge_blocker --------------------------------------------------------------------------------
def test_a_round_merges_when_its_build_and_batch_agree():
    build = ShardBuild(lines=[0, 1], attempt="a")
    assert merge_blocker(0, build, batch_record("a")) is None
    assert merge_blocker(0, build, batch_record("")) is None  # recorded before attempts were
    assert merge_blocker(0, ShardBuild(lines=[]), None) is None  # only error rows


def test_a_build_that_stopped_before_its_batch_is_not_merged():
    assert merge_blocker(2, ShardBuild(lines=[0], attempt="a"), None) == \
        Step(Action.BUILD, 2, "the build stopped between build.json and batch.json")


def test_a_batch_of_another_build_sends_the_round_again():
    assert merge_blocker(1, ShardBuild(lines=[0], attempt="a"), batch_record("b")) == \
        Step(Action.BUILD, 2, "build.json does not describe batch batch-1")


# -- after_merge and round_base ------------------------------------------------------------------
def test_retryable_items_get_another_round_while_the_pass_has_attempts():
    assert after_merge([3, 5], rnd=0, base=0, max_item_attempts=3) == \
        Step(Action.BUILD, 1, "retryable errors")
    assert after_merge([3], rnd=2, base=0, max_item_attempts=3).action is Action.FINISH
    # A retry-failed pass that began at round 4 gets a fresh budget.
    assert after_merge([3], rnd=5, base=4, max_item_attempts=3) == \
        Step(Action.BUILD, 6, "retryable errors")
    assert after_merge([], rnd=0, base=0, max_item_attempts=3) == \
        Step(Action.FINISH, 0, "no round left to send")


def test_round_base_reads_the_todo_of_later_rounds_only():
    assert round_base(0, {"base": 7}) == 0
    assert round_base(3, {"items": [1], "base": 3}) == 3
    assert round_base(2, {"items": [1]}) == 0
    assert round_base(2, None) == 0


# -- layout: every key built is parsed back -------------------------------------------------------
def test_shard_keys_parse_back():
    cases = {
        layout.shard_doc(7, "done"): (7, None, "done"),
        layout.shard_doc(7, "lease"): (7, None, "lease"),
        layout.round_doc(3, 12, "batch"): (3, 12, "batch"),
        layout.round_doc(3, 0, "rows"): (3, 0, "rows"),
        layout.round_results_part(1, 2, 5): (1, 2, "results-000005"),
        layout.step_attempts(1, 1, "build"): (1, 1, "attempts-build"),
        layout.round_doc(123_456, 0, "todo"): (123_456, 0, "todo"),
    }
    for key, (shard, rnd, name) in cases.items():
        assert layout.parse_shard_key(key) == layout.ShardKey(shard, rnd, name), key
    for other in (layout.PLAN, layout.plan_items(3), "_moonbatch/shards/abc/done.json",
                  "_moonbatch/shards/00001/r0/sub/x.json", "_moonbatch/shards/00001/r0/x.txt"):
        assert layout.parse_shard_key(other) is None, other
    keys = [layout.parse_shard_key(layout.round_doc(0, r, "todo")) for r in (0, 4, 2)]
    assert layout.latest_round((k.round, k.name) for k in keys) == 4
    done = layout.parse_shard_key(layout.shard_doc(0, "done"))
    assert layout.latest_round([(done.round, done.name)]) is None


def test_results_and_retry_keys_parse_back():
    assert layout.parse_results(layout.results(3, "parquet")) == (3, "parquet")
    assert layout.parse_results(layout.results(100_000)) == (100_000, "jsonl")
    assert layout.parse_results("results/mine.jsonl") is None
    assert layout.parse_results("results/shard-00001.jsonl.bak") is None
    assert layout.parse_retry_pass(layout.retry_pass(2, "applied")) == (2, "applied")
    assert layout.parse_retry_pass(layout.retry_pass(3)) == (3, "json")
    assert layout.parse_retry_pass(layout.RETRIES + "notes.txt") is None


def test_a_poll_chain_keeps_the_rate_of_all_the_progress_it_saw():
    from moonbatch.workers.providers.moondream.polling import next_poll_interval

    assert rate_since(None, now=10.0, finished=0) == [10.0, 0]
    assert rate_since([10.0, 0], now=12.0, finished=3) == [12.0, 3]  # first progress
    kept = rate_since([12.0, 3], now=13.0, finished=3)
    assert kept == [12.0, 3]  # nothing moved since: the earlier point stays
    assert rate_since(kept, now=18.0, finished=9) == [12.0, 3]
    assert rate_since([12.0, 3], now=19.0, finished=1) == [19.0, 1]  # went back
    # A 20-line batch at 1 line/s seen at 18 s with no line done since a poll 0.8 s before: the
    # previous poll alone gives no rate (a quarter of its age, up to the bound), the kept one does.
    bounds = {"min_interval": 0.17, "max_interval": 4.0}
    alone = next_poll_interval(elapsed=18.8, total=20, completed=18, last=(18.0, 18), now=18.8,
                               **bounds)
    kept = next_poll_interval(elapsed=18.8, total=20, completed=18, last=(8.0, 8), now=18.8,
                              **bounds)
    assert alone == 4.0 and kept == pytest.approx(1.08)
