"""core.backoff.Backoff, the one circuit breaker / exponential back-off of the plane, and
the write-back flusher's use of it (the Redis tier's is tested against real servers)."""

from __future__ import annotations

import threading

import pytest

from stratacache.core.backoff import Backoff
from stratacache.core.keys import ArtifactKey
from stratacache.tiering.flusher import WriteBackFlusher


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_delays_double_from_lo_up_to_hi_and_reset_on_success():
    clock = Clock()
    b = Backoff(0.5, 3.0, clock=clock)
    assert b.healthy and b.admit() and not b.ok()
    delays = []
    for _ in range(6):
        was_healthy, retry_in = b.fault()
        delays.append(retry_in)
        assert was_healthy is (len(delays) == 1) and not b.healthy
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert b.retry_at == clock.now + 3.0
    clock.now += 3.0
    assert b.admit() and b.ok() and b.healthy       # the probe succeeded: an outage ended
    assert b.fault() == (True, 0.5)                 # a new outage starts again from lo


def test_open_breaker_admits_exactly_one_probe_per_back_off():
    clock = Clock()
    b = Backoff(1.0, 8.0, clock=clock)
    b.fault()
    assert not b.admit()                            # backing off: nobody goes
    clock.now += 1.0
    results = []
    start = threading.Barrier(8)

    def caller():
        start.wait()
        results.append(b.admit())

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1                 # one probe, the rest turned away
    b.abandon()                                     # the probe ended in a caller error
    assert b.admit() and not b.admit()              # another caller may probe, only one
    assert b.fault() == (False, 2.0)                # the probe failed: the delay doubled
    clock.now += 1.9
    assert not b.admit()
    clock.now += 0.1
    assert b.admit()


def test_zero_delays_and_hi_below_lo():
    b = Backoff(0.0, 0.0)
    assert b.fault() == (True, 0.0) and b.fault() == (False, 0.0)
    assert b.admit()                                # no wait: the next caller probes at once
    assert Backoff(2.0, 1.0).hi == 2.0              # hi is at least lo


def K(i: int) -> ArtifactKey:
    return ArtifactKey("kv", "backoff", str(i))


def test_flusher_backs_off_with_the_shared_helper_then_drains():
    """A lower tier that refuses four writes: the flusher retries after 0.01, 0.02,
    0.04, then 0.05 s (the max), and resets once a write succeeds."""
    seen = []           # the delay the flusher's Backoff would start next, at each attempt
    ok_after = 4

    def write_down(link, key, spilled):
        seen.append(flusher._backoff.delay)
        return len(seen) > ok_after

    flusher = WriteBackFlusher(write_down, retry_backoff_s=0.01, retry_backoff_max_s=0.05)
    try:
        flusher.mark(0, K(1), 10)
        assert flusher.flush(timeout=10)
        assert seen == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05])
        assert flusher._backoff.healthy and flusher._backoff.delay == 0.01
        st = flusher.stats()
        assert st["flush_failures"] == ok_after and st["flushed"] == 1
    finally:
        flusher.close(timeout=5)


def test_closing_flusher_leaves_a_failing_tier_instead_of_retrying_forever():
    """With no back-off configured (0 s) a failing lower tier must still not keep a
    closing flusher spinning: close returns, reporting what was not written down."""
    attempts = []
    flusher = WriteBackFlusher(lambda link, key, spilled: attempts.append(key) and False,
                               retry_backoff_s=0.0, retry_backoff_max_s=0.0)
    flusher.mark(0, K(1), 10)
    assert flusher.close(timeout=0.2) is False
    assert flusher.stats()["dirty_items"] == 1 and not flusher.stats()["flusher_alive"]
    assert attempts
