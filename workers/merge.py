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
import functools
import gc
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from itertools import islice, repeat
from typing import Annotated, Any, Literal

import msgspec
import orjson
from msgspec import UNSET, UnsetType

from moonbatch.workers import cache
from moonbatch.workers.models import PlanItem, PlanItems, ShardBuild, Sizes, any_multi_image, id_text
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
                retryable_codes: frozenset[str] = frozenset(), skills: Sequence[str] = (),
                key_sources: Callable[[list[Any]], list[str]] | None = None
                ) -> tuple[RowSpool, MergeStats, list[int]]:
    """Merge one round of a shard: ``(rows, stats, retryable)``, ``rows`` a ``RowSpool`` (a
    mapping item index → row bytes, kept in a temporary file: the caller closes it).

    ``result_lines`` are result lines, each given parsed (a dict) or as JSONL text: bytes of
    one or more whole lines (of a result file, e.g. a piece of it cut after a newline; blank
    lines are skipped); anything else (e.g. None), or a line that is not JSON, counts as
    malformed. ``todo`` are the item indices this round was for (default:
    every item); each gets exactly one row. ``retryable`` lists the items whose error code is
    in ``retryable_codes`` (the provider's transient per-item errors) that a later round may
    fix. ``source_of(item)`` gives a row's ``source``; ``key_sources(ids)``, when given, the
    same for many items that have neither ``ref`` nor ``more`` from their ids alone, in one
    call (``[source_of(PlanItem(id, 0)) for id in ids]``, e.g. ``ItemFetcher.key_sources``):
    then only the ids of a keys-only plan's items (``PlanItems.keys_only``) are decoded.
    Rows: ``{"id", "source", "status": "ok", "result", "usage", "width", "height"}`` or
    ``{"id", "source", "status": "error", "error": {"code", "message"}, "width", "height"}``,
    with ``"sent_width"``, ``"sent_height"`` after
    them where the image was downscaled before sending: sizes in pixels from the result
    line's ``dims`` or the build's ``sizes`` (None where the image could not be read);
    ``batch_error`` (``{"code", "message"}``) marks every sent line of a failed
    batch. A multi-image item's row adds ``images`` (``_with_images``). Each result line
    is turned into its row as it comes (text: a piece at a time) and written to the spool. Of
    two rows for one ``line_index`` the first wins.

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
                                             retryable_codes=retryable_codes,
                                             key_sources=key_sources)
            if todo is not None and len(rows) > len(todo):  # lines of items not in the round
                rows.keep_only(todo)
    except BaseException:
        rows.close()
        raise
    return rows, stats, retryable


_Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # orjson reads it as an int too


def _json_type(depth: int) -> Any:
    """The type of any JSON value nested at most ``depth`` levels deep whose integers are
    ``_Int``: what msgspec decodes into the value orjson reads, and writes as orjson would
    (orjson refuses to write a value nested 255 deep; the dict path makes that an error row)."""
    value: Any = str | _Int | float | bool | None
    for _ in range(depth):
        value = str | _Int | float | bool | None | list[value] | dict[str, value]
    return value


# Deeper results take the dict path. msgspec's decoder holds the type unshared: 2**depth
# nodes (a depth of 16 cost 8 MB at import, measured: bench.probe imports-worker).
# Not ``msgspec.Raw`` (the sender's text, written verbatim): measured 2026-12-03 it saves
# ~0.13 us/row of decoding and ~0.05 of encoding, but rows must stay compact (the sender's
# spaces squeezed out: msgspec.json.format and a re-split, ~0.26 us/row) and the dict path's
# verdicts kept, which text alone does not give (numbers orjson refuses or reads as floats:
# 19+ digit runs, 3-digit exponents; nesting beyond orjson's 255; invalid UTF-8): numpy scans
# for those cost as much again: the whole merge came out no faster (CPU time on bench merge's
# shard, alternating runs: 3.90-3.96 us/row with Raw and the scans, 3.38-3.73 without).
_Result = _json_type(8)


class _Usage(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """A result line's ``usage`` as the bulk path takes it: integer token counts, nothing
    else; written back as it came (an absent count stays absent)."""

    input_tokens: _Int | UnsetType = UNSET
    output_tokens: _Int | UnsetType = UNSET


class _Line(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """A result line as the bulk path decodes it: the Batch API's fields and ``dims``, typed
    (``_Result``, ``_Usage``); a line with any other field or type sends the lines around it
    to the dict path."""

    line_index: _Int
    id: str | None = None
    status: Literal["ok", "error"] | None = None  # no new string per line
    result: _Result = None
    usage: _Usage | None = None
    error: Any = None
    dims: list[_Int] | None = None


class _OkRow(msgspec.Struct, gc=False):
    """An ok row as the bulk path writes it, fields in the dict path's order (unset ones are
    left out)."""

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


_decode_lines = msgspec.json.Decoder(_Line).decode_lines
_encode_lines = msgspec.json.Encoder().encode_lines
_NO_USAGE = _Usage()
_NO_LINE = 2**31 - 1  # the bulk path's "no line of the piece yet" (above any position)
_FLUSH = 1024  # dict-path rows written to the spool at a time
_PIECE = 2**20  # bytes of result text decoded at a time (their lines are held decoded at once)
# A piece of at most this many lines takes the dict path, line by line: the bulk path's
# fixed cost (a dozen numpy calls) is that of ~10 lines of the dict path.
_SMALL = 16


def _one_member(result: Any) -> str | None:
    """The member's name when ``result`` is an object of one string member whose name is a
    plain ASCII identifier (a caption's ``{"caption": ...}``, a query's ``{"answer": ...}``
    without reasoning); else None."""
    if result.__class__ is not dict or len(result) != 1:
        return None
    ((name, value),) = result.items()
    return name if value.__class__ is str and name.isascii() and name.isidentifier() else None


@functools.lru_cache(maxsize=4)
def _one_member_lines(name: str) -> Callable[[Any], list[Any]]:
    """``_decode_lines`` for lines whose ``result`` (if any) is ``{name: <a string>}``: the
    result decoded into a struct of that one field (written as the same JSON object), ~0.25
    us/line faster than a dict; raises ``msgspec.MsgspecError`` for a line with a result of
    any other shape (and where ``_decode_lines`` does: the same ``_Line`` otherwise)."""
    one = msgspec.defstruct("_OneMember", [("value", str)], rename={"value": name},
                            forbid_unknown_fields=True, gc=False)
    fields: list[Any] = []
    for f in msgspec.structs.fields(_Line):  # _Line's, in its order, but for the result's type
        kind = one | None if f.name == "result" else f.type
        fields.append((f.name, kind) if f.default is msgspec.NODEFAULT else (f.name, kind,
                                                                             f.default))
    line = msgspec.defstruct("_LineOfOne", fields, forbid_unknown_fields=True, gc=False)
    return msgspec.json.Decoder(line).decode_lines


#: ``_loads_line``'s answer for a blank line: no line at all (not a malformed one).
_BLANK = object()


def _loads_line(line: bytes) -> Any:
    """One result line's JSON value; ``_BLANK`` for a blank line, None for text that is not
    JSON (which ``_line_index`` then finds malformed)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None if line.strip() else _BLANK


def _line_index(res: Any, n_lines: int) -> int:
    """A parsed result line's ``line_index``, or -1 if it has none in ``range(n_lines)``."""
    try:
        li = res["line_index"]
    except (KeyError, TypeError, IndexError):
        return -1
    if li.__class__ is not int or not 0 <= li < n_lines:
        return -1
    return li  # type: ignore[no-any-return]


def _merge_single(items: Sequence[PlanItem], build: ShardBuild, result_lines: Iterable[Any],
                  source_of: Callable[[PlanItem], str], rows: RowSpool, *,
                  batch_error: dict[str, str] | None, todo: Sequence[int] | None,
                  retryable_codes: frozenset[str],
                  key_sources: Callable[[list[Any]], list[str]] | None = None
                  ) -> tuple[MergeStats, list[int]]:
    """``merge_round`` for a single-skill round: writes the rows into ``rows`` (every item of
    ``todo``).

    Result text (bytes of whole lines) takes the bulk path (``_Single.add_text``): its usual
    lines are decoded, checked and written a piece of text at a time; a parsed line (a dict),
    and any line of the text the bulk path does not take, takes the dict path, one line at a
    time, so that every shape gets the row it always got (``tests/test_merge.py``: the two
    paths agree on random and odd lines)."""
    merge = _Single(items, build, source_of, rows, retryable_codes, key_sources)
    with _gc_paused():
        if not batch_error:
            for res in result_lines:
                if res.__class__ is bytes:
                    merge.add_text(res)
                else:
                    merge.add_parsed(res)
        return merge.finish(todo, batch_error)


class _Single:
    """One single-skill merge under way: its counts, which items have their row (``taken``),
    the dict path's rows not written yet (``pending``)."""

    def __init__(self, items: Sequence[PlanItem], build: ShardBuild,
                 source_of: Callable[[PlanItem], str], rows: RowSpool,
                 retryable_codes: frozenset[str],
                 key_sources: Callable[[list[Any]], list[str]] | None = None) -> None:
        self.items, self.build, self.source_of, self.rows = items, build, source_of, rows
        # The bulk path's items by their ids alone (no PlanItem decoded) where that names them.
        self.key_sources = key_sources if isinstance(items, PlanItems) and items.keys_only \
            else None
        self.retryable_codes = retryable_codes
        self.lines = build.lines
        self.n_lines = len(build.lines)
        self.prefix = build.id_prefix
        self.sizes = build.sizes
        self.has_sizes = bool(build.sizes)
        # Multi-image items add ``images``: a per-row step only when the shard has one.
        self.multi = any_multi_image(items)
        self.taken = bytearray(len(items))  # 1 where the item has its row (in ``rows``)
        self.np_lines: Any = None  # numpy arrays, made on the bulk path's first use
        self.np_taken: Any = None
        self.np_first: Any = None
        # The bulk path's decoder: ``_decode_lines``, or, once a piece showed results of one
        # string member (``_one_member``), ``_one_member_lines`` for that member's name, until
        # a piece it does not read.
        self.decode_lines: Callable[[Any], list[_Line]] = _decode_lines
        self.one_member_tried = False
        # Dict-path rows not written to the spool yet: packed in ``pending``, item
        # ``pending_i[k]``'s row ending at ``pending_end[k]``.
        self.pending = bytearray()
        self.pending_i: list[int] = []
        self.pending_end: list[int] = []
        self.retryable: list[int] = []
        self.ok = self.error = self.duplicate = self.malformed = self.mismatch = 0
        self.in_tok: int | float = 0
        self.out_tok: int | float = 0

    # -- the dict path: one line at a time ---------------------------------------------------

    def add_line(self, line: bytes) -> None:
        """One result line's JSON text (a blank line is no line; text that is not JSON is
        malformed)."""
        res = _loads_line(line)
        if res is not _BLANK:
            self.add_parsed(res)

    def add_parsed(self, res: Any) -> None:
        """One parsed result line (a dict; anything else is malformed)."""
        li = _line_index(res, self.n_lines)
        if li < 0:
            self.malformed += 1
            return
        i = self.lines[li]
        if self.taken[i]:
            self.duplicate += 1
            return
        self._dict_row(res, i)

    def _dict_row(self, res: dict[str, Any], i: int) -> None:
        """Item ``i``'s row from its parsed line ``res`` (the line's first for the item)."""
        item = self.items[i]
        sent_id = res.get("id")
        if sent_id is not None and sent_id != self.prefix + id_text(item.id):
            self.mismatch += 1
        dims = res.get("dims") or (self.sizes.get(str(i)) if self.has_sizes else None)
        if res.get("status") == "ok":
            usage = res.get("usage")
            if usage.__class__ is not dict:  # null or not an object: no usage
                usage = {}
            row = {"id": item.id, "source": self.source_of(item), "status": "ok",
                   "result": res.get("result"), "usage": usage}
        else:
            row = {"id": item.id, "source": self.source_of(item), "status": "error",
                   "error": _error(res.get("error"))}
        _with_size(row, dims)
        if self.multi:
            _with_images(row, item, i, self.build, self.source_of)
        pending = self.pending
        try:
            pending += orjson.dumps(row)
        except orjson.JSONEncodeError as exc:  # e.g. a result nested deeper than 255
            row = _unwritable(row, exc)
            pending += orjson.dumps(row)
        if row["status"] == "ok":
            self.ok += 1
            t = usage.get("input_tokens")
            if t.__class__ is int or t.__class__ is float:
                self.in_tok += t
            t = usage.get("output_tokens")
            if t.__class__ is int or t.__class__ is float:
                self.out_tok += t
        else:
            self.error += 1
            if row["error"]["code"] in self.retryable_codes:
                self.retryable.append(i)
        # Rows go to the spool by the thousand: no bytes object held per row.
        self.pending_end.append(len(pending))
        self.pending_i.append(i)
        self.taken[i] = 1
        if len(self.pending_i) >= _FLUSH:
            self._flush()

    def _flush(self) -> None:
        self.rows.add_packed(self.pending_i, self.pending_end, self.pending)
        self.pending_i.clear()
        self.pending_end.clear()
        del self.pending[:]

    # -- the bulk path: a piece of text at a time --------------------------------------------

    def add_text(self, text: bytes) -> None:
        """Result lines as JSONL text (whole lines; blank lines are no lines), in pieces of
        ``_PIECE`` to ``2 * _PIECE`` bytes cut after a newline (a piece of a result file, about
        ``_PIECE`` bytes, is one)."""
        lo, end = 0, len(text)
        while lo < end:
            hi = end if end - lo < 2 * _PIECE else (text.find(b"\n", lo + _PIECE - 1) + 1 or end)
            self._bulk(text, lo, hi, clean=False)
            lo = hi

    def _bulk(self, text: bytes, lo: int, hi: int, *, clean: bool) -> None:
        """The lines of ``text[lo:hi]``: every line decoded as a ``_Line`` by one call, the
        line_index, duplicate and id checks by numpy and list comparisons, the ok rows
        encoded by one call and written to the spool by one. Lines whose row the dict path
        makes (an error, an odd shape) are parsed again by orjson and take it, in their
        order. Text msgspec does not read line for line as ``splitlines`` cuts it (blank
        lines, a lone CR: ``clean`` once they are removed) is tidied first; a piece that does
        not decode whole is halved, down to ``_SMALL`` lines that take the dict path."""
        import numpy as np

        a = np.frombuffer(text, np.uint8, hi - lo, lo)
        ends = np.flatnonzero(a == 10)  # line k is text[lo + starts[k]:lo + ends[k]]
        if len(a) and a[-1] != 10:
            ends = np.append(ends, len(a))
        n = len(ends)
        if n <= max(_SMALL, 1):
            for line in text[lo:hi].splitlines():
                if line:
                    self.add_line(line)
            return
        starts = np.empty_like(ends)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        if not clean:
            first = a[starts].tobytes()  # a blank line starts with white space or is empty
            if text.find(b"\r", lo, hi) >= 0 or any(c in first for c in (b" ", b"\t", b"\n")):
                kept = b"\n".join([line for line in text[lo:hi].splitlines() if line.strip()])
                if kept:
                    self._bulk(kept, 0, len(kept), clean=True)
                return
        piece = memoryview(text)[lo:hi]
        try:
            decoded = self.decode_lines(piece)
        except msgspec.MsgspecError:
            decoded = None
            if self.decode_lines is not _decode_lines:  # a result of another shape: the
                self.decode_lines = _decode_lines  # general decoder from now on
                with contextlib.suppress(msgspec.MsgspecError):
                    decoded = _decode_lines(piece)
        if decoded is not None and not self.one_member_tried:
            self.one_member_tried = True
            name = next((_one_member(r.result) for r in decoded if r.status == "ok"), None)
            if name is not None:
                self.decode_lines = _one_member_lines(name)
        if decoded is None or len(decoded) != n:  # a line not read, or read as several values
            self._halves(text, lo, hi, ends)
            return
        claim = np.fromiter([r.line_index for r in decoded], np.int64, n)
        odd = [k for k, r in enumerate(decoded) if r.status != "ok" or r.error is not None]
        parsed: dict[int, Any] = {}
        for k in odd:  # the dict path's lines: parsed as it parses them
            line = text[lo + int(starts[k]):lo + int(ends[k])]
            try:
                res = orjson.loads(line)
            except orjson.JSONDecodeError:
                res = None
            if res.__class__ is dict and res.get("status") == "ok":
                # An ok row counts tokens: the dict path, line by line, keeps their order.
                self._halves(text, lo, hi, ends)
                return
            parsed[k] = res
            claim[k] = _line_index(res, self.n_lines)
        # Everything from here on changes the merge's state.
        if self.np_lines is None:
            self.np_lines = np.asarray(self.lines, np.int64)
            self.np_taken = np.frombuffer(self.taken, np.uint8)
            self.np_first = np.full(len(self.taken), _NO_LINE, np.int32)
        valid = np.flatnonzero((claim >= 0) & (claim < self.n_lines))
        self.malformed += n - len(valid)
        # Each item's first line in the piece (its position, in np_first: all _NO_LINE again
        # after), if the item has no row yet; in line order (the lines are read in memory order).
        item = self.np_lines[claim[valid]]
        at = np.arange(len(valid), dtype=np.int32)
        np.minimum.at(self.np_first, item, at)
        new = (self.np_first[item] == at) & (self.np_taken[item] == 0)
        self.np_first[item] = _NO_LINE
        pos, item = valid[new], item[new]
        self.duplicate += len(valid) - len(pos)
        if odd:
            is_odd = np.zeros(n, bool)
            is_odd[odd] = True
            by_dict = is_odd[pos]
            for k, i in zip(pos[by_dict].tolist(), item[by_dict].tolist(), strict=True):
                self._dict_row(parsed[k], i)
            pos, item = pos[~by_dict], item[~by_dict]
        if len(pos) == n:  # every line is an ok line of an item without a row yet
            self._ok_rows(decoded, item)
        elif len(pos):
            self._ok_rows([decoded[k] for k in pos.tolist()], item)

    def _halves(self, text: bytes, lo: int, hi: int, ends: Any) -> None:
        """``_bulk`` of each half of ``text[lo:hi]`` (its lines ``ends``), in order."""
        cut = lo + int(ends[len(ends) // 2 - 1]) + 1
        self._bulk(text, lo, cut, clean=True)
        self._bulk(text, cut, hi, clean=True)

    def _ok_rows(self, lines: list[_Line], indices: Any) -> None:
        """The rows of items ``indices`` (a numpy array) from their ok ``lines``."""
        self.np_taken[indices] = 1
        items: Any = None
        if self.key_sources is not None:
            ids = self.items.take_ids(indices)  # type: ignore[attr-defined]
            sources: Any = self.key_sources(ids)
        else:
            items = self.items.take(indices) if isinstance(self.items, PlanItems) else [
                self.items[i] for i in indices.tolist()]
            ids = [item.id for item in items]
            sources = map(self.source_of, items)
        sent = [r.id for r in lines]
        if self.prefix or sent != ids:
            self.mismatch += _mismatches(sent, ids, self.prefix)
        usages = [_NO_USAGE if r.usage is None else r.usage for r in lines]
        self.in_tok = _add_tokens(self.in_tok, [u.input_tokens for u in usages])
        self.out_tok = _add_tokens(self.out_tok, [u.output_tokens for u in usages])
        n = len(lines)
        width: Any = repeat(None)
        height: Any = repeat(None)
        sent_width: Any = repeat(UNSET)
        sent_height: Any = repeat(UNSET)
        if self.has_sizes:
            width, height, sent_width, sent_height = _sizes_of(self.sizes, indices)
        dims = [r.dims for r in lines]
        if dims.count(None) < n:  # sizes on the lines (a line's non-empty dims win)
            width, height, sent_width, sent_height = (
                list(islice(c, n)) for c in (width, height, sent_width, sent_height))
            for k, d in enumerate(dims):
                if d:
                    width[k], height[k] = (d[0], d[1]) if len(d) >= 2 else (None, None)
                    sent_width[k], sent_height[k] = (d[2], d[3]) if len(d) >= 4 else (
                        UNSET, UNSET)
        columns = [ids, sources, repeat("ok"), [r.result for r in lines],
                   usages, width, height, sent_width, sent_height]
        if self.multi:
            columns.append([_with_images({}, item, i, self.build, self.source_of).get(
                "images", UNSET) for item, i in zip(items, indices.tolist(), strict=True)])
        self.rows.add_lines(indices, _encode_lines(list(map(_OkRow, *columns))))
        self.ok += n

    # -- the end: every item of the round gets its row ---------------------------------------

    def finish(self, todo: Sequence[int] | None, batch_error: dict[str, str] | None
               ) -> tuple[MergeStats, list[int]]:
        """Write what is pending, then the rows of the items of ``todo`` (default: all) that
        have none (pre-send errors, not sent, ``batch_error``, missing results)."""
        self._flush()
        stats = MergeStats(ok=self.ok, error=self.error, input_tokens=int(self.in_tok),
                           output_tokens=int(self.out_tok), duplicate=self.duplicate,
                           malformed=self.malformed, id_mismatch=self.mismatch)
        items, build, taken, lines = self.items, self.build, self.taken, self.lines
        wanted = range(len(items)) if todo is None else todo
        if self.ok + self.error:  # only the items without a row (in numpy: no loop over all)
            import numpy as np

            want = np.arange(len(items)) if todo is None else np.asarray(todo, np.int64)
            if len(want):
                wanted = want[np.frombuffer(taken, np.uint8)[want] == 0].tolist()
        sent: set[int] | None = None
        line_of: dict[int, int] | None = None
        for i in wanted:
            if taken[i]:  # todo named it twice
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
            taken[i] = self.rows.add(i, orjson.dumps(_with_images(_with_size(
                {"id": item.id, "source": self.source_of(item), "status": "error",
                 "error": error}, self.sizes.get(str(i))), item, i, build, self.source_of)))
        return stats, self.retryable


def _mismatches(sent: list[str | None], ids: list[Any], prefix: str) -> int:
    """How many of the ``sent`` ids (None: no id) are not ``prefix`` + the matching item id."""
    try:
        want = [prefix + i for i in ids]  # str ids ("" + i is i)
    except TypeError:
        want = [prefix + id_text(i) for i in ids]
    if sent == want:
        return 0
    return sum(s is not None and s != w for s, w in zip(sent, want, strict=True))


def _add_tokens(total: int | float, counts: list[Any]) -> int | float:
    """``total`` plus the token ``counts`` (ints, or UNSET: absent), added in order as the
    dict path adds them (once a float count made ``total`` a float, the order matters)."""
    try:
        part = sum(counts)
    except TypeError:  # an absent count
        counts = [c for c in counts if c is not UNSET]
        part = sum(counts)
    if total.__class__ is int:
        return total + part
    for c in counts:
        total += c
    return total


def _sizes_of(sizes: Sizes, indices: Any) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """The row fields ``width``, ``height``, ``sent_width``, ``sent_height`` of items
    ``indices`` (a numpy array) from the build's ``sizes`` (None, None, UNSET, UNSET where
    it has none; UNSET sent sizes where the image was not downscaled)."""
    quads = sizes.quads(indices)
    w, h, sw, sh = (quads[:, k].tolist() for k in range(4))
    if (quads[:, 0] < 0).any():
        w = [None if x < 0 else x for x in w]
        h = [None if x < 0 else x for x in h]
    if (quads[:, 2] < 0).any():
        sw = [UNSET if x < 0 else x for x in sw]
        sh = [UNSET if x < 0 else x for x in sh]
    return w, h, sw, sh


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
    for res in () if batch_error else _one_by_one(result_lines):
        if res.__class__ is bytes:  # a line's JSON text: parsed here (no bulk path)
            res = _loads_line(res)
            if res is _BLANK:
                continue
        li = _line_index(res, n_lines)
        if li < 0:
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


def _one_by_one(result_lines: Iterable[Any]) -> Iterator[Any]:
    """``result_lines`` a line at a time: JSONL text (bytes) cut into its lines (bytes, blank
    ones skipped), parsed lines as they are."""
    for res in result_lines:
        if res.__class__ is bytes:
            yield from filter(None, res.splitlines())
        else:
            yield res


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
