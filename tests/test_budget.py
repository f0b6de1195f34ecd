"""Budgets and stops (``moonbatch.workers.stops``, README "Budget and stops") end to end, for every
provider: real photographs on moto's S3, the emulated Batch API, fal queue and real-time API over HTTP, a real
Celery worker serving ``/metrics``."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections import Counter

import pytest

from tests.conftest import Worker, free_port, read_json, read_results, run_cli, upload_photos
from tests.test_metrics import scrape, total, wait_for_metrics

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "horse.png")
PROVIDERS = {"moondream": [], "fal": ["--provider", "fal"],
             "moondream-realtime": ["--provider", "moondream-realtime"]}
STOPPED_EXIT = 5


@pytest.fixture(scope="module")
def metered(env, tmp_path_factory):
    """A worker with ``/metrics`` on a queue of this module: ``(env for commands, port)``."""
    port = free_port()
    queue = "t-budget-" + uuid.uuid4().hex[:8]
    # The emulated real-time API bills like Moondream Cloud (a Station would cost nothing).
    env = {**env, "MOONBATCH_REALTIME_BILLED": "1"}
    wenv = {**env, "MOONBATCH_METRICS_PORT": str(port)}
    wenv.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker = Worker(wenv, queue, tmp_path_factory.mktemp("budget") / "worker.log",
                    concurrency=2)
    with worker:
        wait_for_metrics(port, worker)
        yield {**env, "MOONBATCH_QUEUE": queue}, port


def _estimate(bucket: str, prefix: str, args: list[str], env: dict[str, str]) -> float:
    """The dry run's dollars for the dataset."""
    proc = run_cli(["run", f"s3://{bucket}/{prefix}", f"s3://{bucket}/dry/", "--dry-run",
                    "--json", *args], env)
    return json.loads(proc.stdout)["cost_usd"]


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_budget_stops_the_run_and_retry_with_more_completes_it(provider, s3, bucket, metered):
    env, port = metered
    upload_photos(s3, bucket, "in/", PHOTOS)
    args = ["--shard-size", "2", *PROVIDERS[provider]]
    estimate = _estimate(bucket, "in/", args, env)
    assert estimate > 0
    budget = round(estimate * 0.4, 6)
    proc = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "0",
                    "--timeout", "120", "--max-cost", str(budget), *args], env, check=False)
    assert proc.returncode == STOPPED_EXIT, proc.stderr
    assert "budget" in proc.stderr and "retry-failed" in proc.stderr

    summary = read_json(s3, bucket, "out/run.json")
    run_id = summary["run_id"]
    assert summary["status"] == "stopped"
    assert summary["stop_reason"]["code"] == "budget_exceeded"
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(PHOTOS)  # every item once
    codes = Counter(r["error"]["code"] for r in rows if r["status"] == "error")
    assert codes["budget_exceeded"] >= 1 and set(codes) == {"budget_exceeded"}
    spend = summary["spend"]
    assert spend["max_cost_usd"] == budget
    assert 0 <= spend["actual_usd"] <= budget and spend["in_flight_usd"] == 0
    # Nothing sent past the budget: what was sent was reserved at its estimate first.
    assert spend["estimated_usd"] <= budget
    status = run_cli(["status", run_id], env, check=False)
    assert status.returncode == STOPPED_EXIT
    assert "stopped" in status.stdout and "budget $" in status.stdout

    proc = run_cli(["retry-failed", run_id, "--max-cost", str(round(estimate * 3, 6))], env)
    assert "retry pass 1" in proc.stdout
    assert "completed" in run_cli(["wait", run_id, "--timeout", "120"], env).stdout
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["status"] == "completed" and summary["stop_reason"] is None
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(PHOTOS)  # exactly once each
    assert all(r["status"] == "ok" for r in rows), rows
    spend = summary["spend"]
    assert 0 < spend["actual_usd"] <= estimate * 3 and spend["in_flight_usd"] == 0
    assert spend["max_cost_usd"] == round(estimate * 3, 6)
    # The metric counts what the rounds' books settled (once per round).
    samples = scrape(port)
    assert total(samples, "moonbatch_cost_usd_total", provider=provider) >= \
        spend["actual_usd"] - 1e-6  # spend is rounded to 6 places


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_systematic_failure_stops_after_the_sample(provider, s3, bucket, metered, emulator):
    from moonbatch.emulator.fal import FalFaults
    from moonbatch.emulator.realtime import RealtimeFaults
    from moonbatch.emulator.server import Faults

    env, _ = metered
    upload_photos(s3, bucket, "in/", PHOTOS)
    if provider == "fal":
        emulator.config.fal.faults = FalFaults(rate_error=1.0)
    elif provider == "moondream-realtime":
        emulator.config.realtime = dataclasses.replace(
            emulator.config.realtime, faults=RealtimeFaults(rate_5xx=1.0))
    else:
        emulator.config.faults = Faults(line_error_rate=1.0)
    proc = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--workers", "0",
                    "--timeout", "120", "--shard-size", "2", "--max-error-rate", "0.5",
                    "--error-sample", "2", *PROVIDERS[provider]], env, check=False)
    assert proc.returncode == STOPPED_EXIT, proc.stderr
    code = "processing_error" if provider == "moondream" else "request_failed"
    summary = read_json(s3, bucket, "out/run.json")
    assert summary["status"] == "stopped"
    assert summary["stop_reason"]["code"] == "error_rate_exceeded"
    assert code in summary["stop_reason"]["reason"]
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(PHOTOS)
    codes = Counter(r["error"]["code"] for r in rows)
    assert codes["error_rate_exceeded"] >= 2  # not sent again after the sample
    assert set(codes) <= {code, "error_rate_exceeded"}

    # The cause fixed, a retry pass judges its own results (a fresh sample) and completes.
    emulator.config.fal.faults, emulator.config.faults = FalFaults(), Faults()
    emulator.config.realtime = dataclasses.replace(emulator.config.realtime,
                                                   faults=RealtimeFaults())
    run_id = summary["run_id"]
    run_cli(["retry-failed", run_id], env)
    assert "completed" in run_cli(["wait", run_id, "--timeout", "120"], env).stdout
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(PHOTOS)
    assert all(r["status"] == "ok" for r in rows), rows


# -- the books: atomic across workers, durable across an emptied broker -------------------------
def _books_run(tmp_path, broker):
    """A run at a local OUTPUT and its settings on the private ``broker``."""
    import time as _time

    from moonbatch.config import get_settings
    from moonbatch.workers.models import RunSpec, SkillOptions
    from moonbatch.workers.runstate import Run
    from moonbatch.workers.storage import open_store

    store = open_store(str(tmp_path / "out"))
    spec = RunSpec(run_id="books-" + uuid.uuid4().hex[:6], input=str(tmp_path / "in") + "/",
                   output=store.url, options=SkillOptions(skill="caption"), shard_size=10,
                   max_shard_bytes=10**9, created_at=_time.time(), max_cost=1.0)
    settings = get_settings().model_copy(update={"broker_url": broker.url(0)})
    return Run(spec, store, store, settings), settings


def test_reservations_never_pass_the_budget_across_threads(tmp_path, broker):
    import concurrent.futures as cf

    from moonbatch.workers import stops

    run, settings = _books_run(tmp_path, broker)

    def reserve(shard: int) -> int:
        return stops.Books(run, settings).reserve_many(shard, 0, [0.07] * 5, 1.0)

    with cf.ThreadPoolExecutor(8) as pool:
        granted = sum(pool.map(reserve, range(8)))
    assert granted == 14  # 14 x 0.07 = 0.98; a 15th would pass $1
    spend = stops.spend(run.output, 1.0)
    assert spend["in_flight_usd"] == pytest.approx(0.98) and spend["actual_usd"] == 0


def test_an_emptied_broker_remembers_spend_from_storage(tmp_path, broker):
    from moonbatch.workers import stops

    run, settings = _books_run(tmp_path, broker)
    books = stops.Books(run, settings)
    assert books.reserve("0:0", 0.5, 1.0, once=True)
    assert books.reserve("0:0", 0.5, 1.0, once=True)  # the same round: reserved once
    assert not books.reserve("1:0", 0.6, 1.0, once=True)  # 0.5 + 0.6 > 1
    now, results, errors, _ = books.settle(0, 0, 0.4, 3, {"processing_error": 1})
    assert (now, results, errors) == (True, 3, 1)
    assert books.settle(0, 0, 0.4, 3, {"processing_error": 1})[0] is False  # idempotent
    assert books.reserve("2:0", 0.3, 1.0, once=True)  # 0.4 spent + 0.3 in flight

    broker.restart_empty()
    books = stops.Books(run, settings)
    assert not books.reserve("3:0", 0.4, 1.0, once=True)  # 0.4 + 0.3 + 0.4 > 1: not forgotten
    assert books.reserve("3:0", 0.25, 1.0, once=True)
    assert books.codes() == {"processing_error": 1}
    spend = stops.spend(run.output, 1.0)
    assert spend == {"actual_usd": 0.4, "estimated_usd": 0.5, "in_flight_usd": 0.55,
                     "max_cost_usd": 1.0}


@pytest.mark.parametrize(("options", "words"), [
    ({"max_cost": -1.0}, "--max-cost -1.0: must be >= 0"),
    ({"max_error_rate": 1.5}, "--max-error-rate 1.5: must be within 0..1"),
    ({"error_sample": 5}, "--error-sample 5: must be >= 1 and goes with --max-error-rate"),
])
def test_stop_options_are_checked_in_one_line(tmp_path, options, words):
    import moonbatch

    (tmp_path / "in").mkdir()
    with pytest.raises(moonbatch.InvalidOption) as caught:
        moonbatch.dry_run(str(tmp_path / "in"), str(tmp_path / "out"), **options)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_stop_is_recorded_in_the_spec_and_the_default_sample(tmp_path):
    from moonbatch.config import get_settings
    from moonbatch.producer.submit import DEFAULT_ERROR_SAMPLE, new_spec

    (tmp_path / "in").mkdir()
    spec = new_spec(str(tmp_path / "in"), str(tmp_path / "out"), get_settings(),
                    max_cost=2.5, max_error_rate=0.2)
    assert (spec.max_cost, spec.max_error_rate, spec.error_sample) == \
        (2.5, 0.2, DEFAULT_ERROR_SAMPLE)
