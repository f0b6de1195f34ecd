"""Leases over real storage: exclusive, expiring, taken over atomically."""

from __future__ import annotations

import threading
import uuid

import pytest

from moonbatch.workers.lease import Lease, LeaseLost, execution_owner, lease_is_live, task_of
from moonbatch.workers.storage import LocalStore, S3Store, s3_client


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path)
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("bucket")
    return S3Store(bucket, "state/", s3_client(endpoint))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_exclusive_until_expired_then_taken_over(store):
    clock = Clock()
    a = Lease(store, "lease.json", "a", 10, clock)
    b = Lease(store, "lease.json", "b", 10, clock)
    assert a.acquire() and not b.acquire()
    assert a.acquire()  # re-entrant for its owner (a redelivered message)
    clock.t += 5
    a.renew(force=True)
    clock.t += 8
    assert not b.acquire()  # renewed 8 s ago: still live
    clock.t += 3
    assert b.acquire()  # expired: taken over
    with pytest.raises(LeaseLost):
        a.renew(force=True)
    b.release()
    assert not lease_is_live(store, "lease.json", clock.t)
    assert a.acquire()


def test_only_one_of_many_takers_wins_an_expired_lease(store):
    clock = Clock()
    assert Lease(store, "l.json", "dead", 1, clock).acquire()
    clock.t += 5
    wins = []
    barrier = threading.Barrier(6)

    def take(name: str) -> None:
        barrier.wait()
        if Lease(store, "l.json", name, 10, clock).acquire():
            wins.append(name)

    threads = [threading.Thread(target=take, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_concurrent_renewals_by_the_owner_never_lose_it(store):
    lease = Lease(store, "k.json", "me", 30)
    assert lease.acquire()
    errors = []

    def renew() -> None:
        try:
            for _ in range(5):
                lease.renew(force=True)
        except LeaseLost as exc:
            errors.append(exc)

    threads = [threading.Thread(target=renew) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_kept_alive_renews_in_the_background(store):
    lease = Lease(store, "bg.json", "me", 0.4)
    assert lease.acquire()
    import time

    with lease.kept_alive() as check:
        time.sleep(1.0)  # 2.5 ttl: would have expired without renewals
        check()
        assert lease_is_live(store, "bg.json")
        assert not Lease(store, "bg.json", "other", 0.4).acquire()


def test_two_executions_of_one_task_id_never_hold_the_lease_together(store):
    """A broker redelivers a running task with its task id: the copy must find the lease held
    (and by whom), not share it with the running execution."""
    clock = Clock()
    task_id = str(uuid.uuid4())
    first = Lease(store, "task.json", execution_owner(task_id), 10, clock)
    copy = Lease(store, "task.json", execution_owner(task_id), 10, clock)
    assert first.owner != copy.owner and task_of(first.owner) == task_of(copy.owner) == task_id
    assert first.acquire()
    assert not copy.acquire()  # the redelivered copy waits
    assert copy.holder == first.owner and task_of(copy.holder) == task_id
    assert copy.holder_expires == clock.t + 10
    copy.release()  # not its lease: left alone
    assert lease_is_live(store, "task.json", clock.t)
    with pytest.raises(LeaseLost):
        copy.renew(force=True)
    clock.t += 5
    first.renew(force=True)
    clock.t += 8
    assert not copy.acquire()  # renewed: the running execution keeps it
    first.release()
    assert copy.acquire()
    with pytest.raises(LeaseLost):  # the first execution, had it stalled, stops at its renewal
        first.renew(force=True)


def test_a_release_never_frees_a_lease_taken_over_from_a_stalled_holder(store):
    """A holder that renewed recently releases at once (one delete, no look: nobody could have
    taken it over); one that stalled past its lease looks first and leaves the new holder's
    lease alone, whichever the order of their releases."""
    clock = Clock()
    a = Lease(store, "stall.json", "a", 10, clock)
    b = Lease(store, "stall.json", "b", 10, clock)
    assert a.acquire()
    clock.t += 7  # renewed 7 s ago, under 3/4 of its 10 s: surely still a's
    a.release()
    assert not lease_is_live(store, "stall.json", clock.t) and b.acquire()
    b.release()
    assert a.acquire()
    clock.t += 11  # a stalled: its lease expired and b takes it over
    assert b.acquire()
    a.release()  # looks, finds b's lease, leaves it
    assert lease_is_live(store, "stall.json", clock.t)
    with pytest.raises(LeaseLost):
        a.renew(force=True)
    a.release()
    assert lease_is_live(store, "stall.json", clock.t)
    b.release()
    assert not lease_is_live(store, "stall.json", clock.t)


def test_a_renewal_after_its_own_write_reads_nothing_and_still_sees_a_takeover(store):
    reads: list[str] = []
    get_versioned = store.get_versioned

    def counted(key: str) -> tuple[bytes, str]:
        reads.append(key)
        return get_versioned(key)

    store.get_versioned = counted  # the real store, its reads counted
    clock = Clock()
    a = Lease(store, "lease.json", "a", ttl=10, clock=clock)
    assert a.acquire()
    a.renew(force=True)  # created with the version the create returned: no read
    assert reads == []
    a.renew(force=True)
    clock.t += 3
    a.renew()
    assert reads == []  # each renewal swapped against the version it wrote last
    clock.t += 11  # expired: another owner takes it over
    b = Lease(store, "lease.json", "b", ttl=10, clock=clock)
    assert b.acquire()
    with pytest.raises(LeaseLost):
        a.renew(force=True)  # the swap fails, the read shows the new owner
    reads.clear()
    b.renew(force=True)  # a takeover writes by compare-and-swap: its version is known
    assert reads == []
