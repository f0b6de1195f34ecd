"""WebDataset ``.tar`` shards and Parquet files of image bytes as INPUT: fixtures built here
from scikit-image's photographs (img2dataset's tar layout with ``.txt``/``.json`` sidecars;
the Hugging Face datasets Parquet layout), local and on S3 (moto's server), run end to end
through the CLI with the Batch API emulator and with ``--provider fal``; every row is checked
against the photo it came from. Unit tests check the tar header walk (offsets as ``tarfile``
and ``webdataset`` see them, no download, no disk write) and the Parquet row-group cache."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moonbatch.workers.readers import InputError, ItemFetcher, ListingStats
from moonbatch.workers.readers.unique import UniqueKeys
from moonbatch.workers.storage import LocalStore, ObjectInfo, open_store
from tests.conftest import SKIMAGE_PHOTOS, expected_result, photos_dir, read_json, read_results, run_cli
from tests.test_fal_provider import expected_row

PHOTOS = {name: (photos_dir() / name).read_bytes() for name in SKIMAGE_PHOTOS}
SIZES = {name: Image.open(io.BytesIO(data)).size for name, data in PHOTOS.items()}
QUESTION = "What is shown?"
FAL_QUERY = "fal-ai/moondream3-preview/query"
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


# -- fixtures ------------------------------------------------------------------------------------
def make_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar of ``samples`` (``(__key__, {suffix: bytes})``), members of a sample consecutive,
    as img2dataset writes them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime = len(data), 1700000000
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample(key: str, photo: str) -> tuple[str, dict[str, bytes]]:
    """An img2dataset sample: the photo under its own extension, a caption, a metadata json."""
    ext = photo.rsplit(".", 1)[1]
    return key, {ext: PHOTOS[photo], "txt": f"a photo: {photo}".encode(),
                 "json": json.dumps({"key": key, "url": f"http://x/{photo}"}).encode()}


def tar_shards() -> tuple[dict[str, bytes], dict[str, str]]:
    """Two shards (``00000.tar`` with folder keys and a sample without image, ``00001.tar``
    with flat keys); returns ``({tar name: bytes}, {__key__: photo})``."""
    names = list(SKIMAGE_PHOTOS)
    keys0 = {f"00000/{i:09d}": p for i, p in enumerate(names[:4])}
    keys1 = {f"{10000 + i:09d}": p for i, p in enumerate(names[4:])}
    shard0 = [sample(k, p) for k, p in keys0.items()]
    shard0.insert(2, ("00000/no-image", {"txt": b"a caption without its image", "json": b"{}"}))
    return ({"00000.tar": make_tar(shard0), "00001.tar": make_tar([sample(k, p) for k, p in
                                                                  keys1.items()])},
            {**keys0, **keys1})


def hf_parquet(photos: list[str], *, ids: list | None, row_group_size: int,
               questions: list[str | None] | None = None, null_row: int | None = None) -> bytes:
    """A Parquet file in the datasets layout: ``image`` a ``{bytes, path}`` struct, ``id``
    (when ``ids``), ``question`` overrides (when given), a null image at ``null_row``."""
    cells = [None if i == null_row else {"bytes": PHOTOS[p], "path": p}
             for i, p in enumerate(photos)]
    columns = {"image": pa.array(cells, IMAGE_TYPE),
               "caption": pa.array([f"about {p}" for p in photos])}
    if ids is not None:
        columns = {"id": pa.array(ids), **columns}
    if questions is not None:
        columns["question"] = pa.array(questions, pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, row_group_size=row_group_size)
    return buf.getvalue()


def put(where, s3, bucket: str | None, files: dict[str, bytes]) -> None:
    """Write ``files`` under a local folder ``where`` or an S3 prefix ``where`` of ``bucket``."""
    for name, data in files.items():
        if bucket is None:
            path = Path(where) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            s3.put_object(Bucket=bucket, Key=where + name, Body=data)


def results(s3, bucket: str | None, out: str) -> list[dict]:
    if bucket is not None:
        return read_results(s3, bucket, out)
    rows = []
    for path in sorted((Path(out) / "results").glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def plan_doc(s3, bucket: str | None, out: str) -> dict:
    if bucket is not None:
        return read_json(s3, bucket, out + "_moonbatch/plan.json")
    return json.loads((Path(out) / "_moonbatch" / "plan.json").read_text())


def check_row(row: dict, photo: str, provider: str, question: str | None) -> None:
    """An ok row of ``photo``: its size, and the emulator's answer for its pixels."""
    assert row["status"] == "ok", row
    assert (row["width"], row["height"]) == SIZES[photo], (row["id"], photo)
    if provider == "moondream":
        request = {"skill": "query", "question": question} if question else {"skill": "caption"}
        assert row["result"] == expected_result(PHOTOS[photo], request), (row["id"], photo)
    else:
        want, _ = expected_row(FAL_QUERY, {"prompt": question}, PHOTOS[photo], "query")
        got = {k: v for k, v in row["result"].items() if k != "raw"}
        assert got == want, (row["id"], photo)


def run(provider: str, inp: str, out: str, env, *extra: str, query: bool = False) -> None:
    """``moonbatch run INPUT OUTPUT`` on the session fleet: a caption run (a query run asking
    ``QUESTION`` with ``query``) on the Batch API, a query run on fal."""
    skill = ["--skill", "query", "--question", QUESTION] if query or provider == "fal" else \
        ["--skill", "caption"]
    if provider == "fal":
        skill += ["--provider", "fal"]
    proc = run_cli(["run", inp, out, *skill, "--shard-size", "4", "--workers", "0",
                    "--timeout", "120", *extra], env)
    assert "completed" in proc.stdout


# -- WebDataset end to end -----------------------------------------------------------------------
@pytest.mark.parametrize("provider,where,whole", [
    ("moondream", "s3", "file"), ("fal", "s3", "prefix"), ("moondream", "local", "prefix"),
    ("fal", "local", "file")])
def test_webdataset_runs(provider, where, whole, s3, bucket, env, fleet, tmp_path):
    shards, photo_of = tar_shards()
    files = dict(shards)
    if whole == "prefix":  # img2dataset's sidecars next to the shards
        files.update({"00000.parquet": b"PAR1", "00000_stats.json": b"{}"})
    b = bucket if where == "s3" else None
    root = f"s3://{bucket}/wds/" if b else str(tmp_path / "wds") + "/"
    put("wds/" if b else root, s3, b, files)
    out = f"s3://{bucket}/out/" if b else str(tmp_path / "out") + "/"
    if whole == "file":  # one tar holding every sample
        single = make_tar([sample(k, p) for k, p in photo_of.items()]
                          + [("zz/no-image", {"txt": b"no image"})])
        put("wds/" if b else root, s3, b, {"all.tar": single})
        inp, extra = root + "all.tar", ()
    else:
        inp, extra = root, ("--input-format", "webdataset")
    run(provider, inp, out, env, *extra)

    rows = results(s3, b, "out/" if b else out)
    assert sorted(r["id"] for r in rows) == sorted(photo_of)  # exactly one row per sample
    for row in rows:
        check_row(row, photo_of[row["id"]], provider, QUESTION if provider == "fal" else None)
        assert row["source"].split("#")[0].endswith(".tar")
    plan = plan_doc(s3, b, "out/" if b else out)
    assert plan["items"] == len(photo_of)
    assert plan["skipped"] == (1 if whole == "file" else 3)  # the imageless sample (+ sidecars)


def test_webdataset_prefix_auto_and_dry_run(s3, bucket, env):
    """``--input-format auto`` reads a prefix of .tar shards (with sidecars, no image) as
    WebDataset; a dry run plans it without reading image bytes."""
    shards, photo_of = tar_shards()
    put("wds/", s3, bucket, {**shards, "00000_stats.json": b"{}"})
    proc = run_cli(["run", f"s3://{bucket}/wds/", f"s3://{bucket}/out/", "--dry-run", "--json"],
                   env)
    report = json.loads(proc.stdout)
    assert report["items"] == len(photo_of) and report["skipped"] == 2
    assert report["image_bytes"] == sum(len(PHOTOS[p]) for p in photo_of.values())


def test_webdataset_duplicate_key_is_refused(s3, bucket, env, tmp_path):
    shards, _ = tar_shards()
    dup = make_tar([sample("00000/000000000", "horse.png")])  # a key of 00000.tar again
    put(str(tmp_path) + "/", s3, None, {**shards, "00002.tar": dup})
    proc = run_cli(["run", str(tmp_path), str(tmp_path / "out"), "--dry-run",
                    "--input-format", "webdataset"], env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "00000/000000000" in proc.stderr and "appears twice" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- Parquet end to end --------------------------------------------------------------------------
@pytest.mark.parametrize("provider,where", [("moondream", "s3"), ("fal", "local")])
def test_parquet_file_with_int_ids_and_overrides(provider, where, s3, bucket, env, fleet,
                                                 tmp_path):
    """One file, int ids, 3 row groups, a per-row question, a null image cell."""
    photos = list(SKIMAGE_PHOTOS)
    ids = [1000 + 7 * i for i in range(len(photos))]
    questions = [None, "Is it a cat?", None, None, "Any stars?", None, None, None, None]
    data = hf_parquet(photos, ids=ids, row_group_size=4, questions=questions, null_row=6)
    b = bucket if where == "s3" else None
    root = f"s3://{bucket}/hf/" if b else str(tmp_path / "hf") + "/"
    put("hf/" if b else root, s3, b, {"train-00000-of-00001.parquet": data})
    out = f"s3://{bucket}/out/" if b else str(tmp_path / "out") + "/"
    run(provider, root + "train-00000-of-00001.parquet", out, env, query=True)

    rows = results(s3, b, "out/" if b else out)
    assert sorted(r["id"] for r in rows) == ids and all(isinstance(r["id"], int) for r in rows)
    by_id = {r["id"]: r for r in rows}
    for i, (item_id, photo) in enumerate(zip(ids, photos, strict=True)):
        row = by_id[item_id]
        if i == 6:
            assert row["status"] == "error" and row["error"]["code"] == "empty_object", row
            assert row["width"] is None
            continue
        check_row(row, photo, provider, questions[i] or QUESTION)
        assert row["source"].endswith(f"#{i // 4}/{i % 4}")


@pytest.mark.parametrize("provider", ["moondream", "fal"])
def test_parquet_prefix_of_files_with_and_without_ids(provider, s3, bucket, env, fleet):
    """Two files: string ids; no id column (ids ``<file>#<row>``); a sidecar skipped."""
    photos = list(SKIMAGE_PHOTOS)
    first, second = photos[:5], photos[5:]
    put("hf/", s3, bucket, {
        "data/train-00000.parquet": hf_parquet(first, ids=[f"img-{p}" for p in first],
                                               row_group_size=2),
        "data/train-00001.parquet": hf_parquet(second, ids=None, row_group_size=3),
        "README.md": b"# dataset card"})
    run(provider, f"s3://{bucket}/hf/", f"s3://{bucket}/out/", env, "--input-format", "parquet")
    want = {**{f"img-{p}": p for p in first},
            **{f"data/train-00001.parquet#{i}": p for i, p in enumerate(second)}}
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(want)
    for row in rows:
        check_row(row, want[row["id"]], provider, QUESTION if provider == "fal" else None)
    plan = read_json(s3, bucket, "out/_moonbatch/plan.json")
    assert plan["skipped"] == 1 and plan["skipped_examples"] == ["README.md"]


def test_parquet_user_errors_are_one_line(env, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.parquet").write_bytes(hf_parquet(["horse.png"], ids=[1], row_group_size=1))
    (tmp_path / "in" / "dup.parquet").write_bytes(hf_parquet(["horse.png", "camera.png"],
                                                            ids=[5, 5], row_group_size=1))
    cases = [
        (["--image-column", "picture"], "x.parquet", "no column 'picture'"),
        (["--image-column", "caption"], "x.parquet", "holds strings"),  # prefix: not a manifest
        ([], "dup.parquet", "id 5 appears twice"),
    ]
    for extra, name, message in cases:
        inp = str(tmp_path / "in") + "/" + ("" if "strings" in message else name)
        fmt = ["--input-format", "parquet"] if "strings" in message else []
        proc = run_cli(["run", inp, str(tmp_path / "out"), "--dry-run", *fmt, *extra], env,
                       check=False)
        assert proc.returncode == 2, (extra, proc.stdout, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_parquet_manifest_is_delegated(env, tmp_path):
    """A Parquet file whose image column holds strings is a manifest."""
    from moonbatch.workers.models import RunSpec, SkillOptions
    from moonbatch.workers.readers import open_reader

    for name in ("horse.png", "camera.png"):
        (tmp_path / name).write_bytes(PHOTOS[name])
    pq.write_table(pa.table({"id": [1, 2], "image": ["horse.png", "camera.png"]}),
                   tmp_path / "m.parquet")
    spec = RunSpec(run_id="r", input=str(tmp_path / "m.parquet"), output=str(tmp_path / "o") + "/",
                   options=SkillOptions(skill="caption"), input_kind="parquet", shard_size=10,
                   max_shard_bytes=10**8, created_at=0)
    store = LocalStore(tmp_path)
    items = list(open_reader(spec, store, None).iter_items(ListingStats()))
    assert [i.id for i in items] == [1, 2]
    fetcher = ItemFetcher(store, _settings())
    assert [fetcher.get(i) for i in items] == [PHOTOS["horse.png"], PHOTOS["camera.png"]]


# -- unit: the tar header walk -------------------------------------------------------------------
class _Writes:
    """Files opened for writing while ``on`` (a real audit hook: ``open`` events)."""

    on = False
    seen: list[str] = []

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.on and event == "open" and isinstance(args[1], str) and set(args[1]) & set("wax+"):
            cls.seen.append(str(args[0]))


sys.addaudithook(_Writes.hook)


class CountingStore:
    """A real store, with its ranged GETs counted (what a listing costs)."""

    def __init__(self, store) -> None:
        self.inner, self.url, self.gets, self.bytes = store, store.url, 0, 0

    def get_range(self, key: str, start: int, length: int) -> bytes:
        data = self.inner.get_range(key, start, length)
        self.gets += 1
        self.bytes += len(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _settings():
    from moonbatch.config import get_settings

    return get_settings()


def test_tar_walk_matches_tarfile_and_webdataset_without_download(s3, bucket, env):
    import webdataset

    from moonbatch.workers.readers.webdataset import iter_tar, key_and_suffix

    shards, photo_of = tar_shards()
    data = shards["00000.tar"]
    s3.put_object(Bucket=bucket, Key="t/00000.tar", Body=data)
    store = CountingStore(open_store(f"s3://{bucket}/t/", endpoint_url=env["MOONBATCH_S3_ENDPOINT_URL"]))
    stats = ListingStats()
    _Writes.on, _Writes.seen = True, []
    try:
        items = list(iter_tar(store, ObjectInfo("00000.tar", len(data)), stats, block=4096))
    finally:
        _Writes.on = False
    assert _Writes.seen == []  # nothing written to disk
    assert store.bytes < len(data) / 20, (store.bytes, len(data))  # headers, not images
    assert stats.skipped_examples == ["00000.tar#00000/no-image"] and stats.items == 4

    # Offsets and sizes are tarfile's, and the bytes there are the photo.
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = {m.name: m for m in tf.getmembers()}
    for item in items:
        offset, size = map(int, item.ref.rpartition("#")[2].split("+"))
        name = next(n for n in members if n.startswith(item.id + ".") and
                    n.rsplit(".", 1)[1] in ("png", "jpg", "gif"))
        assert (offset, size) == (members[name].offset_data, members[name].size)
        assert data[offset:offset + size] == PHOTOS[photo_of[item.id]]

    # Keys and samples are webdataset's.
    samples = list(webdataset.tariterators.tar_file_expander(
        [{"stream": io.BytesIO(data), "url": "00000.tar"}]))
    grouped = list(webdataset.tariterators.group_by_keys(samples))
    assert [s["__key__"] for s in grouped if any(k in s for k in ("png", "jpg", "gif"))] == \
        [i.id for i in items]
    for name in ("a/b.c/d.seg.PNG", "__meta__", "x/__k__.txt", "noext", "00000/12.tar.gz"):
        want = webdataset.tariterators.base_plus_ext(name)
        got = key_and_suffix(name)
        assert got == want or (got == (None, None) and name in ("__meta__", "x/__k__.txt")), name

    # A worker reads an image with one ranged GET.
    fetcher = ItemFetcher(store, _settings())
    before = store.gets
    assert fetcher.get(items[0]) == PHOTOS[photo_of[items[0].id]]
    assert store.gets == before + 1


def test_tar_that_is_not_a_tar_is_refused(tmp_path):
    from moonbatch.workers.readers.webdataset import iter_tar

    (tmp_path / "x.tar").write_bytes(b"\x1f\x8b" + b"\x00" * 600)
    with pytest.raises(InputError, match="not an uncompressed tar"):
        list(iter_tar(LocalStore(tmp_path), ObjectInfo("x.tar", 602), ListingStats()))


# -- unit: Parquet planning and the row-group cache ----------------------------------------------
def test_parquet_planning_reads_no_image_bytes_and_cache_is_bounded(tmp_path):
    from moonbatch.workers.readers.parquet import CACHED_ROW_GROUPS, iter_file

    photos = list(SKIMAGE_PHOTOS) * 2  # 18 rows, 6 row groups of 3
    ids = list(range(len(photos)))
    (tmp_path / "p.parquet").write_bytes(hf_parquet(photos, ids=ids, row_group_size=3))
    store = CountingStore(LocalStore(tmp_path))
    info = ObjectInfo("p.parquet", (tmp_path / "p.parquet").stat().st_size)
    items = list(iter_file(store, info, ListingStats(), UniqueKeys(), id_column="id",
                           image_column="image"))
    assert [i.id for i in items] == ids
    assert store.bytes < info.size / 20, (store.bytes, info.size)  # footer and ids only
    for rg in range(6):  # the size estimate: the row group's image bytes per row
        group = [len(PHOTOS[p]) for p in photos[3 * rg:3 * rg + 3]]
        assert sum(group) / 3 <= items[3 * rg].size <= sum(group) / 3 + 200

    # In plan order, each row group is read once, with one ranged GET.
    fetcher = ItemFetcher(store, _settings())
    gets = store.gets
    assert [fetcher.get(i) for i in items] == [PHOTOS[p] for p in photos]
    cache = fetcher.cache["parquet"]
    assert cache.loads == 6 and store.gets == gets + 6 + 1  # + the footer, read once
    assert len(cache.groups) == CACHED_ROW_GROUPS

    # A worker's threads share the cache (one lock): every image right, the bound kept.
    fetcher = ItemFetcher(store, _settings())
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(fetcher.get, items))
    assert got == [PHOTOS[p] for p in photos]
    assert len(fetcher.cache["parquet"].groups) <= CACHED_ROW_GROUPS

    # An evicted group is read again; the cache stays within its bound. (Which groups the
    # threads left cached depends on their order: the last two groups, read in turn, evict
    # the first for certain.)
    cache = fetcher.cache["parquet"]
    fetcher.get(items[-4]), fetcher.get(items[-1])
    loads = cache.loads
    assert fetcher.get(items[0]) == PHOTOS[photos[0]]
    assert cache.loads == loads + 1 and len(cache.groups) <= CACHED_ROW_GROUPS


def test_unique_keys_keep_8_bytes_a_key_and_name_a_repeat_in_a_second_pass():
    """``UniqueKeys``: the first pass keeps digests (no key), the second names the repeat and
    where its first occurrence stood, keeping only suspects' keys."""
    keys = UniqueKeys()
    listing = [f"shard-{i:06d}/sample" for i in range(50_000)] + ["shard-000123/sample"]
    assert all(keys.seen_at(k) is None for k in listing)
    assert keys._digests.itemsize == 8 and len(keys._digests) == len(listing)
    suspects = keys.suspects()
    assert len(suspects) == 1
    named = UniqueKeys(suspects)
    found = [(k, first) for i, k in enumerate(listing) if (first := named.seen_at(k, i)) is not None]
    assert found == [("shard-000123/sample", 123)]
    assert list(named._first) == ["shard-000123/sample"]  # only the suspect's key was kept
    unique = UniqueKeys()
    for k in listing[:-1]:
        unique.seen_at(k)
    assert unique.suspects() == frozenset()
