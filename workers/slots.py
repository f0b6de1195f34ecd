"""A fleet-wide concurrency cap: counted slots in the broker's Redis.

A provider that runs many small requests (fal's queue) must keep its account's concurrency cap
full across every worker without passing it (fal answers 429 beyond it; FACTS.md). Each request
in flight holds one slot of its endpoint: a member of the sorted set
``moonbatch:slots:<endpoint>`` scored by its expiry time. Holders refresh their slots at every
step and release them when the request is finished; the slots of a worker that died expire
after ``ttl`` seconds, so the cap heals by itself. Acquiring is one Lua call (atomic).

Brokers that are not Redis get a per-process cap instead (one machine's workers may then
together exceed it; fal's 429 answers are backed off).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from moonbatch.config import Settings
from moonbatch.workers.canary import broker_redis
from moonbatch.workers.providers import TransientProviderError

PREFIX = "moonbatch:slots:"

# KEYS[1] the set; ARGV: now, ttl, cap, holder...: holders that already hold a slot keep it
# (and are refreshed); the others get one while fewer than cap are held. Returns the granted.
_ACQUIRE = """
local key, now, ttl, cap = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local n = redis.call('ZCARD', key)
local granted = {}
for i = 4, #ARGV do
  if redis.call('ZSCORE', key, ARGV[i]) then
    redis.call('ZADD', key, now + ttl, ARGV[i])
    table.insert(granted, ARGV[i])
  elseif n < cap then
    redis.call('ZADD', key, now + ttl, ARGV[i])
    n = n + 1
    table.insert(granted, ARGV[i])
  end
end
redis.call('EXPIRE', key, math.ceil(ttl * 2))
return granted
"""

class SlotsUnavailable(TransientProviderError):
    """The broker's Redis could not be reached to count slots: the step is tried again later."""


_local: dict[str, dict[str, float]] = {}
_local_lock = threading.Lock()


class Slots:
    """The slots of one ``name`` (e.g. a fal endpoint id), at most ``cap`` held at once across
    every process sharing the broker; a slot unrefreshed for ``ttl`` seconds is free again."""

    def __init__(self, settings: Settings, name: str, cap: int, ttl: float) -> None:
        self.key, self.cap, self.ttl = PREFIX + name, cap, ttl
        self._redis = broker_redis(settings)
        self._script = self._redis.register_script(_ACQUIRE) if self._redis is not None else None
        self._paced = self._redis.register_script(_PACED) if self._redis is not None else None

    def acquire(self, holders: Sequence[str]) -> list[str]:
        """Take (or refresh) a slot for each holder, in order, while the cap allows; returns
        the holders that hold one now. Raises ``SlotsUnavailable`` when Redis cannot be reached."""
        if not holders:
            return []
        now = time.time()
        if self._script is not None:
            try:
                got = self._script(keys=[self.key], args=[now, self.ttl, self.cap, *holders])
            except Exception as exc:  # redis errors: retry the step, never fail the run
                raise SlotsUnavailable(f"slots of {self.key}: {type(exc).__name__}") from None
            return [g.decode() if isinstance(g, bytes) else g for g in got]
        with _local_lock:
            held = _local.setdefault(self.key, {})
            for h, expiry in list(held.items()):
                if expiry <= now:
                    del held[h]
            granted = []
            for h in holders:
                if h in held or len(held) < self.cap:
                    held[h] = now + self.ttl
                    granted.append(h)
            return granted

    def release(self, holders: Sequence[str]) -> None:
        """Free the holders' slots (unknown holders are ignored). Raises ``SlotsUnavailable``."""
        if not holders:
            return
        if self._redis is not None:
            try:
                self._redis.zrem(self.key, *holders)
            except Exception as exc:  # unreleased slots expire after ttl
                raise SlotsUnavailable(f"slots of {self.key}: {type(exc).__name__}") from None
            return
        with _local_lock:
            held = _local.setdefault(self.key, {})
            for h in holders:
                held.pop(h, None)

    def held(self) -> int:
        """How many slots are held now (expired ones not counted)."""
        now = time.time()
        if self._redis is not None:
            return int(self._redis.zcount(self.key, f"({now}", "+inf"))
        with _local_lock:
            return sum(1 for e in _local.get(self.key, {}).values() if e > now)


RATE_PREFIX = "moonbatch:rate:"

# KEYS[1] the window's set; ARGV: now, window, cap, n, token. Drops sends older than the
# window, grants up to n while fewer than cap were sent within it, records them. Returns
# {granted, milliseconds until the oldest send leaves the window (0: room now)}.
_RATE = """
local key, now, window = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local cap, n, token = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local used = redis.call('ZCARD', key)
local granted = math.max(0, math.min(n, cap - used))
for i = 1, granted do
  redis.call('ZADD', key, now, token .. ':' .. i)
end
local wait = 0
if used + granted >= cap then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if oldest[2] then wait = math.max(0, tonumber(oldest[2]) + window - now) end
end
redis.call('PEXPIRE', key, math.ceil(window * 2000))
return {granted, math.ceil(wait * 1000)}
"""

_local_rates: dict[str, list[float]] = {}


class Rate:
    """A fleet-wide rate limit of ``per_second`` sends per second on ``name`` (e.g. an API's
    key): a sliding window (1 s, or ``1/per_second`` s below one send a second) of the sends
    made, as a sorted set ``moonbatch:rate:<name>`` in the broker's Redis, taken by one Lua call
    (atomic). Brokers that are not Redis get a per-process window (the service's 429 answers
    are then backed off)."""

    def __init__(self, settings: Settings, name: str, per_second: float) -> None:
        self.key = RATE_PREFIX + name
        self.window = 1.0 if per_second >= 1 else 1.0 / per_second
        self.cap = max(1, round(per_second * self.window))
        self._redis = broker_redis(settings)
        self._script = self._redis.register_script(_RATE) if self._redis is not None else None

    def take(self, n: int, token: str) -> tuple[int, float]:
        """Take up to ``n`` sends now (``token``: unique to the caller, e.g. a uuid); returns
        ``(granted, seconds until the window has room again: 0 when it has now)``. Raises
        ``SlotsUnavailable`` when Redis cannot be reached."""
        if n <= 0:
            return 0, 0.0
        now = time.time()
        if self._script is not None:
            try:
                granted, wait_ms = self._script(
                    keys=[self.key], args=[now, self.window, self.cap, n, token])
            except Exception as exc:  # redis errors: retry the step, never fail the run
                raise SlotsUnavailable(f"rate of {self.key}: {type(exc).__name__}") from None
            return int(granted), int(wait_ms) / 1000
        with _local_lock:
            sent = [t for t in _local_rates.get(self.key, []) if t > now - self.window]
            granted = max(0, min(n, self.cap - len(sent)))
            sent += [now] * granted
            _local_rates[self.key] = sent
            wait = max(0.0, sent[0] + self.window - now) if len(sent) >= self.cap else 0.0
            return granted, wait


# KEYS[1] the slots' set, KEYS[2] the rate window's; ARGV: now, ttl, cap, window, rate cap,
# token, r, r holders to release, then the holders that want a slot and a send. ``Slots``'s
# acquire and ``Rate``'s take in one call: a holder gets a slot (as _ACQUIRE) only while the
# window has room for its send. Returns {milliseconds until the window has room (as _RATE,
# 0 when no slot was free), granted holders...}.
_PACED = """
local skey, rkey = KEYS[1], KEYS[2]
local now, ttl, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window, rcap, token, r = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
for i = 8, 7 + r do
  redis.call('ZREM', skey, ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', skey, '-inf', now)
redis.call('ZREMRANGEBYSCORE', rkey, '-inf', now - window)
local used = redis.call('ZCARD', rkey)
local n = redis.call('ZCARD', skey)
local out = {0}
local free = 0
for i = 8 + r, #ARGV do
  local holds = redis.call('ZSCORE', skey, ARGV[i])
  if holds or n < cap then
    free = free + 1
    if used + #out - 1 < rcap then
      redis.call('ZADD', skey, now + ttl, ARGV[i])
      if not holds then n = n + 1 end
      table.insert(out, ARGV[i])
    end
  end
end
local granted = #out - 1
for i = 1, granted do
  redis.call('ZADD', rkey, now, token .. ':' .. i)
end
if free > 0 and used + granted >= rcap then
  local oldest = redis.call('ZRANGE', rkey, 0, 0, 'WITHSCORES')
  if oldest[2] then out[1] = math.ceil(math.max(0, tonumber(oldest[2]) + window - now) * 1000) end
end
redis.call('EXPIRE', skey, math.ceil(ttl * 2))
redis.call('PEXPIRE', rkey, math.ceil(window * 2000))
return out
"""


def take_paced(slots: Slots, rate: Rate, holders: Sequence[str], token: str,
               release: Sequence[str] = ()) -> tuple[list[str], float]:
    """Free the ``release`` holders' slots, then give each of ``holders`` in order a slot of
    ``slots`` and a send of ``rate`` while both allow: one Redis call for what
    ``Slots.release``, ``Slots.acquire``, ``Rate.take`` and the release of the slots beyond the
    sends would take four. ``token``: unique to the caller. Returns ``(the holders granted,
    seconds until the rate window has room again: 0 when it has now or no slot was free)``.
    Raises ``SlotsUnavailable`` when Redis cannot be reached."""
    if slots._redis is None or rate._redis is None:
        slots.release(release)
        granted = slots.acquire(holders)
        permits, wait = rate.take(len(granted), token)
        slots.release(granted[permits:])
        return granted[:permits], wait
    if not holders and not release:
        return [], 0.0
    script = slots._paced
    try:
        out = script(keys=[slots.key, rate.key], args=[
            time.time(), slots.ttl, slots.cap, rate.window, rate.cap, token, len(release),
            *release, *holders])
    except Exception as exc:  # redis errors: retry the step, never fail the run
        raise SlotsUnavailable(f"slots of {slots.key}: {type(exc).__name__}") from None
    return [g.decode() if isinstance(g, bytes) else g for g in out[1:]], int(out[0]) / 1000
