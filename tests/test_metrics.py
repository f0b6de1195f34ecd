"""Prometheus metrics (workers.metrics, README "Metrics"): the Grafana dashboard asks only for
metrics the workers export, and a real worker with ``MOONBATCH_METRICS_PORT`` serves counts
that match the runs it did, for both providers, with no secret or URL in any label."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from tests.conftest import Worker, free_port, read_json, run_cli, upload_photos

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "moonbatch.json"
SUFFIXES = ("_bucket", "_sum", "_count")
# PromQL words that are not metric names (functions, aggregations, keywords).
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "rate", "irate", "increase", "delta", "idelta",
    "deriv", "histogram_quantile", "time", "vector", "scalar", "abs", "clamp_min", "clamp_max",
    "label_replace", "label_join", "sort", "sort_desc", "max_over_time", "min_over_time",
    "avg_over_time", "sum_over_time", "last_over_time", "absent", "timestamp", "round", "ceil",
    "floor", "inf", "nan",
}


def dashboard_exprs() -> list[str]:
    """Every ``expr`` of the dashboard (panels, nested rows, any depth)."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: label matchers, strings, grouping clauses,
    durations, functions and keywords removed; ``_bucket``/``_sum``/``_count`` stripped."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end():].lstrip()
        if word.lower() in PROMQL_WORDS or rest.startswith("("):
            continue
        for suffix in SUFFIXES:
            if word.endswith(suffix):
                word = word[: -len(suffix)]
                break
        names.add(word)
    return names


def dashboard_metrics() -> set[str]:
    return set().union(*(metric_names(e) for e in dashboard_exprs()))


def test_metric_names_of_promql():
    assert metric_names('histogram_quantile(0.95, sum by (le, endpoint) (rate('
                        'moonbatch_api_request_seconds_bucket{provider=~"$p"}[$__rate_interval])))'
                        ) == {"moonbatch_api_request_seconds"}
    assert metric_names('max by (run) (a_total{run=~"x"}) / max by (run) (b > 0)') == {"a_total", "b"}


def test_dashboard_reads_only_metrics_the_workers_export():
    from moonbatch.workers.metrics import METRICS, registered_names

    exprs = dashboard_exprs()
    assert len(exprs) >= 11
    used = dashboard_metrics()
    exported = registered_names()
    assert exported == set(METRICS)
    assert used, "no metric found in the dashboard"
    assert used <= exported, f"the dashboard reads metrics nobody exports: {used - exported}"
    assert exported <= used, f"metrics without a panel: {exported - used}"
    # Panels the operators asked for.
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    for title in ("Items/s by status", "Error rows by code", "API latency p50 / p95 by action",
                  "API errors/s by status", "Retries/s by reason", "Upload bytes/s", "Tokens/s",
                  "Run progress", "Oldest unmerged batch age"):
        assert title in titles


def test_endpoint_labels_are_a_closed_set():
    """Each provider's client actions map onto its own closed table of labels."""
    from moonbatch.workers.metrics import endpoint_label
    from moonbatch.workers.providers import get_provider

    batch_api, fal = get_provider("moondream").metric_actions, get_provider("fal").metric_actions
    assert endpoint_label("mpu-uploadpart (part 12)", batch_api) == "mpu-uploadpart"
    assert endpoint_label("batch status", batch_api) == "batch-status"
    assert endpoint_label("download of output 3", batch_api) == "download"
    assert endpoint_label("file download", fal) == "download"
    assert endpoint_label("status", fal) == "status"
    assert endpoint_label("status", batch_api) == "other"  # not one of the Batch API's actions
    for actions in (batch_api, fal):
        assert endpoint_label("https://example.com/x?signature=1", actions) == "other"


def test_metrics_are_off_and_import_nothing_without_the_port():
    """Importing the instrumented modules starts nothing and, with no port, records nothing."""
    code = ("import sys, os; os.environ.pop('MOONBATCH_METRICS_PORT', None); "
            "os.environ['PROMETHEUS_MULTIPROC_DIR'] = sys.argv[1]; "
            "import moonbatch.workers.metrics as m, moonbatch.workers.providers.fal, "
            "moonbatch.workers.providers.moondream; "
            "m.upload_bytes('fal', 10); m.batch('moondream', 'submitted'); "
            "print(m.enabled(), 'prometheus_client' in sys.modules, 'celery' in sys.modules)")
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True,
                             check=True, env={k: v for k, v in os.environ.items()
                                              if k != "MOONBATCH_METRICS_PORT"})
        assert out.stdout.split() == ["False", "False", "False"]
        assert os.listdir(d) == []


def test_final_runs_leave_the_scrape_after_the_grace_period(tmp_path):
    """Per-run series stay while a run is final for less than FINAL_RUN_SERIES_SECONDS, then
    the serving collector leaves them out; other runs' series stay."""
    code = """
import os, sys, time
os.environ['PROMETHEUS_MULTIPROC_DIR'] = sys.argv[1]
os.environ['MOONBATCH_METRICS_PORT'] = '1'
import moonbatch.workers.metrics as m
from prometheus_client import CollectorRegistry, generate_latest
gauges = m._metrics()
for run in ('20260101-000000-aaaaaa', '20260101-000000-bbbbbb'):
    gauges['moonbatch_run_items_total'].labels(run).set(5)
    gauges['moonbatch_run_items_done'].labels(run).set(5)
    gauges['moonbatch_run_oldest_batch_age_seconds'].labels(run).set(7)
m.run_final('20260101-000000-aaaaaa')
reg = CollectorRegistry(); reg.register(m.MergedCollector(sys.argv[1]))
before = generate_latest(reg).decode()
marker = os.path.join(sys.argv[1], m.FINAL_DIR, '20260101-000000-aaaaaa')
old = time.time() - m.FINAL_RUN_SERIES_SECONDS - 1
os.utime(marker, (old, old))
after = generate_latest(reg).decode()
print(before.count('aaaaaa'), after.count('aaaaaa'), after.count('bbbbbb'))
print([l for l in before.splitlines() if 'age' in l and 'aaaaaa' in l])
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    counts, ages = out.stdout.splitlines()
    assert counts.split() == ["3", "0", "3"]
    assert "} 0.0" in ages  # a final run has nothing at the provider


# -- a live worker --------------------------------------------------------------------------------
def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` of the worker: sample name → [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def wait_for_metrics(port: int, worker: Worker, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert worker.proc.poll() is None, worker.log_path.read_text()[-3000:]
        try:
            scrape(port)
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the worker never served /metrics:\n" + worker.log_path.read_text()[-3000:])


def metrics_dirs(pid: int) -> set[str]:
    """The private metrics directories of the worker whose main process is ``pid`` (other
    test sessions on the machine make their own)."""
    return {p for p in os.listdir(tempfile.gettempdir())
            if p.startswith(f"moonbatch-metrics-{pid}-")}


def test_live_worker_serves_metrics_of_both_providers(s3, bucket, env, emulator, tmp_path):
    from moonbatch.emulator.server import Faults

    port = free_port()
    queue = "t-metrics-" + uuid.uuid4().hex[:8]
    wenv = {**env, "MOONBATCH_METRICS_PORT": str(port)}
    wenv.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cenv = {**env, "MOONBATCH_QUEUE": queue}
    names = ("coffee.png", "rocket.jpg", "chelsea.png", "astronaut.png")
    upload_photos(s3, bucket, "p/", names=names)
    # Some 429s (with a short Retry-After): HTTP retries and API error statuses to count.
    emulator.config.faults = Faults(seed=7, rate_429=0.2, retry_after=0.05)
    worker = Worker(wenv, queue, tmp_path / "worker.log", concurrency=2)
    with worker:
        wait_for_metrics(port, worker)
        pid = worker.proc.pid
        assert metrics_dirs(pid), "no private PROMETHEUS_MULTIPROC_DIR was made"
        run_cli(["run", f"s3://{bucket}/p/", f"s3://{bucket}/md/", "--shard-size", "2",
                 "--workers", "0", "--timeout", "150"], cenv, timeout=200)
        emulator.config.faults = Faults()
        # fal: S3 images go as presigned URLs, the downscaled ones (--max-pixels) as data URIs.
        run_cli(["run", f"s3://{bucket}/p/", f"s3://{bucket}/fal/", "--shard-size", "3",
                 "--provider", "fal", "--max-pixels", "200000", "--workers", "0",
                 "--timeout", "150"], cenv, timeout=200)
        md = read_json(s3, bucket, "md/run.json")
        fal = read_json(s3, bucket, "fal/run.json")
        assert md["status"] == fal["status"] == "completed"
        samples = scrape(port)
    assert not metrics_dirs(pid), "the private metrics directory was left behind"
    n = len(names)

    # Items and tokens: what the runs' summaries say.
    assert total(samples, "moonbatch_items_total", provider="moondream", status="ok", code="") == n
    assert total(samples, "moonbatch_items_total", provider="fal", status="ok", code="") == n
    assert total(samples, "moonbatch_items_total", status="error") == 0
    for provider, summary in (("moondream", md), ("fal", fal)):
        for kind in ("input", "output"):
            assert total(samples, "moonbatch_tokens_total", provider=provider, kind=kind) == \
                summary["usage"][f"{kind}_tokens"]
    assert md["usage"]["input_tokens"] > 0

    # Batches (Batch API) and requests (fal).
    shards = md["shards"]["total"]
    assert total(samples, "moonbatch_batches_total", provider="moondream", state="submitted") \
        == shards == total(samples, "moonbatch_batches_total", state="completed")
    endpoint = "fal-ai/moondream3-preview/caption"
    assert total(samples, "moonbatch_requests_total", endpoint=endpoint, state="sent") == n
    assert total(samples, "moonbatch_requests_total", endpoint=endpoint, state="completed") == n

    # Every HTTP call, both providers; latency histograms; 429s counted and retried.
    for action in ("mpu-create", "mpu-uploadpart", "mpu-complete", "batch-status", "download"):
        assert total(samples, "moonbatch_api_requests_total", provider="moondream",
                     endpoint=action, status="200") >= 1, action
    for action in ("submit", "status", "result"):
        assert total(samples, "moonbatch_api_requests_total", provider="fal", endpoint=action) \
            >= n, action
    assert total(samples, "moonbatch_api_requests_total", provider="moondream", status="429") >= 1
    assert total(samples, "moonbatch_retries_total", reason="api_429") >= 1
    for provider in ("moondream", "fal"):
        calls = total(samples, "moonbatch_api_requests_total", provider=provider)
        assert total(samples, "moonbatch_api_request_seconds_count", provider=provider) == calls
        buckets = [lab for lab, _ in samples["moonbatch_api_request_seconds_bucket"]
                   if lab["provider"] == provider]
        assert any(lab["le"] == "+Inf" for lab in buckets)

    # Bytes: Batch API parts (every line, base64) and fal data URIs (downscaled images).
    assert total(samples, "moonbatch_upload_bytes_total", provider="moondream") > 0
    assert total(samples, "moonbatch_upload_bytes_total", provider="fal") > 0

    # Per-run gauges: done == total, nothing left at a provider.
    for summary in (md, fal):
        run = summary["run_id"]
        assert total(samples, "moonbatch_run_items_total", run=run) == n
        assert total(samples, "moonbatch_run_items_done", run=run) == n
        assert total(samples, "moonbatch_run_oldest_batch_age_seconds", run=run) == 0

    # The dashboard's metrics are all in the live scrape.
    scraped = {re.sub(r"(_bucket|_sum|_count)$", "", name) for name in samples}
    assert dashboard_metrics() <= scraped, dashboard_metrics() - scraped

    # No label carries a URL, a signature or a key.
    forbidden = ("http", "://", "s3://", "signature", env["MOONDREAM_API_KEY"].lower(),
                 env["FAL_KEY"].lower(), bucket)
    for name, entries in samples.items():
        for labels, _ in entries:
            for key, value in labels.items():
                assert not any(f in value.lower() for f in forbidden), (name, key, value)


def test_retry_reasons_name_the_cause_not_the_request(tmp_path):
    """Task retries count the original exception's type (Celery's ``Retry.exc``), HTTP
    retries ``api_<status>`` or ``api_<network error type>``: never a message or a URL."""
    code = """
import os, sys
os.environ['PROMETHEUS_MULTIPROC_DIR'] = sys.argv[1]
os.environ['MOONBATCH_METRICS_PORT'] = '1'
import httpx
from celery.exceptions import Retry
import moonbatch.workers.metrics as m
from moonbatch.workers.storage import StorageError
from prometheus_client import CollectorRegistry
m.task_retry(Retry(exc=StorageError('s3://b/k?X-Amz-Signature=x failed')))
m.http_retry(429)
m.http_retry(httpx.ReadTimeout('https://api/x?signature=y'))
m.http_retry('network')
reg = CollectorRegistry(); reg.register(m.MergedCollector(sys.argv[1]))
print(sorted((s.labels['reason'], s.value) for f in reg.collect() for s in f.samples))
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == str(sorted([("StorageError", 1.0), ("api_429", 1.0),
                                             ("api_ReadTimeout", 1.0), ("api_network", 1.0)]))
