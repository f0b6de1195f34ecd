"""Bad input never stops a run and is never dropped: each item ends as one row, a result or a
clear error naming it."""

from __future__ import annotations

import io
import uuid

import numpy as np
from PIL import Image

from tests.conftest import (
    Worker,
    expected_result,
    jpeg_bytes,
    photos_dir,
    read_results,
    run_cli,
    wait_for_run,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_awkward_images_succeed_and_broken_ones_are_error_rows(s3, bucket, env, tmp_path):
    photo = Image.open(photos_dir() / "chelsea.png").convert("RGB")
    frames = [photo.rotate(a) for a in (0, 10, 20)]
    good = jpeg_bytes(size=(300, 200))
    objects = {
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG", quality=90),
        "sixteen-bit.png": encode(Image.fromarray(
            (np.linspace(0, 65535, 256 * 128).reshape(128, 256)).astype(np.uint16)), "PNG"),
        "palette.png": encode(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "zero-bytes.jpg": b"",
        "text-named.jpg": b"this is a text file with an image name\n",
        "truncated.jpg": good[: len(good) * 2 // 3],
        "to-be-deleted.jpg": good,
        "odd keys/#1 ?&=+ ünï.jpg": good,
    }
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key="bad/" + key, Body=body)

    # Plan with no worker consuming, delete one object, then let a worker run the shard.
    queue = "bad-" + uuid.uuid4().hex[:8]
    qenv = {**env, "MOONBATCH_QUEUE": queue}
    run_cli(["submit", f"s3://{bucket}/bad/", f"s3://{bucket}/out/"], qenv)
    s3.delete_object(Bucket=bucket, Key="bad/to-be-deleted.jpg")
    with Worker(env, queue, tmp_path / "worker.log"):
        summary = wait_for_run(s3, bucket, "out/")
    assert summary["status"] == "completed"

    rows = {r["id"]: r for r in read_results(s3, bucket, "out/")}
    assert sorted(rows) == sorted(objects)  # every item exactly once
    for key in ("cmyk.jpg", "sixteen-bit.png", "palette.png", "animated.gif",
                "odd keys/#1 ?&=+ ünï.jpg"):
        assert rows[key]["status"] == "ok", rows[key]
    for key in ("palette.png", "animated.gif", "sixteen-bit.png"):  # sent byte for byte
        assert rows[key]["result"] == expected_result(objects[key], {"skill": "caption"})
    codes = {k: r["error"]["code"] for k, r in rows.items() if r["status"] == "error"}
    assert codes == {"zero-bytes.jpg": "empty_object", "text-named.jpg": "not_an_image",
                     "truncated.jpg": "image_decode_failed",
                     "to-be-deleted.jpg": "object_not_found"}
    assert "deleted" in rows["to-be-deleted.jpg"]["error"]["message"]
