"""moonbatch.workers.storage: LocalStore on a temp directory, S3Store on moto's real server, normalize_url."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import moonbatch.workers.storage as storage_module
from moonbatch.workers.storage import (
    LocalStore,
    NotFound,
    ObjectInfo,
    S3Store,
    StorageError,
    get_json,
    get_json_or_none,
    normalize_url,
    open_store,
    put_json,
)

# --------------------------------------------------------------------------------------------
# LocalStore


def test_local_put_get_exists_delete(tmp_path):
    store = LocalStore(tmp_path)
    assert store.url == str(tmp_path.resolve()) + os.sep
    assert not store.exists("a/b/c.bin")
    assert store.put("a/b/c.bin", b"\x00\x01hello") is True
    assert (tmp_path / "a" / "b" / "c.bin").read_bytes() == b"\x00\x01hello"
    assert store.exists("a/b/c.bin")
    assert store.get("a/b/c.bin") == b"\x00\x01hello"
    assert store.put("a/b/c.bin", b"second") is True  # plain put overwrites
    assert store.get("a/b/c.bin") == b"second"
    store.delete("a/b/c.bin")
    assert not store.exists("a/b/c.bin")
    store.delete("a/b/c.bin")  # deleting a missing object is fine
    with pytest.raises(NotFound):
        store.get("a/b/c.bin")


def test_local_get_range(tmp_path):
    store = LocalStore(tmp_path)
    store.put("r.bin", bytes(range(100)))
    assert store.get_range("r.bin", 0, 16) == bytes(range(16))
    assert store.get_range("r.bin", 90, 50) == bytes(range(90, 100))  # clipped at the end
    assert store.get_range("r.bin", 200, 10) == b""
    store.put("empty", b"")
    assert store.get_range("empty", 0, 16) == b""
    with pytest.raises(NotFound):
        store.get_range("missing.bin", 0, 16)


def test_local_put_if_absent(tmp_path):
    store = LocalStore(tmp_path)
    assert store.put("state/lock.json", b"first", if_absent=True) is True
    assert store.put("state/lock.json", b"second", if_absent=True) is False
    assert store.get("state/lock.json") == b"first"
    # No temp files are left behind, by either call.
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["lock.json"]


def test_local_put_leaves_no_temp_files(tmp_path):
    store = LocalStore(tmp_path)
    for i in range(3):
        store.put("d/x.bin", bytes([i]) * 10)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["x.bin"]


@pytest.mark.parametrize("key", ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "..", "a/../.."])
def test_local_keys_escaping_the_root_raise(tmp_path, key):
    store = LocalStore(tmp_path / "root")
    for op in (lambda: store.get(key), lambda: store.put(key, b"x"), lambda: store.exists(key),
               lambda: store.get_range(key, 0, 4), lambda: store.delete(key)):
        with pytest.raises(StorageError):
            op()
    assert not (tmp_path / "escape.txt").exists()


def test_local_symlink_out_of_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    store = LocalStore(root)
    with pytest.raises(StorageError):
        store.get("link/secret.txt")


def test_local_not_found(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(NotFound):
        store.get("nope.jpg")
    (tmp_path / "dir").mkdir()
    with pytest.raises(NotFound):
        store.get("dir")  # a directory is not an object
    store.put("file", b"x")
    with pytest.raises(NotFound):
        store.get("file/child")
    assert issubclass(NotFound, StorageError)
    assert get_json_or_none(store, "nope.json") is None


def test_local_capped_get_reads_the_file_not_the_cap(tmp_path):
    """A capped read of a small file allocates about its size, not the cap (a worker reads
    thousands of tiny images under a 100 MB cap); the cap still holds at its boundary."""
    import tracemalloc

    from moonbatch.workers.storage import TooLarge

    store = LocalStore(tmp_path)
    store.put("small.png", b"x" * 300)
    store.put("edge.bin", b"y" * 4096)
    tracemalloc.start()
    try:
        assert store.get("small.png", max_bytes=200_000_000) == b"x" * 300
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert store.get("edge.bin", max_bytes=4096) == b"y" * 4096
    with pytest.raises(TooLarge):
        store.get("edge.bin", max_bytes=4095)
    store.put("empty", b"")
    assert store.get("empty", max_bytes=10) == b""


def test_local_iter_objects(tmp_path):
    store = LocalStore(tmp_path)
    data = {"b.jpg": b"12", "a/z.png": b"123", "a/b/c.gif": b"", "ü dir/x y.jpg": b"1"}
    for key, body in data.items():
        store.put(key, body)
    listed = list(store.iter_objects())
    assert sorted(listed, key=lambda o: o.key) == sorted(
        (ObjectInfo(k, len(v)) for k, v in data.items()), key=lambda o: o.key)
    assert sorted(o.key for o in store.iter_objects("a/")) == ["a/b/c.gif", "a/z.png"]
    assert list(store.iter_objects("missing/")) == []


def test_json_helpers_local(tmp_path):
    store = LocalStore(tmp_path)
    assert put_json(store, "doc.json", {"name": "ünï", "n": 1}) is True
    assert store.get("doc.json") == '{"name":"ünï","n":1}'.encode()
    assert get_json(store, "doc.json") == {"name": "ünï", "n": 1}
    assert put_json(store, "doc.json", {"other": 2}, if_absent=True) is False
    assert get_json(store, "doc.json") == {"name": "ünï", "n": 1}
    with pytest.raises(NotFound):
        get_json(store, "missing.json")


def test_local_url_for(tmp_path):
    store = LocalStore(tmp_path)
    assert store.url_for("a/b.jpg") == str(tmp_path.resolve() / "a" / "b.jpg")


# --------------------------------------------------------------------------------------------
# normalize_url / open_store


@pytest.mark.parametrize("url, expected", [
    ("s3://bucket/prefix", "s3://bucket/prefix/"),
    ("s3://bucket/prefix/", "s3://bucket/prefix/"),
    ("s3://bucket/a/b/c", "s3://bucket/a/b/c/"),
    ("s3://bucket", "s3://bucket/"),
    ("s3://bucket/", "s3://bucket/"),
])
def test_normalize_s3_urls(url, expected):
    assert normalize_url(url) == expected
    assert normalize_url(expected) == expected  # idempotent


def test_normalize_local_relative_path(tmp_path):
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        got = normalize_url("data/images")
    finally:
        os.chdir(old)
    assert got == str(tmp_path.resolve() / "data" / "images") + os.sep
    assert Path(got).is_absolute()
    assert normalize_url(got) == got


def test_normalize_local_absolute_and_file_urls(tmp_path):
    expected = str(tmp_path.resolve()) + os.sep
    assert normalize_url(str(tmp_path)) == expected
    assert normalize_url(str(tmp_path) + "/") == expected
    assert normalize_url("file://" + str(tmp_path)) == expected


@pytest.mark.parametrize("url", ["http://example.com/x", "gs://bucket/prefix", "ftp://host/x", "s3:///prefix",
                                 "s3://"])
def test_normalize_rejects_bad_urls(url):
    with pytest.raises(ValueError):
        normalize_url(url)


def test_open_store_local(tmp_path):
    store = open_store(str(tmp_path / "x"))
    assert isinstance(store, LocalStore)
    assert store.url == str((tmp_path / "x").resolve()) + os.sep


# --------------------------------------------------------------------------------------------
# S3Store on moto's server


@pytest.fixture
def store(s3_endpoint, bucket) -> S3Store:
    return S3Store(bucket, "pre/", storage_module.s3_client(s3_endpoint))


def test_s3_iter_objects_paginates(store, s3, bucket):
    store.page_size = 7
    expected = {}
    for i in range(20):
        key = f"img/{i:02d}.jpg"
        body = b"x" * (i + 1)
        assert store.put(key, body) is True
        expected[key] = i + 1
    s3.put_object(Bucket=bucket, Key="other/outside.jpg", Body=b"no")  # outside the prefix
    s3.put_object(Bucket=bucket, Key="pre/folder/", Body=b"")  # a folder placeholder

    calls = []

    def record(params, **_):
        calls.append(params.get("MaxKeys"))

    events = store.client.meta.events
    events.register("provide-client-params.s3.ListObjectsV2", record)
    try:
        listed = list(store.iter_objects())
    finally:
        events.unregister("provide-client-params.s3.ListObjectsV2", record)
    keys = [o.key for o in listed]
    assert len(keys) == len(set(keys)) == 20
    assert {o.key: o.size for o in listed} == expected
    assert len(calls) == 3 and set(calls) == {7}  # 21 keys with the placeholder: 3 pages


def test_s3_iter_objects_with_prefix(store):
    for key in ("a/1.jpg", "a/2.jpg", "b/3.jpg"):
        store.put(key, b"data")
    assert sorted(o.key for o in store.iter_objects("a/")) == ["a/1.jpg", "a/2.jpg"]
    assert list(store.iter_objects("none/")) == []


def test_s3_put_get_exists_delete(store, s3, bucket):
    assert not store.exists("doc.bin")
    assert store.put("doc.bin", b"\x00payload") is True
    assert s3.get_object(Bucket=bucket, Key="pre/doc.bin")["Body"].read() == b"\x00payload"
    assert store.exists("doc.bin")
    assert store.get("doc.bin") == b"\x00payload"
    store.delete("doc.bin")
    assert not store.exists("doc.bin")
    store.delete("doc.bin")  # idempotent


def test_s3_put_if_absent(store):
    assert store.put("lock.json", b"first", if_absent=True) is True
    assert store.put("lock.json", b"second", if_absent=True) is False  # 412 Precondition Failed
    assert store.get("lock.json") == b"first"
    assert store.put("lock.json", b"third") is True  # a plain put overwrites
    assert store.get("lock.json") == b"third"


def test_put_new_returns_the_version_a_swap_takes(store, tmp_path):
    for st in (store, LocalStore(tmp_path)):
        version = st.put_new("ledger.json", b"first")
        assert version is not None
        assert st.put_new("ledger.json", b"second") is None  # exists: nothing written
        assert st.get_versioned("ledger.json") == (b"first", version)
        assert st.swap("ledger.json", b"third", version) is not None
        assert st.get("ledger.json") == b"third"


def test_s3_not_found(store):
    with pytest.raises(NotFound) as info:
        store.get("missing.jpg")
    assert "missing.jpg" in str(info.value) and store.url in str(info.value)
    with pytest.raises(NotFound):
        store.get_range("missing.jpg", 0, 16)
    assert get_json_or_none(store, "missing.json") is None


def test_s3_missing_bucket_is_a_storage_error(s3_endpoint):
    store = S3Store("no-such-bucket-moonbatch", "", storage_module.s3_client(s3_endpoint))
    with pytest.raises(StorageError):
        store.put("x", b"y")


def test_s3_get_range(store):
    store.put("r.bin", bytes(range(100)))
    assert store.get_range("r.bin", 0, 16) == bytes(range(16))
    assert store.get_range("r.bin", 10, 5) == bytes(range(10, 15))
    assert store.get_range("r.bin", 95, 50) == bytes(range(95, 100))
    assert store.get_range("r.bin", 0, 0) == b""
    store.put("empty", b"")
    assert store.get_range("empty", 0, 16) == b""


@pytest.mark.parametrize("key", ["with space/and more spaces.jpg", "ünïcødé/写真 猫.png",
                                 "mixed é + plus & amp=eq%pct.jpg"])
def test_s3_awkward_keys_round_trip(store, key):
    body = key.encode("utf-8") * 3
    assert store.put(key, body) is True
    assert store.exists(key)
    assert store.get(key) == body
    assert store.get_range(key, 0, 4) == body[:4]
    assert [(o.key, o.size) for o in store.iter_objects()] == [(key, len(body))]
    assert store.url_for(key) == f"{store.url}{key}"
    store.delete(key)
    assert not store.exists(key)


def test_s3_json_helpers(store):
    assert put_json(store, "_moonbatch/spec.json", {"run": "r1", "name": "ünï"}, if_absent=True) is True
    assert put_json(store, "_moonbatch/spec.json", {"run": "r2"}, if_absent=True) is False
    assert get_json(store, "_moonbatch/spec.json") == {"run": "r1", "name": "ünï"}


def test_open_store_s3(s3_endpoint, bucket):
    store = open_store(f"s3://{bucket}/some/prefix", endpoint_url=s3_endpoint)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.url) == (bucket, "some/prefix/", f"s3://{bucket}/some/prefix/")
    store.put("k", b"v")
    assert store.get("k") == b"v"
    assert store.client is storage_module.s3_client(s3_endpoint)  # shared per endpoint


def test_s3_client_reads_timestamps_as_boto3_does(store, s3, bucket):
    """The shared client reads S3's timestamps without dateutil (``_timestamp``): the listing's
    ``LastModified`` (ISO 8601) and a HEAD's (an HTTP date) are the datetimes boto3 gives."""
    store.put("a.jpg", b"data")
    ours = store.client.list_objects_v2(Bucket=bucket, Prefix="pre/")["Contents"][0]
    theirs = s3.list_objects_v2(Bucket=bucket, Prefix="pre/")["Contents"][0]
    assert ours["LastModified"] == theirs["LastModified"]
    assert ours["LastModified"].utcoffset() is not None  # aware, as boto3's
    head = store.client.head_object(Bucket=bucket, Key="pre/a.jpg")["LastModified"]
    assert head == s3.head_object(Bucket=bucket, Key="pre/a.jpg")["LastModified"]
