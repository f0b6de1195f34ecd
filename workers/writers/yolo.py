"""YOLO export (``--export yolo``): the detection labels ultralytics trains on
(docs.ultralytics.com/datasets/detect: one ``labels/<name>.txt`` per image, a line
``class cx cy w h`` per box, coordinates normalised 0..1, and a ``data.yaml`` naming the
classes), under ``annotations/yolo/``.

- ``labels/<name>.txt`` for each ``ok`` row, in plan order: ``<name>`` is the row's id (for a
  prefix input, the key relative to INPUT) without its image extension, ``..`` and empty path
  parts replaced (``photos/a.jpg`` → ``labels/photos/a.txt``); a name met twice gets
  ``-<position>`` (the row's 1-based position). An ok row where nothing was found has an empty
  file (background); error rows have none (their objects are unknown, not absent).
- Lines: a detect box, and a segment's ``bbox`` (its polygons' extent without one), as
  ``class cx cy w h`` with 6 decimals, clipped to the image (a box of no area after clipping
  is left out). Points are not written: a YOLO detection label is a box, and a point has
  no size to give it (the COCO and Label Studio exports keep them); ``data.yaml`` says how
  many were left out.
- Classes: one per object name, whatever the skill, ids from 0: the run's objects first,
  then per-item objects (a manifest's ``object`` column) as first met.
- ``data.yaml``: ``path: .``, ``train``/``val``: ``images`` (put each image at
  ``images/<name>.<ext>`` next to ``labels/``), ``nc`` and ``names`` (``{id: name}``).
  Label files a previous export wrote that this one does not are deleted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from moonbatch.workers import layout
from moonbatch.workers.models import RunSpec
from moonbatch.workers.storage import Store
from moonbatch.workers.writers import shapes
from moonbatch.workers.writers.exports import Categories, items

SKILLS = ("detect", "segment")
UPLOADS = 16  # label files put at once
CHUNK = 1000  # label files made before they are put
_IMAGE_EXT = re.compile(r"\.(jpe?g|png|webp|gif|bmp|tiff?|avif|heic|heif)$", re.IGNORECASE)


def label_name(key: str) -> str:
    """The label file name (without ``.txt``) of an item ``key``: ``photos/a.jpg`` →
    ``photos/a``; ``..``/empty parts replaced so a name never leaves ``labels/``."""
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    name = "/".join("_" if p == ".." else p for p in parts) or "_"
    return _IMAGE_EXT.sub("", name) or name


class _Export:
    """The label files of a run's rows (``files``: a generator, in plan order) and, once they
    are all made, its ``data_yaml``."""

    def __init__(self, store: Store, spec: RunSpec, shards: int) -> None:
        self.store, self.spec, self.shards = store, spec, shards
        self.classes = Categories(spec, SKILLS, first=0, by_name=True)
        self.points = 0
        self.keys: set[str] = set()

    def files(self) -> Iterator[tuple[str, bytes]]:
        """``(label key, file bytes)`` of each ok row."""
        for item in items(self.store, self.spec, self.shards):
            if not item.ok:
                continue
            lines = []
            for opts, name, part in item.parts(self.spec):
                if opts.skill == "point":
                    self.points += len(shapes.entries(part, "points"))
                    continue
                if opts.skill not in SKILLS:
                    continue
                cls = self.classes.id(opts.skill, name)
                for box in _boxes(opts.skill, part):
                    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in box)
                    if x1 > x0 and y1 > y0:
                        lines.append(f"{cls} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} "
                                     f"{x1 - x0:.6f} {y1 - y0:.6f}\n")
            key = layout.yolo_label(label_name(item.key))
            if key in self.keys:
                key = layout.yolo_label(f"{label_name(item.key)}-{item.position}")
            self.keys.add(key)
            yield key, "".join(lines).encode()

    def data_yaml(self) -> bytes:
        """``data.yaml``: the classes, and a comment on what the labels hold."""
        names = {cid: name for (_, name), cid in self.classes.ids.items()}
        head = [f"# YOLO detection labels of moonbatch run {self.spec.run_id}: "
                "labels/<name>.txt, one 'class cx cy w h' line per box (normalised 0..1).",
                "# Put each image at images/<name>.<ext> next to labels/. Error rows have no "
                "label file; an empty one: nothing found."]
        if self.points:
            head.append(f"# {self.points} point(s) left out: YOLO detection labels are boxes "
                        "(the COCO and Label Studio exports keep points).")
        body = ["path: .", "train: images", "val: images", f"nc: {len(names)}",
                "names:" + ("" if names else " {}")]
        body += [f"  {cid}: {orjson.dumps(name).decode()}" for cid, name in sorted(names.items())]
        return ("\n".join(head + body) + "\n").encode()


def write(store: Store, spec: RunSpec, shards: int) -> None:
    """Put the run's label files as the rows are read (``UPLOADS`` at a time, ``CHUNK`` held
    at most), delete label files of an earlier export that this one did not write, then put
    ``data.yaml`` (last: it is there only when every label file is). Idempotent: the same
    rows give the same files."""
    export = _Export(store, spec, shards)
    with ThreadPoolExecutor(UPLOADS) as pool:
        for chunk in _chunks(export.files(), CHUNK):
            for _ in pool.map(lambda kv: store.put(*kv), chunk):
                pass
        stale = [o.key for o in store.iter_objects(layout.YOLO_LABELS)
                 if o.key.endswith(".txt") and o.key not in export.keys]
        for _ in pool.map(store.delete, stale):
            pass
    store.put(layout.YOLO_DATA, export.data_yaml())


def _chunks(pairs: Iterator[tuple[str, bytes]], size: int) -> Iterator[list[tuple[str, bytes]]]:
    chunk: list[tuple[str, bytes]] = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _boxes(skill: str, part: dict[str, Any]) -> list[tuple[float, float, float, float]]:
    """A detect or segment result's boxes, normalised ``(x_min, y_min, x_max, y_max)``;
    entries without numeric coordinates are passed over."""
    found = shapes.entries(part, "objects") if skill == "detect" else [part.get("bbox")]
    out = []
    for box in found:
        try:
            out.append((float(box["x_min"]), float(box["y_min"]), float(box["x_max"]),
                        float(box["y_max"])))
        except (KeyError, TypeError, ValueError):
            continue
    if skill == "segment" and not out:
        ext = shapes.extent(shapes.polygons(part.get("path"), 1, 1))
        if ext is not None:
            out.append(ext)
    return out
