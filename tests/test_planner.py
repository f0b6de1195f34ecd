"""moonbatch.producer.planner.plan_shards and workers.readers.prefix.iter_items (on a real local
directory)."""

from __future__ import annotations

import io

import pytest

from moonbatch.producer.planner import Shard, plan_shards
from moonbatch.workers.models import PlanItem
from moonbatch.workers.providers import get_provider
from moonbatch.workers.providers.moondream.lines import (
    API_MAX_FILE_BYTES,
    API_MAX_LINE_BYTES,
    API_MAX_LINES,
    estimate_line_bytes,
)
from moonbatch.workers.readers import ListingStats
from moonbatch.workers.readers.prefix import iter_items
from moonbatch.workers.storage import LocalStore
from tests.conftest import jpeg_bytes, photos_dir

BATCH_API = get_provider("moondream").limits(None)  # type: ignore[arg-type]  # no spec needed

# --------------------------------------------------------------------------------------------
# plan_shards


def make_items(n: int, size: int = 1000, prefix: str = "img") -> list[PlanItem]:
    return [PlanItem(id=f"{prefix}/{i:05d}.jpg", size=size) for i in range(n)]


def assert_partition(shards: list[Shard], items: list[PlanItem]) -> None:
    """Every item in exactly one shard, in input order; indices 0..n-1 dense; no empty shard."""
    assert [s.index for s in shards] == list(range(len(shards)))
    assert all(s.items for s in shards)
    flat = [it for s in shards for it in s.items]
    assert flat == items
    assert len({it.id for it in flat}) == len(items)


def test_every_item_in_exactly_one_shard_in_order():
    items = make_items(1003)
    shards = list(plan_shards(items, limits=BATCH_API, max_lines=100, max_bytes=API_MAX_FILE_BYTES))
    assert_partition(shards, items)
    assert [len(s.items) for s in shards] == [100] * 10 + [3]


def test_closes_at_max_lines_exactly():
    items = make_items(30)
    shards = list(plan_shards(items, limits=BATCH_API, max_lines=10, max_bytes=API_MAX_FILE_BYTES))
    assert_partition(shards, items)
    assert [len(s.items) for s in shards] == [10, 10, 10]


def test_max_lines_one_gives_one_item_per_shard():
    items = make_items(5)
    shards = list(plan_shards(items, limits=BATCH_API, max_lines=1, max_bytes=API_MAX_FILE_BYTES))
    assert_partition(shards, items)
    assert [len(s.items) for s in shards] == [1] * 5


def test_empty_input_yields_no_shards():
    assert list(plan_shards([], limits=BATCH_API, max_lines=10, max_bytes=1000)) == []


def test_shard_bytes_is_sum_of_line_estimates():
    items = [PlanItem(id=f"x{i}.png", size=100 * (i + 1)) for i in range(7)]
    (shard,) = plan_shards(items, limits=BATCH_API, max_lines=100, max_bytes=API_MAX_FILE_BYTES,
                           fragment_len=40)
    assert shard.bytes == sum(estimate_line_bytes(it.id, it.size, 40) for it in items)


def test_closes_by_estimated_bytes():
    size = 3_000_000  # ~4 MB of base64 per line
    items = make_items(10, size=size)
    line = estimate_line_bytes(items[0].id, size)
    max_bytes = line * 3 + line // 2  # room for 3 lines, not 4
    shards = list(plan_shards(items, limits=BATCH_API, max_lines=1000, max_bytes=max_bytes))
    assert_partition(shards, items)
    assert [len(s.items) for s in shards] == [3, 3, 3, 1]
    for s in shards:
        assert s.bytes <= max_bytes
        assert s.bytes == len(s.items) * line


def test_bytes_limit_with_mixed_sizes_never_exceeded_by_multi_item_shards():
    sizes = [10, 5_000_000, 200, 7_000_000, 1_000_000, 3, 6_000_000, 6_000_000, 50, 2_000_000]
    items = [PlanItem(id=f"m{i}.jpg", size=s) for i, s in enumerate(sizes)]
    max_bytes = 12_000_000
    shards = list(plan_shards(items, limits=BATCH_API, max_lines=1000, max_bytes=max_bytes))
    assert_partition(shards, items)
    for s in shards:
        assert s.bytes <= max_bytes
    # Greedy: the first item of the next shard would not have fitted into the previous one.
    for prev, nxt in zip(shards, shards[1:], strict=False):
        first = nxt.items[0]
        assert prev.bytes + estimate_line_bytes(first.id, first.size) > max_bytes


def test_huge_item_alone_gets_its_own_shard():
    small = make_items(3, size=100)
    huge = PlanItem(id="huge.tif", size=50_000_000)  # estimate is capped at the line limit
    items = [small[0], small[1], huge, small[2]]
    max_bytes = 5_000_000  # smaller than the huge item's (capped) estimate
    shards = list(plan_shards(items, limits=BATCH_API, max_lines=1000, max_bytes=max_bytes))
    assert_partition(shards, items)
    assert [s.items for s in shards] == [(small[0], small[1]), (huge,), (small[2],)]
    assert shards[1].bytes == API_MAX_LINE_BYTES > max_bytes


def test_consecutive_huge_items_each_alone():
    items = [PlanItem(id=f"h{i}.png", size=40_000_000) for i in range(3)]
    shards = list(plan_shards(items, limits=BATCH_API, max_lines=1000, max_bytes=1_000_000))
    assert_partition(shards, items)
    assert [len(s.items) for s in shards] == [1, 1, 1]


def test_is_lazy_over_its_input():
    consumed = []

    def gen():
        for item in make_items(1000):
            consumed.append(item)
            yield item

    shards = plan_shards(gen(), limits=BATCH_API, max_lines=10, max_bytes=API_MAX_FILE_BYTES)
    first = next(shards)
    assert len(first.items) == 10
    assert len(consumed) <= 11  # holds one shard (plus the item that closed it)


@pytest.mark.parametrize("max_lines, max_bytes", [
    (0, 1000), (-1, 1000), (API_MAX_LINES + 1, 1000),
    (10, 0), (10, -5), (10, API_MAX_FILE_BYTES + 1),
])
def test_out_of_range_limits_raise(max_lines, max_bytes):
    with pytest.raises(ValueError):
        list(plan_shards(make_items(2), limits=BATCH_API, max_lines=max_lines, max_bytes=max_bytes))


def test_limits_at_the_api_maximum_are_accepted():
    shards = list(plan_shards(make_items(3), limits=BATCH_API, max_lines=API_MAX_LINES,
                              max_bytes=API_MAX_FILE_BYTES))
    assert len(shards) == 1 and len(shards[0].items) == 3


# --------------------------------------------------------------------------------------------
# iter_items on a LocalStore


def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def write(root, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_reader_takes_images_and_skips_sidecars(tmp_path):
    jpg = jpeg_bytes()
    files = {
        "a.jpg": jpg, "b.JPEG": jpg, "c.png": png_bytes(), "d.gif": b"GIF89a....", "e.webp": b"RIFF",
        "f.bmp": b"BM..", "g.tiff": b"II*\x00", "h.tif": b"MM\x00*",
        "a.txt": b"a caption", "a.json": b'{"k": 1}', "labels.csv": b"x,y\n", "meta.parquet": b"PAR1",
    }
    for rel, data in files.items():
        write(tmp_path, rel, data)
    stats = ListingStats()
    items = list(iter_items(LocalStore(tmp_path), stats))
    ids = {it.id for it in items}
    assert ids == {"a.jpg", "b.JPEG", "c.png", "d.gif", "e.webp", "f.bmp", "g.tiff", "h.tif"}
    assert {it.id: it.size for it in items} == {k: len(files[k]) for k in ids}
    assert stats.listed == len(files)
    assert stats.items == 8
    assert stats.skipped == 4
    assert sorted(stats.skipped_examples) == ["a.json", "a.txt", "labels.csv", "meta.parquet"]


def test_reader_sniffs_extensionless_files(tmp_path):
    write(tmp_path, "photo_png", png_bytes())
    write(tmp_path, "photo_jpeg", jpeg_bytes())
    write(tmp_path, "README", b"This dataset contains photographs.\n")
    write(tmp_path, "empty", b"")
    write(tmp_path, "weird.dat", (photos_dir() / "rocket.jpg").read_bytes())
    write(tmp_path, ".hidden.jpgx", png_bytes())  # dot-files are never items
    stats = ListingStats()
    ids = [it.id for it in iter_items(LocalStore(tmp_path), stats)]
    assert sorted(ids) == ["photo_jpeg", "photo_png", "weird.dat"]
    assert stats.items == 3
    assert stats.skipped == 3
    assert sorted(stats.skipped_examples) == [".hidden.jpgx", "README", "empty"]
    assert stats.listed == 6


def test_reader_exclude_prefix(tmp_path):
    jpg = jpeg_bytes()
    write(tmp_path, "in/1.jpg", jpg)
    write(tmp_path, "out/run/results/00000.jpg", jpg)
    write(tmp_path, "out/run/plan.json", b"{}")
    write(tmp_path, "outdoor/2.jpg", jpg)
    stats = ListingStats()
    ids = sorted(it.id for it in iter_items(LocalStore(tmp_path), stats, exclude_prefix="out/"))
    assert ids == ["in/1.jpg", "outdoor/2.jpg"]
    assert stats.items == 2
    assert stats.skipped == 0  # excluded objects are not "skipped non-images"
    assert stats.listed == 4


def test_reader_nested_ids_are_posix_relative_paths(tmp_path):
    jpg = jpeg_bytes()
    rels = ["top.jpg", "a/b/c/deep.png", "a/x.jpg", "z dir/ünï code.jpeg"]
    for rel in rels:
        write(tmp_path, rel, jpg)
    store = LocalStore(tmp_path)
    items = list(iter_items(store, ListingStats()))
    ids = [it.id for it in items]
    assert sorted(ids) == sorted(rels)
    for id_ in ids:
        assert "\\" not in id_ and not id_.startswith("/")
        assert store.get(id_) == jpg  # an id is a key of the input store


def test_reader_feeds_planner(tmp_path):
    for i in range(25):
        write(tmp_path, f"d{i % 3}/{i:03d}.jpg", jpeg_bytes(size=(8 + i, 8)))
    write(tmp_path, "d0/notes.txt", b"x")
    stats = ListingStats()
    shards = list(plan_shards(iter_items(LocalStore(tmp_path), stats), limits=BATCH_API, max_lines=10,
                              max_bytes=API_MAX_FILE_BYTES))
    assert [len(s.items) for s in shards] == [10, 10, 5]
    assert stats.items == 25 and stats.skipped == 1 and stats.listed == 26


def test_planning_and_listing_import_without_celery():
    """The producer's planning and listing (and the pure worker modules) never build the Celery
    app: a process that imports them has not imported celery."""
    import subprocess
    import sys

    modules = ("moonbatch.producer.planner", "moonbatch.workers.readers.prefix", "moonbatch.workers.lines",
               "moonbatch.workers.merge", "moonbatch.workers.layout", "moonbatch.workers.models",
               "moonbatch.workers.storage", "moonbatch.workers.registry", "moonbatch.workers.providers",
               "moonbatch.workers.providers.moondream", "moonbatch.workers.providers.fal",
               "moonbatch.workers.slots")
    code = (f"import sys, {', '.join(modules)}; "
            "print(sorted(m for m in ('celery', 'kombu', 'moonbatch.workers.app') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
