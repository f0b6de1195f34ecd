"""COCO export of a detect or point run: ``annotations/instances.json`` (pycocotools loads it).

- ``images``: one per ``ok`` row whose image size is known, in plan order. Its ``id`` is the
  row's 1-based position in the run (so ids stay put when other rows change, e.g. after
  ``retry-failed``; ids of left-out rows are skipped). ``file_name``: the row's id for a
  prefix input (the key relative to INPUT), its ``source`` for other inputs; ``width`` and
  ``height``: the source image's pixels; ``moonbatch_id``: the row's id with its JSON type.
  Error rows, and rows of unknown size, are left out: their objects are unknown, not absent,
  and an image without annotations would count every detection on it as a false positive.
- ``categories``: one per (skill, object): the run's own objects first, ids from 1, then
  per-item objects (a manifest's ``object`` column) as first met. ``supercategory`` is the
  skill; a point category has ``keypoints: [<object>]`` and ``skeleton: []``.
- ``annotations``: a detect box → ``bbox`` ``[x, y, w, h]`` in pixels (normalised
  coordinates × the image's width and height), ``area`` ``w * h``, ``iscrowd`` 0; a point →
  ``keypoints`` ``[x, y, 2]`` in pixels, ``num_keypoints`` 1 and a zero-size ``bbox`` at the
  point with ``area`` 0 (what pycocotools' ``loadRes`` makes of a one-keypoint result).
  Ids from 1 in row order.

Rows are read a shard at a time; only the output document (serialised entries) is held.
Writing it again from the same results gives the same bytes.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import orjson

from moonbatch.workers import layout
from moonbatch.workers.models import PlanItem, RunSpec, id_text
from moonbatch.workers.storage import NotFound, Store

SKILLS = ("detect", "point")


def wanted(spec: RunSpec) -> bool:
    """True when the run has a detect or point skill (alone or among others)."""
    return any(o.skill in SKILLS for o in spec.all_options)


class _Categories:
    """Category ids by (skill, object), in first-met order; the run's objects come first."""

    def __init__(self, spec: RunSpec) -> None:
        self.ids: dict[tuple[str, str], int] = {}
        for opts in spec.all_options:
            if opts.skill in SKILLS and opts.object:
                self.id(opts.skill, opts.object)

    def id(self, skill: str, name: str) -> int:
        key = (skill, name)
        if key not in self.ids:
            self.ids[key] = len(self.ids) + 1
        return self.ids[key]

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for (skill, name), cid in self.ids.items():
            cat: dict[str, Any] = {"id": cid, "name": name, "supercategory": skill}
            if skill == "point":
                cat.update(keypoints=[name], skeleton=[])
            out.append(cat)
        return out


def build(store: Store, spec: RunSpec, shards: int) -> bytes:
    """The COCO document of the run's merged results (UTF-8 JSON bytes).

    Raises ``ValueError`` if the run has no detect or point skill."""
    if not wanted(spec):
        raise ValueError(f"run {spec.run_id} has no detect or point skill: no COCO export")
    from moonbatch.workers import writers

    skills = [o for o in spec.all_options if o.skill in SKILLS]
    cats = _Categories(spec)
    images: list[bytes] = []
    anns: list[bytes] = []
    dumps = orjson.dumps
    position = 0
    for shard in range(shards):
        try:
            rows = writers.read_shard(store, spec.output_format, shard)
        except NotFound:
            continue
        objects = _item_objects(store, shard)
        for row in rows:
            position += 1
            w, h = row.get("width"), row.get("height")
            if row.get("status") != "ok" or not _positive(w) or not _positive(h):
                continue
            item_id = row["id"]
            key = id_text(item_id)
            own = objects.get(key)
            result = row.get("result")
            for opts in skills:
                part = result.get(opts.skill) if spec.multi_skill and isinstance(result, dict) \
                    else result
                if not isinstance(part, dict):
                    continue
                cid = cats.id(opts.skill, own or opts.object or "")
                for ann in _annotations(opts.skill, part, w, h):
                    anns.append(dumps({"id": len(anns) + 1, "image_id": position,
                                       "category_id": cid, **ann}))
            file_name = key if spec.input_kind == "prefix" else row.get("source") or key
            images.append(dumps({"id": position, "file_name": file_name, "width": w,
                                 "height": h, "moonbatch_id": item_id}))
    created = datetime.datetime.fromtimestamp(spec.created_at, datetime.timezone.utc)
    head = dumps({
        "info": {"description": f"moonbatch run {spec.run_id}", "version": "1.0",
                 "year": created.year, "date_created": created.isoformat(timespec="seconds"),
                 "moonbatch_run_id": spec.run_id,
                 "moonbatch_skills": [o.request_fields() for o in skills]},
        "licenses": [], "categories": cats.entries()})
    return b"".join([head[:-1], b',"images":[', b",".join(images), b'],"annotations":[',
                     b",".join(anns), b"]}"])


def write(store: Store, spec: RunSpec, shards: int) -> None:
    """Build the run's COCO document and put it at ``annotations/instances.json`` (one upload;
    a later call, e.g. after ``retry-failed``, replaces it)."""
    store.put(layout.COCO, build(store, spec, shards))


def _annotations(skill: str, part: dict[str, Any], w: int, h: int) -> Iterator[dict[str, Any]]:
    """A detect or point result's annotations (without ids) in pixels of a ``w`` × ``h`` image;
    entries without numeric coordinates are passed over."""
    if skill == "detect":
        for box in part.get("objects") or ():
            try:
                x0, y0 = float(box["x_min"]) * w, float(box["y_min"]) * h
                bw, bh = (float(box["x_max"]) - float(box["x_min"])) * w, \
                    (float(box["y_max"]) - float(box["y_min"])) * h
            except (KeyError, TypeError, ValueError):
                continue
            yield {"bbox": [x0, y0, bw, bh], "area": bw * bh, "iscrowd": 0}
    else:
        for point in part.get("points") or ():
            try:
                x, y = float(point["x"]) * w, float(point["y"]) * h
            except (KeyError, TypeError, ValueError):
                continue
            yield {"keypoints": [x, y, 2], "num_keypoints": 1, "bbox": [x, y, 0.0, 0.0],
                   "area": 0.0, "iscrowd": 0}


def _item_objects(store: Store, shard: int) -> dict[str, str]:
    """``{item key: object}`` for the shard's items with their own ``object`` (manifest
    column); empty when none has one or the plan file is gone."""
    try:
        data = store.get(layout.plan_items(shard))
    except NotFound:
        return {}
    out = {}
    for line in data.splitlines():
        if b'"opts"' in line:  # most plans have none: skip parsing the rest
            item = PlanItem.from_json(line)
            if item.opts and item.opts.get("object"):
                out[item.key] = str(item.opts["object"])
    return out


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
