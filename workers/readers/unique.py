"""Unique keys across a listing in 8 bytes per key.

A set of the keys themselves costs ~100 bytes per key (about 1 GB for 10,000,000 listed keys);
``UniqueKeys`` keeps a 64-bit digest per key and sorts them once the listing ends. A repeated
digest (a duplicate key, or a rare collision) is confirmed and named by a second pass over the
listing in which only the keys with a repeated digest are kept.

The digest is Python's own ``hash`` of the key (SipHash, salted per process): both passes run
in one process, and it is ten times cheaper than a blake2b digest (1,000,000 keys: 0.8 s vs
7.8 s; a set of the keys: 0.3 s and ~115 MB).
"""

from __future__ import annotations

from array import array
from typing import Any

_MASK = (1 << 64) - 1


def digest(key: str) -> int:
    """The key's 64-bit digest in this process (``hash``, as an unsigned number)."""
    return hash(key) & _MASK


class UniqueKeys:
    """The keys of one listing pass (see the module docstring).

    First pass (``UniqueKeys()``): ``seen_at(key)`` records the key and returns None;
    ``suspects()`` then gives the repeated digests (empty: every key was unique). Second pass
    (``UniqueKeys(suspects)``): ``seen_at(key, where)`` returns where a key whose digest is a
    suspect first stood, at its second occurrence, so the caller can name both places."""

    def __init__(self, suspects: frozenset[int] | None = None) -> None:
        self._suspects = suspects
        self._digests = array("Q")
        self._first: dict[str, Any] = {}  # second pass: where the suspects' keys first stood

    def seen_at(self, key: str, where: Any = True) -> Any | None:
        """Record ``key`` (standing at ``where``); None, or in a second pass, for a key met
        before in it, where it first stood."""
        d = digest(key)
        if self._suspects is None:
            self._digests.append(d)
            return None
        if d not in self._suspects:
            return None
        if key in self._first:
            return self._first[key]
        self._first[key] = where
        return None

    def suspects(self) -> frozenset[int]:
        """The digests recorded more than once in a first pass (sorted with numpy: 8 bytes per
        key again while sorting)."""
        import numpy as np

        if len(self._digests) < 2:
            return frozenset()
        ordered = np.sort(np.frombuffer(self._digests, dtype=np.uint64))
        self._digests = array("Q")
        return frozenset(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
