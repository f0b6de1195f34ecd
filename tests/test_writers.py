"""Output writers: Parquet results (one stable schema, read back with pyarrow, pandas, polars and
``datasets``) and the COCO export of detect and point runs (read with pycocotools and checked
against the real size of each photograph), for both providers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import orjson
import pytest

from moonbatch.workers import layout, writers
from moonbatch.workers.models import RunSpec, SkillOptions
from moonbatch.workers.storage import LocalStore
from moonbatch.workers.writers import coco, jsonl, parquet
from tests.conftest import expected_result, read_json, read_results, run_cli, upload_photos, wait_for_run

OK = {"id": "a/b.png", "source": "s3://in/a/b.png", "status": "ok",
      "result": {"caption": "A cat."}, "usage": {"input_tokens": 7, "output_tokens": 3},
      "width": 640, "height": 480}
ROWS = [
    OK,
    {**OK, "id": 12, "result": {"answer": "yes", "reasoning": {"text": "why", "grounding": []}},
     "usage": {}, "sent_width": 320, "sent_height": 240},
    {**OK, "id": 1.5, "result": {"objects": [{"x_min": 0, "y_min": 0.25, "x_max": 1, "y_max": 0.5}],
                                 "raw": {"objects": []}}},
    {**OK, "id": True, "result": {"points": []}},
    {**OK, "id": "ünï 猫", "result": None},
    {"id": False, "source": "s3://in/x", "status": "error",
     "error": {"code": "not_an_image", "message": "not an image"}, "width": None, "height": None},
    {"id": -3, "source": "s3://in/y", "status": "error",
     "error": {"code": "missing_result", "message": ""}, "width": 10, "height": 20},
    # Multi-skill rows: {skill: result or null}; an error names its skill.
    {**OK, "id": "multi", "result": {
        "caption": {"caption": "Two cats."}, "query": {"answer": "2"},
        "detect": {"objects": [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}]},
        "point": {"points": [{"x": 0.5, "y": 0.5}, {"x": 0.25, "y": 0.75}]}}},
    {"id": "multi-err", "source": "s", "status": "error", "result": {"caption": None, "point": {
        "points": []}}, "error": {"code": "skill_failed", "message": "m", "skill": "caption"},
     "width": 1, "height": 1},
]


def encoded(rows) -> list[bytes]:
    return [orjson.dumps(r) for r in rows]


def table(data: bytes):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data))


def test_parquet_round_trip_gives_the_jsonl_rows():
    rows = encoded(ROWS)
    back = list(parquet.decode(parquet.encode(rows)))
    assert back == list(jsonl.decode(jsonl.encode(rows))) == ROWS
    assert [type(r["id"]) for r in back] == [type(r["id"]) for r in ROWS]  # 1 is not True


def test_parquet_typed_columns():
    t = table(parquet.encode(encoded(ROWS))).to_pylist()
    assert [r["id"] for r in t] == ["a/b.png", "12", "1.5", "true", "ünï 猫", "false", "-3",
                                    "multi", "multi-err"]
    assert [json.loads(r["id_json"]) for r in t] == [r["id"] for r in ROWS]
    assert t[0]["caption"] == "A cat." and t[0]["answer"] is None and t[0]["objects"] is None
    assert (t[0]["input_tokens"], t[0]["output_tokens"]) == (7, 3)
    assert (t[0]["width"], t[0]["height"], t[0]["sent_width"]) == (640, 480, None)
    assert t[1]["answer"] == "yes" and (t[1]["sent_width"], t[1]["sent_height"]) == (320, 240)
    assert json.loads(t[1]["result_json"])["reasoning"] == {"text": "why", "grounding": []}
    assert t[2]["objects"] == [{"x_min": 0.0, "y_min": 0.25, "x_max": 1.0, "y_max": 0.5}]
    assert t[3]["points"] == [] and t[3]["objects"] is None  # found nothing ≠ not asked
    assert t[5]["status"] == "error" and t[5]["error_code"] == "not_an_image"
    assert t[5]["width"] is None and t[5]["result_json"] is None
    multi = t[7]
    assert (multi["caption"], multi["answer"]) == ("Two cats.", "2")
    assert multi["objects"] == [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}]
    assert multi["points"] == [{"x": 0.5, "y": 0.5}, {"x": 0.25, "y": 0.75}]
    assert t[8]["error_skill"] == "caption" and t[8]["points"] == []


def test_parquet_schema_is_the_same_for_every_shard():
    import pyarrow.parquet as pq

    shards = [[], [ROWS[5]], [ROWS[0]], ROWS[2:4], ROWS]
    schemas = [pq.read_schema(io.BytesIO(parquet.encode(encoded(s)))) for s in shards]
    assert all(s == parquet.SCHEMA for s in schemas)
    assert table(parquet.encode([])).num_rows == 0
    assert list(parquet.decode(parquet.encode([]))) == []


def spec_of(*options: SkillOptions, output_format="jsonl", input_kind="prefix") -> RunSpec:
    return RunSpec(run_id="r1", input="s3://in/", output="s3://out/", options=options[0],
                   more_options=list(options[1:]), output_format=output_format,
                   input_kind=input_kind, shard_size=10, max_shard_bytes=1 << 30,
                   created_at=1_700_000_000.0)


def put_shard(store, spec: RunSpec, shard: int, rows: list[dict], opts: dict | None = None):
    plan = b"\n".join(orjson.dumps({"id": r["id"], "size": 1, **({"opts": opts[r["id"]]}
                                    if opts and r["id"] in opts else {})}) for r in rows)
    store.put(layout.plan_items(shard), plan)
    writers.write_shard(store, spec.output_format, shard, encoded(rows))


def test_coco_from_synthetic_rows(tmp_path):
    from pycocotools.coco import COCO

    store = LocalStore(tmp_path / "out")
    spec = spec_of(SkillOptions(skill="caption"), SkillOptions(skill="detect", object="cat"),
                   SkillOptions(skill="point", object="eye"), output_format="parquet",
                   input_kind="manifest")
    box = {"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}
    multi = {"caption": {"caption": "c"}, "detect": {"objects": [box]},
             "point": {"points": [{"x": 0.5, "y": 0.25}]}}
    shard0 = [{**OK, "id": 10, "result": multi},
              {"id": 11, "source": "s", "status": "error", "error": {"code": "x", "message": ""},
               "width": 5, "height": 5},
              {**OK, "id": 12, "result": multi, "width": None, "height": None}]
    shard1 = [{**OK, "id": "dog.png", "result": multi, "width": 100, "height": 50}]
    put_shard(store, spec, 0, shard0)
    put_shard(store, spec, 1, shard1, opts={"dog.png": {"object": "dog"}})
    writers.finish_run(store, spec, 2)
    data = store.get(layout.COCO)
    writers.finish_run(store, spec, 2)
    assert store.get(layout.COCO) == data  # idempotent

    doc = json.loads(data)
    assert doc["categories"] == [
        {"id": 1, "name": "cat", "supercategory": "detect"},
        {"id": 2, "name": "eye", "supercategory": "point", "keypoints": ["eye"], "skeleton": []},
        {"id": 3, "name": "dog", "supercategory": "detect"},
        {"id": 4, "name": "dog", "supercategory": "point", "keypoints": ["dog"], "skeleton": []}]
    # The error row and the row of unknown size are left out; ids are plan positions.
    assert doc["images"] == [
        {"id": 1, "file_name": "s3://in/a/b.png", "width": 640, "height": 480, "moonbatch_id": 10},
        {"id": 4, "file_name": "s3://in/a/b.png", "width": 100, "height": 50,
         "moonbatch_id": "dog.png"}]
    c = COCO(str(tmp_path / "out" / layout.COCO))
    (det,) = c.loadAnns(c.getAnnIds(imgIds=[4], catIds=[3]))
    assert det["bbox"] == pytest.approx([10, 10, 20, 10]) and det["area"] == pytest.approx(200)
    (pt,) = c.loadAnns(c.getAnnIds(imgIds=[4], catIds=[4]))
    assert pt["keypoints"] == pytest.approx([50, 12.5, 2]) and pt["num_keypoints"] == 1
    assert len(c.getAnnIds(imgIds=[1])) == 2


def test_no_coco_for_runs_without_detect_or_point(tmp_path):
    store = LocalStore(tmp_path / "out")
    spec = spec_of(SkillOptions(skill="caption"))
    put_shard(store, spec, 0, [OK])
    writers.finish_run(store, spec, 1)
    assert not store.exists(layout.COCO)
    with pytest.raises(ValueError, match="no detect, point or segment skill"):
        coco.build(store, spec, 1)


# -- end to end, through the CLI and the session's worker fleet ---------------------------------

BROKEN = {"zz-broken-1.jpg": b"not an image at all", "zz-broken-2.jpg": b"\xff\xd8\xff\xe0garbage"}


def pil_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


def download(s3, bucket: str, prefix: str, folder: Path, suffix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
        if obj["Key"].endswith(suffix):
            path = folder / obj["Key"].rsplit("/", 1)[-1]
            path.write_bytes(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            out.append(path)
    return sorted(out)


def fal_caption(image: bytes) -> str:
    from moonbatch.emulator.fal import expected_output

    return expected_output("fal-ai/moondream3-preview/caption", {"image_url": "x"}, [image])["output"]


def test_parquet_output_both_providers(s3, bucket, env, fleet, tmp_path, monkeypatch):
    photos = upload_photos(s3, bucket, "photos/")
    for key, body in BROKEN.items():
        s3.put_object(Bucket=bucket, Key="photos/" + key, Body=body)
    # 11 items in shards of 5: the last shard holds only an error row.
    common = [f"s3://{bucket}/photos/", "--skill", "caption", "--format", "parquet",
              "--shard-size", "5"]
    run_cli(["submit", common[0], f"s3://{bucket}/md/", *common[1:]], env)
    run_cli(["submit", common[0], f"s3://{bucket}/fal/", *common[1:], "--provider", "fal"], env)
    expected = {"md": lambda img: expected_result(img, {"skill": "caption"})["caption"],
                "fal": fal_caption}
    files = []
    for out, caption_of in expected.items():
        summary = wait_for_run(s3, bucket, out + "/", timeout=120)
        assert summary["status"] == "completed", summary
        assert summary["counts"]["ok"] == len(photos)
        paths = download(s3, bucket, out + "/results/", tmp_path / out, ".parquet")
        assert [p.name for p in paths] == [f"shard-0000{i}.parquet" for i in range(3)]
        files += paths
        check_run_metadata(paths, summary, read_json(s3, bucket, out + "/_moonbatch/spec.json"))
        check_parquet_rows(paths, photos, caption_of)
        rows = read_results(s3, bucket, out + "/")  # parquet.decode: the JSONL row shape
        assert sorted(r["id"] for r in rows) == sorted([*photos, *BROKEN])
        for row in rows:
            if row["id"] in photos:
                assert row["result"]["caption"] == caption_of(photos[row["id"]])
                assert (row["width"], row["height"]) == pil_size(photos[row["id"]])
    empty = tmp_path / "empty" / "shard-00000.parquet"  # a shard of no rows loads with the rest
    empty.parent.mkdir()
    empty.write_bytes(parquet.encode([]))
    check_datasets([*files, empty], tmp_path, monkeypatch, len(photos) + len(BROKEN))


def check_run_metadata(paths: list[Path], summary: dict, spec: dict) -> None:
    """Each Parquet file names its run, provider, model and options in its key-value metadata;
    run.json has ISO 8601 times and its error rows per code."""
    import datetime

    import pyarrow.parquet as pq

    for path in paths:
        meta = {k.decode(): v.decode() for k, v in pq.read_metadata(path).metadata.items()}
        assert meta["moonbatch.run_id"] == summary["run_id"] == spec["run_id"]
        assert meta["moonbatch.provider"] == spec["provider"]
        assert meta["moonbatch.model"] == (spec["model"] or "")
        assert meta["moonbatch.endpoint"] == (spec["endpoint"] or "")
        assert json.loads(meta["moonbatch.options"]) == [
            {k: v for k, v in spec["options"].items() if v is not None}]
    times = [datetime.datetime.fromisoformat(summary["timings"][k])
             for k in ("created_at", "planned_at", "finished_at")]
    assert all(t.utcoffset() == datetime.timedelta(0) for t in times)
    assert times == sorted(times)
    assert summary["timings"]["wall_seconds"] == pytest.approx(
        (times[2] - times[0]).total_seconds(), abs=0.01)
    assert summary["errors_by_code"] and all(summary["errors_by_code"].values())
    assert sum(summary["errors_by_code"].values()) == summary["counts"]["error"] == len(BROKEN)


def check_parquet_rows(paths: list[Path], photos: dict[str, bytes], caption_of) -> None:
    """Every row, read with pyarrow, pandas and polars, is its photograph's."""
    import pandas as pd
    import polars as pl
    import pyarrow.parquet as pq

    for path in paths:
        assert pq.read_schema(path) == parquet.SCHEMA
    rows = [r for p in paths for r in pq.read_table(p).to_pylist()]
    assert len(rows) == len(photos) + len(BROKEN)
    for row in rows:
        if row["id"] in BROKEN:
            assert row["status"] == "error" and row["error_code"], row
            assert row["width"] is None and row["caption"] is None
            continue
        image = photos[row["id"]]
        assert row["status"] == "ok" and row["error_code"] is None
        assert (row["width"], row["height"]) == pil_size(image)
        assert row["caption"] == caption_of(image)
        assert json.loads(row["result_json"])["caption"] == row["caption"]
        assert json.loads(row["id_json"]) == row["id"]
        assert row["input_tokens"] is None or row["input_tokens"] > 0
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    assert sorted(frame["id"]) == sorted([*photos, *BROKEN])
    by_id = frame.set_index("id")
    for name, image in photos.items():
        assert by_id.loc[name, "caption"] == caption_of(image)
        assert (by_id.loc[name, "width"], by_id.loc[name, "height"]) == pil_size(image)
    lazy = pl.scan_parquet([str(p) for p in paths]).filter(pl.col("status") == "ok")
    df = lazy.select("id", "width", "height", "caption").collect()
    assert df.height == len(photos)
    for name, width, height, caption in df.iter_rows():
        assert (width, height) == pil_size(photos[name]) and caption == caption_of(photos[name])


def check_datasets(files: list[Path], tmp_path: Path, monkeypatch, per_run: int) -> None:
    """``datasets`` loads every shard of both runs as one split (offline, cache in tmp); pandas
    and polars read them all at once too."""
    import pandas as pd
    import polars as pl

    paths = [str(p) for p in files]
    assert len(pd.read_parquet(paths, dtype_backend="pyarrow")) == 2 * per_run
    assert pl.read_parquet(paths).height == 2 * per_run
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    ds = datasets.load_dataset("parquet", data_files=paths, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 2 * per_run
    assert set(ds.column_names) == set(parquet.SCHEMA.names)
    ok = ds.filter(lambda r: r["status"] == "ok")
    assert ok.num_rows == 2 * (per_run - len(BROKEN))
    assert all(isinstance(c, str) and c for c in ok["caption"])
    assert all(w > 0 for w in ok["width"])


def check_coco(path: Path, photos: dict[str, bytes], answer_of, skill: str) -> None:
    """Each image's pixel boxes or keypoints are its normalised answer × its PIL size."""
    from pycocotools.coco import COCO

    c = COCO(str(path))
    (cat,) = c.loadCats(c.getCatIds())
    assert cat["supercategory"] == skill
    images = c.loadImgs(c.getImgIds())
    assert sorted(i["file_name"] for i in images) == sorted(photos)
    assert sorted(i["id"] for i in images) == list(range(1, len(photos) + 1))
    total = 0
    for img in images:
        assert img["moonbatch_id"] == img["file_name"]
        image = photos[img["file_name"]]
        w, h = pil_size(image)
        assert (img["width"], img["height"]) == (w, h)
        anns = c.loadAnns(c.getAnnIds(imgIds=[img["id"]]))
        want = answer_of(image)
        assert len(anns) == len(want)
        total += len(anns)
        for ann, obj in zip(sorted(anns, key=lambda a: a["id"]), want, strict=True):
            assert ann["category_id"] == cat["id"] and ann["iscrowd"] == 0
            if skill == "detect":
                box = [obj["x_min"] * w, obj["y_min"] * h, (obj["x_max"] - obj["x_min"]) * w,
                       (obj["y_max"] - obj["y_min"]) * h]
                assert ann["bbox"] == pytest.approx(box)
                assert ann["area"] == pytest.approx(box[2] * box[3])
            else:
                assert ann["keypoints"] == pytest.approx([obj["x"] * w, obj["y"] * h, 2])
                assert ann["num_keypoints"] == 1
    assert total > 0
    self_eval(c, "bbox" if skill == "detect" else "keypoints")


def self_eval(gt, iou_type: str) -> None:
    """COCOeval of the annotations as detections of themselves: AP 1.0."""
    import contextlib

    import numpy as np
    from pycocotools.cocoeval import COCOeval

    dets = [{**a, "score": 1.0} for a in gt.loadAnns(gt.getAnnIds())]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iou_type)
        if iou_type == "keypoints":
            ev.params.kpt_oks_sigmas = np.array([0.05])  # one keypoint per category
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_coco_export_detect_moondream(s3, bucket, env, fleet, tmp_path):
    photos = upload_photos(s3, bucket, "photos/")
    run_cli(["run", f"s3://{bucket}/photos/", f"s3://{bucket}/out/", "--skill", "detect",
             "--object", "face", "--shard-size", "4", "--workers", "0", "--timeout", "120"], env)
    assert read_json(s3, bucket, "out/run.json")["status"] == "completed"
    (path,) = download(s3, bucket, "out/annotations/", tmp_path, "instances.json")
    check_coco(path, photos, lambda img: expected_result(
        img, {"skill": "detect", "object": "face"})["objects"], "detect")


def test_coco_export_point_fal_parquet(s3, bucket, env, fleet, tmp_path):
    from moonbatch.emulator.fal import expected_output

    photos = upload_photos(s3, bucket, "photos/")
    run_cli(["submit", f"s3://{bucket}/photos/", f"s3://{bucket}/out/", "--skill", "point",
             "--object", "eye", "--provider", "fal", "--format", "parquet"], env)
    assert wait_for_run(s3, bucket, "out/", timeout=120)["status"] == "completed"
    (path,) = download(s3, bucket, "out/annotations/", tmp_path, "instances.json")
    check_coco(path, photos, lambda img: expected_output(
        "fal-ai/moondream3-preview/point", {"image_url": "x", "prompt": "eye"}, [img])["points"],
        "point")
    # clean removes the Parquet shards and the export with the rest (and nothing else).
    s3.put_object(Bucket=bucket, Key="out/annotations/mine.json", Body=b"{}")
    run_cli(["clean", f"s3://{bucket}/out/", "--force"], env)
    left = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
    assert left == ["out/annotations/mine.json"]
