"""fal's Moondream endpoints (seeds 000, 001, 003, 004; FACTS.md "fal queue API"): what each
serves, how it takes images, its options and prices; which endpoint a run's skill uses."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from moonbatch.workers.models import RunSpec, SkillOptions

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FalEndpoint:
    """One fal endpoint: the ``skills`` it serves, how it takes images (``"single"``: one
    ``image_url``; ``"inputs"``: a list of ``{image_url, prompt}``; ``"archive"``: a ZIP in
    ``images_data_url``), images per request, the options it accepts, its price, and the
    ``models`` it runs (the first is what it runs when none is named; ``model_field``: the
    input field that names one, None when the endpoint's model is fixed)."""

    id: str
    skills: frozenset[str]
    kind: str
    max_images: int = 1
    options: frozenset[str] = frozenset()  # of SkillOptions' tuning fields
    max_tokens_range: tuple[int, int] | None = None
    usd_per_m_input: float | None = None
    usd_per_m_output: float | None = None
    usd_per_second: float | None = None
    models: tuple[str, ...] = ("moondream3-preview",)
    model_field: str | None = None


_M3 = dict(usd_per_m_input=0.40, usd_per_m_output=3.50)  # FACTS.md prices
ENDPOINTS: dict[str, FalEndpoint] = {e.id: e for e in (
    FalEndpoint("fal-ai/moondream3-preview/caption", frozenset({"caption"}), "single",
                options=frozenset({"length", "temperature", "top_p"}), **_M3),
    FalEndpoint("fal-ai/moondream3-preview/query", frozenset({"query"}), "single",
                options=frozenset({"question", "reasoning", "temperature", "top_p"}), **_M3),
    FalEndpoint("fal-ai/moondream3-preview/detect", frozenset({"detect"}), "single",
                options=frozenset({"object"}), **_M3),
    FalEndpoint("fal-ai/moondream3-preview/point", frozenset({"point"}), "single",
                options=frozenset({"object"}), **_M3),
    FalEndpoint("fal-ai/moondream2/visual-query", frozenset({"query", "caption"}), "single",
                options=frozenset({"question", "length"}), models=("moondream2",)),
    # Seed 001: ``model_id``, enum vikhyatk/moondream2 (default) | fal-ai/moondream2-docci.
    FalEndpoint("fal-ai/moondream/batched", frozenset({"query", "caption"}), "inputs",
                max_images=32, options=frozenset({"question", "length", "max_tokens",
                                                  "temperature", "top_p"}),
                max_tokens_range=(32, 1024),
                models=("vikhyatk/moondream2", "fal-ai/moondream2-docci"),
                model_field="model_id"),
    FalEndpoint("fal-ai/moondream-next/batch", frozenset({"caption", "query"}), "archive",
                max_images=32, options=frozenset({"question", "length", "max_tokens"}),
                max_tokens_range=(1, 512), usd_per_second=0.0011, models=("moondream-next",)),
)}

def default_endpoint(skill: str) -> str:
    """``fal-ai/moondream3-preview/<skill>``: the endpoint for a skill when none is given."""
    return f"fal-ai/moondream3-preview/{skill}"


def endpoint_of(spec: RunSpec) -> FalEndpoint:
    """The run's endpoint; ``ValueError`` naming the known ones for an unknown id."""
    name = spec.endpoint or default_endpoint(spec.options.skill)
    if name not in ENDPOINTS:
        raise ValueError(f"unknown fal endpoint {name!r}: use one of {', '.join(ENDPOINTS)}")
    return ENDPOINTS[name]


def skill_endpoints(spec: RunSpec) -> list[FalEndpoint]:
    """The endpoint of each of the run's skills (``spec.all_options`` order): the run's
    endpoint for a single skill; ``fal-ai/moondream3-preview/<skill>`` for each skill of a
    multi-skill run. Raises ``ValueError`` (one line with the fix) for a multi-skill run with
    another ``--endpoint``."""
    if not spec.multi_skill:
        return [endpoint_of(spec)]
    if spec.endpoint not in (None, default_endpoint(spec.options.skill)):
        raise ValueError(f"several skills on fal use fal-ai/moondream3-preview/<skill> for each: "
                         f"leave --endpoint {spec.endpoint} out, or run one skill")
    return [ENDPOINTS[default_endpoint(o.skill)] for o in spec.all_options]


def check_options(endpoint: FalEndpoint, options: SkillOptions) -> None:
    """Refuse a skill or an option ``endpoint`` cannot serve: ``ValueError`` with one line
    naming the endpoint, the cause and the fix."""
    if options.skill not in endpoint.skills:
        serving = [e.id for e in ENDPOINTS.values() if options.skill in e.skills]
        raise ValueError(f"fal endpoint {endpoint.id} serves --skill "
                         f"{' or '.join(sorted(endpoint.skills))}, not {options.skill}: use "
                         f"--endpoint {' or '.join(serving)}")
    given = {k for k in ("length", "reasoning", "temperature", "top_p", "max_tokens")
             if getattr(options, k) is not None}
    refused = sorted(given - endpoint.options)
    if refused:
        names = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise ValueError(f"fal endpoint {endpoint.id} does not take {names}: leave "
                         f"{'it' if len(refused) == 1 else 'them'} out")
    if options.temperature is not None and options.temperature > 1:
        raise ValueError(f"fal endpoint {endpoint.id} takes --temperature within 0..1")
    lo_hi = endpoint.max_tokens_range
    if options.max_tokens is not None and lo_hi and not lo_hi[0] <= options.max_tokens <= lo_hi[1]:
        raise ValueError(f"fal endpoint {endpoint.id} takes --max-tokens within "
                         f"{lo_hi[0]}..{lo_hi[1]}")


def check_model(endpoint: FalEndpoint, model: str | None) -> None:
    """Refuse ``model`` (None: the endpoint's own) unless ``endpoint`` runs it: ``ValueError``
    with one line naming the models it runs and the fix."""
    if model is None or model in endpoint.models:
        return
    choices = " or ".join(endpoint.models)
    serving = sorted(e.id for e in ENDPOINTS.values() if model in e.models)
    where = f"use --endpoint {' or '.join(serving)}" if serving else \
        "for Moondream's own models use --provider moondream"
    raise ValueError(f"--model {model}: fal endpoint {endpoint.id} runs {choices} only (its "
                     f"model is fixed): choose --model {choices}, leave --model (and "
                     f"MOONBATCH_MODEL) out, or {where}")


def entry_endpoint(entry: dict[str, Any], default: FalEndpoint) -> FalEndpoint:
    """The endpoint a ledger entry's request went to: its ``endpoint`` (multi-skill rounds)
    when that names a known one, else ``default`` (the run's)."""
    name = entry.get("endpoint")
    return ENDPOINTS.get(name, default) if isinstance(name, str) else default
