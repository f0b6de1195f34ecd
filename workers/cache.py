"""The result cache: an item's answer is bought once per distinct (image, request).

An item's **cache key** is the SHA-256 of its image bytes as read and of everything that changes
the answer (``fingerprint``): the provider and its endpoint, the model, every skill's request
fields with the item's own overrides (``PlanItem.opts``), and the pixel budget ``max_pixels``.

- Within a run, round 0 of a shard sends each key once (the first item in plan order); the
  other items with that key (its *copies*) get its row with ``"cached": true`` and
  ``"cache_of": <its id>`` (``merge.fill_cached``), in every round the original is merged.
  Across the run's shards, the shard that first claims a key (``layout.claim``,
  create-if-absent) sends it; a later shard's items with that key *wait* for the claiming
  shard's row of it (its first merged round) when that shard's index is lower, and are sent
  by themselves otherwise (waits only point to lower shards, so no two shards wait for each
  other).
- Across runs, an entry per key in the cache store (``RunSpec.cache_url``, default
  ``<MOONBATCH_STATE_URL>/cache/``), written once (create-if-absent) after an ok row of a sent
  item was merged. Error rows are never written. A hit is not sent; its row carries the
  entry's result and ``"cache_of"``: the id of the item whose request answered.

Layout (``entry_path``): ``v1/<k[0:2]>/<k[2:4]>/<k>.json``, 65,536 folders: S3 spreads request
rates over prefixes and a local folder holds ~15 entries per million (bench/cache.py measures
the fan-out). An entry: ``{"v": 1, "of", "run", "created_at", "result", "usage", "width",
"height"[, "sent_width", "sent_height"]}``. Clearing the cache is deleting the prefix (or
``v1/``); entries never expire on their own.

The build's cache pass (``scan``) reads every item of round 0 once, hashes it and looks each
distinct key up once (one GET per distinct key); its outcome is the round's ``cache.json``
(``layout.round_doc(shard, 0, "cache")``: items to send, their keys, hits with their entries,
copies), so a resume after a kill or an emptied broker repeats exactly what was decided.
Items that cannot be read are sent as usual (the provider writes their error row). This
module never names a provider.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from moonbatch.workers import layout
from moonbatch.workers.models import PlanItem, RunSpec, SkillOptions, id_text
from moonbatch.workers.pool import ordered_map
from moonbatch.workers.storage import (
    NotFound,
    Store,
    get_json_or_none,
    normalize_url,
    open_store,
    put_json,
)

VERSION = "v1"
#: Keys of ``cache.json``'s ``counts``.
COUNTS = ("items", "unread", "distinct", "lookups", "hits", "copies", "waits", "send")


def default_url(state_url: str) -> str:
    """The cache's location when ``MOONBATCH_CACHE_URL`` is unset: ``cache/`` in the state
    location (``MOONBATCH_STATE_URL``). Raises ``ValueError`` for an unsupported URL."""
    return normalize_url(state_url) + "cache/"


def resolve_url(settings: Any) -> str:
    """The cache URL a new run records: ``settings.cache_url`` or ``default_url``."""
    return normalize_url(settings.cache_url) if settings.cache_url \
        else default_url(settings.state_url)


def open_cache(spec: RunSpec, settings: Any) -> Store:
    """The run's cache store (``spec.cache_url``; S3 with the settings' endpoint)."""
    return open_store(spec.cache_url or resolve_url(settings),
                      endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                      pool=max(32, settings.fetch_concurrency * 2))


def sampled(spec: RunSpec) -> bool:
    """True when a skill of the run samples (``temperature`` above 0): its answers vary."""
    return any((o.temperature or 0) > 0 for o in spec.all_options)


def reads(spec: RunSpec) -> bool:
    """Whether the run may take answers it did not buy (cache hits and in-run copies): the
    cache is on and the run does not sample, or ``--cache-sampled`` was given."""
    return spec.cache and (spec.cache_sampled or not sampled(spec))


def fingerprint(spec: RunSpec, opts: Mapping[str, Any] | None = None) -> str:
    """SHA-256 (hex) of what changes an answer besides the image: provider, endpoint, model,
    each skill's request fields (with ``opts``, an item's own overrides; ``ValueError`` for
    an invalid one, as the build raises it) and ``max_pixels``."""
    options: Sequence[SkillOptions] = spec.all_options
    if opts:
        options = [o.with_overrides(dict(opts)) for o in options]
    doc = {"provider": spec.provider, "endpoint": spec.endpoint, "model": spec.model,
           "skills": [o.request_fields() for o in options], "max_pixels": spec.max_pixels}
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def item_key(data: bytes, fp: str) -> str:
    """The cache key (64 hex) of an image's bytes ``data`` under fingerprint ``fp``."""
    return hashlib.sha256(hashlib.sha256(data).digest() + fp.encode()).hexdigest()


def entry_path(key: str) -> str:
    """The store key of cache key ``key``'s entry: ``v1/ab/cd/abcd….json``."""
    return f"{VERSION}/{key[0:2]}/{key[2:4]}/{key}.json"


def lookup(cache: Store, key: str) -> dict[str, Any] | None:
    """The entry of ``key`` (one GET), or None when absent or unreadable (a miss)."""
    try:
        doc = orjson.loads(cache.get(entry_path(key)))
    except NotFound:
        return None
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) and "result" in doc else None


def scan(items: Sequence[PlanItem], spec: RunSpec, fetch: Callable[[PlanItem], bytes],
         cache: Store | None, *, concurrency: int = 16,
         heartbeat: Callable[[], None] = lambda: None,
         claim: Callable[[str, int], list[int] | None] | None = None) -> dict[str, Any]:
    """The cache pass of a shard's round 0: read each item once (``fetch``, ``concurrency``
    threads), key it, send each key once and look every distinct key up in ``cache`` (None:
    no lookups, in-run copies only). Reads nothing from ``cache`` nor dedups when
    ``reads(spec)`` is False (the keys are still made, for writing).

    ``claim(key, index)``: claims the key for this shard's item ``index`` across the run;
    returns ``[shard, index]`` of a lower shard's item that sends it (this one then waits for
    its row), or None when this shard sends it (None: no claims, a dry run).

    Returns the round's ``cache.json``: ``{"send": [item indices to send, plan order],
    "keys": {index: key} of sent items, "hits": {index: key}, "entries": {key: entry},
    "copies": {index: index of the sent item it copies}, "waits": {index: [shard, index] of
    another shard's item it copies}, "counts": {COUNTS}}``. An item whose
    read or override fails is sent (the provider's build writes its error row), as is a
    multi-image item (``PlanItem.more``), uncached (both counted ``unread``)."""
    fps: dict[Any, str] = {}
    base = fingerprint(spec)
    dedup = reads(spec)

    def key_of(i: int) -> str | None:
        item = items[i]
        if getattr(item, "more", None):  # a multi-image row: its key would need every image
            return None
        try:
            data = fetch(item)
            if item.opts:
                token = orjson.dumps(item.opts, option=orjson.OPT_SORT_KEYS)
                if token not in fps:
                    fps[token] = fingerprint(spec, item.opts)
                return item_key(data, fps[token])
            return item_key(data, base)
        except Exception:  # unreadable: sent as usual, its error row comes from the build
            return None

    keys: list[str | None] = []
    first: dict[str, int] = {}
    send: list[int] = []
    copies: dict[str, int] = {}
    looking = dedup and cache is not None
    pending: dict[str, Any] = {}
    # Lookups start as soon as a new key is known, so they overlap the reads of later items;
    # they are small requests, so twice as many run at once as reads.
    with ThreadPoolExecutor(max(1, concurrency)) as pool, \
            ThreadPoolExecutor(max(1, 2 * concurrency)) as lookups:
        for i, key in enumerate(pool.map(key_of, range(len(items)))):
            keys.append(key)
            if i % 256 == 255:
                heartbeat()
            if key is None or not dedup:
                send.append(i)
                continue
            if key in first:
                copies[str(i)] = first[key]
                continue
            first[key] = i
            send.append(i)
            if looking:
                pending[key] = lookups.submit(lookup, cache, key)  # type: ignore[arg-type]
        entries: dict[str, Any] = {}
        for key, future in pending.items():
            entry = future.result()
            if entry is not None:
                entries[key] = entry
    heartbeat()
    hits: dict[str, str] = {}
    if entries:
        for i, key in enumerate(keys):
            if key in entries:
                hits[str(i)] = key
        send = [i for i in send if keys[i] not in entries]
        copies = {c: o for c, o in copies.items() if keys[o] not in entries}
    waits: dict[str, list[int]] = {}
    if dedup and claim is not None:
        mine = [i for i in send if keys[i] is not None]
        with ThreadPoolExecutor(max(1, min(2 * concurrency, len(mine) or 1))) as pool:
            for i, holder in zip(mine, pool.map(lambda i: claim(keys[i], i), mine), strict=True):
                if holder is not None:
                    waits[str(i)] = [int(holder[0]), int(holder[1])]
        send = [i for i in send if str(i) not in waits]
    heartbeat()
    unread = sum(1 for k in keys if k is None)
    return {"send": send, "keys": {str(i): keys[i] for i in send if keys[i] is not None},
            "hits": hits, "entries": entries, "copies": copies, "waits": waits,
            "counts": {"items": len(items), "unread": unread, "distinct": len(first),
                       "lookups": len(pending), "hits": len(hits), "copies": len(copies),
                       "waits": len(waits), "send": len(send)}}


def run_claims(state: Store, shard: int) -> Callable[[str, int], list[int] | None]:
    """``scan``'s ``claim`` for shard ``shard`` of the run whose state is ``state`` (OUTPUT):
    the first shard to create ``layout.claim(key)`` sends the key for the whole run. Returns
    the holder ``[shard, index]`` when a lower shard holds the claim, else None (this shard
    holds it, e.g. a repeated pass, or a higher shard does and this one sends too)."""

    def claim(key: str, index: int) -> list[int] | None:
        mine = {"shard": shard, "index": index}
        if put_json(state, layout.claim(key), mine, if_absent=True):
            return None
        held = get_json_or_none(state, layout.claim(key))
        if not isinstance(held, dict):
            return None
        try:
            holder = [int(held["shard"]), int(held["index"])]
        except (KeyError, TypeError, ValueError):
            return None
        return holder if holder[0] < shard else None

    return claim


def original_row(state: Store, shard: int, index: int) -> bytes | None:
    """The row of item ``index`` of shard ``shard`` from the first of its rounds that merged
    one (``rows.jsonl``, ``merge.encode_round``), or None while none has: a later round is
    looked at only once it exists (a round sent again without merging writes no rows)."""
    want = b"%d\t" % index
    rnd = 0
    while True:
        try:
            data = state.get(layout.round_doc(shard, rnd, "rows"))
        except NotFound:
            if not state.exists(layout.round_doc(shard, rnd + 1, "todo")):
                return None
            rnd += 1
            continue
        for line in data.splitlines():
            if line.startswith(want):
                return line[len(want):]
        rnd += 1


def hit_row(item_id: Any, source: str, entry: Mapping[str, Any]) -> bytes:
    """The row of an item served by cache ``entry``: ok, the entry's result, ``usage`` zero
    (nothing was billed), sizes from the entry, ``"cached": true``, ``"cache_of"``: the id
    of the item whose request answered. Field order as ``merge`` writes ok rows."""
    row: dict[str, Any] = {"id": item_id, "source": source, "status": "ok",
                           "result": entry.get("result"),
                           "usage": {"input_tokens": 0, "output_tokens": 0}}
    for k in ("width", "height", "sent_width", "sent_height"):
        if k in entry:
            row[k] = entry[k]
    row["cached"] = True
    row["cache_of"] = str(entry.get("of") or "")
    return orjson.dumps(row)


def copy_row(row: bytes, item_id: Any, source: str, of: Any) -> bytes:
    """The row of an in-run copy from its original's ``row`` (ok or error): the copy's own
    ``id`` and ``source``, ``usage`` zero, ``"cached": true``, ``"cache_of"``: ``of``."""
    doc = orjson.loads(row)
    doc["id"], doc["source"] = item_id, source
    if "usage" in doc:
        doc["usage"] = {"input_tokens": 0, "output_tokens": 0}
    doc["cached"] = True
    doc["cache_of"] = id_text(of)
    return orjson.dumps(doc)


def entry_of(row: Mapping[str, Any], run_id: str) -> bytes | None:
    """The cache entry of a merged row, or None when the row must not be cached (an error,
    or a row that is itself a copy or a hit)."""
    if row.get("status") != "ok" or row.get("cached"):
        return None
    entry: dict[str, Any] = {"v": 1, "of": id_text(row["id"]), "run": run_id,
                             "created_at": time.time(), "result": row.get("result"),
                             "usage": row.get("usage") or {}}
    for k in ("width", "height", "sent_width", "sent_height"):
        if k in row:
            entry[k] = row[k]
    return orjson.dumps(entry)


def write_entries(cache: Store, doc: Mapping[str, Any], rows: Mapping[int, bytes], run_id: str,
                  *, concurrency: int = 16) -> int:
    """Write the entries of the ok ``rows`` (item index → row bytes) of sent items that have
    a key in ``doc`` (the round-0 ``cache.json``), create-if-absent: an entry is written once
    and never replaced. Returns how many were new."""
    keys = doc.get("keys") or {}

    def todo() -> Iterator[tuple[str, bytes]]:
        for i, row in rows.items():
            key = keys.get(str(i))
            if key is None or b'"status":"ok"' not in row:
                continue
            entry = entry_of(orjson.loads(row), run_id)
            if entry is not None:
                yield key, entry

    # Entries are made as the puts go, a window of them at a time: never a list of a shard's
    # entries (each of orjson's bytes takes at least 4 KiB: 400 MB for 100,000 rows).
    workers = max(1, concurrency)
    return sum(ordered_map(lambda kv: cache.put(entry_path(kv[0]), kv[1], if_absent=True),
                           todo(), workers=workers, window=2 * workers))


def served(doc: Mapping[str, Any] | None) -> int:
    """How many items of a shard ``cache.json`` serves without sending them."""
    if not doc:
        return 0
    return len(doc.get("hits") or {}) + len(doc.get("copies") or {}) + len(doc.get("waits") or {})


def summarize(docs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """``counts`` of several ``scan`` outcomes added up."""
    total = dict.fromkeys(COUNTS, 0)
    for doc in docs:
        for k, v in (doc.get("counts") or {}).items():
            total[k] = total.get(k, 0) + int(v)
    return total
