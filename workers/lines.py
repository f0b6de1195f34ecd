"""Images made ready for a provider's request, whatever the provider. Pure: no I/O.

Each request must stay within a byte limit the provider sets (``prepare_image``'s ``limit``;
the Batch API's line limit: ``moonbatch.workers.providers.moondream.lines``). Images in a format
the API documents (JPEG, PNG, GIF; FACTS.md "real-time API") pass through byte for byte; other
formats Pillow reads (WebP, BMP, TIFF, ...) are converted; an image whose request would be too
long is downscaled, keeping its aspect ratio, until it fits. An image over the pixel limit
(``MOONBATCH_MAX_IMAGE_PIXELS``) is refused from its header; decoding is bounded by the
process's decode budget (``moonbatch.workers.budget``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import posixpath

from pybase64 import b64encode

# Extensions that make an object an item without looking at it.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
)
# Extensions that are never items (sidecars, metadata, code); anything else is sniffed.
NON_IMAGE_EXTENSIONS = frozenset(
    {".txt", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".md", ".html", ".htm", ".xml",
     ".yaml", ".yml", ".py", ".pyi", ".pyc", ".tar", ".zip", ".gz", ".npy", ".npz", ".pdf",
     ".mp4", ".mov", ".avi", ".mp3", ".wav", ".log", ".db", ".sqlite", ".pkl", ".h5", ".pt",
     ".bin", ".onnx", ".safetensors", ".toml", ".ini", ".cfg", ".sh", ".js", ".css"}
)
# What the API documents (md-docs docs/skills/caption.md; WebP is no longer listed). MPO is a
# camera JPEG with extra frames appended; JPEG readers see its first: it goes as a JPEG.
API_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF"})
SNIFF_BYTES = 32

class ItemError(Exception):
    """An item cannot be sent; ``code`` is a stable machine-readable reason.

    Codes: ``empty_object``, ``not_an_image``, ``image_decode_failed``, ``image_too_large``,
    ``object_not_found``, ``read_failed``; reading an item (``moonbatch.workers.readers``):
    ``invalid_reference`` (a malformed URL, bucket or path), ``reference_refused`` (a
    non-public address, a local file, a bucket the workers' settings do not open),
    ``object_too_large`` (over ``MOONBATCH_ITEM_MAX_BYTES``), ``read_timeout`` (past
    ``MOONBATCH_ITEM_DEADLINE`` or the HTTP timeout); ``invalid_options``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        """``{"code", "message"}`` as written in an error row."""
        return {"code": self.code, "message": self.message}


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes (``"JPEG"``, ``"PNG"``, ``"GIF"``,
    ``"WEBP"``, ``"BMP"``, ``"TIFF"``), or None if they are not an image signature."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in (
            12, 16, 40, 52, 56, 64, 108, 124):  # the DIB header sizes Windows and OS/2 define
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def classify_key(key: str) -> str:
    """``"image"`` if the key's extension names an image, ``"skip"`` if it names a known
    non-image type, ``"sniff"`` if only the content can tell."""
    dot = key.rfind(".")
    if dot > 0 and key[dot - 1] not in "./" and "/" not in key[dot:]:
        ext = key[dot:].lower()  # "name.ext": splitext's answer, at a third of its cost a key
    else:
        ext = posixpath.splitext(key)[1].lower()  # no dot, a dot in a folder, leading dots
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in NON_IMAGE_EXTENSIONS or posixpath.basename(key).startswith("."):
        return "skip"
    return "sniff"


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedImage:
    """Bytes ready to base64 into a line. ``transform`` says what was done: None (passed through),
    ``"converted"`` (format the API does not read), ``"reencoded"`` (same pixels as JPEG to fit
    the line limit) or ``"downscaled"`` (fewer pixels to fit the line limit)."""

    data: bytes
    format: str
    width: int  # pixels sent
    height: int
    transform: str | None = None
    source_width: int = 0  # pixels of the image as read (0: the same as sent)
    source_height: int = 0

    def dims(self) -> list[int]:
        """``[width, height]`` of the source image, with the sent ``[width, height]`` appended
        when they differ (a downscaled image): what ``ShardBuild.sizes`` records."""
        sw, sh = self.source_width or self.width, self.source_height or self.height
        return [sw, sh] if (sw, sh) == (self.width, self.height) else [sw, sh, self.width, self.height]


JPEG_QUALITY = 95  # what the official client sends
# Pixels of one strip when flattening or reducing a decoded image: working copies stay this
# small (a few MB) instead of the image's size.
STRIP_PIXELS = 1 << 20
PILLOW_BLOCK_BYTES = 64 * 1024 * 1024
# Bytes per pixel of Pillow's in-memory modes (everything else, RGB included, takes 4).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# EXIF orientation (tag 0x0112) → the transpose that makes the image upright (as
# ImageOps.exif_transpose does).
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
            6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


@functools.cache
def _pillow():
    """Pillow's ``Image`` module, with its own decompression-bomb check off: moonbatch applies
    an explicit limit (``max_image_pixels``) from the header, where Pillow's default only
    warns between 89.5 and 179 MP and would refuse a large image the settings allow; and its
    memory blocks sized so that freed images leave the process."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    # Decoded pixels in blocks larger than glibc's largest mmap threshold (32 MB), so a large
    # image's memory goes back to the system when it is freed instead of staying in the malloc
    # arena of the fetch thread that decoded it (16 threads: gigabytes of freed memory held).
    Image.core.set_block_size(PILLOW_BLOCK_BYTES)
    return Image


def prepare_image(data: bytes, *, limit: int, max_pixels: int = 0,
                  max_image_pixels: int | None = None) -> PreparedImage:
    """Check that ``data`` is an image and make it sendable within ``limit`` raw bytes.

    An image of more than ``max_image_pixels`` pixels (default ``MOONBATCH_MAX_IMAGE_PIXELS``;
    0: no limit) is refused from its header, before any decoding. An image of more than
    ``max_pixels`` pixels (0: no budget) is downscaled to the budget,
    keeping its aspect ratio and orientation, and re-encoded as JPEG (quality 95): pixels past
    what the model tiles add only upload bytes and cost (FACTS.md). An image within the budget
    and the limit, in a format the API documents (``API_FORMATS``), passes through byte for byte
    after a header parse (no full decode); any other format is converted (``_reencode``).
    Decoding takes its bytes from the process's budget (``moonbatch.workers.budget``, default
    ``MOONBATCH_DECODE_MEMORY``) and makes no full-size copy when downscaling.
    Raises ``ItemError`` (``empty_object``, ``not_an_image``, ``image_decode_failed``,
    ``image_too_large``).
    """
    from PIL import UnidentifiedImageError

    Image = _pillow()  # noqa: N806
    if not data:
        raise ItemError("empty_object", "object is empty (0 bytes)")
    if max_image_pixels is None:
        from moonbatch.config import get_settings

        max_image_pixels = get_settings().max_image_pixels
    sniffed = sniff_format(data[:SNIFF_BYTES])
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format or "?"
        width, height = img.size
    except UnidentifiedImageError:
        if sniffed:
            raise ItemError("image_decode_failed", f"{sniffed} header found but the image cannot "
                            "be decoded") from None
        raise ItemError("not_an_image", "content is not an image (no JPEG, PNG, GIF, WebP, BMP "
                        "or TIFF signature)") from None
    except Image.DecompressionBombError:  # only if someone set Pillow's limit again
        raise ItemError("image_too_large", "image is over Pillow's MAX_IMAGE_PIXELS: raise "
                        "MOONBATCH_MAX_IMAGE_PIXELS instead") from None
    except Exception as exc:  # Pillow raises many types on corrupt headers
        raise ItemError("image_decode_failed", f"cannot read image header: {exc}") from None
    if max_image_pixels and width * height > max_image_pixels:
        raise ItemError("image_too_large", f"{fmt} image of {width}x{height} pixels is over the "
                        f"limit of {max_image_pixels:,} pixels (MOONBATCH_MAX_IMAGE_PIXELS): "
                        "downscale the source, or raise the limit for trusted images")
    over_budget = max_pixels > 0 and width * height > max_pixels
    # CMYK JPEGs (print workflows) are decoded wrongly by many readers: send them as RGB.
    if fmt in API_FORMATS and len(data) <= limit and not over_budget and img.mode != "CMYK":
        return PreparedImage(data, "JPEG" if fmt == "MPO" else fmt, width, height)
    sent = _reencode(img, fmt, len(data), limit, max_pixels if over_budget else 0)
    return dataclasses.replace(sent, source_width=width, source_height=height)


def decoded_bytes(img) -> int:
    """Bytes Pillow allocates to decode ``img`` at its current size and mode (after a
    ``draft``): width x height x 1 (``L``, ``P``, ``1``), 2 (16-bit) or 4 (the rest)."""
    return img.width * img.height * _PIXEL_BYTES.get(img.mode, 4)


def _flat(img, factor: int = 1):
    """A strip's pixels as 8-bit RGB or L, reduced by ``factor`` (a box filter), transparency
    composited on white. Alpha is averaged premultiplied (``RGBa``), so transparent pixels'
    colours do not bleed into the edges."""
    Image = _pillow()  # noqa: N806
    if img.mode in _SIXTEEN_BIT:
        # 16/32-bit greyscale: convert("RGB") would clip everything above 255 to white.
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        img = img if img.mode in ("RGB", "L") else img.convert("RGB")
        return img.reduce(factor) if factor > 1 else img
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    if factor > 1:
        rgba = rgba.convert("RGBa").reduce(factor).convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def _flatten(img, factor: int = 1):
    """A loaded image as 8-bit RGB or L, transparency composited on white, reduced by
    ``factor`` (a box filter: each output pixel the mean of a factor x factor block), upright
    (its EXIF orientation applied: re-encoding does not keep the tag).

    Besides the decoded image, memory holds the output and one strip's working copies
    (``STRIP_PIXELS``), never a second full-size image: RGB and L images are reduced whole
    (that allocates only the output), other modes strip by strip."""
    Image = _pillow()  # noqa: N806
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block: take the pixels as they are
        orientation = None
    w, h = img.size
    if img.mode in ("RGB", "L"):
        out = img.reduce(factor) if factor > 1 else img
    else:
        rows = max(factor, (STRIP_PIXELS // max(w, 1)) // factor * factor)
        out = None
        for top in range(0, h, rows):
            part = _flat(img.crop((0, top, w, min(h, top + rows))), factor)
            if out is None:
                out = Image.new(part.mode, (-(-w // factor), -(-h // factor)))
            out.paste(part, (0, top // factor))
    if orientation in _UPRIGHT:
        out = out.transpose(getattr(Image.Transpose, _UPRIGHT[orientation]))
    return out


def _reencode(img, fmt: str, size: int, limit: int, max_pixels: int) -> PreparedImage:
    """Decode, then: convert to PNG (lossless) if the format is not the API's and it fits;
    otherwise JPEG, downscaled to ``max_pixels`` (if set) and further until within ``limit``.

    Holds the bytes of the decoded image and of its working copies from the process's
    decode budget (``moonbatch.workers.budget``) while it works."""
    from moonbatch.workers.budget import decode_budget

    mode = img.mode
    factor = 1
    try:
        img.seek(0)
        if max_pixels:
            # Let the JPEG decoder drop resolution by powers of two while it reads (much faster).
            ratio = (max_pixels / (img.width * img.height)) ** 0.5
            img.draft("RGB", (int(img.width * ratio), int(img.height * ratio)))
            # Then an integer box reduction to within 4x the budget, strip by strip.
            factor = max(1, int((img.width * img.height / max_pixels) ** 0.5))
        out_pixels = -(-img.width // factor) * -(-img.height // factor)
        weight = decoded_bytes(img) + 12 * out_pixels + 12 * STRIP_PIXELS
    except Exception as exc:
        raise ItemError("image_decode_failed", f"{fmt} image cannot be decoded: {exc}") from None
    with decode_budget().hold(weight):
        try:
            img.load()
            img = _flatten(img, factor)
        except Exception as exc:
            raise ItemError("image_decode_failed", f"{fmt} image cannot be decoded: {exc}") from None
        return _encode(img, fmt, mode, size, limit, max_pixels)


def _encode(img, fmt: str, mode: str, size: int, limit: int, max_pixels: int) -> PreparedImage:
    """A flattened image → PNG (a format the API does not read, when it fits) or JPEG,
    downscaled to ``max_pixels`` and further until within ``limit``."""
    Image = _pillow()  # noqa: N806
    transform = "converted" if fmt not in API_FORMATS or mode == "CMYK" else "reencoded"
    if fmt not in API_FORMATS and not max_pixels:
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)
        if buf.tell() <= limit:
            return PreparedImage(buf.getvalue(), "PNG", img.width, img.height, transform)
    scale = min(1.0, (max_pixels / (img.width * img.height)) ** 0.5) if max_pixels else 1.0
    original = img.size
    for _ in range(12):
        w, h = max(1, int(img.width * scale)), max(1, int(img.height * scale))  # floor: stay in budget
        frame = img if (w, h) == img.size else img.resize((w, h), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        frame.save(buf, format="JPEG", quality=JPEG_QUALITY)
        if buf.tell() <= limit:
            if (w, h) != original or max_pixels:
                transform = "downscaled"
            return PreparedImage(buf.getvalue(), "JPEG", w, h, transform)
        scale *= min(0.9, (limit / buf.tell()) ** 0.5)
    raise ItemError("image_too_large", f"image of {size} bytes does not fit the line limit even "
                    "after downscaling")


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` of ``data`` (an image sent inline, a report's thumbnail): a
    payload, never to be logged. pybase64: several times faster than the standard library's,
    which holds the GIL while it encodes."""
    return f"data:{mime};base64,{b64encode(data).decode()}"


def skill_line_id(line_id: str, skill: str) -> str:
    """The line id of one skill's request for an image in a multi-skill run:
    ``<line id>#<skill>`` (each line of a batch keeps its own id)."""
    return f"{line_id}#{skill}"
