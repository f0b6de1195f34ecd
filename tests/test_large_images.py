"""Large real photographs end to end: the pixel budget and the API's 10 MB line limit."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import photos_dir, read_json, read_results, run_cli


def big_photo(size: tuple[int, int], fmt: str, noise: float, seed: int) -> bytes:
    """A real photograph upscaled to ``size`` with sensor-like noise (so PNG cannot shrink it)."""
    img = Image.open(photos_dir() / "coffee.png").convert("RGB").resize(size, Image.Resampling.BICUBIC)
    px = np.asarray(img, dtype=np.float32)
    px += np.random.default_rng(seed).normal(0, noise, px.shape)
    buf = io.BytesIO()
    Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(buf, format=fmt, quality=92)
    return buf.getvalue()


def dims(row) -> tuple[int, int]:
    w, h = re.search(r"A (\d+)x(\d+) image", row["result"]["caption"]).groups()
    return int(w), int(h)


def test_pixel_budget_and_line_limit(s3, bucket, env, fleet):
    huge_png = big_photo((2700, 1800), "PNG", 20, 1)  # > 10 MB: cannot pass as it is
    big_jpeg = big_photo((6000, 4000), "JPEG", 3, 2)  # 24 MP, a few MB: fits the line limit
    assert len(huge_png) > 10_000_000 and len(big_jpeg) < 7_000_000
    s3.put_object(Bucket=bucket, Key="big/huge.png", Body=huge_png)
    s3.put_object(Bucket=bucket, Key="big/camera.jpg", Body=big_jpeg)

    # Default budget (~2 MP): both are downscaled, aspect ratio kept.
    run_cli(["run", f"s3://{bucket}/big/", f"s3://{bucket}/default/", "--workers", "0",
             "--timeout", "120"], env)
    rows = {r["id"]: r for r in read_results(s3, bucket, "default/")}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    for key, (w0, h0) in (("huge.png", (2700, 1800)), ("camera.jpg", (6000, 4000))):
        w, h = dims(rows[key])
        assert w * h <= 2_000_000 and w * h > 1_500_000
        assert abs(w / h - w0 / h0) < 0.01
    build = read_json(s3, bucket, "default/_moonbatch/shards/00000/r0/build.json")
    assert build["transformed"] == 2 and build["bytes"] < len(huge_png) + len(big_jpeg)

    # --max-pixels 0: the JPEG goes as it is; the PNG changes only as far as the line limit asks:
    # re-encoded as JPEG at full resolution, which fits.
    run_cli(["run", f"s3://{bucket}/big/", f"s3://{bucket}/full/", "--max-pixels", "0",
             "--workers", "0", "--timeout", "120"], env)
    rows = {r["id"]: r for r in read_results(s3, bucket, "full/")}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert dims(rows["camera.jpg"]) == (6000, 4000)
    assert dims(rows["huge.png"]) == (2700, 1800)
    build = read_json(s3, bucket, "full/_moonbatch/shards/00000/r0/build.json")
    assert build["transformed"] == 1
    # Every line the emulator accepted is within the API's 10 MB line limit (it enforces it).


# Peak RSS from VmHWM: ru_maxrss of a child starts at its parent's high-water mark (Linux
# records the forked address space's peak at exec), and pytest's may be large.
MEASURE = """
import re, sys, time


def hwm():
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024


data = open(sys.argv[1], "rb").read()
from moonbatch.workers.lines import prepare_image
base = hwm()
started = time.perf_counter()
p = prepare_image(data, limit=9_000_000, max_pixels=2_000_000)
print(time.perf_counter() - started, hwm() - base, p.width, p.height, p.transform)
"""


def test_a_large_transparent_png_is_downscaled_with_one_decode_in_memory(tmp_path):
    # 8000x8000 RGBA, 64 MP, under the pixel limit: decoded it is 256 MB. Flattening it onto
    # white and reducing it used to take three more full-size copies.
    path = tmp_path / "big.png"
    Image.new("RGBA", (8000, 8000), (30, 120, 200, 128)).save(path)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path)], env=os.environ,
                          capture_output=True, text=True, timeout=300, check=True)
    seconds, growth, width, height, transform = proc.stdout.split()
    decoded = 8000 * 8000 * 4
    print(f"\n8000x8000 RGBA PNG: {float(seconds):.1f}s, peak RSS +{int(growth) / 1e6:.0f} MB "
          f"({int(growth) / decoded:.2f}x the decoded image), sent {width}x{height}")
    assert transform == "downscaled" and int(width) * int(height) <= 2_000_000
    assert int(growth) < 1.3 * decoded
