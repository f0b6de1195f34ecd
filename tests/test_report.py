"""``moonbatch report`` (and ``--report`` on ``run`` and ``wait``, ``Run.report``): one HTML file
a browser opens with no server.

- Reports of real runs (S3 on moto, the emulator, the session's real worker fleet): a text-skill
  run (caption and query, Parquet output, error rows) and a spatial run (detect, point and
  segment on the real-time API, error rows), opened in Debian's chromium, headless: the run id,
  one overlay element per box, point and mask of the rows, and the error table are in the
  page's DOM; a screenshot of each is saved as a test artifact.
- The overlay sits on the image: a box and a point of a known result cover the expected pixels
  of the rendered thumbnail in a screenshot.
- A synthetic run of 200,000 rows (written by the real writer) gives a report of a few hundred
  kB in seconds, with the same sample every time and error rows in it.
- Images are read as the run's workers read them: a plan's local file or private address is
  refused (a placeholder saying why, and no request); a row's ``source`` is never followed;
  every text of a row is escaped; multi-image rows and Parquet output show every image.
"""

from __future__ import annotations

import hashlib
import html.parser
import http.server
import io
import threading
import time
import uuid
from pathlib import Path

import orjson
from PIL import Image

from tests.browser import dump_dom, screenshot
from tests.conftest import (
    jpeg_bytes,
    read_json,
    read_results,
    run_cli,
    upload_photos,
    wait_for_run,
)

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
BAD = {"zero-bytes.jpg": b"", "text-named.jpg": b"this is a text file with an image name\n"}


class Elements(html.parser.HTMLParser):
    """Every element of a page as ``(tag, attributes)``, and the text inside each ``id``."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.texts: dict[str, str] = {}
        self._open: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attrs))
        if "id" in attrs:
            self.texts[attrs["id"]] = ""
            self._open.append(attrs["id"])

    def handle_endtag(self, tag):
        pass

    def handle_data(self, data):
        for key in self._open[-1:]:
            self.texts[key] += data
            if data.strip():
                self._open.pop()

    def of_class(self, tag: str, cls: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and cls in a.get("class", "").split()]


def check_page(dom: str, run_id: str, rows: list[dict], spatial: bool) -> Elements:
    """The DOM of a report of ``rows`` (all of them in the sample): the run id, one tile per
    row, one overlay element per box, point and mask, and every error code with its count."""
    page = Elements(dom)
    assert page.texts["run-id"].strip() == run_id
    tiles = page.of_class("article", "tile")
    assert sorted(t["data-id"] for t in tiles) == sorted(r["id"] for r in rows)
    if spatial:
        def part(row: dict, skill: str) -> dict:
            return row["result"][skill]

        ok = [r for r in rows if r["status"] == "ok"]
        boxes = sum(len(part(r, "detect")["objects"]) for r in ok)
        points = sum(len(part(r, "point")["points"]) for r in ok)
        masks = sum(1 for r in ok if part(r, "segment")["path"])
        assert boxes and points and masks
        assert len(page.of_class("rect", "box")) == boxes
        assert len(page.of_class("circle", "point")) == points
        assert len(page.of_class("path", "mask")) == masks
        assert len(page.of_class("svg", "overlay")) == sum(
            1 for r in ok if part(r, "detect")["objects"] or part(r, "point")["points"]
            or part(r, "segment")["path"])
    codes: dict[str, int] = {}
    for r in rows:
        if r["status"] == "error":
            codes[r["error"]["code"]] = codes.get(r["error"]["code"], 0) + 1
    shown = {a["data-code"]: int(a["data-count"]) for a in page.of_class("tr", "error-code")}
    assert shown == codes and codes
    # Every ok row's image is shown; an unreadable one is a placeholder saying why.
    assert len([a for t, a in page.elements if t == "img"]) == len(rows) - len(BAD)
    assert dom.count('class="placeholder"') == len(BAD)
    assert "empty_object" in dom and "not_an_image" in dom
    assert "<script" not in dom.lower()
    return page


def body(path: Path) -> str:
    """A report's page without its footer (which says when it was written)."""
    return path.read_text().rsplit("<footer>", 1)[0]


def upload_inputs(s3, bucket: str, prefix: str) -> None:
    upload_photos(s3, bucket, prefix, names=PHOTOS)
    for key, body in BAD.items():
        s3.put_object(Bucket=bucket, Key=prefix + key, Body=body)


def get_report(s3, bucket: str, key: str, path: Path) -> Path:
    path.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    return path


def test_reports_of_real_runs_open_in_chromium(s3, bucket, env, fleet, tmp_path):
    # A text-skill run, Parquet results, with --report: OUTPUT/report.html when it completes.
    upload_inputs(s3, bucket, "in/")
    text = run_cli(["run", f"s3://{bucket}/in/", f"s3://{bucket}/text/", "--skill", "caption",
                    "--skill", "query", "--question", "What is shown?", "--format", "parquet",
                    "--workers", "0", "--timeout", "120", "--report"], env)
    assert f"report: s3://{bucket}/text/report.html" in text.stderr, text.stderr
    summary = read_json(s3, bucket, "text/run.json")
    rows = read_results(s3, bucket, "text/")
    report = get_report(s3, bucket, "text/report.html", tmp_path / "text.html")
    page = check_page(dump_dom(report.as_uri()), summary["run_id"], rows, spatial=False)
    answers = " ".join(a.get("class", "") for t, a in page.elements if t == "dd")
    assert "caption" in answers and "query" in answers
    assert report.stat().st_size < 1_000_000
    screenshot(report.as_uri(), "report-text-run.png")

    # A spatial run on the real-time API, followed by `wait --report`, then `moonbatch report`.
    run_id = run_cli(["submit", f"s3://{bucket}/in/", f"s3://{bucket}/spatial/", "--provider",
                      "moondream-realtime", "--skill", "detect", "--skill", "point", "--skill",
                      "segment", "--object", "face"], env).stdout.split()[-1]
    waited = run_cli(["wait", run_id, "--timeout", "120", "--report"], env)
    assert f"report: s3://{bucket}/spatial/report.html" in waited.stderr, waited.stderr
    rows = read_results(s3, bucket, "spatial/")
    mine = tmp_path / "spatial.html"
    made = run_cli(["report", run_id, "--out", str(mine)], env)
    assert made.stdout.strip() == str(mine)
    check_page(dump_dom(mine.as_uri()), run_id, rows, spatial=True)
    # The report written by `wait` shows the same page (the same sample, the same shapes).
    same = get_report(s3, bucket, "spatial/report.html", tmp_path / "waited.html")
    assert body(same) == body(mine)
    shot = screenshot(mine.as_uri(), "report-spatial-run.png")
    assert shot.stat().st_size > 50_000


# --- synthetic runs: written with the real writers and plan format --------------------------

def make_run(output: Path, input_url: str, rows: list[dict], items: list, *, skills: list[dict],
             fmt: str = "jsonl", shards: int = 1, status: str = "completed") -> str:
    """A finished run at ``output`` (a local folder) of ``rows`` and plan ``items``, split
    evenly over ``shards``: spec, plan, plan files, results (``workers.writers``) and run.json.
    Returns its run id."""
    from moonbatch.workers import layout, writers
    from moonbatch.workers.models import RunSpec, SkillOptions
    from moonbatch.workers.storage import LocalStore, put_json

    run_id = "20260101-000000-" + uuid.uuid4().hex[:6]
    opts = [SkillOptions(**s) for s in skills]
    spec = RunSpec(run_id=run_id, input=input_url, output=str(output) + "/", options=opts[0],
                   more_options=opts[1:], output_format=fmt, shard_size=10_000,
                   max_shard_bytes=1 << 30, created_at=time.time(), exports=[])
    store = LocalStore(output)
    put_json(store, layout.SPEC, spec.model_dump(mode="json"))
    per = -(-len(rows) // shards)
    for shard in range(shards):
        part = slice(shard * per, (shard + 1) * per)
        store.put(layout.plan_items(shard), b"".join(i.to_json() + b"\n" for i in items[part]))
        writers.write_shard(store, fmt, shard, [orjson.dumps(r) for r in rows[part]])
    put_json(store, layout.PLAN, {"shards": shards, "items": len(rows), "skipped": 0})
    errors = [r for r in rows if r["status"] != "ok"]
    codes: dict[str, int] = {}
    for r in errors:
        codes[r["error"]["code"]] = codes.get(r["error"]["code"], 0) + 1
    put_json(store, layout.SUMMARY, {
        "run_id": run_id, "status": status, "input": input_url, "output": spec.output,
        "skill": spec.skill_names, "provider": spec.provider, "endpoint": None, "model": None,
        "counts": {"total": len(rows), "ok": len(rows) - len(errors), "error": len(errors),
                   "done": len(rows), "cached": 0, "in_flight": 0, "skipped": 0},
        "shards": {"total": shards, "merged": shards, "submitted": shards, "in_flight": 0},
        "errors_by_code": codes, "usage": {"input_tokens": 1000, "output_tokens": 10},
        "timings": {"created_at": "2026-01-01T00:00:00.000+00:00", "wall_seconds": 3.5},
        "batches": [], "failure": None, "cancelled": None, "stop_reason": None,
        "spend": {"actual_usd": 0.01, "estimated_usd": 0.02, "in_flight_usd": 0.0,
                  "max_cost_usd": None}})
    return run_id


def settings():
    from moonbatch.config import get_settings

    return get_settings()


def grey_png(path: Path, size=(400, 300), colour=(128, 128, 128)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_a_box_and_a_point_cover_their_pixels_in_chromium(tmp_path):
    """A detect box at (0.25, 0.2)-(0.75, 0.6) and a point at (0.6, 0.3) of a 400x300 grey
    image: in the screenshot, the box's stroke bounds the thumbnail's matching pixel rectangle
    and the point's dot is centred on its pixel, within 2 px."""
    from moonbatch.producer import report
    from moonbatch.workers.models import PlanItem

    images = tmp_path / "in"
    images.mkdir()
    grey_png(images / "grey.png")
    box = {"x_min": 0.25, "y_min": 0.2, "x_max": 0.75, "y_max": 0.6}
    row = {"id": "grey.png", "source": str(images / "grey.png"), "status": "ok",
           "result": {"detect": {"objects": [box]}, "point": {"points": [{"x": 0.6, "y": 0.3}]}},
           "usage": {"input_tokens": 10, "output_tokens": 2}, "width": 400, "height": 300}
    out = tmp_path / "out"
    make_run(out, str(images) + "/", [row], [PlanItem("grey.png", 1000)],
             skills=[{"skill": "detect", "object": "thing"}, {"skill": "point", "object": "thing"}])
    page = Path(report.write(str(out), settings(), out=tmp_path / "r.html"))
    shot = screenshot(page.as_uri(), "report-overlay.png", window=(1000, 1400))
    img = Image.open(shot).convert("RGB")
    w, h = img.size
    px = img.load()

    def where(test, area=(0, 0, w, h)):
        found = [(x, y) for y in range(area[1], area[3]) for x in range(area[0], area[2])
                 if test(px[x, y])]
        assert found, "colour not found in the screenshot"
        xs, ys = [p[0] for p in found], [p[1] for p in found]
        return min(xs), min(ys), max(xs), max(ys), found

    # The thumbnail: the bounding box of the grey image's pixels.
    left, top, right, bottom, _ = where(lambda p: all(abs(c - 128) <= 4 for c in p))
    tw, th = right - left + 1, bottom - top + 1
    assert abs(tw / th - 4 / 3) < 0.02 and tw > 200, (tw, th)
    near = (left - 3, top - 3, right + 4, bottom + 4)
    pink = where(lambda p: p[0] > 220 and p[1] < 90 and 100 < p[2] < 190, near)
    expected = (left + 0.25 * tw, top + 0.2 * th, left + 0.75 * tw, top + 0.6 * th)
    for got, want in zip(pink[:4], expected, strict=True):
        assert abs(got - want) <= 2, (pink[:4], expected)
    cyan = where(lambda p: p[0] < 60 and p[1] > 200 and p[2] > 200, near)[4]
    cx = sum(p[0] for p in cyan) / len(cyan)
    cy = sum(p[1] for p in cyan) / len(cyan)
    assert abs(cx - (left + 0.6 * tw)) <= 2 and abs(cy - (top + 0.3 * th)) <= 2, (cx, cy)
    dx = max(p[0] for p in cyan) - min(p[0] for p in cyan)
    dy = max(p[1] for p in cyan) - min(p[1] for p in cyan)
    assert abs(dx - dy) <= 1  # a round dot, not an ellipse


def test_a_large_run_gives_a_small_report_quickly(tmp_path):
    """200,000 rows in 4 shards (10% errors of 3 codes): the report reads them all, shows 60
    (15 of them errors), is a few hundred kB, takes seconds, and is the same every time."""
    from moonbatch.producer import report
    from moonbatch.workers.models import PlanItem

    images = tmp_path / "in"
    images.mkdir()
    for k in range(4):
        (images / f"img{k}.jpg").write_bytes(jpeg_bytes(size=(640, 480), color=(40 * k, 90, 160)))
    n = 200_000
    codes = ("object_not_found", "image_decode_failed", "processing_error")
    rows, items = [], []
    for i in range(n):
        key = f"dir{i % 100}/img{i:06d}.jpg"
        items.append(PlanItem(key, 50_000, f"img{i % 4}.jpg"))
        if i % 10 == 3:
            rows.append({"id": key, "source": "x", "status": "error", "width": 640,
                         "height": 480, "error": {"code": codes[i % 3], "message": f"m{i}"}})
        else:
            rows.append({"id": key, "source": "x", "status": "ok", "width": 640, "height": 480,
                         "result": {"objects": [{"x_min": 0.1, "y_min": 0.1, "x_max": 0.5,
                                                 "y_max": 0.4}]},
                         "usage": {"input_tokens": 1458, "output_tokens": 9}})
    out = tmp_path / "out"
    make_run(out, str(images) + "/", rows, items, skills=[{"skill": "detect", "object": "cat"}],
             shards=4)
    del rows, items
    start = time.monotonic()
    first = Path(report.write(str(out), settings()))
    took = time.monotonic() - start
    second = Path(report.write(str(out), settings(), out=tmp_path / "again.html"))
    assert first == out / "report.html"
    page = Elements(first.read_text())
    tiles = page.of_class("article", "tile")
    assert len(tiles) == 60
    assert sum(1 for t in tiles if t["data-status"] == "error") == 15
    assert len(page.of_class("rect", "box")) == 45
    shown = {a["data-code"]: int(a["data-count"]) for a in page.of_class("tr", "error-code")}
    want: dict[str, int] = {}
    for i in range(3, n, 10):
        want[codes[i % 3]] = want.get(codes[i % 3], 0) + 1
    assert shown == want
    size = first.stat().st_size
    print(f"200,000 rows: report of {size:,} bytes in {took:.1f} s")
    assert size < 3_000_000
    assert took < 20, took  # seconds on a loaded 2-core machine; about 4 s unloaded
    assert body(first) == body(second)  # the same sample, the same page


def test_images_are_read_under_the_runs_rules_and_text_is_escaped(s3, bucket, env, tmp_path):
    """A run whose INPUT is on S3: its plan naming a local file or a private address is not
    read (the tile says why, the server sees no request); a row not in the plan shows no image
    whatever its ``source``; hostile text is escaped; the good image is shown."""
    from moonbatch.producer import report
    from moonbatch.workers.models import PlanItem

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(jpeg_bytes())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg_bytes(color=(1, 2, 3)))
    s3.put_object(Bucket=bucket, Key="in/good.jpg", Body=jpeg_bytes(size=(120, 90)))
    hostile = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    rows = [
        {"id": "good.jpg", "source": f"s3://{bucket}/in/good.jpg", "status": "ok",
         "result": {"caption": hostile}, "width": 120, "height": 90},
        {"id": "local", "source": str(secret), "status": "ok", "result": {"caption": "a"}},
        {"id": "private", "source": "http://127.0.0.1/", "status": "ok",
         "result": {"caption": "b"}},
        {"id": hostile, "source": str(secret), "status": "error",
         "error": {"code": hostile, "message": hostile}},
    ]
    items = [PlanItem("good.jpg", 100), PlanItem("local", 100, f"file://{secret}"),
             PlanItem("private", 100, f"http://127.0.0.1:{server.server_address[1]}/a.jpg")]
    out = tmp_path / "out"
    make_run(out, f"s3://{bucket}/in/", rows, items, skills=[{"skill": "caption"}])
    try:
        text = Path(report.write(str(out), settings())).read_text()
    finally:
        server.shutdown()
    assert hits == []  # the private address was never asked
    page = Elements(text)
    tiles = {t["data-id"]: t for t in page.of_class("article", "tile")}
    assert set(tiles) == {"good.jpg", "local", "private", hostile}
    assert len([a for t, a in page.elements if t == "img"]) == 1  # good.jpg's alone
    assert text.count("reference_refused") == 2
    assert "not in the run&#39;s plan" in text
    # The hostile text is text: no script element, no event-handler attribute, no <img src=x>.
    assert not [t for t, a in page.elements if t == "script" or any(k.startswith("on") for k in a)]
    assert not [a for t, a in page.elements if t == "img" and a.get("src") == "x"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "default-src &#39;none&#39;" in text or "default-src 'none'" in text


def test_multi_image_rows_and_parquet_output_show_every_image(tmp_path):
    from moonbatch.producer import report
    from moonbatch.workers.models import PlanItem

    images = tmp_path / "in"
    images.mkdir()
    for k in range(3):
        grey_png(images / f"p{k}.png", size=(90 + 30 * k, 60), colour=(50 * k, 100, 100))
    rows = [{"id": 7, "source": str(images / "p0.png"), "status": "ok",
             "result": {"answer": "the second is wider"}, "width": 90, "height": 60,
             "images": [{"source": str(images / f"p{k}.png"), "width": 90 + 30 * k,
                         "height": 60} for k in range(3)],
             "usage": {"input_tokens": 3000, "output_tokens": 5}}]
    item = PlanItem(7, 300, "p0.png", None, ("p1.png", "p2.png"))
    out = tmp_path / "out"
    make_run(out, str(images) + "/", rows, [item],
             skills=[{"skill": "query", "question": "Which changed?"}], fmt="parquet")
    text = Path(report.write(str(out), settings(), sample=5)).read_text()
    page = Elements(text)
    (tile,) = page.of_class("article", "tile")
    assert tile["data-id"] == "7"
    sizes = [(a["width"], a["height"]) for t, a in page.elements if t == "img"]
    assert len(sizes) == 3 and len(set(sizes)) == 3  # every image, each its own shape
    assert "the second is wider" in text and "Which changed?" in text


def test_sample_is_reproducible_and_keeps_a_share_of_errors():
    from moonbatch.producer.report import Rows
    from moonbatch.workers.models import RunSpec, SkillOptions

    spec = RunSpec(run_id="r1", input="/in/", output="/out/", options=SkillOptions(
        skill="caption"), shard_size=10, max_shard_bytes=10, created_at=0.0)

    def picks(run_id: str, n_err: int, size: int = 20) -> list[str]:
        rows = Rows(spec.model_copy(update={"run_id": run_id}), size)
        for i in range(1000):
            err = i < n_err
            rows.add(i // 100, i % 100, {"id": f"k{i}", "status": "error" if err else "ok",
                                **({"error": {"code": "c"}} if err else {"result": {}})})
        return [p.key for p in rows.sample()]

    a = picks("r1", 100)
    assert a == picks("r1", 100) and a != picks("r2", 100)
    assert len(a) == 20 and sum(1 for k in a if int(k[1:]) < 100) == 5  # 25% errors
    assert sorted(a, key=lambda k: int(k[1:])) == a  # in the run's order
    # The rows kept are those of the smallest hashes, whatever the order they come in.
    ok = sorted((k for k in (f"k{i}" for i in range(100, 1000))),
                key=lambda k: hashlib.blake2b(b"r1\0" + k.encode(), digest_size=8).digest())
    assert set(a) - {f"k{i}" for i in range(100)} == set(ok[:15])
    assert len(picks("r1", 3)) == 20 and sum(1 for k in picks("r1", 3) if int(k[1:]) < 3) == 3
    assert sum(1 for k in picks("r1", 995) if int(k[1:]) >= 995) == 5  # ok rows are few
    assert picks("r1", 10, size=0) == []


def test_cli_lines(env, tmp_path):
    missing = run_cli(["report", str(tmp_path / "nothing")], env, check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: no moonbatch run")
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    bad = run_cli(["report", str(tmp_path), "--sample", "-1"], env, check=False)
    assert bad.returncode == 2 and "--sample -1" in bad.stderr, bad.stderr
    dry = run_cli(["run", str(tmp_path), str(tmp_path / "o"), "--dry-run", "--report"], env,
                  check=False)
    assert dry.returncode == 2 and "--report" in dry.stderr and "Traceback" not in dry.stderr


def test_python_api_writes_the_report(s3, bucket, env, fleet, tmp_path):
    import moonbatch

    upload_photos(s3, bucket, "api-in/", names=("coffee.png",))
    run = moonbatch.submit(f"s3://{bucket}/api-in/", f"s3://{bucket}/api-out/")
    wait_for_run(s3, bucket, "api-out/")
    assert run.report() == f"s3://{bucket}/api-out/report.html"
    # a browser opening it through a presigned URL shows the page
    head = s3.head_object(Bucket=bucket, Key="api-out/report.html")
    assert head["ContentType"] == "text/html; charset=utf-8"
    local = run.report(sample=0, out=str(tmp_path / "r.html"))
    text = Path(local).read_text()
    assert run.id in text and 'class="tile' not in text


def test_webdataset_input_shows_each_samples_image(s3, bucket, env, fleet, tmp_path):
    """A run of a WebDataset ``.tar`` on S3: the report reads each thumbnail with a ranged GET
    of its member, through the WebDataset reader, as the workers read the images."""
    from tests.test_webdataset_parquet import make_tar

    photos = {n: upload_photos(s3, bucket, "tmp/", names=(n,))[n] for n in PHOTOS[:3]}
    tar = make_tar([(f"00000/{i:09d}", {name.rsplit(".", 1)[1]: data, "txt": b"caption"})
                    for i, (name, data) in enumerate(photos.items())])
    s3.put_object(Bucket=bucket, Key="wds/00000.tar", Body=tar)
    run_cli(["run", f"s3://{bucket}/wds/00000.tar", f"s3://{bucket}/wds-out/", "--workers",
             "0", "--timeout", "120", "--report"], env)
    report = get_report(s3, bucket, "wds-out/report.html", tmp_path / "wds.html")
    page = Elements(report.read_text())
    assert sorted(t["data-id"] for t in page.of_class("article", "tile")) == [
        f"00000/{i:09d}" for i in range(3)]
    sizes = [(int(a["width"]), int(a["height"])) for t, a in page.elements if t == "img"]
    assert len(sizes) == 3 and all(max(s) == 320 for s in sizes), sizes
    assert sizes[0] == (320, 320) and sizes[1][1] < 320  # astronaut is square, chelsea is not
