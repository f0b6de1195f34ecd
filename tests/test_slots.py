"""moonbatch.workers.slots: the fleet-wide concurrency cap, in a real (private) Redis."""

from __future__ import annotations

import time
import uuid

import pytest

from moonbatch.config import Settings
from moonbatch.workers.slots import Rate, Slots, SlotsUnavailable, take_paced


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


@pytest.mark.parametrize("broker", ["redis", "memory"])
def test_a_paced_take_is_slots_and_sends_in_one_call(redis_server, broker):
    """``take_paced`` (slots given back, slots taken, sends counted: one Redis call) grants
    what ``Slots`` and ``Rate`` would one after the other: no holder beyond the cap or the
    rate; the wait for the rate window only when a slot was free; the slots it gives back are
    free again in the same call. A broker that is not Redis gets the same from the local books."""
    settings = Settings(broker_url=redis_server.url(5) if broker == "redis" else "memory://")
    name = "realtime-test/" + uuid.uuid4().hex
    cap, rate = Slots(settings, name, cap=3, ttl=10.0), Rate(settings, name, 4)
    granted, wait = take_paced(cap, rate, ["a", "b"], "t1")
    assert granted == ["a", "b"] and wait == 0
    granted, wait = take_paced(cap, rate, ["c", "d"], "t2")
    assert granted == ["c"] and wait == 0  # the cap: 3 slots
    granted, wait = take_paced(cap, rate, ["d"], "t3")
    assert granted == [] and wait == 0  # no slot free: no wait for the rate
    granted, wait = take_paced(cap, rate, ["d", "e"], "t4", release=["a", "b"])
    assert granted == ["d"] and 0 < wait <= 1.0  # 4 sends in the window: the rate's bound
    assert cap.held() == 2  # c and d; e got no send, so no slot
    time.sleep(wait + 0.05)
    granted, _ = take_paced(cap, rate, ["e"], "t5", release=["c"])
    assert granted == ["e"] and cap.held() == 2
