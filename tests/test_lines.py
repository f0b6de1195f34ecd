"""workers.lines: signatures, key classification, image preparation and JSONL line encoding."""

from __future__ import annotations

import base64
import functools
import io
import json

import numpy as np
import pytest
from PIL import Image

from config import API_MAX_LINE_BYTES
from tests.conftest import jpeg_bytes, photos_dir
from workers.lines import (
    LINE_OVERHEAD,
    ItemError,
    classify_key,
    encode_line,
    estimate_line_bytes,
    max_image_bytes,
    prepare_image,
    sniff_format,
)
from workers.models import SkillOptions

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
