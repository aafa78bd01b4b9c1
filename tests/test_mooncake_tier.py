"""MooncakeTier against a real mooncake_master and real segment holders, nothing mocked.

Everything Mooncake runs inside a loopback-only network namespace entered by the test
thread (see tests/mooncake_server.py); where that namespace cannot be made, every test
here fails saying why.
"""

from __future__ import annotations

import random
import socket
import time

import pytest
import torch

from stratacache.backends.mooncake import HEADER_SLOT, MooncakeTier
from stratacache.core.artifact import ArtifactMeta, as_bytes, meta_for
from stratacache.core.errors import ConfigError, InvalidArgument, TierFault
from stratacache.core.keys import ArtifactKey
from stratacache.ops import checksum64
from tests.mooncake_server import (MooncakeMaster, SegmentHolder, in_loopback_namespace,
                                   loopback_namespace, raw_store)

OP_TIMEOUT_S = 1.0
LEASE_MS = 1000
SLACK_S = 0.75   # scheduling on a loaded 2-core box; a hang would be Mooncake's 30 s


@pytest.fixture(scope="module")
def netns():
    with loopback_namespace():
        yield


@pytest.fixture(scope="module")
def master(netns):
    # A read lease long enough for a 16 MiB read on a loaded 2-core box (a read that outlasts
    # its lease is a miss, which the round trips would report); test_delete outwaits it.
    with MooncakeMaster(client_ttl_s=2, lease_ttl_ms=LEASE_MS) as m:
        yield m


@pytest.fixture(scope="module")
def holder(master):
    with SegmentHolder(master, 320 << 20) as h:
        yield h


def make_tier(master, **kw) -> MooncakeTier:
    opts = dict(master_address=master.address, metrics_address=master.metrics_address,
                op_timeout_s=OP_TIMEOUT_S, connect_timeout_s=0.5, retry_backoff_s=0.2,
                retry_backoff_max_s=1.0)
    opts.update(kw)
    return MooncakeTier(**opts)


@pytest.fixture
def tier(master, holder):
    t = make_tier(master)
    yield t
    t.close()


def item(name: str, payload: torch.Tensor, ns: str = "t"):
    key = ArtifactKey("kv", ns, name)
    data = as_bytes(payload)
    return key, data, meta_for(payload, checksum64(data))


def random_payload(rng: random.Random, nbytes: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.getrandbits(32))
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def fresh_name(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}-{random.getrandbits(24)}"


def wait_until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout_s}s")


# -- the namespace ----------------------------------------------------------------------

def _listening_ports(path: str) -> set[int]:
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"{path}/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A":   # LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            continue
    return ports


def test_mooncake_listens_only_inside_the_loopback_namespace(tier):
    """The client's all-address listeners exist in the test namespace and not in the host's."""
    assert in_loopback_namespace()
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    inside = _listening_ports("/proc/thread-self/net")
    host = _listening_ports("/proc/1/net")
    assert inside, "no Mooncake listener found inside the namespace"
    mine = inside - host
    assert mine, f"every port listening in the namespace also listens on the host: {inside}"
    with open("/proc/thread-self/net/tcp") as f:
        wildcard = [ln for ln in f if ln.split()[3] == "0A" and ln.split()[1].startswith("00000000:")]
    assert wildcard, "expected Mooncake's 0.0.0.0 listeners here (the reason for the namespace)"


# -- round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes", [1, 7, 4096, 65537, 1 << 20, (16 << 20) - 3, 16 << 20])
def test_round_trip_random_bytes(tier, nbytes):
    rng = random.Random(nbytes)
    payload = random_payload(rng, nbytes)
    key, data, meta = item(fresh_name(f"rt{nbytes}"), payload)
    assert tier.put(key, data, meta)
    art = tier.get(key)
    assert art is not None and art.meta == meta and torch.equal(art.data, data)
    out = torch.full((nbytes,), 0xAB, dtype=torch.uint8)
    art = tier.get(key, out)
    assert art is not None and art.data.data_ptr() == out.data_ptr() and torch.equal(out, data)
    bigger = torch.zeros(nbytes + 33, dtype=torch.uint8)
    art = tier.get(key, bigger, verify=True)
    assert art is not None and torch.equal(art.data, data) and torch.equal(bigger[:nbytes], data)


def test_dtype_and_shape_survive(tier):
    g = torch.Generator().manual_seed(5)
    for i, dtype in enumerate([torch.bfloat16, torch.float32, torch.int32, torch.float16]):
        t = torch.randn(3, 5, 67, generator=g).to(dtype)
        key, data, meta = item(fresh_name(f"dt{i}"), t)
        assert tier.put(key, data, meta)
        art = tier.get(key)
        assert art.meta.dtype == dtype and art.meta.shape == (3, 5, 67)
        assert torch.equal(art.tensor(), t)


def test_many_round_trip_and_mixed_misses(tier):
    rng = random.Random(11)
    items = [item(fresh_name(f"m{i}"), random_payload(rng, rng.randint(1, 300_000)))
             for i in range(12)]
    assert tier.put_many(items) == [True] * 12
    absent = ArtifactKey("kv", "t", fresh_name("absent"))
    keys = [k for k, _, _ in items]
    keys.insert(5, absent)
    outs = [None if j % 2 else torch.empty(200_000 if j == 4 else 300_000, dtype=torch.uint8)
            for j in range(len(keys))]
    for j, k in enumerate(keys):   # outs must hold the values they get
        if k is not absent and outs[j] is not None:
            outs[j] = torch.empty(dict((kk, m.size) for kk, _, m in items)[k] + j,
                                  dtype=torch.uint8)
    got = tier.get_many(keys, outs)
    for j, (k, art) in enumerate(zip(keys, got)):
        if k is absent:
            assert art is None
            continue
        data = next(d for kk, d, _ in items if kk == k)
        assert art is not None and torch.equal(art.data, data), j
    assert tier.contains([k.encode() for k in keys]) == [k is not absent for k in keys]


def test_miss_for_absent_key(tier):
    key = ArtifactKey("kv", "t", fresh_name("none"))
    before = tier.stats()["misses"]
    assert tier.get(key) is None
    assert tier.get(key, torch.empty(10, dtype=torch.uint8)) is None
    assert tier.contains([key.encode()]) == [False]
    assert tier.stats()["misses"] == before + 2
    assert tier.healthy


def test_out_smaller_than_value_is_a_caller_error(tier):
    key, data, meta = item(fresh_name("small"), random_payload(random.Random(3), 5000))
    assert tier.put(key, data, meta)
    with pytest.raises(InvalidArgument, match="5000"):
        tier.get(key, torch.empty(4999, dtype=torch.uint8))


def test_overwrite_replaces_the_value(tier):
    """Mooncake's put keeps an existing value; the tier's put replaces it (upsert)."""
    rng = random.Random(21)
    name = fresh_name("ow")
    key, old, old_meta = item(name, random_payload(rng, 70_000))
    assert tier.put(key, old, old_meta)
    assert tier.get(key) is not None        # a reader now holds Mooncake's read lease
    _, new, new_meta = item(name, random_payload(rng, 50_001))
    assert tier.put(key, new, new_meta)
    art = tier.get(key)
    assert art.meta == new_meta and torch.equal(art.data, new)
    out = torch.empty(70_000, dtype=torch.uint8)   # sized for the old value: read resized
    art = tier.get(key, out)
    assert art is not None and art.meta.size == 50_001 and torch.equal(out[:50_001], new)


def test_put_many_mixes_new_and_existing_keys(tier):
    """New keys take the zero-copy batch put, stored ones the upsert: both end up current."""
    rng = random.Random(23)
    names = [fresh_name(f"mix{i}") for i in range(6)]
    first = [item(n, random_payload(rng, 20_000 + i)) for i, n in enumerate(names[:3])]
    assert tier.put_many(first) == [True] * 3
    second = [item(n, random_payload(rng, 30_000 + i)) for i, n in enumerate(names)]
    assert tier.put_many(second) == [True] * 6
    for key, data, meta in second:
        art = tier.get(key)
        assert art is not None and art.meta == meta and torch.equal(art.data, data)
    twice = fresh_name("twice")                     # one key twice in a batch: the last wins
    batch = [item(twice, random_payload(rng, 1000)), item(twice, random_payload(rng, 1500))]
    assert tier.put_many(batch) == [True, True]
    assert torch.equal(tier.get(batch[1][0]).data, batch[1][1])


def test_empty_payload_round_trips(tier):
    key, data, meta = item(fresh_name("empty"), torch.empty(0, dtype=torch.uint8))
    assert tier.put(key, data, meta)
    art = tier.get(key)
    assert art is not None and art.meta.size == 0
    assert tier.get(key, torch.empty(0, dtype=torch.uint8)) is not None
    _, data2, meta2 = item(key.name, torch.arange(5, dtype=torch.uint8))
    assert tier.put(key, data2, meta2) and torch.equal(tier.get(key).data, data2)
    assert tier.put(key, data, meta) and tier.get(key).meta.size == 0


def test_delete(master, holder):
    tier = make_tier(master, op_timeout_s=3 * LEASE_MS / 1000)   # outwaits a reader's lease
    try:
        _check_delete(tier, master)
    finally:
        tier.close()


def _check_delete(tier, master):
    key, data, meta = item(fresh_name("del"), random_payload(random.Random(4), 1234))
    assert tier.put(key, data, meta)
    assert tier.delete(key)
    assert tier.get(key) is None and tier.contains([key.encode()]) == [False]
    assert not tier.delete(key)
    assert tier.put(key, data, meta)
    assert tier.get(key) is not None       # grants a read lease (LEASE_MS): remove is refused meanwhile
    t0 = time.monotonic()
    assert tier.delete(key)                # retried until the reader's lease passed
    assert master.lease_ttl_ms / 1000 * 0.5 <= time.monotonic() - t0 < tier.op_timeout_s + 0.5
    assert tier.get(key) is None


def test_delete_under_a_lease_longer_than_the_timeout_is_refused_in_bounded_time(master, holder):
    """A reader's lease outlasting op_timeout_s: delete gives up at the timeout (False, counted),
    and the object is still there, intact, for the reader."""
    short = make_tier(master, op_timeout_s=0.1)
    try:
        key, data, meta = item(fresh_name("del-long"), random_payload(random.Random(5), 999))
        assert short.put(key, data, meta)
        assert short.get(key) is not None
        t0 = time.monotonic()
        assert not short.delete(key)
        assert time.monotonic() - t0 < 0.1 + 0.15
        assert short.stats()["detail"]["delete_leased"] == 1
        assert torch.equal(short.get(key).data, data)
    finally:
        short.close()


def test_keys_lists_what_the_tier_stored(tier):
    ns = fresh_name("keys")
    mine = [item(f"k{i}", torch.arange(10 + i, dtype=torch.uint8), ns) for i in range(4)]
    assert all(tier.put(*it) for it in mine)
    listed = {k for k in tier.keys() if k.namespace == ns}
    assert listed == {k for k, _, _ in mine}


def test_stats_report_the_store_occupancy_from_the_master(netns):
    with MooncakeMaster() as m, SegmentHolder(m, 32 << 20):
        tier = make_tier(m)
        try:
            rng = random.Random(41)
            for i in range(3):
                assert tier.put(*item(f"o{i}", random_payload(rng, 100_000)))
            s = tier.stats()
            assert s["capacity_bytes"] == tier.capacity_bytes == 32 << 20
            assert s["items"] == 3 and s["used_bytes"] == 3 * (HEADER_SLOT + 100_000)
            assert s["puts"] == 3 and s["detail"]["healthy"] is True
        finally:
            tier.close()


def test_inspect_reports_the_prefix_from_the_master_alone(tier, master):
    ns = fresh_name("insp")
    prefix = fresh_name("ip") + ":"
    writer = make_tier(master, key_prefix=prefix)
    try:
        assert writer.put(*item("a", torch.arange(200, dtype=torch.uint8), ns))
        assert writer.put(*item("b", torch.arange(50, dtype=torch.uint8), ns))
        params = ArtifactKey("params", ns, "w")
        data = torch.arange(70, dtype=torch.uint8)
        assert writer.put(params, data, meta_for(data, checksum64(data)))
    finally:
        writer.close()

    class Section:
        key_prefix = prefix
        master_address = master.address
        metrics_address = master.metrics_address

    report = MooncakeTier.inspect(Section, None)
    assert report["items"] == 3 and report["unreadable"] == 0
    assert report["used_bytes"] == 3 * HEADER_SLOT + 320
    assert report["by_kind"]["kv"] == {"items": 2, "bytes": 2 * HEADER_SLOT + 250}
    assert report["by_namespace"][f"params/{ns}"] == {"items": 1, "bytes": HEADER_SLOT + 70}
    assert report["capacity_bytes"] > 0 and master.address in report["location"]


def test_inspect_of_an_unreachable_master_names_the_address(netns):
    class Section:
        metrics_address = "127.0.0.1:1"

    with pytest.raises(TierFault, match="127.0.0.1:1"):
        MooncakeTier.inspect(Section, None)


# -- untrusted values ---------------------------------------------------------------------

def _stored_value(key: ArtifactKey, data: torch.Tensor, meta: ArtifactMeta) -> bytes:
    head = meta.pack(key.encode())
    return head + bytes(HEADER_SLOT - len(head)) + bytes(data.numpy())


def _corruptions(key, other_key, data, meta, rng):
    good = _stored_value(key, data, meta)
    flipped_head = bytearray(good)
    flipped_head[9] ^= 0x10
    bad_pad = bytearray(good)
    bad_pad[HEADER_SLOT - 1] = 1
    return {
        "random garbage": bytes(rng.getrandbits(8) for _ in range(len(good))),
        "shorter than a header": good[:HEADER_SLOT // 2],
        "header only": good[:HEADER_SLOT],
        "truncated payload": good[:HEADER_SLOT + meta.size // 2],
        "extra bytes": good + b"\0" * 16,
        "flipped header bit": bytes(flipped_head),
        "padding not zero": bytes(bad_pad),
        "another key's value": _stored_value(other_key, data, meta),
    }


@pytest.mark.parametrize("with_out", [False, True])
def test_corrupt_values_are_misses_and_dropped(tier, master, with_out):
    rng = random.Random(99)
    raw = raw_store(master)
    try:
        key, data, meta = item(fresh_name("bad"), random_payload(rng, 4000))
        mkey = tier.key_prefix + key.encode().decode()
        for what, value in _corruptions(key, ArtifactKey("kv", "t", "other"), data, meta,
                                        rng).items():
            assert raw.upsert(mkey, value) == 0, what
            before = tier.stats()["corrupt"]
            out = torch.empty(meta.size, dtype=torch.uint8) if with_out else None
            assert tier.get(key, out) is None, what
            assert tier.stats()["corrupt"] == before + 1, what
            assert raw.get_size(mkey) < 0, f"{what}: the corrupt value was not dropped"
    finally:
        raw.close()


def test_flipped_payload_byte_is_a_miss_when_verified(tier, master):
    raw = raw_store(master)
    try:
        key, data, meta = item(fresh_name("flip"), random_payload(random.Random(8), 9000))
        value = bytearray(_stored_value(key, data, meta))
        value[HEADER_SLOT + 1234] ^= 0x01
        assert raw.upsert(tier.key_prefix + key.encode().decode(), bytes(value)) == 0
        assert tier.get(key, verify=True) is None
        assert tier.stats()["corrupt"] >= 1
        verifying = make_tier(master, verify_reads=True)
        try:
            assert raw.upsert(tier.key_prefix + key.encode().decode(), bytes(value)) == 0
            assert verifying.get(key) is None
        finally:
            verifying.close()
    finally:
        raw.close()


# -- faults ---------------------------------------------------------------------------

def _timed(fn):
    t0 = time.monotonic()
    res = fn()
    return res, time.monotonic() - t0


def test_master_killed_mid_run_then_recovers(netns):
    with MooncakeMaster(client_ttl_s=2) as m, SegmentHolder(m, 64 << 20):
        tier = make_tier(m)
        try:
            rng = random.Random(5)
            key, data, meta = item("before", random_payload(rng, 100_000))
            assert tier.put(key, data, meta)
            m.kill()
            other, odata, ometa = item("during", random_payload(rng, 100_000))
            for _ in range(3):
                for op in (lambda: tier.get(key), lambda: tier.put(other, odata, ometa),
                           lambda: tier.contains([key.encode()]), lambda: tier.delete(key),
                           lambda: tier.get_many([key, other])):
                    res, took = _timed(op)
                    assert res in (None, False, [False], [None, None]), res
                    assert took < OP_TIMEOUT_S + SLACK_S, f"a call took {took:.2f}s"
            assert not tier.healthy
            assert tier.stats()["detail"]["fast_misses"] > 0
            m.start()   # an empty master: every object is gone; holders mount again
            wait_until(lambda: tier.put(other, odata, ometa), 30, "put after the restart")
            art = tier.get(other)
            assert art is not None and torch.equal(art.data, odata)
            assert tier.get(key) is None            # lost with the master
            assert tier.healthy and tier.stats()["detail"]["recoveries"] >= 1
        finally:
            tier.close()


def test_hung_master_costs_one_timeout_then_backs_off(netns):
    with MooncakeMaster() as m, SegmentHolder(m, 64 << 20):
        tier = make_tier(m, retry_backoff_s=30.0, retry_backoff_max_s=60.0)
        try:
            key, data, meta = item("hung", random_payload(random.Random(6), 50_000))
            m.pause()
            try:
                ok, took = _timed(lambda: tier.put(key, data, meta))
                assert ok is False and took < OP_TIMEOUT_S + SLACK_S, took
                for op in (lambda: tier.get(key), lambda: tier.put(key, data, meta),
                           lambda: tier.contains([key.encode()])):
                    res, took = _timed(op)
                    assert res in (None, False, [False]) and took < 0.05, (res, took)
            finally:
                m.resume()
        finally:
            tier.close()


def test_master_down_at_start_up_then_recovers(netns):
    m = MooncakeMaster(start=False)
    try:
        tier, took = _timed(lambda: make_tier(m))
        try:
            assert not tier.healthy
            key, data, meta = item("late", random_payload(random.Random(7), 3000))
            assert tier.put(key, data, meta) is False and tier.get(key) is None
            m.start()
            with SegmentHolder(m, 32 << 20):
                wait_until(lambda: tier.put(key, data, meta), 30, "put once the master is up")
                assert torch.equal(tier.get(key).data, data)
        finally:
            tier.close()
    finally:
        m.close()


def test_segment_holder_killed_is_a_miss_not_garbage(netns):
    with MooncakeMaster(client_ttl_s=2) as m:
        holder = SegmentHolder(m, 64 << 20)
        tier = make_tier(m)            # contributes no memory: values live in the holder
        try:
            rng = random.Random(12)
            items = [item(f"h{i}", random_payload(rng, 200_000)) for i in range(5)]
            assert tier.put_many(items) == [True] * 5
            holder.kill()
            outs = [torch.full((200_000,), 0x5A, dtype=torch.uint8) for _ in items]
            assert tier.get_many([k for k, _, _ in items], outs) == [None] * 5
            assert tier.get(items[0][0]) is None
            assert tier.stats()["detail"]["transfer_failures"] >= 5
            wait_until(lambda: tier.contains([items[0][0].encode()]) == [False], 15,
                       "the dead holder's objects leaving the master")
            assert tier.put(*items[0]) is False     # no segment left anywhere: refused
            assert tier.healthy                     # a dead holder is not a dead master
        finally:
            tier.close()
            holder.close()


def test_full_store_refuses_without_backing_off(netns):
    with MooncakeMaster() as m, SegmentHolder(m, 32 << 20):
        tier = make_tier(m)
        try:
            rng = random.Random(13)
            results = [tier.put(*item(f"f{i}", random_payload(rng, 4 << 20))) for i in range(16)]
            assert True in results and False in results, results
            assert tier.healthy and tier.stats()["detail"]["refused"] >= results.count(False)
            stored = [i for i, ok in enumerate(results) if ok]
            for i in stored:   # what reads back is exact, or a miss once evicted: never garbage
                art = tier.get(ArtifactKey("kv", "t", f"f{i}"), verify=True)
                assert art is None or art.meta.size == 4 << 20
        finally:
            tier.close()


# -- the segment holder keeps KV across engines -------------------------------------------

def test_values_outlive_the_engine_client_with_a_segment_holder(netns):
    with MooncakeMaster() as m, SegmentHolder(m, 64 << 20):
        rng = random.Random(31)
        items = [item(f"s{i}", random_payload(rng, 300_000)) for i in range(4)]
        engine1 = make_tier(m)
        assert engine1.put_many(items) == [True] * 4
        engine1.close()                # the engine restarts
        engine2 = make_tier(m)
        try:
            for key, data, _ in items:
                art = engine2.get(key)
                assert art is not None and torch.equal(art.data, data)
        finally:
            engine2.close()


def test_values_die_with_an_embedded_engine_segment(netns):
    """The contrast: an engine that contributes the memory takes the values with it."""
    with MooncakeMaster() as m:
        engine1 = make_tier(m, global_segment_size=64 << 20)
        key, data, meta = item("emb", random_payload(random.Random(32), 10_000))
        assert engine1.put(key, data, meta)
        engine1.close()
        engine2 = make_tier(m, global_segment_size=64 << 20)
        try:
            assert engine2.get(key) is None
        finally:
            engine2.close()


def test_registered_memory_path_round_trips(tier):
    """The RDMA code path (memory registered once, the rest per call) on the real TCP client,
    which accepts registrations: values put from and read into both kinds of memory."""
    tier.protocol = "rdma"
    arena = torch.zeros(4 << 20, dtype=torch.uint8)
    tier.register_memory(arena)
    rng = random.Random(51)
    payload = random_payload(rng, 1 << 20)
    arena[:1 << 20] = payload
    key, data, meta = item(fresh_name("reg"), arena[:1 << 20])
    assert tier.put(key, data, meta)
    art = tier.get(key, arena[2 << 20:3 << 20])
    assert art is not None and torch.equal(arena[2 << 20:3 << 20], payload)
    loose = torch.empty(1 << 20, dtype=torch.uint8)
    assert tier.get(key, loose) is not None and torch.equal(loose, payload)
    other, odata, ometa = item(fresh_name("loose"), random_payload(rng, 300_000))
    assert tier.put(other, odata, ometa) and torch.equal(tier.get(other).data, odata)


# -- configuration ------------------------------------------------------------------------

@pytest.mark.parametrize("options, named", [
    ({"protocl": "tcp"}, "protocl"),
    ({"protocol": "udp"}, "tiers.mooncake.protocol"),
    ({"master_address": "localhost"}, "tiers.mooncake.master_address"),
    ({"global_segment_size": -1}, "tiers.mooncake.global_segment_size"),
    ({"replica_num": 0}, "tiers.mooncake.replica_num"),
    ({"op_timeout_s": 0}, "tiers.mooncake.op_timeout_s"),
    ({"retry_backoff_s": 5.0, "retry_backoff_max_s": 1.0}, "tiers.mooncake.retry_backoff_max_s"),
    ({"verify_reads": "yes"}, "tiers.mooncake.verify_reads"),
])
def test_bad_config_is_a_clear_error(options, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        MooncakeTier(**options)


def test_from_config_reads_the_section(master, holder):
    class Section:
        name = "mooncake"
        master_address = master.address
        metrics_address = master.metrics_address
        replica_num = 1
        verify_reads = True

    tier = MooncakeTier.from_config(Section, None)
    try:
        assert tier.verify_reads and tier.master_address == master.address
        key, data, meta = item(fresh_name("cfg"), torch.arange(100, dtype=torch.uint8))
        assert tier.put(key, data, meta) and torch.equal(tier.get(key).data, data)
    finally:
        tier.close()
