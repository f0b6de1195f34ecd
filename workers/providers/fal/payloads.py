"""fal request bodies and answers: the prompt and payload of a request for an endpoint, a single
answer or a ZIP's answers turned into result lines, echoes of inputs scrubbed from them, and the
ZIP archives and data URIs moonbatch sends (seeds 000, 001, 003, 004)."""

from __future__ import annotations

import io
import logging
import posixpath
import re
import zipfile
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson

from moonbatch.workers.models import SkillOptions
from moonbatch.workers.providers.fal.client import (
    FalError,
)
from moonbatch.workers.providers.fal.endpoints import FalEndpoint

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 10_000_000  # per image; bigger ones are re-encoded or downscaled
MAX_REQUEST_BYTES = 32_000_000  # data URIs of one request of the batched endpoints
PRESIGN_SECONDS = 6 * 3600  # a queued request fetches its image when it runs

#: What a prompt-only endpoint is asked for a caption of each length.
CAPTION_PROMPTS = {"short": "Describe this image in one sentence.",
                   "normal": "Describe this image.",
                   "long": "Describe this image in detail."}
def prompt_of(options: SkillOptions) -> str:
    """The prompt a prompt-taking endpoint is sent: the question, or a caption request."""
    if options.skill == "query":
        return options.question or ""
    if options.skill == "caption":
        return CAPTION_PROMPTS[options.length or "normal"]
    return options.object or ""


def request_payload(endpoint: FalEndpoint, options: SkillOptions, images: Sequence[str],
                    model: str | None = None) -> dict[str, Any]:
    """The JSON body of one request for ``images`` (URLs or data URIs; for ``"archive"`` one
    data URI of the ZIP) with ``model`` (``--model``, checked by ``endpoints.check_model``) in
    the endpoint's ``model_field`` when it has one. Strict: only fields the endpoint's schema
    names, only options set."""
    tuning = {k: getattr(options, k) for k in ("temperature", "top_p", "max_tokens")
              if k in endpoint.options and getattr(options, k) is not None}
    if model is not None and endpoint.model_field:
        tuning[endpoint.model_field] = model
    if endpoint.kind == "inputs":
        prompt = prompt_of(options)
        return {"inputs": [{"image_url": url, "prompt": prompt} for url in images], **tuning}
    if endpoint.kind == "archive":
        return {"images_data_url": images[0], "prompt": prompt_of(options), **tuning}
    body: dict[str, Any] = {"image_url": images[0]}
    if endpoint.id.endswith("/caption"):
        body["length"] = options.length or "normal"
    elif options.skill in ("detect", "point") or endpoint.id.endswith("visual-query") \
            or endpoint.id.endswith("/query"):
        body["prompt"] = prompt_of(options)
    if options.reasoning is not None and "reasoning" in endpoint.options:
        body["reasoning"] = options.reasoning
    return {**body, **tuning}


def _answer(skill: str, text: Any) -> dict[str, Any]:
    """A prompt endpoint's text under the Moondream name of the skill."""
    return {"caption": text} if skill == "caption" else {"answer": text}


def _usage(output: dict[str, Any]) -> dict[str, int]:
    info = output.get("usage_info")
    if not isinstance(info, dict):
        return {}
    usage = {}
    for k in ("input_tokens", "output_tokens"):
        try:
            usage[k] = int(info[k])
        except (KeyError, TypeError, ValueError):
            pass
    return usage


def normalize_single(endpoint: FalEndpoint, skill: str, output: dict[str, Any]
                     ) -> tuple[dict[str, Any], dict[str, int]]:
    """One single-image request's output → ``(result, usage)``: the Moondream names
    (``caption``, ``answer``, ``reasoning`` as ``{"text"}``, ``objects``, ``points``) and the
    output itself under ``raw`` (``scrub_echoes``: without echoed inputs, presigned URLs or data
    URIs). Liberal: missing fields become None or empty lists."""
    if skill in ("detect", "point"):
        key = "objects" if skill == "detect" else "points"
        found = output.get(key)
        result: dict[str, Any] = {key: found if isinstance(found, list) else []}
    else:
        result = _answer(skill, output.get("output"))
        reasoning = output.get("reasoning")
        if reasoning is not None:  # a string on fal, an object in Moondream's API
            result["reasoning"] = reasoning if isinstance(reasoning, dict) else {"text": reasoning}
    raw = scrub_echoes({k: v for k, v in output.items() if k != "usage_info"})
    return {**result, "raw": raw}, _usage(output)


#: Output fields that echo a request's inputs: a presigned URL, a data URI, a ZIP of images.
ECHOED_INPUTS = frozenset({"image_url", "image_urls", "images_data_url", "inputs"})
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _carries_secret(value: Any) -> bool:
    """A ``data:`` URI, or a URL with a query, a fragment or credentials (a presigned URL's
    signature lives there); a URL that does not even parse counts too."""
    if not isinstance(value, str):
        return False
    if value[:5].lower() == "data:":
        return True
    if not _URL_SCHEME.match(value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return True
    return bool(parts.query or parts.fragment or "@" in parts.netloc)


def scrub_echoes(value: Any) -> Any:
    """fal's output as a row may keep it (``result.raw``): objects lose the fields that echo
    inputs (``ECHOED_INPUTS``) and every value that is a data URI or a URL with a query,
    fragment or credentials; such a value in a list becomes None. Plain file URLs (fal's CDN,
    e.g. a detect ``preview`` image) stay. Recursive; the input is not changed."""
    if isinstance(value, dict):
        return {k: scrub_echoes(v) for k, v in value.items()
                if k not in ECHOED_INPUTS and not _carries_secret(v)}
    if isinstance(value, list):
        return [None if _carries_secret(v) else scrub_echoes(v) for v in value]
    return value


def archive_answers(output: dict[str, Any], names: Sequence[str],
                    download: Callable[[str], bytes]) -> dict[str, Any]:
    """``moondream-next/batch``'s answers by archive member name (FACTS.md: ``images_data_url``
    is read as a ZIP of the images; ``captions_file`` as a JSON file of filename → caption).
    ``names`` are the members sent, in archive order. The ``captions_file`` is read first,
    matching names with or without directories; only if it is missing or unreadable are
    ``outputs`` taken in archive order. Names with no answer are left out."""
    captions: dict[str, Any] | None = None
    file = output.get("captions_file")
    url = file.get("url") if isinstance(file, dict) else file if isinstance(file, str) else None
    if url:
        try:
            loaded = orjson.loads(download(url))
            if isinstance(loaded, dict):
                captions = {posixpath.basename(str(k)): v for k, v in loaded.items()}
            elif isinstance(loaded, list):  # [{filename, caption}] pairs
                captions = {posixpath.basename(str(p.get("filename") or p.get("file_name"))):
                            p.get("caption") for p in loaded if isinstance(p, dict)}
        except (FalError, ValueError, AttributeError):
            log.warning("captions_file could not be read; using outputs in archive order")
    if captions is not None:
        return {n: captions[posixpath.basename(n)] for n in names
                if posixpath.basename(n) in captions}
    outputs = output.get("outputs")
    if not isinstance(outputs, list):
        return {}
    return dict(zip(names, outputs, strict=False))  # fewer outputs than images leaves the rest missing


def member_name(line_index: int, fmt: str) -> str:
    """The archive member name of a line: its line index and the image's extension."""
    ext = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp"}.get(fmt, fmt.lower())
    return f"{line_index:06d}.{ext}"


def build_archive(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A ZIP (stored, not compressed: images are compressed already) of ``(name, bytes)``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def file_name(name: Any) -> str:
    """A file name as fal reports it, reduced to its last path segment: an echoed input URL
    must not carry a presigned query string into the results."""
    text = str(name)
    return posixpath.basename(urlsplit(text).path) if "://" in text else text


def estimate_request_bytes(key: str, size: int, fragment_len: int = 128) -> int:
    """Planning estimate of the request bytes of an image object of ``size`` bytes sent as a
    data URI (an upper bound: S3 images usually go as short presigned URLs), capped at what an
    image may take (``MAX_IMAGE_BYTES``; bigger ones are re-encoded or downscaled)."""
    request = 64 + fragment_len + len(key.encode()) * 2
    return request + (min(size, MAX_IMAGE_BYTES) + 2) // 3 * 4
