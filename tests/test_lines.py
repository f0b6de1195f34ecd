"""moonbatch.workers.lines: signatures, key classification, image preparation and JSONL line encoding."""

from __future__ import annotations

import base64
import functools
import io
import json
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from moonbatch.workers import lines
from moonbatch.workers.budget import ByteBudget
from moonbatch.workers.lines import (
    ItemError,
    _flatten,
    classify_key,
    decoded_bytes,
    prepare_image,
    sniff_format,
)
from moonbatch.workers.models import SkillOptions
from moonbatch.workers.providers.moondream.lines import (
    API_MAX_LINE_BYTES,
    LINE_OVERHEAD,
    encode_line,
    estimate_line_bytes,
    max_image_bytes,
)
from tests.conftest import jpeg_bytes, photos_dir

BIG = 10**7


def photo(name: str) -> bytes:
    return (photos_dir() / name).read_bytes()


@functools.cache
def astronaut() -> Image.Image:
    img = Image.open(io.BytesIO(photo("astronaut.png")))
    img.load()
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# --------------------------------------------------------------------------------------------
# sniff_format / classify_key


@pytest.mark.parametrize("head, fmt", [
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "JPEG"),
    (b"\xff\xd8\xff\xe1", "JPEG"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG"),
    (b"GIF87a\x01\x00", "GIF"),
    (b"GIF89a\x01\x00", "GIF"),
    (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "WEBP"),
    (b"BM6\x00\x0c\x00\x00\x00\x00\x006\x00\x00\x00(\x00\x00\x00", "BMP"),
    (b"II*\x00\x08\x00\x00\x00", "TIFF"),
    (b"MM\x00*\x00\x00\x00\x08", "TIFF"),
])
def test_sniff_format_signatures(head, fmt):
    assert sniff_format(head) == fmt


@pytest.mark.parametrize("head", [
    b"", b"hello, world\n", b'{"id": 1}', b"RIFF\x24\x00\x00\x00WAVEfmt ", b"\x89PNX\r\n\x1a\n",
    b"GIF90a", b"\xff\xd8", b"PK\x03\x04", b"%PDF-1.7",
])
def test_sniff_format_none_for_non_images(head):
    assert sniff_format(head) is None


@pytest.mark.parametrize("name, fmt", [
    ("astronaut.png", "PNG"), ("rocket.jpg", "JPEG"), ("no_time_for_that_tiny.gif", "GIF"),
    ("multipage.tif", "TIFF"),
])
def test_sniff_format_on_real_files(name, fmt):
    assert sniff_format(photo(name)[:32]) == fmt


def test_sniff_format_on_pillow_encodings():
    img = Image.new("RGB", (4, 4), (9, 9, 9))
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        assert sniff_format(encode(img, fmt)[:32]) == fmt


@pytest.mark.parametrize("key, kind", [
    ("a.jpg", "image"), ("dir/b.JPEG", "image"), ("c.png", "image"), ("d.Gif", "image"),
    ("e.webp", "image"), ("f.bmp", "image"), ("g.tif", "image"), ("h.TIFF", "image"),
    ("i.jfif", "image"), ("j.jpe", "image"),
    ("a.txt", "skip"), ("meta/a.json", "skip"), ("x.JSONL", "skip"), ("t.parquet", "skip"),
    ("r.md", "skip"), (".DS_Store", "skip"), ("dir/.hidden", "skip"), ("z.tar", "skip"),
    ("noext", "sniff"), ("dir/IMG_0001", "sniff"), ("weird.dat", "sniff"), ("x.raw", "sniff"),
    ("dir.jpg/file", "sniff"),
])
def test_classify_key(key, kind):
    assert classify_key(key) == kind


def test_classify_key_reads_the_extension_as_splitext_does():
    """classify_key's shortcut for ``name.ext`` gives splitext's extension on awkward keys."""
    import itertools
    import posixpath

    def reference(key):
        ext = posixpath.splitext(key)[1].lower()
        if ext in lines.IMAGE_EXTENSIONS:
            return "image"
        if ext in lines.NON_IMAGE_EXTENSIONS or posixpath.basename(key).startswith("."):
            return "skip"
        return "sniff"

    parts = ["", ".", "..", "a", "a.", ".jpg", "a.jpg", "a..jpg", "/", "d.jpg/", "x.JSON", "..png"]
    keys = ["".join(p) for n in (1, 2, 3) for p in itertools.product(parts, repeat=n)]
    assert {k: classify_key(k) for k in keys} == {k: reference(k) for k in keys}
    assert {classify_key(k) for k in keys} == {"image", "skip", "sniff"}


# --------------------------------------------------------------------------------------------
# prepare_image: pass-through


@pytest.mark.parametrize("name, fmt", [
    ("astronaut.png", "PNG"), ("coffee.png", "PNG"), ("camera.png", "PNG"), ("rocket.jpg", "JPEG"),
    ("hubble_deep_field.jpg", "JPEG"), ("no_time_for_that_tiny.gif", "GIF"),
])
def test_real_photos_pass_through_byte_identical(name, fmt):
    data = photo(name)
    prepared = prepare_image(data, limit=BIG)
    assert prepared.data == data
    assert prepared.transform is None
    assert prepared.format == fmt
    assert (prepared.width, prepared.height) == Image.open(io.BytesIO(data)).size


def test_mpo_camera_jpeg_passes_through_as_jpeg():
    frames = [astronaut().convert("RGB").resize((64, 48)), Image.new("RGB", (64, 48), (9, 9, 9))]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    prepared = prepare_image(data, limit=BIG)
    assert prepared.data == data and prepared.format == "JPEG" and prepared.transform is None


def test_pass_through_at_exactly_the_limit():
    data = photo("rocket.jpg")
    prepared = prepare_image(data, limit=len(data))
    assert prepared.data == data and prepared.transform is None


# --------------------------------------------------------------------------------------------
# prepare_image: conversion


def test_bmp_is_converted_losslessly():
    src = astronaut().resize((200, 150))
    data = encode(src, "BMP")
    prepared = prepare_image(data, limit=BIG)
    assert prepared.transform == "converted"
    assert prepared.format == "PNG"
    assert sniff_format(prepared.data[:32]) == "PNG"
    out = decode(prepared.data)
    assert out.size == (prepared.width, prepared.height) == (200, 150)
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(src.convert("RGB")))


@pytest.mark.parametrize("lossless", [True, False], ids=["lossless", "lossy"])
def test_webp_is_converted_to_png_with_its_pixels(lossless):
    """The API no longer documents WebP (FACTS.md): it is decoded and sent as PNG."""
    src = astronaut().convert("RGB").resize((160, 120))
    data = encode(src, "WEBP", lossless=lossless, quality=80)
    prepared = prepare_image(data, limit=BIG)
    assert prepared.transform == "converted" and prepared.format == "PNG"
    assert sniff_format(prepared.data[:32]) == "PNG"
    out = decode(prepared.data)
    assert out.size == (prepared.width, prepared.height) == (160, 120)
    webp = decode(data).convert("RGB")  # what the WebP decodes to, lossy or not
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(webp))
    if lossless:
        assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(src))


def test_animated_webp_is_converted_from_its_first_frame():
    base = astronaut().convert("RGB").resize((80, 60))
    frames = [base, base.rotate(90), Image.new("RGB", (80, 60), (0, 0, 255))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True,
                  duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    prepared = prepare_image(data, limit=BIG)
    assert prepared.transform == "converted" and prepared.format == "PNG"
    out = decode(prepared.data)
    assert getattr(out, "n_frames", 1) == 1
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(base))


def test_multipage_tif_is_converted():
    data = photo("multipage.tif")
    prepared = prepare_image(data, limit=BIG)
    assert prepared.transform == "converted"
    assert prepared.format in ("PNG", "JPEG")
    first = Image.open(io.BytesIO(data))  # first page
    out = decode(prepared.data)
    assert out.size == first.size == (prepared.width, prepared.height)
    assert np.array_equal(np.asarray(out.convert("L")), np.asarray(first.convert("L")))


def test_pillow_tiff_is_converted_losslessly():
    src = astronaut().resize((96, 64))
    data = encode(src, "TIFF")
    prepared = prepare_image(data, limit=BIG)
    assert prepared.transform == "converted" and prepared.format == "PNG"
    assert np.array_equal(np.asarray(decode(prepared.data).convert("RGB")), np.asarray(src))


def test_converted_image_larger_than_limit_becomes_jpeg_within_limit():
    data = encode(astronaut(), "BMP")  # ~786 KB; its PNG is ~790 KB
    limit = 200_000
    prepared = prepare_image(data, limit=limit)
    assert prepared.transform in ("converted", "reencoded", "downscaled")
    assert prepared.format == "JPEG"
    assert len(prepared.data) <= limit
    assert decode(prepared.data).size == (prepared.width, prepared.height)


# --------------------------------------------------------------------------------------------
# prepare_image: downscaling


def assert_aspect_kept(w0: int, h0: int, w1: int, h1: int) -> None:
    assert abs((w1 / h1) / (w0 / h0) - 1) <= 0.01


def test_photo_over_limit_is_reencoded_at_full_size_when_that_fits():
    prepared = prepare_image(photo("astronaut.png"), limit=200_000)
    assert prepared.transform == "reencoded" and prepared.format == "JPEG"
    assert (prepared.width, prepared.height) == (512, 512) and len(prepared.data) <= 200_000


def test_photo_larger_than_limit_is_downscaled():
    data = photo("astronaut.png")
    assert len(data) > 700_000
    limit = 30_000
    prepared = prepare_image(data, limit=limit)
    assert prepared.transform == "downscaled"
    assert prepared.width < 512
    assert len(prepared.data) <= limit
    out = decode(prepared.data)
    assert out.format == prepared.format == "JPEG"
    assert out.size == (prepared.width, prepared.height)
    assert prepared.width <= 512 and prepared.height <= 512
    assert_aspect_kept(512, 512, prepared.width, prepared.height)


def test_non_square_photo_downscaled_keeps_aspect_ratio():
    data = photo("rocket.jpg")  # 640 x 427
    limit = 15_000
    prepared = prepare_image(data, limit=limit)
    assert prepared.transform == "downscaled"
    assert len(prepared.data) <= limit
    assert prepared.width < 640 and prepared.height < 427
    assert_aspect_kept(640, 427, prepared.width, prepared.height)
    assert decode(prepared.data).size == (prepared.width, prepared.height)


def test_image_that_cannot_fit_raises_image_too_large():
    with pytest.raises(ItemError) as info:
        prepare_image(photo("rocket.jpg"), limit=50)
    assert info.value.code == "image_too_large"
    assert info.value.as_dict() == {"code": "image_too_large", "message": info.value.message}


# --------------------------------------------------------------------------------------------
# prepare_image: modes that need work before JPEG/PNG


def rgba_astronaut() -> Image.Image:
    img = astronaut().convert("RGBA")
    alpha = Image.new("L", img.size, 255)
    alpha.paste(0, (0, 0, 100, 100))  # a fully transparent corner
    img.putalpha(alpha)
    return img


def sixteen_bit_gradient() -> Image.Image:
    """A 256x256 16-bit grey image: a left-to-right ramp over the full 0..65535 range."""
    ramp = (np.linspace(0, 65535, 256, dtype=np.float64)[None, :].repeat(256, axis=0)).astype(np.uint16)
    rng = np.random.default_rng(0)
    ramp = np.clip(ramp.astype(np.int64) + rng.integers(-200, 200, ramp.shape), 0, 65535).astype(np.uint16)
    return Image.fromarray(ramp)


@functools.cache
def mode_cases():
    a = astronaut()
    rgba = rgba_astronaut()
    pal = a.quantize(64)
    pal_t = a.resize((256, 256)).quantize(32)
    pal_t.info["transparency"] = 0
    cmyk = a.convert("CMYK")
    return {
        "rgba_png_downscaled": (encode(rgba, "PNG"), 200_000),
        "rgba_tiff_converted": (encode(rgba.resize((128, 128)), "TIFF"), BIG),
        "la_png": (encode(a.convert("LA"), "PNG"), 100_000),
        "palette_png": (encode(pal, "PNG"), 60_000),
        "palette_transparent_png": (encode(pal_t, "PNG", transparency=0), 10_000),
        "palette_bmp": (encode(pal.resize((128, 128)), "BMP"), BIG),
        "cmyk_jpeg": (encode(cmyk, "JPEG", quality=95), 60_000),
        "cmyk_tiff": (encode(cmyk.resize((128, 128)), "TIFF"), BIG),
        "mode1_tiff": (encode(a.convert("1").resize((128, 128)), "TIFF"), BIG),
        "16bit_png": (encode(sixteen_bit_gradient(), "PNG"), 30_000),
        "16bit_tiff": (encode(sixteen_bit_gradient(), "TIFF"), BIG),
        "gif_downscaled": (photo("no_time_for_that_tiny.gif"), 2_000),
    }


@pytest.mark.parametrize("case", list(mode_cases()))
def test_modes_needing_reencoding_do_not_crash(case):
    data, limit = mode_cases()[case]
    prepared = prepare_image(data, limit=limit)
    assert prepared.transform in ("converted", "reencoded", "downscaled")
    assert len(prepared.data) <= limit
    assert prepared.format in ("PNG", "JPEG")
    out = decode(prepared.data)
    assert out.format == prepared.format
    assert out.mode in ("RGB", "L")
    assert out.size == (prepared.width, prepared.height)


def test_transparent_pixels_become_white():
    prepared = prepare_image(encode(rgba_astronaut().resize((256, 256)), "TIFF"), limit=BIG)
    assert prepared.transform == "converted"
    px = np.asarray(decode(prepared.data).convert("RGB"))
    assert (px[:40, :40] == 255).all()  # the transparent corner (scaled by 0.5) is white
    assert px[200:, 200:].mean() < 250  # the opaque part keeps the photograph


def test_16bit_image_keeps_its_content_when_converted():
    prepared = prepare_image(encode(sixteen_bit_gradient(), "TIFF"), limit=BIG)
    px = np.asarray(decode(prepared.data).convert("L")).astype(float)
    left, right = px[:, :64].mean(), px[:, -64:].mean()
    assert right - left > 100  # the ramp from black to white survives


# --------------------------------------------------------------------------------------------
# prepare_image: the pixel limit and bounded decoding


def forged_jpeg(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose header (SOF0) claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def forged_png(width: int, height: int) -> bytes:
    """A 16x16 RGBA PNG whose IHDR (CRC fixed) claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGBA", (16, 16), (1, 2, 3, 4)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("forge, fmt", [(forged_jpeg, "JPEG"), (forged_png, "PNG")])
def test_image_over_the_pixel_limit_is_refused_from_its_header(forge, fmt):
    # 169 MP: Pillow's own check would raise only past 179 MP, and decode anything below.
    started = time.perf_counter()
    with pytest.raises(ItemError) as info:
        prepare_image(forge(13000, 13000), limit=BIG, max_pixels=2_000_000)
    assert time.perf_counter() - started < 1.0  # no decoding
    assert info.value.code == "image_too_large"
    assert info.value.message.startswith(f"{fmt} image of 13000x13000 pixels is over the limit of "
                                         "120,000,000 pixels (MOONBATCH_MAX_IMAGE_PIXELS)")
    with pytest.raises(ItemError) as info:  # an explicit limit; pass-through sizes too
        prepare_image(encode(astronaut(), "PNG"), limit=BIG, max_image_pixels=512 * 511)
    assert info.value.code == "image_too_large" and "512x512" in info.value.message
    assert prepare_image(encode(astronaut(), "PNG"), limit=BIG,
                         max_image_pixels=512 * 512).transform is None


def test_between_pillows_limit_and_ours_no_bomb_warning_and_0_means_no_limit():
    # 95 MP: over Pillow's default 89.5 MP (it would warn), under moonbatch's 120 MP.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ItemError) as info:
            prepare_image(forged_png(10000, 9500), limit=BIG, max_pixels=2_000_000)
        assert info.value.code == "image_decode_failed"  # its pixels are not there
        with pytest.raises(ItemError) as info:  # 0: no limit, even past Pillow's 179 MP
            prepare_image(forged_png(20000, 10000), limit=BIG, max_pixels=2_000_000,
                          max_image_pixels=0)
        assert info.value.code == "image_decode_failed"


def reference_flatten(img: Image.Image, factor: int) -> Image.Image:
    """The whole image composited on white (16-bit scaled to 8), then box-reduced."""
    if img.mode in ("I;16", "I"):
        flat = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif img.mode in ("RGB", "L"):
        flat = img
    elif img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
    else:
        flat = img.convert("RGB")
    return flat.reduce(factor) if factor > 1 else flat


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency", "I;16", "CMYK", "1", "RGB"])
@pytest.mark.parametrize("factor", [1, 3])
def test_strip_flatten_matches_the_whole_image(mode, factor, monkeypatch):
    monkeypatch.setattr(lines, "STRIP_PIXELS", 7_000)  # ~13 rows: dozens of strips, seams
    if mode == "P+transparency":
        img = astronaut().quantize(32)
        img.info["transparency"] = 0
    elif mode == "I;16":
        img = sixteen_bit_gradient().resize((512, 512))
    elif mode in ("RGBA", "LA"):
        img = rgba_astronaut().convert(mode)
    else:
        img = astronaut().convert(mode)
    out = _flatten(img, factor)
    ref = reference_flatten(img, factor)
    assert out.mode == ref.mode and out.size == ref.size == (-(-512 // factor),) * 2
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(ref, dtype=np.int16))
    assert diff.max() <= 2, (mode, factor, diff.max())  # rounding of premultiplied alpha only


def test_reduced_transparency_has_no_dark_fringe():
    # Transparent black on the left, opaque red on the right, the boundary inside a 7x7 block:
    # averaged without premultiplied alpha, that block's red would mix in the transparent
    # pixels' black (red 224 over white); premultiplied it stays 255.
    img = Image.new("RGBA", (4000, 2000), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (2001, 0, 4000, 2000))
    img = decode(encode(img, "PNG"))
    px = np.asarray(_flatten(img, 7)).astype(int)
    assert px[:, :, 0].min() >= 254
    edge = px[:, 2001 // 7]  # source columns 1995-2001: six transparent, one red
    assert (np.abs(edge[:, 1:] - 255 * 6 / 7) <= 1).all()
    assert (px[:, :285] == 255).all() and (px[:, 286:, 1:] == 0).all()
    prepared = prepare_image(encode(img, "PNG"), limit=BIG, max_pixels=100_000)
    assert prepared.transform == "downscaled" and prepared.width * prepared.height <= 100_000


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_downscaled_image_is_upright(fmt):
    # Stored 3000x1000, red left and blue right, tagged "rotate 90 clockwise" (orientation 6).
    img = Image.new("RGB", (3000, 1000), (255, 0, 0))
    img.paste((0, 0, 255), (1500, 0, 3000, 1000))
    exif = Image.Exif()
    exif[0x0112] = 6
    prepared = prepare_image(encode(img, fmt, exif=exif), limit=BIG, max_pixels=300_000)
    assert prepared.transform == "downscaled" and prepared.height > prepared.width
    px = np.asarray(decode(prepared.data).convert("RGB")).astype(int)
    assert px[5, :, 0].mean() > 200 and px[-5, :, 2].mean() > 200  # red on top, blue below


def test_decoded_bytes_follow_pillows_modes():
    assert decoded_bytes(Image.new("RGB", (100, 10))) == 4000  # RGB is stored as 32-bit
    assert decoded_bytes(Image.new("L", (100, 10))) == 1000
    assert decoded_bytes(Image.new("I;16", (100, 10))) == 2000
    jpeg = Image.open(io.BytesIO(jpeg_bytes((4000, 3000))))
    jpeg.draft("RGB", (500, 375))  # the decoder's 1/8 scale
    assert decoded_bytes(jpeg) == 500 * 375 * 4


# --------------------------------------------------------------------------------------------
# the decode budget (workers.budget)


def test_budget_bounds_bytes_held_and_serves_in_arrival_order():
    budget = ByteBudget(100)
    order: list[str] = []
    gates = {name: threading.Event() for name in ("a", "b", "c")}

    def take(name: str, n: int) -> None:
        with budget.hold(n):
            order.append(name)
            gates[name].wait(10)

    threads = []
    for name, n in (("a", 60), ("b", 60), ("c", 30)):  # c would fit beside a, but b came first
        threads.append(threading.Thread(target=take, args=(name, n)))
        threads[-1].start()
        deadline = time.time() + 10
        while len(budget._queue) + len(order) < len(threads) and time.time() < deadline:
            time.sleep(0.01)
    time.sleep(0.2)
    assert order == ["a"] and budget.in_use == 60
    gates["a"].set()
    deadline = time.time() + 10
    while order != ["a", "b", "c"] and time.time() < deadline:
        time.sleep(0.01)
    assert order == ["a", "b", "c"] and budget.in_use == 90
    gates["b"].set()
    gates["c"].set()
    for t in threads:
        t.join(10)
    assert budget.in_use == 0 and budget.peak == 90


def test_budget_runs_an_oversized_request_alone_and_zero_is_unbounded():
    budget = ByteBudget(100)
    with budget.hold(10_000):
        assert budget.in_use == 100
    with ByteBudget(0).hold(10**12):
        pass
    assert budget.in_use == 0


# --------------------------------------------------------------------------------------------
# prepare_image: errors


def test_empty_object():
    with pytest.raises(ItemError) as info:
        prepare_image(b"", limit=BIG)
    assert info.value.code == "empty_object"


@pytest.mark.parametrize("data", [b"just some text\n", b'{"caption": "a cat"}', b"\x00" * 64])
def test_not_an_image(data):
    with pytest.raises(ItemError) as info:
        prepare_image(data, limit=BIG)
    assert info.value.code == "not_an_image"
    assert info.value.as_dict()["code"] == "not_an_image"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("data", [
    b"\x89PNG\r\n\x1a\n" + b"junk" * 50,
    b"\xff\xd8\xff" + b"junk" * 50,
    b"GIF89a" + b"\x00" * 3,
    b"II*\x00" + b"junk" * 50,
])
def test_signature_followed_by_junk_is_decode_failure(data):
    with pytest.raises(ItemError) as info:
        prepare_image(data, limit=BIG)
    assert info.value.code == "image_decode_failed"
    assert info.value.message


def test_truncated_tiff_needing_conversion_fails_cleanly():
    data = encode(astronaut().resize((64, 64)), "TIFF")
    with pytest.raises(ItemError) as info:
        prepare_image(data[: len(data) // 2], limit=BIG)
    assert info.value.code == "image_decode_failed"


# --------------------------------------------------------------------------------------------
# encode_line / max_image_bytes / estimate_line_bytes


FRAGMENT = SkillOptions(skill="caption", length="short").line_fragment()


@pytest.mark.parametrize("id_", [
    "a.jpg", "dir/sub dir/ünïcødé 写真.png", 'quote"back\\slash.jpg', "emoji 🐱.gif", "tab\tnl\n.jpg",
])
def test_encode_line_is_one_valid_json_line(id_):
    image = photo("rocket.jpg")
    line = encode_line(id_, image, FRAGMENT)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    obj = json.loads(line)
    assert obj["id"] == id_
    assert obj["skill"] == "caption" and obj["length"] == "short"
    assert not obj["image"].startswith("data:")
    assert base64.b64decode(obj["image"], validate=True) == image
    assert list(obj) == ["id", "skill", "length", "image"]


def test_encode_line_keeps_non_ascii_ids_as_utf8():
    id_ = "café/北京.jpg"
    line = encode_line(id_, b"\xff\xd8\xff", FRAGMENT)
    assert id_.encode("utf-8") in line
    assert json.loads(line.decode("utf-8"))["id"] == id_


@pytest.mark.parametrize("skill", ["caption", "query", "detect", "point"])
def test_encode_line_with_each_skill_fragment(skill):
    opts = {"caption": SkillOptions(skill="caption", temperature=0.5),
            "query": SkillOptions(skill="query", question="Wie viele Äpfel?", reasoning=True),
            "detect": SkillOptions(skill="detect", object="face"),
            "point": SkillOptions(skill="point", object="eye")}[skill]
    image = jpeg_bytes()
    obj = json.loads(encode_line("x.jpg", image, opts.line_fragment()))
    image_b64 = obj.pop("image")
    assert obj == {"id": "x.jpg", **opts.request_fields()}
    assert base64.b64decode(image_b64) == image


@pytest.mark.parametrize("id_", ["a.jpg", "ünï/" * 50 + "x.png"])
def test_line_at_max_image_bytes_fits_the_api_line_limit(id_):
    fragment = SkillOptions(skill="query", question="What is in this image? " * 20, reasoning=True,
                            temperature=0.3, top_p=0.9, max_tokens=500).line_fragment()
    n = max_image_bytes(id_, fragment)
    assert n > 7_000_000
    line = encode_line(id_, b"\x01" * n, fragment)
    assert len(line) <= API_MAX_LINE_BYTES
    assert API_MAX_LINE_BYTES - len(line) < LINE_OVERHEAD  # and the bound is not wasteful
    assert estimate_line_bytes(id_, n, len(fragment)) >= len(line)


@pytest.mark.parametrize("max_line", [100, 101, 102, 103, 1000, 4097])
def test_max_image_bytes_with_small_line_limits(max_line):
    id_, fragment = "é.jpg", FRAGMENT
    n = max_image_bytes(id_, fragment, max_line)
    assert n >= 0
    for size in range(0, n + 1, max(1, n // 20)):
        assert len(encode_line(id_, b"\x00" * size, fragment)) <= max_line
    assert len(encode_line(id_, b"\x00" * n, fragment)) <= max_line


def test_max_image_bytes_is_zero_when_nothing_fits():
    assert max_image_bytes("a.jpg", FRAGMENT, 10) == 0


def test_prepared_image_fits_its_line():
    id_ = "photos/astronaut.png"
    max_line = 300_000
    limit = max_image_bytes(id_, FRAGMENT, max_line)
    prepared = prepare_image(photo("astronaut.png"), limit=limit)
    assert len(encode_line(id_, prepared.data, FRAGMENT)) <= max_line


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 1000, 112_525, 3_000_000])
def test_estimate_line_bytes_bounds_pass_through_lines(size):
    id_ = "dir/ünï.jpg"
    line = encode_line(id_, b"\x00" * size, FRAGMENT)
    est = estimate_line_bytes(id_, size, len(FRAGMENT))
    assert len(line) <= est <= len(line) + LINE_OVERHEAD + len(id_.encode()) * 2


def test_estimate_line_bytes_is_capped_at_the_line_limit():
    assert estimate_line_bytes("x.tif", 500_000_000) == API_MAX_LINE_BYTES
    assert estimate_line_bytes("x.tif", 1000) < estimate_line_bytes("x.tif", 2000)
