"""Write-back links: dirty tracking, flush/close drain, and no acknowledged data lost to a failing tier."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stratacache.backends.base import STATS_KEYS, Tier
from stratacache.backends.cpu import CpuTier
from stratacache.backends.disk import DiskTier
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine
from stratacache.tiering import TierChain, TierSettings


def K(i):
    return ArtifactKey("kv", "wb-test", f"w{i}")


def body(i, n=2048):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)


class FlakyTier(Tier):
    """A real tier behind a switch: while down, every call into it raises like a dead server."""

    def __init__(self, inner: Tier):
        self.inner, self.down, self.calls_while_down = inner, False, 0
        super().__init__(inner.name, inner.capacity_bytes)
        self.persistent = inner.persistent

    @property
    def on_evict(self):
        return self.inner.on_evict

    @on_evict.setter
    def on_evict(self, handler):
        self.inner.on_evict = handler

    @classmethod
    def from_config(cls, section, cfg):
        raise NotImplementedError("built around a tier in the tests")

    def _up(self) -> None:
        if self.down:
            self.calls_while_down += 1
            raise ConnectionError("tier is down")

    def _put(self, key, data, meta):
        self._up()
        return self.inner.put(key, data, meta)

    def _get(self, key, out):
        self._up()
        return self.inner.get(key, out)

    def contains(self, encoded_keys):
        self._up()
        return self.inner.contains(encoded_keys)

    def delete(self, key):
        self._up()
        return self.inner.delete(key)

    def keys(self):
        self._up()
        return self.inner.keys()

    def _stats(self):
        return {k: v for k, v in self.inner.stats().items() if k in STATS_KEYS}

    def close(self):
        self.inner.close()


def has(tier: Tier, key: ArtifactKey) -> bool:
    return tier.contains([key.encode()])[0]


def make(top_cap=1 << 20, lower=None, backoff=0.01):
    top = CpuTier(top_cap, pin_memory=False, eviction="lru", name="cpu")
    lower = lower or CpuTier(16 << 20, pin_memory=False, name="lower")
    chain = TierChain([top, lower], [TierSettings("write_back"), TierSettings()],
                      retry_backoff_s=backoff, retry_backoff_max_s=0.05)
    return StorageEngine(None, chain=chain), top, lower


def test_write_back_acknowledges_then_flushes_down():
    lower = CpuTier(16 << 20, pin_memory=False, name="lower")
    gate = threading.Event()
    real_put = lower.put

    def slow_put(*a):
        gate.wait(5)
        return real_put(*a)
    lower.put = slow_put
    e, top, _ = make(lower=lower)
    for i in range(5):
        assert e.store(K(i), body(i))
    assert e.stats()["writeback"]["dirty_items"] >= 4                  # acknowledged, not yet below
    gate.set()
    assert e.flush(timeout=10)
    for i in range(5):
        assert torch.equal(lower.get(K(i)).data, body(i))
    wb = e.stats()["writeback"]
    assert wb["dirty_items"] == 0 and wb["flushed"] == 5
    e.close()


def test_failing_lower_tier_loses_no_acknowledged_data_after_recovery():
    flaky = FlakyTier(CpuTier(16 << 20, pin_memory=False, name="lower"))
    flaky.down = True
    e, top, _ = make(top_cap=32 << 10, lower=flaky)                   # 16 objects fit above
    acked = [i for i in range(60) if e.store(K(i), body(i))]
    assert len(acked) == 60
    time.sleep(0.2)                                                    # the flusher keeps failing ...
    wb = e.stats()["writeback"]
    assert wb["flush_failures"] > 0 and wb["flusher_alive"]
    assert wb["spilled_items"] > 0                                     # ... evicted dirty objects were kept
    assert not e.flush(timeout=0.2)                                    # cannot drain while down
    flaky.down = False                                                 # recovery
    assert e.flush(timeout=10)
    for i in acked:
        art = e.load(K(i))
        assert art is not None and torch.equal(art.data, body(i)), f"lost acknowledged object {i}"
        assert torch.equal(flaky.inner.get(K(i)).data, body(i))
    assert e.stats()["tiers"]["lower"]["errors"] > 0                   # faults were counted, not raised
    e.close()


def test_flusher_survives_exceptions_and_close_drains(tmp_path):
    flaky = FlakyTier(DiskTier(str(tmp_path / "d"), 16 << 20, name="lower"))
    e, top, _ = make(lower=flaky)
    flaky.down = True
    for i in range(10):
        e.store(K(i), body(i))
    time.sleep(0.1)
    flaky.down = False
    assert e.close(timeout=10)                                         # close drains dirty data
    reopened = DiskTier(str(tmp_path / "d"), 16 << 20)
    assert all(torch.equal(reopened.get(K(i)).data, body(i)) for i in range(10))
    reopened.close()


def test_deleted_dirty_object_is_not_written_down():
    lower = CpuTier(16 << 20, pin_memory=False, name="lower")
    lower_put = lower.put
    gate = threading.Event()
    lower.put = lambda *a: gate.wait(5) and lower_put(*a)
    e, top, _ = make(lower=lower)
    e.store(K(1), body(1))
    e.store(K(2), body(2))
    e.delete(K(2))
    gate.set()
    assert e.flush(timeout=10)
    assert has(lower, K(1)) and not has(lower, K(2)) and not e.contains(K(2))
    e.close()


def test_concurrent_writers_and_readers_under_write_back():
    e, top, lower = make(top_cap=64 << 10)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        out = torch.empty(4096, dtype=torch.uint8)
        for _ in range(300):
            i = rng.randrange(80)
            r = rng.random()
            if r < 0.5:
                if not e.store(K(i), body(i, 1024 + i)):
                    errors.append(f"store {i} failed")
            elif r < 0.8:
                art = e.load(K(i), out=out)
                if art is not None and not torch.equal(art.data, body(i, 1024 + i)):
                    errors.append(f"bad bytes {i}")
            else:
                with e.pinned(K(i)) as art:                          # a view, safe under a lease
                    if art is not None and not torch.equal(art.data, body(i, 1024 + i)):
                        errors.append(f"bad pinned bytes {i}")
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert e.flush(timeout=10)
    for k in list(top.keys()):                                         # everything above is also below
        assert has(lower, k)
    e.close()


def test_dirty_bytes_backpressure_is_bounded_when_the_lower_tier_is_dead():
    flaky = FlakyTier(CpuTier(16 << 20, pin_memory=False, name="lower"))
    flaky.down = True
    top = CpuTier(1 << 20, pin_memory=False, name="cpu")
    chain = TierChain([top, flaky], [TierSettings("write_back"), TierSettings()],
                      retry_backoff_s=0.01, retry_backoff_max_s=0.05, max_dirty_bytes=4096)
    e = StorageEngine(None, chain=chain)
    t0 = time.monotonic()
    for i in range(6):
        assert e.store(K(i), body(i))                                  # acknowledged, after a bounded wait
    assert time.monotonic() - t0 < 5
    wb = e.stats()["writeback"]
    assert wb["backpressure_waits"] >= 1 and wb["dirty_items"] == 6
    chain.flusher.stall_s = 0.3
    t0 = time.monotonic()
    assert e.flush() is False                                           # no progress: gives up, no hang
    assert time.monotonic() - t0 < 5
    flaky.down = False
    assert e.flush(timeout=10)
    assert all(has(flaky.inner, K(i)) for i in range(6))
    e.close()


@settings(max_examples=25, deadline=None)
@given(policy=st.sampled_from(["write_back", "write_through"]),
       ops=st.lists(st.tuples(st.sampled_from(["store", "store", "delete", "load"]), st.integers(0, 12),
                              st.integers(0, 3)), min_size=1, max_size=40))
def test_links_reach_the_right_tiers(policy, ops):
    """Model check: after flush, the lower tier holds exactly the last acknowledged version of every
    key that was not deleted; under write_through that is already true before flush."""
    top = CpuTier(16 << 10, pin_memory=False, eviction="s3fifo", name="cpu")   # evicts a lot
    lower = CpuTier(8 << 20, pin_memory=False, name="lower")                   # never evicts
    e = StorageEngine(None, chain=TierChain([top, lower], [TierSettings(policy), TierSettings()],
                                            retry_backoff_s=0.001))
    model = {}
    for op, i, version in ops:
        if op == "store":
            data = body(i * 10 + version, 1000 + 97 * i)
            assert e.store(K(i), data)
            model[i] = data
        elif op == "delete":
            e.delete(K(i))
            model.pop(i, None)
        else:
            art = e.load(K(i), out=torch.empty(4096, dtype=torch.uint8))
            assert (art is None) == (i not in model)
            if art is not None:
                assert torch.equal(art.data, model[i])
        if policy == "write_through":
            for j, data in model.items():
                assert torch.equal(lower.get(K(j)).data, data)
    assert e.flush(timeout=10)
    for j in range(13):
        art = lower.get(K(j))
        if j in model:
            assert art is not None and torch.equal(art.data, model[j])
        else:
            assert art is None
        assert (top.get(K(j)) is None) or torch.equal(top.get(K(j)).data, model[j])
    e.close()


# -- exit without close(), SIGKILL after flush(), honest write_through acknowledgements ----

_ROOT = str(Path(__file__).resolve().parents[1])

# A program that stores N objects of 64 KiB over a cpu write_back link into a disk tier and
# then ends as argv[3] says: "exit" (falls off the end, no close()), or "flush-kill"
# (flush() returned True, then SIGKILL).
_WRITER = r"""
import json, os, signal, sys, torch
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine
path, n, end = sys.argv[1], int(sys.argv[2]), sys.argv[3]
eng = StorageEngine.from_config(overrides={
    "tiers.cpu.capacity": "64MiB", "tiers.cpu.write_policy": "write_back",
    "tiers.shared.enabled": False, "tiers.disk.enabled": True, "tiers.disk.path": path,
    "tiers.disk.capacity": "64MiB"})
g = torch.Generator().manual_seed(n)
acked = 0
for i in range(n):
    acked += eng.store(ArtifactKey("kv", "exit-test", f"k{i}"),
                       torch.randint(0, 256, (65536,), generator=g, dtype=torch.uint8))
print(json.dumps({"acked": acked}), flush=True)
if end == "flush-kill":
    assert eng.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_writer(path, n, end):
    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", _WRITER, str(path), str(n), end],
                          capture_output=True, text=True, timeout=120, env=env, cwd=_ROOT)


def _check_all_on_disk(path, n):
    disk = DiskTier(str(path), 64 << 20)
    try:
        g = torch.Generator().manual_seed(n)
        for i in range(n):
            want = torch.randint(0, 256, (65536,), generator=g, dtype=torch.uint8)
            art = disk.get(ArtifactKey("kv", "exit-test", f"k{i}"))
            assert art is not None, f"acknowledged object {i} of {n} lost"
            assert torch.equal(art.data, want)
    finally:
        disk.close()


@pytest.mark.slow
def test_exit_without_close_drains_write_back_and_never_aborts(tmp_path):
    """Ten real interpreter exits right after 200 acknowledged write_back stores, none
    calling close(): every exit is clean (no std::terminate abort) and loses nothing."""
    for run in range(10):
        path = tmp_path / f"d{run}"
        res = _run_writer(path, 200, "exit")
        assert res.returncode == 0, f"run {run}: exit code {res.returncode}: {res.stderr[-2000:]}"
        assert "terminate called" not in res.stderr
        assert json.loads(res.stdout.splitlines()[-1])["acked"] == 200
        _check_all_on_disk(path, 200)
        shutil.rmtree(path)


def test_flush_is_a_promise_that_survives_sigkill(tmp_path):
    """What flush() returned True for is in the tier below: a SIGKILL right after loses none."""
    path = tmp_path / "d"
    res = _run_writer(path, 200, "flush-kill")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert json.loads(res.stdout.splitlines()[-1])["acked"] == 200
    _check_all_on_disk(path, 200)


def _write_through_over_disk(tmp_path, disk_capacity):
    top = CpuTier(8 << 20, pin_memory=False, name="cpu")
    disk = DiskTier(str(tmp_path / "d"), disk_capacity, name="disk")
    chain = TierChain([top, disk], [TierSettings("write_through"), TierSettings()])
    return StorageEngine(None, chain=chain), top, disk


@pytest.mark.parametrize("batched", [False, True])
def test_write_through_store_too_big_for_the_tier_below_is_not_acknowledged(tmp_path, batched):
    e, top, disk = _write_through_over_disk(tmp_path, 64 << 10)
    big, small = body(1, 1 << 20), body(2, 4096)
    if batched:
        assert e.store_many([(K(1), big), (K(2), small)]) == [False, True]
    else:
        assert e.store(K(1), big) is False        # 1 MiB over a 64 KiB disk tier
        assert e.store(K(2), small) is True
    assert disk.get(K(1)) is None and torch.equal(disk.get(K(2)).data, small)
    counts = e.stats()["engine"]
    assert counts["store_failures"] == 1 and counts["stores"] == 2   # attempts, batched or not
    e.close()


def test_write_through_store_whose_disk_dir_was_replaced_by_a_file_is_not_acknowledged(tmp_path):
    e, top, disk = _write_through_over_disk(tmp_path, 16 << 20)
    assert e.store(K(0), body(0)) is True
    shutil.rmtree(disk.path)
    Path(disk.path).write_text("not a directory")
    assert e.store(K(1), body(1)) is False
    assert e.store_many([(K(2), body(2)), (K(3), body(3))]) == [False, False]
    e.close()


_FORKER = r"""
import os, sys, torch
from stratacache.backends.disk import DiskTier, DiskTierError
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine
path = sys.argv[1]
eng = StorageEngine.from_config(overrides={
    "tiers.cpu.capacity": "16MiB", "tiers.cpu.write_policy": "write_back",
    "tiers.shared.enabled": False, "tiers.disk.enabled": True, "tiers.disk.path": path,
    "tiers.disk.capacity": "16MiB"})
assert eng.store(ArtifactKey("kv", "fork", "a"), torch.zeros(1000, dtype=torch.uint8))
assert eng.flush()
pid = os.fork()
if pid == 0:
    sys.exit(0)            # the child exits normally: its atexit hooks run
os.waitpid(pid, 0)
try:
    DiskTier(path, 1 << 20).close()
    print("lock lost")
except DiskTierError:
    print("lock held")
"""


def test_exit_hook_of_a_forked_child_leaves_the_parents_tiers_alone(tmp_path):
    """A child made by os.fork() inherits the parent's open chains; its exit must not close
    them (that would drop the parent's disk-directory lock under it)."""
    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _FORKER, str(tmp_path / "d")], capture_output=True,
                         text=True, timeout=120, env=env, cwd=_ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["lock", "held"]
