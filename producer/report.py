"""A run's report: one self-contained HTML page that a browser opens from disk, with no server
(``moonbatch report``, ``--report`` on ``run`` and ``wait``, ``Run.report``; README "Report").

The page shows:

- the run: input, output, provider, model, options, status, timings, counts, tokens and cost
  (estimated and actual), from the run's status document (``run.json``'s shape);
- every error code of the rows with its count and the first few ids and messages;
- a sample of rows as a grid of thumbnails, each with every skill's answer: caption and answer
  text, and detect boxes, points and segment masks drawn over the image as an SVG overlay in
  normalised coordinates (``viewBox="0 0 1 1"``, stretched over the ``<img>``), so they sit on
  the object at any thumbnail size; a multi-image row shows every image.

Rows are streamed shard by shard through the run's results writer (JSONL or Parquet,
``moonbatch.workers.writers``); what is kept is bounded whatever the run's size: the sample
(the ``sample`` rows with the smallest ``blake2b(run id, item id)``, so the same run always
gives the same sample; error rows get up to ``ERROR_SHARE`` of it when there are any), counts,
and ``EXAMPLES`` examples per error code. A report of a million rows is as large as one of
a hundred.

Images are read exactly as the run's workers read them: through the run's ``ItemFetcher``
(``moonbatch.workers.readers``) from the refs of the run's own plan, under the same rules
(``MOONBATCH_ALLOW_LOCAL_FILES``, ``MOONBATCH_ALLOW_PRIVATE_HOSTS``, ``MOONBATCH_ITEM_BUCKETS``,
size and time limits); a row's ``source`` text is shown, never followed. An image that cannot
be read or decoded is a placeholder tile saying why. Thumbnails are made with the workers' own
image preparation (``moonbatch.workers.lines.prepare_image``: its pixel limit and decode
budget), downscaled to ``THUMB_SIDE`` pixels on their longest side and embedded as JPEG data
URIs.

The HTML comes from a Jinja2 template (``producer/templates/report.html``) with autoescaping:
every text of a row (ids, captions, answers, messages, sources) is escaped, and the page's
Content-Security-Policy lets it load nothing but its own inline style and data-URI images (no
script, font or stylesheet from anywhere).
"""

from __future__ import annotations

import dataclasses
import datetime
import heapq
import io
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from hashlib import blake2b
from pathlib import Path
from typing import Any

from moonbatch.errors import InvalidOption
from moonbatch.workers.models import id_text

#: Rows shown by default (``--sample``), and the most a report takes (its size grows with it).
DEFAULT_SAMPLE = 60
MAX_SAMPLE = 1000
#: The share of the sample error rows get when the run has any (more when ok rows are fewer).
ERROR_SHARE = 0.25
#: Example rows kept per error code.
EXAMPLES = 3
#: Longest side of a thumbnail in pixels (a multi-image row's images: ``MULTI_SIDE``), and
#: their JPEG quality: ~10-25 kB each, so 60 rows stay within about 2 MB.
THUMB_SIDE = 320
MULTI_SIDE = 160
JPEG_QUALITY = 80
#: Images read at once while the page is written.
FETCHES = 8
#: Characters of a row's text shown (a caption, an answer, reasoning) and of an error message.
TEXT_LIMIT = 2000
MESSAGE_LIMIT = 400
#: Colours of each skill's overlay (also the legend's).
COLOURS = {"detect": "#ff1f8e", "point": "#00e5ff", "segment": "#ffd400"}


# --- rows: one streaming pass ---------------------------------------------------------------

@dataclasses.dataclass
class Pick:
    """A sampled row: its 1-based ``position`` in the run (plan order), ``shard``, ``index``
    (its line in the shard's results and plan, from 0), ``key`` (the id as text) and the row."""

    position: int
    shard: int
    index: int
    key: str
    row: dict[str, Any]


@dataclasses.dataclass
class ErrorCode:
    """Error rows of one code: ``count`` and the first ``EXAMPLES`` as ``(id, skill,
    message)``."""

    code: str
    count: int = 0
    examples: list[tuple[str, str | None, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SkillStats:
    """What one skill answered over the rows: ``answered`` (rows with its result), ``found``
    (rows where detect/point/segment found something; caption/query: a non-empty text),
    ``shapes`` (boxes, points, masks in all) and ``chars`` (text characters in all)."""

    skill: str
    answered: int = 0
    found: int = 0
    shapes: int = 0
    chars: int = 0


class Rows:
    """One pass over a run's rows (``add`` each, in plan order): counts, error codes with
    examples, per-skill statistics and the deterministic sample. Memory holds the sample's
    candidates (at most twice ``sample`` rows) and ``EXAMPLES`` per code, nothing per row."""

    def __init__(self, spec: Any, sample: int) -> None:
        self.spec, self.size = spec, sample
        self.salt = spec.run_id.encode() + b"\0"
        self.total = self.ok = self.error = self.cached = 0
        self.codes: dict[str, ErrorCode] = {}
        self.skills = {o.skill: SkillStats(o.skill) for o in spec.all_options}
        self._multi = spec.multi_skill
        # Max-heaps (negated hash) of the ``size`` smallest hashes: ok rows and error rows.
        self._heaps: dict[bool, list[tuple[int, int, Pick]]] = {True: [], False: []}
        self.problems: list[str] = []  # results files that could not be read, for the page

    def add(self, shard: int, index: int, row: Any) -> None:
        """Count ``row`` (a decoded results row), the ``index``-th (from 0) of ``shard``."""
        if row.__class__ is not dict:
            return
        self.total += 1
        item_id = row.get("id")
        key = item_id if item_id.__class__ is str else id_text(item_id)
        ok = row.get("status") == "ok"
        if ok:
            self.ok += 1
        else:
            self.error += 1
            self._count_error(row, key)
        if row.get("cached") is True:
            self.cached += 1
        result = row.get("result")
        if result.__class__ is dict:
            self._count_skills(result)
        if self.size:
            digest = blake2b(self.salt + key.encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
            rank = -int.from_bytes(digest, "big")
            heap = self._heaps[ok]
            if len(heap) < self.size:
                heapq.heappush(heap, (rank, -self.total, Pick(self.total, shard, index, key, row)))
            elif rank > heap[0][0]:
                heapq.heapreplace(heap, (rank, -self.total,
                                         Pick(self.total, shard, index, key, row)))

    def _count_error(self, row: dict[str, Any], key: str) -> None:
        err = row.get("error") if isinstance(row.get("error"), dict) else {}
        code = str(err.get("code") or "unknown")
        entry = self.codes.get(code) or self.codes.setdefault(code, ErrorCode(code))
        entry.count += 1
        if len(entry.examples) < EXAMPLES:
            skill = err.get("skill")
            entry.examples.append((key, str(skill) if skill else None,
                                   clip(err.get("message"), MESSAGE_LIMIT)))

    def _count_skills(self, result: dict[str, Any]) -> None:
        # The hot loop of a million rows: each skill's part of ``result`` as
        # ``exports.Item.parts`` finds it (under its name in a multi-skill row), inlined.
        for skill, stats in self.skills.items():
            part = result.get(skill) if self._multi else result
            if part.__class__ is not dict:
                continue
            stats.answered += 1
            n, chars = _measure(skill, part)
            if n or chars:
                stats.found += 1
                stats.shapes += n
                stats.chars += chars

    def sample(self) -> list[Pick]:
        """The sample in plan order: the error rows with the smallest hashes (up to
        ``ERROR_SHARE`` of the sample, more when ok rows are fewer), then ok rows."""
        ok = sorted(self._heaps[True], reverse=True)
        bad = sorted(self._heaps[False], reverse=True)
        quota = min(len(bad), max(math.ceil(self.size * ERROR_SHARE), self.size - len(ok)))
        chosen = bad[:quota] + ok[:self.size - quota]
        return sorted((e[2] for e in chosen), key=lambda p: p.position)


def read_rows(store: Any, spec: Any, shards: int, rows: Rows) -> None:
    """Feed every row of the run's merged shards to ``rows``, a shard at a time, the next
    shards' files read meanwhile (``writers.read_results``; a shard not merged yet is passed
    over; one that cannot be read is noted in ``rows.problems``)."""
    from moonbatch.workers import writers

    for got in writers.read_results(store, spec.output_format, shards):
        if not got.merged:
            continue
        try:
            for index, row in enumerate(got.rows()):
                rows.add(got.shard, index, row)
        except Exception as exc:  # a damaged results file: say so and go on with the others
            rows.problems.append(f"results of shard {got.shard} could not be read "
                                 f"({type(exc).__name__}: {clip(str(exc), 200)})")


def skill_parts(spec: Any, row: dict[str, Any], key: str, opts: dict[str, Any] | None
                ) -> Iterator[tuple[Any, str, dict[str, Any]]]:
    """``(skill options, object or question, result)`` of each skill answered in ``row``
    (``moonbatch.workers.writers.exports.Item.parts``); ``opts``: the item's own options."""
    from moonbatch.workers.writers.exports import Item

    return Item(0, row, key, opts or {}).parts(spec)


def _measure(skill: str, part: dict[str, Any]) -> tuple[int, int]:
    """``(shapes, characters)`` of one skill's result."""
    if skill == "detect":
        return _length(part.get("objects")), 0
    if skill == "point":
        return _length(part.get("points")), 0
    if skill == "segment":
        return (1 if isinstance(part.get("path"), str) and part["path"].strip() else 0), 0
    text = part.get("caption" if skill == "caption" else "answer")
    return 0, len(text) if isinstance(text, str) else 0


def _length(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def clip(text: Any, limit: int) -> str:
    """``text`` as a string of at most ``limit`` characters (a note of how many more)."""
    text = "" if text is None else str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


# --- one tile: the images and what the skills answered ---------------------------------------

def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _box(value: Any) -> tuple[float, float, float, float] | None:
    """A normalised ``{x_min, y_min, x_max, y_max}`` as floats; None when one is missing."""
    if not isinstance(value, dict):
        return None
    box = tuple(_number(value.get(k)) for k in ("x_min", "y_min", "x_max", "y_max"))
    return box if None not in box else None  # type: ignore[return-value]


def _fmt(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if value else "0"


def overlays(spec: Any, pick: Pick, opts: dict[str, Any] | None, size: tuple[int, int]
             ) -> list[dict[str, Any]]:
    """The shapes to draw over the row's (first) image, in normalised coordinates: ``box``
    (detect), ``point`` (a dot whose ``transform`` keeps it round), ``mask`` (a segment's
    path flattened into polygons by ``moonbatch.workers.writers.shapes``, sampled at the
    thumbnail's ``size``: only numbers reach the page) and ``segment-box`` (its bbox). Each
    has ``kind``, ``skill``, ``label``, ``title`` and its coordinates."""
    from moonbatch.workers.writers import shapes

    out: list[dict[str, Any]] = []
    width, height = size
    for o, name, part in skill_parts(spec, pick.row, pick.key, opts):
        label = f"{o.skill} {name}".strip()
        if o.skill == "detect":
            for box in shapes.entries(part, "objects"):
                b = _box(box)
                if b is not None:
                    out.append({"kind": "box", "skill": o.skill, "label": label, "x": b[0],
                                "y": b[1], "w": b[2] - b[0], "h": b[3] - b[1],
                                "title": f"{label}: ({_fmt(b[0])}, {_fmt(b[1])}) – "
                                         f"({_fmt(b[2])}, {_fmt(b[3])})"})
        elif o.skill == "point":
            for point in shapes.entries(part, "points"):
                x, y = (_number(point.get(k)) if isinstance(point, dict) else None
                        for k in ("x", "y"))
                if x is not None and y is not None:
                    # The overlay stretches x and y apart (its viewBox is 1 x 1): a y scale of
                    # width/height about the point makes the dot round at any size.
                    k = width / height
                    out.append({"kind": "point", "skill": o.skill, "label": label, "x": x,
                                "y": y, "transform": f"matrix(1 0 0 {_fmt(k)} 0 {_fmt(y * (1 - k))})",
                                "title": f"{label}: ({_fmt(x)}, {_fmt(y)})"})
        elif o.skill == "segment":
            polys = shapes.polygons(part.get("path"), width, height)
            if polys:
                d = " ".join("M " + " L ".join(f"{_fmt(p[i] / width)} {_fmt(p[i + 1] / height)}"
                                               for i in range(0, len(p), 2)) + " Z"
                             for p in polys)
                out.append({"kind": "mask", "skill": o.skill, "label": label, "d": d,
                            "title": label})
            b = _box(part.get("bbox"))
            if b is not None:
                out.append({"kind": "segment-box", "skill": o.skill, "label": label, "x": b[0],
                            "y": b[1], "w": b[2] - b[0], "h": b[3] - b[1],
                            "title": f"{label} bbox"})
    return out


def answers(spec: Any, pick: Pick, opts: dict[str, Any] | None) -> list[dict[str, Any]]:
    """What each skill answered, as the tile lists it: ``skill``, ``asked`` (the question or
    object, the item's own where its manifest gave one), ``text`` (a caption, an answer),
    ``reasoning``, ``count`` and ``noun`` (boxes, points, a mask found or not)."""
    out = []
    for o, name, part in skill_parts(spec, pick.row, pick.key, opts):
        entry: dict[str, Any] = {"skill": o.skill, "asked": name, "text": None,
                                 "reasoning": None, "count": None, "noun": None}
        if o.skill == "caption":
            entry["text"] = clip(part.get("caption"), TEXT_LIMIT)
            entry["asked"] = o.length or ""
        elif o.skill == "query":
            entry["text"] = clip(part.get("answer"), TEXT_LIMIT)
            why = part.get("reasoning")
            why = why.get("text") if isinstance(why, dict) else why
            entry["reasoning"] = clip(why, TEXT_LIMIT) if why else None
        else:
            n = _measure(o.skill, part)[0]
            noun = {"detect": "box", "point": "point", "segment": "mask"}[o.skill]
            entry.update(count=n, noun=noun if n == 1 else noun + ("es" if noun == "box" else "s"))
        out.append(entry)
    return out


def thumbnail(data: bytes, side: int) -> tuple[str, int, int]:
    """An image's thumbnail: ``(data URI of a JPEG, width, height)``, upright, at most
    ``side`` pixels on its longest side. The image goes through the workers' own preparation
    first (``prepare_image``: the pixel limit ``MOONBATCH_MAX_IMAGE_PIXELS`` read from its
    header, a reduced decode within ``MOONBATCH_DECODE_MEMORY``), downscaled to about
    ``side``² pixels. Raises ``ItemError`` (``empty_object``, ``not_an_image``,
    ``image_decode_failed``, ``image_too_large``)."""
    from moonbatch.workers import lines

    Image = lines._pillow()  # noqa: N806 - Pillow with the workers' limits
    prepared = lines.prepare_image(data, limit=max(len(data), 1 << 24), max_pixels=side * side)
    try:
        img = Image.open(io.BytesIO(prepared.data))
        img.load()
        if prepared.transform is None:  # passed through (small enough): flatten it here, as
            img = lines._flatten(img)  # the workers do (alpha on white, 16-bit, EXIF upright)
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    except Exception as exc:
        raise lines.ItemError("image_decode_failed", f"cannot be shown: {exc}") from None
    uri = lines.data_uri(buf.getvalue(), "image/jpeg")
    return uri, img.width, img.height


def tiles(run: Any, picks: list[Pick]) -> Iterator[dict[str, Any]]:
    """Each sampled row as the template's tile (see ``_tile``), in ``picks``' order, its
    images read ``FETCHES`` at a time (through ``run.fetcher``, made here: once, not by
    each thread)."""
    from moonbatch.workers.pool import ordered_map

    planned = _plan_items(run, picks) if picks else {}
    run.fetcher  # noqa: B018 - made before the threads share it

    def tile(pick: Pick) -> dict[str, Any]:
        try:
            return _tile(run, pick, planned.get((pick.shard, pick.key)))
        except Exception as exc:  # a row no tile can show: say so, never stop the page
            return {"id": pick.key, "position": pick.position, "status": "?", "error": None,
                    "cached": False, "cache_of": None, "size": None, "source": "",
                    "images": [{"src": None, "why": f"row not shown ({type(exc).__name__})"}],
                    "shapes": [], "answers": [], "tokens": None}

    return ordered_map(tile, picks, workers=FETCHES, window=2 * FETCHES)


def _plan_items(run: Any, picks: list[Pick]) -> dict[tuple[int, str], Any]:
    """``{(shard, key): PlanItem}`` of the picked rows, from their shards' plan files (each
    read once). A shard's rows are in its plan's order, so a row's plan line is the line of its
    index (checked: the whole plan is searched when it is not); a row whose item is not in
    its shard's plan has none."""
    from moonbatch.workers import layout
    from moonbatch.workers.models import PlanItem

    wanted: dict[int, list[Pick]] = {}
    for p in picks:
        wanted.setdefault(p.shard, []).append(p)
    found: dict[tuple[int, str], Any] = {}
    for shard, mine in wanted.items():
        try:
            lines = [line for line in run.output.get(layout.plan_items(shard)).splitlines()
                     if line.strip()]
        except Exception:  # no plan: the tiles say the image is not the run's
            continue
        missing = set()
        for p in mine:
            item = _parse(PlanItem, lines[p.index]) if p.index < len(lines) else None
            if item is not None and item.key == p.key:
                found[(shard, p.key)] = item
            else:
                missing.add(p.key)
        for line in lines if missing else ():
            item = _parse(PlanItem, line)
            if item is not None and item.key in missing:
                found[(shard, item.key)] = item
    return found


def _parse(cls: Any, line: bytes) -> Any:
    try:
        return cls.from_json(line)
    except ValueError:
        return None


def _tile(run: Any, pick: Pick, item: Any) -> dict[str, Any]:
    """One sampled row for the template: ``id``, ``position``, ``status``, ``error``,
    ``cached``/``cache_of``, ``size`` (source pixels), ``source``, ``images`` (each ``src``
    and thumbnail ``width``/``height``, or ``why`` it is not shown), ``shapes`` (over the first
    image; ``overlays``), ``answers`` and ``tokens`` (in, out)."""
    row = pick.row
    opts = item.opts if item is not None else None
    parts = item.parts() if item is not None else ()
    side = THUMB_SIDE if len(parts) <= 1 else MULTI_SIDE
    images = [_image(run, part, side) for part in parts]
    if item is None:
        images.append({"src": None, "why": "not in the run's plan: no image is read for it"})
    shapes: list[dict[str, Any]] = []
    first = images[0] if images else None
    if first is not None and first["src"] is not None:
        shapes = overlays(run.spec, pick, opts, (first["width"], first["height"]))
    err = row.get("error") if isinstance(row.get("error"), dict) else None
    usage = row.get("usage") if isinstance(row.get("usage"), dict) else {}
    w, h = row.get("width"), row.get("height")
    return {
        "id": pick.key, "position": pick.position, "status": str(row.get("status") or "?"),
        "error": {"code": str(err.get("code") or "unknown"),
                  "skill": str(err["skill"]) if err.get("skill") else None,
                  "message": clip(err.get("message"), MESSAGE_LIMIT)} if err else None,
        "cached": row.get("cached") is True, "cache_of": row.get("cache_of"),
        "size": f"{w}×{h}" if isinstance(w, int) and isinstance(h, int) else None,
        "source": clip(row.get("source"), 300) if row.get("source") else "",
        "images": images, "shapes": shapes, "answers": answers(run.spec, pick, opts),
        "tokens": (usage.get("input_tokens"), usage.get("output_tokens"))
        if usage.get("input_tokens") or usage.get("output_tokens") else None,
    }


def _image(run: Any, part: Any, side: int) -> dict[str, Any]:
    """One image of an item: ``{"src", "width", "height"}`` of its thumbnail, or ``{"src":
    None, "why"}`` (the error code and message of the read or the decode)."""
    from moonbatch.workers.lines import ItemError
    from moonbatch.workers.readers import read_item

    try:
        data = read_item(run.fetcher.get, part)
        src, width, height = thumbnail(data, side)
        return {"src": src, "width": width, "height": height, "why": None}
    except ItemError as exc:
        return {"src": None, "why": f"{exc.code}: {clip(exc.message, MESSAGE_LIMIT)}"}
    except Exception as exc:  # never a crash for one image
        return {"src": None, "why": f"not shown ({type(exc).__name__})"}


# --- the page --------------------------------------------------------------------------------

def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("moonbatch.producer", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["n"] = lambda v: "–" if v is None else f"{v:,}"
    env.filters["usd"] = lambda v: "–" if v is None else f"${v:,.4f}" if v < 1 else f"${v:,.2f}"
    env.filters["num"] = _fmt
    return env


def _duration(seconds: Any) -> str | None:
    if not isinstance(seconds, (int, float)):
        return None
    seconds = float(seconds)
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def summary(run: Any, snap: dict[str, Any]) -> list[tuple[str, Any]]:
    """The run's facts as ``(name, value)`` rows of the page's first table."""
    from moonbatch.workers.providers import provider_of

    spec = run.spec
    provider = provider_of(snap)
    skills = []
    for o in spec.all_options:
        fields = {k: v for k, v in o.model_dump(exclude_none=True).items() if k != "skill"}
        skills.append(o.skill + (": " + ", ".join(f"{k}={v}" for k, v in fields.items())
                                 if fields else ""))
    t = snap.get("timings") or {}
    when = [f"{k.replace('_at', '')} {t[k].replace('T', ' ')[:19]} UTC"
            for k in ("created_at", "planned_at", "finished_at") if t.get(k)]
    rows: list[tuple[str, Any]] = [
        ("input", spec.input), ("output", spec.output),
        ("provider", provider.describe(snap)),
        ("model", spec.model or "the provider's default"),
        ("skills", "; ".join(skills)),
        ("options", ", ".join(f"{k}={v}" for k, v in (
            ("format", spec.output_format), ("max_pixels", spec.max_pixels),
            ("shard_size", spec.shard_size), ("exports", ",".join(spec.exports) or "none"),
            ("cache", "on" if spec.cache else "off"), *sorted(spec.provider_options.items()),
            ("max_cost", spec.max_cost), ("max_error_rate", spec.max_error_rate))
            if v is not None)),
        ("timings", "; ".join(when) + (f"; wall time {_duration(t.get('wall_seconds'))}"
                                       if _duration(t.get("wall_seconds")) else "")),
    ]
    return rows


def context(run: Any, snap: dict[str, Any], rows: Rows, picks: list[Pick],
            tile_iter: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Everything the template shows."""
    c = snap.get("counts") or {}
    spend = snap.get("spend") or {}
    usage = snap.get("usage") or {}
    stop = snap.get("stop_reason") or None
    failure = snap.get("failure") or None
    kinds = {o.skill for o in run.spec.all_options}
    return {
        "run_id": run.spec.run_id, "status": snap.get("status", "?"),
        "stop_reason": stop, "failure": failure, "facts": summary(run, snap),
        "counts": {"items": c.get("total"), "done": c.get("done"), "ok": c.get("ok"),
                   "error": c.get("error"), "skipped": c.get("skipped"),
                   "cached": c.get("cached"), "in_flight": c.get("in_flight")},
        "errors_by_code": snap.get("errors_by_code") or {},
        "usage": {"input": usage.get("input_tokens"), "output": usage.get("output_tokens")},
        "spend": {"actual": spend.get("actual_usd"), "estimated": spend.get("estimated_usd"),
                  "in_flight": spend.get("in_flight_usd"), "budget": spend.get("max_cost_usd")},
        "rows": rows, "codes": sorted(rows.codes.values(), key=lambda e: (-e.count, e.code)),
        "skills": list(rows.skills.values()),
        "sample_size": len(picks), "sample_wanted": rows.size,
        "sample_errors": sum(1 for p in picks if p.row.get("status") != "ok"),
        "tiles": tile_iter,
        "legend": [(k, v) for k, v in COLOURS.items() if k in kinds], "colours": COLOURS,
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC"),
        "version": _version(),
    }


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("moonbatch")
    except metadata.PackageNotFoundError:
        return ""


def render(run: Any, snap: dict[str, Any], sample: int) -> Iterator[str]:
    """The page of the run, as text chunks (``jinja2.Template.generate``): the rows are read
    first (one pass), then the page is written while the sample's images are read."""
    rows = Rows(run.spec, sample)
    shards = _shards(run, snap)
    read_rows(run.output, run.spec, shards, rows)
    picks = rows.sample()
    template = _environment().get_template("report.html")
    return template.generate(**context(run, snap, rows, picks, tiles(run, picks)))


def _shards(run: Any, snap: dict[str, Any]) -> int:
    """How many shards the run has (0 while it is planned)."""
    from moonbatch.workers import layout
    from moonbatch.workers.storage import get_json_or_none

    total = (snap.get("shards") or {}).get("total")
    if isinstance(total, int):
        return total
    plan = get_json_or_none(run.output, layout.PLAN) or {}
    return int(plan.get("shards") or 0)


def check_sample(sample: int) -> int:
    """``sample`` if it is a valid ``--sample``; raises ``InvalidOption`` otherwise."""
    if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample <= MAX_SAMPLE:
        raise InvalidOption(f"--sample {sample}: must be a whole number from 0 to {MAX_SAMPLE} "
                            "(rows shown as thumbnails)", option="--sample", value=sample)
    return sample


def write(output: str, settings: Any, *, sample: int = DEFAULT_SAMPLE,
          out: str | os.PathLike[str] | None = None) -> str:
    """Write the report of the run at ``output`` (its OUTPUT URL) and return where it is: the
    local path, or the ``s3://`` URL. ``out``: a local file path or an ``s3://`` object URL
    (default ``OUTPUT/report.html``, replaced if there). A local file is written in a temporary
    file beside it and renamed, so a browser never reads half a page.

    Raises ``InvalidOption`` (``sample``), ``RunNotFound`` (no run at ``output``), storage
    errors of OUTPUT or of ``out``; images that cannot be read are placeholders, not errors."""
    from moonbatch.errors import RunNotFound
    from moonbatch.workers import layout
    from moonbatch.workers.runstate import Progress, open_run
    from moonbatch.workers.runstate import RunNotFound as MissingRun
    from moonbatch.workers.storage import LocalStore, open_store

    check_sample(sample)
    try:
        run = open_run(output, settings)
    except MissingRun as exc:
        raise RunNotFound(str(exc)) from None
    snap = Progress(run.output).snapshot()
    if out is None:
        if isinstance(run.output, LocalStore):
            target: Path | None = run.output.root / layout.REPORT
        else:
            target, where = None, layout.REPORT
            store = run.output
    else:
        text = os.fspath(out)
        if text.startswith("s3://"):
            folder, _, where = text[5:].rpartition("/")
            if not where or not folder:
                raise InvalidOption(f"--out {text}: an s3:// URL of a file "
                                    "(s3://bucket/path/report.html)", option="--out", value=text)
            target = None
            store = open_store("s3://" + folder + "/", endpoint_url=settings.s3_endpoint_url,
                               region=settings.s3_region)
        else:
            target = Path(text).expanduser().resolve()
            if target.is_dir():
                raise InvalidOption(f"--out {text}: is a folder: give a file name (e.g. "
                                    f"{Path(text) / 'report.html'})", option="--out", value=text)
    try:
        chunks = render(run, snap, sample)
        if target is None:
            # text/html: opened through a presigned URL, the page shows rather than downloads
            store.put(where, "".join(chunks).encode(), content_type="text/html; charset=utf-8")
            return store.url_for(where)
        _write_file(target, chunks)
        return str(target)
    finally:
        run.fetcher.close()


def _write_file(target: Path, chunks: Iterable[str]) -> None:
    """Stream ``chunks`` into a temporary file beside ``target``, then rename it there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
