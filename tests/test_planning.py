"""Issue 16 (8): planning never stalls on one key, and no shard is enqueued before the plan that
holds it is durable.

A local file whose name is not valid UTF-8 used to stop planning with ``UnicodeEncodeError``
after earlier shards were enqueued (and billed), with no ``plan.json``, and every rerun stopped
at the same key. Now such a name, and any other key a reader cannot examine (an extension-less
object whose first bytes cannot be read), is a skipped key with its reason, and a planning that
fails part-way (a reader error mid-listing) leaves no message on the broker and is taken over by
the same command once INPUT is fixed. Everything over real servers: local directories, moto's
S3 server (behind a real HTTP proxy where a read must fail), a private redis-server as broker,
``moonbatch`` processes, Celery workers and the emulator.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

from moonbatch.workers import layout
from tests.conftest import (
    Worker,
    private_env,
    read_json,
    read_results,
    run_cli,
    tiny_jpeg,
    upload_photos,
    wait_for_completion,
)
from tests.test_preflight_cas import S3Proxy

BAD = b"bad\xff\xfename.jpg"  # Latin-1 bytes: not valid UTF-8
BAD_SHOWN = "bad\\xff\\xfename.jpg"


def local_input(root: Path) -> dict[str, bytes]:
    """A local INPUT: two images, the non-UTF-8 name, three more (listing order: a*, bad*, c*),
    so that with --shard-size 1 shards were planned, and enqueued, before the bad name."""
    root.mkdir(parents=True)
    images = {}
    for i, name in enumerate(("a0.jpg", "a1.jpg", "c0.jpg", "c1.jpg", "c2.jpg")):
        images[name] = tiny_jpeg(i)
        (root / name).write_bytes(images[name])
    fd = os.open(os.path.join(os.fsencode(root), BAD), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, tiny_jpeg(99))
    os.close(fd)
    return images


def queue_messages(broker, queue: str) -> list[str]:
    """The tasks of the Celery messages waiting on ``queue`` and its control queue (builds on
    the first, finalising on the second), oldest first."""
    out = []
    for name in (queue, f"{queue}-control"):
        out += [json.loads(raw)["headers"]["task"]
                for raw in reversed(broker.client().lrange(name, 0, -1))]
    return out


def skipped_records(output: Path) -> list[dict]:
    records = []
    for part in sorted((output / layout.SKIPPED).glob("part-*.jsonl")):
        records += [json.loads(line) for line in part.read_bytes().splitlines() if line.strip()]
    return records


def test_a_non_utf8_name_is_a_skipped_key_and_nothing_is_enqueued_before_the_plan(
        tmp_path, env, broker):
    images = local_input(tmp_path / "in")
    out = tmp_path / "out"
    penv = private_env(env, broker)
    args = ["submit", str(tmp_path / "in"), str(out), "--shard-size", "1"]

    dry = run_cli([*args, "--dry-run", "--json"], penv, check=False)
    print(f"\ndry run: exit {dry.returncode}: {dry.stderr.strip()[-300:]}")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert (report["items"], report["skipped"], report["shards"]) == (5, 1, 5)

    proc = run_cli(args, penv, check=False)
    messages = queue_messages(broker, penv["MOONBATCH_QUEUE"])
    print(f"submit: exit {proc.returncode}: {proc.stderr.strip()[-300:]}; queued {len(messages)}")
    assert proc.returncode == 0, proc.stderr
    assert "5 images in 5 shard(s); 1 other objects skipped" in proc.stderr
    plan = json.loads((out / layout.PLAN).read_bytes())
    assert (plan["items"], plan["shards"], plan["skipped"], plan["listed"]) == (5, 5, 1, 6)
    assert plan["skipped_reasons"] == {"name_not_utf8": 1}
    (record,) = skipped_records(out)
    assert record["key"] == BAD_SHOWN and record["reason"] == "name_not_utf8", record
    # Every shard's plan file and plan.json before the first message; then every shard once.
    assert messages == ["moonbatch.build_shard"] * 5  # the last merge finalises: no finalize_run
    planned = [json.loads(line)["id"] for i in range(5)
               for line in (out / layout.plan_items(i)).read_bytes().splitlines()]
    assert planned == sorted(images)

    listed = run_cli(["status", str(out), "--skipped"], penv)
    print(f"status --skipped: {listed.stdout.strip()!r} / {listed.stderr.strip()!r}")
    assert listed.stdout.splitlines() == [f"{BAD_SHOWN}\tname_not_utf8"]


def test_a_run_with_a_non_utf8_name_completes_with_a_worker(tmp_path, env, broker):
    images = local_input(tmp_path / "in")
    out = tmp_path / "out"
    penv = private_env(env, broker)
    args = ["run", str(tmp_path / "in"), str(out), "--shard-size", "2", "--workers", "0",
            "--timeout", "240"]
    with Worker(penv, penv["MOONBATCH_QUEUE"], tmp_path / "worker.log"):
        proc = run_cli(args, penv, check=False, timeout=300)
        print(f"\nrun: exit {proc.returncode}: {proc.stdout.strip()[-200:]}")
        assert proc.returncode == 0, proc.stderr + proc.stdout
        summary = json.loads((out / "run.json").read_bytes())
        assert summary["status"] == "completed"
        rows = [json.loads(line) for p in sorted((out / "results").glob("*.jsonl"))
                for line in p.read_bytes().splitlines()]
        assert sorted(r["id"] for r in rows) == sorted(images)
        assert all(r["status"] == "ok" for r in rows), rows
        again = run_cli(args, penv, check=False)  # the rerun no longer stops at the same key
        assert again.returncode == 0 and "already complete" in again.stderr, again.stderr


def tar_of(samples: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, data in samples.items():
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size, info.mtime = len(data), 1700000000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_reader_error_mid_listing_enqueues_nothing_and_the_rerun_takes_over(
        tmp_path, env, broker):
    """Two WebDataset shards whose second repeats a ``__key__`` of the first: the reader's
    ``InputError`` comes after shards of the first tar were planned. Nothing may be on the
    queue; fixed, the same command takes the dead start over and a worker completes it."""
    root = tmp_path / "in"
    root.mkdir()
    first = {f"s{i:03d}": tiny_jpeg(i) for i in range(4)}
    (root / "00000.tar").write_bytes(tar_of(first))
    (root / "00001.tar").write_bytes(tar_of({"s005": tiny_jpeg(5), "s001": tiny_jpeg(6)}))
    out = tmp_path / "out"
    penv = private_env(env, broker)
    args = ["submit", str(root), str(out), "--input-format", "webdataset", "--shard-size", "1"]

    proc = run_cli(args, penv, check=False)
    messages = queue_messages(broker, penv["MOONBATCH_QUEUE"])
    print(f"\nduplicate key mid-listing: exit {proc.returncode}: {proc.stderr.strip()}; "
          f"queued {messages}")
    assert proc.returncode != 0
    assert "sample key 's001' appears twice" in proc.stderr
    assert messages == []  # nothing enqueued: no shard runs, nothing is billed
    assert not (out / layout.PLAN).exists()
    assert (out / layout.plan_items(3)).exists()  # shards were planned before the error

    (root / "00001.tar").write_bytes(tar_of({"s005": tiny_jpeg(5), "s006": tiny_jpeg(6)}))
    again = run_cli(args, penv, check=False)
    print(f"fixed, same command: exit {again.returncode}: {again.stderr.strip()}")
    assert again.returncode == 0, again.stderr
    assert "6 images in 6 shard(s)" in again.stderr
    spec = json.loads((out / layout.SPEC).read_bytes())
    assert spec["run_id"] == again.stdout.strip().splitlines()[-1]  # the dead start's run id
    assert queue_messages(broker, penv["MOONBATCH_QUEUE"]) == \
        ["moonbatch.build_shard"] * 6
    with Worker(penv, penv["MOONBATCH_QUEUE"], tmp_path / "worker.log"):
        deadline = time.time() + 240
        while time.time() < deadline:
            summary = json.loads((out / "run.json").read_bytes())
            if summary.get("status") == "completed" and "counts" in summary:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(run_cli(["status", str(out)], penv, check=False).stdout)
    assert summary["counts"]["ok"] == 6


def test_only_an_empty_plan_enqueues_finalize_run(tmp_path, env, broker):
    """A plan with shards enqueues its builds alone (the last shard's merge finalises the run);
    an empty plan (``--allow-empty``), which no merge will finalise, enqueues one
    ``finalize_run``, and a worker finalises it."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a0.jpg").write_bytes(tiny_jpeg(0))
    (tmp_path / "empty").mkdir()
    penv = private_env(env, broker)
    run_cli(["submit", str(tmp_path / "in"), str(tmp_path / "out")], penv)
    assert queue_messages(broker, penv["MOONBATCH_QUEUE"]) == ["moonbatch.build_shard"]
    broker.client().delete(penv["MOONBATCH_QUEUE"])

    out = tmp_path / "empty-out"
    run_cli(["submit", str(tmp_path / "empty"), str(out), "--allow-empty"], penv)
    assert queue_messages(broker, penv["MOONBATCH_QUEUE"]) == ["moonbatch.finalize_run"]
    assert json.loads((out / layout.PLAN).read_bytes())["shards"] == 0
    with Worker(penv, penv["MOONBATCH_QUEUE"], tmp_path / "worker.log"):
        deadline = time.time() + 120
        while time.time() < deadline and not (out / layout.FINALIZED).exists():
            time.sleep(0.3)
    assert json.loads((out / "run.json").read_bytes())["status"] == "completed"


def test_planning_opens_the_runs_spend_books_empty(tmp_path, env, broker):
    """The run's books (``stops.Books``, a hash on the broker) are loaded, empty, when it is
    planned: its first builds find them ready instead of each listing the run's state; a
    broker hash already loaded is left as it is."""
    from moonbatch.workers import stops

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a0.jpg").write_bytes(tiny_jpeg(0))
    penv = private_env(env, broker)
    proc = run_cli(["submit", str(tmp_path / "in"), str(tmp_path / "out")], penv)
    run_id = proc.stdout.strip().splitlines()[-1]
    books = {k.decode(): v.decode()
             for k, v in broker.client().hgetall(stops.PREFIX + run_id).items()}
    assert books == {"init": "1", "actual": "0.0", "reserved": "0.0", "results": "0",
                     "errors": "0"}, books
    assert 0 < broker.client().ttl(stops.PREFIX + run_id) <= stops.TTL_SECONDS


def test_an_unreadable_extensionless_object_is_a_skipped_key(s3, bucket, env, broker,
                                                              s3_endpoint, tmp_path):
    """On S3, behind a real proxy that answers 403 to reads of one extension-less object:
    the prefix reader cannot tell its type, so it is skipped with the reason; the plan goes
    on (on main the planning stopped there, after two shards were enqueued)."""
    upload_photos(s3, bucket, "in/", names=("coffee.png", "rocket.jpg"))
    s3.put_object(Bucket=bucket, Key="in/zz-no-extension", Body=tiny_jpeg(1))
    with S3Proxy(s3_endpoint, "deny-get:zz-no-extension") as proxy:
        penv = private_env(env, broker, MOONBATCH_S3_ENDPOINT_URL=proxy.url,
                           MOONBATCH_STATE_URL=str(tmp_path / "state"))
        proc = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/",
                        "--shard-size", "1"], penv, check=False)
    messages = queue_messages(broker, penv["MOONBATCH_QUEUE"])
    print(f"\nunreadable extension-less object: exit {proc.returncode}: "
          f"{proc.stderr.strip()[-300:]}; queued {len(messages)}")
    assert proc.returncode == 0, proc.stderr
    plan = read_json(s3, bucket, "out/" + layout.PLAN)
    assert (plan["items"], plan["skipped"]) == (2, 1)
    assert plan["skipped_reasons"] == {"unreadable": 1}
    part = s3.get_object(Bucket=bucket, Key="out/" + layout.skipped_part(0))["Body"].read()
    (record,) = [json.loads(line) for line in part.splitlines()]
    assert record["key"] == "zz-no-extension" and record["reason"] == "unreadable"
    assert "AccessDenied" in record["detail"], record
    assert messages == ["moonbatch.build_shard"] * 2


def test_odd_s3_keys_plan_and_run(s3, bucket, env, fleet):
    """Keys with characters that mean something in URLs, JSON, paths or shells, non-ASCII
    text and a long name: each is an item and a row, nothing stops the plan (a guard: S3 keys
    are UTF-8, so these plan on main too; moto refuses a newline in a key)."""
    odd = ["in/a#b?c=d&e.jpg", "in/100%.jpg", "in/tab\tand \"quote\".jpg", "in/ünïcødé/日本.jpg",
           "in/" + "x" * 900 + ".jpg", "in/a//b.jpg", "in/../up.jpg", "in/./dot.jpg"]
    for i, key in enumerate(odd):
        s3.put_object(Bucket=bucket, Key=key, Body=tiny_jpeg(i))
    run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--shard-size", "3"], env)
    wait_for_completion(s3, bucket, "out/", env, timeout=240)
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(k[3:] for k in odd)
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]


def test_listing_a_local_folder_survives_odd_entries(tmp_path):
    """On a real directory: names that are not valid UTF-8 (an image's, skipped with its
    reason; a non-image's, skipped as such, shown escaped) and link loops (left out like a
    dangling link); the images are planned. On main the listing raised at the loop (ELOOP)
    and the planner at the name (UnicodeEncodeError)."""
    from moonbatch.producer.runs import PlanStats, _plannable, printable
    from moonbatch.workers.readers.prefix import iter_items
    from moonbatch.workers.storage import LocalStore

    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jpg").write_bytes(tiny_jpeg(1))
    (root / "loop.jpg").symlink_to("loop.jpg")
    (root / "noext-loop").symlink_to("noext-loop")
    for name in (b"bad\xff.jpg", b"notes\xff.txt"):
        fd = os.open(os.path.join(os.fsencode(root), name), os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, tiny_jpeg(2))
        os.close(fd)
    seen: list[tuple] = []
    stats = PlanStats(on_skip=lambda key, reason, detail: seen.append((key, reason)))
    items = list(_plannable(iter_items(LocalStore(root), stats), stats))
    assert [i.id for i in items] == ["a.jpg"]
    assert stats.items == 1 and stats.skipped == 2
    assert sorted((printable(k), r) for k, r in seen) == [("bad\\xff.jpg", "name_not_utf8"),
                                                           ("notes\\xff.txt", None)]
    assert stats.reasons == {"name_not_utf8": 1}


def test_an_id_json_cannot_hold_is_a_skipped_key():
    """A manifest id beyond 64 bits (JSONL parses it; orjson cannot write it): skipped with
    ``not_serializable``, the other items planned."""
    from moonbatch.producer.runs import PlanStats, _plannable
    from moonbatch.workers.models import PlanItem

    stats = PlanStats(items=3)
    items = [PlanItem(id=1, size=10), PlanItem(id=2 ** 70, size=10), PlanItem(id="x", size=10)]
    kept = list(_plannable(iter(items), stats))
    assert [i.id for i in kept] == [1, "x"]
    assert stats.items == 2 and stats.reasons == {"not_serializable": 1}
    assert stats.skipped_examples == [str(2 ** 70)]


def test_a_producer_that_died_while_enqueueing_is_made_good_by_the_reconciler(
        tmp_path, env, broker):
    """plan.json written, the producer gone before it enqueued every shard (no ``enqueued``
    marker, no planning lease): the reconciler's stale-work pass, which otherwise takes a
    shard with no lease for a queued one, enqueues every shard's build, once."""
    import subprocess
    import sys

    local_input(tmp_path / "in")
    out = tmp_path / "out"
    penv = private_env(env, broker)
    submitted = run_cli(["submit", str(tmp_path / "in"), str(out), "--shard-size", "2"], penv)
    run_id = submitted.stdout.strip().splitlines()[-1]
    assert (out / layout.ENQUEUED).exists()
    # What a producer killed between plan.json and its last enqueue leaves: no marker, and
    # (here: none of) the shards' messages on the queue.
    (out / layout.ENQUEUED).unlink()
    broker.client().delete(penv["MOONBATCH_QUEUE"], penv["MOONBATCH_QUEUE"] + "-control")
    shards = read_json_file(out / layout.PLAN)["shards"]

    def reconcile() -> dict:
        code = ("import json, sys; from moonbatch.workers.reconcile import reconcile_run; "
                "print(json.dumps(reconcile_run(sys.argv[1], sys.argv[2], full=False)))")
        proc = subprocess.run([sys.executable, "-c", code, str(out), run_id], env=penv,
                              capture_output=True, text=True, timeout=120, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = reconcile()
    print(f"\nfirst pass: {first}; queued: {queue_messages(broker, penv['MOONBATCH_QUEUE'])}")
    assert first == {"build": shards}
    assert queue_messages(broker, penv["MOONBATCH_QUEUE"]).count("moonbatch.build_shard") == shards
    assert (out / layout.ENQUEUED).exists()
    assert reconcile() == {}  # announced now: the stale pass leaves queued shards alone


def read_json_file(path: Path) -> dict:
    return json.loads(path.read_bytes())


def test_a_run_the_state_store_cannot_record_plans_nothing_and_enqueues_nothing(
        tmp_path, broker):
    """The run's records (its summary, the registry) are written while INPUT is listed; one
    that fails fails the start before plan.json and before any message, its lease released."""
    import pytest

    from moonbatch.config import Settings
    from moonbatch.producer import runs
    from moonbatch.workers.models import SkillOptions

    local_input(tmp_path / "in")
    (tmp_path / "state").write_text("a file, not a directory: no registry can be written here")
    queue = "t-" + os.urandom(4).hex()
    settings = Settings(broker_url=broker.url(0), result_backend=broker.url(1), queue=queue,
                        state_url=str(tmp_path / "state" / "registry"))
    out = tmp_path / "out"
    spec = runs.new_spec(str(tmp_path / "in"), str(out), SkillOptions(skill="caption"),
                         settings, shard_size=1)
    with pytest.raises(Exception) as raised:
        runs.start_run(spec, settings)
    print(f"\nstart: {type(raised.value).__name__}: {raised.value}")
    assert not (out / layout.PLAN).exists()
    assert not (out / layout.PLANNING).exists()  # the planning lease was released
    assert queue_messages(broker, queue) == []
