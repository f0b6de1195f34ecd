"""One builder per shard (issue 16, item 5): a redelivered copy of a running ``build_shard`` (the
same Celery task id: a lost broker connection with late acks, a task longer than the visibility
timeout) waits for the running execution instead of building beside it, and the documents that
name a batch are written once or by compare-and-swap, so two executions that both reach
``mpu-complete`` still bill one batch.

Everything runs over real servers: moto's S3, the emulator over HTTP, a real Redis and a real
Celery worker.
"""

from __future__ import annotations

import re
import time
import uuid

import orjson
import pytest

from moonbatch.emulator.server import EmulatorConfig, EmulatorServer, Faults
from moonbatch.workers.providers.moondream.client import BatchClient
from tests.conftest import (
    SKIMAGE_PHOTOS,
    Worker,
    expected_result,
    read_json,
    read_results,
    run_cli,
    upload_photos,
    wait_for_run,
)

RECEIVED = re.compile(r"Task moonbatch\.build_shard\[([0-9a-f-]{36})\] received")


def wait_for(condition, timeout: float, what: str):
    """Poll ``condition()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not seen after {timeout:.0f}s")


def keys(s3, bucket: str, prefix: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


@pytest.mark.timeout(300)
def test_a_redelivered_build_waits_for_the_running_one(s3, bucket, env, tmp_path):
    """A second copy of the running build_shard message, with the same task id, is published
    while the first uploads its parts: exactly one batch is billed for the round, every row is
    there once, and the copy's log says it waited for the running execution."""
    photos = upload_photos(s3, bucket, "in/")
    config = EmulatorConfig(api_key="one-" + uuid.uuid4().hex, chunking_seconds=0.1,
                            processing_seconds=0.2, min_part_size=0,
                            faults=Faults(latency=0.25))  # slow parts: the build takes a while
    with EmulatorServer(config) as emu:
        queue = "ob-" + uuid.uuid4().hex[:8]
        wenv = {**env, "MOONBATCH_QUEUE": queue, "MOONDREAM_API_KEY": config.api_key,
                "MOONBATCH_MOONDREAM_URL": emu.url, "MOONBATCH_PART_SIZE": str(16 * 1024),
                "MOONBATCH_UPLOAD_CONCURRENCY": "1"}
        log_path = tmp_path / "worker.log"
        t0 = time.time()
        with Worker(wenv, queue, log_path, concurrency=2):
            run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/",
                     "--shard-size", "100"], wenv)
            r0 = "out/_moonbatch/shards/00000/r0/"
            wait_for(lambda: r0 + "upload.json" in keys(s3, bucket, r0), 90,
                     "the build's open upload")
            task_id = wait_for(lambda: RECEIVED.findall(log_path.read_text()), 30,
                               "the build task's id")[0]
            assert r0 + "batch.json" not in keys(s3, bucket, r0), "the build ended too soon"
            spec = read_json(s3, bucket, "out/_moonbatch/spec.json")
            from moonbatch.workers.tasks import build_shard

            # What the broker redelivers: the same message, same task id, same arguments.
            build_shard.apply_async(task_id=task_id, queue=queue, kwargs={
                "output": f"s3://{bucket}/out/", "run": spec["run_id"], "shard": 0, "round": 0})
            summary = wait_for_run(s3, bucket, "out/", timeout=240)
        created = BatchClient(emu.url, config.api_key).find_batches(t0 - 5)
    text = log_path.read_text()
    print(f"\nredelivered build: batches created {len(created)}; copies of the task received "
          f"{len(RECEIVED.findall(text))}; summary batches_submitted "
          f"{summary['shards']['batches_submitted']}")
    assert summary["status"] == "completed", summary
    assert len(created) == 1, [b.id for b in created]  # one batch billed for the round
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(SKIMAGE_PHOTOS)  # every row once
    for row in rows:
        assert row["status"] == "ok", row
        assert row["result"] == expected_result(photos[row["id"]], {"skill": "caption",
                                                                     "length": "normal"})
    assert RECEIVED.findall(text).count(task_id) == 2  # the copy really ran in the worker
    assert "another execution of this task holds the shard" in text, text[-3000:]
    assert "aborting the upload a dead attempt left open" not in text


# -- the documents' write discipline: two executions of one round --------------------------------
NAMES = ("coffee.png", "rocket.jpg", "chelsea.png", "camera.png")
R0 = "r0"


def round_docs(state) -> dict[str, dict]:
    """The round's documents that exist: name → parsed JSON."""
    from moonbatch.workers import layout
    from moonbatch.workers.storage import get_json_or_none

    found = {}
    for name in ("build", "submit", "batch", "upload", "orphans"):
        doc = get_json_or_none(state, layout.round_doc(0, 0, name))
        if doc is not None:
            found[name] = doc
    return found


@pytest.fixture
def batch_api(s3_endpoint, bucket):
    """A private emulator (so its batches and open uploads are this test's alone), a client
    of it, the OUTPUT state store on moto, and the round's items and their bytes."""
    from moonbatch.workers.models import PlanItem
    from moonbatch.workers.storage import S3Store, s3_client
    from tests.conftest import photos_dir

    config = EmulatorConfig(api_key="race-" + uuid.uuid4().hex, chunking_seconds=0.1,
                            processing_seconds=0.2, min_part_size=0, faults=Faults(latency=0.05))
    photos = {n: (photos_dir() / n).read_bytes() for n in NAMES}
    items = [PlanItem(n, len(b)) for n, b in photos.items()]
    with EmulatorServer(config) as emu:
        yield {"emu": emu, "client": BatchClient(emu.url, config.api_key),
               "state": S3Store(bucket, "out/", s3_client(s3_endpoint)), "items": items,
               "fetch": lambda item: photos[item.id]}


def build(api, *, heartbeat=None, renew=None, part_size=16 * 1024):
    from moonbatch.workers.models import SkillOptions
    from moonbatch.workers.providers.moondream.upload import build_and_submit

    return build_and_submit(shard=0, items=api["items"], options=SkillOptions(skill="caption"),
                            model=None, state=api["state"], client=api["client"],
                            fetch=api["fetch"], part_size=part_size, concurrency=2,
                            upload_concurrency=1, id_prefix="0123456789:",
                            heartbeat=heartbeat, renew=renew)


def test_two_builds_racing_on_one_round_bill_one_batch(batch_api):
    """Two executions of one round build and upload at once (both past their first checks
    before either claims): one claims the round and bills, the other aborts its upload and
    then finds the recorded batch. build.json describes that batch."""
    import threading

    from moonbatch.workers.providers.moondream.recovery import RoundClaimed

    t0 = time.time()
    started = threading.Barrier(2, timeout=60)
    outcome: dict[str, object] = {}

    def execution(name: str) -> None:
        first = [True]

        def beat() -> None:  # called between lines: both are in their build loop
            if first[0]:
                first[0] = False
                started.wait()

        try:
            outcome[name] = build(batch_api, heartbeat=beat)
        except RoundClaimed as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=execution, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    claimed = [n for n, o in outcome.items() if isinstance(o, RoundClaimed)]
    for name in claimed:  # what a re-enqueued build does once the winner is done
        outcome[name] = build(batch_api)
    created = batch_api["client"].find_batches(t0 - 5)
    docs = round_docs(batch_api["state"])
    calls = batch_api["emu"].emulator.requests
    print(f"\nracing builds: uploads opened {calls.get('mpu-create')}, mpu-complete calls "
          f"{calls.get('mpu-complete')}, aborts {calls.get('mpu-abort')}; {len(created)} "
          f"batch(es) created; executions told to look again later: {claimed}")
    assert calls["mpu-create"] == 2  # both really built and uploaded
    assert calls["mpu-complete"] == 1 and len(created) == 1, [b.id for b in created]
    assert {o[1].batch_id for o in outcome.values()} == {created[0].id}  # type: ignore[index]
    assert docs["batch"]["batch_id"] == created[0].id
    assert docs["build"]["attempt"] == docs["batch"]["attempt"] != ""
    assert len(docs["build"]["lines"]) == len(NAMES)
    assert "submit" not in docs and "upload" not in docs and "orphans" not in docs
    assert batch_api["emu"].emulator.uploads == {}  # the loser's upload was aborted


def test_a_stalled_build_whose_lease_was_taken_over_bills_nothing(batch_api):
    """An execution stalls mid-build; its lease expires and another execution takes the round
    over and bills it. When the stalled one wakes up, its renewal before claiming the round
    fails: it aborts its upload and writes nothing."""
    import threading

    from moonbatch.workers import layout
    from moonbatch.workers.lease import Lease, LeaseLost, execution_owner

    state = batch_api["state"]
    key = layout.shard_doc(0, "lease")
    stalled = Lease(state, key, execution_owner("task-1"), 1.0)
    assert stalled.acquire()
    stall, woke = threading.Event(), threading.Event()
    result: dict[str, object] = {}

    def stalled_build() -> None:
        def beat() -> None:
            if not stall.is_set():
                stall.set()
                woke.wait(60)  # a GC pause, a partition: no renewal meanwhile

        try:
            # One part holds the whole shard: its upload opens after the stall.
            result["a"] = build(batch_api, heartbeat=beat, part_size=8 * 1024 * 1024,
                                renew=lambda: stalled.renew(force=True))
        except BaseException as exc:  # noqa: BLE001 - the test looks at what was raised
            result["a"] = exc

    t0 = time.time()
    thread = threading.Thread(target=stalled_build)
    thread.start()
    assert stall.wait(60)
    taker = Lease(state, key, execution_owner("task-2"), 30.0)
    wait_for(taker.acquire, 30, "the expired lease taken over")
    build_b, batch_b = build(batch_api, renew=lambda: taker.renew(force=True))
    woke.set()
    thread.join(120)
    created = batch_api["client"].find_batches(t0 - 5)
    docs = round_docs(state)
    assert isinstance(result["a"], LeaseLost), result
    assert [b.id for b in created] == [batch_b.batch_id]
    assert docs["build"]["attempt"] == docs["batch"]["attempt"] == build_b.attempt
    assert "submit" not in docs and "upload" not in docs
    assert batch_api["emu"].emulator.uploads == {}  # the stalled execution's upload: aborted


def test_a_claim_left_before_its_build_was_written_is_dropped(batch_api, caplog):
    """An execution died right after claiming the round (before writing its build.json): it
    never billed. The next execution aborts its upload, drops the claim, and bills once."""
    import logging

    from moonbatch.workers import layout
    from moonbatch.workers.storage import put_json

    state, client = batch_api["state"], batch_api["client"]
    dead = client.create_upload()
    client.upload_part(dead.file_id, dead.upload_id, 1, b'{"id": "x"}\n')
    put_json(state, layout.round_doc(0, 0, "submit"), {
        "file_id": dead.file_id, "upload_id": dead.upload_id, "lines": 4, "bytes": 12,
        "sent_at": time.time(), "attempt": "deadbeef0000"}, if_absent=True)
    t0 = time.time()
    with caplog.at_level(logging.WARNING, logger="moonbatch.workers.providers.moondream.upload"):
        built, batch = build(batch_api)
    created = batch_api["client"].find_batches(t0 - 5)
    docs = round_docs(state)
    assert "dropping the claim of attempt deadbeef0000" in caplog.text
    assert [b.id for b in created] == [batch.batch_id]
    assert docs["build"]["attempt"] == docs["batch"]["attempt"] == built.attempt
    assert dead.file_id not in batch_api["emu"].emulator.uploads
    assert "submit" not in docs


def test_a_claimant_whose_claim_was_dropped_never_writes_the_build(batch_api):
    """The claimant writes build.json only while the claim is its own: a stalled claimant
    whose claim another execution replaced cannot overwrite that execution's build."""
    from moonbatch.workers import layout
    from moonbatch.workers.models import ShardBuild
    from moonbatch.workers.providers.moondream.recovery import RoundClaimed, write_build
    from moonbatch.workers.storage import get_json, put_json

    state = batch_api["state"]

    def doc(name: str) -> str:
        return layout.round_doc(0, 0, name)

    put_json(state, doc("submit"), {"file_id": "f", "lines": 1, "bytes": 1, "sent_at": 1.0,
                                    "attempt": "new"}, if_absent=True)
    write_build(state, doc, ShardBuild(lines=[0, 1], attempt="new"))
    with pytest.raises(RoundClaimed):
        write_build(state, doc, ShardBuild(lines=[0], attempt="old"))
    assert get_json(state, doc("build"))["attempt"] == "new"


# -- fal: the ledger by compare-and-swap ---------------------------------------------------------
@pytest.fixture
def fal_run(s3, bucket, env, redis_server):
    """A fal run of 4 photos in one shard, planned onto a queue nobody consumes (its
    messages are removed afterwards), opened in this process."""
    from moonbatch.config import get_settings
    from moonbatch.workers.runstate import open_run
    from tests.conftest import BROKER_DB

    upload_photos(s3, bucket, "in/", names=NAMES)
    queue = "ledger-" + uuid.uuid4().hex[:8]
    qenv = {**env, "MOONBATCH_QUEUE": queue}
    run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--provider", "fal",
                      "--shard-size", "10"], qenv).stdout.strip().splitlines()[-1]
    yield open_run(f"s3://{bucket}/out/", get_settings(), run_id)
    redis_server.client(BROKER_DB).delete(queue, queue + "-control")


def drive(ctx, timeout: float = 90):
    """Step a fal round until every line is finished; return the last poll."""
    from moonbatch.workers.providers.fal import FalProvider

    deadline = time.time() + timeout
    while time.time() < deadline:
        poll = FalProvider().poll_round(ctx, None)
        if poll.done:
            return poll
        time.sleep(0.2)
    raise AssertionError(f"the fal round did not finish in {timeout:.0f}s")


def test_a_fal_step_that_loses_the_ledger_race_cancels_and_counts_its_sends(fal_run, emulator):
    """Another step records the round's ledger while this step runs (the simulated other step
    moved nothing): this step's record must not land. The requests it sent are cancelled and
    counted as possible duplicates, its lines file is removed, and the round still finishes
    with every line once."""
    from moonbatch.workers import layout
    from moonbatch.workers.providers.fal import FalProvider
    from moonbatch.workers.storage import get_json
    from moonbatch.workers.tasks import _context

    store = fal_run.output
    key = layout.round_doc(0, 0, "requests")
    raced = []

    def other_step_records() -> None:
        if not raced:
            raced.append(True)
            ledger = get_json(store, key)
            store.put(key, orjson.dumps({**ledger, "est": ledger["est"] + 0.5}))

    t0 = time.time()
    cancels = emulator.emulator.fal.calls.get("cancel", 0)
    FalProvider().submit_round(_context(fal_run, 0, 0, heartbeat=other_step_records))
    sent = [r for r in emulator.emulator.fal.requests.values() if r.submitted >= t0]
    cancels = emulator.emulator.fal.calls.get("cancel", 0) - cancels
    ledger = get_json(store, key)
    prefix = layout.round_prefix(0, 0)
    files = [o.key for o in store.iter_objects(prefix) if "/results-" in o.key]
    print(f"\nledger race: the losing step sent {len(sent)} request(s); possible_duplicates "
          f"{ledger['possible_duplicates']}; cancel calls {cancels} (cancelled before they "
          f"completed: {sum(r.cancelled is not None for r in sent)})")
    assert raced and len(sent) == len(NAMES)
    assert ledger["possible_duplicates"] == len(sent)
    assert ledger["cursor"] == 0 and ledger["inflight"] == {}  # the winner's record stands
    assert cancels == len(sent)  # each asked to stop (one already done answers so)
    assert files == []

    drive(_context(fal_run, 0, 0))
    results = FalProvider().collect_round(_context(fal_run, 0, 0))
    lines = [line["line_index"] for line in results.lines]
    assert sorted(lines) == list(range(len(NAMES)))  # every line once
    assert results.stats["possible_duplicate_requests"] == len(NAMES)


def test_merge_counts_malformed_and_foreign_lines_into_done_and_run_json(fal_run, s3, bucket):
    """(10) A round's result lines that are not usable (malformed: not an object, no valid
    line_index; id_mismatch: another id than the one sent) are counted in merged.json, summed
    into done.json and into run.json's counts."""
    from moonbatch.workers import layout
    from moonbatch.workers.providers.fal import FalProvider
    from moonbatch.workers.storage import get_json
    from moonbatch.workers.tasks import _context, merge_round_task

    store = fal_run.output
    FalProvider().submit_round(_context(fal_run, 0, 0))
    drive(_context(fal_run, 0, 0))
    prefix = layout.round_prefix(0, 0)
    first = sorted(o.key for o in store.iter_objects(prefix) if "/results-" in o.key)[0]
    lines = store.get(first).splitlines()
    tampered = orjson_line(lines[0], id="0123456789:someone-else.png")
    store.put(first, b"\n".join([tampered, *lines[1:], b'{"line_index": 9999, "status": "ok"}',
                                 b"[1, 2]", b'"text"']) + b"\n")
    merge_round_task(fal_run.spec.output, fal_run.spec.run_id, 0, 0)
    merged = get_json(store, layout.round_doc(0, 0, "merged"))
    done = get_json(store, layout.shard_doc(0, "done"))
    summary = wait_for_run(s3, bucket, "out/", timeout=60)
    print(f"\nmerge counts: merged.json malformed {merged['malformed']} id_mismatch "
          f"{merged['id_mismatch']}; run.json counts {summary['counts']}")
    assert (merged["malformed"], merged["id_mismatch"]) == (3, 1)
    assert (done["malformed_lines"], done["id_mismatch_lines"]) == (3, 1)
    counts = summary["counts"]
    assert (counts["malformed_lines"], counts["id_mismatch_lines"]) == (3, 1)
    assert counts["duplicate_lines"] == 0 and counts["missing_lines"] == 0
    assert counts["ok"] == len(NAMES)


def orjson_line(raw: bytes, **changes) -> bytes:
    return orjson.dumps({**orjson.loads(raw), **changes})


def test_a_first_build_reads_only_the_look_for_a_batch(batch_api):
    """A round's first build (nothing left by an earlier attempt) reads none of the round's
    documents but the look for a batch after claiming and its upload record before clearing
    it, and does not renew a lease renewed within a quarter of its life (the fences of
    ``renew(force=False)``): S3 requests are money and the state store's CPU."""
    from moonbatch.workers import layout
    from moonbatch.workers.lease import Lease, execution_owner
    from moonbatch.workers.storage import S3Store

    state = batch_api["state"]
    reads: list[str] = []
    swaps: list[str] = []

    class Counted(S3Store):  # the real bucket, with its reads and swaps noted
        def get(self, key, **kwargs):
            reads.append(key)
            return super().get(key, **kwargs)

        def get_versioned(self, key):
            reads.append(key)
            return super().get_versioned(key)

        def swap(self, key, data, version):
            swaps.append(key)
            return super().swap(key, data, version)

    counted = Counted(state.bucket, state.prefix, state.client)
    lease = Lease(counted, layout.shard_doc(0, "lease"), execution_owner("task"), 60.0)
    assert lease.acquire()
    built, batch = build({**batch_api, "state": counted},
                         renew=lambda: lease.renew(force=False))
    assert batch is not None and built.attempt == batch.attempt
    assert reads == [layout.round_doc(0, 0, "batch"), layout.round_doc(0, 0, "upload")], reads
    assert swaps == []  # no build.json to swap, the lease renewed at its acquisition
    docs = round_docs(state)
    assert docs["build"]["attempt"] == docs["batch"]["attempt"] == built.attempt
    assert "submit" not in docs and "upload" not in docs
    lease.release()
