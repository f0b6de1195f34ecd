"""COCO export (``--export coco``, the default of a run with a detect, point or segment skill):
``annotations/instances.json`` (pycocotools loads it).

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
  point with ``area`` 0 (what pycocotools' ``loadRes`` makes of a one-keypoint result); a
  segment → ``segmentation``: its SVG path flattened into polygons in pixels (curves sampled;
  ``moonbatch.workers.writers.shapes``), ``area`` the polygons' area, ``bbox`` the result's
  bbox in pixels (the polygons' extent without one). A segment whose path encloses no polygon
  is left out. Ids from 1 in row order.

Rows are read a shard at a time and the document is written to a temporary file as they
are: memory does not grow with the run. Writing it again from the same results gives the
same bytes.
"""

from __future__ import annotations

import datetime
import io
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import orjson

from moonbatch.workers import layout
from moonbatch.workers.models import SPATIAL_SKILLS, RunSpec
from moonbatch.workers.storage import Store
from moonbatch.workers.writers import shapes
from moonbatch.workers.writers.exports import Categories, items

SKILLS = SPATIAL_SKILLS


def wanted(spec: RunSpec) -> bool:
    """True when the run has a detect, point or segment skill (alone or among others)."""
    return any(o.skill in SKILLS for o in spec.all_options)


def _categories(cats: Categories) -> list[dict[str, Any]]:
    out = []
    for (skill, name), cid in cats.ids.items():
        cat: dict[str, Any] = {"id": cid, "name": name, "supercategory": skill}
        if skill == "point":
            cat.update(keypoints=[name], skeleton=[])
        out.append(cat)
    return out


def build(store: Store, spec: RunSpec, shards: int) -> bytes:
    """The COCO document of the run's merged results (UTF-8 JSON bytes; ``write_document``
    into memory). Raises ``ValueError`` if the run has no detect, point or segment skill."""
    out = io.BytesIO()
    write_document(out, store, spec, shards)
    return out.getvalue()


def write_document(out: IO[bytes], store: Store, spec: RunSpec, shards: int) -> None:
    """Write the COCO document of the run's merged results to the binary file ``out``.
    Memory holds one shard's rows and the categories, whatever the run's size: images and
    annotations go to temporary files as the rows are read, then are joined after the head
    (whose categories are known only at the end).

    Raises ``ValueError`` if the run has no detect, point or segment skill."""
    if not wanted(spec):
        raise ValueError(f"run {spec.run_id} has no detect, point or segment skill: no COCO "
                         "export")
    skills = [o for o in spec.all_options if o.skill in SKILLS]
    cats = Categories(spec, SKILLS)
    dumps = orjson.dumps
    with tempfile.TemporaryFile() as images, tempfile.TemporaryFile() as anns:
        n_images = n_anns = 0
        for item in items(store, spec, shards):
            size = item.size()
            if not item.ok or size is None:
                continue
            w, h = size
            for opts, name, part in item.parts(spec, SKILLS):
                cid = cats.id(opts.skill, name)
                for ann in _annotations(opts.skill, part, w, h):
                    n_anns += 1
                    anns.write(b"," if n_anns > 1 else b"")
                    anns.write(dumps({"id": n_anns, "image_id": item.position,
                                      "category_id": cid, **ann}))
            n_images += 1
            images.write(b"," if n_images > 1 else b"")
            images.write(dumps({"id": item.position, "file_name": item.file_name(spec),
                                "width": w, "height": h, "moonbatch_id": item.row["id"]}))
        created = datetime.datetime.fromtimestamp(spec.created_at, datetime.timezone.utc)
        head = dumps({
            "info": {"description": f"moonbatch run {spec.run_id}", "version": "1.0",
                     "year": created.year, "date_created": created.isoformat(timespec="seconds"),
                     "moonbatch_run_id": spec.run_id,
                     "moonbatch_skills": [o.request_fields() for o in skills]},
            "licenses": [], "categories": _categories(cats)})
        out.write(head[:-1] + b',"images":[')
        _append(out, images)
        out.write(b'],"annotations":[')
        _append(out, anns)
        out.write(b"]}")


def write(store: Store, spec: RunSpec, shards: int) -> None:
    """Write the run's COCO document to a temporary file and put it at
    ``annotations/instances.json`` (one upload; a later call, e.g. after ``retry-failed``,
    replaces it)."""
    with tempfile.TemporaryFile() as f:
        write_document(f, store, spec, shards)
        f.seek(0)
        store.put(layout.COCO, f)


def _append(out: IO[bytes], part: IO[bytes]) -> None:
    """Copy the whole of the file ``part`` to the end of ``out``."""
    part.seek(0)
    shutil.copyfileobj(part, out, 1 << 20)


def _annotations(skill: str, part: dict[str, Any], w: int, h: int) -> Iterator[dict[str, Any]]:
    """A detect, point or segment result's annotations (without ids) in pixels of a ``w`` ×
    ``h`` image; entries without numeric coordinates, and a segment whose path encloses no
    polygon, are passed over."""
    if skill == "detect":
        for box in shapes.entries(part, "objects"):
            bbox = _box(box, w, h)
            if bbox is not None:
                yield {"bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}
    elif skill == "point":
        for point in shapes.entries(part, "points"):
            try:
                x, y = float(point["x"]) * w, float(point["y"]) * h
            except (KeyError, TypeError, ValueError):
                continue
            yield {"keypoints": [x, y, 2], "num_keypoints": 1, "bbox": [x, y, 0.0, 0.0],
                   "area": 0.0, "iscrowd": 0}
    elif skill == "segment":
        polys = shapes.polygons(part.get("path"), w, h)
        if not polys:
            return
        bbox = _box(part.get("bbox"), w, h)
        if bbox is None:
            x0, y0, x1, y1 = shapes.extent(polys)  # type: ignore[misc]
            bbox = [x0, y0, x1 - x0, y1 - y0]
        yield {"segmentation": polys, "area": shapes.area(polys), "bbox": bbox, "iscrowd": 0}


def _box(box: Any, w: int, h: int) -> list[float] | None:
    """A normalised ``{x_min, y_min, x_max, y_max}`` → COCO ``[x, y, width, height]`` in
    pixels; None when a coordinate is missing or not a number."""
    try:
        x0, y0 = float(box["x_min"]) * w, float(box["y_min"]) * h
        return [x0, y0, float(box["x_max"]) * w - x0, float(box["y_max"]) * h - y0]
    except (KeyError, TypeError, ValueError):
        return None
