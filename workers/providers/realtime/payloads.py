"""Request bodies of the real-time API and its answers as result lines (FACTS.md "Moondream
real-time API"; ``moondream/cloud_vl.py`` of the official client 2.6.1).

    caption  {image_url, length, stream, settings?}                → {caption, metrics?}
    query    {image_url, question, stream, settings?, reasoning?,  → {answer, reasoning?}
              spatial_refs?}
    detect   {image_url, object, settings?}                        → {objects: [{x_min,..}]}
    point    {image_url, object, spatial_refs?, settings?}          → {points: [{x, y}]}
    segment  {image_url, object, stream, spatial_refs?, settings?}  → {path, bbox?}

``model`` goes into every body when the run names one. Answers are read liberally (extra
fields ignored, ``metrics`` or ``usage`` for token counts); an answer without its skill's field
is a ``BadAnswer``. Results have the Batch API's result shape (seed 002 "Result fields by
skill"); a segment result is ``{"path", "bbox"}`` as the API gives them (``bbox`` null when
the answer has none).
"""

from __future__ import annotations

from typing import Any

from moonbatch.workers.models import SPATIAL_REFS_SKILLS, SkillOptions

MAX_IMAGE_BYTES = 7_500_000  # a request over 10 MB is rejected (FACTS.md): ~7.5 MB of image
REQUEST_OVERHEAD = 1_000  # bytes of a body besides the image's data URI


class BadAnswer(ValueError):
    """A 2xx answer without what its skill returns."""


def request_payload(options: SkillOptions, image_url: str, model: str | None = None
                    ) -> dict[str, Any]:
    """The body of one request for ``options`` (the line's own) and its image."""
    fields = options.request_fields()
    skill = fields.pop("skill")
    body: dict[str, Any] = {"image_url": image_url}
    if skill == "caption":
        body["length"] = fields["length"]
    elif skill == "query":
        body["question"] = fields["question"]
        if options.reasoning is not None:
            body["reasoning"] = options.reasoning
    else:
        body["object"] = fields["object"]
    if fields.get("spatial_refs") and skill in SPATIAL_REFS_SKILLS:
        body["spatial_refs"] = fields["spatial_refs"]
    if skill in ("caption", "query", "segment"):
        body["stream"] = False  # the whole answer at once (streaming is not needed)
    if fields.get("settings"):
        body["settings"] = fields["settings"]
    if model:
        body["model"] = model
    return body


def _usage(answer: dict[str, Any]) -> dict[str, int]:
    """``{input_tokens, output_tokens}`` from the answer's ``metrics`` or ``usage``."""
    for key in ("metrics", "usage"):
        m = answer.get(key)
        if isinstance(m, dict):
            out = {k: int(m[k]) for k in ("input_tokens", "output_tokens")
                   if isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool)
                   and m[k] >= 0}
            if out:
                return out
    return {}


def result_of(skill: str, answer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """``(result, usage)`` of a 2xx answer. Raises ``BadAnswer``."""
    if skill == "caption":
        if not isinstance(answer.get("caption"), str):
            raise BadAnswer("the caption answer has no caption")
        result: dict[str, Any] = {"caption": answer["caption"]}
    elif skill == "query":
        if not isinstance(answer.get("answer"), str):
            raise BadAnswer("the query answer has no answer")
        result = {"answer": answer["answer"]}
        reasoning = answer.get("reasoning")
        if isinstance(reasoning, str):
            result["reasoning"] = {"text": reasoning}
        elif isinstance(reasoning, dict):
            result["reasoning"] = reasoning
    elif skill == "detect":
        if not isinstance(answer.get("objects"), list):
            raise BadAnswer("the detect answer has no objects")
        result = {"objects": answer["objects"]}
    elif skill == "point":
        if not isinstance(answer.get("points"), list):
            raise BadAnswer("the point answer has no points")
        result = {"points": answer["points"]}
    elif skill == "segment":
        if not isinstance(answer.get("path"), str):
            raise BadAnswer("the segment answer has no path")
        # Both kept: an object not found is an empty path and a null bbox.
        bbox = answer.get("bbox")
        result = {"path": answer["path"], "bbox": bbox if isinstance(bbox, dict) else None}
    else:
        raise BadAnswer(f"no result shape for skill {skill!r}")
    return result, _usage(answer)


def estimate_request_bytes(key: str, size: int, fragment_len: int) -> int:
    """Planning estimate of one request's bytes: the image as a data URI (at most
    ``MAX_IMAGE_BYTES`` of image: bigger ones are re-encoded or downscaled) and the options."""
    return REQUEST_OVERHEAD + fragment_len + (min(size, MAX_IMAGE_BYTES) + 2) // 3 * 4
