"""TierChain reads on the tier protocol: one probe per tier per read, misses counted once,
promotion as configured, leases released by their holder only, faults isolated.

The tiers here are the smallest ones the protocol allows (``DictTier`` implements only the
base's abstract methods; ``ArenaTier`` adds ``_acquire`` for zero-copy leases), so these
tests also show that a new tier needs nothing else. ``probe_counts`` wraps any tier, real
ones included (see test_tierchain.py), to count what the chain asks of it.
"""

import random
import threading
import types
from collections import Counter
from typing import Optional

import pytest
import torch

from stratacache.backends.base import Lease, Tier, fit_out
from stratacache.core.artifact import Artifact
from stratacache.core.errors import CorruptArtifact, InvalidArgument, InvalidType, TierFault
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine
from stratacache.tiering import TierChain, TierSettings


def K(i, kind="kv"):
    return ArtifactKey(kind, "chain-reads", f"k{i}")


def body(seed, n=None):
    rng = random.Random(seed)
    n = rng.randrange(1, 5000) if n is None else n
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


class DictTier(Tier):
    """A tier of owned copies in a dict: only what the base declares abstract."""

    def __init__(self, name: str, capacity_bytes: int = 1 << 20, *, persistent: bool = False):
        super().__init__(name, capacity_bytes)
        self.persistent = persistent
        self._objects: dict[bytes, tuple[torch.Tensor, object]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, section, cfg):
        return cls(section.name, section.capacity)

    def _used(self) -> int:
        return sum(m.size for _, m in self._objects.values())

    def _put(self, key, data, meta):
        with self._lock:
            old = self._objects.get(key.encode())
            if self._used() - (old[1].size if old else 0) + meta.size > self.capacity_bytes:
                return False
            self._objects[key.encode()] = (data.clone(), meta)
            return True

    def _get(self, key, out):
        with self._lock:
            got = self._objects.get(key.encode())
        if got is None:
            return None
        data, meta = got
        dst = torch.empty(meta.size, dtype=torch.uint8) if out is None else fit_out(out, meta.size)
        dst.copy_(data)
        return Artifact(meta, dst)

    def contains(self, encoded_keys):
        with self._lock:
            return [k in self._objects for k in encoded_keys]

    def delete(self, key):
        with self._lock:
            return self._objects.pop(key.encode(), None) is not None

    def keys(self):
        with self._lock:
            return iter([ArtifactKey.decode(k) for k in self._objects])

    def _stats(self):
        with self._lock:
            return {"items": len(self._objects), "used_bytes": self._used()}

    def close(self):
        pass

    def stored(self, key) -> Optional[torch.Tensor]:
        """The tier's own bytes of ``key`` (to damage them in a test)."""
        got = self._objects.get(key.encode())
        return None if got is None else got[0]


class ArenaTier(DictTier):
    """A zero_copy tier: reads view its memory; a lease keeps one version from eviction and
    overwrite; room is made by evicting the oldest unleased objects."""

    zero_copy = True

    def __init__(self, name: str, capacity_bytes: int = 1 << 20, **kw):
        super().__init__(name, capacity_bytes, **kw)
        self._leases: Counter = Counter()
        self.evicted: list[ArtifactKey] = []

    def _put(self, key, data, meta):
        k = key.encode()
        with self._lock:
            if self._leases[k]:
                return False                       # a leased version is never overwritten
            self._objects.pop(k, None)
            for victim in list(self._objects):
                if self._used() + meta.size <= self.capacity_bytes:
                    break
                if not self._leases[victim]:
                    del self._objects[victim]
                    self.evicted.append(ArtifactKey.decode(victim))
            if self._used() + meta.size > self.capacity_bytes:
                return False
            self._objects[k] = (data.clone(), meta)
            return True

    def _get(self, key, out):
        if out is not None:
            return super()._get(key, out)
        with self._lock:
            got = self._objects.get(key.encode())
        return None if got is None else Artifact(got[1], got[0])

    def _acquire(self, key, lease_s):
        k = key.encode()
        with self._lock:
            got = self._objects.get(k)
            if got is None:
                return None
            self._leases[k] += 1

        def release():
            with self._lock:
                self._leases[k] -= 1
        return Lease(Artifact(got[1], got[0]), self.name, release)

    def leases_on(self, key) -> int:
        return self._leases[key.encode()]


class FaultyTier(DictTier):
    """Every call into it fails, like a tier whose server vanished."""

    def __init__(self, name="faulty"):
        super().__init__(name, persistent=True)

    def _put(self, key, data, meta):
        raise TierFault("put: device gone")

    def _get(self, key, out):
        raise OSError("get: device gone")

    def contains(self, encoded_keys):
        raise ConnectionError("contains: device gone")

    def delete(self, key):
        raise OSError("delete: device gone")

    def _stats(self):
        raise OSError("stats: device gone")


def probe_counts(tier: Tier) -> Counter:
    """Count, per method, the calls made into ``tier``'s own ``_get`` / ``_get_many`` /
    ``_acquire`` (and keys probed) and its ``contains`` (keys looked up), by wrapping them.
    Only the outermost call counts: the base's default ``_acquire`` reads through ``_get``,
    a ``_get_many`` may fan out to ``_get`` on a pool's threads (so the depth is not
    per-thread; callers of a wrapped tier are single-threaded)."""
    counts: Counter = Counter()
    depth = types.SimpleNamespace(n=0)
    for name, keys_of in (("_get", lambda a: 1), ("_acquire", lambda a: 1),
                          ("_get_many", lambda a: len(a[0])), ("contains", lambda a: len(a[0]))):
        inner = getattr(tier, name)

        def counting(*args, _inner=inner, _name=name, _keys_of=keys_of):
            level = depth.n
            if level == 0:
                counts[_name] += 1
                counts[_name + ":keys"] += _keys_of(args)
            depth.n = level + 1
            try:
                return _inner(*args)
            finally:
                depth.n = level
        setattr(tier, name, counting)
    return counts


def engine_of(*tiers, settings=None):
    return StorageEngine(None, chain=TierChain(list(tiers), settings))


def test_a_new_tier_needs_only_the_abstract_methods():
    e = engine_of(DictTier("a"), ArenaTier("b"))
    payloads = {i: body(i) for i in range(20)}
    assert e.store_many([(K(i), p) for i, p in payloads.items()]) == [True] * 20
    for i, p in payloads.items():
        for tier in ("a", "b"):
            assert torch.equal(e.load(K(i), mode="exact", tier=tier).data, p)
        with e.pinned(K(i), mode="exact", tier="b") as art:
            assert torch.equal(art.data, p)
    assert e.tier_names == ("a", "b")
    e.close()


@pytest.mark.parametrize("read", ["load", "load_out", "load_many", "lease", "pinned"])
def test_a_miss_probes_each_tier_once_and_is_counted_once(read):
    tiers = [ArenaTier("cpu"), ArenaTier("shm", persistent=True), DictTier("disk", persistent=True)]
    counts = [probe_counts(t) for t in tiers]
    e = engine_of(*tiers)
    present = [K(i) for i in range(3)]
    for i, key in enumerate(present):
        assert e.store(key, body(i), mode="exact", tier="disk")
    missing = [K(100 + i) for i in range(4)]
    if read == "load":
        assert all(e.load(k) is None for k in missing)
    elif read == "load_out":
        assert all(e.load(k, out=torch.empty(8, dtype=torch.uint8)) is None for k in missing)
    elif read == "load_many":
        assert e.load_many(missing) == [None] * 4
    elif read == "lease":
        assert all(e.lease(k) is None for k in missing)
    else:
        for k in missing:
            with e.pinned(k) as art:
                assert art is None
    for tier, count in zip(tiers, counts):
        probes = count["_get:keys"] + count["_acquire:keys"]
        if read == "load_many":
            assert count["_get_many"] == 1 and count["_get_many:keys"] == 4, (tier.name, count)
        else:
            assert count["_get_many"] == 0 and probes == 4, (tier.name, count)
        assert count["contains"] == 0, (tier.name, count)     # no lookup before the read
        assert tier.stats()["misses"] == 4 and tier.stats()["hits"] == 0
    stats = e.stats()["engine"]
    assert stats["misses"] == 4 and stats["loads"] == 4 and stats["hits"] == 0
    e.close()


@pytest.mark.parametrize("read", ["load", "load_many", "lease"])
def test_a_lower_hit_probes_each_tier_once_and_is_promoted_where_enabled(read):
    tiers = [ArenaTier("cpu"), DictTier("mid"), DictTier("disk", persistent=True)]
    e = engine_of(*tiers, settings=[TierSettings(promote=True), TierSettings(promote=False),
                                    TierSettings()])
    payloads = [body(10 + i) for i in range(3)]
    keys = [K(i) for i in range(3)]
    assert e.store_many(list(zip(keys, payloads)), mode="exact", tier="disk") == [True] * 3
    counts = [probe_counts(t) for t in tiers]
    if read == "load":
        got = [e.load(k).data.clone() for k in keys]
    elif read == "load_many":
        got = [a.data.clone() for a in e.load_many(keys)]
    else:
        got = []
        for k in keys:
            with e.lease(k) as art:
                got.append(art.data.clone())
    assert all(torch.equal(g, p) for g, p in zip(got, payloads))
    for count in counts:
        assert count["_get:keys"] + count["_acquire:keys"] + count["_get_many:keys"] == 3, count
        assert count["_get_many"] == (1 if read == "load_many" else 0), count
    promoted = read != "lease"                                              # a lease reads in place
    assert all(e.contains(k, mode="exact", tier="cpu") == promoted for k in keys)
    assert not any(e.contains(k, mode="exact", tier="mid") for k in keys)   # promote: false
    assert [tiers[i].stats()["misses"] for i in range(3)] == [3, 3, 0]
    assert tiers[2].stats()["hits"] == 3
    # After a promoting read the next read is a top-tier hit: nothing below is asked.
    counts = [probe_counts(t) for t in tiers]
    assert torch.equal(e.load(keys[0]).data, payloads[0])
    assert [c["_get"] for c in counts] == ([1, 0, 0] if promoted else [1, 1, 1])
    e.close()


def test_exact_reads_do_not_promote_and_prefer_promotes_into_the_preferred_tier():
    tiers = [ArenaTier("cpu"), DictTier("mid"), DictTier("disk")]
    e = engine_of(*tiers, settings=[TierSettings(promote=False), TierSettings(), TierSettings()])
    x = body(5)
    assert e.store(K(1), x, mode="exact", tier="disk")
    assert torch.equal(e.load(K(1), mode="exact", tier="disk").data, x)
    assert not e.contains(K(1), mode="exact", tier="cpu") and not e.contains(K(1), mode="exact", tier="mid")
    assert torch.equal(e.load(K(1), mode="prefer", tier="mid").data, x)      # mid, then cpu, then disk
    assert e.contains(K(1), mode="exact", tier="mid") and not e.contains(K(1), mode="exact", tier="cpu")
    e.close()


def test_a_lease_is_released_by_its_holder_only():
    arena = ArenaTier("cpu", capacity_bytes=64 << 10)
    e = engine_of(arena)
    x = body(1, 16 << 10)
    assert e.store(K(1), x)
    first, second = e.lease(K(1)), e.lease(K(1))
    assert first.held and second.held and arena.leases_on(K(1)) == 2
    assert first.artifact.data.data_ptr() == arena.stored(K(1)).data_ptr()   # a view, not a copy
    first.release()
    first.release()                                   # idempotent: never ends the other holder's
    assert arena.leases_on(K(1)) == 1
    for i in range(2, 12):                            # pressure: four times the tier's capacity
        e.store(K(i), body(i, 16 << 10))
    assert K(1) not in arena.evicted and torch.equal(second.artifact.data, x)
    assert not e.store(K(1), body(99, 16 << 10))      # nor overwritten while leased
    with second as art:
        assert torch.equal(art, x) if isinstance(art, torch.Tensor) else torch.equal(art.data, x)
    assert arena.leases_on(K(1)) == 0
    for i in range(12, 20):
        e.store(K(i), body(i, 16 << 10))
    assert K(1) in arena.evicted                      # no holder left: evictable again
    with e.pinned(K(19)) as art:                      # the with-block form releases at its end
        assert arena.leases_on(K(19)) == 1 and torch.equal(art.data, body(19, 16 << 10))
    assert arena.leases_on(K(19)) == 0
    e.close()


def test_a_lease_from_a_tier_without_zero_copy_is_an_owned_copy():
    plain = DictTier("disk", persistent=True)
    e = engine_of(plain)
    x = body(3)
    e.store(K(1), x)
    lease = e.lease(K(1))
    assert not lease.held and torch.equal(lease.artifact.data, x)
    assert lease.artifact.data.data_ptr() != plain.stored(K(1)).data_ptr()
    lease.release()
    e.close()


def test_hold_leases_every_in_memory_copy_and_renews():
    cpu, shm, disk = ArenaTier("cpu"), ArenaTier("shm", persistent=True), DictTier("disk")
    e = engine_of(cpu, shm, disk)
    keys = [K(i, "params") for i in range(4)]
    assert e.store_many([(k, body(i)) for i, k in enumerate(keys)]) == [True] * 4
    assert cpu.delete(keys[3])                       # one key only in the lower tiers
    held = e.hold(keys, lease_s=5.0)
    assert len(held) == 7 and all(lease.held for lease in held)
    assert [cpu.leases_on(k) for k in keys] == [1, 1, 1, 0]
    assert [shm.leases_on(k) for k in keys] == [1, 1, 1, 1]
    renewed = e.hold(keys, lease_s=5.0)              # the renewal overlaps the old leases
    for lease in held:
        lease.release()
    assert [cpu.leases_on(k) for k in keys] == [1, 1, 1, 0]
    for lease in renewed:
        lease.release()
    assert sum(cpu.leases_on(k) + shm.leases_on(k) for k in keys) == 0
    assert e.stats()["engine"]["loads"] == 0        # holding is not reading
    e.close()


def test_tier_faults_are_isolated_and_counted_for_every_operation():
    good = ArenaTier("good")
    e = engine_of(FaultyTier(), good)
    x = body(7)
    assert e.store(K(1), x)                          # the faulty tier refuses, the next one takes it
    assert e.store_many([(K(2), x)]) == [True]
    assert torch.equal(e.load(K(1)).data, x)
    assert torch.equal(e.load_many([K(1), K(2)])[1].data, x)
    with e.lease(K(1)) as art:
        assert torch.equal(art.data, x)
    assert len(e.hold([K(1)])) == 1
    for lease in e.hold([K(1)]):
        lease.release()
    assert e.contains(K(1)) and e.contains_many([K(1), K(3)]) == [True, False]
    e.start_prefault()
    assert e.delete(K(1)) and e.load(K(1)) is None
    stats = e.stats()
    assert stats["tiers"]["faulty"]["errors"] >= 9
    assert stats["tiers"]["good"]["errors"] == 0 and stats["tiers"]["good"]["hits"] >= 4
    e.close()


def test_a_failing_release_is_counted_not_raised():
    class BadRelease(ArenaTier):
        def _acquire(self, key, lease_s):
            lease = super()._acquire(key, lease_s)
            return None if lease is None else Lease(lease.artifact, self.name, self._boom)

        def _boom(self):
            raise OSError("release: device gone")

    e = engine_of(BadRelease("cpu"))
    e.store(K(1), body(1))
    with e.pinned(K(1)) as art:
        assert art is not None
    assert e.stats()["tiers"]["cpu"]["errors"] == 1
    e.close()


def test_caller_mistakes_reach_the_caller_as_invalid_argument():
    e = engine_of(FaultyTier(), ArenaTier("good"))
    e.store(K(1), body(1, 100))
    with pytest.raises(InvalidArgument, match="out has 10 bytes but the stored object has 100"):
        e.load(K(1), out=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(InvalidArgument, match=r"outs\[1\] must be a contiguous 1-D torch.uint8"):
        e.load_many([K(1), K(2)], outs=[None, torch.empty(4, dtype=torch.int32)])
    with pytest.raises(InvalidArgument, match="out has 10 bytes but the stored object has 100"):
        e.load_many([K(1)], outs=[torch.empty(10, dtype=torch.uint8)])
    with pytest.raises(InvalidType, match="key must be an ArtifactKey"):
        e.lease("k1")
    with pytest.raises(InvalidType, match=r"keys\[1\] must be an ArtifactKey"):
        e.hold([K(1), b"k"])
    with pytest.raises(InvalidArgument, match="mode must be one of"):
        e.lease(K(1), mode="fastest")
    with pytest.raises(InvalidType, match="payload dtype torch.complex64 cannot be stored"):
        e.store(K(3), torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(InvalidArgument, match="payload has 17 dims"):
        e.store(K(3), torch.zeros([1] * 17))
    with pytest.raises(InvalidArgument, match="payload tensor must be contiguous"):
        e.store(K(3), torch.zeros(4, 4).t())
    with pytest.raises(InvalidType, match="payload must be a torch.Tensor or bytes-like"):
        e.store(K(3), [1, 2])
    with pytest.raises(InvalidArgument, match=r"items\[0\].key .* encodes to \d+ bytes"):
        e.store_many([(ArtifactKey("kv", "n", "x" * 600), b"x")])
    with pytest.raises(InvalidType, match=r"tiers\[0\] must be a stratacache.backends.base.Tier"):
        TierChain([object()])
    assert e.stats()["tiers"]["good"]["errors"] == 0
    e.close()


def test_corrupt_reads_are_misses_served_from_below_and_counted_once():
    shm, disk = ArenaTier("shm", persistent=True), DictTier("disk", persistent=True)
    e = engine_of(shm, disk, settings=[TierSettings(promote=False), TierSettings()])
    xs = [body(20 + i) for i in range(3)]
    keys = [K(i) for i in range(3)]
    assert e.store_many(list(zip(keys, xs))) == [True] * 3
    for i in range(3):
        shm.stored(keys[i])[random.Random(i).randrange(xs[i].numel())] ^= 0x5A   # bit rot
    assert torch.equal(e.load(keys[0]).data, xs[0])
    assert torch.equal(e.load_many(keys[1:2])[0].data, xs[1])
    with e.lease(keys[2]) as art:
        assert torch.equal(art.data, xs[2])
    assert not any(shm.contains([k.encode() for k in keys]))                   # dropped there
    stats = e.stats()
    assert stats["engine"]["corrupt"] == 3 and stats["tiers"]["shm"]["corrupt"] == 3
    assert stats["engine"]["hits"] == 3 and stats["engine"]["misses"] == 0


def test_verify_false_hands_a_persistent_tiers_bytes_to_a_caller_that_verifies_itself():
    shm = ArenaTier("shm", persistent=True)
    cpu = ArenaTier("cpu")                         # process-private: trusted, never verified
    e = engine_of(cpu, shm)
    x = body(30)
    assert e.store(K(1), x, mode="exact", tier="shm") and e.store(K(2), x, mode="exact", tier="cpu")
    shm.stored(K(1))[0] ^= 1
    cpu.stored(K(2))[0] ^= 1
    with e.pinned(K(1), verify=False) as art:      # the vLLM worker's call: it checks the lease
        assert art is not None and art.data[0] == x[0] ^ 1
    assert e.load(K(2)).data[0] == x[0] ^ 1        # the CPU tier is not verified
    assert e.load(K(1), mode="exact", tier="shm") is None   # verify=True: a dropped miss
    assert e.stats()["engine"]["corrupt"] == 1
    e.close()


def test_a_tier_raising_corrupt_artifact_is_a_miss():
    class Damaged(DictTier):
        def _get(self, key, out):
            raise CorruptArtifact("header checksum mismatch")

    top, below = Damaged("top"), DictTier("below")
    e = engine_of(top, below)
    x = body(40)
    e.store(K(1), x)
    assert torch.equal(e.load(K(1)).data, x)
    assert e.stats()["tiers"]["top"]["corrupt"] == 1 and e.stats()["tiers"]["top"]["errors"] == 0
    e.close()
