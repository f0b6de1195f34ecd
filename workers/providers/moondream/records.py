"""The Batch API's own state documents of a round (``upload.json``, ``submit.json``) and its batch
claims in the state store (``batches/<batch_id>.json``: which run, shard and round own a batch, so
a batch found again after a lost answer is adopted by one round only)."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from moonbatch.workers import layout
from moonbatch.workers.storage import Store, get_json_or_none, put_json


class UploadRecord(BaseModel):
    """A multipart upload in flight (seed 002, "Initialize upload"): recorded before any part."""

    file_id: str
    upload_id: str
    created_at: float


class SubmitRecord(BaseModel):
    """An ``mpu-complete`` sent for a round whose answer is not recorded yet: written just
    before the call, so that an attempt that lost the answer (or died waiting for it) can find
    the batch it created instead of paying for another. ``checks`` counts the searches;
    ``rejected`` lists completed batches whose results showed they are not this round's (so
    later searches do not download them again).

    It is also the round's **claim**: created only if absent, so at most one execution
    (``attempt``, a token of its own) calls ``mpu-complete`` for the round; ``upload_id`` is
    that execution's upload (aborted if the claim turns out dead)."""

    file_id: str
    lines: int
    bytes: int
    sent_at: float  # unix seconds, this machine's clock
    checks: int = 0
    rejected: list[str] = Field(default_factory=list)
    attempt: str = ""
    upload_id: str = ""


def claim_batch(state: Store, batch_id: str, *, output: str, shard: int, rnd: int) -> bool:
    """Record that round ``rnd`` of ``shard`` of the run at ``output`` owns ``batch_id``.

    True if this call made the claim or the same round held it already; False if another
    round owns the batch.
    """
    if put_json(state, layout.registry_batch(batch_id),
                {"output": output, "shard": shard, "round": rnd, "at": time.time()},
                if_absent=True):
        return True
    return _owned_by(batch_owner(state, batch_id), output, shard, rnd)


def _owned_by(claim: dict[str, Any] | None, output: str, shard: int, rnd: int) -> bool:
    """True if ``claim`` (a ``batches/`` document, or None) names this round."""
    return claim is not None and (claim.get("output"), claim.get("shard"),
                                  claim.get("round")) == (output, shard, rnd)


def batch_owner(state: Store, batch_id: str) -> dict[str, Any] | None:
    """The claim on ``batch_id`` (``{"output", "shard", "round", "at"}``), or None."""
    return get_json_or_none(state, layout.registry_batch(batch_id))


class BatchClaims:
    """The claims of one round (run at ``output``, ``shard``, ``rnd``) in the state store."""

    def __init__(self, state: Store, *, output: str, shard: int, rnd: int) -> None:
        self.state, self.output, self.shard, self.rnd = state, output, shard, rnd

    def claim(self, batch_id: str) -> bool:
        """Claim ``batch_id`` for this round; False if another round owns it."""
        return claim_batch(self.state, batch_id, output=self.output, shard=self.shard,
                           rnd=self.rnd)

    def taken(self, batch_id: str) -> bool:
        """True if another round owns ``batch_id``."""
        owner = batch_owner(self.state, batch_id)
        return owner is not None and not _owned_by(owner, self.output, self.shard, self.rnd)
