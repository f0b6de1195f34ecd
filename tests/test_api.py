"""The Python API end to end, for both providers: ``moonbatch.submit`` to the session's fleet,
``moonbatch.run`` with its own local workers, ``Run.status/wait/results/cancel/retry_failed``,
``open_run``, ``dry_run``, and one typed exception per failure kind.

Over real connections, as everywhere: moto's S3 server, the session's Redis, the emulated
Batch API and fal queue over HTTP, real Celery workers. Called in this process: settings come
from the environment the ``env`` fixture applies.
"""

from __future__ import annotations

import sys
import uuid

import pytest

import moonbatch
from tests.conftest import photos_dir, upload_photos

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png")
BROKEN_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture
def own_queue(env, monkeypatch):
    """A broker queue of the test's own that no worker consumes: submitted work waits there."""
    from moonbatch.config import reload_settings
    from moonbatch.workers.app import reconfigure

    monkeypatch.setenv("MOONBATCH_QUEUE", "api-" + uuid.uuid4().hex[:8])
    reconfigure(reload_settings())
    yield
    monkeypatch.undo()
    reconfigure(reload_settings())


def test_import_is_cheap():
    import subprocess

    code = ("import sys, moonbatch; assert moonbatch.Run and moonbatch.MoonbatchError; "
            "print(sorted(m for m in sys.modules if m.startswith(('celery', 'boto3', 'moonbatch.workers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("provider,fmt", [("moondream", "jsonl"), ("fal", "parquet")])
def test_submit_status_wait_results_retry(provider, fmt, s3, bucket, env, fleet):
    upload_photos(s3, bucket, "in/", PHOTOS)
    s3.put_object(Bucket=bucket, Key="in/notes.jpg", Body=b"a text file with an image name\n")
    run = moonbatch.submit(f"s3://{bucket}/in/", f"s3://{bucket}/out", skill="caption",
                           provider=provider, shard_size=2, format=fmt, length="short")
    assert run.output == f"s3://{bucket}/out/" and run.plan["items"] == 4
    assert moonbatch.open_run().id == run.id  # the newest run in the registry
    assert moonbatch.open_run(run.output).id == run.id
    status = run.status()
    assert status["run_id"] == run.id and status["status"] in ("running", "completed")
    seen: list[str] = []
    final = run.wait(timeout=90, on_progress=lambda s: seen.append(s["status"]))
    assert final["status"] == "completed" and seen[-1] == "completed"
    assert (final["counts"]["ok"], final["counts"]["error"]) == (3, 1)
    assert final["provider"] == provider

    rows = {r["id"]: r for r in moonbatch.open_run(run.id).results()}
    assert sorted(rows) == sorted([*PHOTOS, "notes.jpg"])
    assert rows["notes.jpg"]["status"] == "error"
    assert rows["notes.jpg"]["error"]["code"] == "not_an_image"
    assert all(rows[p]["status"] == "ok" for p in PHOTOS)

    assert run.retry_failed(["read_failed"])["action"] == "nothing"
    s3.put_object(Bucket=bucket, Key="in/notes.jpg", Body=(photos_dir() / "coins.png").read_bytes())
    assert run.retry_failed(["not_an_image"], dry_run=True)["action"] == "would_retry"
    done = run.retry_failed(["not_an_image"])
    assert (done["action"], done["items"], done["chosen"]) == ("started", 1, {"not_an_image": 1})
    assert run.wait(timeout=90)["counts"]["ok"] == 4
    assert all(r["status"] == "ok" for r in run.results())

    again = moonbatch.submit(f"s3://{bucket}/in/", f"s3://{bucket}/out/", provider=provider,
                             shard_size=2, format=fmt, length="short")
    assert again.id == run.id and again.plan is None  # complete: the same run, nothing done


@pytest.mark.parametrize("provider", ["moondream", "fal"])
def test_cancel_timeout_and_conflict(provider, s3, bucket, env, own_queue):
    upload_photos(s3, bucket, "in/", PHOTOS[:2])
    run = moonbatch.submit(f"s3://{bucket}/in/", f"s3://{bucket}/out/", provider=provider)
    with pytest.raises(moonbatch.Timeout) as timeout:  # nobody consumes its queue
        run.wait(timeout=0.5)
    assert timeout.value.run_id == run.id and timeout.value.exit_code == 4
    assert run.status()["status"] == "running"

    with pytest.raises(moonbatch.OutputConflict) as conflict:
        moonbatch.submit(f"s3://{bucket}/in/", f"s3://{bucket}/out/", provider=provider,
                         skill="query", question="Is it a cat?")
    assert conflict.value.run_id == run.id and conflict.value.state == "running"
    assert "another command" in str(conflict.value) and conflict.value.exit_code == 3

    cancelled = run.cancel()
    assert cancelled["run_id"] == run.id and cancelled["provider"] == provider
    assert run.status()["status"] == "cancelled"
    with pytest.raises(moonbatch.RunFailed) as failed:
        run.wait(timeout=10)
    assert failed.value.status == "cancelled" and failed.value.exit_code == 1
    with pytest.raises(moonbatch.MoonbatchError, match="was cancelled"):
        run.retry_failed()


def test_run_with_local_workers_then_retry(s3, bucket, env, own_queue):
    upload_photos(s3, bucket, "in/", PHOTOS[:2])
    s3.put_object(Bucket=bucket, Key="in/broken.png", Body=BROKEN_PNG)
    seen: list[dict] = []
    run = moonbatch.run(f"s3://{bucket}/in/", f"s3://{bucket}/out/", provider="fal",
                        workers=1, timeout=120, on_progress=seen.append)
    snap = run.status()
    assert snap["status"] == "completed" and seen and run.plan["items"] == 3
    assert (snap["counts"]["ok"], snap["counts"]["error"]) == (2, 1)
    # Its workers were this call's own and have stopped: nobody would do a retry's work.
    with pytest.raises(moonbatch.NoConsumer) as refused:
        run.retry_failed()
    assert f"moonbatch retry-failed {run.id} --workers N" in str(refused.value)
    assert refused.value.exit_code == 3
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="out/_moonbatch/retries/")
    assert listed["KeyCount"] == 0 and run.status()["status"] == "completed"  # nothing changed
    done = run.retry_failed(workers=1, timeout=120)
    assert done["action"] == "started" and done["final"]["status"] == "completed"
    assert [r["error"]["code"] for r in run.results() if r["status"] == "error"] == \
        ["image_decode_failed"]


def test_dry_run_returns_the_estimate(tmp_path, env):
    src = tmp_path / "in"
    src.mkdir()
    for name in PHOTOS:
        (src / name).write_bytes((photos_dir() / name).read_bytes())
    report = moonbatch.dry_run(str(src), str(tmp_path / "out"), provider="fal", shard_size=2)
    assert (report["items"], report["shards"], report["provider"]) == (3, 2, "fal")
    assert report["cost_usd"] > 0
    assert not (tmp_path / "out").exists()


def test_typed_errors(s3, bucket, env, tmp_path):
    src = f"s3://{bucket}/in/"
    with pytest.raises(moonbatch.InvalidOption) as bad:
        moonbatch.submit(src, str(tmp_path / "o"), format="csv")
    assert str(bad.value) == "--format csv: not a choice: choose one of jsonl, parquet"
    assert (bad.value.option, bad.value.value, bad.value.exit_code) == ("--format", "csv", 2)
    with pytest.raises(moonbatch.InvalidOption, match="^--skill captoin: not a choice: choose "
                       "one of caption, query, detect, point, segment$"):
        moonbatch.dry_run(src, str(tmp_path / "o"), skill="captoin")
    with pytest.raises(moonbatch.InvalidOption, match=r"^--temperature 3\.0: must be <= 2\.0$"):
        moonbatch.dry_run(src, str(tmp_path / "o"), temperature=3.0)
    with pytest.raises(moonbatch.InvalidOption, match="unknown option 'colour'"):
        moonbatch.dry_run(src, str(tmp_path / "o"), colour="red")
    with pytest.raises(moonbatch.PreflightError) as preflight:  # INPUT holds nothing
        moonbatch.submit(src, f"s3://{bucket}/out/")
    assert any(p.startswith("INPUT") for p in preflight.value.problems), preflight.value.problems
    assert preflight.value.exit_code == 3
    assert not list(s3.list_objects_v2(Bucket=bucket).get("Contents", []))  # nothing written
    with pytest.raises(moonbatch.RunNotFound):
        moonbatch.open_run("20990101-000000-abcdef")
    with pytest.raises(moonbatch.RunNotFound):
        moonbatch.open_run(f"s3://{bucket}/nothing/")
