"""Eviction policies and the ObjectTable: capacity, leases (each holder's own, expiring), refcounts, quotas, priorities."""

import time

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stratacache.backends.eviction import LruPolicy
from stratacache.backends.residency import ObjectTable
from stratacache.core.artifact import ArtifactMeta
from stratacache.core.keys import ArtifactKey


def K(i, kind="kv"):
    return ArtifactKey(kind, "ns", str(i))


def meta(n):
    return ArtifactMeta(size=n, checksum=0)


NOFREE = lambda e: None  # noqa: E731


def put(t: ObjectTable, key, size):
    e = t.admit(key, meta(size), lambda s: "loc", NOFREE)
    if e is not None:
        t.publish(e, NOFREE)
    return e is not None


def test_lru_order():
    p = LruPolicy()
    for i in range(5):
        p.insert(i, 1)
    p.touch(0)
    assert p.victim(lambda k: True) == 1
    assert p.victim(lambda k: k != 2) == 3


def test_s3fifo_is_scan_resistant():
    """A hot set touched repeatedly survives a long one-pass scan; under LRU it does not."""
    def run(policy_name):
        t = ObjectTable(100, policy_name)
        hot = [K(f"hot{i}") for i in range(20)]
        for k in hot:
            put(t, k, 1)
        for _ in range(3):
            for k in hot:
                e = t.acquire(k)
                t.release(e, NOFREE)
        for i in range(1000):
            put(t, K(f"scan{i}"), 1)
        return sum(k in t for k in hot)
    assert run("s3fifo") == 20
    assert run("lru") == 0


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(["lru", "s3fifo"]),
       ops=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 40), st.sampled_from(["put", "get", "pin", "del"])),
                    max_size=150))
def test_capacity_never_exceeded_and_pins_respected(policy, ops):
    t = ObjectTable(100, policy, lease_s=60)
    pinned = set()
    for i, size, op in ops:
        k = K(i)
        if op == "put":
            before_pinned = {p for p in pinned if p in t and p != k}
            ok = put(t, k, size)
            assert all(p in t for p in before_pinned), "a pinned object was evicted"
            if ok:
                assert k in t
        elif op == "get":
            e = t.acquire(k)
            if e:
                t.release(e, NOFREE)
        elif op == "pin":
            if t.pin(k):
                pinned.add(k)
        else:
            t.remove(k, NOFREE)
            pinned.discard(k)
        assert t.used <= t.capacity
        assert t.used == sum(e.size for e in t.entries.values()) + sum(e.size for e in t._detached)
        assert len(t.policy) == len(t.entries)


def test_refcount_blocks_eviction_and_defers_free():
    freed = []
    t = ObjectTable(10, "lru")
    free = freed.append
    e = t.admit(K(1), meta(10), lambda s: "a", free)
    t.publish(e, free)
    reader = t.acquire(K(1))
    assert t.admit(K(2), meta(5), lambda s: "b", free) is None     # only object is being read
    t.remove(K(1), free)                                           # deleted while read
    assert freed == [] and t.used == 10                            # space still held
    t.release(reader, free)
    assert freed == [e] and t.used == 0


def test_leases_expire_so_a_leaked_pin_cannot_fill_the_tier():
    t = ObjectTable(10, "s3fifo", lease_s=0.05)
    assert put(t, K(1), 10)
    assert t.pin(K(1))                                             # never unpinned
    assert not put(t, K(2), 10)
    time.sleep(0.08)
    assert put(t, K(2), 10) and K(1) not in t


def test_release_lease_ends_exactly_that_lease():
    """Two holders lease one object; each release ends only its own lease (unpin used to
    pop whichever lease came last, so A's release could end B's hold)."""
    t = ObjectTable(10, "lru", lease_s=60)
    assert put(t, K(1), 10)
    entry_a, deadline_a = t.pin(K(1), lease_s=30)      # A: the later deadline
    entry_b, deadline_b = t.pin(K(1), lease_s=10)      # B
    assert entry_a is entry_b and deadline_a != deadline_b
    assert not put(t, K(2), 10)
    t.release_lease(entry_a, deadline_a, NOFREE)
    assert entry_a.leases == [deadline_b]              # B's lease, not A's, is left
    assert not put(t, K(2), 10)                        # B still holds it
    t.release_lease(entry_a, deadline_a, NOFREE)       # releasing twice changes nothing
    assert not put(t, K(2), 10)
    t.release_lease(entry_b, deadline_b, NOFREE)
    assert put(t, K(2), 10)


def test_quota_evicts_only_the_same_kind():
    t = ObjectTable(100, "lru", quotas={"kv": 30}, priorities={"kv": 0, "params": 10})
    assert put(t, K(0, "params"), 40)
    for i in range(10):
        assert put(t, K(i), 10)
        assert t.used_by_kind["kv"] <= 30
    assert K(0, "params") in t
    assert not put(t, K(99), 31)                                   # larger than the quota


def test_kv_never_evicts_higher_priority_params():
    t = ObjectTable(100, "s3fifo", priorities={"kv": 0, "params": 10})
    for i in range(8):
        assert put(t, K(i, "params"), 10)
    for i in range(50):
        put(t, K(i), 10)
    assert all(K(i, "params") in t for i in range(8))
    assert t.used_by_kind["kv"] <= 20
    assert put(t, K(100, "params"), 10)                            # params may evict kv
    assert not put(t, K(101), 30)                                  # kv may not evict params


def test_overwrite_replaces_and_accounts_once():
    t = ObjectTable(100, "lru")
    assert put(t, K(1), 60)
    assert put(t, K(1), 70)
    assert t.used == 70 and len(t.entries) == 1


def test_on_evict_gets_victims_before_reuse():
    seen = []
    t = ObjectTable(20, "lru")
    free = lambda e: seen.append(("free", e.key))  # noqa: E731
    ev = lambda k, art: seen.append(("evict", k))  # noqa: E731
    view = lambda e: torch.empty(0)  # noqa: E731
    for i in range(3):
        e = t.admit(K(i), meta(10), lambda s: i, free, ev, view)
        t.publish(e, free)
    assert seen == [("evict", K(0)), ("free", K(0))]


def test_an_overwrite_under_pressure_replaces_its_own_old_version_first():
    """A full table: overwriting K(2) frees K(2)'s old version for its successor instead of
    evicting K(1), the least recently used object (it used to evict K(1), then drop K(2)'s
    old version at publish anyway: one object lost for nothing)."""
    t = ObjectTable(100, "lru")
    assert put(t, K(1), 50) and put(t, K(2), 50)
    assert put(t, K(2), 50)
    assert K(1) in t and K(2) in t and t.used == 100 and t.evictions == 0
    reader = t.acquire(K(2))                      # a held old version keeps its space ...
    assert put(t, K(2), 50)                       # ... so room is made by evicting K(1)
    assert K(1) not in t and t.evictions == 1 and t.used == 100
    t.release(reader, NOFREE)
    assert t.used == 50
