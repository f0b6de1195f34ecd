"""Manifest INPUTs (CSV, JSONL, Parquet; local and on S3) end to end through the CLI and a
worker of the module's own, for both providers: every kind of image reference (a relative key against the
manifest's folder or ``--base``, an S3 URI in another bucket, a local path, an http URL of a
real local HTTP server), ids of several JSON types, per-row overrides checked against the
emulators' answers, and the errors a manifest can hold (duplicate ids before anything is
written, a missing image, a bad override)."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import threading
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import Worker, expected_result, photos_dir, read_results, run_cli

SECRET = "token=s3cr3t"


@pytest.fixture(scope="module")
def http_photos():
    """A real HTTP server over scikit-image's photos: ``http://127.0.0.1:PORT/``."""
    handler = functools.partial(_QuietHandler, directory=str(photos_dir()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def trusted(env, http_photos, tmp_path_factory):
    """The env of a worker of this module's own that trusts these manifests' references (the
    defaults refuse them: a loopback URL, local files named by a manifest on S3): it may read
    ``http_photos`` and the session's temporary files."""
    queue = "manifest-" + uuid.uuid4().hex[:8]
    port = http_photos.rsplit(":", 1)[1].strip("/")
    wenv = {**env, "MOONBATCH_QUEUE": queue, "MOONBATCH_ALLOW_PRIVATE_HOSTS": f"127.0.0.1:{port}",
            "MOONBATCH_ALLOW_LOCAL_FILES": str(tmp_path_factory.getbasetemp())}
    with Worker(wenv, queue, tmp_path_factory.mktemp("manifest-worker") / "worker.log",
                concurrency=4):
        yield {**env, "MOONBATCH_QUEUE": queue}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def photo(name: str) -> bytes:
    return (photos_dir() / name).read_bytes()


def write_manifest(path: Path, fmt: str, rows: list[dict], columns: list[str]) -> None:
    """``rows`` as a CSV (all strings, empty cells for None), JSONL (None fields left out) or
    Parquet (nullable columns) file."""
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                                for r in rows))
    else:
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path,
                       row_group_size=3)  # several row groups


# format, where the manifest lives, provider, skill, override column, id/image column names
CASES = {
    "csv-s3-moondream-caption": ("csv", "s3", "moondream", "caption", "length", "id", "image"),
    "jsonl-local-fal-query-base": ("jsonl", "local", "fal", "query", "question", "id", "image"),
    "parquet-s3-fal-caption": ("parquet", "s3", "fal", "caption", "length", "key", "url"),
    "parquet-local-moondream-detect": ("parquet", "local", "moondream", "detect", "object", "id",
                                       "image"),
}
# Ids of each case: CSV ids are strings; JSONL ids of mixed types; a Parquet column has one type.
IDS = {"csv": ["7", "b", "2.5", "d", "11", "f", "3.25", "h", "12"],
       "jsonl": [7, "b", 2.5, "d", 11, "f", 3.25, True, 12],
       "parquet-s3": [7, 1, 2, 3, 11, 4, 5, 6, 12],
       "parquet-local": [7.5, 1.0, 2.5, 3.0, 11.0, 4.5, 5.25, 6.0, 12.5]}
RUN_OPTION = {"caption": ["--length", "short"], "query": ["--question", "What is shown?"],
              "detect": ["--object", "face"], "point": ["--object", "eye"]}
OVERRIDE = {"length": "long", "question": "Is there a cat?", "object": "wheel"}
# The last row's override: invalid (an ``invalid_options`` row), or, for an object (any text
# is one), empty: ignored, the run's own option applies.
BAD = {"length": ("huge", "invalid_options"), "question": (5, "invalid_options"),
       "object": ("", None)}


@pytest.mark.parametrize("case", list(CASES))
def test_manifest_run(case, tmp_path, s3, bucket, trusted, http_photos):
    env = trusted
    fmt, where, provider, skill, column, id_col, image_col = CASES[case]
    use_base = case.endswith("-base")
    other = "other-" + uuid.uuid4().hex[:8]
    s3.create_bucket(Bucket=other)
    s3.put_object(Bucket=other, Key="x/chelsea.png", Body=photo("chelsea.png"))
    local = tmp_path / "local"
    local.mkdir()
    (local / "rocket.jpg").write_bytes(photo("rocket.jpg"))
    (local / "camera.png").write_bytes(photo("camera.png"))

    # Relative keys: against --base when given, else against the manifest's folder.
    rel = [("imgs/astronaut.png", "astronaut.png"), ("./imgs/coffee.png", "coffee.png"),
           ("imgs/horse.png", "horse.png")]
    if where == "s3":
        folder = f"s3://{bucket}/manifests/"
        for key, name in rel:
            s3.put_object(Bucket=bucket, Key="manifests/" + key.removeprefix("./"), Body=photo(name))
    else:
        base_dir = tmp_path / ("photos" if use_base else "manifests")
        (base_dir / "imgs").mkdir(parents=True)
        (tmp_path / "manifests").mkdir(exist_ok=True)
        for key, name in rel:
            (base_dir / key).write_bytes(photo(name))
        folder = str(tmp_path / "manifests") + "/"

    # id → (image name or None, override value or None, expected error code or None)
    ids = IDS[fmt if fmt != "parquet" else f"parquet-{where}"]
    plan = [
        (rel[0][0], "astronaut.png", OVERRIDE[column], None),
        (rel[1][0], "coffee.png", None, None),
        (f"s3://{other}/x/chelsea.png", "chelsea.png", OVERRIDE[column], None),
        (str(local / "rocket.jpg"), "rocket.jpg", None, None),
        ("file://" + str(local / "camera.png"), "camera.png", None, None),
        (f"{http_photos}hubble_deep_field.jpg?{SECRET}", "hubble_deep_field.jpg", None, None),
        ("imgs/nope.png", None, None, "object_not_found"),
        (f"{http_photos}gone.png?{SECRET}", None, None, "object_not_found"),
        (rel[2][0], "horse.png", *BAD[column]),
    ]
    rows = [{id_col: i, image_col: img, column: ov} for i, (img, _, ov, _) in zip(ids, plan, strict=True)]
    name = f"m.{fmt}"
    columns = [id_col, image_col, column]
    if where == "s3":
        path = tmp_path / name
        write_manifest(path, fmt, rows, columns)
        s3.put_object(Bucket=bucket, Key="manifests/" + name, Body=path.read_bytes())
    else:
        write_manifest(tmp_path / "manifests" / name, fmt, rows, columns)
    args = ["run", folder + name, f"s3://{bucket}/out/", "--skill", skill, *RUN_OPTION[skill],
            "--provider", provider, "--workers", "0", "--timeout", "120"]
    if use_base:
        args += ["--base", str(tmp_path / "photos")]
    if fmt == "parquet":  # chosen explicitly (auto: the parquet reader, which hands it over)
        args += ["--input-format", "manifest"]
    if (id_col, image_col) != ("id", "image"):
        args += ["--id-column", id_col, "--image-column", image_col]
    proc = run_cli(args, env)
    assert "completed" in proc.stdout

    got = {json.dumps(r["id"]): r for r in read_results(s3, bucket, "out/")}
    assert sorted(got) == sorted(json.dumps(i) for i in ids)  # each id once, its type kept
    for item_id, (image, pname, override, code) in zip(ids, plan, strict=True):
        row = got[json.dumps(item_id)]
        assert SECRET not in json.dumps(row)
        if code:
            assert row["status"] == "error" and row["error"]["code"] == code, row
            continue
        assert row["status"] == "ok", row
        assert row["width"] and row["height"]
        if image.startswith("http"):
            assert row["source"] == image.split("?")[0]
        value = override if override not in (None, "") else RUN_OPTION[skill][1]
        field = {"length": "length", "question": "question", "object": "object"}[column]
        want = _expected(provider, skill, field, value, photo(pname))
        result = {k: v for k, v in row["result"].items() if k != "raw"}
        assert result == want, (item_id, pname)


def _expected(provider: str, skill: str, field: str, value, image: bytes) -> dict:
    """The emulator's answer for this image with the item's options."""
    if provider == "moondream":
        return expected_result(image, {"skill": skill, field: value})
    from tests.test_fal_provider import expected_row

    args = {"length": value} if field == "length" else {"prompt": value}
    return expected_row(f"fal-ai/moondream3-preview/{skill}", args, image, skill)[0]


@pytest.mark.parametrize(("dry_run", "fmt"), [(False, "jsonl"), (True, "jsonl"),
                                               (False, "parquet")])
def test_duplicate_ids_fail_before_anything_is_written(dry_run, fmt, tmp_path, env):
    (tmp_path / "a.png").write_bytes(photo("coffee.png"))
    lines = [{"id": 1, "image": "a.png"}, {"id": 2, "image": "a.png"}, {"id": 1, "image": "a.png"}]
    write_manifest(tmp_path / f"m.{fmt}", fmt, lines, ["id", "image"])
    out = tmp_path / "out"
    # A .parquet of references is found a manifest by the Parquet reader (no --input-format).
    proc = run_cli(["submit", str(tmp_path / f"m.{fmt}"), str(out), *(["--dry-run"] * dry_run)],
                   env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "duplicate id '1'" in proc.stderr, proc.stderr
    assert "line 1 and line 3" in proc.stderr or "row 1 and row 3" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "_moonbatch" / "spec.json").exists() and not out.exists()


def test_missing_manifest_is_one_preflight_line(tmp_path, bucket, env):
    for url in (str(tmp_path / "nope.csv"), f"s3://{bucket}/nope.jsonl"):
        proc = run_cli(["submit", url, str(tmp_path / "out")], env, check=False)
        assert proc.returncode == 3, proc.stderr
        assert f"INPUT: {url} does not exist" in proc.stderr


@pytest.mark.parametrize("fmt, rows, columns, message", [
    ("csv", [{"id": "1", "image": "a.png"}, {"id": "", "image": "b.png"}], ["id", "image"],
     "m.csv line 3: no 'id'"),
    ("csv", [{"name": "1", "image": "a.png"}], ["name", "image"],
     "no column 'id' (columns: name, image): pass --id-column"),
    ("jsonl", [{"id": 1, "image": "a.png"}, {"id": {"n": 1}, "image": "b.png"}], ["id", "image"],
     "m.jsonl line 2: 'id' is a dict"),
    ("jsonl", [{"id": 1, "image": "../a.png"}], ["id", "image"], "is outside the base folder"),
    ("parquet", [{"id": 1, "picture": "a.png"}], ["id", "picture"],
     "no column 'image' (columns: id, picture): pass --image-column"),
    ("parquet", [{"id": 1, "image": "a.png"}, {"id": 2, "image": None}], ["id", "image"],
     "m.parquet row 2: no 'image' for id '2'"),
])
def test_bad_manifests_name_the_row_and_the_fix(fmt, rows, columns, message, tmp_path):
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import check_input_items, new_spec
    from moonbatch.workers.models import SkillOptions
    from moonbatch.workers.readers import InputError, input_root
    from moonbatch.workers.storage import open_store

    write_manifest(tmp_path / f"m.{fmt}", fmt, rows, columns)
    spec = new_spec(str(tmp_path / f"m.{fmt}"), str(tmp_path / "out"),
                    SkillOptions(skill="caption"), get_settings(), input_format="manifest")
    with pytest.raises(InputError) as info:
        check_input_items(spec, open_store(input_root(spec)), get_settings())
    assert message in str(info.value)
