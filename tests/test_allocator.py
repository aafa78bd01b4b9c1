"""ArenaAllocator: runs never overlap, nothing leaks, accounting is exact (hypothesis)."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratacache.backends.allocator import ArenaAllocator


def check_invariants(a: ArenaAllocator, live: dict):
    runs = a.runs()
    assert dict(runs) == live
    end = 0
    for off, n in runs:                         # sorted by address: no overlap, inside the arena
        assert off % a.align == 0 and off >= end
        end = off + n
    assert end <= a.size
    s = a.stats()
    assert s["allocated_bytes"] == sum(live.values())
    assert s["free_bytes"] == a.size - sum(live.values())
    assert 0.0 <= s["fragmentation"] <= 1.0
    # free runs + allocated runs tile the arena exactly and free runs are coalesced
    free = sorted((off, n) for n, off in a._by_size)
    tiles = sorted(free + runs)
    pos = 0
    for off, n in tiles:
        assert off == pos
        pos += n
    assert pos == a.size
    for (o1, n1), (o2, _n2) in zip(free, free[1:]):
        assert o1 + n1 != o2, "adjacent free runs were not merged"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000), st.integers(0, 1000)), max_size=120))
def test_alloc_free_sequences(ops):
    a = ArenaAllocator(64 * 1024, align=64)
    live = {}
    for is_alloc, size, pick in ops:
        if is_alloc or not live:
            off = a.alloc(size)
            if off is None:
                assert a.stats()["largest_free_run"] < a.rounded(size)
            else:
                assert off not in live
                live[off] = a.rounded(size)
        else:
            off = sorted(live)[pick % len(live)]
            a.free(off)
            del live[off]
        check_invariants(a, live)
    for off in list(live):
        a.free(off)
        del live[off]
    check_invariants(a, live)
    assert a.stats()["largest_free_run"] == a.size      # no leak: one run again


def test_double_free_and_prefers_low_addresses():
    a = ArenaAllocator(1 << 20, align=256)
    x = a.alloc(1000)
    y = a.alloc(1000)
    assert (x, y) == (0, 1024)
    a.free(x)
    with pytest.raises(KeyError):
        a.free(x)
    assert a.alloc(10) == 0                        # reuses the low hole, not the untouched tail
    assert a.stats()["high_water_bytes"] == 2048


def test_fragmentation_measured_under_random_churn():
    rng = random.Random(7)
    a = ArenaAllocator(8 << 20, align=256)
    live = []
    for _ in range(4000):
        if live and rng.random() < 0.5:
            a.free(live.pop(rng.randrange(len(live))))
        else:
            off = a.alloc(rng.choice([4 << 10, 64 << 10, 256 << 10]) + rng.randrange(1000))
            if off is not None:
                live.append(off)
    s = a.stats()
    assert 0.0 <= s["fragmentation"] < 1.0 and s["free_runs"] >= 1
