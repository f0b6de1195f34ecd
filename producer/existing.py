"""``--skip-existing PREVIOUS_OUTPUT``: the item ids that already have an ok row in a previous
run's results, so planning leaves them out.

Ids are kept as 8-byte digests of their canonical JSON text (``"a.jpg"``, ``7``, ``true``: an
id 7 and an id "7" differ, as they do in rows), in a sorted ``array('Q')``: 8 bytes per id
once loaded (1,000,000 ids: 8 MB; about 60 MB at the peak of loading, while sorting). Two ids
share a digest with probability ~n²/2⁶⁵ (1e-8 for 1,000,000 ids).
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from typing import Any

import orjson

from moonbatch.config import Settings
from moonbatch.workers import layout, writers
from moonbatch.workers.models import RunSpec
from moonbatch.workers.runstate import open_output
from moonbatch.workers.storage import get_json_or_none


def id_digest(item_id: Any) -> int:
    """The 8-byte digest (as an unsigned int) of an id's canonical JSON text."""
    return int.from_bytes(hashlib.blake2b(orjson.dumps(item_id), digest_size=8).digest(), "little")


class ExistingOk:
    """The ids with an ok row in the run at a previous OUTPUT (``item_id in existing``)."""

    def __init__(self, digests: array) -> None:
        self._digests = digests  # sorted

    @classmethod
    def load(cls, output_url: str, settings: Settings) -> ExistingOk:
        """Read every row of the run at ``output_url`` (any output format, through
        ``moonbatch.workers.writers``), shard by shard, keeping the digests of ok rows' ids. Shards not
        merged yet are passed over (their items count as without an ok row). Raises
        ``ValueError`` (one line with the fix) when no planned run is there, storage errors."""
        store = open_output(output_url, settings)
        raw, plan = get_json_or_none(store, layout.SPEC), get_json_or_none(store, layout.PLAN)
        if raw is None or plan is None:
            raise ValueError(f"--skip-existing {output_url}: no planned moonbatch run there: pass "
                             "the OUTPUT (or run id) of the run whose ok rows to skip")
        spec = RunSpec.model_validate(raw)
        digests = array("Q")
        for row in writers.iter_results(store, spec.output_format, plan["shards"]):
            if row.get("status") == "ok":
                digests.append(id_digest(row["id"]))
        return cls(array("Q", sorted(digests)))

    def __contains__(self, item_id: Any) -> bool:
        d = id_digest(item_id)
        i = bisect.bisect_left(self._digests, d)
        return i < len(self._digests) and self._digests[i] == d

    def __len__(self) -> int:
        return len(self._digests)
