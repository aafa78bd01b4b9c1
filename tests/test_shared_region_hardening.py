"""Shared region on a full or small filesystem, and with a damaged header.

Real small filesystems: each test mounts its own 16 MiB tmpfs (we run as root;
if the mount fails the test fails saying why, it never skips). Everything that
could fault runs in a child process, so a SIGBUS or SIGSEGV fails the test
with the signal's name instead of taking the test runner down.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from stratacache.backends.shared import SharedRegionError, SharedRegionTier
from stratacache.core.artifact import meta_for
from stratacache.core.keys import ArtifactKey
from tests.test_shared_region import inspect_region

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20

# Byte offsets and widths of the region header's geometry fields
# (SharedRegion::Header in csrc/shared_region.cpp).
GEOMETRY = {
    "header_bytes": (12, 4), "total_bytes": (16, 8), "capacity": (24, 8), "units": (32, 8),
    "max_objects": (40, 4), "max_key_bytes": (44, 4), "block_bytes": (48, 4),
    "bucket_count": (52, 4), "entry_stride": (56, 4), "aux_max": (60, 4),
    "leases_per_entry": (64, 4), "mutex_bytes": (68, 4), "buckets_off": (72, 8),
    "entries_off": (80, 8), "free_off": (88, 8), "bitmap_off": (96, 8), "data_off": (104, 8),
    "geometry_sum": (112, 8),
}


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 16 MiB tmpfs mounted for this test."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"this test needs a real small tmpfs and could not mount one at {mnt} "
                    f"(needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter with this tree on the path."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_no_signal(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode < 0:
        pytest.fail(f"{what} died of {signal.Signals(-proc.returncode).name}: {proc.stderr[-2000:]}")


def fill(directory: str) -> str:
    """Fills the filesystem of ``directory`` with one file until it has no space left."""
    path = os.path.join(directory, "filler")
    chunk = b"\xa5" * (256 << 10)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        small = b"\xa5" * 4096
        try:
            while True:
                f.write(small)
        except OSError:
            pass
    return path


def punch_hole(path: str, offset: int, length: int) -> None:
    """Deallocates a range of a file (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, 3, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"punching a hole in {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def key(i: int) -> ArtifactKey:
    return ArtifactKey("kv", "hardening", f"chunk-{i}")


def payload(i: int, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)


def put(layer, i: int, n: int) -> bool:
    t = payload(i, n)
    return layer.put(key(i), t, meta_for(t, 0))


# -------------------------------------------------------------- a full filesystem


def test_a_region_larger_than_its_filesystem_is_refused_at_creation(small_tmpfs):
    """64 MiB on a 16 MiB tmpfs: the old code created it sparse and its writer died of
    SIGBUS at store 15. Now creation reserves the space and fails naming the path and
    the free space, and gives back what it reserved."""
    path = os.path.join(small_tmpfs, "big.region")
    proc = run_child(f"""
        from stratacache.backends.shared import SharedRegionTier, SharedRegionError
        from tests.test_shared_region_hardening import put
        try:
            layer = SharedRegionTier({path!r}, 64 << 20, 256)
        except SharedRegionError as exc:
            print("REFUSED", exc)
        else:
            stored = sum(put(layer, i, 1 << 20) for i in range(60))
            print("STORED", stored)
    """)
    assert_no_signal(proc, "a writer of a region larger than its filesystem")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("REFUSED"), proc.stdout
    assert path in proc.stdout and "bytes free" in proc.stdout and "No space left" in proc.stdout
    assert os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize > 15 * MiB
    layer = SharedRegionTier(path, 8 * MiB, 256)   # a region that fits is then created
    assert put(layer, 1, 100_000)
    layer.close()


def test_a_writer_never_faults_when_the_filesystem_fills_up(small_tmpfs):
    """The region's space is reserved when it is created, so a filesystem that fills up
    afterwards cannot make a store fault: 400 stores of 64 KiB into an 8 MiB region
    (evicting) on a full tmpfs all succeed and read back byte-exactly."""
    path = os.path.join(small_tmpfs, "r.region")
    SharedRegionTier(path, 8 * MiB, 512).close()
    fill(small_tmpfs)
    proc = run_child(f"""
        import torch
        from stratacache.backends.shared import SharedRegionTier
        from tests.test_shared_region_hardening import key, payload, put
        layer = SharedRegionTier({path!r}, 8 << 20, 512)
        assert all(put(layer, i, 64 << 10) for i in range(400))
        for i in range(380, 400):
            art = layer.get(key(i), out=torch.empty(64 << 10, dtype=torch.uint8))
            assert art is not None and torch.equal(art.data, payload(i, 64 << 10)), i
        assert layer.check() == []
        print("OK")
    """)
    assert_no_signal(proc, "a writer on a full filesystem")
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-2000:]


def test_a_region_that_cannot_be_backed_is_refused_at_attach(small_tmpfs):
    """A region file whose pages are not all allocated (here: holes punched into it) on
    a full filesystem. The old code faulted into it: every attach, and a read-only
    inspect, died of SIGBUS until the file was deleted. Now a read-write attach tries
    to reserve the missing space and refuses naming the path and the free space; a
    read-only attach refuses without touching the mapping; once space is free again
    the region attaches and is consistent."""
    path = os.path.join(small_tmpfs, "r.region")
    layer = SharedRegionTier(path, 8 * MiB, 512)
    assert all(put(layer, i, 50_000) for i in range(20))
    layer.close()
    punch_hole(path, 4096, os.path.getsize(path) - 4096)   # all but the header page
    filler = fill(small_tmpfs)
    for what, code in (("a read-write attach", f"SharedRegionTier({path!r}, 8 << 20, 512)"),
                       ("a read-only inspect", f"inspect_region({path!r})")):
        proc = run_child(f"""
            from stratacache.backends.shared import SharedRegionTier, SharedRegionError
            from tests.test_shared_region import inspect_region
            try:
                {code}
            except SharedRegionError as exc:
                print("REFUSED", exc)
            else:
                print("ATTACHED")
        """)
        assert_no_signal(proc, what)
        assert proc.returncode == 0 and proc.stdout.startswith("REFUSED"), (what, proc.stdout,
                                                                            proc.stderr[-2000:])
        assert path in proc.stdout and "bytes free" in proc.stdout, proc.stdout
    config = os.path.join(os.path.dirname(small_tmpfs), "inspect.yaml")
    with open(config, "w") as f:
        json.dump({"tiers": {"cpu": {"enabled": False}, "disk": {"enabled": False},
                             "redis": {"enabled": False},
                             "shared": {"enabled": True, "path": path, "capacity": "8MiB",
                                        "max_objects": 512}}}, f)
    cli = subprocess.run([sys.executable, "-m", "stratacache.cli", "inspect", "--config", config,
                          "--tier", "shared", "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert_no_signal(cli, "stratacache inspect")
    assert cli.returncode != 0 and path in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
    os.unlink(filler)
    again = SharedRegionTier(path, 8 * MiB, 512)   # space is free again: reserved, usable
    assert again.check() == []
    assert put(again, 99, 70_000)
    assert torch.equal(again.get(key(99)).data, payload(99, 70_000))
    again.close()
    st = os.stat(path)
    assert st.st_blocks * 512 >= st.st_size


def test_a_truncated_region_is_recreated_with_reset(region_path):
    layer = SharedRegionTier(region_path, 4 * MiB, 64)
    assert put(layer, 1, 10_000)
    layer.close()
    full = os.path.getsize(region_path)
    os.truncate(region_path, full // 3)
    with pytest.raises(SharedRegionError, match=r"truncated.*reset"):
        SharedRegionTier(region_path, 4 * MiB, 64)
    with pytest.raises(SharedRegionError, match="truncated"):
        inspect_region(region_path)
    again = SharedRegionTier(region_path, 4 * MiB, 64, reset=True)
    assert os.path.getsize(region_path) == full and again.check() == []
    assert again.get(key(1)) is None and put(again, 2, 20_000)
    assert torch.equal(again.get(key(2)).data, payload(2, 20_000))
    again.close()


def test_a_region_of_the_previous_layout_is_started_over(region_path):
    """Records of the previous format become misses: a region of layout version 2
    (before entries recorded a priority) is re-created by a process that attaches alone;
    while others are attached it is refused, and a newer layout is always refused (an
    older build never destroys it). A version field made older by a flipped bit (its
    geometry checksum no longer matches) is refused, never wiped as an old region."""
    layer = SharedRegionTier(region_path, 4 * MiB, 64)
    assert put(layer, 1, 1000)
    _write_older_layout(region_path, 2)
    with pytest.raises(SharedRegionError, match="layout version 2 but this build uses version 3"):
        SharedRegionTier(region_path, 4 * MiB, 64)       # the first layer is still attached
    layer.close()
    again = SharedRegionTier(region_path, 4 * MiB, 64)
    assert again.get(key(1)) is None and again.check() == [] and put(again, 2, 1000)
    again.close()
    _write_u32(region_path, 8, 4)
    with pytest.raises(SharedRegionError, match="layout version 4"):
        SharedRegionTier(region_path, 4 * MiB, 64)
    _write_u32(region_path, 8, 2)                         # 3 with bit 0 flipped
    with pytest.raises(SharedRegionError, match="layout version 2 but this build uses version 3"):
        SharedRegionTier(region_path, 4 * MiB, 64)
    _write_u32(region_path, 8, 3)
    again = SharedRegionTier(region_path, 4 * MiB, 64)
    assert torch.equal(again.get(key(2)).data, payload(2, 1000))   # the restored region, intact
    again.close()


def _hash_key(data: bytes) -> int:
    """csrc/hash_index.cpp's hash_key, which the header's geometry checksum uses."""
    m64 = (1 << 64) - 1

    def mix(v):
        v ^= v >> 33
        v = (v * 0xC4CEB9FE1A85EC53) & m64
        return v ^ (v >> 29)

    n = len(data)
    h = 0x9E3779B97F4A7C15 ^ ((n * 0xFF51AFD7ED558CCD) & m64)
    full = n // 8 * 8
    for i in range(0, full, 8):
        h = ((h ^ mix(int.from_bytes(data[i:i + 8], "little"))) * 0x9FB21C651E98DF25) & m64
        h ^= h >> 31
    tail = int.from_bytes(data[full:], "little")
    h = ((h ^ mix(tail ^ (((n - full) << 56) & m64))) * 0x9FB21C651E98DF25) & m64
    return mix(h)


def _write_older_layout(path: str, version: int) -> None:
    """Makes the header a genuine one of an older layout: the version and its geometry checksum."""
    _write_u32(path, 8, version)
    with open(path, "r+b") as f:
        header = f.read(GEOMETRY["geometry_sum"][0])
        f.seek(GEOMETRY["geometry_sum"][0])
        f.write(_hash_key(header[8:]).to_bytes(8, "little"))


def _write_u32(path: str, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(4, "little"))


# -------------------------------------------------------------- a damaged header


def _flip(path: str, byte: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(byte)
        b = f.read(1)[0]
        f.seek(byte)
        f.write(bytes([b ^ (1 << bit)]))


def test_every_corrupt_geometry_field_is_refused_naming_the_field(region_path):
    """The high bit of each geometry field (the old code SIGSEGVed on units,
    bucket_count and the offsets), in a child process: a clear error naming the file
    and the field for a read-write attach and for inspect; reset re-creates."""
    layer = SharedRegionTier(region_path, 4 * MiB, 64)
    assert put(layer, 1, 30_000)
    layer.close()
    proc = run_child(f"""
        import json
        from stratacache.backends.shared import SharedRegionTier, SharedRegionError
        from tests.test_shared_region import inspect_region
        from tests.test_shared_region_hardening import GEOMETRY, _flip
        with open({region_path!r}, "rb") as f:
            pristine = f.read(4096)
        report = {{}}
        for field, (off, width) in GEOMETRY.items():
            _flip({region_path!r}, off + width - 1, 7)
            got = []
            for attach in (lambda: SharedRegionTier({region_path!r}, 4 << 20, 64),
                           lambda: inspect_region({region_path!r})):
                try:
                    attach()
                    got.append("ATTACHED")
                except SharedRegionError as exc:
                    got.append(str(exc))
            report[field] = got
            with open({region_path!r}, "r+b") as f:
                f.write(pristine)
        print(json.dumps(report))
    """)
    assert_no_signal(proc, "an attach to a region with a corrupt header")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    for field, messages in report.items():
        for msg in messages:
            assert region_path in msg and f"field {field}" in msg and "reset" in msg, (field, msg)
    _flip(region_path, GEOMETRY["bucket_count"][0], 0)   # off by one: attached, then 80 of 84 missed
    with pytest.raises(SharedRegionError, match="bucket_count"):
        SharedRegionTier(region_path, 4 * MiB, 64)
    fresh = SharedRegionTier(region_path, 4 * MiB, 64, reset=True)
    assert fresh.check() == [] and put(fresh, 2, 1000)
    fresh.close()


def test_random_header_bit_flips_never_crash_and_never_mislead(region_path):
    """300 random single-bit flips in the header page, all tried in one child process:
    never a signal; each attach either refuses with a SharedRegionError or gives a
    consistent region whose objects read back byte-exactly."""
    layer = SharedRegionTier(region_path, 4 * MiB, 64)
    sizes = {i: 1000 + 7919 * i for i in range(12)}
    assert all(put(layer, i, n) for i, n in sizes.items())
    layer.close()
    seed = random.randrange(1 << 30)
    proc = run_child(f"""
        import json, random, torch
        from stratacache.backends.shared import SharedRegionTier, SharedRegionError
        from tests.test_shared_region_hardening import _flip, key, payload
        rng = random.Random({seed})
        sizes = {sizes!r}
        with open({region_path!r}, "rb") as f:
            pristine = f.read(4096)
        refused = attached = 0
        for trial in range(300):
            byte, bit = rng.randrange(128 if trial < 200 else 4096), rng.randrange(8)
            print("trial", trial, byte, bit, flush=True)
            _flip({region_path!r}, byte, bit)
            try:
                layer = SharedRegionTier({region_path!r}, 4 << 20, 64)
            except SharedRegionError as exc:
                assert {region_path!r} in str(exc), str(exc)
                refused += 1
            else:
                attached += 1
                assert layer.check() == [], (byte, bit, layer.check())
                for i, n in sizes.items():
                    art = layer.get(key(i))
                    assert art is not None and torch.equal(art.data, payload(i, n)), (byte, bit, i)
                del art               # no view keeps the mapping: the next attach is alone
                layer.close()
            with open({region_path!r}, "r+b") as f:
                f.write(pristine)
        print(json.dumps({{"refused": refused, "attached": attached}}))
    """, timeout=300)
    assert_no_signal(proc, f"random header flips (seed {seed}, last: {proc.stdout.splitlines()[-1:]})")
    assert proc.returncode == 0, (seed, proc.stdout[-500:], proc.stderr[-2000:])
    counts = json.loads(proc.stdout.splitlines()[-1])
    assert counts["refused"] > 50 and counts["attached"] > 50, counts


# Byte offsets of the derived state after the mutex (rebuilt by repair).
DERIVED = {"used_bytes": (192, 8), "used_units": (200, 8), "items": (208, 8), "writing": (216, 8),
           "retired": (224, 8), "tombstones": (232, 8), "free_top": (264, 4)}


def test_damaged_derived_state_is_rebuilt_by_an_attach_next_to_others(region_path):
    """With another process attached there is no full repair at attach, so the old
    code trusted a damaged free-stack top or counter (a flipped free_top crashed the
    next store). Now the attach checks their invariants and rebuilds them."""
    layer = SharedRegionTier(region_path, 4 * MiB, 64)
    assert all(put(layer, i, 3000 + i) for i in range(10))
    layer.close()
    proc = run_child(f"""
        import torch
        from stratacache.backends.shared import SharedRegionTier
        from tests.test_shared_region_hardening import DERIVED, _flip, key, payload, put
        holder = SharedRegionTier({region_path!r}, 4 << 20, 64)   # others stay attached
        for n, (field, (off, width)) in enumerate(DERIVED.items()):
            _flip({region_path!r}, off + width - 1, 7)
            layer = SharedRegionTier({region_path!r}, 4 << 20, 64)
            assert layer.check() == [], (field, layer.check())
            assert all(put(layer, 100 + 10 * n + j, 5000) for j in range(2)), field
            for i in range(10):
                assert torch.equal(layer.get(key(i)).data, payload(i, 3000 + i)), (field, i)
            layer.close()
        assert holder.stats()["detail"]["region"]["repairs"] >= len(DERIVED)
        print("OK")
    """)
    assert_no_signal(proc, "an attach next to others to a region with damaged derived state")
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-2000:]


# -------------------------------------------------------------- caller mistakes


@pytest.mark.parametrize("mode", [0o666, 0o604, 0o601, 0o607])
def test_a_world_accessible_file_mode_is_refused(region_path, mode):
    """The config schema refuses these modes; the direct constructor now does too."""
    with pytest.raises(ValueError, match=f"file_mode 0{mode:o} gives access to all users"):
        SharedRegionTier(region_path, 1 * MiB, 16, file_mode=mode)
    assert not os.path.exists(region_path)
