"""The result cache (workers/cache.py) end to end: S3 (moto) → producer → Redis → the session's
real Celery workers → the emulated Moondream Batch API, fal queue and real-time API over HTTP.
What each provider was sent is counted at the emulator (batch lines, fal and real-time
requests).

The suite runs with ``MOONBATCH_CACHE=0`` (conftest); these tests turn it on for their own runs
and give each its own cache location in the test's bucket."""

from __future__ import annotations

import json
import uuid

import orjson
import pytest

from tests.conftest import (
    Worker,
    read_json,
    read_results,
    run_cli,
    upload_photos,
    wait_for_run,
)

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png")
CAPTION = "fal-ai/moondream3-preview/caption"


def cache_env(env: dict[str, str], bucket: str) -> dict[str, str]:
    """The session environment with the cache on, at ``s3://<bucket>/cache/``."""
    return {**env, "MOONBATCH_CACHE": "1", "MOONBATCH_CACHE_URL": f"s3://{bucket}/cache/"}


def sent(emulator, provider: str) -> int:
    """Images the emulator was sent so far: lines of every batch, or fal requests (one image
    each on the caption endpoint)."""
    if provider == "moondream":
        return sum(b.total for b in list(emulator.emulator.batches.values()))
    if provider == "moondream-realtime":
        return emulator.emulator.realtime.calls.get("caption", 0)
    return sum(1 for r in list(emulator.emulator.fal.requests.values()) if r.endpoint == CAPTION)


def submit(env: dict[str, str], provider: str, input_url: str, output_url: str,
           *extra: str) -> str:
    args = ["submit", input_url, output_url, "--provider", provider, "--skill", "caption",
            *(["--endpoint", CAPTION] if provider == "fal" else []), *extra]
    return run_cli(args, env).stdout.strip().splitlines()[-1]


def triplicate(s3, bucket: str, prefix: str, names=PHOTOS) -> dict[str, bytes]:
    """Each photo three times under ``prefix`` (``a/``, ``b/``, ``c/``): {id: bytes}."""
    out: dict[str, bytes] = {}
    for sub in ("a/", "b/", "c/"):
        out.update({sub + k: v for k, v in upload_photos(s3, bucket, prefix + sub, names).items()})
    return out


def bought_once(rows: list[dict], photos: dict[str, bytes]) -> dict[str, dict]:
    """Check the rows of a ``triplicate`` dataset: every item has its row; of each photo's
    three items one was bought (ok) and the others carry its result and sizes, ``"cached":
    true``, ``"cache_of"`` its id and usage zero. Returns the rows by id."""
    assert sorted(r["id"] for r in rows) == sorted(photos)  # every copy has its row
    by_id = {r["id"]: r for r in rows}
    for name in PHOTOS:
        group = [by_id[s + name] for s in ("a/", "b/", "c/")]
        bought = [r for r in group if not r.get("cached")]
        assert len(bought) == 1 and bought[0]["status"] == "ok", group
        for row in group:
            assert row["status"] == "ok" and row["result"] == bought[0]["result"]
            assert (row["width"], row["height"]) == (bought[0]["width"], bought[0]["height"])
            if row is not bought[0]:
                assert row["cached"] is True and row["cache_of"] == bought[0]["id"]
                assert row["usage"] == {"input_tokens": 0, "output_tokens": 0}
    return by_id


def entries(s3, bucket: str) -> list[str]:
    resp = s3.list_objects_v2(Bucket=bucket, Prefix="cache/")
    return [o["Key"] for o in resp.get("Contents", [])]


@pytest.mark.parametrize("provider", ["moondream", "fal", "moondream-realtime"])
def test_identical_images_are_bought_once_within_and_across_runs(provider, s3, bucket, env,
                                                                 fleet, emulator):
    on = cache_env(env, bucket)
    photos = triplicate(s3, bucket, "in/")
    before = sent(emulator, provider)
    submit(on, provider, f"s3://{bucket}/in/", f"s3://{bucket}/out1/")
    summary = wait_for_run(s3, bucket, "out1/")
    assert summary["status"] == "completed", summary
    assert sent(emulator, provider) - before == len(PHOTOS)  # once per photo
    by_id = bought_once(read_results(s3, bucket, "out1/"), photos)
    assert summary["counts"]["cached"] == 2 * len(PHOTOS)
    # One shard: no other shard can share a key, so no run-wide claims are written.
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="out1/_moonbatch/claims/")
    keys = entries(s3, bucket)
    assert len(keys) == len(PHOTOS)  # one entry per distinct image and request
    assert all(k.startswith("cache/v1/") and k.count("/") == 4 for k in keys)

    # The dry run's cache check on another prefix of the same photos: all served, cost saved.
    upload_photos(s3, bucket, "again/x/", PHOTOS)
    upload_photos(s3, bucket, "again/y/", PHOTOS)
    dry = run_cli(["run", f"s3://{bucket}/again/", f"s3://{bucket}/out2/", "--provider", provider,
                   "--skill", "caption", *(["--endpoint", CAPTION] if provider == "fal" else []),
                   "--dry-run", "--cache-check", "--json"], on)
    report = json.loads(dry.stdout)["cache"]
    assert report["checked"] and report["served"] == report["items"] == 2 * len(PHOTOS), report
    assert report["hits"] == 2 * len(PHOTOS) and report["copies"] == 0
    if json.loads(dry.stdout)["cost_usd"] is not None:
        assert report["saved_usd"] == pytest.approx(json.loads(dry.stdout)["cost_usd"])

    # A second run on that prefix sends nothing, completes, and every row names the item
    # whose request answered (in Parquet: the cached and cache_of columns).
    before = sent(emulator, provider)
    submit(on, provider, f"s3://{bucket}/again/", f"s3://{bucket}/out2/", "--format", "parquet")
    summary = wait_for_run(s3, bucket, "out2/")
    assert summary["status"] == "completed", summary
    assert sent(emulator, provider) == before
    rows = read_results(s3, bucket, "out2/")
    assert len(rows) == 2 * len(PHOTOS)
    for row in rows:
        name = row["id"].split("/")[-1]
        original = by_id[[s + name for s in ("a/", "b/", "c/")
                          if not by_id[s + name].get("cached")][0]]
        assert row["status"] == "ok" and row["cached"] is True, row
        assert row["cache_of"] == original["id"] and row["result"] == original["result"]
    assert summary["counts"]["cached"] == 2 * len(PHOTOS) and summary["counts"]["ok"] == 6
    # the build's decision is the round's state (a resume repeats it, whatever the cache holds)
    decided = read_json(s3, bucket, "out2/_moonbatch/shards/00000/r0/cache.json")
    assert decided["send"] == [] and len(decided["hits"]) == 2 * len(PHOTOS)
    assert len(decided["entries"]) == len(PHOTOS)

    # A changed option misses: short captions are bought again (once per photo).
    before = sent(emulator, provider)
    submit(on, provider, f"s3://{bucket}/again/", f"s3://{bucket}/out3/", "--length", "short")
    summary = wait_for_run(s3, bucket, "out3/")
    assert summary["status"] == "completed", summary
    assert sent(emulator, provider) - before == len(PHOTOS)
    assert summary["counts"]["cached"] == len(PHOTOS)  # the in-run copies only


@pytest.fixture(scope="module")
def serial(env, tmp_path_factory):
    """A worker with one slot on a queue of this module (shards build one after another, so
    which shard claims a key first is known): the environment to submit to it."""
    queue = "t-cache-" + uuid.uuid4().hex[:8]
    with Worker(env, queue, tmp_path_factory.mktemp("serial") / "worker.log", concurrency=1):
        yield {**env, "MOONBATCH_QUEUE": queue}


@pytest.mark.parametrize("provider", ["moondream", "fal"])
def test_copies_in_other_shards_wait_for_the_row_of_the_shard_that_sends(provider, s3, bucket,
                                                                         serial, emulator):
    """Each photo in three shards (``a/``, ``b/``, ``c/``, a shard each): the first shard to
    claim a photo's key sends it; the later shards' items copy its row once merged."""
    on = cache_env(serial, bucket)
    photos = triplicate(s3, bucket, "in/")
    dry = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--provider", provider,
                   "--skill", "caption", *(["--endpoint", CAPTION] if provider == "fal" else []),
                   "--shard-size", str(len(PHOTOS)), "--dry-run", "--cache-check", "--json"], on)
    report = json.loads(dry.stdout)["cache"]  # the dry run counts copies across shards too
    assert (report["items"], report["served"], report["copies"]) == (9, 6, 6), report
    before = sent(emulator, provider)
    submit(on, provider, f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--shard-size",
           str(len(PHOTOS)))
    summary = wait_for_run(s3, bucket, "out/")
    assert summary["status"] == "completed", summary
    assert summary["shards"]["total"] == 3
    decided = [read_json(s3, bucket, f"out/_moonbatch/shards/{s:05d}/r0/cache.json")
               for s in range(3)]
    assert sent(emulator, provider) - before == len(PHOTOS), decided  # once per photo
    bought_once(read_results(s3, bucket, "out/"), photos)
    assert sum(len(d["send"]) for d in decided) == len(PHOTOS)
    assert sum(len(d["waits"]) for d in decided) == 2 * len(PHOTOS)
    for shard, doc in enumerate(decided):  # a wait points to a lower shard only
        assert all(holder[0] < shard for holder in doc["waits"].values())
    assert summary["counts"]["cached"] == 2 * len(PHOTOS)


def test_a_changed_model_misses_and_no_cache_sends_everything(s3, bucket, env, fleet, emulator):
    on = cache_env(env, bucket)
    triplicate(s3, bucket, "in/", PHOTOS[:2])
    submit(on, "moondream", f"s3://{bucket}/in/", f"s3://{bucket}/out1/")
    assert wait_for_run(s3, bucket, "out1/")["status"] == "completed"
    assert len(entries(s3, bucket)) == 2

    # --no-cache: every item is sent, nothing read or written, no row marked.
    before = sent(emulator, "moondream")
    submit(on, "moondream", f"s3://{bucket}/in/", f"s3://{bucket}/out2/", "--no-cache")
    summary = wait_for_run(s3, bucket, "out2/")
    assert summary["status"] == "completed" and summary["counts"]["cached"] == 0
    assert sent(emulator, "moondream") - before == 6
    assert not any(r.get("cached") for r in read_results(s3, bucket, "out2/"))
    assert len(entries(s3, bucket)) == 2

    # Another model is another answer: a miss (the emulator serves two models here).
    emulator.config.models = ("moondream3-preview", "moondream3.1")
    before = sent(emulator, "moondream")
    submit({**on, "MOONBATCH_MODEL": "moondream3.1"}, "moondream", f"s3://{bucket}/in/",
           f"s3://{bucket}/out3/")
    summary = wait_for_run(s3, bucket, "out3/")
    assert summary["status"] == "completed", summary
    assert sent(emulator, "moondream") - before == 2
    assert len(entries(s3, bucket)) == 4


def test_error_results_are_never_cached(s3, bucket, env, fleet, emulator):
    from moonbatch.emulator.server import Faults

    on = cache_env(env, bucket)
    triplicate(s3, bucket, "in/", PHOTOS[:1])
    emulator.config.faults = Faults(line_error_rate=1.0)  # every line fails
    submit(on, "moondream", f"s3://{bucket}/in/", f"s3://{bucket}/out/")
    summary = wait_for_run(s3, bucket, "out/")
    assert summary["counts"]["error"] == 3, summary
    rows = read_results(s3, bucket, "out/")
    assert all(r["status"] == "error" for r in rows)
    # the copies follow their original's error; nothing reached the cache
    assert sum(1 for r in rows if r.get("cached")) == 2
    assert entries(s3, bucket) == []


def test_keys_cover_everything_that_changes_the_answer():
    from moonbatch.workers import cache
    from moonbatch.workers.models import RunSpec, SkillOptions

    spec = RunSpec(run_id="r", input="s3://b/i/", output="s3://b/o/", shard_size=10,
                   max_shard_bytes=10**9, created_at=0, provider="moondream",
                   options=SkillOptions(skill="query", question="Any dog?"), cache=True)
    image = b"\x89PNG same bytes"
    key = cache.item_key(image, cache.fingerprint(spec))
    assert cache.item_key(image, cache.fingerprint(spec)) == key
    changed = [spec.model_copy(update=u) for u in (
        {"model": "moondream3.1"}, {"max_pixels": 10}, {"provider": "fal"},
        {"endpoint": "fal-ai/moondream3-preview/query"},
        {"options": SkillOptions(skill="query", question="Any cat?")},
        {"options": SkillOptions(skill="query", question="Any dog?", temperature=0.5)})]
    keys = {cache.item_key(image, cache.fingerprint(s)) for s in changed}
    keys.add(cache.item_key(image + b"!", cache.fingerprint(spec)))
    assert key not in keys and len(keys) == 7
    # a row's override is its request: the same key as a run asking that
    assert cache.item_key(image, cache.fingerprint(spec, {"question": "Any cat?"})) == \
        cache.item_key(image, cache.fingerprint(changed[4]))
    # an override equal to the run's option is the same request
    assert cache.item_key(image, cache.fingerprint(spec, {"question": "Any dog?"})) == key
    assert cache.entry_path(key) == f"v1/{key[:2]}/{key[2:4]}/{key}.json"
    # a sampled skill is not read unless asked; --no-cache reads nothing
    sampled = changed[-1]
    assert cache.reads(spec) and not cache.reads(sampled)
    assert cache.reads(sampled.model_copy(update={"cache_sampled": True}))
    assert not cache.reads(spec.model_copy(update={"cache": False}))


def test_scan_and_merge_fill_hits_and_copies(tmp_path):
    """The build's cache pass and the merge, over a local cache store: a hit is not sent, a
    copy follows its original in every round, errors are not written."""
    from moonbatch.workers import cache
    from moonbatch.workers.merge import fill_cached
    from moonbatch.workers.models import PlanItem, RunSpec, SkillOptions
    from moonbatch.workers.storage import LocalStore

    spec = RunSpec(run_id="r", input="s3://b/i/", output="s3://b/o/", shard_size=10,
                   max_shard_bytes=10**9, created_at=0, options=SkillOptions(skill="caption"),
                   cache=True)
    store = LocalStore(tmp_path)
    data = {"a": b"A", "b": b"B", "a2": b"A", "c": b"C", "b2": b"B", "gone": None}
    items = [PlanItem(k, 1) for k in data]

    def fetch(item):
        if data[item.id] is None:
            raise FileNotFoundError(item.id)
        return data[item.id]

    known = cache.item_key(b"C", cache.fingerprint(spec))
    store.put(cache.entry_path(known), orjson.dumps(
        {"v": 1, "of": "old", "result": {"caption": "cee"}, "usage": {}, "width": 3,
         "height": 4}))
    doc = cache.scan(items, spec, fetch, store, concurrency=3)
    assert doc["send"] == [0, 1, 5]  # a, b and the unreadable one
    assert doc["copies"] == {"2": 0, "4": 1} and doc["hits"] == {"3": known}
    assert doc["counts"]["lookups"] == 3 and set(doc["keys"]) == {"0", "1"}

    ok = orjson.dumps({"id": "a", "source": "s/a", "status": "ok", "result": {"caption": "x"},
                       "usage": {"input_tokens": 5, "output_tokens": 2}, "width": 1,
                       "height": 1})
    err = orjson.dumps({"id": "b", "source": "s/b", "status": "error",
                        "error": {"code": "processing_error", "message": "m"}, "width": 1,
                        "height": 1})
    rows = {0: ok, 1: err, 5: err}
    assert fill_cached(items, rows, doc, lambda it: "s/" + it.key, rnd=0) == 3
    assert orjson.loads(rows[3]) == {"id": "c", "source": "s/c", "status": "ok",
                                     "result": {"caption": "cee"},
                                     "usage": {"input_tokens": 0, "output_tokens": 0},
                                     "width": 3, "height": 4, "cached": True,
                                     "cache_of": "old"}
    copy = orjson.loads(rows[2])
    assert copy["result"] == {"caption": "x"} and copy["cache_of"] == "a" and copy["id"] == "a2"
    assert orjson.loads(rows[4])["status"] == "error" and orjson.loads(rows[4])["cached"]
    # round 1 retries b: its copy follows the new row
    retry = {1: orjson.dumps({**orjson.loads(ok), "id": "b", "source": "s/b"})}
    assert fill_cached(items, retry, doc, lambda it: "s/" + it.key, rnd=1) == 1
    assert orjson.loads(retry[4])["status"] == "ok"
    # only the sent ok row is written; an entry is written once
    assert cache.write_entries(store, doc, {0: ok, 1: err, 5: err}, "r") == 1
    assert cache.write_entries(store, doc, {0: ok}, "r") == 0
    entry = orjson.loads(store.get(cache.entry_path(doc["keys"]["0"])))
    assert entry["of"] == "a" and entry["result"] == {"caption": "x"}

    # reads off (a sampled run): everything is sent, keys still made for writing
    sampled = spec.model_copy(update={"options": SkillOptions(skill="caption", temperature=1)})
    doc = cache.scan(items, sampled, fetch, None)
    assert doc["send"] == list(range(6)) and not doc["hits"] and not doc["copies"]


def test_parquet_keeps_cached_and_cache_of():
    from moonbatch.workers.writers import parquet

    rows = [orjson.dumps({"id": 1, "source": "s", "status": "ok", "result": {"caption": "x"},
                          "usage": {"input_tokens": 0, "output_tokens": 0}, "width": 1,
                          "height": 2, "cached": True, "cache_of": "0"}),
            orjson.dumps({"id": 0, "source": "s", "status": "ok", "result": {"caption": "x"},
                          "usage": {"input_tokens": 3, "output_tokens": 1}, "width": 1,
                          "height": 2})]
    decoded = list(parquet.decode(parquet.encode(rows)))
    assert decoded[0]["cached"] is True and decoded[0]["cache_of"] == "0"
    assert "cached" not in decoded[1]
    import io

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(parquet.encode(rows)))
    assert table.column("cached").to_pylist() == [True, False]
    assert str(table.schema.field("cache_of").type) == "string"



def test_runs_record_the_cache_settings(tmp_path, monkeypatch):
    """A new run's spec records whether it caches, where, and whether a sampling run reads:
    MOONBATCH_CACHE and MOONBATCH_CACHE_URL, overridden by --no-cache (``cache=False``)."""
    from moonbatch.config import reload_settings
    from moonbatch.producer import submit as starting

    def spec(**options):
        return starting.new_spec(str(tmp_path / "in"), str(tmp_path / "out"), reload_settings(),
                                 **options)

    assert not spec().cache  # the suite's MOONBATCH_CACHE=0
    monkeypatch.setenv("MOONBATCH_CACHE", "1")
    monkeypatch.setenv("MOONBATCH_STATE_URL", str(tmp_path / "state"))
    on = spec()
    assert on.cache and on.cache_url == str(tmp_path / "state") + "/cache/"
    assert not on.cache_sampled
    assert not spec(cache=False).cache
    assert spec(cache_sampled=True, temperature=0.7).cache_sampled
    monkeypatch.setenv("MOONBATCH_CACHE_URL", "s3://bucket/answers")
    assert spec().cache_url == "s3://bucket/answers/"
    monkeypatch.undo()
    reload_settings()  # the session's settings again
