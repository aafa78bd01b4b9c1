"""The Redis tier behind the public StorageEngine: server faults are misses, never
exceptions, and two "hosts" (processes with their own engines and seed nodes)
share chunks through one Redis Cluster byte-exact."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import uuid

import pytest
import torch

from stratacache.config import load_config
from stratacache.engine import StorageEngine
from tests.redis_server import RedisCluster, RedisServer, commands_run_by, random_chunks


def redis_only_config(url: str, *, cluster: bool = False, cpu: bool = False, **redis_kw):
    """Only the redis tier (plus, optionally, a process-private CPU tier above it)."""
    redis_cfg = {"enabled": True, "url": url, "cluster": cluster,
                 "key_prefix": f"eng{uuid.uuid4().hex[:6]}:", **redis_kw}
    return load_config(overrides={"tiers": {
        "cpu": {"enabled": cpu, "capacity": "64MiB"}, "shared": {"enabled": False},
        "disk": {"enabled": False}, "redis": redis_cfg}})


def test_engine_survives_server_kill_and_restart():
    with RedisServer() as srv:
        cfg = redis_only_config(srv.url, connect_timeout_s=0.2, op_timeout_s=0.5,
                                retry_backoff_s=0.05, retry_backoff_max_s=0.2)
        eng = StorageEngine(cfg)
        pairs = random_chunks(1, 12)
        assert all(eng.store(k, t) for k, t in pairs)
        assert eng.prefix_lookup([k for k, _ in pairs]) == 12
        srv.kill()
        t0 = time.monotonic()
        for k, t in pairs:                                # no exception reaches the caller
            assert eng.load(k) is None
            assert eng.contains(k) is False
        assert eng.prefix_lookup([k for k, _ in pairs]) == 0
        assert eng.store(pairs[0][0], pairs[0][1]) is False
        assert time.monotonic() - t0 < 2.0                # fast: one timeout, then backing off
        st = eng.stats()["tiers"]["redis"]
        assert st["errors"] >= 1 and st["misses"] >= 12 and st["detail"]["healthy"] is False
        srv.start()                                       # empty: the data died with it
        deadline = time.monotonic() + 5
        while not eng.store(pairs[0][0], pairs[0][1]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(eng.store(k, t) for k, t in pairs)
        for k, t in pairs:
            art = eng.load(k)
            assert art is not None and art.meta.dtype == t.dtype
            assert torch.equal(art.tensor(), t)
        out = torch.full((pairs[3][1].numel() * pairs[3][1].element_size() + 9,), 7,
                         dtype=torch.uint8)
        art = eng.load(pairs[3][0], out=out)
        assert art.data.data_ptr() == out.data_ptr() and torch.equal(art.tensor(), pairs[3][1])
        assert eng.stats()["tiers"]["redis"]["detail"]["recoveries"] >= 1
        eng.close()


def test_engine_batched_forms_through_redis():
    with RedisServer() as srv:
        eng = StorageEngine(redis_only_config(srv.url))
        pairs = random_chunks(7, 16)
        keys = [k for k, _ in pairs]
        assert eng.store_many(pairs) == [True] * 16
        missing = random_chunks(8, 1)[0][0]
        assert eng.contains_many(keys[:3] + [missing]) == [True, True, True, False]
        assert eng.prefix_lookup(keys[:5] + [missing] + keys[5:]) == 5
        assert eng.prefix_lookup([k.encode() for k in keys[:5] + [missing]]) == 5
        outs = [torch.full((t.numel() * t.element_size() + 3,), 0xEE, dtype=torch.uint8)
                for _, t in pairs]
        arts = eng.load_many(keys + [missing], outs=outs + [None])
        assert arts[-1] is None
        for art, out, (_, t) in zip(arts, outs, pairs):
            assert art.data.data_ptr() == out.data_ptr() and torch.equal(art.tensor(), t)
            assert bool((out[-3:] == 0xEE).all())
        st = eng.stats()["tiers"]["redis"]
        assert st["hits"] == 16 and st["puts"] == 16 and st["errors"] == 0
        eng.close()


def test_engine_hit_lease_and_miss_are_one_get_each_on_the_server():
    """Issue #18: a Redis hit is one round trip. Counted by the server (INFO commandstats):
    a load or a pinned view of a present chunk is exactly one GET and no EXISTS; a miss is
    one GET, counted once. (The old pin was EXISTS, then GET; a miss was probed twice.)"""
    with RedisServer() as srv:
        eng = StorageEngine(redis_only_config(srv.url))
        admin = srv.admin_client()
        try:
            (k, t), (missing, _) = random_chunks(9, 2)
            assert eng.store(k, t)
            art, ran = commands_run_by(admin, lambda: eng.load(k))
            assert torch.equal(art.tensor(), t) and ran == {"get": 1}

            def pinned_view():
                with eng.pinned(k) as view:
                    return view is not None and torch.equal(view.tensor(), t)

            ok, ran = commands_run_by(admin, pinned_view)
            assert ok and ran == {"get": 1}
            before = eng.stats()["tiers"]["redis"]["misses"]
            art, ran = commands_run_by(admin, lambda: eng.load(missing))
            assert art is None and ran == {"get": 1}
            assert eng.stats()["tiers"]["redis"]["misses"] == before + 1
        finally:
            eng.close()


def test_engine_counts_a_corrupt_redis_chunk_as_a_miss():
    with RedisServer() as srv:
        cfg = redis_only_config(srv.url)
        eng = StorageEngine(cfg)
        (k, t), = random_chunks(2, 1)
        assert eng.store(k, t)
        rk = cfg.tiers.redis.key_prefix.encode() + k.encode()
        admin = srv.admin_client()
        raw = bytearray(admin.get(rk))
        raw[-1] ^= 0x01
        admin.set(rk, bytes(raw))
        assert eng.load(k) is None
        assert eng.stats()["tiers"]["redis"]["corrupt"] == 1
        assert not admin.exists(rk)
        eng.close()


def _host(url: str, prefix: str, seed: int, n: int, role: str, q) -> None:
    """One "host": its own process, its own engine (private CPU tier + Redis via its own seed)."""
    try:
        cfg = load_config(overrides={"tiers": {
            "cpu": {"enabled": True, "capacity": "64MiB"}, "shared": {"enabled": False},
            "disk": {"enabled": False},
            "redis": {"enabled": True, "url": url, "cluster": True, "key_prefix": prefix}}})
        with StorageEngine(cfg) as eng:
            pairs = random_chunks(seed, n)
            if role == "store":
                res = [eng.store(k, t) for k, t in pairs]
                eng.flush()
            else:
                res = []
                for k, t in pairs:
                    art = eng.load(k)
                    res.append(art is not None and art.meta.dtype == t.dtype
                               and torch.equal(art.tensor(), t))
            q.put((role, res, eng.stats()["tiers"]["redis"]["hits"]))
    except BaseException as exc:   # report, so the parent fails with the reason
        q.put(("error", repr(exc), 0))


def _run_host(ctx, *args):
    """Run one host process; fail at once (not after a timeout) if it dies."""
    q = ctx.Queue()
    p = ctx.Process(target=_host, args=(*args, q))
    p.start()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                if not p.is_alive() and q.empty():
                    pytest.fail(f"host process died with exit code {p.exitcode}")
        pytest.fail("host process gave no result within 120 s")
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()


def test_two_hosts_share_chunks_through_a_cluster_byte_exact():
    with RedisCluster(3) as cl:
        ctx = mp.get_context("spawn")
        prefix = f"hosts{uuid.uuid4().hex[:6]}:"
        host_a, host_b = cl.nodes[0].url, cl.nodes[2].url   # different seed nodes
        assert _run_host(ctx, host_a, prefix, 5, 24, "store") == ("store", [True] * 24, 0)
        role, loaded, hits = _run_host(ctx, host_b, prefix, 5, 24, "load")
        assert (role, loaded) == ("load", [True] * 24)
        assert hits == 24          # host B's own CPU tier was empty: every chunk came from Redis
        per_node = [s.admin_client().dbsize() for s in cl.nodes]
        assert all(n > 0 for n in per_node)
