"""Typed records of a run: the skill's options, the run spec, and the per-shard state documents.

All of them are stored as JSON under the run's output prefix (see ``moonbatch.workers.layout``); none of
them ever holds a secret (API key or presigned URL).
"""

from __future__ import annotations

import functools
import json
import operator
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import msgspec
import orjson
from pybase64 import b64decode, b64encode
from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, model_validator
from pydantic_core import core_schema

Skill = Literal["caption", "query", "detect", "point", "segment"]

#: Skills only the Moondream real-time API serves (its ``POST /v1/segment``; FACTS.md "real-time
#: API"): the Batch API's skill list (seed 002) and fal's endpoints have no segment.
REALTIME_ONLY_SKILLS: tuple[str, ...] = ("segment",)
#: Skills whose real-time request takes ``spatial_refs`` (the official client ``moondream``
#: 2.6.1, ``cloud_vl.py``: query, point and segment send it; detect does not).
SPATIAL_REFS_SKILLS: tuple[str, ...] = ("query", "point", "segment")
#: Skills that take ``object`` (what to find).
OBJECT_SKILLS: tuple[str, ...] = ("detect", "point", "segment")
#: Skills whose results are shapes in the image (exports: COCO, YOLO, Label Studio regions).
SPATIAL_SKILLS: tuple[str, ...] = ("detect", "point", "segment")


class SkillOptions(BaseModel):
    """The request every line of a run carries, as the Batch API defines it (seed 002,
    "Skill-specific fields" and "Settings object"), plus what only the real-time API takes
    (FACTS.md "real-time API"): the ``segment`` skill and ``spatial_refs``.

    ``spatial_refs``: points ``[x, y]`` or boxes ``[x_min, y_min, x_max, y_max]``, normalised
    0..1 with (0, 0) top-left, sent as the official client sends them (query, point, segment).

    Raises ``pydantic.ValidationError`` when a required field is missing (``question`` for query,
    ``object`` for detect, point and segment) or an option does not apply to the skill.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    skill: Skill
    length: Literal["short", "normal", "long"] | None = None
    question: str | None = None
    object: str | None = None
    reasoning: bool | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    spatial_refs: list[list[float]] | None = None

    @model_validator(mode="after")
    def _check(self) -> SkillOptions:
        s = self.skill
        if s == "query" and not self.question:
            raise ValueError("--question is required for --skill query")
        if s in OBJECT_SKILLS and not self.object:
            raise ValueError(f"--object is required for --skill {s}")
        if self.length is not None and s != "caption":
            raise ValueError("--length applies to --skill caption only")
        if self.question is not None and s != "query":
            raise ValueError("--question applies to --skill query only")
        if self.object is not None and s not in OBJECT_SKILLS:
            raise ValueError("--object applies to --skill detect, point and segment only")
        if self.spatial_refs is not None:
            if s not in SPATIAL_REFS_SKILLS:
                raise ValueError("--spatial-refs applies to --skill query, point and segment only")
            _check_spatial_refs(self.spatial_refs)
        if self.reasoning is not None and s != "query":
            raise ValueError("--reasoning applies to --skill query only")
        has_settings = any(v is not None for v in (self.temperature, self.top_p, self.max_tokens))
        if has_settings and s not in ("caption", "query"):
            raise ValueError("--temperature, --top-p and --max-tokens apply to caption and query only")
        return self

    def request_fields(self) -> dict[str, object]:
        """The line's fields other than ``id`` and ``image``, e.g.
        ``{"skill": "caption", "length": "normal"}`` or ``{"skill": "segment", "object":
        "cat", "spatial_refs": [[0.5, 0.5]]}`` (the real-time API's field names, FACTS.md)."""
        out: dict[str, object] = {"skill": self.skill}
        if self.skill == "caption":
            out["length"] = self.length or "normal"
        elif self.skill == "query":
            out["question"] = self.question
            if self.reasoning is not None:
                out["reasoning"] = self.reasoning
        else:
            out["object"] = self.object
        if self.spatial_refs is not None:
            out["spatial_refs"] = [list(r) for r in self.spatial_refs]
        settings = {
            k: v
            for k, v in (("temperature", self.temperature), ("top_p", self.top_p),
                         ("max_tokens", self.max_tokens))
            if v is not None
        }
        if settings:
            out["settings"] = settings
        return out

    def with_overrides(self, overrides: dict[str, Any] | None) -> SkillOptions:
        """These options with an item's own ``question``, ``object`` or ``length`` (a manifest
        row's columns, ``PlanItem.opts``) where the skill takes that field; fields the skill does
        not take, and empty values, are ignored. Raises ``ValueError`` naming the field when a
        value is invalid (e.g. ``length: "huge"``)."""
        if not overrides:
            return self
        takes = {"caption": ("length",), "query": ("question",), "detect": ("object",),
                 "point": ("object",), "segment": ("object",)}[self.skill]
        update = {k: v for k, v in overrides.items() if k in takes and v not in (None, "")}
        if not update:
            return self
        try:
            return SkillOptions.model_validate({**self.model_dump(exclude_none=True), **update})
        except ValueError as exc:
            errors = getattr(exc, "errors", None)
            if callable(errors) and errors():
                first = errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ())) or "options"
                raise ValueError(f"{where}: {first.get('msg')}") from None
            raise

    def line_fragment(self) -> bytes:
        """``request_fields()`` as the inside of a JSON object (no braces), UTF-8, for splicing
        into every line of a shard without re-serialising it per line."""
        return json.dumps(self.request_fields(), ensure_ascii=False, separators=(",", ":"))[1:-1].encode()


def _check_spatial_refs(refs: list[list[float]]) -> None:
    """``ValueError`` unless every ref is ``[x, y]`` or ``[x_min, y_min, x_max, y_max]`` within
    0..1 (a box's min at most its max)."""
    if not refs:
        raise ValueError("--spatial-refs must hold at least one [x, y] point or "
                         "[x_min, y_min, x_max, y_max] box")
    for ref in refs:
        if len(ref) not in (2, 4):
            raise ValueError(f"--spatial-refs {ref}: each ref is [x, y] or "
                             "[x_min, y_min, x_max, y_max]")
        if any(not 0.0 <= v <= 1.0 for v in ref):
            raise ValueError(f"--spatial-refs {ref}: coordinates are normalised, within 0..1")
        if len(ref) == 4 and (ref[0] > ref[2] or ref[1] > ref[3]):
            raise ValueError(f"--spatial-refs {ref}: a box is [x_min, y_min, x_max, y_max]")


def realtime_only(spec: RunSpec) -> list[str]:
    """What ``spec`` asks for that only the Moondream real-time API serves, as the command
    line names it: its real-time-only skills (``"segment"``) and ``"--spatial-refs"`` when a
    skill carries spatial refs; empty when the Batch API and fal can serve the run too.
    Providers other than the real-time one refuse a run for which this is not empty."""
    out = [o.skill for o in spec.all_options if o.skill in REALTIME_ONLY_SKILLS]
    if any(o.spatial_refs is not None for o in spec.all_options):
        out.append("--spatial-refs")
    return out


def realtime_only_refusal(spec: RunSpec, provider: str) -> str | None:
    """One line refusing ``spec`` on ``provider`` (a name of ``PROVIDERS``) when
    ``realtime_only(spec)`` is not empty, naming the fix; None when nothing is refused."""
    only = realtime_only(spec)
    if not only:
        return None
    what = " and ".join(("--skill " + n) if not n.startswith("--") else n for n in only)
    return (f"{what}: only the Moondream real-time API serves "
            f"{'it' if len(only) == 1 else 'them'}, not --provider {provider}: "
            "use --provider moondream-realtime")


#: ``RunSpec.provider_options`` keys → the flags that set them (fal's queue controls), for the
#: refusals of providers that take none of them.
PROVIDER_OPTION_FLAGS = {"priority": "--priority", "store_io": "--fal-store-io",
                         "request_timeout": "--queue-timeout"}


def provider_options_refusal(spec: RunSpec, provider: str, why: str) -> str | None:
    """The one-line refusal of a run whose ``provider_options`` ``provider`` does not take
    (``why``: what the provider has instead), or None when there are none."""
    if not spec.provider_options:
        return None
    names = ", ".join(PROVIDER_OPTION_FLAGS.get(k, k) for k in sorted(spec.provider_options))
    return (f"{names} applies to --provider fal only ({why}): leave it out, or add "
            "--provider fal")


class RunSpec(BaseModel):
    """What a run is: written once by the producer to ``_moonbatch/spec.json``."""

    run_id: str
    # INPUT: a normalised store URL (a prefix), or the URL of a file (a manifest, a
    # WebDataset .tar, a Parquet file) for the readers that take one (``moonbatch.workers.readers``).
    input: str
    output: str  # normalised store URL
    options: SkillOptions
    # Further skills of a multi-skill run (``--skill caption --skill detect``): each image is
    # read and encoded once and every skill's result lands in its row under the skill's name.
    more_options: list[SkillOptions] = Field(default_factory=list)
    # The model to run (``--model``, default ``MOONBATCH_MODEL``; None: the provider's own
    # default). Each provider sends it where its service takes it or refuses the run
    # (``Provider.check_model``).
    model: str | None = None
    # Options of one provider's own (``--priority``, ``--fal-store-io``, ``--queue-timeout``
    # → ``priority``, ``store_io``, ``request_timeout``): the provider checks them
    # (``Provider.check_spec``) and refuses those it does not take.
    provider_options: dict[str, Any] = Field(default_factory=dict)
    # Which service annotates (a name of ``moonbatch.workers.providers.PROVIDERS``) and, for fal,
    # which endpoint. Specs written before providers existed are the registry's default's runs.
    provider: str = Field(default_factory=lambda: _default_provider())
    endpoint: str | None = None
    # How INPUT is read (``moonbatch.workers.readers``): ``prefix`` (a listing of images; specs written
    # before readers existed), ``manifest``, ``webdataset`` or ``parquet``, and that reader's
    # options (``id_column``, ``image_column``, ``base``; ``image_columns``: the list, when
    # several ``--image-column`` name each row's images, ``image_column`` being the first).
    input_kind: str = "prefix"
    input_options: dict[str, str | list[str]] = Field(default_factory=dict)
    # How results are written (``moonbatch.workers.writers``): ``jsonl`` or ``parquet``.
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    # ``--export``: what ``writers.exports`` writes when the run completes (``coco``,
    # ``label-studio``, ``yolo``). Not given (None; specs written before it): ``["coco"]`` for
    # a run with a detect, point or segment skill, as before, else none.
    exports: list[str] = Field(default_factory=list)
    # ``--skip-existing``: the OUTPUT of a previous run whose ok rows' items are not planned
    # again (``producer.existing``); recorded so a taken-over start plans the same.
    skip_existing: str | None = None
    shard_size: int
    max_shard_bytes: int
    max_pixels: int = 0  # downscale budget (0: send images at their own resolution)
    # The result cache (``moonbatch.workers.cache``), decided at submit so every worker agrees:
    # on or off (``MOONBATCH_CACHE``, ``--no-cache``; False for specs written before it), its
    # location (``MOONBATCH_CACHE_URL``, default beside the state location) and whether a
    # sampling run (temperature > 0) may read it (``--cache-sampled``).
    cache: bool = False
    cache_url: str | None = None
    cache_sampled: bool = False
    created_at: float  # unix seconds
    # Stops (``moonbatch.workers.stops``): the budget in dollars (``--max-cost``; a later
    # ``retry-failed --max-cost`` overrides it), and the share of provider-side errors
    # (``--max-error-rate``, 0..1) that stops the run once ``error_sample`` results are in.
    max_cost: float | None = Field(default=None, ge=0)
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    error_sample: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _default_exports(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("exports") is None:
            opts = [data.get("options"), *(data.get("more_options") or ())]
            skills = [o.skill if isinstance(o, SkillOptions) else (o or {}).get("skill")
                      for o in opts]
            data = {**data, "exports": default_exports(skills)}
        return data

    @property
    def all_options(self) -> list[SkillOptions]:
        """Every skill of the run, the first one first."""
        return [self.options, *self.more_options]

    @property
    def skill_names(self) -> str:
        """The run's skills as summaries show them: ``caption`` or ``caption+detect``."""
        return "+".join(o.skill for o in self.all_options)

    @property
    def multi_skill(self) -> bool:
        """True when rows hold one result per skill (``result[<skill>]``)."""
        return bool(self.more_options)
    # The broker queue of every task of the run: the settings' queue for a fleet's run, a
    # private one (``moonbatch-run-<run_id>``) for ``moonbatch run``'s local workers, so the
    # two never take each other's work. None (specs written before it): the settings' queue.
    queue: str | None = None


def default_exports(skills: Any) -> list[str]:
    """The exports of a run that names none: COCO for a run with a detect, point or segment
    skill, none otherwise."""
    return ["coco"] if set(SPATIAL_SKILLS) & set(skills) else []


def _default_provider() -> str:
    from moonbatch.workers.providers import DEFAULT_PROVIDER

    return DEFAULT_PROVIDER


def id_text(item_id: Any) -> str:
    """An item id as text (line ids, digests, messages): itself for a str, its JSON text
    otherwise (``7`` → ``"7"``, ``True`` → ``"true"``)."""
    return item_id if item_id.__class__ is str else orjson.dumps(item_id).decode()


class PlanItem(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """One item of a shard's plan. A frozen ``msgspec.Struct`` (56 B, not tracked by the
    cyclic GC), not a pydantic model: a worker holds 100,000 of them, and builds one per plan
    line it reads (``PlanItems``: msgspec decodes a line straight into one).

    ``id``: the item's id as the output row carries it: the key relative to the input prefix,
    or a manifest's id of any JSON type (str, int, float, bool). ``size``: the image's bytes
    (an estimate where the reader cannot know it exactly). ``ref``: where the image is, when it
    is not the INPUT store's key ``id`` (``moonbatch.workers.readers``: a key relative to the INPUT
    store, an ``s3://``/``file://``/``http(s)://`` URL, ``tar:<key>#<offset>+<size>``,
    ``parquet:<key>#<row group>/<row>``). ``opts``: the item's own ``question``, ``object``
    or ``length`` (manifest columns), overriding the run's. ``more``: the refs (same forms) of
    the further images of a multi-image item (a manifest row naming several images; seed 002,
    "Common fields": a query's ``images``), None for a single image; ``size`` is then the
    bytes of all its images.
    """

    id: Any
    size: int
    ref: str | None = None
    opts: dict[str, Any] | None = None
    more: tuple[str, ...] | None = None

    @property
    def images(self) -> tuple[str | None, ...]:
        """Every image's ref, the first one first (None: the INPUT store's key ``id``)."""
        return (self.ref, *self.more) if self.more else (self.ref,)

    def parts(self) -> tuple[PlanItem, ...]:
        """One single-image item per image (same id and options; ``size`` split evenly), for
        reading each image (``ItemFetcher.get``) and naming its ``source``; ``(self,)`` for a
        single-image item."""
        if not self.more:
            return (self,)
        n = 1 + len(self.more)
        return tuple(PlanItem(self.id, self.size // n, ref, self.opts) for ref in self.images)

    @property
    def key(self) -> str:
        """The id as a string (line ids, logs): ``id_text(id)``."""
        return id_text(self.id)

    def to_json(self) -> bytes:
        """One JSONL line of a plan file (without the newline)."""
        doc: dict[str, Any] = {"id": self.id, "size": self.size}
        if self.ref is not None:
            doc["ref"] = self.ref
        if self.opts:
            doc["opts"] = self.opts
        if self.more:
            doc["more"] = list(self.more)
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, line: bytes) -> PlanItem:
        """Parse a plan line; raises ``ValueError`` on a malformed one."""
        doc = orjson.loads(line)
        if not isinstance(doc, dict) or "id" not in doc or "size" not in doc:
            raise ValueError(f"plan line without an id and a size: {line[:200]!r}")
        item_id = doc["id"]
        if item_id is None or isinstance(item_id, (dict, list)):
            raise ValueError(f"plan line with an id that is not a scalar: {line[:200]!r}")
        more = doc.get("more")
        if more is not None and (not isinstance(more, list)
                                 or not all(isinstance(r, str) for r in more)):
            raise ValueError(f"plan line with a 'more' that is not a list of refs: {line[:200]!r}")
        return cls(item_id, int(doc["size"]), doc.get("ref"), doc.get("opts"),
                   tuple(more) if more else None)


class PlanItems(Sequence[PlanItem]):
    """A shard's plan file as a sequence of ``PlanItem``: the file's bytes and where each line
    starts and ends (~16 bytes per item beside the text), each item decoded when it is asked for (a new
    ``PlanItem`` each time, msgspec's decoding straight into it), instead of a list of them
    (~130 bytes per item held for the whole build or merge). Blank lines are skipped.
    ``multi_image``: whether any item has several images (``PlanItem.more``), known without
    reading the items again; ``keys_only``: whether every item is the INPUT store's key ``id``
    (no ``ref``, no ``more``), so that its ``id`` alone names its image (``take_ids``). Raises
    ``ValueError`` (at construction) for a line ``PlanItem.from_json`` refuses."""

    __slots__ = ("_data", "_starts", "_ends", "_plain", "multi_image", "keys_only")

    def __init__(self, data: bytes) -> None:
        if data and not data.endswith(b"\n"):
            # Every line then ends at a newline: ``take`` copies each line with its own.
            data += b"\n"
        self._data = data
        starts, ends = array("q"), array("q")
        multi = False
        keys_only = True
        plain = True  # every line read alike by msgspec and by from_json
        pos, end = 0, len(data)
        while pos < end:
            nl = data.find(b"\n", pos)
            if nl < 0:
                nl = end
            if data[pos:nl].strip():
                # Every line checked once, up front (``from_json`` raises for a bad one).
                item = _plain_plan_item(data[pos:nl])
                if item is None:
                    plain = False
                    item = PlanItem.from_json(data[pos:nl])
                multi = multi or item.more is not None
                keys_only = keys_only and item.ref is None and item.more is None
                starts.append(pos)
                ends.append(nl)
            pos = nl + 1
        self._starts, self._ends = starts, ends
        self._plain = plain
        self.multi_image: bool = multi
        self.keys_only: bool = keys_only

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: Any) -> Any:
        if index.__class__ is not int:
            if isinstance(index, slice):
                return [self[i] for i in range(*index.indices(len(self)))]
            index = operator.index(index)
        line = self._data[self._starts[index]:self._ends[index]]
        return _plan_line.decode(line) if self._plain else _plan_item(line)

    def __iter__(self) -> Iterator[PlanItem]:
        data, decode = self._data, _plan_line.decode if self._plain else _plan_item
        for start, end in zip(self._starts, self._ends, strict=True):
            yield decode(data[start:end])

    def take(self, indices: Iterable[int]) -> list[PlanItem]:
        """The items at ``indices`` (non-negative ints, or a numpy integer array), in that
        order: ``[self[i] for i in indices]`` in one decoding call (the merge asks for
        thousands at a time, in random order). Raises ``IndexError`` for an index out of
        range."""
        if not self._plain:
            data, starts, ends = self._data, self._starts, self._ends
            return [_plan_item(data[starts[i]:ends[i]]) for i in indices]
        text = self._lines(indices)
        return _plan_line.decode_lines(text) if text else []  # type: ignore[no-any-return]

    def take_ids(self, indices: Iterable[int]) -> list[Any]:
        """The ids of the items at ``indices`` (as ``take``), in that order: ``[self[i].id for
        i in indices]``, decoding nothing else of the items (no ``PlanItem`` built: the merge's
        rows need only the ids of ``keys_only`` items). Raises ``IndexError`` for an index out
        of range."""
        if not self._plain:
            return [item.id for item in self.take(indices)]
        text = self._lines(indices)
        # Every line was read by msgspec as a PlanItem (checked at construction): its id,
        # decoded the same way (``Any``), is the item's.
        return [line.id for line in _plan_id.decode_lines(text)] if text else []

    def _lines(self, indices: Iterable[int]) -> bytes:
        """The plan lines of items ``indices`` (see ``take``), each with its newline, back to
        back (each line, being one JSON value, may be followed by spaces); b"" for none."""
        import numpy as np

        data, starts, ends = self._data, self._starts, self._ends
        at = indices if isinstance(indices, np.ndarray) else np.fromiter(indices, np.int64)
        if not len(at):
            return b""
        first = np.frombuffer(starts, np.int64)[at]
        size = np.frombuffer(ends, np.int64)[at] - first + 1
        n, width = len(at), int(size.max())
        total = int(size.sum())
        width = -(-width // 8) * 8  # whole words of 8 bytes
        if width <= min(_WINDOW_MAX, len(data)) and n * width <= 4 * total:
            # Lines of similar lengths: each line's window of ``width`` bytes copied as one
            # (n, width) block (a numpy void item per line), the bytes beyond the line made
            # spaces a word at a time (masks by line size): ~3x faster than gathering byte by
            # byte (8 bytes of position per byte). Windows past the end are copied in Python.
            end = len(data)
            rows = np.ndarray((end - width + 1,), np.dtype((np.void, width)), data, 0, (1,))
            tail = first > end - width
            block = rows[np.where(tail, 0, first)].view(np.uint64).reshape(n, width // 8)
            keep, fill = _window_masks(width)
            block &= keep[size]
            block |= fill[size]
            if tail.any():
                for k in np.flatnonzero(tail).tolist():
                    a = int(first[k])
                    block[k] = np.frombuffer(data[a:a + int(size[k])].ljust(width), np.uint64)
            return block.tobytes()  # type: ignore[no-any-return]
        # Each line is one JSON value (checked at construction), ending at a newline: the
        # lines' bytes, newlines included, gathered by one numpy indexing (slicing each line
        # out in Python cost ~2x more, most of it in the per-line objects), unless the
        # positions (8 bytes per byte gathered) would take more than _GATHER_MAX bytes.
        stop = np.cumsum(size)
        if total * 8 > _GATHER_MAX:
            return b"".join([data[a:b] for a, b in zip(first.tolist(), (first + size).tolist(),
                                                      strict=True)])
        where = np.repeat(first - (stop - size), size)
        where += np.arange(total)
        return np.frombuffer(data, np.uint8)[where].tobytes()  # type: ignore[no-any-return]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(
            a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PlanItems({len(self)} items)"


def any_multi_image(items: Sequence[PlanItem]) -> bool:
    """Whether any of ``items`` has several images (``PlanItem.more``); a ``PlanItems`` knows
    without decoding its items again."""
    if isinstance(items, PlanItems):
        return items.multi_image
    return any(item.more for item in items)


_plan_line = msgspec.json.Decoder(PlanItem)


class _PlanId(msgspec.Struct, gc=False):
    """A plan line's ``id`` alone (``PlanItems.take_ids``; its other fields skipped)."""

    id: Any


_plan_id = msgspec.json.Decoder(_PlanId)
_GATHER_MAX = 2**25  # bytes of line positions ``PlanItems.take`` makes at most (32 MB)
_WINDOW_MAX = 256  # bytes of a line's window in ``PlanItems._lines`` at most


@functools.lru_cache(maxsize=8)
def _window_masks(width: int) -> tuple[Any, Any]:
    """``(keep, fill)`` for ``PlanItems._lines``' windows of ``width`` bytes (a multiple of
    8), as uint64 arrays of ``(width + 1, width // 8)``: row ``s`` keeps the first ``s``
    bytes of a window (``keep``: 0xff bytes) and makes the others spaces (``fill``)."""
    import numpy as np

    inside = np.arange(width) < np.arange(width + 1)[:, None]
    keep = np.where(inside, 0xFF, 0).astype(np.uint8).view(np.uint64)
    fill = np.where(inside, 0, 0x20).astype(np.uint8).view(np.uint64)
    return keep, fill


_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1  # orjson reads integers beyond these as floats


def _plain_plan_item(line: bytes) -> PlanItem | None:
    """The item ``PlanItem.from_json(line)`` gives, decoded by msgspec straight into it (~5x
    faster than orjson's dict and the checks), or None where the two could differ: a line
    msgspec refuses (not JSON, a field ``PlanItem`` does not have, a type it does not take),
    integers beyond 64 bits (orjson reads them as floats), an id that is not a scalar, an
    empty ``more`` (``from_json``: None), ``opts`` values that are not strings."""
    try:
        item = _plan_line.decode(line)
    except msgspec.MsgspecError:
        return None
    item_id, opts = item.id, item.opts
    if (item_id.__class__ is int and not _I64_MIN <= item_id <= _U64_MAX
            or item_id is None or item_id.__class__ is dict or item_id.__class__ is list
            or not _I64_MIN <= item.size <= _U64_MAX or item.more == ()
            or opts is not None and any(v.__class__ is not str for v in opts.values())):
        return None
    return item


def _plan_item(line: bytes) -> PlanItem:
    """``PlanItem.from_json(line)``, by msgspec where that gives the same item."""
    item = _plain_plan_item(line)
    return PlanItem.from_json(line) if item is None else item


class Sizes(Mapping[str, list[int]]):
    """``ShardBuild.sizes`` in 16 bytes per item (four int32: width, height, sent width, sent
    height; -1 where absent) instead of a dict of lists (~190 bytes per item): item index (a
    string, as in JSON) → ``[width, height]``, or ``[width, height, sent width, sent height]``
    for an image downscaled before sending. ``get`` returns a new list each time;
    ``model_dump`` gives the dict it stands for. Its JSON (``json_bytes``, what ``build.json``
    holds) is ``{"int32le": <base64 of the int32 array, little-endian>}``; the dict form of
    earlier files still loads. Raises ``ValueError`` for dims that are not two or four
    integers in 0..2**31-1, or a packed form that is not whole quads of int32 in that range
    (-1: absent)."""

    __slots__ = ("_a", "_n")

    def __init__(self, data: Mapping[str, Sequence[int]] | None = None) -> None:
        self._a = array("i")
        self._n = 0
        for key, dims in (data or {}).items():
            self[key] = dims

    def __setitem__(self, key: str | int, dims: Sequence[int]) -> None:
        i = int(key)
        if i < 0 or len(dims) not in (2, 4) or any(
                d.__class__ is not int or not 0 <= d < 2**31 for d in dims):
            raise ValueError(f"sizes[{key!r}]: {dims!r} is not 2 or 4 sizes in pixels")
        a = self._a
        if len(a) < 4 * i + 4:
            a.extend(array("i", [-1]) * (4 * i + 4 - len(a)))
        if a[4 * i] < 0:
            self._n += 1
        a[4 * i:4 * i + 4] = array("i", dims if len(dims) == 4 else (*dims, -1, -1))

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            k = 4 * int(key)
            if k < 0:
                return default
            a = self._a
            w = a[k]
        except (ValueError, TypeError, IndexError):
            return default
        if w < 0:
            return default
        sw = a[k + 2]
        return [w, a[k + 1]] if sw < 0 else [w, a[k + 1], sw, a[k + 3]]

    def __getitem__(self, key: str) -> list[int]:
        dims = self.get(key)
        if dims is None:
            raise KeyError(key)
        return dims  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None

    def __iter__(self) -> Iterator[str]:
        a = self._a
        return (str(k // 4) for k in range(0, len(a), 4) if a[k] >= 0)

    def __len__(self) -> int:
        return self._n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Sizes({len(self)} items)"

    def quads(self, indices: Any) -> Any:
        """The sizes of items ``indices`` (non-negative ints, e.g. a numpy array) as a numpy
        array of int32 quads ``[width, height, sent width, sent height]``, -1 where absent
        (in one call: the merge asks for thousands at a time)."""
        import numpy as np

        have = np.frombuffer(self._a, np.int32).reshape(-1, 4)
        idx = np.asarray(indices, np.int64)
        out = np.full((len(idx), 4), -1, np.int32)
        known = idx < len(have)
        out[known] = have[idx[known]]
        return out

    def to_dict(self) -> dict[str, list[int]]:
        """The dict it stands for (item index → dims)."""
        return dict(self.items())

    def json_bytes(self) -> bytes:
        """The compact JSON form, ``{"int32le":"<base64>"}`` (4/3 bytes of text per byte of
        the array; reading it back builds no object per item, as the dict form did)."""
        a = self._a
        if sys.byteorder != "little":
            a = array("i", a)
            a.byteswap()
        return b'{"int32le":"' + b64encode(a.tobytes()) + b'"}'

    @classmethod
    def from_packed(cls, text: str | bytes) -> Sizes:
        """``Sizes`` from ``json_bytes``'s base64 text. Raises ``ValueError`` if it is not
        whole quads of int32, each all -1 (absent) or two or four sizes (-1 for the rest)."""
        try:
            raw = b64decode(text, validate=True)
        except (ValueError, TypeError):
            raise ValueError("sizes: int32le is not base64") from None
        if len(raw) % 16:
            raise ValueError("sizes: int32le is not whole quads of int32")
        a = array("i")
        a.frombytes(raw)
        if sys.byteorder != "little":
            a.byteswap()
        n = 0
        for k in range(0, len(a), 4):
            w, h, sw, sh = a[k:k + 4]
            if w < 0 and (w, h, sw, sh) != (-1, -1, -1, -1) or w >= 0 and (
                    h < 0 or min(sw, sh) < -1 or (sw < 0) != (sh < 0)):
                raise ValueError(f"sizes[{k // 4}]: {[w, h, sw, sh]!r} is not 2 or 4 sizes "
                                 "in pixels")
            n += w >= 0
        self = cls()
        self._a, self._n = a, n
        return self

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler
                                     ) -> core_schema.CoreSchema:
        def validate(value: Any) -> Sizes:
            if isinstance(value, Sizes):
                return value
            if not isinstance(value, Mapping):
                raise ValueError("sizes must be an object of item index → sizes")
            if len(value) == 1 and "int32le" in value:  # json_bytes's form
                return cls.from_packed(value["int32le"])
            return cls(value)

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(
                lambda v: v.to_dict(), return_schema=core_schema.dict_schema(
                    core_schema.str_schema(), core_schema.list_schema(core_schema.int_schema()))))


class ShardBuild(BaseModel):
    """The result of building a shard's JSONL: which items became which line, and which could not
    be sent. ``lines[line_index]`` is the index of the item (in the shard's plan) on that line;
    ``errors`` maps an item index (as a string, for JSON) to its ``{"code", "message"}``."""

    lines: list[int]
    errors: dict[str, dict[str, str]] = Field(default_factory=dict)
    # Each line's ``id`` is this prefix + the item id: unique to the round, so the results of
    # a submission found again after a lost answer show whose it is (a provider's recovery).
    id_prefix: str = ""
    bytes: int = 0  # size of the JSONL file
    parts: int = 0
    part_size: int = 0
    transformed: int = 0  # images re-encoded (converted or downscaled) before sending
    build_seconds: float = 0.0
    # item index (as a string) → [width, height] of the source image in pixels, and
    # [width, height, sent width, sent height] when it was downscaled before sending
    # (``Sizes``: 16 bytes per item; JSON: that dict).
    sizes: Sizes = Field(default_factory=Sizes)
    # Multi-image items: item index (as a string) → every image's ``dims`` in order (as in
    # ``sizes``; None for an image that was not read: the item's error names it).
    image_sizes: dict[str, list[list[int] | None]] = Field(default_factory=dict)
    # Multi-skill runs: ``skills[line_index]`` is the index (in ``RunSpec.all_options``) of
    # the skill of that line; empty for a single-skill run.
    skills: list[int] = Field(default_factory=list)
    # The execution that built and submitted these lines: the round's ``batch.json`` names the
    # same one (a provider's ``submit_round`` writes both).
    attempt: str = ""

    def json_bytes(self) -> bytes:
        """The ``build.json`` document as UTF-8: ``model_dump_json()``'s but for ``sizes``
        (last), in ``Sizes.json_bytes``'s compact form, made without a copy of it as a dict."""
        head = self.model_dump_json(exclude={"sizes"}).encode()
        return head[:-1] + b',"sizes":' + self.sizes.json_bytes() + b"}"

    def line_ids(self, items: list[PlanItem] | Any, skills: list[str]) -> set[str]:
        """The ids the round's lines were sent under (``skills``: the run's skill names)."""
        from moonbatch.workers.lines import skill_line_id

        if not self.skills:
            return {self.id_prefix + items[i].key for i in self.lines}
        return {skill_line_id(self.id_prefix + items[i].key, skills[k])
                for i, k in zip(self.lines, self.skills, strict=True)}


class BatchRecord(BaseModel):
    """A submitted round (``batch.json``): recorded as soon as the provider took it, before
    polling. ``batch_id``/``file_id``: the Batch API's ids (None for providers without a
    batch, e.g. fal's requests, recorded in their own ledger). ``recovered``: found again in
    the batch list after its ``mpu-complete`` answer was lost."""

    batch_id: str | None
    file_id: str | None
    submitted_at: float
    lines: int
    recovered: bool = False
    attempt: str = ""  # the submitting execution (its build.json's ``attempt``)


class ShardDone(BaseModel):
    """A shard merged into ``results/``: the counts that roll up into ``run.json``."""

    shard: int
    batch_id: str | None
    batch_status: str | None
    total: int
    ok: int
    error: int
    input_tokens: int = 0
    output_tokens: int = 0
    duplicate_rows: int = 0
    missing_rows: int = 0
    # Result lines the merge could not use: not JSON or without a valid ``line_index``
    # (``malformed``), or carrying another id than the one sent (``id_mismatch``).
    malformed_lines: int = 0
    id_mismatch_lines: int = 0
    # Error rows per error code (``merge.error_codes``); empty in documents written before it.
    errors_by_code: dict[str, int] = Field(default_factory=dict)
    # Batches that may have been submitted twice: an mpu-complete answer was lost and the
    # batch it created could not be told apart from others, so the round was sent again.
    duplicate_batches: int = 0
    polls: int = 0
    requests: int = 0  # provider requests sent (fal), all rounds
    # Rows not bought for this item: served by the result cache or copied from another item
    # of the run with the same image and request (``"cached": true``; workers.cache).
    cached: int = 0
    rounds: int = 1  # batches sent for this shard's items (retries included)
    batch_ids: list[str] = Field(default_factory=list)
    submitted_at: float | None = None
    completed_at: float | None = None
    merged_at: float
