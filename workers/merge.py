"""Merge: a round's result lines → one output row per shard item. No provider; no store I/O
(rows go to a ``RowSpool``, a local temporary file, so that memory does not grow with a shard).

Result lines (``moonbatch.workers.providers``: the Batch API's output line shape, whatever the provider)
come in any order, so they are keyed on ``line_index`` (seed 002, "Output format"), and the
``id`` on each is cross-checked. Every item of the shard ends in exactly one row: its result,
its own error, the pre-send error recorded by the build, the round's error if the whole
submission failed, or ``missing_result`` if the provider returned nothing for its line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import msgspec
import orjson
from msgspec import UNSET, UnsetType

from moonbatch.workers import cache
from moonbatch.workers.models import PlanItem, ShardBuild, any_multi_image, id_text
from moonbatch.workers.rowspool import RowSpool, ShardRows


@dataclasses.dataclass
class MergeStats:
    """Counts of one shard's merge: rows ``ok`` / ``error``, token ``usage`` summed over ok rows,
    result lines that were ``duplicate`` (same line_index twice), ``malformed`` (not JSON or no
    valid line_index), ``id_mismatch`` (id differs from the one sent), and items ``missing``."""

    ok: int = 0
    error: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    duplicate: int = 0
    malformed: int = 0
    id_mismatch: int = 0
    missing: int = 0


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: merging allocates ~10 objects per row, none of them cyclic, and
    the collector's repeated scans of them would cost a third of the merge."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def merge_round(items: Sequence[PlanItem], build: ShardBuild, result_lines: Iterable[Any],
                source_of: Callable[[PlanItem], str], *, batch_error: dict[str, str] | None = None,
                todo: Sequence[int] | None = None,
                retryable_codes: frozenset[str] = frozenset(), skills: Sequence[str] = ()
                ) -> tuple[RowSpool, MergeStats, list[int]]:
    """Merge one round of a shard: ``(rows, stats, retryable)``, ``rows`` a ``RowSpool`` (a
    mapping item index → row bytes, kept in a temporary file: the caller closes it).

    ``result_lines`` are result lines, each the bytes of one JSON line (a line of a result
    file; blank ones are skipped) or the parsed line (a dict); anything else (e.g. None, or
    bytes that are not JSON) counts as malformed. ``todo`` are the item indices this round was for (default:
    every item); each gets exactly one row. ``retryable`` lists the items whose error code is
    in ``retryable_codes`` (the provider's transient per-item errors) that a later round may
    fix. ``source_of(item)`` gives a row's ``source``. Rows: ``{"id", "source", "status": "ok",
    "result", "usage", "width", "height"}`` or ``{"id", "source", "status": "error", "error":
    {"code", "message"}, "width", "height"}``, with ``"sent_width"``, ``"sent_height"`` after
    them where the image was downscaled before sending: sizes in pixels from the result
    line's ``dims`` or the build's ``sizes`` (None where the image could not be read);
    ``batch_error`` (``{"code", "message"}``) marks every sent line of a failed
    batch. A multi-image item's row adds ``images`` (``_with_images``). Each result line
    is turned into its row at once and written to the spool. Of two rows for one
    ``line_index`` the first wins.

    A multi-skill round (``build.skills`` set; ``skills``: the run's skill names) has a line
    per item and skill; see ``_merge_multi`` for its rows.
    """
    rows = RowSpool(len(items))
    try:
        if build.skills:
            stats, retryable = _merge_multi(items, build, result_lines, source_of, skills, rows,
                                            batch_error=batch_error, todo=todo,
                                            retryable_codes=retryable_codes)
        else:
            stats, retryable = _merge_single(items, build, result_lines, source_of, rows,
                                             batch_error=batch_error, todo=todo,
                                             retryable_codes=retryable_codes)
            if todo is not None and len(rows) > len(todo):  # lines of items not in the round
                rows.keep_only(todo)
    except BaseException:
        rows.close()
        raise
    return rows, stats, retryable


class _Usage(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """A result line's ``usage`` as the fast path takes it: token counts (numbers), nothing
    else; written back as it came (an absent count stays absent)."""

    input_tokens: int | float | UnsetType = UNSET
    output_tokens: int | float | UnsetType = UNSET


class _Line(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """A result line as the fast path takes it (``_decode_line``): the Batch API's fields and
    ``dims``, typed; any other field or type is the dict path's."""

    line_index: int
    id: str | None = None
    status: str | None = None
    result: Any = None
    usage: _Usage | None = None
    error: Any = None
    dims: list[int] | None = None


class _OkRow(msgspec.Struct, gc=False):
    """An ok row as ``_merge_single`` writes it, fields in the dict path's order (unset ones
    are left out)."""

    id: Any
    source: str
    status: str
    result: Any
    usage: _Usage
    width: Any
    height: Any
    sent_width: Any = UNSET
    sent_height: Any = UNSET
    images: Any = UNSET


_decode_line = msgspec.json.Decoder(_Line).decode
_encode_into = msgspec.json.Encoder().encode_into
_NO_USAGE = _Usage()
_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1  # orjson reads integers beyond these as floats
# A line shorter than this can hold neither a number orjson reads as infinity (309 digits or
# more) nor a result nested deep enough (254 levels) that orjson would refuse to write it.
_SHORT_LINE = 340
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_FLUSH = 1024  # rows written to the spool at a time


def _flat(value: Any) -> bool:
    """True for a result without numbers or nesting: a string, or an object of strings (a
    caption, an answer)."""
    if value.__class__ is dict:
        for v in value.values():
            if v.__class__ is not str:
                return False
        return True
    return value.__class__ is str


def _plain(line: bytes) -> bool:
    """True if ``line`` (a long result line) has no number of 309 digits or more and fewer
    than 250 brackets (so no value nested 250 deep): msgspec and orjson read it alike."""
    return (line.count(b"[") + line.count(b"{") < 250
            and b"0" * 309 not in line.translate(_DIGITS))


def _merge_single(items: Sequence[PlanItem], build: ShardBuild, result_lines: Iterable[Any],
                  source_of: Callable[[PlanItem], str], rows: RowSpool, *,
                  batch_error: dict[str, str] | None, todo: Sequence[int] | None,
                  retryable_codes: frozenset[str]) -> tuple[MergeStats, list[int]]:
    """``merge_round`` for a single-skill round: writes the rows into ``rows`` (every item of
    ``todo``).

    A result line given as bytes takes the fast path when it is an ok line of the usual shape
    (msgspec decodes it into ``_Line``, ``_OkRow`` writes its row); any other line (an
    error, an odd field or type, not JSON) is parsed with orjson and takes the dict path, so
    that every shape gets the row it always got (``tests/test_merge.py``: the two paths agree
    on random and odd lines)."""
    stats = MergeStats()
    lines = build.lines
    n_lines = len(lines)
    # True where the item has its row (in ``rows``): the duplicate check stays a list lookup.
    slots: list[bool | None] = [None] * len(items)
    # Rows not written to the spool yet: packed in ``pending``, item ``pending_i[k]``'s row
    # ending at ``pending_end[k]`` (no bytes object per row: the encoder appends to it).
    pending = bytearray()
    pending_i: list[int] = []
    pending_end: list[int] = []
    retryable: list[int] = []
    dumps, loads, decode, encode_into = orjson.dumps, orjson.loads, _decode_line, _encode_into
    ok = in_tok = out_tok = error = duplicate = malformed = mismatch = 0
    prefix = build.id_prefix
    sizes = build.sizes
    has_sizes = bool(sizes)
    # Multi-image items add ``images``: a per-row check only when the shard has one.
    multi = any_multi_image(items)
    # The hot loop: one parse and one serialisation per row, the checks inlined, counters in
    # locals (measured: ``bench.merge``).
    with _gc_paused():
        for res in () if batch_error else result_lines:
            r = None  # the line as the fast path takes it, else None: the dict path
            if res.__class__ is bytes:
                try:
                    r = decode(res)
                except msgspec.MsgspecError:
                    pass
                if r is not None and r.status == "ok" and r.error is None and (
                        len(res) < _SHORT_LINE or _flat(r.result) or _plain(res)):
                    usage = r.usage
                    if usage is None:
                        usage = _NO_USAGE
                    it, ot = usage.input_tokens, usage.output_tokens
                    dims = r.dims
                    if (it.__class__ is int and not _I64_MIN <= it <= _U64_MAX
                            or ot.__class__ is int and not _I64_MIN <= ot <= _U64_MAX
                            or dims and (max(dims) > _U64_MAX or min(dims) < _I64_MIN)):
                        r = None
                else:
                    r = None
                if r is None:
                    try:
                        res = loads(res)
                    except orjson.JSONDecodeError:
                        if res.strip():  # blank lines are no lines
                            malformed += 1
                        continue
            if r is not None:
                li, sent_id = r.line_index, r.id
            else:
                try:
                    li = res["line_index"]
                except (KeyError, TypeError, IndexError):
                    malformed += 1
                    continue
                sent_id = None
            if li.__class__ is not int or not 0 <= li < n_lines:
                malformed += 1
                continue
            i = lines[li]
            if slots[i] is not None:
                duplicate += 1
                continue
            item = items[i]
            item_id = item.id
            if r is None:
                sent_id = res.get("id")
            if sent_id is not None and sent_id != prefix + (
                    item_id if item_id.__class__ is str else id_text(item_id)):
                mismatch += 1
            if r is not None:  # the fast path: the row encoded straight into ``pending``
                if not dims and has_sizes:
                    dims = sizes.get(str(i))
                if dims and len(dims) >= 2:
                    w, h = dims[0], dims[1]
                    sw, sh = (dims[2], dims[3]) if len(dims) >= 4 else (UNSET, UNSET)
                else:
                    w = h = None
                    sw = sh = UNSET
                encode_into(_OkRow(
                    item_id, source_of(item), "ok", r.result, usage, w, h, sw, sh,
                    _with_images({}, item, i, build, source_of).get("images", UNSET)
                    if multi else UNSET), pending, -1)
                ok += 1
                if it is not UNSET:
                    in_tok += it
                if ot is not UNSET:
                    out_tok += ot
            else:
                dims = res.get("dims") or (sizes.get(str(i)) if has_sizes else None)
                if res.get("status") == "ok":
                    usage = res.get("usage")
                    if usage.__class__ is not dict:  # null or not an object: no usage
                        usage = {}
                    row = {"id": item_id, "source": source_of(item), "status": "ok",
                           "result": res.get("result"), "usage": usage}
                else:
                    err = _error(res.get("error"))
                    row = {"id": item_id, "source": source_of(item), "status": "error",
                           "error": err}
                _with_size(row, dims)
                if multi:
                    _with_images(row, item, i, build, source_of)
                try:
                    pending += dumps(row)
                except orjson.JSONEncodeError as exc:  # e.g. a result nested deeper than 255
                    row = _unwritable(row, exc)
                    pending += dumps(row)
                if row["status"] == "ok":
                    ok += 1
                    t = usage.get("input_tokens")
                    if t.__class__ is int or t.__class__ is float:
                        in_tok += t
                    t = usage.get("output_tokens")
                    if t.__class__ is int or t.__class__ is float:
                        out_tok += t
                else:
                    error += 1
                    if row["error"]["code"] in retryable_codes:
                        retryable.append(i)
            # Rows go to the spool by the thousand: no bytes object held per row.
            pending_end.append(len(pending))
            pending_i.append(i)
            slots[i] = True
            if len(pending_i) >= _FLUSH:
                rows.add_packed(pending_i, pending_end, pending)
                pending_i.clear()
                pending_end.clear()
                del pending[:]
        rows.add_packed(pending_i, pending_end, pending)
        del pending, pending_i, pending_end
        stats.ok, stats.input_tokens, stats.output_tokens = ok, int(in_tok), int(out_tok)
        stats.error, stats.duplicate, stats.malformed, stats.id_mismatch = (
            error, duplicate, malformed, mismatch)
        wanted = range(len(items)) if todo is None else todo
        sent: set[int] | None = None
        line_of: dict[int, int] | None = None
        for i in wanted:
            if slots[i] is not None:
                continue
            item = items[i]
            if sent is None:
                sent = set(lines)
            if (pre := build.errors.get(str(i))) is not None:
                error = pre
            elif i not in sent:  # must not be lost
                error = {"code": "not_sent", "message": "item was not included in the batch"}
            elif batch_error is not None:
                error = batch_error
            else:
                stats.missing += 1
                if line_of is None:
                    line_of = {k: li for li, k in enumerate(lines)}
                error = {"code": "missing_result",
                         "message": f"the batch returned no result for line_index {line_of[i]}"}
            stats.error += 1
            slots[i] = rows.add(i, dumps(_with_images(_with_size(
                {"id": item.id, "source": source_of(item), "status": "error",
                 "error": error}, sizes.get(str(i))), item, i, build, source_of)))
    return stats, retryable


def _merge_multi(items: Sequence[PlanItem], build: ShardBuild, result_lines: Iterable[Any],
                 source_of: Callable[[PlanItem], str], skills: Sequence[str],
                 rows: MutableMapping[int, bytes], *, batch_error: dict[str, str] | None,
                 todo: Sequence[int] | None, retryable_codes: frozenset[str]
                 ) -> tuple[MergeStats, list[int]]:
    """``merge_round`` for a multi-skill round, its rows written into ``rows``: one row per
    item with ``result`` =
    ``{<skill>: <that skill's result, or None if it failed>}`` and ``usage`` summed over its
    lines. The row is ``ok`` when every skill is; otherwise ``error`` holds the first failed
    skill's ``{"code", "message", "skill"}`` (the other skills' results stay in ``result``),
    and the item is retryable when any failed skill's code is in ``retryable_codes`` (a retry
    sends every skill of the item again)."""
    from moonbatch.workers.lines import skill_line_id

    stats = MergeStats()
    lines, line_skills, n_lines, k = build.lines, build.skills, len(build.lines), len(skills)
    outcomes: dict[int, list[Any]] = {}
    dims_of: dict[int, Any] = {}
    for res in () if batch_error else result_lines:
        if res.__class__ is bytes:  # a line's JSON text: parsed here (no fast path)
            try:
                res = orjson.loads(res)
            except orjson.JSONDecodeError:
                if res.strip():  # blank lines are no lines
                    stats.malformed += 1
                continue
        try:
            li = res["line_index"]
        except (KeyError, TypeError, IndexError):
            stats.malformed += 1
            continue
        if li.__class__ is not int or not 0 <= li < n_lines:
            stats.malformed += 1
            continue
        i, s = lines[li], line_skills[li]
        slot = outcomes.setdefault(i, [None] * k)
        if slot[s] is not None:
            stats.duplicate += 1
            continue
        sent_id = res.get("id")
        if sent_id is not None and sent_id != skill_line_id(build.id_prefix + items[i].key,
                                                            skills[s]):
            stats.id_mismatch += 1
        if res.get("dims"):
            dims_of[i] = res["dims"]
        if res.get("status") == "ok":
            usage = res.get("usage")
            slot[s] = (True, res.get("result"), usage if usage.__class__ is dict else {})
        else:
            slot[s] = (False, _error(res.get("error")))
    retryable: list[int] = []
    sent = set(lines)
    for i in range(len(items)) if todo is None else todo:
        item = items[i]
        dims = dims_of.get(i) or build.sizes.get(str(i))
        row: dict[str, Any] = {"id": item.id, "source": source_of(item)}
        if (pre := build.errors.get(str(i))) is not None:
            error: dict[str, str] | None = pre
        elif i not in sent:
            error = {"code": "not_sent", "message": "item was not included in the batch"}
        elif batch_error is not None:
            error = batch_error
        else:
            error = None
        if error is not None:
            stats.error += 1
            rows[i] = orjson.dumps(_with_images(_with_size(
                {**row, "status": "error", "error": error}, dims), item, i, build, source_of))
            continue
        slot = outcomes.get(i) or [None] * k
        results: dict[str, Any] = {}
        usage = {"input_tokens": 0, "output_tokens": 0}
        first_error = None
        for s, name in enumerate(skills):
            outcome = slot[s]
            if outcome is None:
                stats.missing += 1
                outcome = (False, {"code": "missing_result",
                                   "message": f"the batch returned no result for {name}"})
            if outcome[0]:
                results[name] = outcome[1]
                for t in usage:
                    usage[t] += _tokens(outcome[2].get(t))
            else:
                results[name] = None
                if first_error is None:
                    first_error = {**outcome[1], "skill": name}
                if outcome[1]["code"] in retryable_codes and i not in retryable:
                    retryable.append(i)
        stats.input_tokens += usage["input_tokens"]
        stats.output_tokens += usage["output_tokens"]
        if first_error is None:
            stats.ok += 1
            row.update(status="ok", result=results, usage=usage)
        else:
            stats.error += 1
            row.update(status="error", error=first_error, result=results, usage=usage)
        _with_images(_with_size(row, dims), item, i, build, source_of)
        try:
            rows[i] = orjson.dumps(row)
        except orjson.JSONEncodeError as exc:  # e.g. a result nested deeper than 255
            if row["status"] == "ok":
                stats.ok -= 1
                stats.error += 1
            rows[i] = orjson.dumps(_unwritable(row, exc))
    return stats, retryable


def _error(value: Any) -> dict[str, str]:
    """A result line's ``error`` as a row keeps it: ``{"code", "message"}`` strings, whatever
    the line held (an object with other fields, a bare string, null: be liberal in what is
    accepted, every row still gets a code)."""
    if value.__class__ is dict:
        return {"code": str(value.get("code") or "unknown_error"),
                "message": str(value.get("message") or "")}
    return {"code": "unknown_error", "message": "" if value is None else str(value)[:1000]}


def _tokens(value: Any) -> int:
    """A usage field as a token count: a non-bool number, else 0."""
    return int(value) if value.__class__ is int or value.__class__ is float else 0


def _unwritable(row: dict[str, Any], exc: Exception) -> dict[str, Any]:
    """An error row in place of ``row`` when its result cannot be serialised (orjson limits
    nesting to 255 levels): the item gets its row, the shard goes on."""
    keep = {k: row[k] for k in ("id", "source", "width", "height", "sent_width", "sent_height",
                                "images") if k in row}
    return {"id": keep.pop("id"), "source": keep.pop("source"), "status": "error",
            "error": {"code": "malformed_result",
                      "message": f"the result could not be written as JSON: {exc}"[:500]},
            **keep}


def fill_cached(items: Sequence[PlanItem], rows: MutableMapping[int, bytes],
                doc: Mapping[str, Any] | None, source_of: Callable[[PlanItem], str], *,
                rnd: int, originals: Mapping[str, bytes] | None = None) -> int:
    """Add to a round's ``rows`` (item index → row bytes, from ``merge.merge_round``) the rows
    ``doc`` (the shard's round-0 ``cache.json``) serves: round 0's hits and its waits (copies
    of other shards' items, from ``originals``: item index → that item's row), and in every
    round the copies of the items merged in it (a copy that was itself merged keeps its own
    row). Returns how many rows were added. Pure."""
    if not doc:
        return 0
    added = 0
    if rnd == 0:
        entries = doc.get("entries") or {}
        for i, key in (doc.get("hits") or {}).items():
            idx = int(i)
            if idx not in rows:
                rows[idx] = cache.hit_row(items[idx].id, source_of(items[idx]), entries[key])
                added += 1
        for i, row in (originals or {}).items():
            idx = int(i)
            if idx not in rows:
                of = orjson.loads(row).get("id")
                rows[idx] = cache.copy_row(row, items[idx].id, source_of(items[idx]), of)
                added += 1
    merged = set(rows)
    for c, o in (doc.get("copies") or {}).items():
        idx = int(c)
        if o in merged and idx not in merged:
            rows[idx] = cache.copy_row(rows[o], items[idx].id, source_of(items[idx]), items[o].id)
            added += 1
    return added


def _with_size(row: dict[str, Any], dims: Any) -> dict[str, Any]:
    """``row`` with its top-level ``width``/``height`` (and ``sent_width``/``sent_height``
    for a downscaled image) from ``dims`` (``PreparedImage.dims()``; None: unknown)."""
    if dims.__class__ is list and len(dims) >= 2:
        row["width"], row["height"] = dims[0], dims[1]
        if len(dims) >= 4:
            row["sent_width"], row["sent_height"] = dims[2], dims[3]
    else:
        row["width"] = row["height"] = None
    return row


def _with_images(row: dict[str, Any], item: PlanItem, index: int, build: ShardBuild,
                 source_of: Callable[[PlanItem], str]) -> dict[str, Any]:
    """``row`` with ``images`` = ``[{"source", "width", "height"}, ...]`` (every image of a
    multi-image item, in order; sizes of the source images in pixels, None where the image
    could not be read) when ``item`` has several images (``PlanItem.more``); as it is
    otherwise. The row's own ``source``, ``width`` and ``height`` stay its first image's."""
    if not item.more:
        return row
    dims = build.image_sizes.get(str(index)) or []
    images = []
    for k, part in enumerate(item.parts()):
        d = dims[k] if k < len(dims) else None
        ok = d.__class__ is list and len(d) >= 2
        images.append({"source": source_of(part), "width": d[0] if ok else None,
                       "height": d[1] if ok else None})
    row["images"] = images
    return row


def merge_rows(items: Sequence[PlanItem], build: ShardBuild, result_lines: Iterable[Any],
               source_of: Callable[[PlanItem], str], *,
               batch_error: dict[str, str] | None = None) -> tuple[bytes, MergeStats]:
    """Merge a single-round shard into its results JSONL (rows in plan order) and its stats;
    see ``merge_round``."""
    rows, stats, _ = merge_round(items, build, result_lines, source_of, batch_error=batch_error)
    with rows:
        return join_rows(list(rows.values())), stats


def join_rows(rows: Sequence[bytes]) -> bytes:
    """Rows → JSONL bytes (empty for no rows)."""
    # One copy: a trailing empty row gives the last newline (``join(...) + b"\n"`` would copy
    # the whole output a second time, at the moment the rows are held too).
    return b"\n".join(itertools.chain(rows, (b"",))) if rows else b""


def error_codes(rows: Iterable[bytes]) -> dict[str, int]:
    """Final rows (``compose``'s) → the number of error rows per error code, by code
    (``"unknown"`` for an error row without a readable code); ok rows are not counted."""
    codes: dict[str, int] = {}
    for row in rows:
        if b'"status":"ok","result":' in row:  # compose's ok rows: no parse needed
            continue
        try:
            doc = orjson.loads(row)
        except orjson.JSONDecodeError:
            doc = {}
        if isinstance(doc, dict) and doc.get("status") == "ok":
            continue
        error = doc.get("error") if isinstance(doc, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        code = code if isinstance(code, str) and code else "unknown"
        codes[code] = codes.get(code, 0) + 1
    return dict(sorted(codes.items()))


def encode_round(rows: Mapping[int, bytes]) -> bytes:
    """A round's rows as stored between rounds: ``<item index>\t<row>`` per line, in item
    order (``rowspool.put_round_rows`` stores a spool's without joining them in memory)."""
    return b"".join(b"%d\t%s\n" % (i, row) for i, row in sorted(rows.items()))


def compose(n_items: int, rounds: Iterable[Iterable[bytes]]) -> tuple[ShardRows, int]:
    """Final rows of a shard from its rounds' stored rows (each round: the lines of its
    ``encode_round`` bytes, e.g. ``rowspool.iter_stored_lines``), later rounds overriding
    earlier ones: ``(rows in plan order, number of ok rows)``; the rows are a ``ShardRows``
    (a temporary JSONL file: the caller closes it).

    Raises ``ValueError`` naming the first item without a row (a bug: every round writes a row
    for each of its items).
    """
    with RowSpool(n_items) as final:
        for lines in rounds:
            for line in lines:
                if line:
                    i, _, row = line.partition(b"\t")
                    final[int(i)] = row
        if len(final) < n_items:
            missing = [i for i in range(n_items) if i not in final]
            raise ValueError(f"item {missing[0]} of the shard has no row ({len(missing)} "
                             "missing)")
        out = ShardRows()
        ok = 0
        try:
            for row in final.values():  # item order: every item has its row
                # Rows are serialised id, source, status, result/error in that order and
                # quotes inside strings are escaped, so this marks exactly the ok rows.
                if b'"status":"ok","result":' in row:
                    ok += 1
                out.append(row)
        except BaseException:
            out.close()
            raise
    return out, ok
