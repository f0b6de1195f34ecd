"""Moondream's own price list: dollars per million tokens of each model, real-time and batch.

Shared by the providers that serve Moondream's models on Moondream's own infrastructure (the
Batch API, the real-time API); fal's prices are fal's (``moonbatch.workers.providers.fal.endpoints``).

Source: moondream.ai/pricing, as transcribed on 2026-10-07. Batch is half the real-time price
(docs.moondream.ai/batch). Moondream 3.1: $0.30 input / $1.00 output per million tokens
real-time; Moondream 3 Preview: $0.30 / $2.50. The API's identifier of 3.1 is not published
where we could read it: both spellings below are accepted, and any other model string is sent
as given and priced as the dearest known model (so a budget is never under-counted), which the
dry run says.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Mode = Literal["realtime", "batch"]

#: Where the table comes from, for dry-run and README text.
SOURCE = "moondream.ai/pricing (2026-10-07); batch is half the real-time price"
#: The model the Moondream APIs use when a request names none (docs.moondream.ai/batch).
DEFAULT_MODEL = "moondream3-preview"


@dataclasses.dataclass(frozen=True)
class ModelPrice:
    """One model's price in ``mode``: ``usd_per_m_input``/``usd_per_m_output`` dollars per
    million tokens; ``model`` is the table's name for it; ``known`` is False when the model
    asked for is not in the table (the dearest known price stands in)."""

    model: str
    mode: Mode
    usd_per_m_input: float
    usd_per_m_output: float
    known: bool = True

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """Dollars for ``input_tokens`` and ``output_tokens``."""
        return (input_tokens * self.usd_per_m_input
                + output_tokens * self.usd_per_m_output) / 1e6

    def label(self) -> str:
        """``"moondream3-preview batch: $0.15/M input, $1.25/M output tokens"``."""
        text = (f"{self.model} {self.mode}: ${self.usd_per_m_input:g}/M input, "
                f"${self.usd_per_m_output:g}/M output tokens")
        return text if self.known else text + " (model not in the price table: dearest price)"


#: Real-time list prices, dollars per million tokens (input, output).
REALTIME_USD_PER_M: dict[str, tuple[float, float]] = {
    "moondream3-preview": (0.30, 2.50),
    "moondream3.1": (0.30, 1.00),
    "moondream3.1-9B-A2B": (0.30, 1.00),
}
BATCH_DISCOUNT = 0.5


def base_model(model: str | None) -> str:
    """The base model of ``model``: None → the default; a finetune
    ``moondream3-preview/<finetune_id>@<step>`` is priced as its base (before the ``/``)."""
    if not model:
        return DEFAULT_MODEL
    return model.split("/", 1)[0]


def model_price(model: str | None, mode: Mode) -> ModelPrice:
    """The price of ``model`` (None: the API's default) in ``mode``. Never raises: a model
    not in the table gets the dearest known price with ``known=False``."""
    name = base_model(model)
    factor = BATCH_DISCOUNT if mode == "batch" else 1.0
    if name in REALTIME_USD_PER_M:
        i, o = REALTIME_USD_PER_M[name]
        return ModelPrice(name, mode, i * factor, o * factor)
    i = max(p[0] for p in REALTIME_USD_PER_M.values())
    o = max(p[1] for p in REALTIME_USD_PER_M.values())
    return ModelPrice(name, mode, i * factor, o * factor, known=False)
