"""Priority-aware eviction of the shared region, through ``_C.SharedRegion`` directly.

Each object records the priority of its namespace kind at put time; eviction
for an incoming object of priority p only takes objects of priority <= p (the
rule of backends/residency.py). So a region holding a saved model's parameters
(priority 10) keeps every byte of them under any amount of KV traffic
(priority 0), from this process or another one, while parameters can push KV
out. Sizes and keys are random (seeded), payloads are random bytes compared
byte for byte.
"""

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stratacache import _C

ROOT = Path(__file__).resolve().parents[1]
KiB, MiB = 1024, 1024 * 1024
CAPACITY = 4 * MiB


def open_region(path, **kw):
    return _C.SharedRegion(path=path, capacity=CAPACITY, max_objects=512, max_key_bytes=64, **kw)


def payload(rng: random.Random, size: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(rng.randbytes(size)), dtype=torch.uint8)


def read(region, key: bytes):
    """The stored bytes of key (a fresh tensor), or None on a miss."""
    out = torch.empty(CAPACITY, dtype=torch.uint8)
    got = region.get_into(key, 5.0, out)
    if got is None:
        return None
    slot, gen, size, aux, current = got
    assert current
    return out[:size].clone()


def fill(region, rng, prefix: str, priority: int, budget: int) -> dict:
    """Stores random-size objects of this priority until budget bytes are stored."""
    stored, used, i = {}, 0, 0
    while used < budget:
        size = rng.randrange(1, 96 * KiB)
        key = f"{prefix}-{i}".encode()
        data = payload(rng, size)
        assert region.put_tensor(key, b"aux", data, priority=priority) is True
        stored[key] = data
        used += -(-size // 4096) * 4096
        i += 1
    return stored


def assert_intact(region, stored: dict, priority: int) -> None:
    for key, data in stored.items():
        got = read(region, key)
        assert got is not None, f"{key!r} (priority {priority}) was evicted"
        assert torch.equal(got, data), f"{key!r} came back with other bytes"
        assert region.priority_of(key) == priority


def test_priority_0_traffic_never_evicts_priority_10_objects(region_path):
    rng = random.Random(18)
    region = open_region(region_path)
    params = fill(region, rng, "params", 10, 3 * MiB)
    evictions_before = region.stats()["evictions"]
    assert evictions_before == 0
    last = {}
    outcomes = {True: 0, None: 0}
    for step in range(600):
        key = f"kv-{rng.randrange(120)}".encode()
        # Now and then larger than all the room priority-10 objects leave: refused.
        size = rng.randrange(1100 * KiB, 1500 * KiB) if step % 10 == 0 else rng.randrange(1, 160 * KiB)
        data = payload(rng, size)
        ok = region.put_tensor(key, b"", data, priority=0)
        assert ok in (True, None)
        outcomes[ok] += 1
        if ok:
            last[key] = data
        if step % 40 == 0:        # the hand-off path only ever offers priority-0 victims
            victim = region.pick_victim(1.0, priority=0)
            if victim is not None:
                vkey, (slot, gen, offset, size, aux) = victim
                assert vkey.startswith(b"kv-")
                assert region.erase_version(slot, gen, evicted=True)
                region.release(slot, gen)
                last.pop(vkey, None)
    assert outcomes[True] > 100 and outcomes[None] >= 60      # some fit, the large ones could not
    assert region.stats()["evictions"] > evictions_before      # kv objects evicted each other
    assert_intact(region, params, 10)
    for key in region.keys():                                  # what kv is left is its newest version
        if key.startswith(b"kv-"):
            assert torch.equal(read(region, key), last[key]) and region.priority_of(key) == 0
    assert region.pick_victim(1.0, priority=-1) is None       # nothing of priority <= -1
    assert region.check() == []


def test_priority_0_writer_in_another_process_cannot_evict_them(region_path):
    rng = random.Random(7)
    region = open_region(region_path)
    params = fill(region, rng, "params", 10, 3 * MiB)
    script = textwrap.dedent(f"""
        import random, torch
        from stratacache import _C
        region = _C.SharedRegion(path={region_path!r}, capacity={CAPACITY}, max_objects=512, max_key_bytes=64)
        rng = random.Random(3)
        stored = refused = 0
        for i in range(400):
            size = rng.randrange(1100 * 1024, 1500 * 1024) if i % 10 == 0 else rng.randrange(1, 200 * 1024)
            data = torch.frombuffer(bytearray(rng.randbytes(size)), dtype=torch.uint8)
            ok = region.put_tensor(b"kv-%d" % rng.randrange(60), b"", data, priority=0)
            stored += ok is True
            refused += ok is None
        print(stored, refused)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    stored, refused = map(int, run.stdout.split())
    assert stored > 50 and refused > 0
    assert_intact(region, params, 10)
    assert region.check() == []


def test_priority_10_puts_evict_priority_0_objects(region_path):
    rng = random.Random(5)
    region = open_region(region_path)
    fill(region, rng, "kv", 0, CAPACITY - 64 * KiB)           # (nearly) full of kv
    evictions_before = region.stats()["evictions"]
    params = {}
    for i in range(40):
        size = rng.randrange(1, 48 * KiB)
        key = f"params-{i}".encode()
        data = payload(rng, size)
        assert region.put_tensor(key, b"aux", data, priority=10) is True, f"put {i} of {size} bytes refused"
        params[key] = data
    assert region.stats()["evictions"] > evictions_before
    assert_intact(region, params, 10)
    # Once only priority-10 objects are left, a priority-0 put has nowhere to go,
    # and the hand-off path offers priority-10 victims only to priority-10 objects.
    for key in region.keys():
        if key.startswith(b"kv-"):
            assert region.erase(key)
    stats = region.stats()
    big = payload(rng, stats["capacity"] - stats["reserved_bytes"] + 4096)   # fits only by evicting
    assert region.put_tensor(b"kv-big", b"", big, priority=0) is None
    assert region.pick_victim(1.0, priority=0) is None
    victim = region.pick_victim(1.0, priority=10)
    assert victim is not None and victim[0].startswith(b"params-")
    region.release(victim[1][0], victim[1][1])
    assert_intact(region, params, 10)
    assert region.check() == []


def test_priority_argument_is_checked(region_path):
    region = open_region(region_path)
    data = torch.zeros(10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="priority must fit in a signed 32-bit integer, got 2147483648"):
        region.put_tensor(b"k", b"", data, priority=2**31)
    with pytest.raises(ValueError, match="priority must fit in a signed 32-bit integer"):
        region.pick_victim(1.0, priority=-(2**31) - 1)
    assert region.put_tensor(b"k", b"", data, priority=-(2**31)) is True
    assert region.priority_of(b"k") == -(2**31) and region.priority_of(b"missing") is None
    assert region.put_tensor(b"k", b"", data) is True          # default priority 0
    assert region.priority_of(b"k") == 0
