"""Multi-image queries (seed 002, "Common fields": a query's ``images``) end to end over the
emulator and the session's real worker fleet: a JSONL and a Parquet manifest with a list-valued
image column, a Parquet file of image bytes read with several ``--image-column``; every answer
carries each image's fingerprint (the emulator answers a query with every image's), rows keep
the manifest's id and list each image's source and size (JSONL, and the Parquet ``images``
column), a bad second image ends its item as one error row naming it; the refusals (fal, a
skill other than query) before anything is written; the dry run's images per item."""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import read_results, run_cli, tiny_jpeg

QUESTION = "Which one changed?"


def fingerprint(data: bytes) -> str:
    """``<fingerprint>, <w>x<h>``: how the emulator names an image in a query's answer."""
    from moonbatch.emulator.inference import fingerprint_bytes

    fp, w, h, _ = fingerprint_bytes(data)
    return f"{fp}, {w}x{h}"


def expected(images: list[bytes]) -> dict:
    """The emulator's answer to a query line carrying ``images`` in this order."""
    from moonbatch.emulator.inference import infer

    return infer({"skill": "query", "question": QUESTION,
                  "images": [base64.b64encode(i).decode() for i in images]})[0]


def write_images(folder: Path, n: int, start: int = 0) -> dict[str, bytes]:
    """``n`` distinct tiny JPEGs ``img<k>.jpg`` in ``folder``: {name: bytes}."""
    out = {}
    for k in range(start, start + n):
        data = tiny_jpeg(1000 + k)
        (folder / f"img{k}.jpg").write_bytes(data)
        out[f"img{k}.jpg"] = data
    return out


def check_rows(rows: list[dict], plan: dict, imgs: dict[str, bytes], folder: Path) -> None:
    """Each id once; multi-image rows answer from every image and list them with sizes."""
    got = {json.dumps(r["id"]): r for r in rows}
    assert sorted(got) == sorted(json.dumps(i) for i in plan)
    for item_id, names in plan.items():
        row = got[json.dumps(item_id)]
        if names is None:  # the bad second image: one error row naming it
            assert row["status"] == "error", row
            assert row["error"]["code"] == "object_not_found", row
            assert row["error"]["message"].startswith("image 2 of 2 (missing.jpg)"), row
            assert [i["source"].rsplit("/", 1)[-1] for i in row["images"]] == \
                ["img0.jpg", "missing.jpg"]
            assert row["images"][0]["width"] == 32 and row["images"][1]["width"] is None
            continue
        assert row["status"] == "ok", row
        data = [imgs[n] for n in names]
        assert row["result"] == expected(data)
        for image in data:  # every image reached the model
            assert fingerprint(image) in row["result"]["answer"]
        if len(names) == 1:
            assert "images" not in row or row["images"] is None
            continue
        assert [(i["source"], i["width"], i["height"]) for i in row["images"]] == \
            [(str(folder / n), 32, 24) for n in names]
        assert row["source"] == row["images"][0]["source"]
        assert (row["width"], row["height"]) == (32, 24)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_list_valued_image_column_on_the_batch_api(fmt, tmp_path, s3, bucket, env, fleet):
    folder = tmp_path / "m"
    folder.mkdir()
    imgs = write_images(folder, 6)
    # id → the row's images (None: a row whose second image is missing)
    plan = {1: ["img0.jpg", "img1.jpg"], 2: ["img2.jpg", "img3.jpg", "img4.jpg"],
            3: ["img5.jpg"], 4: None}
    rows = [{"id": i, "pics": names if names is not None else ["img0.jpg", "missing.jpg"]}
            for i, names in plan.items()]
    if fmt == "jsonl":
        rows[2]["pics"] = "img5.jpg"  # a plain string is one image
        (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.table({"id": [r["id"] for r in rows],
                                 "pics": pa.array([r["pics"] for r in rows],
                                                  pa.list_(pa.string()))}), folder / "m.parquet")
    prefix = f"out-{uuid.uuid4().hex[:8]}/"
    out_format = "parquet" if fmt == "parquet" else "jsonl"
    proc = run_cli(["run", str(folder / f"m.{fmt}"), f"s3://{bucket}/{prefix}", "--skill",
                    "query", "--question", QUESTION, "--image-column", "pics", "--format",
                    out_format, "--workers", "0", "--timeout", "120"], env)
    assert "completed" in proc.stdout
    check_rows(read_results(s3, bucket, prefix), plan, imgs, folder)
    if out_format == "parquet":
        key = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix +
                                                        "results/")["Contents"])
        table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
        assert table.schema.field("images").type == pa.list_(pa.struct(
            [("source", pa.string()), ("width", pa.int32()), ("height", pa.int32())]))
        by_id = dict(zip(table.column("id").to_pylist(), table.column("images").to_pylist(),
                         strict=True))
        assert by_id["3"] is None  # a single-image row
        assert [i["width"] for i in by_id["2"]] == [32, 32, 32]


def test_several_image_columns_of_a_parquet_file(tmp_path, s3, bucket, env, fleet):
    imgs = {f"img{k}.jpg": tiny_jpeg(2000 + k) for k in range(6)}
    names = list(imgs)
    table = pa.table({
        "id": ["a", "b", "c"],
        "before": pa.array([imgs[n] for n in names[0::2]], pa.binary()),
        # a ``datasets.Image`` struct column next to a plain binary one
        "after": pa.array([{"bytes": imgs[n], "path": n} for n in names[1::2]],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    })
    pq.write_table(table, tmp_path / "pairs.parquet", row_group_size=2)
    prefix = f"out-{uuid.uuid4().hex[:8]}/"
    proc = run_cli(["run", str(tmp_path / "pairs.parquet"), f"s3://{bucket}/{prefix}",
                    "--skill", "query", "--question", QUESTION, "--image-column", "before",
                    "--image-column", "after", "--format", "parquet", "--workers", "0",
                    "--timeout", "120"], env)
    assert "completed" in proc.stdout
    rows = {r["id"]: r for r in read_results(s3, bucket, prefix)}
    assert sorted(rows) == ["a", "b", "c"]
    for k, item_id in enumerate(["a", "b", "c"]):
        row = rows[item_id]
        pair = [imgs[names[2 * k]], imgs[names[2 * k + 1]]]
        assert row["status"] == "ok", row
        assert row["result"] == expected(pair)
        assert all(fingerprint(i) in row["result"]["answer"] for i in pair)
        sources = [i["source"] for i in row["images"]]
        # row group / row in group / column (row groups of 2 rows)
        assert sources == [f"{tmp_path / 'pairs.parquet'}#{k // 2}/{k % 2}/{c}"
                           for c in ("before", "after")], sources
        assert [(i["width"], i["height"]) for i in row["images"]] == [(32, 24), (32, 24)]


def _refused(args: list[str], env: dict, out: Path) -> str:
    proc = run_cli(args + [str(out)], env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # refused before anything was written
    return proc.stderr


@pytest.mark.parametrize("how", ["columns", "list"])
def test_refusals_name_the_fix(how, tmp_path, env):
    write_images(tmp_path, 2)
    if how == "columns":
        (tmp_path / "m.csv").write_text("id,a,b\n1,img0.jpg,img1.jpg\n")
        manifest, cols = tmp_path / "m.csv", ["--image-column", "a", "--image-column", "b"]
    else:  # found only by reading the rows: a list-valued column
        (tmp_path / "m.jsonl").write_text(json.dumps({"id": 1, "image": ["img0.jpg",
                                                                         "img1.jpg"]}) + "\n")
        manifest, cols = tmp_path / "m.jsonl", []
    # a start and a dry run refuse alike (each case once, to keep the CLI calls few)
    dry = ["--dry-run"] if how == "list" else []
    fal = _refused(["submit", str(manifest), *cols, "--skill", "query", "--question",
                    QUESTION, "--provider", "fal", *dry], env, tmp_path / "out-fal")
    assert "--provider fal sends one image per request" in fal, fal
    assert "use --provider moondream" in fal, fal
    caption = _refused(["submit", str(manifest), *cols, "--skill", "caption",
                        *(["--dry-run"] if not dry else [])], env, tmp_path / "out-caption")
    assert "--skill caption takes one image per request" in caption, caption
    assert "use --skill query alone" in caption, caption


def test_dry_run_reports_images_per_item(tmp_path, env):
    write_images(tmp_path, 5)
    (tmp_path / "m.csv").write_text("id,a,b\n1,img0.jpg,img1.jpg\n2,img2.jpg,img3.jpg\n")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"id": 1, "image": ["img0.jpg", "img1.jpg", "img2.jpg"]}) + "\n"
        + json.dumps({"id": 2, "image": "img4.jpg"}) + "\n")
    args = ["--skill", "query", "--question", QUESTION, "--dry-run"]
    report = json.loads(run_cli(["submit", str(tmp_path / "m.csv"), str(tmp_path / "o"),
                                 "--image-column", "a", "--image-column", "b", *args, "--json",
                                 "--max-pixels", "0"],
                                env).stdout)
    assert report["items"] == 2 and report["images"] == 4
    assert report["images_per_item"] == {"2": 2}
    # Tokens are estimated per image: each item's two images cost twice one image's.
    from moonbatch.workers.providers import estimate_input_tokens

    per_image = report["image_bytes"] // 4
    assert report["input_tokens"] == 4 * estimate_input_tokens(per_image, 0)
    assert report["image_bytes"] == sum((tmp_path / f"img{k}.jpg").stat().st_size
                                        for k in range(4))
    text = run_cli(["submit", str(tmp_path / "m.jsonl"), str(tmp_path / "o"), *args], env).stdout
    assert "images per item" in text and "1 (1 item), 3 (1 item); 4 images" in text, text
    assert not (tmp_path / "o").exists()


def test_plan_items_stay_backward_compatible():
    from moonbatch.workers.models import PlanItem

    old = PlanItem.from_json(b'{"id":"a.jpg","size":3,"ref":"x/a.jpg"}')
    assert old.more is None and old.images == ("x/a.jpg",) and old.parts() == (old,)
    assert old.to_json() == b'{"id":"a.jpg","size":3,"ref":"x/a.jpg"}'
    pair = PlanItem(7, 10, "a.jpg", None, ("s3://b/b.jpg",))
    assert PlanItem.from_json(pair.to_json()) == pair
    assert [p.ref for p in pair.parts()] == ["a.jpg", "s3://b/b.jpg"]
    assert all(p.id == 7 and p.more is None for p in pair.parts())
    with pytest.raises(ValueError, match="more"):
        PlanItem.from_json(b'{"id":1,"size":1,"more":"a.jpg"}')
    assert not hasattr(pair, "__dict__")  # still slotted
