"""DiskTier: restart recovery, corruption -> counted miss + removal, SIGKILL mid-write, hard cap
in allocated blocks (what du counts), honest restart counts, planted symlinks and open directories."""

import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from types import SimpleNamespace

from stratacache.backends.base import INSPECT_KEYS
from stratacache.backends.disk import DiskTier, DiskTierError
from stratacache.core.artifact import meta_for
from stratacache.core.keys import ArtifactKey
from stratacache.ops import checksum64
from tests.test_shared_region_hardening import small_tmpfs  # noqa: F401 - a fixture: a real 16 MiB tmpfs

U64 = 0xFFFFFFFFFFFFFFFF


def K(i, kind="kv"):
    return ArtifactKey(kind, "disk-test", f"k{i}")


def body(i, n):
    g = torch.Generator().manual_seed(i)
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)


def put(tier, key, t):
    return tier.put(key, t.reshape(-1).view(torch.uint8), meta_for(t, checksum64(t) & U64))


def used(tier):
    return tier.stats()["used_bytes"]


def has(tier, key):
    return tier.contains([key.encode()]) == [True]


def files(path):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".sca"))


def charged(paths):
    """What the tier charges for these files: whole filesystem blocks."""
    block = os.statvfs(paths[0]).f_frsize if paths else 4096
    return sum(-(-os.path.getsize(f) // block) * block for f in paths)


def du(paths):
    """Bytes the filesystem allocated to these files (what du counts)."""
    return sum(os.stat(f).st_blocks * 512 for f in paths)


def test_round_trip_restart_recovery_and_inspect(tmp_path):
    d = str(tmp_path / "tier")
    tier = DiskTier(d, 1 << 20, io_threads=2)
    x = torch.randn(4, 33).to(torch.bfloat16)
    assert put(tier, K(0, "params"), x)
    for i in range(1, 6):
        assert put(tier, K(i), body(i, 1000 + i))
    out = torch.full((5000,), 0xEE, dtype=torch.uint8)
    art = tier.get(K(3), out=out)
    assert torch.equal(out[:1003], body(3, 1003)) and (out[1003:] == 0xEE).all()
    used_now = used(tier)
    assert used_now == charged(files(d)) >= du(files(d))                   # accounting == blocks on disk
    assert all(os.stat(f).st_mode & 0o777 == 0o600 for f in files(d))
    with pytest.raises(DiskTierError, match="in use by another"):
        DiskTier(d, 1 << 20)
    tier.close()

    before = sorted(os.listdir(d))
    info = DiskTier.inspect(SimpleNamespace(path=d, capacity=1), None)   # read-only, without the lock
    assert sorted(os.listdir(d)) == before
    assert set(info) == set(INSPECT_KEYS) | {"detail"} and info["tier"] == "disk" and info["location"] == d
    assert info["items"] == 6 and info["used_bytes"] == used_now and info["capacity_bytes"] == 1 << 20
    assert info["by_kind"]["params"]["items"] == 1 and info["by_namespace"]["kv/disk-test"]["items"] == 5
    assert info["unreadable"] == 0 and info["detail"] == {"eviction": "lru", "partial_writes": 0}

    again = DiskTier(d, 1 << 20)
    assert again.stats()["detail"]["recovered_at_start"] == 6 and used(again) == used_now
    art = again.get(K(0, "params"))
    assert art.meta.dtype == torch.bfloat16 and torch.equal(art.tensor(), x)
    for i in range(1, 6):
        assert torch.equal(again.get(K(i)).data, body(i, 1000 + i))
    again.close()


@pytest.mark.parametrize("size", [4096, 2 << 20], ids=["read", "mapped"])
@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "garbage_header"])
def test_corrupt_file_is_counted_miss_and_removed(tmp_path, damage, size):
    d = str(tmp_path / "tier")
    tier = DiskTier(d, 4 << 20)
    assert put(tier, K(1), body(1, size))
    [f] = files(d)
    raw = bytearray(open(f, "rb").read())
    if damage == "flip_payload":
        raw[-100] ^= 0x01
    elif damage == "truncate":
        raw = raw[:-10]
    else:
        raw[:4] = b"XXXX"
    open(f, "wb").write(raw)
    assert tier.get(K(1)) is None
    s = tier.stats()
    assert s["corrupt"] == 1 and s["misses"] == 1 and s["used_bytes"] == 0
    assert not has(tier, K(1)) and files(d) == []
    tier.close()


def test_restart_drops_corrupt_and_partial_files(tmp_path):
    d = str(tmp_path / "tier")
    tier = DiskTier(d, 1 << 20)
    for i in range(3):
        put(tier, K(i), body(i, 2000))
    tier.close()
    fs = files(d)
    with open(fs[0], "r+b") as f:
        f.truncate(100)
    open(fs[1] + ".tmp", "wb").write(b"half a chunk")
    again = DiskTier(d, 1 << 20)
    s = again.stats()["detail"]
    assert s["recovered_at_start"] == 2 and s["dropped_at_start"] == 2
    assert not any(n.endswith(".tmp") for _, _, ns in os.walk(d) for n in ns)
    assert used(again) == charged(files(d))
    again.close()


def test_cap_holds_under_ten_times_capacity_of_traffic(tmp_path):
    d = str(tmp_path / "tier")
    cap = 256 << 10
    tier = DiskTier(d, cap, eviction="s3fifo", io_threads=2)
    written = 0
    i = 0
    while written < 10 * cap:
        n = 1000 + (i * 7919) % 30000
        t = body(i, n)
        items = [(K(i), t, meta_for(t, checksum64(t) & U64))]
        assert tier.put_many(items) == [True]
        written += n
        i += 1
        assert du(files(d)) <= cap and used(tier) == charged(files(d)) <= cap
    keys = [K(j) for j in range(i)]
    present = [k for k, hit in zip(keys, tier.contains([k.encode() for k in keys])) if hit]
    arts = tier.get_many(present)
    for k, a in zip(present, arts):
        j = int(k.name[1:])
        assert torch.equal(a.data, body(j, 1000 + (j * 7919) % 30000))
    assert tier.stats()["evictions"] > 0
    tier.close()


def test_du_of_tiny_objects_stays_within_the_cap(tmp_path):
    """3000 objects of 1-64 bytes under a 256 KiB cap: each file occupies a whole block,
    and that is what is charged, so du of the objects never exceeds the cap (it was 45x)."""
    d = str(tmp_path / "tier")
    cap = 256 << 10
    tier = DiskTier(d, cap)
    for i in range(3000):
        assert put(tier, K(i), body(i, 1 + i % 64))
    assert du(files(d)) <= cap and used(tier) == charged(files(d)) <= cap
    assert tier.stats()["evictions"] > 0
    keys = [K(i) for i in range(3000)]
    present = [k for k, hit in zip(keys, tier.contains([k.encode() for k in keys])) if hit]
    assert len(present) == len(files(d)) > 0
    for k in present[-20:]:
        i = int(k.name[1:])
        assert torch.equal(tier.get(k).data, body(i, 1 + i % 64))
    tier.close()


def test_restart_with_a_smaller_cap_reports_what_it_kept_and_removed(tmp_path):
    """100 objects, restarted under a cap that holds about half: recovered is what
    remains, dropped is what was removed (it said recovered=100, dropped=0)."""
    d = str(tmp_path / "tier")
    tier = DiskTier(d, 4 << 20)
    for i in range(100):
        assert put(tier, K(i), body(i, 8000))
    tier.close()
    again = DiskTier(d, 400_000)
    s = again.stats()
    left = files(d)
    assert 0 < s["detail"]["recovered_at_start"] == len(left) == s["items"] < 100
    assert s["detail"]["dropped_at_start"] == 100 - len(left)
    assert used(again) == charged(left) <= 400_000
    for k in again.keys():            # the newest survive, intact
        assert torch.equal(again.get(k).data, body(int(k.name[1:]), 8000))
    again.close()


def _prefix(key):
    return hashlib.blake2b(key.encode(), digest_size=20).hexdigest()[:2]


def test_a_symlink_planted_inside_the_tier_is_refused(tmp_path):
    """A symlinked subdirectory is never followed: stores whose files belong there
    fail (nothing lands in its target), other stores work, and a restart does not
    recover objects through it; a symlinked object file is not read through either."""
    d = str(tmp_path / "tier")
    outside = tmp_path / "outside"
    outside.mkdir()
    tier = DiskTier(d, 4 << 20)
    victim = K(0)
    assert put(tier, victim, body(0, 5000))
    [victim_file] = files(d)
    tier.close()
    sub = os.path.join(d, _prefix(victim))
    os.rename(sub, str(outside / "moved"))        # the real objects now live outside
    os.symlink(str(outside / "moved"), sub)
    again = DiskTier(d, 4 << 20)
    assert again.stats()["detail"]["recovered_at_start"] == 0 and not has(again, victim)
    same = [i for i in range(1, 2000) if _prefix(K(i)) == _prefix(victim)][:3]
    other = [i for i in range(1, 2000) if _prefix(K(i)) != _prefix(victim)][:3]
    for i in same:
        assert not put(again, K(i), body(i, 3000))
    for i in other:
        assert put(again, K(i), body(i, 3000))
        assert torch.equal(again.get(K(i)).data, body(i, 3000))
    assert sorted(os.listdir(outside / "moved")) == [os.path.basename(victim_file)]
    again.close()

    os.unlink(sub)                                  # a symlinked object file
    os.mkdir(sub, 0o700)
    os.symlink(str(outside / "moved" / os.path.basename(victim_file)), victim_file)
    third = DiskTier(d, 4 << 20)
    assert not has(third, victim) and third.stats()["detail"]["recovered_at_start"] == len(other)
    assert os.path.exists(outside / "moved" / os.path.basename(victim_file))   # target untouched
    third.close()


def test_a_tier_directory_others_can_write_is_refused(tmp_path, caplog):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(DiskTierError, match=r"mode 0777, writable by every user.*chmod 700"):
        DiskTier(str(d), 1 << 20)
    assert os.listdir(d) == []
    os.chmod(d, 0o750)
    with caplog.at_level(logging.WARNING, logger="stratacache.backends.disk"):
        tier = DiskTier(str(d), 1 << 20)
    assert "mode 0750" in caplog.text
    tier.close()


def test_a_key_the_tier_cannot_read_back_is_refused_at_store(tmp_path):
    """A key over 64 KiB could be written but not parsed at restart (it was stored,
    then dropped): it is refused at store, and counted."""
    d = str(tmp_path / "tier")
    tier = DiskTier(d, 4 << 20)
    long_key = ArtifactKey("kv", "disk-test", "x" * (70 << 10))
    assert not put(tier, long_key, body(1, 100))
    assert files(d) == [] and tier.stats()["put_failures"] == 1 and not has(tier, long_key)
    fits = ArtifactKey("kv", "disk-test", "y" * (60 << 10))
    assert put(tier, fits, body(2, 100))
    tier.close()
    again = DiskTier(d, 4 << 20)
    assert has(again, fits) and torch.equal(again.get(fits).data, body(2, 100))
    again.close()


def test_a_full_filesystem_fails_stores_cleanly(small_tmpfs):
    """A 64 MiB tier on a real 16 MiB tmpfs: once the filesystem is full a store fails
    (counted), leaves no partial file and no charge; everything acknowledged reads back
    byte-exactly, also after a restart, which counts honestly."""
    d = os.path.join(small_tmpfs, "tier")
    tier = DiskTier(d, 64 << 20)
    stored = [i for i in range(40) if put(tier, K(i), body(i, 1 << 20))]
    assert 5 < len(stored) < 16 and stored == list(range(len(stored)))
    s = tier.stats()
    assert s["put_failures"] == 40 - len(stored) and s["errors"] == 40 - len(stored)
    assert not any(n.endswith(".tmp") for _, _, ns in os.walk(d) for n in ns)
    assert used(tier) == charged(files(d)) and len(files(d)) == len(stored)
    for i in stored:
        assert torch.equal(tier.get(K(i)).data, body(i, 1 << 20))
    tier.close()
    again = DiskTier(d, 64 << 20)
    assert (again.recovered, again.dropped_at_start) == (len(stored), 0)
    for i in stored:
        assert torch.equal(again.get(K(i)).data, body(i, 1 << 20))
    again.close()


WRITER = textwrap.dedent("""
    import sys, torch
    from stratacache.backends.disk import DiskTier
    from stratacache.core.artifact import meta_for
    from stratacache.core.keys import ArtifactKey
    from stratacache.ops import checksum64
    tier = DiskTier(sys.argv[1], 1 << 40)
    i = 0
    while True:
        t = torch.full((32 << 20,), i % 251, dtype=torch.uint8)
        tier.put(ArtifactKey("kv", "kill", str(i)), t, meta_for(t, checksum64(t) & 0xFFFFFFFFFFFFFFFF))
        print(i, flush=True)
        i += 1
""")


@pytest.mark.slow
def test_sigkill_mid_write_leaves_no_readable_partial_chunk(tmp_path):
    d = str(tmp_path / "tier")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, d], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "0"       # one chunk fully written
        deadline = time.monotonic() + 60
        caught_tmp = False
        while time.monotonic() < deadline and not caught_tmp:
            caught_tmp = any(n.endswith(".tmp") and os.path.getsize(os.path.join(r, n)) > 0
                             for r, _, ns in os.walk(d) for n in ns)
        assert caught_tmp, "never saw a write in progress"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    tier = DiskTier(d, 1 << 40)
    s = tier.stats()["detail"]
    assert s["recovered_at_start"] >= 1 and s["dropped_at_start"] >= 1
    for key in list(tier.keys()):
        art = tier.get(key)
        assert art is not None and art.meta.size == 32 << 20
        assert (art.data == int(key.name) % 251).all()
    tier.close()
