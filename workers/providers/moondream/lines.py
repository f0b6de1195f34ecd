"""JSONL lines of a Moondream batch and the Batch API's limits (seed 002, "Input format" and
"Limits"). Pure: no I/O.

A line is ``{"id": <item id>, <skill fields>, "image": "<plain base64>"}`` (a multi-image query:
``"images": ["<plain base64>", ...]`` instead; seed 002, "Common fields") and must stay within
the API's 10 MB line limit; images are made to fit by ``moonbatch.workers.lines.prepare_image``.
"""

from __future__ import annotations

import json

from pybase64 import b64encode  # SIMD: ~15x the stdlib's speed, which holds the GIL throughout

# Limits of the Moondream Batch API (seed 002, "Limits"). We use the decimal reading of
# "2 GB", "100 MB" and "10 MB": it is the stricter one, so a file we accept the API accepts.
API_MAX_LINES = 100_000
API_MAX_FILE_BYTES = 2_000_000_000
API_MAX_PART_BYTES = 100_000_000
API_MAX_LINE_BYTES = 10_000_000

# Bytes of a line besides the id and the base64 image, with generous room for the options.
LINE_OVERHEAD = 64


def max_image_bytes(id_: str, fragment: bytes, max_line_bytes: int = API_MAX_LINE_BYTES) -> int:
    """The largest raw image (bytes before base64) whose line for this id and options fits."""
    fixed = LINE_OVERHEAD + len(json.dumps(id_, ensure_ascii=False).encode()) + len(fragment)
    return max(0, (max_line_bytes - fixed) // 4 * 3)


def max_images_bytes(id_: str, fragment: bytes, n: int,
                     max_line_bytes: int = API_MAX_LINE_BYTES) -> int:
    """The largest raw bytes of each of ``n`` images whose ``images`` line for this id and
    options fits (the limit shared evenly; 3 bytes of quotes and comma per image)."""
    fixed = LINE_OVERHEAD + len(json.dumps(id_, ensure_ascii=False).encode()) + len(fragment)
    return max(0, (max_line_bytes - fixed - 3 * n) // n // 4 * 3)


def estimate_line_bytes(id_: str, size: int, fragment_len: int = 128) -> int:
    """Planning estimate of a line's bytes for an image object of ``size`` bytes: exact for
    pass-through images, capped at the line limit (larger images are downscaled to fit)."""
    est = LINE_OVERHEAD + fragment_len + len(id_.encode()) * 2 + (size + 2) // 3 * 4
    return min(est, API_MAX_LINE_BYTES)


def encode_line(id_: str, image: bytes, fragment: bytes, *, b64: bytes | None = None) -> bytes:
    """One JSONL line (with its ``\\n``): ``{"id": id_, <fragment>, "image": base64(image)}``.

    ``fragment`` is ``SkillOptions.line_fragment()``; the base64 is plain (no ``data:`` prefix),
    as in the seed's examples. ``b64``: the image's base64 if already encoded (a multi-skill
    run encodes each image once for all its lines).
    """
    return b"".join((
        b'{"id":', json.dumps(id_, ensure_ascii=False).encode(), b",", fragment,
        b',"image":"', b64encode(image) if b64 is None else b64, b'"}\n',
    ))


def encode_images_line(id_: str, b64s: list[bytes], fragment: bytes) -> bytes:
    """One JSONL line (with its ``\\n``) of a multi-image query: ``{"id": id_, <fragment>,
    "images": [base64, ...]}`` (seed 002, "Common fields": ``images`` instead of ``image``,
    for query only); ``b64s``: each image's plain base64, in order."""
    return b"".join((
        b'{"id":', json.dumps(id_, ensure_ascii=False).encode(), b",", fragment,
        b',"images":["', b'","'.join(b64s), b'"]}\n',
    ))
