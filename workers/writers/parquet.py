"""Parquet writer: a shard's rows → one Parquet file (zstd), one table row per item.

The schema is the same for every run, skill, provider and shard (a shard of only error rows,
or of no rows, included), so ``datasets.load_dataset("parquet", data_files=...)``, pandas,
polars or ``pyarrow.dataset`` read any number of shards and runs together without a schema
conflict. Every column is nullable:

==================  ================================  =============================================
column              type                              value
==================  ================================  =============================================
id                  string                            the id: itself for a str id, its JSON text
                                                      otherwise (``7``, ``1.5``, ``true``)
id_json             string                            the id as JSON (``"a.jpg"``, ``7``): its type
                                                      round-trips (``json.loads``)
source              string                            where the image was read from
status              string                            ``ok`` or ``error``
width, height       int32                             source image size in pixels (null: unknown)
sent_width,         int32                             size actually sent where the image was
sent_height                                           downscaled (null otherwise)
caption             string                            caption skill's text
answer              string                            query skill's answer
objects             list<struct<x_min, y_min, x_max,  detect skill's boxes, normalised 0..1
                    y_max: double>>
points              list<struct<x, y: double>>        point skill's points, normalised 0..1
segments            list<struct<path: string, x_min,  segment skill's SVG path (normalised 0..1)
                    y_min, x_max, y_max: double>>     and bbox: one entry per segment result
result_json         string                            the row's whole ``result`` as JSON
                                                      (reasoning, fal ``raw``, multi-skill dict)
error_code,         string                            the error of an error row
error_message,
error_skill
input_tokens,       int64                             the row's token usage
output_tokens
images              list<struct<source: string,       every image of a multi-image query row, in
                    width, height: int32>>            order (null for a single-image row)
cached              bool                              true when the row was not bought for this item:
                                                      served by the result cache, or copied from
                                                      another item of the run with the same image
cache_of            string                            then: the id of the item whose request answered
==================  ================================  =============================================

A typed column is null when no skill of the run fills it (``objects`` of a caption run); an
empty list means the skill found nothing. In a multi-skill row (``result`` = ``{skill:
result}``) each typed column comes from the skill part that has it. ``decode`` rebuilds the
rows the JSONL writer gives from ``id_json``, ``result_json``, the error and token columns.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from moonbatch.workers.models import id_text

FORMAT = "parquet"
SUFFIX = "parquet"

_BOX_FIELDS = ("x_min", "y_min", "x_max", "y_max")
_POINT_FIELDS = ("x", "y")
_SIZE_FIELDS = ("width", "height", "sent_width", "sent_height")
_ERROR_FIELDS = ("code", "message", "skill")
_TOKENS = ("input_tokens", "output_tokens")

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("id_json", pa.string()),
    ("source", pa.string()),
    ("status", pa.string()),
    *((name, pa.int32()) for name in _SIZE_FIELDS),
    ("caption", pa.string()),
    ("answer", pa.string()),
    ("objects", pa.list_(pa.struct([(f, pa.float64()) for f in _BOX_FIELDS]))),
    ("points", pa.list_(pa.struct([(f, pa.float64()) for f in _POINT_FIELDS]))),
    ("segments", pa.list_(pa.struct([("path", pa.string()),
                                     *((f, pa.float64()) for f in _BOX_FIELDS)]))),
    ("result_json", pa.string()),
    *(("error_" + f, pa.string()) for f in _ERROR_FIELDS),
    *((name, pa.int64()) for name in _TOKENS),
    ("images", pa.list_(pa.struct([("source", pa.string()), ("width", pa.int32()),
                                   ("height", pa.int32())]))),
    ("cached", pa.bool_()),
    ("cache_of", pa.string()),
])
# The columns ``decode`` needs (the typed result columns are copies of ``result_json``).
_DECODE_COLUMNS = ["id_json", "source", "status", *_SIZE_FIELDS, "result_json",
                   *("error_" + f for f in _ERROR_FIELDS), *_TOKENS, "images", "cached",
                   "cache_of"]


def encode(rows: Sequence[bytes], metadata: Mapping[str, str] | None = None) -> bytes:
    """Rows (JSON bytes, ``moonbatch.workers.merge``) → the bytes of one Parquet file with ``SCHEMA``
    (zstd, one row group; no rows gives a file with the same schema and no row group).
    ``metadata`` (``moonbatch.workers.writers.run_metadata``: the run id, provider, model and
    options) goes into the file's key-value metadata, read by ``pq.read_metadata(f).metadata``
    or ``pq.read_schema(f).metadata``."""
    cols: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for raw in rows:
        for name, value in _columns(orjson.loads(raw)).items():
            cols[name].append(value)
    buf = io.BytesIO()
    schema = SCHEMA.with_metadata(dict(metadata)) if metadata else SCHEMA
    with pq.ParquetWriter(buf, schema, compression="zstd") as writer:
        # No rows: no row group at all (``datasets`` fails on a row group of 0 rows).
        if rows:
            writer.write_table(pa.Table.from_pydict(cols, schema=schema),
                               row_group_size=len(rows))
    return buf.getvalue()


def decode(data: bytes) -> Iterator[dict[str, Any]]:
    """Parquet bytes (``encode``'s) → the rows as the JSONL writer gives them, in order, a
    record batch at a time."""
    pf = pq.ParquetFile(io.BytesIO(data))
    # Files written before a column existed (``images``) are read without it.
    columns = [c for c in _DECODE_COLUMNS if c in pf.schema_arrow.names]
    for batch in pf.iter_batches(columns=columns):
        for rec in batch.to_pylist():
            yield _row(rec)


def _columns(row: dict[str, Any]) -> dict[str, Any]:
    """One merged row → its value in every column of ``SCHEMA``."""
    item_id = row.get("id")
    result = row.get("result")
    err = row.get("error") if isinstance(row.get("error"), dict) else {}
    usage = row.get("usage") if isinstance(row.get("usage"), dict) else {}
    out: dict[str, Any] = {
        "id": id_text(item_id),
        "id_json": orjson.dumps(item_id).decode(),
        "source": _text(row.get("source")),
        "status": _text(row.get("status")),
        **{name: _int(row.get(name)) for name in _SIZE_FIELDS},
        "caption": None, "answer": None, "objects": None, "points": None, "segments": None,
        "result_json": orjson.dumps(result).decode() if "result" in row else None,
        **{"error_" + f: _text(err.get(f)) for f in _ERROR_FIELDS},
        **{name: _int(usage.get(name)) for name in _TOKENS},
        "images": _images(row.get("images")),
        "cached": row.get("cached") is True,
        "cache_of": _text(row.get("cache_of")),
    }
    for part in _parts(result):
        if out["caption"] is None and isinstance(part.get("caption"), str):
            out["caption"] = part["caption"]
        if out["answer"] is None and isinstance(part.get("answer"), str):
            out["answer"] = part["answer"]
        if out["objects"] is None:
            out["objects"] = _structs(part.get("objects"), _BOX_FIELDS)
        if out["points"] is None:
            out["points"] = _structs(part.get("points"), _POINT_FIELDS)
        if out["segments"] is None and "path" in part:
            out["segments"] = _segments(part)
    return out


def _parts(result: Any) -> list[dict[str, Any]]:
    """The skill results inside a row's ``result``: itself for a single skill, or each
    non-null value of a multi-skill ``{skill: result}`` (told apart by every value being an
    object or null: a single skill's result always has a text or list value)."""
    if not isinstance(result, dict) or not result:
        return []
    if all(v is None or isinstance(v, dict) for v in result.values()):
        return [v for v in result.values() if v]
    return [result]


def _row(rec: dict[str, Any]) -> dict[str, Any]:
    """One decoded Parquet record → the row as merged (``moonbatch.workers.merge``)."""
    row: dict[str, Any] = {"id": orjson.loads(rec["id_json"]), "source": rec["source"],
                           "status": rec["status"]}
    if rec["result_json"] is not None:
        row["result"] = orjson.loads(rec["result_json"])
    tokens = {name: rec[name] for name in _TOKENS if rec[name] is not None}
    if rec["status"] == "ok" or tokens:
        row["usage"] = tokens
    if rec["error_code"] is not None:
        row["error"] = {f: rec["error_" + f] for f in _ERROR_FIELDS if rec["error_" + f] is not None}
    row["width"], row["height"] = rec["width"], rec["height"]
    if rec["sent_width"] is not None:
        row["sent_width"], row["sent_height"] = rec["sent_width"], rec["sent_height"]
    if rec.get("images") is not None:
        row["images"] = rec["images"]
    if rec.get("cached"):
        row["cached"], row["cache_of"] = True, rec.get("cache_of")
    return row


def _images(value: Any) -> list[dict[str, Any]] | None:
    """A row's ``images`` (``moonbatch.workers.merge``) as the column's structs; None when
    the row has none (a single-image row)."""
    if not isinstance(value, list):
        return None
    return [{"source": _text(v.get("source")), "width": _int(v.get("width")),
             "height": _int(v.get("height"))} for v in value if isinstance(v, dict)]


def _structs(value: Any, fields: tuple[str, ...]) -> list[dict[str, float | None]] | None:
    """A list of coordinate objects with ``fields`` as floats (None where not a number);
    None when ``value`` is not a list."""
    if not isinstance(value, list):
        return None
    return [{f: _float(v.get(f)) for f in fields} for v in value if isinstance(v, dict)]


def _segments(part: dict[str, Any]) -> list[dict[str, Any]]:
    """A segment result ``{"path", "bbox"}`` → the ``segments`` column's one-entry list:
    the SVG path (None when not a string) and the bbox's fields (None where absent)."""
    box = part.get("bbox") if isinstance(part.get("bbox"), dict) else {}
    path = part.get("path")
    return [{"path": path if isinstance(path, str) else None,
             **{f: _float(box.get(f)) for f in _BOX_FIELDS}}]


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
