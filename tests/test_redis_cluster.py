"""RedisTier on a real 3-primary Redis Cluster on loopback (the two-"host"
engine test is in test_redis_engine.py)."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
import torch

from stratacache.backends.redis import RedisTier, resp
from stratacache.config import load_config
from stratacache.core.keys import ArtifactKey
from tests.redis_server import RedisCluster, free_port, random_chunks, tier_items


@pytest.fixture(scope="module")
def cluster():
    with RedisCluster(3) as cl:
        yield cl


def test_cluster_round_trip_spreads_over_all_primaries(cluster, monkeypatch):
    lay = RedisTier(cluster.url, cluster=True, key_prefix=f"cl{uuid.uuid4().hex[:6]}:")
    pairs = random_chunks(11, 48)
    assert lay.put_many(tier_items(pairs)) == [True] * 48
    per_node = [s.admin_client().dbsize() for s in cluster.nodes]
    assert all(n > 0 for n in per_node) and sum(per_node) >= 48
    absent = ArtifactKey("kv", "llama-11", "absent")
    exchanges = []
    real = resp.exchange
    monkeypatch.setattr(resp, "exchange", lambda pool, *a: exchanges.append(pool) or real(pool, *a))
    got = lay.get_many([k for k, _ in pairs] + [absent])
    assert len(exchanges) == len(set(map(id, exchanges))) == 3   # one pipeline per primary
    monkeypatch.undo()
    assert got[-1] is None
    for (k, t), art in zip(pairs, got):
        assert art.meta.dtype == t.dtype and torch.equal(art.tensor(), t)
    assert lay.contains([pairs[0][0].encode(), absent.encode()]) == [True, False]
    assert set(lay.keys()) == {k for k, _ in pairs}
    cfg = load_config(overrides={"tiers": {"redis": {
        "enabled": True, "url": cluster.url, "cluster": True,
        "key_prefix": lay.key_prefix.decode()}}})
    rep = RedisTier.inspect(cfg.tiers.redis, cfg)
    assert rep["items"] == 48 and rep["by_namespace"]["kv/llama-11"]["items"] == 48
    assert rep["detail"]["cluster"] is True
    assert lay.delete(pairs[0][0]) and lay.get(pairs[0][0]) is None
    lay.close()


def test_moved_slot_is_a_miss_then_the_slot_map_is_refreshed(cluster):
    """Resharding: a stale slot map gives MOVED; that key is a miss once, then found."""
    lay = RedisTier(cluster.url, cluster=True, key_prefix=f"mv{uuid.uuid4().hex[:6]}:")
    (key, t), = random_chunks(21, 1)
    rk = lay.key_prefix + key.encode()
    admin = cluster.nodes[0].admin_client()
    slot = admin.execute_command("CLUSTER", "KEYSLOT", rk)
    ids = {s.port: s.admin_client().execute_command("CLUSTER", "MYID") for s in cluster.nodes}
    ids = {p: (i.decode() if isinstance(i, bytes) else i) for p, i in ids.items()}
    src = next(s for s in cluster.nodes if s.port == _owner_port(cluster.nodes[0], slot))
    dst = next(s for s in cluster.nodes if s is not src)
    assert lay.get(key) is None                           # slot map now cached
    dst.admin_client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src.port])
    src.admin_client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst.port])
    for s in (dst, src):
        s.admin_client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst.port])
    assert lay.put(key, *tier_items([(key, t)])[0][1:]) is False   # MOVED: not stored
    assert lay.healthy and lay.stats()["errors"] == 0
    assert lay.put(key, *tier_items([(key, t)])[0][1:]) is True    # map refreshed
    assert torch.equal(lay.get(key).tensor(), t)
    assert dst.admin_client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1
    lay.close()


def _owner_port(node, slot: int) -> int:
    for start, end, primary, *_ in node.admin_client().execute_command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return int(primary[1])
    raise AssertionError(f"slot {slot} is not covered")


def test_cluster_node_killed_then_restarted(cluster):
    """Runs last in this module: one primary dies; its keys are misses, the other
    primaries keep serving, and the tier recovers when it returns."""
    lay = RedisTier(cluster.url, cluster=True, op_timeout_s=0.5, connect_timeout_s=0.2,
                           retry_backoff_s=0.05, retry_backoff_max_s=0.2,
                           key_prefix=f"kill{uuid.uuid4().hex[:6]}:")
    pairs = random_chunks(3, 30)
    keys = [k for k, _ in pairs]
    assert all(lay.put_many(tier_items(pairs)))
    victim = cluster.nodes[1]
    on_victim = [_held_by(victim, lay.key_prefix + k.encode()) for k in keys]
    assert any(on_victim) and not all(on_victim)
    victim.kill()
    t0 = time.monotonic()
    got = lay.get_many(keys)                              # no exception reaches us
    assert time.monotonic() - t0 < 1.0
    for art, (_, t), dead in zip(got, pairs, on_victim):
        assert (art is None) if dead else torch.equal(art.tensor(), t)
    assert not lay.healthy and lay.stats()["errors"] >= 1
    assert lay.put_many(tier_items(pairs)) == [not dead for dead in on_victim]
    assert lay.contains([k.encode() for k in keys]) == [not dead for dead in on_victim]
    victim.start()                                        # rejoins with its slots (nodes.conf)
    deadline = time.monotonic() + 20
    ok = [False]
    while not all(ok) and time.monotonic() < deadline:
        ok = lay.put_many(tier_items(pairs))
        time.sleep(0.05)
    assert all(ok) and lay.healthy
    got = lay.get_many(keys)
    assert all(a is not None and torch.equal(a.tensor(), t) for a, (_, t) in zip(got, pairs))
    assert lay.stats()["detail"]["recoveries"] >= 1
    lay.close()


def _held_by(node, rkey: bytes) -> bool:
    try:
        return bool(node.admin_client().exists(rkey))
    except redis.exceptions.MovedError:
        return False


def test_cluster_unreachable_at_startup_is_a_miss_not_an_error():
    lay = RedisTier(f"redis://127.0.0.1:{free_port()}/0", cluster=True,
                           connect_timeout_s=0.2, retry_backoff_s=0.05, retry_backoff_max_s=0.1)
    assert not lay.healthy
    pairs = random_chunks(4, 2)
    assert lay.put_many(tier_items(pairs)) == [False, False]
    assert lay.get_many([k for k, _ in pairs]) == [None, None]
    time.sleep(0.06)
    assert lay.get(pairs[0][0]) is None                  # a probe after back-off: still a miss
    assert lay.stats()["errors"] >= 2
    lay.close()
