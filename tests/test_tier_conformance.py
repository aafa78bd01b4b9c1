"""One contract, every tier: the ``base.Tier`` protocol checked the same way on each.

Each tier is described by a *backing* (how to build it and how to reach into its
own storage to damage a stored payload); ``BACKINGS`` lists them, and every
contract case runs over each. A new tier passes the suite by adding its backing
to that list. Payloads are random bytes of random sizes (seeded per case and
tier), checked byte-exactly; Redis is a real server (tests/redis_server.py).
"""

from __future__ import annotations

import os
import random
import threading
import uuid
import zlib

import pytest
import torch

from stratacache.backends.base import INSPECT_KEYS, STATS_KEYS, Lease
from stratacache.config import load_config
from stratacache.core.artifact import ArtifactMeta
from stratacache.core.errors import InvalidArgument
from stratacache.core.keys import ArtifactKey
from stratacache.ops import checksum64
from stratacache.telemetry.metrics import COUNTER_NAMES

U64 = 0xFFFFFFFFFFFFFFFF
KiB, MiB = 1 << 10, 1 << 20
PRIORITIES = {"kv": 0, "params": 10, "custom": 0}


# -- backings: one per tier ---------------------------------------------------------------

class CpuBacking:
    """The per-process arena; its storage is ``tier._arena``."""

    name = "cpu"
    evicts_by_priority = True

    def __init__(self, request, tmp_path):
        pass

    def make(self, capacity: int, priorities=None):
        from stratacache.backends.cpu import CpuTier
        return CpuTier(capacity, eviction="lru", pin_memory=False, lease_s=30, priorities=priorities)

    def flip_payload_byte(self, tier, key: ArtifactKey, size: int) -> None:
        at = tier._table.entries[key.encode()].loc + size // 2
        tier._arena[at] = int(tier._arena[at]) ^ 0x5A

    def section(self, cfg):
        return cfg.tiers.cpu

    def close(self) -> None:
        pass


class SharedBacking:
    """The shared region; its storage is the mapping (written through ``tier._data``)."""

    name = "shared"
    evicts_by_priority = True

    def __init__(self, request, tmp_path):
        self.path = f"/dev/shm/sc-conformance-{os.getpid()}-{uuid.uuid4().hex[:8]}.region"

    def make(self, capacity: int, priorities=None):
        from stratacache.backends.shared import SharedRegionTier
        return SharedRegionTier(self.path, capacity, 1024, lease_s=30, register_cuda=False,
                                priorities=priorities, reset=True)

    def flip_payload_byte(self, tier, key: ArtifactKey, size: int) -> None:
        slot, gen, offset, _size, _aux = tier._region.acquire(key.encode(), 5.0, count_stats=False)
        try:
            at = offset + size // 2
            tier._data[at] = int(tier._data[at]) ^ 0x5A
        finally:
            tier._region.release(slot, gen)

    def section(self, cfg):
        return load_config(overrides={"tiers": {"shared": {"path": self.path}}}).tiers.shared

    def close(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


class DiskBacking:
    """One file per object; its storage is the object's file."""

    name = "disk"
    evicts_by_priority = True

    def __init__(self, request, tmp_path):
        self.path = str(tmp_path / "disk-tier")

    def make(self, capacity: int, priorities=None):
        from stratacache.backends.disk import DiskTier
        return DiskTier(self.path, capacity, eviction="lru", io_threads=2, lease_s=30,
                        priorities=priorities)

    def flip_payload_byte(self, tier, key: ArtifactKey, size: int) -> None:
        with open(tier._table.entries[key.encode()].loc, "r+b") as f:   # the payload ends the file
            f.seek(-1 - size // 2, os.SEEK_END)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x5A]))

    def section(self, cfg):
        return load_config(overrides={"tiers": {"disk": {"path": self.path}}}).tiers.disk

    def close(self) -> None:
        pass


class RedisBacking:
    """A real redis-server (8 MiB maxmemory, allkeys-lru); its storage is the value (SETRANGE)."""

    name = "redis"
    evicts_by_priority = False   # the server's LRU evicts; it knows no namespace priorities

    def __init__(self, request, tmp_path):
        self.server = request.getfixturevalue("redis_server")
        self.prefix = f"conf{uuid.uuid4().hex[:8]}:"

    def make(self, capacity: int, priorities=None):
        from stratacache.backends.redis import RedisTier
        return RedisTier(self.server.url, key_prefix=self.prefix)

    def flip_payload_byte(self, tier, key: ArtifactKey, size: int) -> None:
        admin = self.server.admin_client()
        rk = self.prefix.encode() + key.encode()        # the value: header, then the payload
        at = admin.strlen(rk) - 1 - size // 2
        byte = admin.getrange(rk, at, at)[0]
        admin.setrange(rk, at, bytes([byte ^ 0x5A]))

    def section(self, cfg):
        return load_config(overrides={"tiers": {"redis": {"url": self.server.url,
                                                          "key_prefix": self.prefix}}}).tiers.redis

    def close(self) -> None:
        pass


class MooncakeBacking:
    """A real mooncake_master plus a segment-holding mooncake_client (one pair for the module,
    ``mooncake_cluster``), reached from inside their loopback-only network namespace, which
    this test's thread enters for the test (tests/mooncake_server.py); its storage is the
    value, rewritten through a raw MooncakeDistributedStore."""

    name = "mooncake"
    evicts_by_priority = False   # the master evicts by its own policy; it knows no priorities

    def __init__(self, request, tmp_path):
        self.ns, self.master, self.raw = request.getfixturevalue("mooncake_cluster")
        self.inside = self.ns.entered()
        self.inside.__enter__()
        # One store for the module: each case starts it empty, as the other tiers start, so a
        # case's puts never meet the previous case's pressure (Mooncake evicts asynchronously,
        # refusing puts meanwhile).
        assert self.raw.remove_all() >= 0
        self.prefix = f"conf{uuid.uuid4().hex[:8]}:"

    def make(self, capacity: int, priorities=None):
        from stratacache.backends.mooncake import MooncakeTier
        return MooncakeTier(master_address=self.master.address, key_prefix=self.prefix,
                            metrics_address=self.master.metrics_address)

    def flip_payload_byte(self, tier, key: ArtifactKey, size: int) -> None:
        mk = self.prefix + key.encode().decode("utf-8")   # as MooncakeTier._mkey
        value = bytearray(self.raw.get(mk))      # the value: header slot, then the payload
        value[len(value) - 1 - size // 2] ^= 0x5A
        assert self.raw.upsert(mk, bytes(value)) == 0

    def section(self, cfg):
        return load_config(overrides={"tiers": {"mooncake": {
            "master_address": self.master.address, "metrics_address": self.master.metrics_address,
            "key_prefix": self.prefix}}}).tiers.mooncake

    def close(self) -> None:
        self.inside.__exit__(None, None, None)


BACKINGS = [CpuBacking, SharedBacking, DiskBacking, RedisBacking, MooncakeBacking]
PRIORITY_BACKINGS = [b for b in BACKINGS if b.evicts_by_priority]


@pytest.fixture(scope="module")
def redis_server():
    from tests.redis_server import RedisServer
    with RedisServer(maxmemory="8mb") as srv:
        yield srv


@pytest.fixture(scope="module")
def mooncake_cluster():
    from tests.mooncake_server import MooncakeMaster, SegmentHolder, raw_store, shared_namespace
    ns = shared_namespace()
    with ns.entered():
        master = MooncakeMaster(client_ttl_s=2, lease_ttl_ms=200)
        holder = SegmentHolder(master, 64 << 20)
        raw = raw_store(master)
    yield ns, master, raw
    with ns.entered():
        raw.close()
        holder.close()
        master.close()


@pytest.fixture(params=BACKINGS, ids=[b.name for b in BACKINGS])
def backing(request, tmp_path):
    b = request.param(request, tmp_path)
    yield b
    b.close()


@pytest.fixture(params=PRIORITY_BACKINGS, ids=[b.name for b in PRIORITY_BACKINGS])
def priority_backing(request, tmp_path):
    b = request.param(request, tmp_path)
    yield b
    b.close()


@pytest.fixture
def make_tier(backing):
    made = []

    def make(capacity: int = 2 * MiB, priorities=None):
        tier = backing.make(capacity, priorities)
        made.append(tier)
        return tier

    yield make
    for tier in made:
        tier.close()


# -- helpers ------------------------------------------------------------------------------

def rng_for(request, backing) -> random.Random:
    return random.Random(zlib.crc32(f"{request.node.originalname}/{backing.name}".encode()))


def random_bytes(rng: random.Random, size: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(rng.randbytes(size)), dtype=torch.uint8)


def meta_of(data: torch.Tensor) -> ArtifactMeta:
    return ArtifactMeta(size=data.numel(), checksum=checksum64(data) & U64)


def store(tier, key: ArtifactKey, data: torch.Tensor) -> bool:
    return tier.put(key, data, meta_of(data))


def K(i, kind: str = "kv") -> ArtifactKey:
    return ArtifactKey(kind, "conformance", f"obj-{i}")


def present(tier, keys) -> list[bool]:
    return tier.contains([k.encode() for k in keys])


def run_in_threads(worker, n: int) -> None:
    """``worker(i)`` for i in range(n), each on its own thread; returns when all have finished."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- the contract -----------------------------------------------------------------------

def test_round_trips_are_byte_exact(request, backing, make_tier):
    tier = make_tier()
    rng = rng_for(request, backing)
    stored = {}
    for i in range(12):
        data = random_bytes(rng, rng.choice([1, rng.randint(2, 4 * KiB), rng.randint(4 * KiB, 160 * KiB)]))
        assert store(tier, K(i), data), f"put {i} of {data.numel()} bytes refused"
        stored[K(i)] = data
    for key, data in stored.items():
        art = tier.get(key)
        assert art is not None and art.meta.size == data.numel() and torch.equal(art.data, data)
        out = torch.full((data.numel() + 37,), 0xA5, dtype=torch.uint8)   # poisoned, larger
        art = tier.get(key, out=out, verify=True)
        assert art.data.data_ptr() == out.data_ptr() and torch.equal(art.data, data)
        assert torch.all(out[data.numel():] == 0xA5), "bytes written past the object"
    keys = list(stored)
    more = {K(100 + i): random_bytes(rng, rng.randint(1, 64 * KiB)) for i in range(6)}
    items = [(k, d, meta_of(d)) for k, d in more.items()]
    assert tier.put_many(items) == [True] * len(items)
    stored.update(more)
    keys = list(stored)
    outs = [None if i % 2 else torch.empty(stored[k].numel(), dtype=torch.uint8)
            for i, k in enumerate(keys)]
    arts = tier.get_many(keys, outs, verify=True)
    for k, o, art in zip(keys, outs, arts):
        assert art is not None and torch.equal(art.data, stored[k])
        if o is not None:
            assert art.data.data_ptr() == o.data_ptr()


def test_out_too_small_is_invalid_argument_naming_out(request, backing, make_tier):
    tier = make_tier()
    data = random_bytes(rng_for(request, backing), 5000)
    assert store(tier, K(1), data)
    with pytest.raises(InvalidArgument, match="out"):
        tier.get(K(1), out=torch.empty(4999, dtype=torch.uint8))
    with pytest.raises(InvalidArgument, match=r"outs\[1\]"):
        tier.get_many([K(1), K(1)], [None, torch.empty(10, 2, dtype=torch.uint8)])
    with pytest.raises(InvalidArgument, match="data"):
        tier.put(K(2), data.view(torch.int8), meta_of(data))
    with pytest.raises(InvalidArgument, match="meta.size"):
        tier.put(K(2), data, ArtifactMeta(size=4999, checksum=0))
    assert torch.equal(tier.get(K(1)).data, data)          # nothing was damaged


def test_misses_are_none_and_counted_once(request, backing, make_tier):
    tier = make_tier()
    before = tier.stats()["misses"]
    assert tier.get(K("absent")) is None
    assert tier.get(K("absent"), out=torch.empty(100, dtype=torch.uint8), verify=True) is None
    assert tier.get_many([K("a1"), K("a2")]) == [None, None]
    assert tier.acquire(K("absent")) is None
    assert tier.stats()["misses"] == before + 5
    assert tier.stats()["hits"] == 0
    assert not tier.delete(K("absent"))


def test_contains_takes_encoded_keys(request, backing, make_tier):
    tier = make_tier()
    rng = rng_for(request, backing)
    keys = [K(i) for i in range(20)]
    for k in keys[::3]:
        assert store(tier, k, random_bytes(rng, rng.randint(1, 2000)))
    assert present(tier, keys) == [i % 3 == 0 for i in range(20)]
    assert tier.contains([]) == []
    assert tier.contains([b"not an encoded key"]) == [False]


def test_delete_and_overwrite(request, backing, make_tier):
    tier = make_tier()
    rng = rng_for(request, backing)
    first, second = random_bytes(rng, 30_000), random_bytes(rng, 7_000)
    assert store(tier, K(1), first) and store(tier, K(2), first)
    assert store(tier, K(1), second)                         # overwrite, smaller
    assert torch.equal(tier.get(K(1)).data, second) and tier.get(K(1)).meta.size == 7_000
    assert torch.equal(tier.get(K(2)).data, first)           # the neighbour is untouched
    assert tier.delete(K(1)) and not tier.delete(K(1))
    assert tier.get(K(1)) is None and present(tier, [K(1), K(2)]) == [False, True]
    assert sorted(map(str, tier.keys())) == [str(K(2))]


def test_a_lease_keeps_its_bytes_through_pressure_and_overwrites(request, backing, make_tier):
    tier = make_tier(1 * MiB)
    rng = rng_for(request, backing)
    original = random_bytes(rng, 200 * KiB)
    assert store(tier, K("held"), original)
    lease = tier.acquire(K("held"))
    assert isinstance(lease, Lease) and lease.held == tier.zero_copy
    with lease as art:
        view_ptr = art.data.data_ptr()
        assert store(tier, K("held"), random_bytes(rng, 150 * KiB))   # overwritten while leased
        for i in range(3 * tier.capacity_bytes // (100 * KiB)):       # 3x capacity of pressure
            store(tier, K(i), random_bytes(rng, rng.randint(50 * KiB, 150 * KiB)))
        assert art.data.data_ptr() == view_ptr
        assert torch.equal(art.data, original), "a leased object changed under its holder"
    assert not lease.held
    if tier.zero_copy:   # released: its space is reusable, so pressure can now take it
        assert tier.stats()["used_bytes"] <= tier.capacity_bytes


def test_two_leases_on_one_key_are_released_independently(request, backing, make_tier):
    """Releasing holder A's lease keeps holder B's (unpin released whichever came last)."""
    tier = make_tier(1 * MiB)
    rng = rng_for(request, backing)
    size = tier.capacity_bytes // 2 + 1 if tier.zero_copy else 100 * KiB
    data = random_bytes(rng, size)
    assert store(tier, K("both"), data)
    a, b = tier.acquire(K("both")), tier.acquire(K("both"))
    assert a is not None and b is not None and a is not b
    a.release()
    a.release()                                       # idempotent, ends nothing more
    big = random_bytes(rng, size)
    if tier.zero_copy:
        # Room for the newcomer means evicting the object B holds: it must be refused.
        assert not store(tier, K("newcomer"), big), "a lease still held did not protect its object"
        assert present(tier, [K("both")]) == [True]
    assert torch.equal(b.artifact.data, data)
    b.release()
    assert store(tier, K("newcomer"), big)           # nothing holds it any more
    assert torch.equal(tier.get(K("newcomer")).data, big)


def test_each_holder_releases_its_own_version(request, backing, make_tier):
    """A leases v1, the key is overwritten with v2, B leases v2, A releases: B's v2 stays held
    (releasing "whichever lease came last" ended B's lease and kept A's old version)."""
    tier = make_tier(1 * MiB)
    rng = rng_for(request, backing)
    # A third of the tier (at most of 8 MiB: a remote store's capacity is the whole cluster's).
    size = min(tier.capacity_bytes, 8 * MiB) // 3
    v1, v2 = random_bytes(rng, size), random_bytes(rng, size)
    assert store(tier, K("k"), v1)
    a = tier.acquire(K("k"))
    assert store(tier, K("k"), v2)
    b = tier.acquire(K("k"))
    assert torch.equal(a.artifact.data, v1) and torch.equal(b.artifact.data, v2)
    a.release()
    for i in range(12):                               # 4x capacity of pressure
        store(tier, K(i), random_bytes(rng, size))
    assert torch.equal(b.artifact.data, v2), "B's version changed after A released"
    if tier.zero_copy:
        assert present(tier, [K("k")]) == [True], "B's leased version was evicted"
    b.release()
    if tier.zero_copy:
        for i in range(12, 24):
            store(tier, K(i), random_bytes(rng, size))
        assert present(tier, [K("k")]) == [False]     # released, it is evictable again


def test_a_failed_check_drops_only_the_version_that_failed(request, backing, make_tier):
    """A read whose delayed check fails (v1 was damaged) must not drop v2, stored meanwhile."""
    tier = make_tier()
    rng = rng_for(request, backing)
    v1, v2 = random_bytes(rng, 20_000), random_bytes(rng, 20_000)
    assert store(tier, K("v"), v1)
    backing.flip_payload_byte(tier, K("v"), v1.numel())
    if tier.verifies_checksums or tier.verify_reads:   # every read is checked as it is made,
        assert tier.get(K("v")) is None and present(tier, [K("v")]) == [False]   # dropping what it read
        return
    damaged = tier.get(K("v"), out=torch.empty(20_000, dtype=torch.uint8))   # not verified
    assert damaged is not None and not torch.equal(damaged.data, v1)
    assert store(tier, K("v"), v2)                    # a good version lands before the check
    assert tier._trusted(K("v"), damaged, True) is None   # the base's verify-and-drop of v1
    assert tier.stats()["corrupt"] == 1
    art = tier.get(K("v"), verify=True)
    assert art is not None and torch.equal(art.data, v2), "the good version was dropped"


def test_a_corrupt_payload_is_a_counted_miss_and_dropped(request, backing, make_tier):
    tier = make_tier()
    rng = rng_for(request, backing)
    for size in (3000, 64 * KiB + 7):
        for reader in ("get", "get_out", "acquire"):
            key = K(f"{reader}-{size}")
            data = random_bytes(rng, size)
            assert store(tier, key, data)
            backing.flip_payload_byte(tier, key, size)
            before = tier.stats()
            if reader == "get":
                got = tier.get(key, verify=True)
            elif reader == "get_out":
                got = tier.get(key, out=torch.empty(size, dtype=torch.uint8), verify=True)
            else:
                got = tier.acquire(key, verify=True)
            assert got is None, f"{reader}: a damaged payload was served"
            after = tier.stats()
            assert after["corrupt"] == before["corrupt"] + 1
            assert after["misses"] == before["misses"] + 1 and after["hits"] == before["hits"]
            assert present(tier, [key]) == [False], f"{reader}: the damaged object stayed stored"
            assert store(tier, key, data) and torch.equal(tier.get(key, verify=True).data, data)


def test_capacity_is_never_exceeded(request, backing, make_tier):
    tier = make_tier(1 * MiB)
    rng = rng_for(request, backing)
    written = 0
    i = 0
    while written < 4 * tier.capacity_bytes:
        size = rng.choice([rng.randint(1, 4 * KiB), rng.randint(4 * KiB, 200 * KiB)])
        store(tier, K(i), random_bytes(rng, size))
        written += size
        i += 1
        s = tier.stats()
        assert 0 <= s["used_bytes"] <= s["capacity_bytes"] == tier.capacity_bytes, (i, s["used_bytes"])
    assert tier.stats()["items"] > 0
    assert not store(tier, K("too-big"), random_bytes(rng, tier.capacity_bytes + 1))


def test_a_higher_priority_kind_is_never_evicted_by_lower_priority_traffic(request, priority_backing):
    backing = priority_backing
    tier = backing.make(1 * MiB, PRIORITIES)
    try:
        rng = rng_for(request, backing)
        params = {}
        for i in range(6):
            data = random_bytes(rng, rng.randint(30 * KiB, 70 * KiB))
            assert store(tier, K(i, "params"), data)
            params[K(i, "params")] = data
        for i in range(80):                           # about 6x capacity of priority-0 traffic
            store(tier, K(i), random_bytes(rng, rng.randint(20 * KiB, 140 * KiB)))
        for key, data in params.items():
            art = tier.get(key)
            assert art is not None, f"{key} (priority 10) was evicted by kv (priority 0) traffic"
            assert torch.equal(art.data, data)
        # Priority 10 may evict priority 0: a params object that needs room gets it.
        assert store(tier, K("late", "params"), random_bytes(rng, 300 * KiB))
        assert tier.stats()["used_bytes"] <= tier.capacity_bytes
    finally:
        tier.close()


def test_concurrent_use_from_four_threads(request, backing, make_tier):
    """Random puts, gets and deletes on shared keys: every get is None or byte-exact (views of
    zero-copy tiers are checked under their lease: unheld, a concurrent overwrite may reuse them)."""
    tier = make_tier(1 * MiB)
    seed = rng_for(request, backing).getrandbits(32)
    errors: list[str] = []
    start = threading.Barrier(4)

    def body(key_id: int, version: int, size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(key_id * 1_000_003 + version)
        data = torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8)
        data[:8] = torch.tensor([version], dtype=torch.int64).view(torch.uint8)
        data[8:12] = torch.tensor([size], dtype=torch.int32).view(torch.uint8)
        return data

    def check(key_id: int, art) -> None:
        data = art.data
        version = int(data[:8].view(torch.int64)[0])
        size = int(data[8:12].view(torch.int32)[0])
        if size != data.numel() or not torch.equal(data, body(key_id, version, size)):
            errors.append(f"key {key_id}: bytes of no version ever stored")

    def worker(n: int) -> None:
        rng = random.Random(seed + n)
        out = torch.empty(64 * KiB, dtype=torch.uint8)
        start.wait()
        try:
            for _ in range(150):
                i = rng.randrange(24)
                op = rng.random()
                if op < 0.4:
                    store(tier, K(i), body(i, rng.getrandbits(40), rng.randint(12, 64 * KiB)))
                elif op < 0.6 and not tier.zero_copy:   # an owned copy
                    art = tier.get(K(i), verify=True)
                    if art is not None:
                        check(i, art)
                elif op < 0.6:   # a view, valid only while held: take and check it under a lease
                    lease = tier.acquire(K(i), verify=True)
                    if lease is not None:
                        with lease as art:
                            check(i, art)
                elif op < 0.75:
                    art = tier.get(K(i), out=out)
                    if art is not None:
                        check(i, art)
                elif op < 0.9:
                    lease = tier.acquire(K(i))
                    if lease is not None:
                        with lease as art:
                            check(i, art)
                else:
                    tier.delete(K(i))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{type(exc).__name__}: {exc}")

    run_in_threads(worker, 4)
    assert not errors, errors[:5]
    s = tier.stats()
    assert s["used_bytes"] <= s["capacity_bytes"] and s["corrupt"] == 0
    for k in list(tier.keys()):
        art = tier.get(k, verify=True)
        if art is not None:
            check(int(k.name.split("-")[1]), art)
    assert not errors, errors[:5]


def test_stats_have_one_shape(request, backing, make_tier):
    tier = make_tier()
    assert store(tier, K(1), random_bytes(rng_for(request, backing), 1000))
    tier.get(K(1))
    tier.get(K(2))
    s = tier.stats()
    assert set(s) == set(STATS_KEYS) | set(COUNTER_NAMES) | {"latency", "detail"}
    assert isinstance(s["detail"], dict) and not set(s["detail"]) & set(STATS_KEYS)
    assert s["tier"] == tier.name == backing.name and s["persistent"] == tier.persistent
    assert s["capacity_bytes"] == tier.capacity_bytes > 0
    assert (s["puts"], s["hits"], s["misses"], s["bytes_in"], s["bytes_out"]) == (1, 1, 1, 1000, 1000)
    assert s["items"] >= 1 and s["used_bytes"] >= 1000


def test_inspect_has_one_shape(request, backing, make_tier):
    tier = make_tier()
    rng = rng_for(request, backing)
    assert store(tier, K(1), random_bytes(rng, 3000))
    assert store(tier, K(2, "params"), random_bytes(rng, 5000))
    cfg = load_config()
    section = backing.section(cfg)
    if not tier.inspectable:
        with pytest.raises(InvalidArgument, match="nothing to inspect"):
            type(tier).inspect(section, cfg)
        return
    report = type(tier).inspect(section, cfg)
    assert set(report) == set(INSPECT_KEYS) | {"detail"}
    assert report["tier"] == backing.name and isinstance(report["location"], str)
    assert report["items"] == 2 and report["used_bytes"] >= 8000 and report["unreadable"] == 0
    assert set(report["by_kind"]) == {"kv", "params"}
    assert report["by_kind"]["kv"]["items"] == 1 and report["by_kind"]["params"]["items"] == 1
    assert set(report["by_namespace"]) == {"kv/conformance", "params/conformance"}
    assert sum(u["bytes"] for u in report["by_kind"].values()) == report["used_bytes"]
