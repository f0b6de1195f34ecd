"""Segment shapes: the SVG path of a ``segment`` result → polygons in pixels, and their area.

The real-time API's segment skill answers ``{"path": "<SVG path d>", "bbox": {...}}`` with the
path in normalised 0..1 image coordinates and M, L and C (cubic Bézier) commands
(docs.moondream.ai/skills/segment; FACTS.md). The path is parsed with ``svg.path`` (every SVG
command, absolute or relative, is accepted) and flattened: each subpath (from one ``M`` to the
next) is one polygon; lines keep their end points, curves and arcs are sampled. Polygons are
flat ``[x1, y1, x2, y2, ...]`` lists, COCO's ``segmentation`` shape.
"""

from __future__ import annotations

import math
from typing import Any

from svg.path import Close, Line, Move, parse_path

# A curve is sampled every ~STEP pixels along its control polygon, with MIN..MAX points.
STEP = 4.0
MIN_SAMPLES, MAX_SAMPLES = 2, 64


def entries(part: dict[str, Any], key: str) -> list[Any]:
    """A result's list field ``key`` (``objects``, ``points``): the list as the service sent
    it, or ``[]`` when it is missing, null or not a list (a remote answer's odd shape is
    passed over, never a writer's crash)."""
    value = part.get(key)
    return value if isinstance(value, list) else []


def polygons(d: Any, width: float, height: float) -> list[list[float]]:
    """The polygons of the SVG path ``d`` (normalised 0..1 coordinates) in a ``width`` ×
    ``height`` image, each ``[x1, y1, ..., xn, yn]`` in pixels, clipped to the image, with at
    least 3 points (shorter subpaths enclose nothing and are dropped). A ``d`` that is not a
    string or does not parse gives ``[]`` (a model's answer is taken as it comes: the row keeps
    the path as it was). ``width``/``height`` 100 gives percentages (Label Studio's units)."""
    if not isinstance(d, str) or not d.strip():
        return []
    try:
        path = parse_path(d)
    except Exception:  # svg.path raises ValueError, IndexError... on malformed paths
        return []
    out: list[list[float]] = []
    points: list[complex] = []
    for seg in path:
        if isinstance(seg, Move):
            _close(points, out, width, height)
            points = [seg.end]
        elif isinstance(seg, (Line, Close)):
            if not points:
                points = [seg.start]
            points.append(seg.end)
        else:  # CubicBezier, QuadraticBezier, Arc
            if not points:
                points = [seg.start]
            n = _samples(seg, width, height)
            points.extend(seg.point(i / n) for i in range(1, n + 1))
    _close(points, out, width, height)
    return out


def area(polys: list[list[float]]) -> float:
    """The area (shoelace formula) of ``polygons``' output: the sum over its polygons, in
    square pixels. Polygons are not subtracted from each other: COCO has no holes (pycocotools
    fills the union of an annotation's polygons)."""
    total = 0.0
    for flat in polys:
        xs, ys = flat[0::2], flat[1::2]
        total += abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2
    return total


def extent(polys: list[list[float]]) -> tuple[float, float, float, float] | None:
    """``(x_min, y_min, x_max, y_max)`` of every point of ``polys``; None for no polygon."""
    xs = [x for flat in polys for x in flat[0::2]]
    ys = [y for flat in polys for y in flat[1::2]]
    return (min(xs), min(ys), max(xs), max(ys)) if xs else None


def _samples(seg: Any, width: float, height: float) -> int:
    """How many points to sample a curve at: its control polygon's length in pixels / STEP."""
    ctrl = [seg.start, *(getattr(seg, n) for n in ("control1", "control2", "control")
                         if hasattr(seg, n)), seg.end]
    length = sum(math.hypot((b - a).real * width, (b - a).imag * height)
                 for a, b in zip(ctrl, ctrl[1:], strict=False))
    return max(MIN_SAMPLES, min(MAX_SAMPLES, math.ceil(length / STEP)))


def _close(points: list[complex], out: list[list[float]], width: float, height: float) -> None:
    """Append the subpath ``points`` (normalised) to ``out`` as a pixel polygon: clipped,
    consecutive repeats and the closing point dropped, kept only with 3 points or more."""
    flat: list[float] = []
    last: tuple[float, float] | None = None
    for p in points:
        xy = (min(max(p.real, 0.0), 1.0) * width, min(max(p.imag, 0.0), 1.0) * height)
        if xy != last:
            flat += xy
            last = xy
    if len(flat) >= 4 and flat[:2] == flat[-2:]:
        flat = flat[:-2]
    if len(flat) >= 6:
        out.append(flat)
