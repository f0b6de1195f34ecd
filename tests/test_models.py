"""moonbatch.workers.models.SkillOptions: validation, request fields and the spliced line fragment."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from moonbatch.workers.models import PlanItem, ShardBuild, SkillOptions


@pytest.mark.parametrize("kwargs, message", [
    ({"skill": "query"}, "--question is required"),
    ({"skill": "query", "question": ""}, "--question is required"),
    ({"skill": "detect"}, "--object is required for --skill detect"),
    ({"skill": "point"}, "--object is required for --skill point"),
    ({"skill": "detect", "object": ""}, "--object is required"),
    ({"skill": "detect", "object": "face", "length": "short"}, "--length applies"),
    ({"skill": "query", "question": "q?", "length": "long"}, "--length applies"),
    ({"skill": "point", "object": "eye", "length": "normal"}, "--length applies"),
    ({"skill": "caption", "question": "why?"}, "--question applies"),
    ({"skill": "detect", "object": "face", "question": "why?"}, "--question applies"),
    ({"skill": "caption", "object": "face"}, "--object applies"),
    ({"skill": "query", "question": "q?", "object": "face"}, "--object applies"),
    ({"skill": "caption", "reasoning": True}, "--reasoning applies"),
    ({"skill": "point", "object": "eye", "reasoning": False}, "--reasoning applies"),
    ({"skill": "point", "object": "eye", "temperature": 0.5}, "apply to caption and query only"),
    ({"skill": "detect", "object": "face", "top_p": 0.5}, "apply to caption and query only"),
    ({"skill": "detect", "object": "face", "max_tokens": 10}, "apply to caption and query only"),
])
def test_invalid_combinations(kwargs, message):
    with pytest.raises(ValidationError) as info:
        SkillOptions(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("kwargs", [
    {"skill": "segment"},
    {"skill": "caption", "length": "medium"},
    {"skill": "caption", "temperature": -0.1},
    {"skill": "caption", "temperature": 2.5},
    {"skill": "caption", "top_p": 0},
    {"skill": "caption", "top_p": 1.5},
    {"skill": "query", "question": "q?", "max_tokens": 0},
    {"skill": "caption", "unknown": 1},
])
def test_field_level_validation(kwargs):
    with pytest.raises(ValidationError):
        SkillOptions(**kwargs)


def test_options_are_frozen():
    opts = SkillOptions(skill="caption")
    with pytest.raises(ValidationError):
        opts.length = "long"


@pytest.mark.parametrize("kwargs, fields", [
    ({"skill": "caption"}, {"skill": "caption", "length": "normal"}),
    ({"skill": "caption", "length": "short"}, {"skill": "caption", "length": "short"}),
    ({"skill": "caption", "length": "long", "temperature": 0.2},
     {"skill": "caption", "length": "long", "settings": {"temperature": 0.2}}),
    ({"skill": "query", "question": "How many?"}, {"skill": "query", "question": "How many?"}),
    ({"skill": "query", "question": "How many?", "reasoning": True},
     {"skill": "query", "question": "How many?", "reasoning": True}),
    ({"skill": "query", "question": "How many?", "reasoning": False},
     {"skill": "query", "question": "How many?", "reasoning": False}),
    ({"skill": "query", "question": "q", "temperature": 0, "top_p": 1, "max_tokens": 64},
     {"skill": "query", "question": "q", "settings": {"temperature": 0, "top_p": 1, "max_tokens": 64}}),
    ({"skill": "detect", "object": "face"}, {"skill": "detect", "object": "face"}),
    ({"skill": "point", "object": "left eye"}, {"skill": "point", "object": "left eye"}),
])
def test_request_fields(kwargs, fields):
    got = SkillOptions(**kwargs).request_fields()
    assert got == fields
    assert list(got)[0] == "skill"
    if "settings" not in fields:
        assert "settings" not in got


def test_settings_only_holds_the_given_values():
    got = SkillOptions(skill="caption", max_tokens=12).request_fields()
    assert got["settings"] == {"max_tokens": 12}
    assert "temperature" not in got and "top_p" not in got


OPTIONS = [
    SkillOptions(skill="caption"),
    SkillOptions(skill="caption", length="long", temperature=1.5, top_p=0.25, max_tokens=300),
    SkillOptions(skill="query", question='Is there a "quote", a \\ backslash\nand a newline?'),
    SkillOptions(skill="query", question="Wie viele Äpfel? 苹果有几个？ 🍎", reasoning=False),
    SkillOptions(skill="detect", object="traffic light"),
    SkillOptions(skill="point", object="œil gauche"),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: o.skill)
def test_line_fragment_splices_into_valid_json(opts):
    fragment = opts.line_fragment()
    assert isinstance(fragment, bytes)
    assert fragment.startswith(b'"skill":')  # the inside of an object, no braces
    assert b"\n" not in fragment
    assert json.loads(b"{" + fragment + b"}") == opts.request_fields()
    spliced = json.loads(b'{"id":"a.jpg",' + fragment + b',"image":"AAAA"}')
    assert spliced == {"id": "a.jpg", **opts.request_fields(), "image": "AAAA"}


def test_line_fragment_is_compact_utf8():
    opts = SkillOptions(skill="point", object="œil")
    assert opts.line_fragment() == '"skill":"point","object":"œil"'.encode()


def test_options_round_trip_through_json():
    for opts in OPTIONS:
        assert SkillOptions.model_validate_json(opts.model_dump_json()) == opts


def test_plan_item_and_shard_build_round_trip():
    item = PlanItem(id="dir/ünï.jpg", size=123)
    assert PlanItem.from_json(item.to_json()) == item
    build = ShardBuild(lines=[0, 2], errors={"1": {"code": "not_an_image", "message": "x"}})
    again = ShardBuild.model_validate_json(build.model_dump_json())
    assert again.lines == [0, 2] and again.errors == build.errors and again.bytes == 0


def test_shard_build_sizes_are_compact_and_round_trip():
    """``sizes`` in memory: int32 quads; in build.json: base64 of them (``json_bytes``);
    ``model_dump`` and ``model_dump_json``: the dict form, which files written before the
    compact form hold and which still loads."""
    import base64
    from array import array

    from moonbatch.workers.models import Sizes

    sizes = {"0": [640, 480], "7": [4000, 3000, 1000, 750], "3": [1, 2]}
    build = ShardBuild(lines=[0, 3, 7], sizes=sizes)
    assert isinstance(build.sizes, Sizes) and len(build.sizes) == 3
    assert build.sizes.get("7") == [4000, 3000, 1000, 750] and build.sizes.get("1") is None
    assert build.sizes.get("x") is None and "3" in build.sizes and "4" not in build.sizes
    assert list(build.sizes) == ["0", "3", "7"] and build.sizes == sizes
    assert build.model_dump()["sizes"] == sizes
    assert json.loads(build.model_dump_json())["sizes"] == sizes  # the dict form
    packed = json.loads(build.json_bytes())
    assert {k: v for k, v in packed.items() if k != "sizes"} == build.model_dump(exclude={"sizes"})
    quads = array("i", base64.b64decode(packed["sizes"]["int32le"]))
    assert quads.tolist() == [640, 480, -1, -1, *[-1] * 8, 1, 2, -1, -1, *[-1] * 12,
                              4000, 3000, 1000, 750]
    for data in (build.model_dump_json().encode(), build.json_bytes()):
        again = ShardBuild.model_validate_json(data)
        assert again.sizes == sizes and len(again.sizes) == 3 and again.lines == [0, 3, 7]
        assert ShardBuild.model_validate(json.loads(data)) == build
    empty = ShardBuild(lines=[])
    assert not empty.sizes and ShardBuild.model_validate_json(empty.json_bytes()) == empty
    for bad in ({"0": [1, 2, 3]}, {"0": [-1, 2]}, {"0": [1.5, 2]}, {"-1": [1, 2]}, [[1, 2]]):
        with pytest.raises(ValueError):
            ShardBuild(lines=[], sizes=bad)

    def pack(*values):
        return {"int32le": base64.b64encode(array("i", values).tobytes()).decode()}

    assert ShardBuild(lines=[], sizes=pack(-1, -1, -1, -1, 5, 6, -1, -1)).sizes == {"1": [5, 6]}
    for bad in (pack(1, 2, 3), pack(5, -1, -1, -1), pack(-1, 6, -1, -1), pack(5, 6, 7, -1),
                pack(5, 6, -2, -2), {"int32le": "not base64!"}, {"int32le": 7}):
        with pytest.raises(ValueError):
            ShardBuild(lines=[], sizes=bad)
    # quads: many items' sizes at once, -1 where absent (also beyond the last known item)
    assert build.sizes.quads([7, 1, 0, 99, 3]).tolist() == [
        [4000, 3000, 1000, 750], [-1] * 4, [640, 480, -1, -1], [-1] * 4, [1, 2, -1, -1]]
    assert build.sizes.quads([]).shape == (0, 4) and empty.sizes.quads([2]).tolist() == [[-1] * 4]


def test_plan_items_take_any_indices_in_their_order(monkeypatch):
    """``PlanItems.take`` (the merge's thousands of items at once, their lines' bytes gathered
    by numpy) gives ``[plan[i] for i in indices]`` for a list, a numpy array or a generator of
    indices, lines of every length, CRLF lines and a last line without a newline, gathered at
    once or sliced out one by one (beyond ``_GATHER_MAX``); an index out of range raises
    ``IndexError``."""
    import numpy as np

    from moonbatch.workers import models
    from moonbatch.workers.models import PlanItems

    items = [PlanItem(id="x" * k + ".jpg", size=k, more=("s3://b/y.png",) if k % 7 == 0 else None)
             for k in range(0, 300, 13)]
    data = b"".join(i.to_json() + (b"\r\n" if k % 3 else b"\n") for k, i in enumerate(items))
    order = [5, 0, 22, 5, 1, 17]
    for text, gather_max in ((data, models._GATHER_MAX), (data.rstrip(), models._GATHER_MAX),
                             (data, 1000)):  # (1000: lines sliced out one by one)
        monkeypatch.setattr(models, "_GATHER_MAX", gather_max)
        plan = PlanItems(text)
        want = [items[i] for i in order]
        assert plan.take(order) == want and plan.take(np.array(order)) == want
        assert plan.take(i for i in order) == want and plan.take(np.array([], np.int64)) == []
        with pytest.raises(IndexError):
            plan.take([0, len(items)])


def test_plan_items_take_ids_are_the_ids_of_take(monkeypatch):
    """``PlanItems.take_ids`` (the merge's ids of thousands of items at once) is ``[item.id
    for item in take(indices)]`` for plans of odd lines: ids of every JSON scalar type, refs,
    several images (``more``), opts, lines of very different lengths, CRLF lines, blank lines,
    the last lines of the file (windows past its end), a last line without a newline, a
    plan msgspec does not read as from_json does (decoded one by one); lines gathered by
    windows or byte by byte (``_WINDOW_MAX``). ``keys_only``: no item with a ref or more."""
    import numpy as np

    from moonbatch.workers import models
    from moonbatch.workers.models import PlanItems

    rng = random.Random(3)
    for case in range(200):
        items = []
        for k in range(rng.randint(1, 40)):
            item_id = rng.choice([f"img/{k}.jpg", k, -k, 1.5 * k, k % 2 == 0, f"x{k}é\n\"",
                                  "long/" * rng.randint(0, 60), 2**63 + k, "😀" * k])
            items.append(PlanItem(item_id, rng.randint(0, 2**40),
                                  rng.choice([None] * 4 + ["s3://b/k.jpg", "tar:a.tar#1+2"]),
                                  rng.choice([None, {"question": "q" * rng.randint(0, 300)}]),
                                  rng.choice([None] * 5 + [("s3://b/2.jpg", "s3://b/3.jpg")])))
        keys_only = all(i.ref is None and i.more is None for i in items)
        text = b"".join(i.to_json() + rng.choice([b"\n", b"\r\n", b"\n\n", b"\n  \n"])
                        for i in items)
        if rng.random() < 0.2:
            text = text.rstrip()
        if rng.random() < 0.1:  # an id orjson reads as a float: items decoded one by one
            text += b'\n{"id": 1180591620717411303424, "size": 1}\n'
            items.append(PlanItem(float(2**70), 1))
        monkeypatch.setattr(models, "_WINDOW_MAX", rng.choice([256, 8, 64]))
        plan = PlanItems(text)
        assert plan.keys_only == keys_only and list(plan) == items
        order = [rng.randrange(len(items)) for _ in range(rng.randint(0, 60))]
        order += [len(items) - 1] * rng.randint(0, 2)  # the last line: past the end
        want = [items[i] for i in order]
        assert plan.take(order) == want and plan.take(np.array(order, np.int64)) == want
        ids = plan.take_ids(np.array(order, np.int64))
        assert ids == [i.id for i in want] and [i.__class__ for i in ids] == [
            i.id.__class__ for i in want], case
    with pytest.raises(IndexError):
        plan.take_ids([len(items)])
    assert plan.take_ids([]) == []


def test_plan_items_parse_the_plan_file_on_access():
    """``PlanItems`` (what ``Run.items`` returns) reads as the list of the plan's items would:
    indexing (negative too), slices, iteration, length, equality; blank lines skipped; a bad
    line refused up front."""
    from moonbatch.workers.models import PlanItems

    items = [PlanItem(id="a.jpg", size=10), PlanItem(id=7, size=20, opts={"length": "long"}),
             PlanItem(id="m", size=30, ref="s3://b/x.png", more=("s3://b/y.png",))]
    data = b"".join(i.to_json() + b"\n" for i in items)
    for text in (data, data[:-1], b"\n" + data.replace(b"\n", b"\n\n", 1) + b"  \n"):
        plan = PlanItems(text)
        assert len(plan) == 3 and list(plan) == items and plan == items
        assert plan[0] == items[0] and plan[-1] == items[2] and plan[1:] == items[1:]
        assert [plan[i] for i in range(3)] == items
        with pytest.raises(IndexError):
            plan[3]
        assert plan.take([2, 0, 2]) == [items[2], items[0], items[2]] and plan.take([]) == []
    assert len(PlanItems(b"")) == 0 and PlanItems(b"") == [] and plan != items[:2]
    for bad in (b'{"id": "a"}\n', b'{"id": [1], "size": 1}\n', b"not json\n"):
        with pytest.raises(ValueError):
            PlanItems(data + bad)
    # an id msgspec does not read as from_json does (orjson: a float): decoded one by one
    mixed = PlanItems(data + b'{"id": 1180591620717411303424, "size": 1}\n')
    assert mixed.take([3, 1]) == [mixed[3], items[1]] and mixed[3].id == float(2**70)
