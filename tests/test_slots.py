"""moonbatch.workers.slots: the fleet-wide concurrency cap, in a real (private) Redis."""

from __future__ import annotations

import time
import uuid

import pytest

from moonbatch.config import Settings
from moonbatch.workers.slots import Slots, SlotsUnavailable


def test_the_cap_holds_across_holders_and_heals(redis_server):
    settings = Settings(broker_url=redis_server.url(5))
    name = "fal-ai/test/" + uuid.uuid4().hex
    a, b = Slots(settings, name, cap=3, ttl=1.0), Slots(settings, name, cap=3, ttl=1.0)
    assert a.acquire(["a1", "a2"]) == ["a1", "a2"]
    assert b.acquire(["b1", "b2", "b3"]) == ["b1"]  # two processes, one cap
    assert a.acquire(["a1", "a2", "a3"]) == ["a1", "a2"]  # held slots are kept, none more
    assert a.held() == 3
    a.release(["a1"])
    assert b.acquire(["b2", "b3"]) == ["b2"]
    time.sleep(1.2)  # nobody refreshed: a dead holder's slots free themselves
    assert a.held() == 0
    assert b.acquire(["b4", "b5", "b6", "b7"]) == ["b4", "b5", "b6"]


def test_an_unreachable_redis_is_a_transient_error():
    settings = Settings(broker_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    with pytest.raises(SlotsUnavailable):
        Slots(settings, "x", cap=1, ttl=1.0).acquire(["h"])
