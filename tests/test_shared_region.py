"""Shared-region tier: round trips, replacement, eviction, leases, persistence,
cross-process visibility, header/permission errors and read-only inspection."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import warnings
from types import SimpleNamespace

import pytest
import torch

from stratacache.backends.base import INSPECT_KEYS
from stratacache.backends.shared import SharedRegionError, SharedRegionTier
from stratacache.core.artifact import ArtifactMeta, as_bytes, meta_for
from stratacache.core.errors import InvalidArgument
from stratacache.core.keys import ArtifactKey

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def key(name: str, kind: str = "kv", ns: str = "model-a") -> ArtifactKey:
    return ArtifactKey(kind, ns, name)


def put_tensor(layer, k, t: torch.Tensor) -> bool:
    return layer.put(k, as_bytes(t), meta_for(t, checksum=int(t.view(torch.uint8).sum())))


def inspect_region(path: str) -> dict:
    """``SharedRegionTier.inspect`` of the region at ``path`` (a config section naming it)."""
    return SharedRegionTier.inspect(SimpleNamespace(path=path), None)


def has(layer, k: ArtifactKey) -> bool:
    return layer.contains([k.encode()]) == [True]


def used(layer) -> int:
    return layer.stats()["used_bytes"]


def run_python(code: str, timeout: float = 120) -> str:
    """Runs code in a fresh interpreter (a separate process with its own mapping)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_round_trip_is_byte_exact_with_dtype_and_shape(region_path):
    layer = SharedRegionTier(region_path, 64 * MiB, 256)
    gen = torch.Generator().manual_seed(1)
    stored = {}
    for i in range(40):
        n = int(torch.randint(1, 300_000, (1,), generator=gen))
        dtype = [torch.uint8, torch.float32, torch.bfloat16, torch.int64][i % 4]
        t = torch.randint(0, 255, (n * 8,), generator=gen, dtype=torch.uint8).view(dtype)
        t = t.reshape(2, -1) if t.numel() % 2 == 0 else t
        k = key(f"obj-{i}")
        assert put_tensor(layer, k, t)
        stored[k] = t.clone()
    for k, t in stored.items():
        art = layer.get(k)                                  # zero-copy view
        assert art is not None and art.meta.dtype == t.dtype and art.meta.shape == tuple(t.shape)
        assert art.tensor().dtype == t.dtype and art.tensor().shape == t.shape
        assert torch.equal(art.data, t.reshape(-1).view(torch.uint8))   # bytes (NaNs compare unequal)
        out = torch.full((art.meta.size + 17,), 0xAB, dtype=torch.uint8)   # poisoned
        art2 = layer.get(k, out=out)
        assert art2.data.data_ptr() == out.data_ptr()
        assert torch.equal(art2.data[:art.meta.size], t.reshape(-1).view(torch.uint8))
        assert torch.all(out[art.meta.size:] == 0xAB)       # nothing written past the object
    assert used(layer) == sum(t.numel() * t.element_size() for t in stored.values())
    assert sorted(map(str, layer.keys())) == sorted(map(str, stored))
    assert layer.check() == []
    assert layer.get(key("absent")) is None
    layer.close()


def test_replacing_with_a_bigger_object_never_touches_neighbours(region_path):
    layer = SharedRegionTier(region_path, 8 * MiB, 64, block_bytes=4096)
    a = torch.randint(0, 255, (5000,), dtype=torch.uint8)
    b = torch.randint(0, 255, (9000,), dtype=torch.uint8)
    assert put_tensor(layer, key("a"), a) and put_tensor(layer, key("b"), b)
    for size in (7000, 70_000, 3, 1_000_000):
        bigger = torch.randint(0, 255, (size,), dtype=torch.uint8)
        assert put_tensor(layer, key("a"), bigger)
        assert torch.equal(layer.get(key("a")).data, bigger)
        assert torch.equal(layer.get(key("b")).data, b)
    assert layer.stats()["items"] == 2 and layer.check() == []
    layer.close()


def test_full_key_is_stored_and_compared(region_path):
    layer = SharedRegionTier(region_path, 4 * MiB, 64, max_key_bytes=200)
    long_ns = "n" * 150
    k1, k2 = key("x" * 20 + "1", ns=long_ns), key("x" * 20 + "2", ns=long_ns)
    kv, params = ArtifactKey("kv", "m", "c0"), ArtifactKey("params", "m", "c0")
    for i, k in enumerate((k1, k2, kv, params)):
        assert put_tensor(layer, k, torch.full((100,), i, dtype=torch.uint8))
    for i, k in enumerate((k1, k2, kv, params)):
        assert int(layer.get(k).data[0]) == i
    with pytest.raises(ValueError, match="max_key_bytes=200"):
        layer.put(key("y" * 300), torch.zeros(4, dtype=torch.uint8), ArtifactMeta(size=4, checksum=0))
    layer.close()


def test_delete_contains_and_batched_contains(region_path):
    layer = SharedRegionTier(region_path, 4 * MiB, 512)
    keys = [key(f"k{i}") for i in range(300)]
    for k in keys[::2]:
        assert put_tensor(layer, k, torch.ones(10, dtype=torch.uint8))
    assert layer.contains([k.encode() for k in keys]) == [i % 2 == 0 for i in range(300)]
    assert layer.delete(keys[0]) and not layer.delete(keys[0]) and not has(layer, keys[0])
    assert layer.contains([k.encode() for k in keys[:3]]) == [False, False, True]
    assert layer.contains((k.encode() for k in keys[:3])) == [False, False, True]   # any iterable
    assert layer.check() == []
    layer.close()


def test_full_region_evicts_and_never_exceeds_capacity(region_path):
    cap = 1 * MiB
    layer = SharedRegionTier(region_path, cap, 1024, block_bytes=4096)
    sizes = torch.randint(1, 200_000, (300,), generator=torch.Generator().manual_seed(7)).tolist()
    last = {}
    for i, n in enumerate(sizes):
        t = torch.randint(0, 255, (n,), dtype=torch.uint8)
        assert put_tensor(layer, key(f"e{i}"), t), f"put {i} of {n} bytes failed"
        last[i] = t
        st = layer.stats()["detail"]["region"]
        assert st["reserved_bytes"] <= cap and st["used_bytes"] <= cap
    st = layer.stats()
    assert st["evictions"] > 0 and st["items"] < 300
    # Whatever survived is intact.
    for k in layer.keys():
        i = int(k.name[1:])
        assert torch.equal(layer.get(k).data, last[i])
    assert layer.check() == []
    # Larger than the whole region: a refusal, not an error.
    assert not put_tensor(layer, key("huge"), torch.zeros(cap + 1, dtype=torch.uint8))
    layer.close()


def test_on_evict_receives_exact_bytes_of_every_victim(region_path):
    layer = SharedRegionTier(region_path, 256 * 1024, 64, block_bytes=4096)
    handed = {}

    def on_evict(k, art):
        handed[k] = (art.data.clone(), art.meta)

    layer.on_evict = on_evict
    written = {}
    for i in range(40):
        t = torch.randint(0, 255, (int(torch.randint(1000, 60_000, (1,))),), dtype=torch.uint8)
        assert put_tensor(layer, key(f"w{i}"), t)
        written[key(f"w{i}")] = t
    assert handed, "nothing was evicted"
    for k, (data, meta) in handed.items():
        assert torch.equal(data, written[k]) and meta.size == written[k].numel()
        assert not has(layer, k)
    # Every object is either still in the region or was handed over.
    assert set(handed) | set(layer.keys()) == set(written)
    assert layer.stats()["evictions"] == len(handed)
    assert layer.check() == []
    layer.close()


def test_leased_objects_are_not_evicted_and_full_of_leases_refuses(region_path):
    layer = SharedRegionTier(region_path, 64 * 4096, 64, block_bytes=4096)
    leases = {}
    for i in range(8):
        assert put_tensor(layer, key(f"p{i}"), torch.full((8 * 4096,), i, dtype=torch.uint8))
        leases[i] = layer.acquire(key(f"p{i}"))
        assert leases[i] is not None
    # Every byte is leased: a new object cannot get room, and nothing leased is lost.
    assert not put_tensor(layer, key("new"), torch.zeros(4096, dtype=torch.uint8))
    for i in range(8):
        assert int(layer.get(key(f"p{i}")).data[0]) == i
    leases[3].release()
    assert put_tensor(layer, key("new"), torch.zeros(4096, dtype=torch.uint8))
    assert not has(layer, key("p3")) and has(layer, key("p4"))
    for lease in leases.values():
        lease.release()
    layer.close()


def test_two_leases_on_one_key_are_released_independently(region_path):
    """Releasing holder A's lease keeps holder B's (unpin used to release whichever came last)."""
    layer = SharedRegionTier(region_path, 8 * 4096, 64, block_bytes=4096)
    assert put_tensor(layer, key("a"), torch.full((8 * 4096,), 7, dtype=torch.uint8))
    a, b = layer.acquire(key("a")), layer.acquire(key("a"))
    a.release()
    a.release()                                            # idempotent: ends nothing more
    assert not put_tensor(layer, key("b"), torch.zeros(4096, dtype=torch.uint8))   # B still holds it
    assert torch.all(b.artifact.data == 7)
    b.release()
    assert put_tensor(layer, key("b"), torch.zeros(4096, dtype=torch.uint8))
    layer.close()


def test_overwrite_while_pinned_keeps_the_readers_version(region_path):
    layer = SharedRegionTier(region_path, 4 * MiB, 64)
    old = torch.full((50_000,), 1, dtype=torch.uint8)
    assert put_tensor(layer, key("v"), old)
    with layer.acquire(key("v")) as art:
        assert put_tensor(layer, key("v"), torch.full((80_000,), 2, dtype=torch.uint8))
        assert torch.all(art.data == 1) and art.meta.size == 50_000   # old bytes still intact
        assert layer.stats()["detail"]["region"]["retired"] == 1
    assert layer.stats()["detail"]["region"]["retired"] == 0         # freed on release
    assert torch.all(layer.get(key("v")).data == 2)
    assert layer.check() == []
    layer.close()


def test_expired_lease_stops_protecting(region_path):
    layer = SharedRegionTier(region_path, 16 * 4096, 64, block_bytes=4096)
    assert put_tensor(layer, key("a"), torch.zeros(16 * 4096, dtype=torch.uint8))
    lease = layer.acquire(key("a"), lease_s=0.05)
    assert lease is not None
    assert not put_tensor(layer, key("b"), torch.zeros(4096, dtype=torch.uint8))
    import time
    time.sleep(0.1)
    assert put_tensor(layer, key("b"), torch.zeros(4096, dtype=torch.uint8))   # lease expired
    assert not has(layer, key("a"))
    lease.release()                                    # a late release of an expired lease is harmless
    layer.close()


CHILD_PRELUDE = """
import os, sys, torch
from stratacache.backends.shared import SharedRegionTier
from stratacache.core.artifact import as_bytes, meta_for
from stratacache.core.keys import ArtifactKey
"""


def test_objects_written_by_one_process_are_read_by_another_and_survive_restart(region_path):
    run_python(CHILD_PRELUDE + f"""
layer = SharedRegionTier({region_path!r}, 32 << 20, 256)
for i in range(20):
    t = torch.arange(i * 1000, i * 1000 + 5000 + i, dtype=torch.int32)
    assert layer.put(ArtifactKey("kv", "m", f"c{{i}}"), as_bytes(t), meta_for(t, checksum=i))
""")
    # The writer has exited: a new process (this one) attaches and finds everything.
    layer = SharedRegionTier(region_path, 32 * MiB, 256)
    for i in range(20):
        art = layer.get(key(f"c{i}", ns="m"))
        assert art is not None and art.meta.checksum == i
        assert torch.equal(art.tensor(), torch.arange(i * 1000, i * 1000 + 5000 + i, dtype=torch.int32))
    assert layer.stats()["detail"]["region"]["puts"] == 20
    assert put_tensor(layer, key("from-parent", ns="m"), torch.full((333,), 9, dtype=torch.uint8))
    # ... and a concurrent reader process sees what this process wrote.
    out = run_python(CHILD_PRELUDE + f"""
layer = SharedRegionTier({region_path!r}, 32 << 20, 256)
art = layer.get(ArtifactKey("kv", "m", "from-parent"))
print(art.meta.size, int(art.data.sum()))
""")
    assert out.split() == ["333", str(333 * 9)]
    layer.close()
    # reset wipes what persisted.
    wiped = SharedRegionTier(region_path, 32 * MiB, 256, reset=True)
    assert wiped.stats()["items"] == 0 and not has(wiped, key("c1", ns="m"))
    wiped.close()


def test_process_killed_holding_the_lock_does_not_block_others(region_path):
    layer = SharedRegionTier(region_path, 4 * MiB, 64)
    assert put_tensor(layer, key("kept"), torch.full((1000,), 5, dtype=torch.uint8))
    _run_killed(region_path)
    repairs_before = layer.stats()["detail"]["region"]["repairs"]
    assert torch.all(layer.get(key("kept")).data == 5)       # would hang without robust repair
    assert layer.stats()["detail"]["region"]["repairs"] == repairs_before + 1
    assert put_tensor(layer, key("after"), torch.ones(10, dtype=torch.uint8))
    assert layer.check() == []
    layer.close()


def _run_killed(region_path: str) -> None:
    code = CHILD_PRELUDE + f"""
import signal
layer = SharedRegionTier({region_path!r}, 4 << 20, 64)
layer._region.lock_and_leak_for_testing()
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-3000:]


def test_dead_readers_pin_is_ignored(region_path):
    layer = SharedRegionTier(region_path, 8 * 4096, 64, block_bytes=4096)
    assert put_tensor(layer, key("a"), torch.zeros(8 * 4096, dtype=torch.uint8))
    code = CHILD_PRELUDE + f"""
import signal
layer = SharedRegionTier({region_path!r}, 8 * 4096, 64, block_bytes=4096)
assert layer.acquire(ArtifactKey("kv", "model-a", "a"), lease_s=3600) is not None
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-3000:]
    # The hour-long lease belongs to a dead process, so it protects nothing.
    assert put_tensor(layer, key("b"), torch.zeros(4096, dtype=torch.uint8))
    layer.close()


def test_incompatible_layout_version_and_geometry_are_clear_errors(region_path):
    SharedRegionTier(region_path, 4 * MiB, 64).close()
    with pytest.raises(SharedRegionError, match=r"created with capacity=4194304 .* capacity=8388608"):
        SharedRegionTier(region_path, 8 * MiB, 64)
    with pytest.raises(SharedRegionError, match="max_objects=64 .* max_objects=128"):
        SharedRegionTier(region_path, 4 * MiB, 128)
    with open(region_path, "r+b") as f:      # a region written by a future layout
        f.seek(8)
        f.write(struct.pack("<I", 99))
    with pytest.raises(SharedRegionError, match=f"{region_path} has shared-region layout version 99"):
        SharedRegionTier(region_path, 4 * MiB, 64)
    with pytest.raises(SharedRegionError, match="layout version 99"):
        inspect_region(region_path)
    with open(region_path, "r+b") as f:
        f.write(b"NOTOURS!")
    with pytest.raises(SharedRegionError, match="not a StrataCache shared region"):
        SharedRegionTier(region_path, 4 * MiB, 64)
    fresh = SharedRegionTier(region_path, 4 * MiB, 64, reset=True)   # reset recreates it
    assert fresh.stats()["items"] == 0
    fresh.close()


def test_file_modes_and_wrong_permissions(region_path):
    old_umask = os.umask(0o077)
    try:
        SharedRegionTier(region_path, 1 * MiB, 16).close()
        assert os.stat(region_path).st_mode & 0o777 == 0o600
        os.unlink(region_path)
        SharedRegionTier(region_path, 1 * MiB, 16, file_mode=0o660).close()
        assert os.stat(region_path).st_mode & 0o777 == 0o660     # umask does not narrow it
    finally:
        os.umask(old_umask)
    with pytest.raises(SharedRegionError, match=r"mode 0660, more permissive than file_mode 0600"):
        SharedRegionTier(region_path, 1 * MiB, 16, file_mode=0o600)
    os.chmod(region_path, 0o600)
    os.chown(region_path, 54321, -1)
    with pytest.raises(SharedRegionError, match="owned by uid 54321"):
        SharedRegionTier(region_path, 1 * MiB, 16)
    link = region_path + ".link"
    os.symlink(region_path, link)
    try:
        with pytest.raises(SharedRegionError, match="symbolic link"):
            SharedRegionTier(link, 1 * MiB, 16)
    finally:
        os.unlink(link)
    with pytest.raises(ValueError, match="file_mode"):
        SharedRegionTier(region_path + ".x", 1 * MiB, 16, file_mode=0o7777)
    with pytest.raises(SharedRegionError, match="numa_node 4000 does not exist"):
        SharedRegionTier(region_path + ".numa", 1 * MiB, 16, numa_node=4000)
    os.unlink(region_path + ".numa")


def test_numa_binding_to_an_existing_node(region_path):
    layer = SharedRegionTier(region_path, 2 * MiB, 16, numa_node=0)
    assert put_tensor(layer, key("n"), torch.ones(100_000, dtype=torch.uint8))
    assert int(layer.get(key("n")).data.sum()) == 100_000
    layer.close()


def test_inspect_is_read_only_and_reports_usage(region_path):
    layer = SharedRegionTier(region_path, 4 * MiB, 64)
    for i in range(3):
        assert put_tensor(layer, ArtifactKey("kv", "llama", f"c{i}"), torch.ones(1000, dtype=torch.uint8))
    assert put_tensor(layer, ArtifactKey("params", "llama@r1", "w0"), torch.ones(500, dtype=torch.uint8))
    layer.get(ArtifactKey("kv", "llama", "c0"))
    layer.get(ArtifactKey("kv", "llama", "nope"))
    layer.close()
    before = open(region_path, "rb").read()
    mtime = os.stat(region_path).st_mtime_ns
    report = inspect_region(region_path)
    assert open(region_path, "rb").read() == before and os.stat(region_path).st_mtime_ns == mtime
    assert set(report) == set(INSPECT_KEYS) | {"detail"}
    assert report["tier"] == "shared" and report["location"] == region_path
    assert report["items"] == 4 and report["used_bytes"] == 3500 and report["unreadable"] == 0
    assert report["capacity_bytes"] == 4 * MiB
    assert report["by_kind"] == {"kv": {"items": 3, "bytes": 3000}, "params": {"items": 1, "bytes": 500}}
    assert report["by_namespace"]["params/llama@r1"] == {"items": 1, "bytes": 500}
    assert report["detail"]["counters"]["hits"] == 1 and report["detail"]["counters"]["misses"] == 1
    assert report["detail"]["max_objects"] == 64
    with pytest.raises(SharedRegionError, match="no region exists there"):
        inspect_region(region_path + ".missing")


def test_from_config_uses_the_tier_section(region_path):
    from stratacache.config import load_config
    cfg = load_config(overrides={"tiers": {"shared": {"path": region_path, "capacity": "8MiB",
                                                      "max_objects": 128, "file_mode": "0640"}}})
    layer = SharedRegionTier.from_config(cfg.tiers.shared, cfg)
    assert layer.capacity_bytes == 8 * MiB and os.stat(region_path).st_mode & 0o777 == 0o640
    assert layer.stats()["detail"]["region"]["max_objects"] == 128

    assert layer.prefault_bytes == cfg.tiers.shared.prefault > 0   # on by default
    layer.close()


def _minor_faults() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _wait_prefault(stats, timeout: float = 60.0) -> dict:
    """The prefault state in ``stats()`` (a shared tier's), once its thread has finished."""
    import time
    deadline = time.monotonic() + timeout
    while not stats()["detail"].get("prefault", {}).get("done"):
        assert time.monotonic() < deadline, "prefault did not finish"
        time.sleep(0.01)
    return stats()["detail"]["prefault"]


def test_prefault_maps_stored_objects_so_first_reads_take_no_page_faults(region_path):
    writer = SharedRegionTier(region_path, 96 * MiB, 64)
    gen = torch.Generator().manual_seed(7)
    stored = {}
    for i in range(8):
        t = torch.randint(0, 255, (8 * MiB + 4096 * i + 123,), generator=gen, dtype=torch.uint8)
        assert put_tensor(writer, key(f"p{i}"), t)
        stored[key(f"p{i}")] = t
    total = used(writer)
    out = torch.empty(9 * MiB, dtype=torch.uint8)
    out.fill_(0xAB)   # the destination's own pages are faulted in before any count

    def read_all(layer) -> int:
        before = _minor_faults()
        for k, t in stored.items():
            art = layer.get(k, out=out)
            assert art is not None and torch.equal(art.data.view(torch.uint8).reshape(-1), t)
        return _minor_faults() - before

    # Each new attach is a new mapping of the region, with no pages mapped yet.
    def attach(**kw):
        return SharedRegionTier(region_path, 96 * MiB, 64, **kw)

    cold = attach()
    cold_faults = read_all(cold)
    warm = attach(prefault_bytes=1 << 40)
    warm.start_prefault()
    state = _wait_prefault(warm.stats)
    assert state["bytes"] == total and state["seconds"] >= 0
    warm_faults = read_all(warm)
    assert cold_faults >= 256, cold_faults   # 16384 pages; 1040 faults here with 64 KiB fault-around
    assert warm_faults * 20 < cold_faults, (warm_faults, cold_faults)

    capped = attach(prefault_bytes=5 * MiB)
    capped.start_prefault()
    capped.start_prefault()   # a second call starts nothing new
    assert _wait_prefault(capped.stats)["bytes"] == 5 * MiB
    off = attach()
    off.start_prefault()
    assert "prefault" not in off.stats()["detail"]
    with pytest.raises(InvalidArgument, match="prefault_bytes"):
        attach(prefault_bytes=-1)
    for layer in (writer, cold, warm, capped, off):
        layer.close()


def test_engine_start_prefault_reaches_the_shared_tier(region_path):
    from stratacache.engine import StorageEngine
    engine = StorageEngine.from_config(overrides={"tiers": {
        "cpu": {"enabled": True, "capacity": "16MiB"},
        "shared": {"enabled": True, "path": region_path, "capacity": "16MiB", "max_objects": 64,
                   "prefault": "1MiB"}}})
    payload = torch.randint(0, 255, (3 * MiB,), dtype=torch.uint8)
    assert engine.store(key("e"), payload)
    engine.start_prefault()
    assert _wait_prefault(lambda: engine.stats()["tiers"]["shared"])["bytes"] == MiB
    engine.close()


@pytest.mark.gpu
def test_region_is_registered_with_cuda_and_copies_to_the_gpu(region_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layer = SharedRegionTier(region_path, 64 * MiB, 64)
    detail = layer.stats()["detail"]
    assert detail["cuda_registered"] and detail["pinned_bytes"] == layer.capacity_bytes
    assert detail["pin_failures"] == 0
    t = torch.randint(0, 255, (8 * MiB,), dtype=torch.uint8)
    assert put_tensor(layer, key("g"), t)
    with layer.acquire(key("g")) as art:
        gpu = art.data.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
    assert torch.equal(gpu.cpu(), t)
    layer.close()


def test_register_cuda_true_without_cuda_warns_and_counts(region_path):
    """The same report as the cpu tier's pin_memory (it used to raise RuntimeError here)."""
    if torch.cuda.is_available():   # nothing to warn about; the gpu test covers registration
        return
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        layer = SharedRegionTier(region_path, 1 * MiB, 16, register_cuda=True)
    assert any("shared tier region" in str(x.message) and "not page-locked" in str(x.message)
               and issubclass(x.category, RuntimeWarning) for x in w)
    detail = layer.stats()["detail"]
    assert detail["pin_failures"] == 1 and detail["pin_memory"] is False and not detail["cuda_registered"]
    assert put_tensor(layer, key("works"), torch.ones(10, dtype=torch.uint8))   # the tier still works
    layer.close()


def test_out_too_small_is_invalid_argument_naming_out(region_path):
    layer = SharedRegionTier(region_path, 1 * MiB, 16)
    assert put_tensor(layer, key("o"), torch.ones(1000, dtype=torch.uint8))
    with pytest.raises(InvalidArgument, match="out holds 999 bytes but the object has 1000"):
        layer.get(key("o"), out=torch.empty(999, dtype=torch.uint8))
    layer.close()
