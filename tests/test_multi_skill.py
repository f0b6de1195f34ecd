"""Several skills in one run (``--skill caption --skill detect ...``), for both providers: each
row holds every skill's result under the skill's name, checked against the answer the emulator
computes from that photograph's pixels; and every row carries the photograph's size."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.conftest import expected_result, read_results, run_cli, upload_photos, wait_for_run

SKILLS = {"caption": {"skill": "caption", "length": "short"},
          "detect": {"skill": "detect", "object": "face"},
          "query": {"skill": "query", "question": "What is shown?"}}
ARGS = ["--skill", "caption", "--length", "short", "--skill", "detect", "--object", "face",
        "--skill", "query", "--question", "What is shown?"]


def size_of(image: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(image)).size


@pytest.mark.parametrize("provider", ["moondream", "fal"])
def test_one_row_per_image_holds_every_skill(provider, s3, bucket, env, fleet):
    photos = upload_photos(s3, bucket, "photos/")
    run_cli(["submit", f"s3://{bucket}/photos/", f"s3://{bucket}/out/", "--provider", provider,
             "--shard-size", "5", *ARGS], env)
    summary = wait_for_run(s3, bucket, "out/", timeout=150)
    assert summary["status"] == "completed" and summary["skill"] == "caption+detect+query"
    rows = read_results(s3, bucket, "out/")
    assert sorted(r["id"] for r in rows) == sorted(photos)  # one row per image
    for row in rows:
        image = photos[row["id"]]
        assert row["status"] == "ok", row
        assert (row["width"], row["height"]) == size_of(image)
        assert set(row["result"]) == set(SKILLS)
        for name, request in SKILLS.items():
            got = dict(row["result"][name])
            if provider == "fal":
                from tests.test_fal_provider import CASES, expected_row

                endpoint = f"fal-ai/moondream3-preview/{name}"
                assert got.pop("raw")
                want, _ = expected_row(endpoint, CASES[endpoint][1] if name != "caption"
                                       else {"length": "short"}, image, name)
            else:
                want = expected_result(image, request)
            assert got == want, (row["id"], name, got, want)
        if provider == "moondream":  # usage is the sum of the three lines'
            assert row["usage"]["input_tokens"] > 0
    if provider == "fal":
        assert sum(b.get("requests") or 0 for b in summary["batches"]) == 3 * len(photos)


def test_downscaled_images_report_the_size_sent(s3, bucket, env, fleet):
    photos = upload_photos(s3, bucket, "photos/", names=("astronaut.png", "rocket.jpg"))
    run_cli(["submit", f"s3://{bucket}/photos/", f"s3://{bucket}/out/", "--max-pixels", "40000"],
            env)
    assert wait_for_run(s3, bucket, "out/", timeout=120)["status"] == "completed"
    for row in read_results(s3, bucket, "out/"):
        w, h = size_of(photos[row["id"]])
        assert (row["width"], row["height"]) == (w, h)
        assert row["sent_width"] * row["sent_height"] <= 40000 < w * h
        assert abs(row["sent_width"] / row["sent_height"] - w / h) < 0.05


@pytest.mark.parametrize(("args", "message"), [
    (["--skill", "caption", "--skill", "caption"], "--skill caption is given twice"),
    (["--skill", "detect", "--skill", "point", "--object", "x", "--length", "short"],
     "--length applies to --skill caption only"),
    (["--skill", "caption", "--skill", "query"], "--question is required"),
])
def test_bad_skill_combinations_are_refused_in_one_line(args, message, tmp_path, env):
    proc = run_cli(["run", str(tmp_path), str(tmp_path / "out"), "--dry-run", *args], env,
                   check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_fal_multi_skill_refuses_another_endpoint(tmp_path, env):
    proc = run_cli(["run", str(tmp_path), str(tmp_path / "out"), "--dry-run", "--provider", "fal",
                    "--endpoint", "fal-ai/moondream/batched", "--skill", "caption", "--skill",
                    "query", "--question", "q"], env, check=False)
    assert proc.returncode == 2 and "leave --endpoint" in proc.stderr, proc.stderr


def test_multi_skill_parquet_rows_and_coco_from_the_detect_skill(s3, bucket, env, fleet):
    import pyarrow.parquet as pq
    from pycocotools.coco import COCO

    photos = upload_photos(s3, bucket, "photos/")
    run_cli(["submit", f"s3://{bucket}/photos/", f"s3://{bucket}/out/", "--format", "parquet",
             "--skill", "caption", "--skill", "detect", "--object", "face"], env)
    assert wait_for_run(s3, bucket, "out/", timeout=150)["status"] == "completed"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/results/")["Contents"]]
    assert keys and all(k.endswith(".parquet") for k in keys)
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read()))
    first = table.to_pylist()[0]
    want = expected_result(photos[first["id"]], SKILLS["detect"])
    assert first["caption"] == expected_result(photos[first["id"]], {"skill": "caption"})["caption"]
    assert len(first["objects"]) == len(want["objects"])
    body = s3.get_object(Bucket=bucket, Key="out/annotations/instances.json")["Body"].read()
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(body.decode())
    coco = COCO(f.name)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["face"]
    for image in coco.loadImgs(coco.getImgIds()):
        name = image["moonbatch_id"]
        w, h = size_of(photos[name])
        assert (image["width"], image["height"]) == (w, h)
        boxes = sorted(a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])))
        expect = sorted([o["x_min"] * w, o["y_min"] * h, (o["x_max"] - o["x_min"]) * w,
                         (o["y_max"] - o["y_min"]) * h]
                        for o in expected_result(photos[name], SKILLS["detect"])["objects"])
        assert len(boxes) == len(expect)
        for got, exp in zip(boxes, expect, strict=True):
            assert all(abs(a - b) < 1e-6 * max(w, h) for a, b in zip(got, exp, strict=True))
    assert json.loads(body)["images"]


def test_another_format_or_skill_set_is_another_command(tmp_path):
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import command_differences, new_spec
    from moonbatch.workers.models import SkillOptions

    (tmp_path / "in").mkdir()
    caption, detect = SkillOptions(skill="caption"), SkillOptions(skill="detect", object="x")
    one = new_spec(str(tmp_path / "in"), str(tmp_path / "out"), caption, get_settings())
    both = new_spec(str(tmp_path / "in"), str(tmp_path / "out"), [caption, detect], get_settings())
    table = new_spec(str(tmp_path / "in"), str(tmp_path / "out"), caption, get_settings(),
                     output_format="parquet")
    assert command_differences(one, one) == []
    assert any(d.startswith("more_options") for d in command_differences(one, both))
    assert any(d.startswith("output_format") for d in command_differences(one, table))
