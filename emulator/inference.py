"""Deterministic stand-in for Moondream inference, computed from the decoded image.

The answer depends only on the pixels (first frame, as RGB) and the request, so a test can
recompute it from the source object and tell which image a result came from. Result shapes follow
seed 002 ("Result fields by skill") and the real-time API (FACTS.md): coordinates normalised 0..1.
Like the API, it reads only the formats the API documents (JPEG, PNG, GIF; FACTS.md "real-time
API"): any other image is ``image_decode_failed``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
from typing import Any

COLOURS = {
    "black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "red": (200, 40, 40),
    "orange": (230, 140, 40), "yellow": (230, 220, 60), "green": (60, 160, 60),
    "blue": (50, 90, 200), "purple": (130, 60, 160), "brown": (120, 80, 40), "pink": (230, 150, 180),
}


# What the API documents (md-docs ``docs/skills/caption.md``); MPO is a JPEG with extra frames.
DOCUMENTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF"})


class LineError(Exception):
    """A per-line error of the Batch API (seed 002, "Per-line errors")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_image(b64: Any, *, any_format: bool = False) -> tuple[str, int, int, str]:
    """Decode a base64 image → ``(fingerprint, width, height, dominant colour name)``.

    The fingerprint is the first 16 hex digits of SHA-256 over the RGB pixels of frame 0 and the
    size. Raises ``LineError("image_decode_failed")`` for bad base64, an undecodable image or
    (unless ``any_format``) a format outside ``DOCUMENTED_FORMATS``.
    """

    if not isinstance(b64, str) or not b64:
        raise LineError("invalid_request", "image must be a non-empty base64 string")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise LineError("image_decode_failed", "Invalid base64 image data") from None
    return fingerprint_bytes(data, formats=None if any_format else DOCUMENTED_FORMATS)


def fingerprint_bytes(data: bytes, formats: frozenset[str] | None = None
                      ) -> tuple[str, int, int, str]:
    """``decode_image`` for raw image bytes (what a test calls on the source object). Any
    format Pillow reads, unless ``formats`` names the accepted ones."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
    except Exception:
        raise LineError("image_decode_failed", "Invalid image data") from None
    if formats is not None and img.format not in formats:
        raise LineError("image_decode_failed",
                        f"Unsupported image format {img.format}; send JPEG, PNG or GIF")
    try:
        img.seek(0)
        img.load()
        rgb = img.convert("RGB")
    except Exception:
        raise LineError("image_decode_failed", "Invalid image data") from None
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode() + rgb.tobytes()).hexdigest()[:16]
    r, g, b = rgb.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    colour = min(COLOURS, key=lambda n: sum((a - c) ** 2
                                            for a, c in zip((r, g, b), COLOURS[n], strict=True)))
    return digest, rgb.width, rgb.height, colour


def _tokens(width: int, height: int) -> int:
    crops = min(12, math.ceil(width / 378) * math.ceil(height / 378))
    return 729 * (crops + 1)


def _boxes(fp: str, what: str, n_max: int = 3) -> list[tuple[float, float, float, float]]:
    seed = hashlib.sha256((fp + "|" + what).encode()).digest()
    n = seed[0] % (n_max + 1)
    out = []
    for i in range(n):
        a, b, c, d = (seed[1 + 4 * i + k] / 255 for k in range(4))
        x0, x1 = sorted((a, c))
        y0, y1 = sorted((b, d))
        out.append((round(x0, 4), round(y0, 4), round(max(x1, x0 + 0.01), 4),
                    round(max(y1, y0 + 0.01), 4)))
    return out


def infer(line: dict[str, Any], *, any_format: bool = False
          ) -> tuple[dict[str, Any], dict[str, int]]:
    """Run one request line → ``(result, usage)``.

    Raises ``LineError`` with ``invalid_request``, ``unknown_skill`` or ``image_decode_failed``
    (also for an image outside ``DOCUMENTED_FORMATS``, unless ``any_format``: what a test uses
    to compute the answer for pixels that moonbatch converts before sending).
    """
    skill = line.get("skill")
    if not isinstance(skill, str) or not skill:
        raise LineError("invalid_request", "Missing required field: skill")
    if skill not in ("caption", "query", "detect", "point"):
        raise LineError("unknown_skill", f"Unknown skill: {skill}")
    settings = line.get("settings")
    if settings is not None:
        if skill not in ("caption", "query") or not isinstance(settings, dict):
            raise LineError("invalid_request", "settings applies to caption and query only")
        t, p, m = settings.get("temperature"), settings.get("top_p"), settings.get("max_tokens")
        numbers = [v for v in (t, p) if v is not None]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
            raise LineError("invalid_request", "settings.temperature and top_p must be numbers")
        if (t is not None and not 0 <= t <= 2) or (p is not None and not 0 < p <= 1) or (
                m is not None and (not isinstance(m, int) or m < 1)):
            raise LineError("invalid_request", "Invalid settings values")
    if skill == "query" and "images" in line and "image" not in line:
        images = line["images"]
        if not isinstance(images, list) or not images:
            raise LineError("invalid_request", "images must be a non-empty array")
        decoded = [decode_image(im, any_format=any_format) for im in images]
    elif "image" in line:
        decoded = [decode_image(line["image"], any_format=any_format)]
    else:
        raise LineError("invalid_request", "Missing required field: image")
    fp, w, h, colour = decoded[0]
    input_tokens = sum(_tokens(d[1], d[2]) for d in decoded)

    if skill == "caption":
        length = line.get("length", "normal")
        if length not in ("short", "normal", "long"):
            raise LineError("invalid_request", "length must be short, normal or long")
        text = f"A mostly {colour} image."
        if length != "short":
            text = f"A {w}x{h} image, mostly {colour}, fingerprint {fp}."
        if length == "long":
            text += f" It is {'wider than tall' if w > h else 'taller than wide' if h > w else 'square'}."
        result: dict[str, Any] = {"caption": text}
        out_text = text
    elif skill == "query":
        question = line.get("question")
        if not isinstance(question, str) or not question.strip():
            raise LineError("invalid_request", "Missing required field: question")
        # Every image's fingerprint and size, in order (a multi-image query's ``images``), so
        # a test proves each image reached the model.
        seen = "; ".join(f"{d[0]}, {d[1]}x{d[2]}" for d in decoded)
        answer = f"{colour} ({seen}) answering: {question}"
        result = {"answer": answer}
        out_text = answer
        if line.get("reasoning", True):
            result["reasoning"] = {"text": f"The image is mostly {colour}.", "grounding": []}
            out_text += " " + result["reasoning"]["text"]
    else:
        what = line.get("object")
        if not isinstance(what, str) or not what.strip():
            raise LineError("invalid_request", "Missing required field: object")
        boxes = _boxes(fp, what)
        if skill == "detect":
            result = {"objects": [{"x_min": a, "y_min": b, "x_max": c, "y_max": d}
                                  for a, b, c, d in boxes]}
        else:
            result = {"points": [{"x": round((a + c) / 2, 4), "y": round((b + d) / 2, 4)}
                                 for a, b, c, d in boxes]}
        out_text = "x" * (1 + 4 * len(boxes))
    max_tokens = (settings or {}).get("max_tokens")
    output_tokens = len(out_text.split()) + 1
    if max_tokens:
        output_tokens = min(output_tokens, max_tokens)
    return result, {"input_tokens": input_tokens, "output_tokens": output_tokens}
