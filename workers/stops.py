"""Stops: a run's budget (``--max-cost``) and its stop on systematic failure
(``--max-error-rate`` with ``--error-sample``). Provider-blind: the provider answers what a
round would cost (``Provider.round_estimate``) and what its results cost (``Provider.cost``);
this module keeps the books and decides.

Spend is kept fleet-wide in one Redis hash per run, ``moonbatch:spend:<run_id>`` on the broker,
changed only by Lua scripts (atomic across every worker):

    actual            dollars of settled rounds (their results' usage x price)
    reserved          dollars reserved for work in flight (estimates)
    res:<s>:<r>       the reservation of round r of shard s, until it settles
    done:<s>:<r>      the round settled (idempotent: a redelivered merge settles nothing)
    results, errors   result lines of settled rounds, and those that were provider-side errors
    code:<code>       provider-side errors per code
    init              the hash was loaded from storage

Before anything is sent, its estimate is reserved: the reservation is refused when actual +
reserved + estimate would pass the budget, and nothing is sent. After a round merges, its
reservation is replaced by its actual cost. The durable copy is each round's ``spend.json``
(``{"estimate", "actual", "results", "errors", "codes"}``) in OUTPUT: a broker that lost its
data (or a new one) is loaded again from them before its first use.

A run that must stop records ``_moonbatch/stopped.json`` (``{"code", "reason", "at"}``, first
stop wins): from then on no round sends anything; the items not sent end as error rows with the
stop's code (``budget_exceeded`` or ``error_rate_exceeded``), and once every shard is merged
the run is final with status ``stopped`` and its ``stop_reason``. ``retry-failed`` (with a
higher ``--max-cost``) removes the record and sends those items again.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from moonbatch.workers import layout, metrics
from moonbatch.workers.providers import TransientProviderError
from moonbatch.workers.storage import Store, get_json_or_none, put_json

log = logging.getLogger(__name__)

BUDGET_EXCEEDED = "budget_exceeded"
ERROR_RATE_EXCEEDED = "error_rate_exceeded"
#: Codes of error rows written for items a stop kept from being sent (``retry-failed`` sends
#: them again); never counted as provider-side errors.
STOP_CODES = frozenset({BUDGET_EXCEEDED, ERROR_RATE_EXCEEDED})
#: Codes of an item's own input (the image or its options), never provider-side: the pre-send
#: errors of ``moonbatch.workers.lines.ItemError`` and the per-line codes of the providers
#: that name the input (a provider adds its own in ``Provider.input_error_codes``).
INPUT_CODES = frozenset({"empty_object", "not_an_image", "image_decode_failed",
                         "image_too_large", "read_failed", "object_not_found", "invalid_request",
                         "invalid_input", "unknown_skill", "not_sent"}) | STOP_CODES
PREFIX = "moonbatch:spend:"
TTL_SECONDS = 30 * 86400  # the hash outlives any run's pause; storage keeps the rest

# KEYS[1] hash; ARGV: field, usd, budget (<0: none), once (1: a second reservation of field is
# a no-op). Returns {granted (1/0/-1 not loaded), actual, reserved, field's reservation}.
_RESERVE = """
local k, f, usd, budget, once = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if redis.call('HEXISTS', k, 'init') == 0 then return {-1, '0', '0', '0'} end
local actual = tonumber(redis.call('HGET', k, 'actual') or '0')
local reserved = tonumber(redis.call('HGET', k, 'reserved') or '0')
local mine = redis.call('HGET', k, f)
if once == '1' and mine then return {1, tostring(actual), tostring(reserved), mine} end
if budget >= 0 and actual + reserved + usd > budget * (1 + 1e-9) then
  return {0, tostring(actual), tostring(reserved), mine or '0'}
end
redis.call('HINCRBYFLOAT', k, 'reserved', usd)
local now = redis.call('HINCRBYFLOAT', k, f, usd)
redis.call('EXPIRE', k, ARGV[5])
return {1, tostring(actual), tostring(reserved + usd), now}
"""

# KEYS[1] hash; ARGV: round, actual usd, results, errors, ttl, code, n, code, n...
# Returns {settled now (1/0/-1 not loaded), results, errors, actual}.
_SETTLE = """
local k, r = KEYS[1], ARGV[1]
if redis.call('HEXISTS', k, 'init') == 0 then return {-1, 0, 0, '0'} end
if redis.call('HEXISTS', k, 'done:' .. r) == 1 then
  return {0, tonumber(redis.call('HGET', k, 'results') or '0'),
          tonumber(redis.call('HGET', k, 'errors') or '0'), redis.call('HGET', k, 'actual') or '0'}
end
local held = tonumber(redis.call('HGET', k, 'res:' .. r) or '0')
redis.call('HDEL', k, 'res:' .. r)
redis.call('HINCRBYFLOAT', k, 'reserved', -held)
local actual = redis.call('HINCRBYFLOAT', k, 'actual', ARGV[2])
redis.call('HSET', k, 'done:' .. r, ARGV[2])
local results = redis.call('HINCRBY', k, 'results', ARGV[3])
local errors = redis.call('HINCRBY', k, 'errors', ARGV[4])
for i = 6, #ARGV, 2 do redis.call('HINCRBY', k, 'code:' .. ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', k, ARGV[5])
return {1, results, errors, actual}
"""

# KEYS[1] hash; ARGV: ttl, field, value, ...: the hash as storage holds it, unless loaded.
_LOAD = """
if redis.call('HEXISTS', KEYS[1], 'init') == 1 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'init', '1')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class BooksUnavailable(TransientProviderError):
    """The broker's Redis could not be reached to keep a budgeted run's books (the step is
    retried: nothing is sent without a reservation)."""


# -- the run's limits and its stop record ------------------------------------------------------
def limits(store: Store, spec: Any) -> dict[str, Any]:
    """The run's ``max_cost`` (dollars, None: no budget), ``max_error_rate`` (0..1, None: off)
    and ``error_sample`` (results before the rate is judged): the spec's, with a later
    ``retry-failed --max-cost`` (``_moonbatch/limits.json``) over them."""
    over = get_json_or_none(store, layout.LIMITS) or {}
    return {"max_cost": over.get("max_cost", getattr(spec, "max_cost", None)),
            "max_error_rate": getattr(spec, "max_error_rate", None),
            "error_sample": getattr(spec, "error_sample", None) or 0,
            "sample_base": over.get("sample_base") or {}}


def set_max_cost(store: Store, usd: float) -> None:
    """Record a new budget for the run (``retry-failed --max-cost``): it replaces the spec's
    for every later reservation."""
    doc = get_json_or_none(store, layout.LIMITS) or {}
    put_json(store, layout.LIMITS, {**doc, "max_cost": float(usd), "at": time.time()})


def new_sample(run: Any, settings: Any) -> None:
    """A retry pass starts a new error sample: results and errors so far no longer count
    towards ``--max-error-rate`` (their counts are recorded as the sample's base in
    ``_moonbatch/limits.json``). Raises ``BooksUnavailable``."""
    if getattr(run.spec, "max_error_rate", None) is None:
        return
    try:
        base = Books(run, settings).counts()
    except BooksUnavailable as exc:  # the pass then judges every result so far
        log.warning("%s: the retry pass's error sample starts with the run's", exc)
        return
    doc = get_json_or_none(run.output, layout.LIMITS) or {}
    put_json(run.output, layout.LIMITS, {**doc, "sample_base": base})


def release(ctx: Any) -> None:
    """A round that will not be merged (sent again as a new round): its reservation is
    settled at nothing (a failed submission is not billed)."""
    try:
        Books(ctx.run, ctx.settings).settle(ctx.shard, ctx.rnd, 0.0, 0, {})
    except BooksUnavailable:
        if limits(ctx.store, ctx.run.spec)["max_cost"] is not None:
            raise


def stopped(store: Store) -> dict[str, Any] | None:
    """The run's stop record ``{"code", "reason", "at"}``, None while it may send."""
    return get_json_or_none(store, layout.STOPPED)


def stop(store: Store, code: str, reason: str) -> bool:
    """Stop the run (first stop wins; ``reason`` holds no secret). True if this call did."""
    done = put_json(store, layout.STOPPED, {"code": code, "reason": reason, "at": time.time()},
                    if_absent=True)
    if done:
        log.warning("run stopped: %s", reason)
    return done


def clear_stop(store: Store) -> None:
    """Forget the stop record (a ``retry-failed`` pass carries on)."""
    store.delete(layout.STOPPED)


def stop_error(doc: Mapping[str, Any]) -> dict[str, str]:
    """The error of an item a stop kept from being sent: ``{"code", "message"}``."""
    return {"code": str(doc.get("code") or BUDGET_EXCEEDED),
            "message": f"not sent: the run stopped ({doc.get('reason', '')}); "
                       "`moonbatch retry-failed RUN_ID` sends it"}


# -- the books -------------------------------------------------------------------------------
_local: dict[str, dict[str, Any]] = {}  # brokers that are not Redis: this process's books
_local_lock = threading.Lock()


class Books:
    """The spend and result counts of one run (see the module docstring). ``key`` names the
    round (``"<shard>:<round>"``)."""

    def __init__(self, run: Any, settings: Any) -> None:
        from moonbatch.workers.canary import broker_redis

        self.run, self.store = run, run.output
        self.hash = PREFIX + run.spec.run_id
        self._redis = broker_redis(settings)
        if self._redis is not None:
            self._reserve = self._redis.register_script(_RESERVE)
            self._settle = self._redis.register_script(_SETTLE)
            self._load = self._redis.register_script(_LOAD)

    # The local books mirror the scripts for brokers that are not Redis (one process).
    def _call(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        if self._redis is None:
            return _local_call(name, keys[0], args)
        try:
            for _ in range(2):
                out = getattr(self, "_" + name)(keys=keys, args=args)
                if out[0] != -1:
                    return [v.decode() if isinstance(v, bytes) else v for v in out]
                self._load_books(spend_docs(self.store))
        except Exception as exc:
            raise BooksUnavailable(f"spend of run {self.run.spec.run_id}: "
                                   f"{type(exc).__name__}") from None
        raise BooksUnavailable(f"spend of run {self.run.spec.run_id}: not loaded")

    def open_empty(self) -> None:
        """Load the books of a run none of whose rounds has reserved yet (its planning, before
        its builds are enqueued): without them its first builds would each find the books
        unloaded and list the run's state to load them, a round trip before each first send.
        Books already loaded stay as they are. Raises ``BooksUnavailable``."""
        if self._redis is None:
            return  # the local books are loaded in the process that uses them
        try:
            self._load_books(())
        except Exception as exc:
            raise BooksUnavailable(f"spend of run {self.run.spec.run_id}: "
                                   f"{type(exc).__name__}") from None

    def _load_books(self, docs: Iterable[tuple[layout.ShardKey, Mapping[str, Any]]]) -> None:
        """Load the run's hash, unless it is loaded already, from the rounds' ``spend.json``
        documents ``docs`` (``spend_docs``; none: a run none of whose rounds has reserved).
        Raises Redis errors."""
        actual = reserved = 0.0
        results = errors = 0
        fields: list[Any] = []
        codes: dict[str, int] = {}
        for key, doc in docs:
            r = f"{key.shard}:{key.round}"
            if doc.get("actual") is not None:
                actual += float(doc["actual"])
                results += int(doc.get("results", 0))
                errors += int(doc.get("errors", 0))
                for c, n in (doc.get("codes") or {}).items():
                    codes[c] = codes.get(c, 0) + int(n)
                fields += ["done:" + r, doc["actual"]]
            else:
                reserved += float(doc.get("estimate", 0.0))
                fields += ["res:" + r, doc.get("estimate", 0.0)]
        fields += ["actual", actual, "reserved", reserved, "results", results, "errors", errors]
        for c, n in codes.items():
            fields += ["code:" + c, n]
        self._load(keys=[self.hash], args=[TTL_SECONDS, *fields])

    def reserve(self, rnd_key: str, usd: float, budget: float | None, *, once: bool) -> bool:
        """Reserve ``usd`` for round ``rnd_key`` if the budget allows (always, without one);
        ``once``: the round reserves once (a second call is a no-op that grants). Records the
        round's reservation in its ``spend.json``. Raises ``BooksUnavailable``."""
        granted, _, _, mine = self._call("reserve", [self.hash], [
            "res:" + rnd_key, repr(float(usd)), -1 if budget is None else repr(float(budget)),
            "1" if once else "0", TTL_SECONDS])
        if int(granted) == 1:
            shard, rnd = (int(x) for x in rnd_key.split(":"))
            put_json(self.store, layout.round_doc(shard, rnd, "spend"),
                     {"estimate": float(mine), "actual": None})
        return int(granted) == 1

    def reserve_many(self, shard: int, rnd: int, costs: list[float],
                     budget: float | None) -> int:
        """Reserve ``costs`` one after another for round ``rnd`` of ``shard`` until one does
        not fit; returns how many were granted (``spend.json`` written once)."""
        rnd_key, granted, mine = f"{shard}:{rnd}", 0, None
        for usd in costs:
            ok, _, _, now = self._call("reserve", [self.hash], [
                "res:" + rnd_key, repr(float(usd)),
                -1 if budget is None else repr(float(budget)), "0", TTL_SECONDS])
            if int(ok) != 1:
                break
            granted, mine = granted + 1, now
        if mine is not None:
            put_json(self.store, layout.round_doc(shard, rnd, "spend"),
                     {"estimate": float(mine), "actual": None})
        return granted

    def settle(self, shard: int, rnd: int, actual: float, results: int,
               codes: Mapping[str, int], spend: Mapping[str, Any] | None = None
               ) -> tuple[bool, int, int, dict[str, int]]:
        """Replace round ``rnd``'s reservation by its ``actual`` cost and count its
        ``results`` and provider-side error ``codes``; ``spend.json`` first (durable), then
        the books. ``spend``: the round's ``spend.json`` as the caller read it (None: read
        here). Returns ``(settled now, results, errors, {code: errors})`` of the whole run so
        far. Raises ``BooksUnavailable``."""
        key = layout.round_doc(shard, rnd, "spend")
        doc = spend or get_json_or_none(self.store, key) or {}
        errors = sum(codes.values())
        if doc.get("actual") is None:
            put_json(self.store, key, {"estimate": doc.get("estimate", 0.0),
                                       "actual": float(actual), "results": results,
                                       "errors": errors, "codes": dict(codes)})
        args: list[Any] = [f"{shard}:{rnd}", repr(float(actual)), results, errors, TTL_SECONDS]
        for c, n in codes.items():
            args += [c, n]
        now, total, bad, _ = self._call("settle", [self.hash], args)
        by_code = self.codes() if int(bad) else {}
        return int(now) == 1, int(total), int(bad), by_code

    def codes(self) -> dict[str, int]:
        """Provider-side errors per code so far."""
        return self.counts()["codes"]

    def counts(self) -> dict[str, Any]:
        """``{"results", "errors", "codes": {code: errors}}`` of settled rounds so far.
        Raises ``BooksUnavailable``."""
        if self._redis is None:
            with _local_lock:
                raw = dict(_local.get(self.hash, {}))
        else:
            try:
                if not self._redis.hexists(self.hash, "init"):
                    self._load_books(spend_docs(self.store))
                raw = {k.decode(): v.decode() for k, v in self._redis.hgetall(self.hash).items()}
            except Exception as exc:
                raise BooksUnavailable(f"spend of run {self.run.spec.run_id}: "
                                       f"{type(exc).__name__}") from None
        return {"results": int(raw.get("results", 0)), "errors": int(raw.get("errors", 0)),
                "codes": {k[5:]: int(v) for k, v in raw.items() if k.startswith("code:")}}


def _local_call(name: str, key: str, args: list[Any]) -> list[Any]:
    with _local_lock:
        book = _local.setdefault(key, {"actual": 0.0, "reserved": 0.0, "results": 0,
                                       "errors": 0})
        if name == "reserve":
            field, usd, budget, once = args[0], float(args[1]), float(args[2]), args[3]
            if once == "1" and field in book:
                return [1, book["actual"], book["reserved"], book[field]]
            if budget >= 0 and book["actual"] + book["reserved"] + usd > budget * (1 + 1e-9):
                return [0, book["actual"], book["reserved"], book.get(field, 0.0)]
            book["reserved"] += usd
            book[field] = book.get(field, 0.0) + usd
            return [1, book["actual"], book["reserved"], book[field]]
        r, actual, results, errors = args[0], float(args[1]), int(args[2]), int(args[3])
        if "done:" + r in book:
            return [0, book["results"], book["errors"], book["actual"]]
        book["reserved"] -= book.pop("res:" + r, 0.0)
        book["actual"] += actual
        book["done:" + r] = actual
        book["results"] += results
        book["errors"] += errors
        for i in range(5, len(args), 2):
            book["code:" + args[i]] = book.get("code:" + args[i], 0) + int(args[i + 1])
        return [1, book["results"], book["errors"], book["actual"]]


# -- what the pipeline calls -----------------------------------------------------------------
def before_send(ctx: Any, provider: Any) -> dict[str, str] | None:
    """Called before a round's first send (``tasks.build_shard``): None when it may go on,
    else the error its unsent items get. A stopped run sends nothing; a provider that sends a
    round at once (``spends_in_steps`` False) reserves its ``round_estimate`` here, and a
    refusal stops the run with ``budget_exceeded``. Without a budget the estimate is still
    booked (best effort), for the spend in flight that ``status`` shows."""
    store = ctx.store
    steps = getattr(provider, "spends_in_steps", False)
    with cf.ThreadPoolExecutor(3, thread_name_prefix="before-send") as pool:
        # The looks at once: one round trip's wait at the start of every build, not two in a
        # row (the limits, read for the usual round that is neither sent nor stopped, are
        # wasted on the others).
        sent, doc = pool.submit(store.exists, ctx.doc("batch")), pool.submit(stopped, store)
        lim = None if steps else pool.submit(limits, store, ctx.run.spec)
    if sent.result():
        return None  # already sent: the round only goes on
    doc = doc.result()
    if doc is not None:
        return stop_error(doc)
    if lim is None:
        return None
    budget = lim.result()["max_cost"]
    # A provider without the spend hooks (written before them) books nothing.
    estimate = getattr(provider, "round_estimate", None)
    usd = float(estimate(ctx)) if estimate is not None else 0.0
    try:
        ok = Books(ctx.run, ctx.settings).reserve(f"{ctx.shard}:{ctx.rnd}", usd, budget,
                                                   once=True)
    except BooksUnavailable:
        if budget is None:
            log.warning("shard %d round %d: spend not booked (broker unreachable)", ctx.shard,
                        ctx.rnd)
            return None
        raise
    if ok:
        return None
    return _over_budget(ctx, usd, budget)


#: What a step's reservation looks at before it books: the run's stop record (None while
#: it may send, as ``stopped``) and its budget (``limits``' ``max_cost``, None: no budget).
BudgetLook = tuple[dict[str, Any] | None, float | None]


def budget_look(ctx: Any) -> Callable[[], BudgetLook]:
    """Start reading what a step's reservation looks at (``BudgetLook``), the two documents
    side by side in background threads, so that a step reads them beside its other reads;
    returns the function that waits for them and gives the answer (``reserve_step(look=)``),
    raising storage errors."""
    pool = cf.ThreadPoolExecutor(2, thread_name_prefix="reserve")
    doc = pool.submit(stopped, ctx.store)
    lim = pool.submit(limits, ctx.store, ctx.run.spec)
    pool.shutdown(wait=False)
    return lambda: (doc.result(), lim.result()["max_cost"])


def reserve_step(ctx: Any, costs: list[float], look: BudgetLook | None = None
                 ) -> tuple[int, dict[str, str] | None]:
    """A provider that sends in steps (``spends_in_steps``) calls this before a step sends
    requests estimated at ``costs`` dollars each (in sending order): ``(n, None)`` when all
    ``n`` may be sent; ``(n, error)`` when only the first ``n`` fit the budget (or the run
    is stopped: 0), ``error`` being what the rest and every unsent item get (the run is then
    stopped). One reservation per request; the round's ``spend.json`` is written once.
    ``look``: ``budget_look``'s answer read just before (None: read now)."""
    doc, budget = look if look is not None else budget_look(ctx)()
    if doc is not None:
        return 0, stop_error(doc)
    try:
        n = Books(ctx.run, ctx.settings).reserve_many(ctx.shard, ctx.rnd, costs, budget)
    except BooksUnavailable:
        if budget is None:
            return len(costs), None
        raise
    if n == len(costs):
        return n, None
    return n, _over_budget(ctx, costs[n], budget)


def _over_budget(ctx: Any, usd: float, budget: float | None) -> dict[str, str]:
    reason = (f"budget: --max-cost ${budget:g} would be passed by shard {ctx.shard}'s next "
              f"send (estimated ${usd:.6f}); raise it with `moonbatch retry-failed "
              f"{ctx.run.spec.run_id} --max-cost USD`")
    stop(ctx.store, BUDGET_EXCEEDED, reason)
    return stop_error(stopped(ctx.store) or {"code": BUDGET_EXCEEDED, "reason": reason})


def after_merge(ctx: Any, provider: Any, rows: Mapping[int, bytes], build: Any,
                spend: Mapping[str, Any] | None = None) -> None:
    """Called once a round's rows are merged (``tasks.merge_round_task``): settle its spend
    (``Provider.cost`` of its ok rows' usage), count its results and provider-side errors,
    count the cost metric, and stop the run when the error rate passes ``max_error_rate``
    after ``error_sample`` results. ``spend``: the round's ``spend.json`` as the caller read
    it (None: read here)."""
    import orjson

    usage: dict[str, float] = {}
    results = 0
    codes: dict[str, int] = {}
    pre = set(build.errors)
    inputs = INPUT_CODES | getattr(provider, "input_error_codes", frozenset())
    for i, raw in rows.items():
        if str(i) in pre:
            continue  # never sent
        row = orjson.loads(raw)
        if row.get("status") == "ok":
            results += 1
            for k, v in (row.get("usage") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    usage[k] = usage.get(k, 0) + v
            usage["items"] = usage.get("items", 0) + 1
            continue
        code = str((row.get("error") or {}).get("code") or "unknown_error")
        if code in STOP_CODES:
            continue
        results += 1
        if code not in inputs:
            codes[code] = codes.get(code, 0) + 1
    spec = ctx.run.spec
    priced = getattr(provider, "cost", None)
    actual = float(priced(usage, spec)) if results and priced is not None else 0.0
    try:
        now, total, bad, by_code = Books(ctx.run, ctx.settings).settle(
            ctx.shard, ctx.rnd, actual, results, codes, spend)
    except BooksUnavailable:
        if limits(ctx.store, spec)["max_cost"] is None and not spec_rate(spec):
            log.warning("shard %d round %d: spend not settled (broker unreachable)", ctx.shard,
                        ctx.rnd)
            return
        raise
    if now and actual:
        metrics.cost(spec.provider, spec.model or "default", actual)
    if getattr(spec, "max_error_rate", None) is None:
        return  # no error rate to judge (a retry pass's limits.json changes only the budget)
    lim = limits(ctx.store, spec)
    rate, sample, base = lim["max_error_rate"], lim["error_sample"], lim["sample_base"]
    if base:  # a retry pass: its own sample
        total -= int(base.get("results", 0))
        bad -= int(base.get("errors", 0))
        by_code = {c: n - int((base.get("codes") or {}).get(c, 0)) for c, n in by_code.items()}
    if rate is not None and total >= max(1, sample) and bad / total > rate:
        code = max(sorted(by_code), key=lambda c: by_code[c]) if by_code else "unknown_error"
        stop(ctx.store, ERROR_RATE_EXCEEDED,
             f"error rate: {bad} of {total} results failed ({bad / total:.0%} > "
             f"--max-error-rate {rate:g}), most often {code}")


def spec_rate(spec: Any) -> float | None:
    """The spec's ``max_error_rate`` (None: off)."""
    return getattr(spec, "max_error_rate", None)


#: spend.json documents read at once by ``spend_docs``
SPEND_READERS = 16


def spend_docs(store: Store) -> list[tuple[layout.ShardKey, dict[str, Any]]]:
    """Every round's ``spend.json`` of the run (one listing; the documents read
    ``SPEND_READERS`` at once: a broker that lost its data is loaded again from them, and a run
    has one per round), in key order: ``[(shard key, document or {})]``. Raises storage
    errors."""
    keys = [(key, obj.key) for obj in store.iter_objects(layout.SHARDS)
            if (key := layout.parse_shard_key(obj.key)) is not None and key.name == "spend"
            and key.round is not None]
    with cf.ThreadPoolExecutor(SPEND_READERS, thread_name_prefix="spend") as pool:
        docs = pool.map(lambda k: get_json_or_none(store, k[1]) or {}, keys)
        return [(key, doc) for (key, _), doc in zip(keys, docs, strict=True)]


def spend(store: Store, max_cost: float | None) -> dict[str, Any]:
    """The run's spend as ``status`` and ``run.json`` show it, from the rounds' ``spend.json``
    (see ``spend_of``)."""
    return spend_of([doc for _, doc in spend_docs(store)], max_cost)


def spend_of(docs: Iterable[Mapping[str, Any]], max_cost: float | None) -> dict[str, Any]:
    """The spend of rounds' ``spend.json`` documents: ``actual_usd`` (settled rounds),
    ``estimated_usd`` (what those rounds were estimated at), ``in_flight_usd`` (estimates of
    rounds not settled), ``max_cost_usd`` (the budget, None: none). Dollars, 6 places."""
    actual = estimated = in_flight = 0.0
    for doc in docs:
        if doc.get("actual") is None:
            in_flight += float(doc.get("estimate") or 0.0)
        else:
            actual += float(doc["actual"])
            estimated += float(doc.get("estimate") or 0.0)
    return {"actual_usd": round(actual, 6), "estimated_usd": round(estimated, 6),
            "in_flight_usd": round(in_flight, 6), "max_cost_usd": max_cost}
