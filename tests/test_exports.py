"""``--export coco|label-studio|yolo``: a run's annotations written when it completes, loaded back
with each format's own tools: COCO with pycocotools, Label Studio's pre-annotation import JSON
against a JSON schema of its documented format, YOLO's ``data.yaml`` with PyYAML and every label
line parsed. Segment rows (the real-time API's ``{"path", "bbox"}``) give COCO polygons whose
``annToMask`` lies inside the bbox, Label Studio polygons, YOLO boxes and a Parquet column."""

from __future__ import annotations

import io
import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
import yaml

from moonbatch.workers import layout, writers
from moonbatch.workers.models import RunSpec, SkillOptions
from moonbatch.workers.storage import LocalStore
from moonbatch.workers.writers import parquet, shapes, yolo
from tests.conftest import expected_result, read_json, run_cli, upload_photos
from tests.test_writers import OK, encoded, pil_size, put_shard, self_eval, spec_of

# Label Studio's import format for pre-annotated image tasks, as documented at
# labelstud.io/guide/predictions and labelstud.io/guide/task_format (Basic Label Studio JSON
# format; region values in percent of the image).
_PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
_LABELS = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
LABEL_STUDIO_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "array",
    "items": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "object", "required": ["image"],
                     "properties": {"image": {"type": "string", "minLength": 1}}},
            "predictions": {"type": "array", "items": {
                "type": "object", "required": ["result"],
                "properties": {"model_version": {"type": "string"}, "score": {"type": "number"},
                               "result": {"type": "array", "items": {"$ref": "#/$defs/result"}}},
                "additionalProperties": False}},
        },
        "additionalProperties": False,
    },
    "$defs": {
        "result": {
            "type": "object",
            "required": ["id", "type", "from_name", "to_name", "value"],
            "properties": {
                "id": {"type": "string", "minLength": 1},
                "type": {"enum": ["rectanglelabels", "keypointlabels", "polygonlabels",
                                  "textarea"]},
                "from_name": {"type": "string", "minLength": 1},
                "to_name": {"type": "string", "minLength": 1},
                "original_width": {"type": "integer", "minimum": 1},
                "original_height": {"type": "integer", "minimum": 1},
                "image_rotation": {"type": "number"},
                "score": {"type": "number"},
                "value": {"type": "object"},
            },
            "additionalProperties": False,
            "allOf": [
                {"if": {"properties": {"type": {"const": t}}},
                 "then": {"properties": {"value": {"$ref": f"#/$defs/{t}"}}}}
                for t in ("rectanglelabels", "keypointlabels", "polygonlabels", "textarea")],
        },
        "rectanglelabels": {
            "type": "object", "required": ["x", "y", "width", "height", "rectanglelabels"],
            "properties": {"x": _PERCENT, "y": _PERCENT, "width": _PERCENT, "height": _PERCENT,
                           "rotation": {"type": "number"}, "rectanglelabels": _LABELS},
            "additionalProperties": False},
        "keypointlabels": {
            "type": "object", "required": ["x", "y", "keypointlabels"],
            "properties": {"x": _PERCENT, "y": _PERCENT, "width": {"type": "number"},
                           "keypointlabels": _LABELS},
            "additionalProperties": False},
        "polygonlabels": {
            "type": "object", "required": ["points", "polygonlabels"],
            "properties": {"points": {"type": "array", "minItems": 3, "items": {
                "type": "array", "prefixItems": [_PERCENT, _PERCENT], "minItems": 2,
                "maxItems": 2}},
                "closed": {"type": "boolean"}, "polygonlabels": _LABELS},
            "additionalProperties": False},
        "textarea": {
            "type": "object", "required": ["text"],
            "properties": {"text": {"type": "array", "items": {"type": "string"},
                                    "minItems": 1}},
            "additionalProperties": False},
    },
}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this checkout first on the path: the ``moonbatch`` script then runs this
    checkout's code (as the fleet, started with ``python -m`` from here, does), not the
    editable install's."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                env.get("PYTHONPATH")]))}


EXPORT_ARGS = ["--export", "label-studio", "--export", "yolo", "--export", "coco"]


def check_label_studio(tasks: list, config: bytes) -> dict[str, set[str]]:
    """The tasks validate against Label Studio's import format and every result names a tag
    of the labeling configuration (and one of its labels); returns {tag name: labels}."""
    jsonschema.validate(tasks, LABEL_STUDIO_SCHEMA)
    root = ET.fromstring(config)
    assert root.tag == "View"
    (image,) = root.findall("Image")
    tags = {el.get("name"): {lab.get("value") for lab in el.findall("Label")}
            for el in root if el.tag not in ("Image", "Header")}
    ids = [r["id"] for t in tasks for p in t.get("predictions", ()) for r in p["result"]]
    assert len(ids) == len(set(ids))  # Label Studio needs distinct result ids
    for task in tasks:
        for pred in task.get("predictions", ()):
            for res in pred["result"]:
                assert res["to_name"] == image.get("name") and res["from_name"] in tags
                for key in ("rectanglelabels", "keypointlabels", "polygonlabels"):
                    assert set(res["value"].get(key, ())) <= tags[res["from_name"]]
    return tags


def yolo_lines(path: Path, nc: int) -> list[tuple[int, float, float, float, float]]:
    """A YOLO label file's lines, each ``class cx cy w h`` checked: class in 0..nc-1, numbers
    in 0..1, the box inside the image."""
    out = []
    for line in path.read_text().splitlines():
        cls, *nums = line.split()
        box = (int(cls), *(float(v) for v in nums))
        assert len(nums) == 4 and 0 <= box[0] < nc, line
        _, cx, cy, w, h = box
        assert all(0 <= v <= 1 for v in (cx, cy, w, h)) and w > 0 and h > 0, line
        assert cx - w / 2 >= -1e-6 and cx + w / 2 <= 1 + 1e-6, line
        out.append(box)
    return out


def test_detect_point_caption_run_exports_coco_label_studio_and_yolo(s3, bucket, cli_env, fleet,
                                                                       tmp_path):
    env = cli_env
    photos = upload_photos(s3, bucket, "photos/")
    run_cli(["run", f"s3://{bucket}/photos/", f"s3://{bucket}/out/", "--skill", "caption",
             "--skill", "detect", "--skill", "point", "--object", "face", "--shard-size", "4",
             *EXPORT_ARGS, "--workers", "0", "--timeout", "120"], env)
    assert read_json(s3, bucket, "out/run.json")["status"] == "completed"
    got = download_tree(s3, bucket, "out/annotations/", tmp_path / "ann")
    want = {name: {s: expected_result(img, {"skill": s, **r}) for s, r in (
        ("caption", {"length": "normal"}), ("detect", {"object": "face"}),
        ("point", {"object": "face"}))} for name, img in photos.items()}
    sizes = {name: pil_size(img) for name, img in photos.items()}
    points = sum(len(w["point"]["points"]) for w in want.values())
    assert sum(len(w["detect"]["objects"]) for w in want.values()) and points

    # COCO: pycocotools loads it; boxes and keypoints in pixels of each image.
    from pycocotools.coco import COCO

    c = COCO(str(got["instances.json"]))
    cats = {(cat["supercategory"], cat["name"]): cat["id"] for cat in c.loadCats(c.getCatIds())}
    assert cats == {("detect", "face"): 1, ("point", "face"): 2}
    for img in c.loadImgs(c.getImgIds()):
        w, h = sizes[img["file_name"]]
        assert (img["width"], img["height"]) == (w, h)
        boxes = c.loadAnns(c.getAnnIds(imgIds=[img["id"]], catIds=[1]))
        assert [a["bbox"] for a in boxes] == [pytest.approx(
            [o["x_min"] * w, o["y_min"] * h, (o["x_max"] - o["x_min"]) * w,
             (o["y_max"] - o["y_min"]) * h]) for o in want[img["file_name"]]["detect"]["objects"]]
        kps = c.loadAnns(c.getAnnIds(imgIds=[img["id"]], catIds=[2]))
        assert [a["keypoints"] for a in kps] == [pytest.approx([p["x"] * w, p["y"] * h, 2])
                                                 for p in want[img["file_name"]]["point"]["points"]]
    assert len(c.getImgIds()) == len(photos)

    # Label Studio: the import format, the configuration's tags and labels, percent coordinates.
    tasks = json.loads(got["label-studio/tasks.json"].read_bytes())
    tags = check_label_studio(tasks, got["label-studio/config.xml"].read_bytes())
    assert tags == {"caption": set(), "detect": {"face"}, "point": {"face"}}
    assert sorted(t["data"]["image"] for t in tasks) == sorted(
        f"s3://{bucket}/photos/{n}" for n in photos)
    for task in tasks:
        name = task["data"]["moonbatch_id"]
        (pred,) = task["predictions"]
        by_type: dict[str, list] = {}
        for res in pred["result"]:
            assert (res["original_width"], res["original_height"]) == sizes[name]
            by_type.setdefault(res["type"], []).append(res["value"])
        assert by_type["textarea"] == [{"text": [want[name]["caption"]["caption"]]}]
        assert by_type.get("rectanglelabels", []) == [pytest.approx(
            {"x": o["x_min"] * 100, "y": o["y_min"] * 100, "width": (o["x_max"] - o["x_min"]) * 100,
             "height": (o["y_max"] - o["y_min"]) * 100, "rotation": 0,
             "rectanglelabels": ["face"]}) for o in want[name]["detect"]["objects"]]
        assert [(v["x"], v["y"]) for v in by_type.get("keypointlabels", [])] == [
            pytest.approx((p["x"] * 100, p["y"] * 100)) for p in want[name]["point"]["points"]]

    # YOLO: data.yaml's classes; a label file per image, each line a detected box.
    data = yaml.safe_load(got["yolo/data.yaml"].read_text())
    assert data["names"] == {0: "face"} and data["nc"] == 1
    assert {"path", "train", "val"} <= set(data)
    assert f"{points} point(s) left out" in got["yolo/data.yaml"].read_text()
    labels = {p.relative_to(tmp_path / "ann" / "yolo" / "labels").as_posix(): p
              for p in (tmp_path / "ann" / "yolo" / "labels").rglob("*.txt")}
    assert sorted(labels) == sorted(yolo.label_name(n) + ".txt" for n in photos)
    for name in photos:
        lines = yolo_lines(labels[yolo.label_name(name) + ".txt"], data["nc"])
        assert [line[1:] for line in lines] == [pytest.approx(
            ((o["x_min"] + o["x_max"]) / 2, (o["y_min"] + o["y_max"]) / 2,
             o["x_max"] - o["x_min"], o["y_max"] - o["y_min"]), abs=1e-6)
            for o in want[name]["detect"]["objects"]]

    # clean deletes every export (and leaves a user's own file under annotations/).
    s3.put_object(Bucket=bucket, Key="out/annotations/mine.json", Body=b"{}")
    run_cli(["clean", f"s3://{bucket}/out/", "--force"], env)
    left = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
    assert left == ["out/annotations/mine.json"]


def download_tree(s3, bucket: str, prefix: str, folder: Path) -> dict[str, Path]:
    """Every object under ``prefix`` into ``folder`` (same relative paths); {relative: path}."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            out[rel] = path
    return out


@pytest.mark.parametrize(("args", "message"), [
    (["--skill", "caption", "--export", "yolo"], "--export yolo needs a detect or segment skill"),
    (["--skill", "point", "--object", "x", "--export", "yolo"], "points are left out"),
    (["--skill", "query", "--question", "q", "--export", "coco"],
     "--export coco needs a detect, point or segment skill"),
    (["--skill", "detect", "--object", "x", "--export", "pascal"],
     "--export pascal: not a choice: choose one of coco, label-studio, yolo, none"),
    (["--skill", "detect", "--object", "x", "--export", "none", "--export", "coco"],
     "--export none means no export"),
])
def test_export_refusals_name_the_fix(tmp_path, cli_env, args, message):
    (tmp_path / "in").mkdir()
    proc = run_cli(["run", str(tmp_path / "in"), str(tmp_path / "out"), *args, "--dry-run"],
                   cli_env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_exports_default_to_coco_for_spatial_runs_only(tmp_path):
    import moonbatch
    from moonbatch.producer.submit import spec_args

    with pytest.raises(moonbatch.InvalidOption, match="^--export yolo needs a detect or segment"):
        moonbatch.dry_run(str(tmp_path), str(tmp_path / "out"), skill="caption", exports=["yolo"])

    assert spec_of(SkillOptions(skill="detect", object="x")).exports == ["coco"]
    assert spec_of(SkillOptions(skill="caption")).exports == []
    old = spec_of(SkillOptions(skill="point", object="x")).model_dump(mode="json")
    del old["exports"]  # a spec.json written before --export
    assert RunSpec.model_validate(old).exports == ["coco"]
    assert spec_args(exports=["yolo", "coco", "yolo"])["exports"] == ["yolo", "coco"]
    assert spec_args(exports="none")["exports"] == []


# -- segment rows, as the real-time API returns them ---------------------------------------------

def ellipse(cx: float, cy: float, rx: float, ry: float) -> str:
    """An SVG path of an ellipse in four cubic Béziers (the real-time API's M/C commands): each
    quarter from A to B has controls A + k(B - centre) and B + k(A - centre)."""
    k = 0.5522847498
    pts = [(cx + rx, cy), (cx, cy + ry), (cx - rx, cy), (cx, cy - ry), (cx + rx, cy)]
    d = [f"M {pts[0][0]:.4f} {pts[0][1]:.4f}"]
    for (ax, ay), (bx, by) in zip(pts, pts[1:], strict=False):
        c1 = (ax + k * (bx - cx), ay + k * (by - cy))
        c2 = (bx + k * (ax - cx), by + k * (ay - cy))
        d.append(f"C {c1[0]:.4f} {c1[1]:.4f} {c2[0]:.4f} {c2[1]:.4f} {bx:.4f} {by:.4f}")
    return " ".join(d) + " Z"


ELLIPSE = {"path": ellipse(0.5, 0.4, 0.2, 0.15),
           "bbox": {"x_min": 0.3, "y_min": 0.25, "x_max": 0.7, "y_max": 0.55}}
TWO_PARTS = {"path": "M 0.1 0.1 L 0.3 0.1 L 0.3 0.4 L 0.1 0.4 Z M 0.6 0.6 L 0.9 0.6 L 0.75 0.9 Z",
             "bbox": {"x_min": 0.1, "y_min": 0.1, "x_max": 0.9, "y_max": 0.9}}


def test_segment_rows_export_coco_polygons_label_studio_and_yolo(tmp_path):
    import numpy as np
    from pycocotools.coco import COCO

    store = LocalStore(tmp_path / "out")
    spec = spec_of(SkillOptions(skill="segment", object="cat"), output_format="parquet") \
        .model_copy(update={"exports": ["coco", "label-studio", "yolo"]})
    rows = [{**OK, "id": "e.jpg", "result": ELLIPSE, "width": 200, "height": 100},
            {**OK, "id": "two.png", "result": TWO_PARTS, "width": 300, "height": 300},
            {**OK, "id": "bad.jpg", "result": {"path": "not a path", "bbox": None}},
            {"id": "err.jpg", "source": "s3://in/err.jpg", "status": "error",
             "error": {"code": "x", "message": ""}, "width": 5, "height": 5}]
    put_shard(store, spec, 0, rows)
    writers.finish_run(store, spec, 1)

    c = COCO(str(tmp_path / "out" / layout.COCO))
    assert [cat["supercategory"] for cat in c.loadCats(c.getCatIds())] == ["segment"]
    anns = c.loadAnns(c.getAnnIds())
    assert [a["image_id"] for a in anns] == [1, 2]  # the unparseable path is left out
    for ann in anns:
        img = c.loadImgs([ann["image_id"]])[0]
        mask = c.annToMask(ann)
        assert mask.shape == (img["height"], img["width"]) and mask.sum() > 0
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert xs.min() >= math.floor(x) and xs.max() <= math.ceil(x + w)
        assert ys.min() >= math.floor(y) and ys.max() <= math.ceil(y + h)
        assert ann["area"] == pytest.approx(float(mask.sum()), rel=0.05)
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
    assert anns[0]["area"] == pytest.approx(math.pi * 0.2 * 200 * 0.15 * 100, rel=0.01)
    assert len(anns[1]["segmentation"]) == 2  # one polygon per subpath
    self_eval(c, "segm")

    tasks = json.loads(store.get(layout.LABEL_STUDIO))
    tags = check_label_studio(tasks, store.get(layout.LABEL_STUDIO_CONFIG))
    assert tags == {"segment": {"cat"}}
    assert [len(t.get("predictions", [{}])[0].get("result", [])) for t in tasks] == [1, 2, 0, 0]
    assert "predictions" not in tasks[3]  # an error row: a task to label from scratch

    data = yaml.safe_load(store.get(layout.YOLO_DATA))
    assert data["names"] == {0: "cat"}
    (line,) = yolo_lines(tmp_path / "out" / layout.yolo_label("e"), 1)
    assert line == pytest.approx((0, 0.5, 0.4, 0.4, 0.3))
    assert store.get(layout.yolo_label("bad")) == b""  # ok, nothing to draw: background
    assert not store.exists(layout.yolo_label("err"))

    # A second export after the rows changed writes the same keys and drops stale labels.
    store.put(layout.yolo_label("gone"), b"0 0.5 0.5 0.1 0.1\n")
    writers.finish_run(store, spec, 1)
    assert not store.exists(layout.yolo_label("gone"))


def test_parquet_segments_column_keeps_one_schema():
    import pyarrow.parquet as pq

    rows = [{**OK, "result": ELLIPSE},
            {**OK, "id": "m", "result": {"caption": {"caption": "c"}, "segment": TWO_PARTS}},
            {**OK, "id": "d", "result": {"objects": []}}]
    data = parquet.encode(encoded(rows))
    assert pq.read_schema(io.BytesIO(data)) == parquet.SCHEMA
    t = pq.read_table(io.BytesIO(data)).to_pylist()
    assert t[0]["segments"] == [{"path": ELLIPSE["path"], **ELLIPSE["bbox"]}]
    assert t[1]["segments"] == [{"path": TWO_PARTS["path"], **TWO_PARTS["bbox"]}]
    assert t[1]["caption"] == "c" and t[2]["segments"] is None
    assert list(parquet.decode(data)) == rows


def test_shapes_flatten_lines_and_curves():
    polys = shapes.polygons(TWO_PARTS["path"], 10, 10)
    assert polys == [[1, 1, 3, 1, 3, 4, 1, 4], [6, 6, 9, 6, 7.5, 9]]
    assert shapes.area(polys) == pytest.approx(6 + 4.5)
    (curve,) = shapes.polygons(ELLIPSE["path"], 200, 100)
    assert len(curve) // 2 > 8  # curves are sampled, not cut to their end points
    assert shapes.extent([curve]) == pytest.approx((60, 25, 140, 55), abs=0.5)
    assert shapes.polygons("M 0 0 L 1 1", 5, 5) == []  # encloses nothing
    assert shapes.polygons("M 0.5 -0.2 L 1.3 0.5 L 0.5 0.5 Z", 10, 10) == [
        [5, 0, 10, 5, 5, 5]]  # clipped to the image


@pytest.mark.parametrize("part", [{"objects": 5}, {"points": 5}, {"objects": "boxes"},
                                  {"points": {"x": 0.5}}, {"objects": None, "points": None},
                                  {"objects": [5, None, {"x_min": "a"}], "points": [[1, 2]]}])
def test_an_odd_result_shape_is_passed_over_by_every_writer(part):
    """A result field that is not the list the API documents (a number, a string, an object)
    gives no annotation: no exporter crashes on it (the report reads them through the same
    ``shapes.entries``)."""
    from moonbatch.workers.writers import coco, labelstudio, yolo

    for skill in ("detect", "point", "segment"):
        assert list(coco._annotations(skill, part, 10, 10)) == []
        assert labelstudio._values(skill, part, "x") == []
        if skill != "point":
            assert yolo._boxes(skill, part) == []
