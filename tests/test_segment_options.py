"""The ``segment`` skill and ``--spatial-refs`` (FACTS.md "real-time API"; the official client's
``CloudVL``): validation, the request fields a line carries, per-row ``object`` overrides, the
dry run's token estimate, and the refusals of the providers that cannot serve them (the Batch
API and fal) before anything is sent: through the command line (real ``moonbatch`` processes)
and the Python API."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from moonbatch.errors import InvalidOption
from moonbatch.workers.models import RunSpec, SkillOptions, realtime_only
from tests.conftest import jpeg_bytes
from tests.test_providers_cli import keyless, refused

ROOT = Path(__file__).resolve().parents[1]
FIX = "use --provider moondream-realtime"


def _spec(*options: SkillOptions) -> RunSpec:
    return RunSpec(run_id="r", input="file:///in/", output="file:///out/", options=options[0],
                   more_options=list(options[1:]), shard_size=10, max_shard_bytes=10**9,
                   created_at=time.time())


# -- the options --------------------------------------------------------------------------------
def test_segment_takes_object_and_spatial_refs() -> None:
    seg = SkillOptions(skill="segment", object="cat")
    assert seg.request_fields() == {"skill": "segment", "object": "cat"}
    refs = [[0.5, 0.5], [0.1, 0.2, 0.6, 0.9]]
    seg = SkillOptions(skill="segment", object="cat", spatial_refs=refs)
    assert seg.request_fields() == {"skill": "segment", "object": "cat", "spatial_refs": refs}
    assert json.loads(b"{" + seg.line_fragment() + b"}") == seg.request_fields()
    # Where the real-time API takes refs besides segment: query and point (not detect).
    assert SkillOptions(skill="point", object="eye", spatial_refs=[[0.2, 0.3]]
                        ).request_fields()["spatial_refs"] == [[0.2, 0.3]]
    assert SkillOptions(skill="query", question="What is here?", spatial_refs=[[0.2, 0.3]]
                        ).request_fields() == {"skill": "query", "question": "What is here?",
                                               "spatial_refs": [[0.2, 0.3]]}


@pytest.mark.parametrize(("fields", "message"), [
    ({"skill": "segment"}, "--object is required for --skill segment"),
    ({"skill": "segment", "object": "cat", "question": "x"}, "--question applies to --skill query"),
    ({"skill": "segment", "object": "cat", "temperature": 0.5}, "--temperature, --top-p"),
    ({"skill": "detect", "object": "cat", "spatial_refs": [[0.5, 0.5]]},
     "--spatial-refs applies to --skill query, point and segment only"),
    ({"skill": "caption", "spatial_refs": [[0.5, 0.5]]}, "--spatial-refs applies"),
    ({"skill": "segment", "object": "cat", "spatial_refs": [[0.5]]},
     "each ref is [x, y] or [x_min, y_min, x_max, y_max]"),
    ({"skill": "segment", "object": "cat", "spatial_refs": [[0.5, 1.5]]}, "within 0..1"),
    ({"skill": "segment", "object": "cat", "spatial_refs": [[0.6, 0.1, 0.2, 0.9]]},
     "a box is [x_min, y_min, x_max, y_max]"),
    ({"skill": "segment", "object": "cat", "spatial_refs": []}, "at least one"),
])
def test_invalid_options_name_the_option(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        SkillOptions(**fields)
    assert message in str(info.value)


def test_object_override_applies_to_segment(tmp_path: Path) -> None:
    """A manifest row's own ``object`` overrides a segment run's, as for detect and point."""
    from moonbatch.config import get_settings
    from moonbatch.producer.runs import new_spec
    from moonbatch.workers.readers import ListingStats, input_root, item_options, open_reader
    from moonbatch.workers.storage import open_store

    seg = SkillOptions(skill="segment", object="cat", spatial_refs=[[0.5, 0.5]])
    assert seg.with_overrides({"object": "dog", "question": "ignored", "length": "long"}) == \
        SkillOptions(skill="segment", object="dog", spatial_refs=[[0.5, 0.5]])
    assert seg.with_overrides({"object": ""}) is seg
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": 1, "image": "a.jpg", "object": "dog"})
                                      + "\n" + json.dumps({"id": 2, "image": "a.jpg"}) + "\n")
    # A spec no provider checked (the real-time provider's package is another branch's).
    spec = new_spec(str(tmp_path / "m.jsonl"), str(tmp_path / "out"),
                    SkillOptions(skill="caption"), get_settings(), input_format="manifest")
    spec = spec.model_copy(update={"options": seg})
    items = list(open_reader(spec, open_store(input_root(spec)), get_settings())
                 .iter_items(ListingStats()))
    assert [item_options(spec.options, it).object for it in items] == ["dog", "cat"]


def test_realtime_only_names_what_only_the_realtime_api_serves() -> None:
    caption, detect = SkillOptions(skill="caption"), SkillOptions(skill="detect", object="car")
    seg = SkillOptions(skill="segment", object="car")
    point_refs = SkillOptions(skill="point", object="car", spatial_refs=[[0.1, 0.1]])
    assert realtime_only(_spec(caption, detect)) == []
    assert realtime_only(_spec(seg)) == ["segment"]
    assert realtime_only(_spec(caption, seg)) == ["segment"]
    assert realtime_only(_spec(point_refs)) == ["--spatial-refs"]


def test_output_token_estimate_of_segment() -> None:
    from moonbatch.workers.providers import OUTPUT_TOKENS, estimate_output_tokens

    assert estimate_output_tokens(SkillOptions(skill="segment", object="cat")) == \
        OUTPUT_TOKENS["segment"] > OUTPUT_TOKENS["detect"]


def test_spatial_refs_as_the_command_line_gives_them() -> None:
    from moonbatch.producer.submit import skill_options

    opts = skill_options("segment", object="cat", spatial_refs="[[0.5, 0.5], [0, 0, 1, 1]]")
    assert opts.spatial_refs == [[0.5, 0.5], [0, 0, 1, 1]]
    assert skill_options("point", object="cat", spatial_refs="[0.5, 0.5]").spatial_refs == \
        [[0.5, 0.5]]  # one ref, bare
    # Several skills: each skill that takes refs gets them.
    both = skill_options(["query", "segment"], question="Which?", object="cat",
                         spatial_refs="[[0.5, 0.5]]")
    assert [o.spatial_refs for o in both] == [[[0.5, 0.5]], [[0.5, 0.5]]]
    with pytest.raises(InvalidOption) as info:
        skill_options("segment", object="cat", spatial_refs="[[0.5, 0.5]")
    assert "--spatial-refs [[0.5, 0.5]: not a JSON list of refs" in str(info.value)
    with pytest.raises(InvalidOption) as info:
        skill_options(["caption", "detect"], object="cat", spatial_refs="[[0.5, 0.5]]")
    assert "--spatial-refs applies to --skill query, point and segment only" in \
        str(info.value)


# -- refusals before anything is sent ----------------------------------------------------------
@pytest.fixture
def local_input(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"img-{i}.jpg").write_bytes(jpeg_bytes(color=(i * 40, 100, 200)))
    return folder


def test_batch_api_and_fal_refuse_segment_through_the_cli(env, tmp_path, local_input) -> None:
    # This checkout's code in the ``moonbatch`` processes (the installed one may be another's).
    e = {**keyless(env, tmp_path), "PYTHONPATH": str(ROOT)}
    io = [str(local_input), str(tmp_path / "out")]
    seg = ["--skill", "segment", "--object", "cat"]
    for provider in ("moondream", "fal"):
        for command in (["run", *io], ["submit", *io], ["submit", *io, "--dry-run"]):
            line = refused([*command, *seg, "--provider", provider], e)
            assert line == (f"error: --skill segment: only the Moondream real-time API serves "
                            f"it, not --provider {provider}: {FIX}"), line
    line = refused(["run", *io, "--skill", "caption", "--skill", "segment", "--object", "cat"], e)
    assert line.endswith(f"not --provider moondream: {FIX}"), line
    line = refused(["run", *io, "--provider", "fal", "--skill", "point", "--object", "cat",
                    "--spatial-refs", "[[0.5, 0.5]]"], e)
    assert line == f"error: --spatial-refs: only the Moondream real-time API serves it, not " \
                   f"--provider fal: {FIX}", line
    line = refused(["run", *io, "--skill", "segment"], e)
    assert "--object is required for --skill segment" in line
    line = refused(["run", *io, "--skill", "detect", "--object", "cat", "--spatial-refs",
                    "[[0.5, 0.5]]"], e)
    assert "--spatial-refs applies to --skill query, point and segment only" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


def test_python_api_refuses_segment_on_both_providers(env, tmp_path, local_input) -> None:
    import moonbatch

    for provider in ("moondream", "fal"):
        for call in (moonbatch.dry_run, moonbatch.submit):
            with pytest.raises(InvalidOption) as info:
                call(str(local_input), str(tmp_path / "out"), skill="segment", object="cat",
                     spatial_refs=[[0.5, 0.5]], provider=provider)
            assert str(info.value) == (f"--skill segment and --spatial-refs: only the Moondream "
                                       f"real-time API serves them, not --provider {provider}: "
                                       f"{FIX}")
    assert not (tmp_path / "out").exists()
