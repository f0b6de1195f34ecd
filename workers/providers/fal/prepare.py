"""A fal round's lines made ready to send: each item's image read and checked once (a
multi-skill run's lines of one item share it), each line's options checked against its
endpoint, and the request bodies: presigned URLs of the input store for images sent as stored,
data URIs otherwise (converted or downscaled images, a local INPUT, ZIP archives)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from moonbatch.workers.lines import ItemError, PreparedImage, data_uri
from moonbatch.workers.models import PlanItem, ShardBuild, SkillOptions
from moonbatch.workers.providers import RoundContext
from moonbatch.workers.providers.fal.endpoints import FalEndpoint, check_options, skill_endpoints
from moonbatch.workers.providers.fal.payloads import (
    MAX_IMAGE_BYTES,
    PRESIGN_SECONDS,
    build_archive,
    member_name,
    request_payload,
)
from moonbatch.workers.readers import item_options
from moonbatch.workers.stepped import load_images


@dataclasses.dataclass
class Prepared:
    """One line of a round made ready to send: its item, its skill's endpoint, and either the
    prepared image and the item's options or the error that keeps it from being sent."""

    line: int
    item: PlanItem
    endpoint: FalEndpoint  # the line's skill's
    image: PreparedImage | None = None
    options: SkillOptions | None = None  # the item's (the run's, with its own overrides)
    error: dict[str, str] | None = None


def prepare_lines(ctx: RoundContext, build: ShardBuild, lines: Sequence[int]
                  ) -> dict[int, Prepared]:
    """Read and check the image of each of ``lines`` (once per item: a multi-skill run's
    lines of one item share it) and each line's options; errors become the line's error."""
    spec = ctx.run.spec
    endpoints = skill_endpoints(spec)
    images = load_images(ctx, build, lines, limit=MAX_IMAGE_BYTES)
    out: dict[int, Prepared] = {}
    for li in lines:
        item = ctx.items[build.lines[li]]
        k = build.skills[li] if build.skills else 0
        endpoint, image = endpoints[k], images[build.lines[li]]
        try:
            options = item_options(spec.all_options[k], item)
            if item.opts:
                check_options(endpoint, options)
        except ItemError as exc:
            out[li] = Prepared(li, item, endpoint, error=exc.as_dict())
            continue
        except ValueError as exc:  # an override the endpoint cannot serve
            out[li] = Prepared(li, item, endpoint, error={"code": "invalid_options",
                                                           "message": str(exc)})
            continue
        if isinstance(image, ItemError):
            out[li] = Prepared(li, item, endpoint, error=image.as_dict())
        else:
            out[li] = Prepared(li, item, endpoint, image, options)
    return out


def request_body(ctx: RoundContext, images: Sequence[Prepared]
                 ) -> tuple[dict[str, Any], list[str]]:
    """The request body for prepared images, and the archive member names (if any)."""
    # A request's lines share their endpoint and options (see the packing in _send).
    endpoint, options = images[0].endpoint, images[0].options or ctx.run.spec.options
    if endpoint.kind == "archive":
        names = [member_name(p.line, p.image.format) for p in images]  # type: ignore[union-attr]
        archive = build_archive([(n, p.image.data) for n, p in zip(names, images, strict=True)])  # type: ignore[union-attr]
        return request_payload(endpoint, options, [data_uri(archive, "application/zip")],
                               ctx.run.spec.model), names
    return request_payload(endpoint, options, [image_url(ctx, p) for p in images],
                           ctx.run.spec.model), []


def image_url(ctx: RoundContext, p: Prepared) -> str:
    """A URL fal can GET (a presigned S3 URL, a manifest's http URL) when the stored bytes
    go as they are, else a data URI."""
    image = p.image
    assert image is not None
    url = ctx.run.fetcher.presigned_url(p.item, PRESIGN_SECONDS) \
        if image.transform is None else None
    return url or data_uri(image.data, f"image/{image.format.lower()}")


def pre_send_error(p: Prepared) -> dict[str, Any]:
    """The error line of an item that could not be sent (unreadable, not an image...)."""
    return {"line_index": p.line, "status": "error", "error": p.error}


def payload_bytes(prepared: dict[int, Prepared], lines: Sequence[int]) -> int:
    """Bytes the images of ``lines`` add to a request as data URIs (URLs are small)."""
    return sum(len(prepared[li].image.data) * 4 // 3 for li in lines  # type: ignore[union-attr]
               if prepared[li].image is not None)


def data_uri_bytes(payload: dict[str, Any]) -> int:
    """Bytes of the data URIs in a request body (images sent inline, ZIP archives)."""
    values = [payload.get("image_url"), payload.get("images_data_url")]
    values += [i.get("image_url") for i in payload.get("inputs") or () if isinstance(i, dict)]
    return sum(len(v) for v in values if isinstance(v, str) and v.startswith("data:"))
