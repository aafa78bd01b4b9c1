"""RedisTier against real redis-server processes (tests/redis_server.py).

Every server here is started by the test on 127.0.0.1 at a free port and
stopped by PID; if redis-server cannot start the test fails (never skips).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from stratacache.backends.base import INSPECT_KEYS, Lease, Tier
from stratacache.backends.redis import RedisTier, RedisTierConfigError, resp
from stratacache.config import load_config
from stratacache.core.artifact import ArtifactMeta, as_bytes, meta_for
from stratacache.core.errors import ConfigError, TierFault
from stratacache.core.keys import ArtifactKey
from tests.redis_server import (RedisServer, RedisServerError, commands_run_by, free_port,
                                make_tls_files, tier_items)

DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int64]


def item(payload):
    """(data, meta) as the engine would hand them to a tier."""
    _, data, meta = tier_items([(None, payload)])[0]
    return data, meta


def rand_tensor(rng: random.Random, max_elems: int = 50_000) -> torch.Tensor:
    dtype = rng.choice(DTYPES)
    shape = tuple(rng.randint(1, 40) for _ in range(rng.randint(0, 3))) or (rng.randint(0, max_elems),)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def unique_key(kind="kv", ns="test-ns") -> ArtifactKey:
    return ArtifactKey(kind, ns, uuid.uuid4().hex)


def has(tier, *keys) -> list[bool]:
    """``contains`` as the chain calls it: with encoded keys."""
    return tier.contains([k.encode() for k in keys])


@pytest.fixture(scope="module")
def server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def layer(server):
    server.admin_client().flushall()
    lay = RedisTier(server.url, key_prefix=f"sct{uuid.uuid4().hex[:6]}:")
    yield lay
    lay.close()


def test_round_trip_random_payloads_byte_exact(layer):
    assert isinstance(layer, Tier) and layer.persistent and layer.name == "redis"
    assert layer.inspectable and not layer.zero_copy and layer.verify_reads
    assert issubclass(RedisTierConfigError, ConfigError)
    rng = random.Random(1234)
    stored = {}
    for i in range(25):
        t = rand_tensor(rng)
        key = ArtifactKey(rng.choice(["kv", "params", "custom"]), f"ns {i % 3} *?[x]",
                          f"name-{i}-\u00e9\u4e2d")
        data, meta = item(t)
        assert layer.put(key, data, meta) is True
        stored[key] = t.clone()
    big = torch.randint(0, 256, (3 * 2**20 + 7,), dtype=torch.uint8)
    kbig = unique_key()
    assert layer.put(kbig, *item(big))
    stored[kbig] = big

    for key, t in stored.items():
        assert has(layer, key)[0]
        art = layer.get(key)
        assert art is not None
        assert art.meta.dtype == t.dtype and art.meta.size == t.numel() * t.element_size()
        assert torch.equal(art.tensor().view(-1).view(torch.uint8), t.view(-1).view(torch.uint8))
        # into a poisoned, larger caller buffer: exact bytes, the tail untouched
        out = torch.full((art.meta.size + 64,), 0xAB, dtype=torch.uint8)
        art2 = layer.get(key, out=out)
        assert art2.data.data_ptr() == out.data_ptr()
        assert torch.equal(out[: art.meta.size], as_bytes(t.contiguous()))
        assert bool((out[art.meta.size:] == 0xAB).all())

    assert set(layer.keys()) == set(stored)
    missing = unique_key()
    assert layer.get(missing) is None and not has(layer, missing)[0]
    assert layer.delete(kbig) and not layer.delete(kbig)
    assert layer.get(kbig) is None
    st = layer.stats()
    assert st["puts"] == 26 and st["hits"] == 52 and st["misses"] == 2 and st["errors"] == 0
    assert st["detail"]["healthy"] is True


def test_stored_value_is_header_then_payload(layer, server):
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    key = unique_key()
    data, meta = item(t)
    layer.put(key, data, meta)
    raw = server.admin_client().get(layer.key_prefix + key.encode())
    assert raw == meta.pack(key.encode()) + t.numpy().tobytes()


def test_batched_operations(layer):
    rng = random.Random(7)
    keys = [unique_key(ns=f"b{i % 2}") for i in range(20)]
    tensors = [torch.randint(0, 256, (rng.randint(1, 200_000),), dtype=torch.uint8) for _ in keys]
    assert layer.put_many([(k, *item(t)) for k, t in zip(keys, tensors)]) == [True] * 20
    absent = [unique_key() for _ in range(5)]
    probe = keys[:10] + absent + keys[10:]
    assert has(layer, *probe) == [True] * 10 + [False] * 5 + [True] * 10
    outs = [torch.full((300_000,), 0x5A, dtype=torch.uint8) if i % 2 else None
            for i in range(len(probe))]
    got = layer.get_many(probe, outs)
    expect = tensors[:10] + [None] * 5 + tensors[10:]
    for i, (art, t) in enumerate(zip(got, expect)):
        if t is None:
            assert art is None
            continue
        assert torch.equal(art.data, t)
        if outs[i] is not None:
            assert art.data.data_ptr() == outs[i].data_ptr()
            assert bool((outs[i][t.numel():] == 0x5A).all())
    st = layer.stats()
    assert (st["puts"], st["hits"], st["misses"]) == (20, 20, 5)
    assert st["bytes_out"] == sum(t.numel() for t in tensors)
    assert layer.put_many([]) == [] and layer.get_many([]) == [] and layer.contains([]) == []


def test_a_hit_or_a_lease_is_one_get_and_a_miss_one_get(layer, server):
    """Counted by the server: one GET per key read (get, get with out, get_many, acquire),
    never an EXISTS first; contains is EXISTS only."""
    admin = server.admin_client()
    rng = random.Random(99)
    keys = [unique_key() for _ in range(5)]
    tensors = [torch.randint(0, 256, (rng.randint(1, 300_000),), dtype=torch.uint8) for _ in keys]
    assert layer.put_many([(k, *item(t)) for k, t in zip(keys, tensors)]) == [True] * 5
    missing = unique_key()

    art, ran = commands_run_by(admin, lambda: layer.get(keys[0]))
    assert torch.equal(art.data, tensors[0]) and ran == {"get": 1}
    out = torch.empty(tensors[1].numel(), dtype=torch.uint8)
    art, ran = commands_run_by(admin, lambda: layer.get(keys[1], out=out, verify=True))
    assert art.data.data_ptr() == out.data_ptr() and torch.equal(out, tensors[1])
    assert ran == {"get": 1}
    lease, ran = commands_run_by(admin, lambda: layer.acquire(keys[2]))
    assert ran == {"get": 1}
    assert isinstance(lease, Lease) and lease.tier == "redis" and not lease.held
    with lease as leased:                      # an owned copy: nothing to hold on the server
        assert torch.equal(leased.data, tensors[2])
    assert torch.equal(lease.artifact.data, tensors[2])
    got, ran = commands_run_by(admin, lambda: layer.get_many(keys + [missing]))
    assert ran == {"get": 6} and got[-1] is None
    assert all(torch.equal(a.data, t) for a, t in zip(got, tensors))
    for miss in (lambda: layer.get(missing), lambda: layer.acquire(missing)):
        res, ran = commands_run_by(admin, miss)
        assert res is None and ran == {"get": 1}
    present, ran = commands_run_by(admin, lambda: has(layer, keys[3], missing))
    assert present == [True, False] and ran == {"exists": 2}
    st = layer.stats()
    assert (st["hits"], st["misses"]) == (8, 3)


def test_batches_are_one_pipelined_exchange_per_server(layer, monkeypatch):
    exchanges = []
    real = resp.exchange
    monkeypatch.setattr(resp, "exchange", lambda *a, **kw: exchanges.append(1) or real(*a, **kw))
    keys = [unique_key() for _ in range(12)]
    tensors = [torch.randint(0, 256, (1000 + i,), dtype=torch.uint8) for i in range(12)]
    assert layer.put_many([(k, *item(t)) for k, t in zip(keys, tensors)]) == [True] * 12
    assert len(exchanges) == 1
    got = layer.get_many(keys, [torch.empty(2000, dtype=torch.uint8) for _ in keys])
    assert all(torch.equal(a.data, t) for a, t in zip(got, tensors)) and len(exchanges) == 2
    assert has(layer, *keys) == [True] * 12 and len(exchanges) == 3


def test_bad_arguments_are_clear_errors(layer):
    key = unique_key()
    data, meta = item(torch.arange(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="meta.size"):
        layer.put(key, data[:5], meta)
    with pytest.raises(ValueError, match="uint8"):
        layer.put(key, torch.zeros(10, dtype=torch.float32), meta)
    layer.put(key, data, meta)
    with pytest.raises(ValueError, match="out"):
        layer.get(key, out=torch.zeros(10, dtype=torch.float32))
    with pytest.raises(ValueError, match="out has 4 bytes but the stored object has 10"):
        layer.get(key, out=torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="outs"):
        layer.get_many([key], [None, None])
    with pytest.raises(RedisTierConfigError, match="tiers.redis.url"):
        RedisTier("http://127.0.0.1:1")
    with pytest.raises(RedisTierConfigError, match="tls_key_file"):
        RedisTier("redis://127.0.0.1:1", tls=True, tls_cert_file="/x.crt")
    with pytest.raises(RedisTierConfigError, match="tls is false"):
        RedisTier("redis://127.0.0.1:1", tls_ca_file="/ca.crt")


def test_corrupt_values_are_counted_misses_and_deleted(layer, server):
    admin = server.admin_client()
    keys = [unique_key() for _ in range(4)]
    t = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    for k in keys:
        layer.put(k, *item(t))
    rk = [layer.key_prefix + k.encode() for k in keys]
    hlen = len(meta_for(t, 0).pack(keys[0].encode()))
    admin.setrange(rk[0], hlen + 100, bytes([t[100].item() ^ 0xFF]))   # flipped payload byte
    admin.set(rk[1], b"not a stratacache value at all")                  # bad header
    admin.set(rk[2], admin.get(rk[2])[:-1])                               # truncated
    admin.delete(rk[3])
    admin.rpush(rk[3], b"x")                                              # wrong type
    before = layer.stats()
    assert layer.get_many(keys) == [None] * 4
    st = layer.stats()
    assert st["corrupt"] - before["corrupt"] == 4
    assert st["misses"] - before["misses"] == 4
    assert admin.exists(*rk) == 0
    assert layer.healthy


def test_ttl_expiry(server):
    lay = RedisTier(server.url, ttl_s=0.3, key_prefix=f"ttl{uuid.uuid4().hex[:6]}:")
    try:
        key = unique_key()
        assert lay.put(key, *item(torch.ones(100, dtype=torch.uint8)))
        pttl = server.admin_client().pttl(lay.key_prefix + key.encode())
        assert 0 < pttl <= 300
        assert lay.get(key) is not None
        deadline = time.monotonic() + 5
        while has(lay, key)[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lay.get(key) is None
        assert lay.stats()["misses"] == 1
    finally:
        lay.close()


def test_maxmemory_allkeys_lru_evicts_to_misses():
    with RedisServer(maxmemory="6mb", maxmemory_policy="allkeys-lru") as srv:
        lay = RedisTier(srv.url, key_prefix="lru:")
        assert lay.capacity_bytes == 6 * 2**20
        keys = [unique_key() for _ in range(40)]
        payloads = [torch.randint(0, 256, (256 * 1024,), dtype=torch.uint8) for _ in keys]
        for k, p in zip(keys, payloads):
            assert lay.put(k, *item(p)) is True    # every store is acknowledged
        got = lay.get_many(keys)
        present = [i for i, a in enumerate(got) if a is not None]
        # Redis' LRU clock ticks once a second, so which keys go is not ordered here;
        # what matters: evicted keys are plain misses, the rest are byte-exact.
        assert 0 < len(present) < len(keys)
        for i in present:
            assert torch.equal(got[i].data, payloads[i])
        st = lay.stats()
        assert st["misses"] == len(keys) - len(present) and st["errors"] == 0
        assert st["detail"]["healthy"]
        assert 0 < st["used_bytes"] <= st["capacity_bytes"] and 0 < st["items"] <= len(keys)
        # An object larger than the whole server is refused without being sent.
        big = torch.zeros(lay.capacity_bytes + 1, dtype=torch.uint8)
        small = torch.ones(10, dtype=torch.uint8)
        oks, ran = commands_run_by(srv.admin_client(), lambda: lay.put_many(
            [(unique_key(), *item(small)), (unique_key(), *item(big)), (unique_key(), *item(small))]))
        assert oks == [True, False, True] and ran == {"set": 2}
        lay.close()


def test_auth_and_wrong_password_is_clear_startup_error():
    with RedisServer(password="s3cret-default",
                     users=["alice on >alice-pw ~sc:* +@all"]) as srv:
        lay = RedisTier(srv.url, username="alice", password="alice-pw")
        key = unique_key()
        assert lay.put(key, *item(torch.arange(50, dtype=torch.uint8)))
        assert torch.equal(lay.get(key).data, torch.arange(50, dtype=torch.uint8))
        lay.close()
        ok_default = RedisTier(srv.url, password="s3cret-default")
        assert has(ok_default, key)[0]
        ok_default.close()
        with pytest.raises(RedisTierConfigError, match="password") as ei:
            RedisTier(srv.url, username="alice", password="WRONG-pw")
        assert "WRONG-pw" not in str(ei.value)
        with pytest.raises(RedisTierConfigError, match="username"):
            RedisTier(srv.url, username="nobody", password="x")
        with pytest.raises(RedisTierConfigError):
            RedisTier(srv.url)   # no credentials at all: NOAUTH
        # a user who may not touch the key prefix is a clear error too, not silent misses
        with pytest.raises(RedisTierConfigError, match="key_prefix"):
            RedisTier(srv.url, username="alice", password="alice-pw", key_prefix="other:")


def test_killed_server_then_restart_never_raises_and_recovers():
    with RedisServer() as srv:
        lay = RedisTier(srv.url, op_timeout_s=0.5, connect_timeout_s=0.2,
                               retry_backoff_s=0.05, retry_backoff_max_s=0.2)
        k1 = unique_key()
        t = torch.randint(0, 256, (10_000,), dtype=torch.uint8)
        assert lay.put(k1, *item(t))
        srv.kill()
        t0 = time.monotonic()
        assert lay.get(k1) is None                         # the fault: a counted miss
        assert time.monotonic() - t0 < 0.5
        assert not lay.healthy and lay.stats()["errors"] >= 1
        t0 = time.monotonic()
        for _ in range(100):                               # unhealthy: answered at once
            assert lay.get(k1) is None
            assert has(lay, k1) == [False]
        assert lay.put(k1, *item(t)) is False or not lay.healthy
        assert time.monotonic() - t0 < 0.5
        st = lay.stats()
        assert st["detail"]["fast_misses"] >= 150 and st["misses"] >= 101
        assert list(lay.keys()) == [] and lay.stats()["used_bytes"] == 0
        srv.start()                                        # same port, empty data set
        deadline = time.monotonic() + 5
        while not lay.put(k1, *item(t)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lay.healthy and torch.equal(lay.get(k1).data, t)
        assert lay.stats()["detail"]["recoveries"] == 1
        lay.close()


def test_hung_server_fails_within_timeout_then_recovers():
    with RedisServer() as srv:
        lay = RedisTier(srv.url, op_timeout_s=0.2, retry_backoff_s=0.05,
                               retry_backoff_max_s=0.1)
        k = unique_key()
        t = torch.arange(1000, dtype=torch.int32)
        assert lay.put(k, *item(t))
        srv.pause()
        try:
            t0 = time.monotonic()
            assert lay.get(k) is None
            assert time.monotonic() - t0 < 0.2 + 0.3
            t0 = time.monotonic()
            assert lay.get(k) is None and has(lay, k, k) == [False, False]
            assert time.monotonic() - t0 < 0.05           # no network while backing off
            assert lay.stats()["detail"]["timeouts"] >= 1
        finally:
            srv.resume()
        deadline = time.monotonic() + 5
        while lay.get(k) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        art = lay.get(k)
        assert art is not None and torch.equal(art.tensor(), t)
        lay.close()


def test_server_down_at_startup_is_not_an_error_and_recovers():
    srv = RedisServer(start=False)
    try:
        lay = RedisTier(srv.url, connect_timeout_s=0.2, retry_backoff_s=0.05,
                               retry_backoff_max_s=0.1)
        assert not lay.healthy
        k = unique_key()
        assert lay.put(k, *item(torch.ones(8, dtype=torch.uint8))) is False
        srv.start()
        deadline = time.monotonic() + 5
        while not lay.put(k, *item(torch.ones(8, dtype=torch.uint8))) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lay.healthy and has(lay, k)[0]
        lay.close()
    finally:
        srv.close()


def test_from_config_and_inspect(server):
    server.admin_client().flushall()
    cfg = load_config(overrides={"tiers": {"redis": {
        "enabled": True, "url": server.url, "key_prefix": "insp:", "ttl_s": 60,
        "op_timeout_s": 0.75, "max_connections": 5}}})
    lay = RedisTier.from_config(cfg.tiers.redis, cfg)
    pool = lay._client.connection_pool
    assert pool.max_connections == 5
    assert pool.connection_kwargs["socket_timeout"] == 0.75
    sizes = {("kv", "m1"): [100, 200], ("params", "m1"): [1000], ("kv", "m2"): [7]}
    for (kind, ns), lens in sizes.items():
        for i, n in enumerate(lens):
            lay.put(ArtifactKey(kind, ns, str(i)), *item(torch.zeros(n, dtype=torch.uint8)))
    server.admin_client().set(b"insp:garbage-without-separators", b"x")
    server.admin_client().set(b"unrelated", b"x" * 100)
    rep = RedisTier.inspect(cfg.tiers.redis, cfg)
    hlen = ArtifactMeta.header_size(1)
    assert set(rep) == set(INSPECT_KEYS) | {"detail"}
    assert rep["tier"] == "redis" and rep["location"] == server.url
    assert rep["items"] == 4 and rep["unreadable"] == 1
    assert rep["by_namespace"]["kv/m1"] == {"items": 2, "bytes": 300 + 2 * hlen}
    assert rep["by_namespace"]["params/m1"] == {"items": 1, "bytes": 1000 + hlen}
    assert rep["by_kind"]["kv"] == {"items": 3, "bytes": 307 + 3 * hlen}
    assert rep["used_bytes"] == 1307 + 4 * hlen and rep["capacity_bytes"] == 0
    assert rep["detail"]["key_prefix"] == "insp:" and rep["detail"]["used_memory"] > 0
    assert server.admin_client().ttl(b"insp:" + ArtifactKey("kv", "m2", "0").encode()) > 50
    lay.close()
    down = load_config(overrides={"tiers": {"redis": {
        "enabled": True, "url": f"redis://127.0.0.1:{free_port()}/0", "connect_timeout_s": 0.2}}})
    with pytest.raises(TierFault, match="unreachable"):
        RedisTier.inspect(down.tiers.redis, down)


def test_tls_server_round_trip_and_options_reach_the_pool():
    with tempfile.TemporaryDirectory(prefix="sc-redis-tls-") as d:
        files = make_tls_files(d)
        with RedisServer(tls=dict(files, require_client_cert=True)) as srv:
            # mutual TLS: the test certificate doubles as the client certificate
            lay = RedisTier(srv.url.replace("rediss://", "redis://"), tls=True,
                                   tls_ca_file=files["ca"], tls_cert_file=files["cert"],
                                   tls_key_file=files["key"])
            kw = lay._client.connection_pool.connection_kwargs
            assert kw["ssl_ca_certs"] == files["ca"] and kw["ssl_cert_reqs"] == "required"
            assert kw["ssl_certfile"] == files["cert"] and kw["ssl_keyfile"] == files["key"]
            k = unique_key()
            t = torch.randint(0, 256, (70_000,), dtype=torch.uint8)
            assert lay.put(k, *item(t)) and torch.equal(lay.get(k).data, t)
            lay.close()
            # no client certificate, or a server certificate we cannot verify: clear errors
            with pytest.raises(RedisTierConfigError, match="TLS"):
                RedisTier(srv.url, tls=True, tls_ca_file=files["ca"])
            with pytest.raises(RedisTierConfigError, match="TLS"):
                RedisTier(srv.url, tls=True, tls_ca_file=_other_ca(d),
                                 tls_cert_file=files["cert"], tls_key_file=files["key"])


def _other_ca(d: str) -> str:
    other = os.path.join(d, "other")
    os.makedirs(other)
    return make_tls_files(other)["ca"]


def test_edge_sizes_around_the_header_read(layer):
    """Values shorter and longer than the header read-ahead, and an empty payload."""
    sizes = [0, 1, 7, 100, 127, 128, 129, 151, 152, 153, 65535, 65536, 65537]
    keys = [unique_key() for _ in sizes]
    payloads = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]
    assert all(layer.put_many([(k, *item(p)) for k, p in zip(keys, payloads)]))
    for art, p in zip(layer.get_many(keys), payloads):
        assert art is not None and torch.equal(art.data, p)


def test_full_server_under_noeviction_refuses_puts_but_stays_healthy():
    with RedisServer(maxmemory="3mb", maxmemory_policy="noeviction") as srv:
        lay = RedisTier(srv.url, key_prefix="full:")
        keys = [unique_key() for _ in range(30)]
        payloads = [torch.randint(0, 256, (256 * 1024,), dtype=torch.uint8) for _ in keys]
        ok = [lay.put(k, *item(p)) for k, p in zip(keys, payloads)]
        assert True in ok and False in ok                # filled up, then refused
        assert lay.healthy and lay.stats()["put_failures"] == ok.count(False)
        for k, p, stored in zip(keys, payloads, ok):
            art = lay.get(k)
            assert (art is not None) == stored           # refused stores are plain misses
            if stored:
                assert torch.equal(art.data, p)
        lay.close()


def test_concurrent_threads_share_a_small_pool(server):
    lay = RedisTier(server.url, max_connections=2, key_prefix=f"thr{uuid.uuid4().hex[:6]}:")

    def worker(seed):
        rng = random.Random(seed)
        for i in range(15):
            k = ArtifactKey("kv", f"t{seed}", str(i))
            t = torch.randint(0, 256, (rng.randint(1, 100_000),), dtype=torch.uint8)
            assert lay.put(k, *item(t))
            out = torch.empty(t.numel(), dtype=torch.uint8)
            assert torch.equal(lay.get(k, out=out).data, t)
        return True

    with ThreadPoolExecutor(6) as ex:
        assert all(ex.map(worker, range(6)))
    st = lay.stats()
    assert st["hits"] == 90 and st["errors"] == 0 and lay.healthy
    lay.close()


def test_unix_socket_url():
    with tempfile.TemporaryDirectory(prefix="sc-redis-unix-") as d:
        sock = os.path.join(d, "redis.sock")
        with RedisServer(extra_args=["--unixsocket", sock, "--unixsocketperm", "700"]):
            lay = RedisTier(f"unix://{sock}", key_prefix="ux:")
            k = unique_key()
            t = torch.randint(0, 256, (500_000,), dtype=torch.uint8)
            assert lay.put(k, *item(t)) and torch.equal(lay.get(k).data, t)
            lay.close()


def test_server_helper_fails_loudly_when_redis_cannot_start():
    with pytest.raises(RedisServerError, match="exited"):
        RedisServer(extra_args=["--maxmemory-policy", "no-such-policy"])
