"""A finished run's exports (``--export``, ``RunSpec.exports``), written by ``finish_run`` from
the merged rows once every shard is merged (and again after a ``retry-failed`` pass):

- ``coco``: ``annotations/instances.json`` (``moonbatch.workers.writers.coco``), the default
  of a run with a detect, point or segment skill;
- ``label-studio``: ``annotations/label-studio/tasks.json`` and ``config.xml``
  (``moonbatch.workers.writers.labelstudio``);
- ``yolo``: ``annotations/yolo/data.yaml`` and ``labels/*.txt``
  (``moonbatch.workers.writers.yolo``).

What they share lives here: the rows in plan order with their 1-based position, each row's
skill results with the object (or question) it was asked about, and category numbering.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable, Iterator
from typing import Any

from moonbatch.workers.models import SPATIAL_SKILLS, PlanItem, RunSpec, SkillOptions, id_text
from moonbatch.workers.storage import Store

EXPORTS: dict[str, str] = {
    "coco": "moonbatch.workers.writers.coco",
    "label-studio": "moonbatch.workers.writers.labelstudio",
    "yolo": "moonbatch.workers.writers.yolo",
}
# The skills an export needs at least one of (a run without any would export nothing).
NEEDS: dict[str, tuple[str, ...]] = {"coco": SPATIAL_SKILLS, "yolo": ("detect", "segment")}


def refusal(name: str, skills: Iterable[str]) -> str | None:
    """Why export ``name`` cannot be made of a run with ``skills`` (one line naming the fix),
    or None when it can."""
    needs = NEEDS.get(name)
    skills = list(skills)
    if needs is None or set(needs) & set(skills):
        return None
    why = " (YOLO labels are boxes: points are left out)" if name == "yolo" else ""
    return (f"--export {name} needs a {', '.join(needs[:-1])} or {needs[-1]} skill{why}; the "
            f"run's skills: {', '.join(skills)}: add one (--skill detect --object ...) or "
            "leave the export out")


def write(store: Store, spec: RunSpec, shards: int) -> None:
    """Write every export of ``spec.exports`` (idempotent: the same rows give the same
    files). An export the run's skills cannot make (a spec written by hand) is passed over."""
    skills = [o.skill for o in spec.all_options]
    for name in spec.exports:
        if name in EXPORTS and refusal(name, skills) is None:
            importlib.import_module(EXPORTS[name]).write(store, spec, shards)


@dataclasses.dataclass
class Item:
    """One row of the run, as the exports read it: ``position`` (1-based, in plan order over
    every shard), the merged ``row``, ``key`` (its id as text) and ``opts`` (the item's own
    ``object``/``question``/``length`` from a manifest, or {})."""

    position: int
    row: dict[str, Any]
    key: str
    opts: dict[str, Any]

    @property
    def ok(self) -> bool:
        """The row is ``ok``."""
        return self.row.get("status") == "ok"

    def size(self) -> tuple[int, int] | None:
        """The source image's ``(width, height)`` in pixels, None when unknown."""
        w, h = self.row.get("width"), self.row.get("height")
        return (w, h) if _positive(w) and _positive(h) else None

    def file_name(self, spec: RunSpec) -> str:
        """The image's name: the key relative to INPUT for a prefix input, the row's
        ``source`` otherwise (the id when it has none)."""
        return self.key if spec.input_kind == "prefix" else self.row.get("source") or self.key

    def parts(self, spec: RunSpec, skills: Iterable[str] | None = None
              ) -> Iterator[tuple[SkillOptions, str, dict[str, Any]]]:
        """``(options, object or question, result)`` for each skill of the run (those in
        ``skills`` only, when given) whose result is in the row: the object (detect, point,
        segment) or question (query) is the item's own where its manifest gave one."""
        result = self.row.get("result")
        for opts in spec.all_options:
            if skills is not None and opts.skill not in skills:
                continue
            part = result.get(opts.skill) if spec.multi_skill and isinstance(result, dict) \
                else result
            if not isinstance(part, dict):
                continue
            field = "question" if opts.skill == "query" else "object"
            own = self.opts.get(field)
            yield opts, str(own) if own else (getattr(opts, field, None) or ""), part


def items(store: Store, spec: RunSpec, shards: int) -> Iterator[Item]:
    """Every merged row of the run in plan order, a shard at a time, the next shards' results
    and plan files read meanwhile (``writers.read_results``; shards not merged are passed
    over; their positions are not counted). Raises ``StorageError`` and the format's decoding
    errors (a damaged results file), at the shard's place."""
    from moonbatch.workers import writers

    position = 0
    for got in writers.read_results(store, spec.output_format, shards, plans=True):
        if not got.merged:
            continue
        rows = got.rows()
        own = _item_opts(got.plan)
        for row in rows:
            position += 1
            key = id_text(row.get("id"))
            yield Item(position, row, key, own.get(key, {}))


class Categories:
    """Category ids by (skill, name), from ``first`` (COCO 1, YOLO 0) in first-met order; the
    run's own objects (of ``skills``) come first. ``by_name``: one id per name whatever the
    skill (YOLO's classes)."""

    def __init__(self, spec: RunSpec, skills: Iterable[str], first: int = 1,
                 by_name: bool = False) -> None:
        self.ids: dict[tuple[str, str], int] = {}
        self.first, self.by_name, self.skills = first, by_name, tuple(skills)
        for opts in spec.all_options:
            if opts.skill in self.skills and opts.object:
                self.id(opts.skill, opts.object)

    def id(self, skill: str, name: str) -> int:
        """The id of (skill, name), given a new one on first sight."""
        key = ("", name) if self.by_name else (skill, name)
        if key not in self.ids:
            self.ids[key] = len(self.ids) + self.first
        return self.ids[key]


def _item_opts(plan: bytes | None) -> dict[str, dict[str, Any]]:
    """``{item key: opts}`` for the items of a shard's plan file (its bytes; None: the file is
    gone) with their own options (manifest columns); empty when none has any."""
    out = {}
    for line in (plan or b"").splitlines():
        if b'"opts"' in line:  # most plans have none: skip parsing the rest
            item = PlanItem.from_json(line)
            if item.opts:
                out[item.key] = dict(item.opts)
    return out


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
