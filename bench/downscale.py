"""downscale: what a pixel budget saves on large photographs, and what it costs per image.

Measures ``moonbatch.workers.lines.prepare_image(data, limit=..., max_pixels=2_000_000)`` on camera-sized
JPEGs (quality 92): three of ~12 MP (4000x3000) and three of ~24 MP (6000x4000), made by
upscaling scikit-image's photos with sharpening and sensor grain. Reported per size: the bytes
that go into the line (base64 adds a third on top) and the time per image (best of 2).

Baseline: the same call with ``max_pixels=0`` (no pixel budget: an image passes through byte for
byte unless its line would pass the API's 10 MB limit). The ratio is the upload-bytes saving.
Skipped, with the baseline still measured, while ``prepare_image`` has no ``max_pixels``.
"""

from __future__ import annotations

import inspect
import time

from bench.common import MB, Result, Servers, add_grain, cached_dir, dir_files, mark_complete, photos

MAX_PIXELS = 2_000_000
SIZES = {"12 MP": (4000, 3000), "24 MP": (6000, 4000)}
SOURCES = {"12 MP": ("astronaut.png", "coffee.png", "chelsea.png"),
           "24 MP": ("hubble_deep_field.jpg", "motorcycle_left.png", "rocket.jpg")}
GRAIN = 6.0
REPEATS = 2  # time: best of
SMOKE_SIZES = {"12 MP": (400, 300), "24 MP": (600, 400)}  # --smoke: checks that it runs


def make_images(sizes: dict[str, tuple[int, int]] = SIZES) -> dict[str, list[bytes]]:
    """The large JPEGs by size class (cached): centre crop to 4:3 or 3:2, bicubic upscale,
    unsharp mask, grain, quality 92."""
    from PIL import Image, ImageFilter

    path, ready = cached_dir("downscale-v1" if sizes == SIZES else "downscale-smoke-v1")
    if not ready:
        sources = photos()
        for label, (w, h) in sizes.items():
            for i, name in enumerate(SOURCES[label]):
                img = sources[name]
                cw = min(img.width, round(img.height * w / h))
                ch = min(img.height, round(img.width * h / w))
                x, y = (img.width - cw) // 2, (img.height - ch) // 2
                img = img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
                img = add_grain(img.filter(ImageFilter.UnsharpMask(4, 120, 2)), GRAIN, i)
                img.save(path / f"{label.replace(' ', '')}-{name.split('.')[0]}.jpg", "JPEG",
                         quality=92)
        mark_complete(path)
    return {label: [p.read_bytes() for p in dir_files(path) if p.name.startswith(label.replace(" ", ""))]
            for label in sizes}


def run(servers: Servers, smoke: bool = False) -> Result:
    """Run the benchmark (see the module docstring); ``smoke``: small images and a pixel budget
    below them, to check that it runs."""
    from moonbatch.workers.lines import prepare_image
    from moonbatch.workers.models import SkillOptions
    from moonbatch.workers.providers.moondream.lines import max_image_bytes

    result = Result("downscale")
    supported = "max_pixels" in inspect.signature(prepare_image).parameters
    max_pixels = 60_000 if smoke else MAX_PIXELS
    budgets = [0, max_pixels] if supported else [None]
    limit = max_image_bytes("photos/camera/IMG_0001.jpg", SkillOptions(skill="caption").line_fragment())
    images = make_images(SMOKE_SIZES if smoke else SIZES)

    def measure(data: bytes, budget: int | None) -> tuple[int, float, str]:
        kwargs = {} if budget is None else {"max_pixels": budget}
        best = float("inf")
        for _ in range(REPEATS):
            start = time.perf_counter()
            out = prepare_image(data, limit=limit, **kwargs)
            best = min(best, time.perf_counter() - start)
        return len(out.data), best, f"{out.width}x{out.height}"

    measure(images["12 MP"][0], budgets[-1])  # load Pillow's plugins before timing

    for label, blobs in images.items():
        before = sum(map(len, blobs))
        runs = {b: [measure(d, b) for d in blobs] for b in budgets}
        sent = {b: sum(r[0] for r in v) for b, v in runs.items()}
        per_image = {b: sum(r[1] for r in v) / len(v) for b, v in runs.items()}
        dims = {b: sorted({r[2] for r in v}) for b, v in runs.items()}
        base = budgets[0]
        baseline = (f"{'max_pixels=0' if supported else 'no pixel budget'}: "
                    f"{sent[base] / len(blobs) / MB:.2f} MB/image "
                    f"({', '.join(dims[base])}), {per_image[base] * 1000:.2f} ms/image")
        if supported:
            saving = 1 - sent[max_pixels] / sent[base]
            result.add(f"{label} upload bytes", f"{sent[max_pixels] / len(blobs) / MB:.2f} MB/image "
                       f"({', '.join(dims[max_pixels])})", baseline, f"-{saving:.0%} bytes")
            result.add(f"{label} time", f"{per_image[max_pixels] * 1000:.2f} ms/image",
                       f"{per_image[base] * 1000:.2f} ms/image",
                       f"+{(per_image[max_pixels] - per_image[base]) * 1000:.0f} ms/image")
        else:
            result.add(f"{label} upload bytes", "n/a (no max_pixels)", baseline)
        result.notes.append(f"{label}: {len(blobs)} JPEGs, {before / len(blobs) / MB:.2f} MB/image "
                            f"on input; line limit {limit / MB:.2f} MB raw")
    if not supported:
        result.skipped = ("moonbatch.workers.lines.prepare_image() does not accept max_pixels yet: only the "
                          "baseline (no pixel budget) was measured")
    return result
