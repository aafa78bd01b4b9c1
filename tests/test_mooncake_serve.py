"""The Mooncake deployment: memory registered once by the chain, and the serve topology.

Registration: the chain built with cpu + shared + mooncake hands the CPU arena and the
shared region to the Mooncake tier once; on RDMA's code path a move from or into them
registers nothing per call, other memory still does. That path is exercised on the real
TCP client (which accepts registrations) with ``protocol`` switched to ``rdma`` and the
client's register/unregister calls recorded (``RecordingStore``); everything else is the
real master and holder.

Topology: ``stratacache mooncake master`` and ``stratacache mooncake holder`` started as
processes, an engine process stores KV and exits, a new engine process reads the same
bytes. Everything Mooncake runs in the loopback-only namespace (tests/mooncake_server.py);
where it cannot be made, these tests fail saying why.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mooncake.store
from stratacache.backends.mooncake import HEADER_SLOT, HeaderSlots
from stratacache.cli.main import main as cli_main
from stratacache.config import load_config
from stratacache.core.artifact import as_bytes, meta_for
from stratacache.core.errors import TierFault
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine
from stratacache.ops import checksum64
from tests.mooncake_server import (MooncakeMaster, SegmentHolder, free_port, wait_holder_ready,
                                   wait_listening)
from tests.test_mooncake_tier import holder, master, netns  # noqa: F401 - the module's cluster

REPO = Path(__file__).resolve().parents[1]


def engine_overrides(master, tmp_path) -> dict:
    return {"tiers.cpu.capacity": "8MiB", "tiers.cpu.pin_memory": False,
            "tiers.shared.path": str(tmp_path / "region"), "tiers.shared.capacity": "8MiB",
            "tiers.shared.max_objects": 64, "tiers.shared.reset": True,
            "tiers.shared.prefault": 0,
            "tiers.mooncake.enabled": True, "tiers.mooncake.master_address": master.address,
            "tiers.mooncake.metrics_address": master.metrics_address,
            "tiers.mooncake.op_timeout_s": 1.0, "tiers.mooncake.connect_timeout_s": 0.5,
            "tiers.mooncake.retry_backoff_s": 0.2, "tiers.mooncake.retry_backoff_max_s": 0.5}


@pytest.fixture
def engine(master, holder, tmp_path):
    eng = StorageEngine(load_config(overrides=engine_overrides(master, tmp_path)))
    yield eng
    eng.close()


def tier_of(eng: StorageEngine, name: str):
    return eng.chain.tiers[eng.chain.names.index(name)]


def span(memory: torch.Tensor) -> tuple[int, int]:
    return memory.data_ptr(), memory.numel()


def item(name: str, nbytes: int, rng: random.Random):
    g = torch.Generator().manual_seed(rng.getrandbits(32))
    data = as_bytes(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g))
    key = ArtifactKey("kv", "reg", f"{name}-{time.monotonic_ns()}")
    return key, data, meta_for(data, checksum64(data))


class RecordingStore:
    """The real Mooncake client, with every register_buffer / unregister_buffer recorded."""

    def __init__(self, real):
        self._real = real
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def register_buffer(self, ptr: int, nbytes: int) -> int:
        self.registered.append((ptr, nbytes))
        return self._real.register_buffer(ptr, nbytes)

    def unregister_buffer(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return self._real.unregister_buffer(ptr)

    def __getattr__(self, name):
        return getattr(self._real, name)


# -- memory registered once ------------------------------------------------------------------

def test_the_chain_registers_the_cpu_arena_and_the_shared_region_once(engine):
    moon, cpu, shared = (tier_of(engine, n) for n in ("mooncake", "cpu", "shared"))
    assert moon.registers_memory and not cpu.registers_memory and not shared.registers_memory
    arena, = cpu.host_memory()
    region, = shared.host_memory()
    assert arena.numel() >= cpu.capacity_bytes and region.numel() == shared.capacity_bytes
    expected = {span(arena), span(region), span(moon._headers.memory)}
    assert len(moon.registered_memory) == 3 and set(moon.registered_memory) == expected
    assert moon.stats()["detail"]["registered_bytes"] == sum(n for _, n in expected)
    moon.register_memory(arena.narrow(0, 4096, 8192))      # already covered: nothing new
    assert len(moon.registered_memory) == 3


def test_moves_inside_registered_memory_register_nothing_per_call(engine):
    """RDMA's decisions on the real client: moves from and into the arena and the region
    register nothing; a loose buffer is registered for its one call, then unregistered."""
    moon, cpu, shared = (tier_of(engine, n) for n in ("mooncake", "cpu", "shared"))
    moon.protocol = "rdma"
    rec = moon._store = RecordingStore(moon._store)
    rng = random.Random(17)
    in_arena = item("arena", 300_000, rng)
    in_region = item("region", 300_000, rng)
    assert cpu.put(*in_arena) and shared.put(*in_region)
    with cpu.acquire(in_arena[0]) as arena_view, shared.acquire(in_region[0]) as region_view:
        assert arena_view.data.data_ptr() != in_arena[1].data_ptr()   # views of tier memory
        assert moon.put_many([(in_arena[0], arena_view.data, in_arena[2]),
                              (in_region[0], region_view.data, in_region[2])]) == [True, True]
        assert rec.registered == [] and rec.unregistered == []
        # Reads into the arena and the region: each gets the other's bytes.
        got = moon.get_many([in_region[0], in_arena[0]], [arena_view.data, region_view.data])
        assert all(a is not None for a in got)
        assert torch.equal(arena_view.data, in_region[1])
        assert torch.equal(region_view.data, in_arena[1])
        assert rec.registered == [] and rec.unregistered == []
    loose_key, loose, loose_meta = item("loose", 200_000, rng)
    assert moon.put(loose_key, loose, loose_meta)
    assert rec.registered == [(loose.data_ptr(), loose.numel())]
    assert rec.unregistered == [loose.data_ptr()]
    out = torch.empty(200_000, dtype=torch.uint8)
    assert moon.get(loose_key, out) is not None and torch.equal(out, loose)
    assert rec.registered[1:] == [(out.data_ptr(), out.numel())]
    assert rec.unregistered[1:] == [out.data_ptr()]


def test_registration_is_renewed_when_the_client_is_set_up_later(netns, tmp_path, monkeypatch):
    """The master is down when the engine is built: the chain's ranges are kept, and the
    client set up once the master is back registers each of them once, and only then."""
    made: list[RecordingStore] = []
    real_client = mooncake.store.MooncakeDistributedStore

    def recording_client():
        made.append(RecordingStore(real_client()))
        return made[-1]

    monkeypatch.setattr(mooncake.store, "MooncakeDistributedStore", recording_client)
    m = MooncakeMaster(client_ttl_s=2, lease_ttl_ms=200, start=False)
    try:
        eng = StorageEngine(load_config(overrides=engine_overrides(m, tmp_path)))
        try:
            moon, cpu = tier_of(eng, "mooncake"), tier_of(eng, "cpu")
            assert not moon.healthy and made == []
            kept = set(moon.registered_memory)
            assert span(cpu.host_memory()[0]) in kept and len(kept) == 3
            moon.protocol = "rdma"
            m.start()
            with SegmentHolder(m, 32 << 20):
                key, data, meta = item("later", 100_000, random.Random(3))
                assert cpu.put(key, data, meta)
                with cpu.acquire(key) as view:
                    deadline = time.monotonic() + 15
                    while not moon.put(key, view.data, meta):
                        assert time.monotonic() < deadline, "the tier never recovered"
                        time.sleep(0.1)
                    client = made[-1]           # the one set up (a failed set-up is dropped)
                    assert sorted(client.registered) == sorted(kept)
                    assert set(moon.registered_memory) == kept
                    out = torch.empty(100_000, dtype=torch.uint8)
                    assert moon.get(key, out) is not None and torch.equal(out, data)
                    assert client.registered[3:] == [(out.data_ptr(), out.numel())]
        finally:
            eng.close()
    finally:
        m.close()


def test_a_refused_registration_leaves_that_memory_registered_per_call(engine):
    moon = tier_of(engine, "mooncake")
    moon.protocol = "rdma"

    class Refusing(RecordingStore):
        def register_buffer(self, ptr, nbytes):
            super().register_buffer(ptr, nbytes)
            return -1 if nbytes == 12345 else 0

    rec = moon._store = Refusing(moon._store)
    memory = torch.zeros(12345, dtype=torch.uint8)
    with pytest.raises(TierFault, match="register_buffer of 12345 bytes .* returned -1"):
        moon.register_memory(memory)
    assert (memory.data_ptr(), 12345) not in moon.registered_memory
    assert moon.stats()["detail"]["registration_failures"] == 1
    rng = random.Random(5)
    key, data, meta = item("refused", 12345, rng)
    memory.copy_(data)
    assert moon.put(key, memory, meta)
    assert rec.registered[-1] == (memory.data_ptr(), 12345)
    assert rec.unregistered == [memory.data_ptr()]


def test_header_slots_never_share_a_block_and_fall_back_outside_the_registered_pool():
    slots = HeaderSlots(blocks=2, slots=4)
    pool = span(slots.memory)

    def inside(t: torch.Tensor) -> bool:
        return pool[0] <= t.data_ptr() and t.data_ptr() + t.numel() <= pool[0] + pool[1]

    with slots.take(3) as a, slots.take(4) as b:
        assert inside(a) and inside(b) and a.numel() == 3 * HEADER_SLOT
        assert abs(a.data_ptr() - b.data_ptr()) >= slots.block_bytes      # distinct blocks
        a.fill_(7)
        with slots.take(1) as c:                       # every block taken: a buffer of its own
            assert not inside(c) and not c.any()
    with slots.take(5) as big:                          # larger than a block
        assert not inside(big) and big.numel() == 5 * HEADER_SLOT
    with slots.take(4) as again:                        # a block handed back, zeroed
        assert inside(again) and not again.any()


# -- the serve topology ------------------------------------------------------------------------

ENGINE_SCRIPT = r"""
import sys, torch
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine

config, seed, role, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
g = torch.Generator().manual_seed(seed)
sizes = [1, 4096, 300_001, 1 << 20]
payloads = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
keys = [ArtifactKey("kv", "restart", f"chunk{i}") for i in range(len(sizes))]
eng = StorageEngine.from_config(config)
if role == "put":
    assert eng.store_many(list(zip(keys, payloads))) == [True] * len(keys), eng.stats()
else:
    with open(path, "wb") as f:
        for key in keys:
            art = eng.load(key, tier="mooncake", mode="exact")
            assert art is not None, f"{key} missing after the engine restart"
            f.write(art.data.numpy().tobytes())
eng.close()
"""


def _cli(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "stratacache.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO)


def _engine(config: Path, role: str, path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(config), "41", role,
                           str(path)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"engine {role} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}"


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_kv_survives_an_engine_restart_with_the_cli_master_and_holder(netns, tmp_path):
    port, metrics, holder_port = free_port(), free_port(), free_port()
    config = tmp_path / "stratacache.yaml"
    config.write_text(
        "tiers:\n  cpu: {capacity: 16MiB, pin_memory: false}\n  shared: {enabled: false}\n"
        f"  mooncake:\n    enabled: true\n    master_address: 127.0.0.1:{port}\n"
        f"    metrics_address: 127.0.0.1:{metrics}\n    op_timeout_s: 2.0\n")
    master = _cli(["mooncake", "master", "--port", str(port), "--metrics-port", str(metrics),
                   "--client-ttl", "2", "--lease-ttl-ms", "200"], tmp_path / "master.log")
    holder = None
    try:
        wait_listening(port, master, "stratacache mooncake master", str(tmp_path / "master.log"))
        holder = _cli(["mooncake", "holder", "--config", str(config), "--segment-size", "64MiB",
                       "--port", str(holder_port)], tmp_path / "holder.log")
        wait_holder_ready(holder_port, f"127.0.0.1:{metrics}", holder, str(tmp_path / "holder.log"))
        # The commands became Mooncake's own processes (exec): their PIDs are the daemons'.
        for proc, name in ((master, "mooncake_master"), (holder, "mooncake_client")):
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                assert name.encode() in f.read()
        assert "warning" in (tmp_path / "holder.log").read_text()

        _engine(config, "put", tmp_path / "unused")        # stores, then the process exits
        _engine(config, "get", tmp_path / "read.bin")      # a new engine process reads
        g = torch.Generator().manual_seed(41)
        expected = b"".join(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
                            .numpy().tobytes() for n in [1, 4096, 300_001, 1 << 20])
        assert (tmp_path / "read.bin").read_bytes() == expected
        assert master.poll() is None and holder.poll() is None
    finally:
        if holder is not None:
            _kill(holder)
        _kill(master)


# -- the commands' input -----------------------------------------------------------------------

def _run_cli(args, capsys) -> tuple[int, str, str]:
    rc = cli_main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("args, status, named", [
    (["mooncake", "master", "--port", "70000"], 2, "--port: expected a port 1-65535, got '70000'"),
    (["mooncake", "master", "--port", "x"], 2, "--port: expected a port 1-65535, got 'x'"),
    (["mooncake", "master", "--metrics-port", "0"], 2, "--metrics-port: expected a port"),
    (["mooncake", "master", "--port", "9003"], 2, "--metrics-port must differ from --port"),
    (["mooncake", "master", "--client-ttl", "-1"], 2, "--client-ttl: expected an integer >= 1"),
    (["mooncake", "holder", "--config", "/nonexistent/sc.yaml"], 1,
     "config file not found: /nonexistent/sc.yaml"),
    (["mooncake", "holder", "--segment-size", "1MiB"], 2, "--segment-size: must be at least 16MiB"),
    (["mooncake", "holder", "--segment-size", "lots"], 2, "--segment-size: expected a size"),
    (["mooncake", "holder", "--port", "65536"], 2, "--port: expected a port 1-65535"),
    (["mooncake"], 2, "required"),
])
def test_bad_input_is_one_clear_line(args, status, named, capsys):
    rc, out, err = _run_cli(args, capsys)
    assert rc == status and named in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_bad_mooncake_section_in_the_holders_config_names_the_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("tiers:\n  mooncake:\n    protocol: udp\n")
    rc, _, err = _run_cli(["mooncake", "holder", "--config", str(config), "--dry-run"], capsys)
    assert rc == 1 and "tiers.mooncake.protocol" in err


def test_the_master_binds_loopback_by_default_and_warns_otherwise(capsys):
    rc, out, err = _run_cli(["mooncake", "master", "--dry-run"], capsys)
    assert rc == 0 and err == ""
    assert "--rpc_address=127.0.0.1 --rpc_port=50051 --metrics_host=127.0.0.1 " \
           "--metrics_port=9003" in out
    rc, out, err = _run_cli(["mooncake", "master", "--dry-run", "--host", "10.1.2.3"], capsys)
    assert rc == 0 and "--rpc_address=10.1.2.3" in out and "warning" in err and "10.1.2.3" in err


def test_the_holder_command_comes_from_the_config(tmp_path, capsys):
    config = tmp_path / "cluster.yaml"
    config.write_text("tiers:\n  mooncake:\n    master_address: 10.0.0.5:6000\n"
                      "    local_hostname: 10.0.0.7\n    protocol: rdma\n"
                      "    device_names: mlx5_0,mlx5_1\n")
    rc, out, err = _run_cli(["mooncake", "holder", "--config", str(config), "--segment-size",
                             "2GiB", "--dry-run"], capsys)
    assert rc == 0, err
    argv = out.split()
    assert argv[0].endswith("mooncake_client")
    assert argv[1:] == ["--host=10.0.0.7", "--port=50052", "--master_server_address=10.0.0.5:6000",
                        "--metadata_server=P2PHANDSHAKE", f"--global_segment_size={2 << 30}",
                        "--protocol=rdma", "--device_names=mlx5_0,mlx5_1"]
    assert "0.0.0.0" in err and "docs/mooncake.md" in err


def test_serve_points_at_the_mooncake_commands(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())    # undo the help's line wrapping
    assert "stratacache mooncake master" in out and "stratacache mooncake holder" in out
