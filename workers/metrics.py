"""Prometheus metrics of the work itself (items, batches, requests, bytes, tokens, provider
calls, retries, per-run progress), served by the workers (README "Metrics").

Off unless ``MOONBATCH_METRICS_PORT`` is set. Then a worker's main process serves ``/metrics``
on that port (of ``MOONBATCH_METRICS_ADDRESS``: every IPv4 interface unless told otherwise),
merging what every pool process recorded: prometheus_client's multiprocess mode,
one set of files per process in ``PROMETHEUS_MULTIPROC_DIR`` (a private temporary directory
when the variable is unset, made and set at ``worker_init``, before the pool forks and before
any metric exists; removed at shutdown). ``connect_signals()`` (called by ``moonbatch.workers.app``) hooks
that into Celery; importing this module starts nothing and imports neither Celery nor
prometheus_client, so the producer's planning stays light. Every recording function is a no-op
when metrics are off and never raises: a metric cannot fail a task.

Labels are small closed sets (provider, status, error code, state, action, reason) and, for the
``moonbatch_run_*`` gauges only, the run id: never a URL, a key, an item id or a batch id.

Multiprocess modes of the per-run gauges (every pool process keeps its own value; the scrape
merges them):

- ``moonbatch_run_items_total``: ``max``. The plan's item count, the same in every process.
- ``moonbatch_run_items_done``: ``max``. A count that only grows, so the highest value any
  process wrote is the freshest; not ``livemax``, so a recycled or killed pool process does not
  take the run's progress with it.
- ``moonbatch_run_oldest_batch_age_seconds``: ``mostrecent``, not ``max``/``livemax``. The age
  drops when the oldest round is merged (often in another process than the one that last
  polled it); under ``max`` that process's stale, larger age would stay the answer, under
  ``mostrecent`` the last computation wins. It is computed at most every ``RUN_GAUGE_SECONDS``
  per process from the poll and merge tasks (and by the merge that finalises the run), so it
  lags by at most about that plus the poll interval.

A run's series are dropped once it is final: its ``moonbatch_run_*`` series stay in the scrape
for ``FINAL_RUN_SERIES_SECONDS`` after it completed, failed or was cancelled (so the final
``done == total`` is scraped at least a few times), then the serving process leaves them out
(prometheus_client cannot delete a label set from multiprocess files; a marker file per final
run in ``final-runs/`` of the directory tells the collector). A worker restart starts empty.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from moonbatch.workers.models import ShardDone
    from moonbatch.workers.runstate import Run

log = logging.getLogger(__name__)

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
FINAL_DIR = "final-runs"  # marker files of final runs, inside ENV_DIR (not *.db: not merged)
FINAL_RUN_SERIES_SECONDS = 600.0  # a final run's gauges stay this long in the scrape
RUN_GAUGE_SECONDS = 30.0  # per-run gauges are recomputed at most this often per process (a listing)
MAX_TRACKED_RUNS = 256  # per-process caches of per-run state
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)

#: Every metric: name → (type, help, label names, gauge multiprocess mode). The names and
#: labels are a contract (dashboards and alerts use them): add, never rename.
METRICS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "moonbatch_items_total": (
        "counter", "Rows written when a shard is merged, by status and error code ('' if ok).",
        ("provider", "status", "code"), ""),
    "moonbatch_batches_total": (
        "counter", "Batch API batches by state: submitted, completed, failed, resubmitted.",
        ("provider", "state"), ""),
    "moonbatch_requests_total": (
        "counter", "fal queue requests by endpoint and state: sent, completed, failed, "
        "expired, rate_limited.", ("provider", "endpoint", "state"), ""),
    "moonbatch_upload_bytes_total": (
        "counter", "Bytes uploaded to the provider (Batch API parts; fal data URIs).",
        ("provider",), ""),
    "moonbatch_tokens_total": (
        "counter", "Input and output tokens of merged rows.", ("provider", "kind"), ""),
    "moonbatch_cost_usd_total": (
        "counter", "Dollars spent: merged rounds' usage at the model's price (README \"Budget "
        "and stops\").", ("provider", "model"), ""),
    "moonbatch_api_requests_total": (
        "counter", "HTTP calls to a provider by action and HTTP status ('error': no answer).",
        ("provider", "endpoint", "status"), ""),
    "moonbatch_api_request_seconds": (
        "histogram", "Duration of HTTP calls to a provider, by action.",
        ("provider", "endpoint"), ""),
    "moonbatch_retries_total": (
        "counter", "Retries: of tasks (the exception's type name) and of HTTP calls "
        "('api_<status>' or 'api_<network error>').", ("reason",), ""),
    "moonbatch_run_items_done": (
        "gauge", "Items of the run with their final row written (merged shards).", ("run",),
        "max"),
    "moonbatch_run_items_total": (
        "gauge", "Items of the run (its plan).", ("run",), "max"),
    "moonbatch_run_oldest_batch_age_seconds": (
        "gauge", "Age of the run's oldest submitted round not merged yet (0: none).", ("run",),
        "mostrecent"),
}



class _State:
    metrics: dict[str, Any] | None = None
    private_dir: str | None = None  # made by prepare_worker: removed at shutdown
    server: Any = None
    runs: dict[str, _RunTracker] = {}
    warned: set[str] = set()


_state = _State()
_lock = threading.Lock()
F = TypeVar("F", bound=Callable[..., Any])


def _safe(fn: F) -> F:
    """Metrics never fail the work: an error is logged (once per function) and swallowed."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if fn.__name__ not in _state.warned:
                _state.warned.add(fn.__name__)
                log.warning("metrics: %s failed (%s); carrying on", fn.__name__,
                            type(exc).__name__)
            return None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


def _build(registry: Any = None) -> dict[str, Any]:
    """The metric objects of ``METRICS`` in ``registry`` (default: prometheus_client's)."""
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram

    reg = REGISTRY if registry is None else registry
    built: dict[str, Any] = {}
    for name, (kind, doc, labels, mode) in METRICS.items():
        if kind == "counter":
            built[name] = Counter(name, doc, labels, registry=reg)
        elif kind == "histogram":
            built[name] = Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=reg)
        else:
            built[name] = Gauge(name, doc, labels, multiprocess_mode=mode, registry=reg)
    return built


def registered_names() -> set[str]:
    """The metric names the workers export (counters with their ``_total``; histograms by
    their base name), read from a registry the metrics are built into."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    _build(registry)
    return {f.name + "_total" if f.type == "counter" else f.name for f in registry.collect()}


def enabled() -> bool:
    """True when this process records metrics: ``MOONBATCH_METRICS_PORT`` is set and the
    multiprocess directory is known (the worker sets it up at ``worker_init``)."""
    return _metrics() is not None


def _metrics() -> dict[str, Any] | None:
    if _state.metrics is not None:
        return _state.metrics
    if not os.environ.get(ENV_DIR):
        return None
    from moonbatch.config import get_settings

    if get_settings().metrics_port is None:
        return None
    with _lock:
        if _state.metrics is None:
            _state.metrics = _build()
    return _state.metrics


def _word(value: object, limit: int = 48) -> str:
    """A label value made from an API- or exception-chosen word: letters, digits, ``_``, ``-``."""
    return re.sub(r"[^A-Za-z0-9_-]", "", str(value))[:limit]


def endpoint_label(action: str, actions: Mapping[str, str]) -> str:
    """The ``endpoint`` label of a provider action, from the provider's table ``actions``
    (``Provider.metric_actions``: action → label): the action without its parenthesised
    detail, or a key it starts with followed by a word (``"mpu-uploadpart (part 3)"`` →
    ``mpu-uploadpart``, ``"download of output 3"`` → ``download``); unknown ones are ``other``,
    so labels stay a closed set."""
    base = action.split(" (")[0].strip()
    if base in actions:
        return actions[base]
    return next((label for key, label in actions.items() if base.startswith(key + " ")), "other")


# -- recording ------------------------------------------------------------------------------------
@_safe
def api_call(provider: str, endpoint: str, status: int | None, seconds: float) -> None:
    """One HTTP call to a provider: its ``endpoint`` label (``endpoint_label``), HTTP status
    (None: no answer) and duration."""
    m = _metrics()
    if m is None:
        return
    m["moonbatch_api_requests_total"].labels(provider, endpoint,
                                             str(status) if status else "error").inc()
    m["moonbatch_api_request_seconds"].labels(provider, endpoint).observe(max(0.0, seconds))


@_safe
def http_retry(cause: int | BaseException | str) -> None:
    """An HTTP call about to be tried again because of ``cause``: an HTTP status
    (``api_429``), a network error (``api_ReadTimeout``) or a word (``api_network``)."""
    m = _metrics()
    if m is None:
        return
    if isinstance(cause, BaseException):
        reason = "api_" + _word(type(cause).__name__)
    else:
        reason = "api_" + (_word(cause) or "network")
    m["moonbatch_retries_total"].labels(reason).inc()


@_safe
def task_retry(reason: Any) -> None:
    """A Celery task retry (``task_retry`` signal): the original exception's type name."""
    m = _metrics()
    if m is None:
        return
    exc = getattr(reason, "exc", None) or reason
    name = type(exc).__name__ if isinstance(exc, BaseException) else "unknown"
    m["moonbatch_retries_total"].labels(_word(name) or "unknown").inc()


@_safe
def batch(provider: str, state: str) -> None:
    """A batch (a round sent as one submission) moved: ``submitted``, ``completed``,
    ``failed``, ``resubmitted``."""
    m = _metrics()
    if m is not None:
        m["moonbatch_batches_total"].labels(provider, state).inc()


@_safe
def requests(provider: str, endpoint: str, state: str, n: int = 1) -> None:
    """Requests of a provider that sends a round as many requests (``endpoint``: an id of its
    closed endpoint table) moved: ``sent``, ``completed``, ``failed``, ``expired``,
    ``rate_limited``."""
    m = _metrics()
    if m is not None and n:
        m["moonbatch_requests_total"].labels(provider, endpoint, state).inc(n)


@_safe
def cost(provider: str, model: str, usd: float) -> None:
    """Dollars a merged round cost (``moonbatch.workers.stops``: once per round); ``model``:
    the run's model name (a closed set of a price table, or the user's own string, shortened)."""
    m = _metrics()
    if m is not None and usd > 0:
        m["moonbatch_cost_usd_total"].labels(
            provider, re.sub(r"[^A-Za-z0-9_.@/-]", "", model)[:64] or "default").inc(usd)


@_safe
def upload_bytes(provider: str, n: int) -> None:
    """Bytes sent to a provider as payload (a Batch API part; fal data URIs)."""
    m = _metrics()
    if m is not None and n > 0:
        m["moonbatch_upload_bytes_total"].labels(provider).inc(n)


@_safe
def shard_merged(provider: str, done: ShardDone) -> None:
    """A shard's final rows were written (once per shard): rows by status and error code
    (``done.errors_by_code``), tokens of its merged rounds."""
    m = _metrics()
    if m is None:
        return
    items = m["moonbatch_items_total"]
    if done.ok:
        items.labels(provider, "ok", "").inc(done.ok)
    for code, n in done.errors_by_code.items():
        items.labels(provider, "error", _word(code) or "unknown").inc(n)
    tokens = m["moonbatch_tokens_total"]
    if done.input_tokens:
        tokens.labels(provider, "input").inc(done.input_tokens)
    if done.output_tokens:
        tokens.labels(provider, "output").inc(done.output_tokens)


# -- per-run gauges -----------------------------------------------------------------------------
class _RunTracker:
    """What this process knows of a run (documents that never change are read once)."""

    def __init__(self) -> None:
        self.updated = 0.0
        self.total: int | None = None
        self.done: dict[int, int] = {}  # shard → items (done.json)
        self.submitted: dict[tuple[int, int], float] = {}  # (shard, round) → submitted_at


def _run_label(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "", run_id)[:64] or "unknown"


@_safe
def run_progress(run: Run, *, force: bool = False) -> None:
    """Recompute the run's gauges from storage (one listing of its shards' documents): items
    done (merged shards) and total (the plan), and the age of its oldest submitted round not
    merged yet. At most every ``RUN_GAUGE_SECONDS`` per process unless ``force``."""
    m = _metrics()
    if m is None:
        return
    from moonbatch.workers import layout
    from moonbatch.workers.runstate import listed_shards
    from moonbatch.workers.storage import get_json, get_json_or_none

    run_id = run.spec.run_id
    with _lock:
        tracker = _state.runs.get(run_id)
        if tracker is None:
            if len(_state.runs) >= MAX_TRACKED_RUNS:
                _state.runs.pop(next(iter(_state.runs)))
            tracker = _state.runs[run_id] = _RunTracker()
        now = time.time()
        if not force and now - tracker.updated < RUN_GAUGE_SECONDS:
            return
        tracker.updated = now
    store = run.output
    if tracker.total is None:
        plan = get_json_or_none(store, layout.PLAN)
        tracker.total = int(plan["items"]) if plan else None
    done_shards: set[int] = set()
    at_provider: list[tuple[int, int]] = []  # (shard, round) of submitted rounds not merged
    for shard, docs in listed_shards(store):
        if (None, "done") in docs:
            done_shards.add(shard)
            continue
        rnd = layout.latest_round(docs)
        # A shard's latest round is at the provider from batch.json until merged.json (an
        # earlier round that was resubmitted has no merged.json, but a later round exists).
        if rnd is not None and (rnd, "batch") in docs and (rnd, "merged") not in docs:
            at_provider.append((shard, rnd))
    for shard in done_shards - tracker.done.keys():
        tracker.done[shard] = int(get_json(store, layout.shard_doc(shard, "done"))["total"])
    oldest: float | None = None
    for shard, rnd in at_provider:
        at = tracker.submitted.get((shard, rnd))
        if at is None:
            doc = get_json_or_none(store, layout.round_doc(shard, rnd, "batch"))
            if doc is None:
                continue
            at = tracker.submitted[(shard, rnd)] = float(doc["submitted_at"])
        oldest = at if oldest is None else min(oldest, at)
    label = _run_label(run_id)
    if tracker.total is not None:
        m["moonbatch_run_items_total"].labels(label).set(tracker.total)
    m["moonbatch_run_items_done"].labels(label).set(
        sum(n for s, n in tracker.done.items() if s in done_shards))
    m["moonbatch_run_oldest_batch_age_seconds"].labels(label).set(
        max(0.0, time.time() - oldest) if oldest is not None else 0.0)


@_safe
def run_final(run_id: str) -> None:
    """The run is final (completed, failed or cancelled): nothing of it is at a provider any
    more, and its series leave the scrape ``FINAL_RUN_SERIES_SECONDS`` from now."""
    m = _metrics()
    if m is None:
        return
    label = _run_label(run_id)
    m["moonbatch_run_oldest_batch_age_seconds"].labels(label).set(0.0)
    folder = os.path.join(os.environ[ENV_DIR], FINAL_DIR)
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, label)
    if not os.path.exists(marker):  # the first notice counts
        with open(marker, "w"):
            pass
    with _lock:
        _state.runs.pop(run_id, None)


def expired_runs(path: str, now: float | None = None) -> set[str]:
    """Run labels whose series leave the scrape: final for ``FINAL_RUN_SERIES_SECONDS``."""
    folder = os.path.join(path, FINAL_DIR)
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return set()
    gone = set()
    for entry in entries:
        try:
            if now - entry.stat().st_mtime >= FINAL_RUN_SERIES_SECONDS:
                gone.add(entry.name)
        except FileNotFoundError:
            continue
    return gone


class MergedCollector:
    """prometheus_client's ``MultiProcessCollector`` over ``path``, without the per-run series
    of runs final for longer than ``FINAL_RUN_SERIES_SECONDS``."""

    def __init__(self, path: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path = path
        self._inner = MultiProcessCollector(None, path)

    def collect(self) -> Iterable[Any]:
        gone = expired_runs(self.path)
        for family in self._inner.collect():
            if gone and family.name.startswith("moonbatch_run_"):
                family.samples = [s for s in family.samples if s.labels.get("run") not in gone]
            yield family


# -- the worker's side: Celery signals ------------------------------------------------------------
def _clean(path: str) -> None:
    """Remove what earlier processes left in the multiprocess directory."""
    for entry in os.scandir(path):
        if entry.name.endswith(".db") and entry.is_file():
            os.remove(entry.path)
    shutil.rmtree(os.path.join(path, FINAL_DIR), ignore_errors=True)


def prepare_worker() -> str | None:
    """In the worker's main process, before the pool forks (``worker_init``): make the
    multiprocess directory (a private temporary one unless ``PROMETHEUS_MULTIPROC_DIR`` names
    one; that one is emptied of stale files) and set the variable for the pool processes.
    Returns the directory, or None when metrics are off."""
    from moonbatch.config import get_settings

    if get_settings().metrics_port is None:
        return None
    path = os.environ.get(ENV_DIR)
    if path:
        os.makedirs(path, exist_ok=True)
        _clean(path)
    else:
        path = tempfile.mkdtemp(prefix=f"moonbatch-metrics-{os.getpid()}-")  # whose it is
        os.environ[ENV_DIR] = path
        _state.private_dir = path
    # prometheus_client picks its value class when first imported; if anything imported it
    # before the variable was set, choose again (no metric of ours exists yet).
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()
    return path


def serve() -> bool:
    """Serve ``/metrics`` on ``MOONBATCH_METRICS_ADDRESS``:``MOONBATCH_METRICS_PORT`` from this
    (the worker's main) process: every pool process's metrics merged. False (logged) when off,
    the port is taken or the address is not this machine's."""
    import errno

    from moonbatch.config import get_settings

    settings = get_settings()
    port, address = settings.metrics_port, settings.metrics_address
    path = os.environ.get(ENV_DIR)
    if port is None or not path or _state.server is not None:
        return False
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(MergedCollector(path))
    try:
        _state.server, _ = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        fix = ("another process holds it; set MOONBATCH_METRICS_PORT to a free port (one per "
               "worker on a machine)" if exc.errno == errno.EADDRINUSE else
               "set MOONBATCH_METRICS_ADDRESS to an address of this machine")
        log.error("metrics: cannot serve /metrics on %s port %d (%s): %s", address, port,
                  exc.strerror or type(exc).__name__, fix)
        return False
    log.info("metrics: serving /metrics on %s:%d", address, port)
    return True


def shutdown() -> None:
    """Stop serving and remove the private multiprocess directory (``worker_shutdown``)."""
    server, _state.server = _state.server, None
    if server is not None:
        server.shutdown()
        server.server_close()
    if _state.private_dir:
        shutil.rmtree(_state.private_dir, ignore_errors=True)
        _state.private_dir = None


def process_dead(pid: int | None) -> None:
    """A pool process exited (``worker_process_shutdown``): drop its ``live*`` gauge files."""
    from moonbatch.config import get_settings

    path = os.environ.get(ENV_DIR)
    if not path or pid is None or get_settings().metrics_port is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)


def connect_signals() -> None:
    """Hook the metrics into a Celery worker's life (idempotent; starts nothing by itself)."""
    from celery import signals

    def on_init(**_: Any) -> None:
        prepare_worker()

    def on_ready(**_: Any) -> None:
        serve()

    def on_shutdown(**_: Any) -> None:
        shutdown()

    def on_process_shutdown(pid: int | None = None, **_: Any) -> None:
        _safe(process_dead)(pid)

    def on_retry(reason: Any = None, **_: Any) -> None:
        task_retry(reason)

    for signal, handler, uid in (
            (signals.worker_init, on_init, "moonbatch-metrics-init"),
            (signals.worker_ready, on_ready, "moonbatch-metrics-ready"),
            (signals.worker_shutdown, on_shutdown, "moonbatch-metrics-shutdown"),
            (signals.worker_process_shutdown, on_process_shutdown,
             "moonbatch-metrics-process-shutdown"),
            (signals.task_retry, on_retry, "moonbatch-metrics-retry")):
        signal.connect(handler, weak=False, dispatch_uid=uid)
