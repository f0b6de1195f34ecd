"""moonbatch.workers.merge: result lines → one row per planned item, and the adaptive poll interval."""

from __future__ import annotations

import json
import random

import pytest

from moonbatch.workers.merge import merge_rows as merge_lines
from moonbatch.workers.models import PlanItem, ShardBuild
from moonbatch.workers.providers.moondream.polling import next_poll_interval

SOURCE = "s3://bucket/in/"


def merge_rows(items, build, files, *args, **kwargs):
    """Merge Batch API result files (their bytes), as the Batch API provider hands them over."""
    return merge_lines(items, build, files, *args, **kwargs)


def source_of(item) -> str:
    return SOURCE + item.id


def plan(n: int) -> list[PlanItem]:
    return [PlanItem(id=f"img/{i:03d} é.jpg", size=100 + i) for i in range(n)]


def ok_line(li: int, id_: str, *, inp: int = 10, out: int = 3, text: str | None = None) -> dict:
    return {"line_index": li, "id": id_, "status": "ok",
            "result": {"caption": text or f"caption of {id_}"},
            "usage": {"input_tokens": inp, "output_tokens": out}}


def to_files(rows: list[dict], n_files: int, seed: int = 0, extra: list[bytes] = ()) -> list[bytes]:
    """Shuffle the rows and split them across ``n_files`` JSONL files (bytes)."""
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows] + list(extra)
    random.Random(seed).shuffle(lines)
    files = [lines[i::n_files] for i in range(n_files)]
    return [b"\n".join(f) + b"\n" for f in files]


def parse(data: bytes) -> list[dict]:
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def test_shuffled_results_across_files_come_out_in_plan_order():
    items = plan(50)
    build = ShardBuild(lines=list(range(50)))
    rows = [ok_line(li, items[li].id, inp=li, out=1) for li in range(50)]
    data, stats = merge_rows(items, build, to_files(rows, 4, seed=7), source_of)
    out = parse(data)
    assert [r["id"] for r in out] == [it.id for it in items]
    for i, r in enumerate(out):
        assert r == {"id": items[i].id, "source": SOURCE + items[i].id, "status": "ok",
                     "result": {"caption": f"caption of {items[i].id}"},
                     "usage": {"input_tokens": i, "output_tokens": 1},
                     "width": None, "height": None}
    assert (stats.ok, stats.error) == (50, 0)
    assert stats.input_tokens == sum(range(50)) and stats.output_tokens == 50
    assert (stats.duplicate, stats.malformed, stats.missing, stats.id_mismatch) == (0, 0, 0, 0)


def test_result_files_as_a_generator_and_non_ascii_output():
    items = [PlanItem(id="写真/猫.png", size=1)]
    build = ShardBuild(lines=[0])
    files = (f for f in to_files([ok_line(0, items[0].id, text="一只猫")], 1))
    data, stats = merge_rows(items, build, files, source_of)
    assert "一只猫".encode() in data  # UTF-8, not \u escapes
    assert parse(data)[0]["result"] == {"caption": "一只猫"}
    assert stats.ok == 1


def test_lines_map_to_items_through_build_lines():
    # Item 1 failed before sending, so line 0 is item 0 and line 1 is item 2.
    items = plan(3)
    build = ShardBuild(lines=[0, 2], errors={"1": {"code": "not_an_image", "message": "text"}})
    rows = [ok_line(0, items[0].id, text="zero"), ok_line(1, items[2].id, text="two")]
    data, stats = merge_rows(items, build, to_files(rows, 2), source_of)
    out = parse(data)
    assert [r["status"] for r in out] == ["ok", "error", "ok"]
    assert out[0]["result"] == {"caption": "zero"}
    assert out[2]["result"] == {"caption": "two"}
    assert out[1]["error"] == {"code": "not_an_image", "message": "text"}
    assert stats.id_mismatch == 0 and (stats.ok, stats.error) == (2, 1)


def test_duplicates_counted_and_first_wins():
    items = plan(3)
    build = ShardBuild(lines=[0, 1, 2])
    files = [
        json.dumps(ok_line(0, items[0].id, text="first")).encode() + b"\n"
        + json.dumps(ok_line(1, items[1].id)).encode() + b"\n",
        json.dumps(ok_line(0, items[0].id, text="second")).encode() + b"\n"
        + json.dumps(ok_line(2, items[2].id)).encode() + b"\n"
        + json.dumps(ok_line(1, items[1].id, text="again")).encode() + b"\n",
    ]
    data, stats = merge_rows(items, build, files, source_of)
    out = parse(data)
    assert len(out) == 3
    assert out[0]["result"] == {"caption": "first"}
    assert out[1]["result"] == {"caption": f"caption of {items[1].id}"}
    assert stats.duplicate == 2
    assert stats.ok == 3
    assert stats.input_tokens == 30  # duplicates do not add usage


def test_missing_line_index_gives_missing_result_row():
    items = plan(4)
    build = ShardBuild(lines=[0, 1, 2, 3])
    rows = [ok_line(li, items[li].id) for li in (0, 1, 3)]
    data, stats = merge_rows(items, build, to_files(rows, 2), source_of)
    out = parse(data)
    assert len(out) == 4
    assert out[2]["status"] == "error"
    assert out[2]["error"]["code"] == "missing_result"
    assert "2" in out[2]["error"]["message"]
    assert out[2]["id"] == items[2].id and out[2]["source"] == SOURCE + items[2].id
    assert stats.missing == 1 and (stats.ok, stats.error) == (3, 1)


def test_malformed_lines_are_counted_and_ignored():
    items = plan(2)
    build = ShardBuild(lines=[0, 1])
    garbage = [
        b"not json at all",
        b'{"id": "x", "status": "ok"}',  # no line_index
        b'{"line_index": "0", "status": "ok"}',  # not an integer
        b'{"line_index": 1.0, "status": "ok"}',
        b'{"line_index": -1, "status": "ok"}',
        b'{"line_index": 2, "status": "ok"}',  # out of range (2 lines)
        b'{"line_index": null}',
        b"[1, 2, 3]",
        b'"a string"',
        b"42",
        b'{"line_index": 0, "status": "ok", "result": {"caption": "x"',  # truncated
    ]
    rows = [ok_line(0, items[0].id), ok_line(1, items[1].id)]
    files = to_files(rows, 3, extra=garbage) + [b"", b"\n\n  \n"]
    data, stats = merge_rows(items, build, files, source_of)
    out = parse(data)
    assert [r["status"] for r in out] == ["ok", "ok"]
    assert stats.malformed == len(garbage)
    assert stats.duplicate == 0 and stats.missing == 0


def test_boolean_line_index_is_malformed():
    items = [PlanItem(id=f"i{n}", size=1) for n in range(3)]
    data, stats = merge_rows(items, ShardBuild(lines=[0, 1, 2]),
                             [b'{"line_index": true, "status": "ok", "result": {}}\n'],
                             lambda k: k.id)
    assert stats.malformed == 1 and stats.missing == 3 and stats.ok == 0
    assert all(json.loads(r)["error"]["code"] == "missing_result" for r in data.splitlines())


def test_pre_send_errors_become_error_rows():
    items = plan(4)
    errors = {"0": {"code": "object_not_found", "message": "gone"},
              "3": {"code": "image_decode_failed", "message": "bad header"}}
    build = ShardBuild(lines=[1, 2], errors=errors)
    rows = [ok_line(0, items[1].id), ok_line(1, items[2].id)]
    data, stats = merge_rows(items, build, to_files(rows, 1), source_of)
    out = parse(data)
    assert out[0]["status"] == "error" and out[0]["error"] == errors["0"]
    assert out[3]["status"] == "error" and out[3]["error"] == errors["3"]
    assert "result" not in out[0] and "usage" not in out[0]
    assert [r["status"] for r in out[1:3]] == ["ok", "ok"]
    assert (stats.ok, stats.error, stats.missing) == (2, 2, 0)


def test_items_neither_sent_nor_errored_are_not_sent():
    items = plan(3)
    build = ShardBuild(lines=[0])  # items 1 and 2 vanished from the build
    data, stats = merge_rows(items, build, to_files([ok_line(0, items[0].id)], 1), source_of)
    out = parse(data)
    assert [r["id"] for r in out] == [it.id for it in items]
    assert out[0]["status"] == "ok"
    for r in out[1:]:
        assert r["status"] == "error" and r["error"]["code"] == "not_sent"
    assert (stats.ok, stats.error) == (1, 2)


def test_no_lines_sent_at_all():
    items = plan(2)
    build = ShardBuild(lines=[], errors={"0": {"code": "empty_object", "message": "0 bytes"}})
    data, stats = merge_rows(items, build, [], source_of)
    out = parse(data)
    assert [r["error"]["code"] for r in out] == ["empty_object", "not_sent"]
    assert (stats.ok, stats.error) == (0, 2)


def test_empty_plan_gives_empty_output():
    data, stats = merge_rows([], ShardBuild(lines=[]), [], source_of)
    assert data == b""
    assert (stats.ok, stats.error) == (0, 0)


def test_batch_error_marks_every_sent_line():
    items = plan(5)
    pre = {"2": {"code": "not_an_image", "message": "text"}}
    build = ShardBuild(lines=[0, 1, 3, 4], errors=pre)
    batch_error = {"code": "validation_error", "message": "Blank line at line 3"}
    # Even if some result lines exist, a failed batch's lines are all errors.
    files = to_files([ok_line(0, items[0].id)], 1)
    data, stats = merge_rows(items, build, files, source_of, batch_error=batch_error)
    out = parse(data)
    assert [r["status"] for r in out] == ["error"] * 5
    for i in (0, 1, 3, 4):
        assert out[i]["error"] == batch_error
    assert out[2]["error"] == pre["2"]
    assert (stats.ok, stats.error, stats.input_tokens, stats.missing) == (0, 5, 0, 0)


def test_per_line_api_errors_are_passed_through():
    items = plan(4)
    build = ShardBuild(lines=[0, 1, 2, 3])
    rows = [
        ok_line(0, items[0].id),
        {"line_index": 1, "id": items[1].id, "status": "error",
         "error": {"code": "image_too_large", "message": "Image exceeds 10MB"}},
        {"line_index": 2, "id": items[2].id, "status": "error", "error": {}},
        {"line_index": 3, "id": items[3].id, "status": "weird"},
    ]
    data, stats = merge_rows(items, build, to_files(rows, 2), source_of)
    out = parse(data)
    assert out[0]["status"] == "ok"
    assert out[1] == {"id": items[1].id, "source": SOURCE + items[1].id, "status": "error",
                      "error": {"code": "image_too_large", "message": "Image exceeds 10MB"},
                      "width": None, "height": None}
    assert out[2]["error"] == {"code": "unknown_error", "message": ""}
    assert out[3]["status"] == "error" and out[3]["error"]["code"] == "unknown_error"
    assert (stats.ok, stats.error, stats.missing) == (1, 3, 0)


def test_usage_summed_over_ok_rows_only():
    items = plan(4)
    build = ShardBuild(lines=[0, 1, 2, 3])
    rows = [
        ok_line(0, items[0].id, inp=100, out=7),
        ok_line(1, items[1].id, inp=50, out=5),
        {"line_index": 2, "id": items[2].id, "status": "error",
         "error": {"code": "internal_error", "message": "x"},
         "usage": {"input_tokens": 1000, "output_tokens": 1000}},
        {"line_index": 3, "id": items[3].id, "status": "ok", "result": {"caption": "no usage"}},
    ]
    data, stats = merge_rows(items, build, to_files(rows, 1), source_of)
    out = parse(data)
    assert stats.input_tokens == 150 and stats.output_tokens == 12
    assert out[3]["status"] == "ok" and out[3]["usage"] == {}
    assert "usage" not in out[2]


def test_id_mismatch_counted_but_row_keeps_plan_id():
    items = plan(3)
    build = ShardBuild(lines=[0, 1, 2])
    rows = [ok_line(0, items[0].id), ok_line(1, "someone-else.jpg"), ok_line(2, items[1].id)]
    data, stats = merge_rows(items, build, to_files(rows, 1), source_of)
    out = parse(data)
    assert stats.id_mismatch == 2
    assert [r["id"] for r in out] == [it.id for it in items]
    assert stats.ok == 3


def test_sent_ids_carry_the_round_prefix_and_rows_keep_the_plan_id():
    items = plan(3)
    build = ShardBuild(lines=[0, 1, 2], id_prefix="0123456789:")
    rows = [ok_line(0, "0123456789:" + items[0].id), ok_line(1, items[1].id),
            ok_line(2, "ffffffffff:" + items[2].id)]
    data, stats = merge_rows(items, build, to_files(rows, 1), source_of)
    assert stats.id_mismatch == 2  # no prefix, or another round's
    assert [r["id"] for r in parse(data)] == [it.id for it in items]


def test_rows_without_id_are_not_mismatches():
    items = plan(1)
    row = ok_line(0, items[0].id)
    del row["id"]
    _, stats = merge_rows(items, ShardBuild(lines=[0]), to_files([row], 1), source_of)
    assert stats.id_mismatch == 0 and stats.ok == 1


def test_crlf_result_files():
    items = plan(2)
    body = b"\r\n".join(json.dumps(ok_line(i, items[i].id)).encode() for i in range(2)) + b"\r\n"
    data, stats = merge_rows(items, ShardBuild(lines=[0, 1]), [body], source_of)
    assert stats.ok == 2 and stats.malformed == 0
    assert len(parse(data)) == 2


# --------------------------------------------------------------------------------------------
# next_poll_interval

BOUNDS = {"min_interval": 5.0, "max_interval": 120.0}


def test_interval_always_within_bounds():
    rng = random.Random(1234)
    for _ in range(2000):
        total = rng.randint(0, 100_000)
        completed = rng.randint(0, total) if total else 0
        now = rng.uniform(0, 1e5)
        last = None
        if rng.random() < 0.7:
            last = (now - rng.uniform(-10, 3600), rng.randint(0, max(completed, 1)))
        lo = rng.uniform(0.1, 10)
        hi = lo + rng.uniform(0, 300)
        got = next_poll_interval(elapsed=rng.uniform(-5, 1e6), total=total, completed=completed,
                                 last=last, now=now, min_interval=lo, max_interval=hi)
        assert lo <= got <= hi


def test_grows_with_elapsed_without_progress():
    values = [next_poll_interval(elapsed=e, total=1000, completed=0, last=(0.0, 0), now=float(e),
                                 **BOUNDS) for e in (0, 10, 40, 100, 200, 400, 1000, 10_000)]
    assert values == sorted(values)
    assert values[0] == BOUNDS["min_interval"]
    assert values[-1] == BOUNDS["max_interval"]
    assert values[3] == 25.0 and values[4] == 50.0  # a quarter of the age, between the bounds


def test_no_previous_sample_uses_age():
    assert next_poll_interval(elapsed=200, total=10, completed=5, last=None, now=200,
                              **BOUNDS) == 50.0


def test_measured_rate_with_little_left_returns_minimum():
    # 9,900 of 10,000 done, 100 lines/s: 100 left → ~1 s, below the minimum.
    got = next_poll_interval(elapsed=3600, total=10_000, completed=9_900, last=(3500.0, 0),
                             now=3599.0, **BOUNDS)
    assert got == BOUNDS["min_interval"]


def test_all_done_returns_minimum():
    got = next_poll_interval(elapsed=5000, total=100, completed=100, last=(4000.0, 50), now=5000.0,
                             **BOUNDS)
    assert got == BOUNDS["min_interval"]


def test_rate_aims_at_half_the_time_left():
    # 10 lines/s, 600 left → 60 s left → poll in 30 s (age alone would say 250 s → capped at 120).
    got = next_poll_interval(elapsed=1000, total=1000, completed=400, last=(900.0, 0), now=940.0,
                             **BOUNDS)
    assert got == pytest.approx(30.0)


def test_no_progress_since_last_sample_ignores_rate():
    got = next_poll_interval(elapsed=200, total=1000, completed=400, last=(100.0, 400), now=200.0,
                             **BOUNDS)
    assert got == 50.0


def test_rows_carry_the_source_size_and_the_sent_size_where_downscaled():
    items = plan(3)
    build = ShardBuild(lines=[0, 1], errors={"2": {"code": "not_an_image", "message": "x"}},
                       sizes={"0": [640, 480], "1": [4000, 3000, 1000, 750]})
    rows = [ok_line(0, items[0].id), ok_line(1, items[1].id)]
    data, _ = merge_rows(items, build, to_files(rows, 1), source_of)
    out = [json.loads(line) for line in data.splitlines()]
    assert (out[0]["width"], out[0]["height"]) == (640, 480) and "sent_width" not in out[0]
    assert (out[1]["width"], out[1]["height"], out[1]["sent_width"], out[1]["sent_height"]) == (
        4000, 3000, 1000, 750)
    assert out[2]["status"] == "error" and out[2]["width"] is None and out[2]["height"] is None


def _deep(levels: int) -> dict:
    value: dict = {"caption": "x"}
    for _ in range(levels):
        value = {"a": value}
    return value


def test_odd_but_parseable_lines_still_give_every_item_its_row():
    """A remote service's extra shapes never stop a shard: usage that is not an object (or
    token counts that are not numbers) counts no tokens, an error that is not an object is
    ``unknown_error`` with its text, a result nested too deep to write is ``malformed_result``."""
    from moonbatch.workers.merge import merge_round

    items = plan(6)
    build = ShardBuild(lines=list(range(6)))
    lines = [
        {**ok_line(0, items[0].id), "usage": "n/a"},
        {**ok_line(1, items[1].id), "usage": {"input_tokens": "7", "output_tokens": True}},
        {"line_index": 2, "id": items[2].id, "status": "error", "error": "boom"},
        {"line_index": 3, "id": items[3].id, "status": "error", "error": None},
        {**ok_line(4, items[4].id), "result": _deep(300)},
        {**ok_line(5, items[5].id, inp=5, out=2), "usage": {"input_tokens": 5.0,
                                                          "output_tokens": 2, "extra": [1]}},
    ]
    rows, stats, retryable = merge_round(items, build, lines, source_of,
                                         retryable_codes=frozenset({"unknown_error"}))
    with rows:
        out = {i: json.loads(row) for i, row in rows.items()}
    assert sorted(out) == list(range(6))
    assert out[0]["status"] == "ok" and out[0]["usage"] == {}
    assert out[1]["status"] == "ok"
    assert out[2]["error"] == {"code": "unknown_error", "message": "boom"}
    assert out[3]["error"] == {"code": "unknown_error", "message": ""}
    assert out[4]["status"] == "error" and out[4]["error"]["code"] == "malformed_result"
    assert out[4]["id"] == items[4].id and "result" not in out[4]
    assert out[5]["usage"] == {"input_tokens": 5.0, "output_tokens": 2, "extra": [1]}
    assert (stats.ok, stats.error, stats.input_tokens, stats.output_tokens) == (3, 3, 5, 2)
    assert retryable == [2, 3]


def test_odd_lines_in_a_multi_skill_round():
    from moonbatch.workers.lines import skill_line_id
    from moonbatch.workers.merge import merge_round

    items = plan(2)
    skills = ["caption", "query"]
    build = ShardBuild(lines=[0, 0, 1, 1], skills=[0, 1, 0, 1])
    lines = [
        {"line_index": 0, "id": skill_line_id(items[0].id, "caption"), "status": "ok",
         "result": {"caption": "c"}, "usage": ["not", "an", "object"]},
        {"line_index": 1, "id": skill_line_id(items[0].id, "query"), "status": "ok",
         "result": {"answer": "a"}, "usage": {"input_tokens": "x", "output_tokens": 4}},
        {"line_index": 2, "id": skill_line_id(items[1].id, "caption"), "status": "error",
         "error": 42},
        {"line_index": 3, "id": skill_line_id(items[1].id, "query"), "status": "ok",
         "result": _deep(300), "usage": {"input_tokens": 1, "output_tokens": 1}},
    ]
    rows, stats, _ = merge_round(items, build, lines, source_of, skills=skills)
    with rows:
        out = {i: json.loads(row) for i, row in rows.items()}
    assert out[0]["status"] == "ok" and out[0]["usage"] == {"input_tokens": 0, "output_tokens": 4}
    assert out[1]["status"] == "error" and out[1]["error"]["code"] in {"unknown_error",
                                                                       "malformed_result"}
    assert (stats.ok, stats.error) == (1, 1)


def test_a_multi_skill_round_takes_result_text_line_by_line():
    """A multi-skill round's lines as the Batch API provider hands them over (pieces of JSONL
    text, CRLF too, a blank and a bad line among them) give the rows of the same lines parsed."""
    from moonbatch.workers.lines import skill_line_id
    from moonbatch.workers.merge import merge_round

    items = plan(3)
    skills = ["caption", "query"]
    build = ShardBuild(lines=[0, 0, 1, 1, 2, 2], skills=[0, 1, 0, 1, 0, 1])
    lines = [{"line_index": li, "id": skill_line_id(items[li // 2].id, skills[li % 2]),
              "status": "ok", "result": {"text": str(li)},
              "usage": {"input_tokens": li, "output_tokens": 1}} for li in range(6)]
    raw = [json.dumps(line).encode() for line in lines]
    text = [b"\n".join(raw[:3]) + b"\n\nnot json\n", b"\r\n".join(raw[3:])]
    got = []
    for given in (lines, text):
        rows, stats, _ = merge_round(items, build, given, source_of, skills=skills)
        with rows:
            got.append(({i: json.loads(r) for i, r in rows.items()}, stats.ok, stats.error))
        assert stats.malformed == (given is text)
    assert got[0] == got[1] and got[0][1:] == (3, 0)


def test_rows_are_compact_json_with_keys_in_row_order():
    # Each row reads as orjson writes the row dict, keys in row order (compose and error_codes
    # find ok rows by ``"status":"ok","result":``).
    import orjson

    items = plan(4) + [PlanItem(id=7, size=1, more=("s3://b/x.jpg",))]
    build = ShardBuild(lines=[0, 1, 2, 4], sizes={"1": [8, 6], "2": [8, 6, 4, 3]},
                       image_sizes={"4": [[5, 5], None]},
                       errors={"3": {"code": "not_an_image", "message": "text"}})
    lines = [ok_line(0, items[0].id, text='quote " and \\ and \n'), ok_line(1, items[1].id),
             {"line_index": 2, "id": items[2].id, "status": "error",
              "error": {"code": "rate_limited"}},
             {**ok_line(3, "7"), "dims": [9, 9], "usage": None, "result": None}]
    data, stats = merge_rows(items, build, to_files(lines, 2),
                             lambda item: SOURCE + (item.ref or item.key))
    rows = data.splitlines()
    assert [orjson.dumps(orjson.loads(r)) for r in rows] == rows
    keys = [list(orjson.loads(r)) for r in rows]
    base = ["id", "source", "status"]
    assert keys == [base + ["result", "usage", "width", "height"],
                    base + ["result", "usage", "width", "height"],
                    base + ["error", "width", "height", "sent_width", "sent_height"],
                    base + ["error", "width", "height"],
                    base + ["result", "usage", "width", "height", "images"]]
    assert [b'"status":"ok","result":' in r for r in rows] == [True, True, False, False, True]
    assert orjson.loads(rows[4])["images"] == [
        {"source": SOURCE + "7", "width": 5, "height": 5},
        {"source": SOURCE + "s3://b/x.jpg", "width": None, "height": None}]
    assert (stats.ok, stats.error) == (3, 2)


# --------------------------------------------------------------------------------------------
# The bulk path (result lines as text) against the dict path (the same lines parsed first)

_VALUES = {
    "result": [b'{"caption": "a cat"}', b'{"caption":"x\\u00e9\\ud83d\\ude00 \\" \\\\ \\n"}',
               '{"caption": "一只猫"}'.encode(), b'{"objects": [{"x_min": 0.1, "y_min": 1e-7}]}',
               b'{"answer": "yes", "reasoning": true}', b'"bare"', b"null", b"[]", b"7",
               b'{"a": 1, "a": 2}', b'{"n": 123456789012345678901234567890}',
               b'{"n": 18446744073709551615}', b'{"n": -0}', b'{"n": -0.0}', b'{"n": 1e-400}',
               b'{"n": 1e400}', b'{"n": 1' + b"0" * 400 + b"}", b'{"n": 0.30000000000000004}',
               b'{"s": "\\ud800"}', b'{"s": "\xff"}', b'{"s": "\xed\xa0\x80"}', b'{"s": "a\x7fb"}',
               b'{"caption": "' + b"long words " * 40 + b'"}',
               b"[" * 300 + b"]" * 300, b"[" * 250 + b"]" * 250, b"[" * 253 + b"]" * 253,
               b"[" * 254 + b"]" * 254, b"[" * 255 + b"]" * 255, b'{"x": [1, 2.5, "3"]}'],
    "usage": [b'{"input_tokens": 10, "output_tokens": 3}', b'{"output_tokens": 3}', b"{}",
              b"null", b'"n/a"', b"[1]", b'{"input_tokens": "7", "output_tokens": true}',
              b'{"input_tokens": 5.5, "output_tokens": null}', b'{"input_tokens": 1, "extra": [1]}',
              b'{"input_tokens": 18446744073709551616}', b'{"input_tokens": 1e400}',
              b'{"input_tokens": 1, "input_tokens": 2}', b'{"input_tokens": 9223372036854775808}'],
    "error": [b'{"code": "processing_error", "message": "try again"}', b'{"code": "rate_limited"}',
              b'"boom"', b"null", b"42", b'{"code": 7, "message": ["x"]}', b"{}"],
    "dims": [b"[640, 480]", b"[4000, 3000, 1000, 750]", b"[]", b"[1]", b"[1.5, 2]", b'"x"',
             b"null", b"[true, 1]", b"[18446744073709551616, 1]", b"[640, 480, 320]",
             b"[1" + b"0" * 400 + b", 5]"],
    "status": [b'"ok"'] * 6 + [b'"error"', b'"weird"', b"null", b"1"],
    "extra": [b"1", b'{"a": [1e400]}', b'"x"', b'"\xff"'],
}


def _random_line(rng, n_lines: int, ids: list[str]) -> bytes:
    """A result line's bytes: mostly the usual shape, with odd fields, types and values."""
    if rng.random() < 0.03:
        return rng.choice([b"not json", b"", b"   ", b'{"line_index": 0', b"[1, 2]", b"42",
                           b'{"line_index": 0} x', b"\xef\xbb\xbf{}"])
    fields = []
    li = rng.randrange(n_lines + 2) if rng.random() < 0.95 else None
    if li is not None:
        fields.append(("line_index", rng.choice([b"%d" % li] * 8 + [
            b"-1", b"true", b"1.0", b'"1"', b"null", b"18446744073709551616", b"1e400"])))
    if li is not None and li < n_lines and rng.random() < 0.9:
        good = ids[li].encode()
        fields.append(("id", rng.choice([b'"' + good + b'"'] * 6 + [b'"P:' + good + b'"',
                                                                      b'"other"', b"null", b"7"])))
    fields.append(("status", rng.choice(_VALUES["status"])))
    for key, p in (("result", 0.9), ("usage", 0.8), ("error", 0.15), ("dims", 0.15),
                   ("extra", 0.05)):
        if rng.random() < p:
            fields.append((key, rng.choice(_VALUES[key])))
    rng.shuffle(fields) if rng.random() < 0.1 else None
    sep = rng.choice([(b",", b":"), (b", ", b": ")])
    return b"{" + sep[0].join(b'"%s"%s%s' % (k.encode(), sep[1], v) for k, v in fields) + b"}"


_RESULTS = [{"caption": "a red cup"}, {"answer": "yes"}, {"caption": 'quote " \\ \n é 😀 \u2028'},
            {"objects": [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.5, "y_max": 1}]},
            {"points": [{"x": 0.5, "y": 0.25}]}, {"objects": []}, {"caption": ""}, None,
            {"caption": "long " * 80}, {"n": -(2**63)}, {"n": 2**63 - 1}, {"deep": _deep(15)}]


def _usual_line(rng, li: int, ids: list[str]) -> bytes:
    """A result line's bytes, of the usual shape (an ok line, or an error line) most of the
    time, an odd one (``_random_line``) now and then."""
    if rng.random() < 0.05:
        return _random_line(rng, len(ids), ids)
    line: dict = {"line_index": li}
    if rng.random() < 0.95:
        good = ids[li] if 0 <= li < len(ids) else "nobody"
        line["id"] = rng.choice([good] * 10 + ["P:" + good, "other", None])
    if rng.random() < 0.9:
        line["status"] = "ok"
        line["result"] = rng.choice(_RESULTS)
        usage = rng.choice([{"input_tokens": rng.randint(0, 10**6), "output_tokens": 5},
                            {"output_tokens": 7}, {}, None, "absent"])
        if usage != "absent":
            line["usage"] = usage
    else:
        line["status"] = "error"
        line["error"] = rng.choice([{"code": "processing_error", "message": "try again"},
                                    {"code": "image_too_large", "message": "big"}])
    if rng.random() < 0.05:
        line["dims"] = rng.choice([[64, 48], [4000, 3000, 1000, 750], [], [5]])
    items = list(line.items())
    if rng.random() < 0.1:
        rng.shuffle(items)
    return json.dumps(dict(items), ensure_ascii=rng.random() < 0.5,
                      separators=rng.choice([(",", ":"), (", ", ": ")])).encode()


def _text_pieces(rng, raw: list[bytes]) -> list[bytes]:
    """The lines ``raw`` as JSONL text, cut into pieces of whole lines (LF or CRLF line ends,
    the last line's end sometimes left off), as a result file's text is handed over."""
    pieces, k = [], 0
    while k < len(raw):
        m = rng.choice([1, 2, rng.randint(1, 80)])
        end = b"\r\n" if rng.random() < 0.1 else b"\n"
        pieces.append(end.join(raw[k:k + m]) + (end if rng.random() < 0.8 else b""))
        k += m
    return pieces


@pytest.mark.parametrize("shape", ["odd", "usual"])
def test_bulk_and_fast_paths_give_the_dict_path_rows(shape, monkeypatch):
    """For random and odd result lines, the rows of lines given as text (one line at a time,
    or many lines at once: the bulk path, its halving and its dict-path lines) parse to
    exactly the rows of the same lines parsed first (the dict path: what ``merge_round`` did
    before the fast paths), with the same stats and retryable items (in the same order)."""
    import orjson

    from moonbatch.workers import merge as merge_module
    from moonbatch.workers.merge import merge_round
    from moonbatch.workers.models import PlanItems

    rng = random.Random(5 if shape == "odd" else 6)
    for case in range(80 if shape == "odd" else 60):
        n = rng.randint(1, 40) if shape == "odd" else rng.choice([rng.randint(1, 40), 300])
        # (ids of every length: ``PlanItems.take`` gathers the plan's lines by their spans)
        items = [PlanItem(id=rng.choice([f"img/{k}.jpg", k, f"x{k}é",
                                         f"photos/{k:06d}/" + "long name " * rng.randint(1, 30)]),
                          size=k,
                          more=("s3://b/more.jpg",) if rng.random() < 0.1 else None)
                 for k in range(n)]
        sent = sorted(rng.sample(range(n), rng.randint(0, n)))
        sizes = {str(i): rng.choice([[640, 480], [4000, 3000, 1000, 750]])
                 for i in sent if rng.random() < 0.5}
        build = ShardBuild(lines=sent, id_prefix=rng.choice(["", "P:"]), sizes=sizes,
                           image_sizes={str(i): [[5, 5], None] for i in range(n)
                                        if items[i].more},
                           errors={str(i): {"code": "not_an_image", "message": "x"}
                                   for i in range(n) if i not in sent and rng.random() < 0.5})
        ids = [build.id_prefix + PlanItem(items[i].id, 0).key for i in sent]
        if shape == "odd":
            raw = [_random_line(rng, len(sent), ids) for _ in range(rng.randint(0, 2 * n + 5))]
        else:  # every line once, shuffled, some twice, some out of range
            order = list(range(len(sent))) + [rng.randrange(len(sent) + 3) - 1
                                              for _ in range(rng.randint(0, n // 5 + 2))]
            rng.shuffle(order)
            raw = [_usual_line(rng, li, ids) for li in order]

        def parsed(line: bytes):
            try:
                return orjson.loads(line)
            except orjson.JSONDecodeError:
                return None

        old_lines = [parsed(line) for line in raw if line.strip()]  # the old iter_result_lines
        text = _text_pieces(rng, raw)
        todo = sorted(rng.sample(range(n), rng.randint(0, n))) if rng.random() < 0.2 else None
        plan = PlanItems(b"".join(item.to_json() + b"\n" for item in items))
        kwargs = {"todo": todo, "retryable_codes": frozenset({"processing_error", "unknown_error"})}
        # (items, lines, _SMALL, _PIECE): pieces of text take the bulk path above _SMALL lines
        # and are cut into pieces of _PIECE bytes.
        # (key_sources: the sources of a keys-only plan's items from their ids, in one call)
        runs = [(items, old_lines, 16, 2**20, None), (plan, raw, 16, 2**20, None),
                (items, raw, 16, 2**20, None), (plan, text, 1, 2**20, None),
                (items, text, 16, 2**20, None), (plan, text, 1, 700, None),
                (plan, text, 1, 2**20, key_sources), (plan, text, 1, 700, key_sources)]
        for batch_error in (None, {"code": "timeout", "message": "t"}) if case % 10 == 0 else (None,):
            results = []
            for its, lines, small, piece, keyed in runs:
                monkeypatch.setattr(merge_module, "_SMALL", small)
                monkeypatch.setattr(merge_module, "_PIECE", piece)
                rows, stats, retryable = merge_round(its, build, lines,
                                                     lambda item: SOURCE + item.key,
                                                     batch_error=batch_error, key_sources=keyed,
                                                     **kwargs)
                with rows:
                    results.append(({i: orjson.loads(r) for i, r in rows.items()}, stats,
                                    retryable))
            for k, got in enumerate(results[1:], 1):
                assert got == results[0], (case, k, raw)


def key_sources(ids: list) -> list[str]:
    """``source_of`` of the differential test for items without a ref, from their ids."""
    return [SOURCE + PlanItem(i, 0).key for i in ids]


def test_key_sources_are_the_sources_of_the_items(tmp_path):
    """``ItemFetcher.key_sources`` (the merge's sources of a keys-only plan's items, from their
    ids alone, by the store's ``urls_for``) gives ``source`` of each item, for ids of every
    type (an int an S3 URL formats, a LocalStore refuses: ``source`` shows it as it is)."""
    from moonbatch.config import Settings
    from moonbatch.workers.readers import ItemFetcher
    from moonbatch.workers.storage import LocalStore, S3Store

    ids = ["a/b.jpg", "x é 😀.png", "", 7, 1.5, True, "p%20q"]
    for store in (S3Store("bucket", "in/", client=None), S3Store("bucket", "", client=None),
                  LocalStore(tmp_path)):
        fetcher = ItemFetcher(store, Settings())
        for some in (ids, ids[:2], [], [7]):
            assert fetcher.key_sources(some) == [fetcher.source(PlanItem(i, 0)) for i in some]
        assert store.urls_for(ids[:2]) == [store.url_for(i) for i in ids[:2]]


@pytest.mark.parametrize("name", ["caption", "answer"])
def test_results_of_one_string_member_give_the_dict_path_rows(name, monkeypatch):
    """Results of one string member (``{"caption": ...}``) are decoded into a one-field struct
    once a piece shows them: rows, stats and verdicts stay the dict path's for odd strings
    (escapes, non-ASCII, invalid UTF-8, lone surrogates), repeated members, and pieces whose
    results take another shape (the general decoder again from there on)."""
    from moonbatch.workers import merge as merge_module
    from moonbatch.workers.merge import merge_round

    used: list[str] = []
    real = merge_module._one_member_lines
    monkeypatch.setattr(merge_module, "_one_member_lines",
                        lambda member: (used.append(member), real(member))[1])
    monkeypatch.setattr(merge_module, "_PIECE", 2000)  # ~10 lines a piece
    monkeypatch.setattr(merge_module, "_SMALL", 1)
    odd = [b'"x\\u00e9\\ud83d\\ude00 \\" \\\\ \\n"', '"一只猫"'.encode(), b'"\\ud800"',
           b'"\xff"', b'"\xed\xa0\x80"', b'""', b'"a", "%s": "b"' % name.encode(),
           b'"a", "%s": 1' % name.encode(), b'1, "%s": "a"' % name.encode(), b"7", b"null",
           b'"a", "other": "b"']
    rng = random.Random(9)
    for case in range(40):
        n = rng.randint(20, 120)
        items = plan(n)
        build = ShardBuild(lines=list(range(n)))
        raw = []
        for li in range(n):
            if rng.random() < 0.1 * (case % 3):
                value = rng.choice(odd)
            else:
                value = b'"%s %d"' % (b"words " * rng.randint(1, 40), li)
            result = b'{"%s": %s}' % (name.encode(), value)
            if rng.random() < 0.02 * (case % 4):
                result = rng.choice([b"null", b'{"objects": []}', b'"bare"'])
            raw.append(b'{"line_index": %d, "id": "%s", "status": "ok", "result": %s, '
                       b'"usage": {"input_tokens": %d}}' % (li, items[li].id.encode(), result, li))
        rng.shuffle(raw)
        text = [b"\n".join(raw[k:k + 30]) + b"\n" for k in range(0, n, 30)]
        parsed = [merge_module._loads_line(line) for line in raw]
        got = []
        for lines in (text, parsed):
            used.clear()
            rows, stats, _ = merge_round(items, build, lines, source_of)
            with rows:
                got.append((dict(rows.items()), stats))
            if lines is text and case % 3 == 0:
                assert used == [name], used  # the one-member decoder was taken
        assert got[0] == got[1], case


def test_odd_lines_inside_pieces_of_text(monkeypatch):
    """The bulk path's edges, in pieces of text: a line that is not JSON, a blank line and a
    CRLF piece among usual lines, an error line, a duplicate across pieces (the first wins),
    an out-of-range line_index, an id mismatch, a multi-image item, an item without sizes."""
    from moonbatch.workers import merge as merge_module
    from moonbatch.workers.merge import merge_round

    monkeypatch.setattr(merge_module, "_SMALL", 1)
    items = plan(40)
    items[5] = PlanItem(id=items[5].id, size=1, more=("s3://b/two.jpg",))
    build = ShardBuild(lines=list(range(40)), sizes={str(i): [8, 6] for i in range(40) if i != 7},
                       image_sizes={"5": [[8, 6], [3, 2]]})
    lines = [json.dumps(ok_line(li, items[li].id, inp=li, out=1)).encode() for li in range(40)]
    lines[3] = json.dumps({"line_index": 3, "id": items[3].id, "status": "error",
                           "error": {"code": "processing_error", "message": "again"}}).encode()
    lines[9] = json.dumps(ok_line(9, "someone-else.jpg", inp=9, out=1)).encode()
    first = b"\n".join(lines[:20] + [b"not json", b"", b'{"line_index": 40, "status": "ok"}'])
    again = json.dumps(ok_line(2, items[2].id, text="second", inp=1000, out=1000)).encode()
    second = b"\r\n".join([again] + lines[20:]) + b"\r\n"
    rows, stats, retryable = merge_round(items, build, [first, second], source_of,
                                         retryable_codes=frozenset({"processing_error"}))
    with rows:
        out = {i: json.loads(r) for i, r in rows.items()}
    assert sorted(out) == list(range(40))
    assert (stats.ok, stats.error, stats.duplicate, stats.malformed, stats.id_mismatch,
            stats.missing) == (39, 1, 1, 2, 1, 0)
    assert stats.input_tokens == sum(range(40)) - 3 and stats.output_tokens == 39
    assert retryable == [3] and out[3]["error"]["code"] == "processing_error"
    assert out[2]["result"] == {"caption": f"caption of {items[2].id}"}  # the first line wins
    assert out[9]["id"] == items[9].id
    assert out[5]["images"] == [{"source": SOURCE + items[5].id, "width": 8, "height": 6},
                                {"source": SOURCE + items[5].id, "width": 3, "height": 2}]
    assert (out[7]["width"], out[7]["height"]) == (None, None)
    assert (out[8]["width"], out[8]["height"]) == (8, 6) and "sent_width" not in out[8]
    dict_rows, dict_stats, _ = merge_round(
        items, build, [json.loads(x) for x in lines[:20] + [again] + lines[20:]], source_of,
        retryable_codes=frozenset({"processing_error"}))
    with dict_rows:
        assert {i: json.loads(r) for i, r in dict_rows.items()} == out
    assert (dict_stats.ok, dict_stats.error, dict_stats.duplicate) == (39, 1, 1)


def test_rows_reach_the_spool_as_the_merge_goes(monkeypatch):
    """Rows are written to the spool as the merge goes, whichever path made them: parsed lines
    (as the stepped providers hand them) and single lines by the thousand (``_FLUSH``), text
    a piece (``_PIECE`` bytes) at a time: no more than a batch or a piece held in memory."""
    from moonbatch.workers import merge as merge_module
    from moonbatch.workers.merge import merge_round
    from moonbatch.workers.rowspool import RowSpool

    items = plan(50)
    build = ShardBuild(lines=list(range(50)))
    sizes: list[int] = []
    real, real_lines = RowSpool.add_packed, RowSpool.add_lines
    monkeypatch.setattr(merge_module, "_FLUSH", 8)
    monkeypatch.setattr(merge_module, "_PIECE", 1000)  # pieces of 6 to 11 lines of ~170 bytes
    monkeypatch.setattr(merge_module, "_SMALL", 2)
    monkeypatch.setattr(RowSpool, "add_packed",
                        lambda self, i, e, d: (sizes.append(len(i)), real(self, i, e, d)))
    monkeypatch.setattr(RowSpool, "add_lines",
                        lambda self, i, d: (sizes.append(len(i)), real_lines(self, i, d)))
    text = [json.dumps(ok_line(li, items[li].id)).encode() for li in range(50)]
    for lines, most in (([ok_line(li, items[li].id) for li in range(50)], 8), (text, 8),
                        ([b"\n".join(text)], 12)):
        sizes.clear()
        rows, stats, _ = merge_round(items, build, lines, source_of)
        with rows:
            assert len(rows) == 50 and stats.ok == 50
        assert max(sizes) <= most and sum(sizes) == 50 and len(sizes) >= 5


def test_a_long_line_with_a_huge_number_is_malformed_on_both_paths():
    """orjson reads a number of 309 digits or more as infinity and refuses the line; msgspec
    reads it: the bulk path must not take such a line (here in ``dims``, beside a result long
    enough that the line is not short)."""
    items = plan(1)
    line = (b'{"line_index": 0, "status": "ok", "result": {"caption": "' + b"x" * 300
            + b'"}, "dims": [1' + b"0" * 400 + b", 5]}")
    data, stats = merge_rows(items, ShardBuild(lines=[0]), [line + b"\n"], source_of)
    assert stats.malformed == 1 and stats.missing == 1
    assert json.loads(data)["error"]["code"] == "missing_result"
