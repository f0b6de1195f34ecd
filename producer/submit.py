"""Starting a run from options as a user gives them: check every option (naming the option,
the bad value and the allowed values), build the run's spec, decide what OUTPUT may take, run
the preflight, and start it or estimate it. The command line and the Python API
(``moonbatch.api``) both start runs here.

Options go by their Python names (``question``, ``object``, ``length``, ``shard_size``,
``max_pixels``, ``input_format``, ``format``, ``endpoint``, ...); messages spell them as the
command line does (``--format``), which is how README and ``moonbatch --help`` list them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, get_args

from pydantic import ValidationError

from moonbatch.config import Settings
from moonbatch.errors import InvalidOption, OutputConflict, translated

log = logging.getLogger(__name__)

#: The skill options (``workers.models.SkillOptions``' fields) and the skills taking each.
SKILL_OPTIONS = {"length": ("caption",), "question": ("query",), "reasoning": ("query",),
                 "object": ("detect", "point", "segment"), "temperature": ("caption", "query"),
                 "top_p": ("caption", "query"), "max_tokens": ("caption", "query"),
                 "spatial_refs": ("query", "point", "segment")}
#: The options that shape a run other than its skills (``new_spec``'s, by their Python names).
RUN_OPTIONS = ("shard_size", "max_pixels", "provider", "endpoint", "input_format", "id_column",
               "image_column", "base", "format", "skip_existing", "model", "priority",
               "fal_store_io", "queue_timeout", "exports", "max_cost", "max_error_rate",
               "error_sample", "cache", "cache_sampled")
#: ``--error-sample`` when ``--max-error-rate`` is given without it.
DEFAULT_ERROR_SAMPLE = 20
#: The options of one provider's own → their key in ``RunSpec.provider_options`` (the
#: provider's ``check_spec`` refuses those it does not take).
PROVIDER_OPTIONS = {"priority": "priority", "fal_store_io": "store_io",
                    "queue_timeout": "request_timeout"}
#: Every option ``start``, ``prepare`` and ``estimate`` take besides INPUT, OUTPUT and skill.
OPTIONS = (*SKILL_OPTIONS, *RUN_OPTIONS)


def flag(name: str) -> str:
    """The command line's spelling of an option: ``top_p`` → ``--top-p``."""
    return "--" + name.replace("_", "-")


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """``InvalidOption`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise InvalidOption(f"{flag(name)} {value}: not a choice: choose one of "
                            f"{', '.join(allowed)}", option=flag(name), value=value,
                            allowed=tuple(allowed))


def skill_options(skill: str | Sequence[str] | None = None, **given: Any):
    """The run's ``SkillOptions`` (one, or a list for several skills; default caption): each
    skill gets the options it takes. ``given`` holds ``SKILL_OPTIONS`` by name (None: not
    given). Raises ``InvalidOption`` for an unknown skill or option value, a repeated skill,
    an option no chosen skill takes, or a missing required one."""
    from moonbatch.workers.models import Skill, SkillOptions

    names = [skill] if isinstance(skill, str) else list(skill or ["caption"])
    for name in names:
        _choice("skill", name, get_args(Skill))
    if given.get("length") is not None:
        _choice("length", given["length"], ("short", "normal", "long"))
    if len(set(names)) < len(names):
        raise InvalidOption(f"--skill {next(n for n in names if names.count(n) > 1)} is given "
                            "twice: each skill once per run", option="--skill")
    given = {k: given.get(k) for k in SKILL_OPTIONS}
    given["spatial_refs"] = spatial_refs(given["spatial_refs"])
    try:
        if len(names) == 1:
            return SkillOptions(skill=names[0], **given)
        for key, value in given.items():
            if value is not None and not set(SKILL_OPTIONS[key]) & set(names):
                takers = SKILL_OPTIONS[key]
                names = " and ".join(takers) if len(takers) < 3 else \
                    ", ".join(takers[:-1]) + " and " + takers[-1]
                raise InvalidOption(f"{flag(key)} applies to --skill {names} only",
                                    option=flag(key))
        return [SkillOptions(skill=n, **{k: v for k, v in given.items()
                                         if v is not None and n in SKILL_OPTIONS[k]})
                for n in names]
    except ValidationError as exc:
        raise _invalid(exc) from None


def spatial_refs(value: Any) -> list[list[float]] | None:
    """``--spatial-refs`` as ``SkillOptions`` takes it: JSON text (the command line's) or a
    list, of ``[x, y]`` points and ``[x_min, y_min, x_max, y_max]`` boxes normalised 0..1; a
    single ref may be given bare (``[0.5, 0.5]``). None stays None. Raises ``InvalidOption``
    for text that is not such JSON (the ranges are ``SkillOptions``' to check)."""
    if value is None:
        return None
    text = value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if isinstance(value, list) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        value = [value]  # one ref, bare
    if not isinstance(value, list) or not all(
            isinstance(r, (list, tuple)) and all(isinstance(v, (int, float))
                                                 and not isinstance(v, bool) for v in r)
            for r in value):
        raise InvalidOption(f"--spatial-refs {text}: not a JSON list of refs: give e.g. "
                            "'[[0.5, 0.5], [0.1, 0.1, 0.4, 0.6]]' ([x, y] points, "
                            "[x_min, y_min, x_max, y_max] boxes, normalised 0..1)",
                            option="--spatial-refs", value=text)
    return [list(r) for r in value]


def _invalid(exc: ValidationError) -> InvalidOption:
    """pydantic's errors as one line per option: ``--temperature 3.0: must be <= 2`` (never
    pydantic's wording or its documentation URL)."""
    lines, option, value = [], None, None
    for e in exc.errors(include_url=False):
        msg = str(e["msg"]).removeprefix("Value error, ")
        ctx = e.get("ctx") or {}
        if not e["loc"]:  # a rule across options: its message names them
            lines.append(msg)
            continue
        option, value = flag(str(e["loc"][0])), e.get("input")
        rule = {"greater_than_equal": f"must be >= {ctx.get('ge')}",
                "greater_than": f"must be > {ctx.get('gt')}",
                "less_than_equal": f"must be <= {ctx.get('le')}",
                "less_than": f"must be < {ctx.get('lt')}"}.get(e["type"], msg.lower())
        lines.append(f"{option} {value}: {rule}")
    return InvalidOption("; ".join(lines), option=option if len(lines) == 1 else None,
                         value=value if len(lines) == 1 else None)


def spec_args(*, shard_size: int | None = None, max_pixels: int | None = None,
              provider: str | None = None, endpoint: str | None = None,
              input_format: str = "auto", id_column: str | None = None,
              image_column: str | Sequence[str] | None = None, base: str | None = None,
              format: str = "jsonl", skip_existing: str | None = None,
              model: str | None = None, priority: str | None = None,
              fal_store_io: bool | None = None, queue_timeout: float | None = None,
              exports: str | Sequence[str] | None = None, max_cost: float | None = None,
              max_error_rate: float | None = None,
              error_sample: int | None = None, cache: bool | None = None,
              cache_sampled: bool = False) -> dict[str, Any]:
    """The run-shaping options as ``producer.runs.new_spec`` takes them (``priority``,
    ``fal_store_io`` and ``queue_timeout`` go into ``provider_options``; ``image_column``: one
    column, or several naming each row's images for a multi-image query). Raises
    ``InvalidOption`` for a format, input format or export that does not exist, a negative
    ``max_pixels`` or ``max_cost``, an empty ``model``, a ``priority`` other than normal or
    low, a ``queue_timeout`` that is not a number of seconds > 0, a ``max_error_rate``
    outside 0..1, an ``error_sample`` below 1 or without ``max_error_rate``, or an image
    column given twice. ``exports``: names of ``writers.exports.EXPORTS`` (one, or a list;
    ``none`` alone: no export; None: the default, COCO for a detect, point or segment run).
    ``cache`` None: the settings' ``MOONBATCH_CACHE``."""
    from moonbatch.workers.readers import INPUT_FORMATS
    from moonbatch.workers.writers import OUTPUT_FORMATS
    from moonbatch.workers.writers.exports import EXPORTS

    _choice("format", format, OUTPUT_FORMATS)
    if exports is not None:
        exports = [exports] if isinstance(exports, str) else list(exports)
        for name in exports:
            _choice("export", name, (*EXPORTS, "none"))
        if "none" in exports and len(exports) > 1:
            raise InvalidOption("--export none means no export: give it alone, or leave it out",
                                option="--export", value="none")
        exports = list(dict.fromkeys(e for e in exports if e != "none"))
    _choice("input_format", input_format, INPUT_FORMATS)
    if max_pixels is not None and max_pixels < 0:
        raise InvalidOption(f"--max-pixels {max_pixels}: must be >= 0 (0 turns downscaling off)",
                            option="--max-pixels", value=max_pixels)
    if model is not None and (not isinstance(model, str) or not model.strip()
                              or model != model.strip()):
        raise InvalidOption(f"--model {model!r}: a model name, e.g. moondream3.1 (no spaces)",
                            option="--model", value=model)
    if priority is not None:
        _choice("priority", priority, ("normal", "low"))
    if fal_store_io is not None and not isinstance(fal_store_io, bool):
        raise InvalidOption(f"--fal-store-io {fal_store_io!r}: on or off (True or False)",
                            option="--fal-store-io", value=fal_store_io)
    if queue_timeout is not None and (isinstance(queue_timeout, bool) or not isinstance(
            queue_timeout, (int, float)) or not queue_timeout > 0):
        raise InvalidOption(f"--queue-timeout {queue_timeout}: must be a number of seconds > 0",
                            option="--queue-timeout", value=queue_timeout)
    if max_cost is not None and max_cost < 0:
        raise InvalidOption(f"--max-cost {max_cost}: must be >= 0 (dollars)",
                            option="--max-cost", value=max_cost)
    if max_error_rate is not None and not 0 <= max_error_rate <= 1:
        raise InvalidOption(f"--max-error-rate {max_error_rate}: must be within 0..1 (a share "
                            "of results, e.g. 0.5)", option="--max-error-rate",
                            value=max_error_rate)
    if error_sample is not None and (error_sample < 1 or max_error_rate is None):
        raise InvalidOption(f"--error-sample {error_sample}: must be >= 1 and goes with "
                            "--max-error-rate RATE", option="--error-sample", value=error_sample)
    stop_fields: dict[str, Any] = {"max_cost": max_cost, "max_error_rate": max_error_rate}
    if max_error_rate is not None:
        stop_fields["error_sample"] = error_sample or DEFAULT_ERROR_SAMPLE
    reader: dict[str, Any] = {k: v for k, v in (("id_column", id_column), ("base", base))
                              if v is not None}
    columns = [image_column] if isinstance(image_column, str) else list(image_column or [])
    if len(set(columns)) < len(columns):
        raise InvalidOption(f"--image-column {next(c for c in columns if columns.count(c) > 1)} "
                            "is given twice: name each image column once",
                            option="--image-column")
    if columns:
        reader["image_column"] = columns[0]
    if len(columns) > 1:  # a multi-image row: one image per column, in this order
        reader["image_columns"] = columns
    given = {"priority": priority, "fal_store_io": fal_store_io, "queue_timeout": queue_timeout}
    provider_options = {PROVIDER_OPTIONS[k]: v for k, v in given.items() if v is not None}
    return {"shard_size": shard_size, "max_pixels": max_pixels, "provider": provider,
            "endpoint": endpoint, "input_format": input_format, "input_options": reader,
            "output_format": format, "skip_existing": skip_existing, "model": model,
            "provider_options": provider_options, "exports": exports, **stop_fields,
            "cache": cache, "cache_sampled": bool(cache_sampled)}


def new_spec(input_url: str, output_url: str, settings: Settings, *,
             skill: str | Sequence[str] | None = None, run_id: str | None = None,
             **options: Any):
    """The ``RunSpec`` of a new run from options by their Python names (``OPTIONS``). Raises
    ``InvalidOption`` (an unknown option name too, listing the known ones), ``RunNotFound``
    for a ``skip_existing`` run id the registry does not know."""
    from moonbatch.producer import runs

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidOption(f"unknown option {unknown[0]!r}: the options are "
                            f"{', '.join(OPTIONS)}", option=unknown[0], allowed=OPTIONS)
    opts = skill_options(skill, **{k: options.get(k) for k in SKILL_OPTIONS})
    args = spec_args(**{k: v for k, v in options.items() if k in RUN_OPTIONS and v is not None})
    _check_exports(args["exports"], opts)
    with translated():
        try:
            return runs.new_spec(input_url, output_url, opts, settings, run_id=run_id, **args)
        except ValidationError as exc:
            raise _invalid(exc) from None


def _check_exports(exports: list[str] | None, opts: Any) -> None:
    """``InvalidOption`` for an export the run's skills cannot make (``--export yolo`` of a
    caption run)."""
    from moonbatch.workers.writers.exports import refusal

    skills = [o.skill for o in (opts if isinstance(opts, list) else [opts])]
    for name in exports or ():
        why = refusal(name, skills)
        if why:
            raise InvalidOption(why, option="--export", value=name)


def prepare(spec, settings: Settings, *, allow_empty: bool = False, force: bool = False,
            broker: bool = True):
    """Everything a start checks before it writes: what OUTPUT holds and the preflight (with
    the provider's credentials). Returns the spec to start: ``spec``, or with ``force`` and
    OUTPUT holding another run, the same in OUTPUT/<new run id>/ (logged). On return OUTPUT
    was checked (``check_output_for``): ``start(..., output_checked=True)`` need not read it
    again.

    Raises ``AlreadyComplete`` (the same command completed there: nothing to do),
    ``OutputConflict``, ``PreflightError``.
    """
    from moonbatch.producer import preflight
    from moonbatch.producer.runs import AlreadyComplete, RunExists, check_output_for, new_run_id

    def check(spec):  # the spec to start, or raises what OUTPUT holds
        try:
            check_output_for(preflight.quick_store(spec.output, settings), spec)
        except AlreadyComplete:
            raise
        except RunExists as exc:
            if not force or exc.state == "planning":
                raise OutputConflict(str(exc), run_id=exc.run_id, state=exc.state) from None
            run_id = new_run_id()
            log.warning("%s holds run %s (%s); --force: starting run %s in %s%s/", spec.output,
                        exc.run_id, exc.state, run_id, spec.output, run_id)
            return spec.model_copy(update={"output": spec.output + run_id + "/",
                                           "run_id": run_id})
        return spec

    try:
        spec, checked = check(spec), True
    except (AlreadyComplete, OutputConflict):
        raise
    except Exception:
        checked = False  # OUTPUT cannot be read: the preflight below says why, in one line
    with translated():
        preflight.preflight(settings, input_url=spec.input, output_url=spec.output,
                            allow_empty=allow_empty, broker=broker, provider=spec.provider)
    if not checked:  # it can be read after all: check it now (or raise why not)
        spec = check(spec)
    from moonbatch.workers.providers import provider_for

    for warning in provider_for(spec).check_model(spec):  # a refusal was new_spec's
        log.warning("%s", warning)
    return spec


def start(spec, settings: Settings, *, output_checked: bool = False) -> dict[str, Any]:
    """Record, plan and enqueue ``spec`` (``producer.runs.start_run``); returns the plan
    document (``run_id``, ``items``, ``shards``, ``skipped``...). ``output_checked``: ``spec``
    comes from ``prepare``, which checked OUTPUT. Raises ``AlreadyComplete``,
    ``OutputConflict``, storage errors."""
    from moonbatch.producer.runs import start_run

    with translated():
        return start_run(spec, settings, output_checked=output_checked)


def estimate(spec, settings: Settings, *, allow_empty: bool = False,
             cache_check: bool = False) -> dict[str, Any]:
    """What ``spec`` would do and cost (``producer.runs.dry_run``'s report) after checking
    INPUT; writes nothing, reaches no broker, registry or provider, needs no key. Raises
    ``PreflightError``, ``InvalidOption`` (INPUT cannot be run as its kind)."""
    from moonbatch.producer import preflight
    from moonbatch.producer.runs import dry_run

    with translated():
        preflight.preflight(settings, input_url=spec.input, allow_empty=allow_empty,
                            broker=False, api_key=False, state=False)
        return dry_run(spec, settings, cache_check=cache_check)
