"""Real Mooncake Store processes for tests and benchmarks, inside a loopback-only network.

Every Mooncake client opens listeners on 0.0.0.0 and [::] and the master's
metadata server binds 0.0.0.0, whatever the flags say. So nothing Mooncake may
run in the host's network: ``loopback_namespace()`` moves the *calling thread*
into a fresh network namespace that has only ``lo`` (network namespaces belong
to threads in Linux, and threads and processes started from that thread inherit
it), and everything here refuses to start outside such a namespace.

Why a thread and not the whole test process: the pytest process is already
multi-threaded (torch) and must stay in the host network for every other test
module; a thread-level ``unshare(CLONE_NEWNET)`` needs no re-exec, keeps pytest's
reporting per test, and is undone by ``setns`` back to the saved namespace. The
master, the segment holders (``mooncake_client``) and the in-process clients
are all created from that thread, so the listeners they open (and the threads
Mooncake starts) live only inside the namespace. Making the namespace needs
CAP_SYS_ADMIN (root in CI); where it cannot be made, ``MooncakeHarnessError``
says why and the tests fail, they never skip.

    with loopback_namespace():
        with MooncakeMaster() as m:            # m.address, m.metrics_address
            with SegmentHolder(m, 64 << 20):   # a mooncake_client daemon holding memory
                store = raw_store(m)           # a MooncakeDistributedStore, set up
            m.kill(); m.start()                # same ports, every object lost
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from typing import Iterator, Optional

from stratacache.cli.mooncake_cmd import holder_command, master_command

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sH14x")
START_TIMEOUT_S = 20.0


class MooncakeHarnessError(RuntimeError):
    """A Mooncake process or the loopback-only namespace could not be made."""


def in_loopback_namespace() -> bool:
    """The calling thread's network has no interface but ``lo``."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def require_loopback_namespace(what: str) -> None:
    if not in_loopback_namespace():
        names = [name for _, name in socket.if_nameindex()]
        raise MooncakeHarnessError(
            f"refusing to start {what} outside a loopback-only network namespace (this "
            f"thread sees interfaces {names}); Mooncake listens on every address: use "
            "loopback_namespace()")


class LoopbackNamespace:
    """A network namespace that has only ``lo`` (up), made once and entered by any thread as
    often as needed (``with ns.entered():``). Its processes (master, holders) and the threads
    Mooncake starts stay in it between visits, so a test module can share one cluster while its
    other tests (a Redis server on the host's loopback) run outside."""

    def __init__(self):
        self._libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            if self._libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise MooncakeHarnessError(
                    f"cannot make a loopback-only network namespace: unshare(CLONE_NEWNET) failed "
                    f"({os.strerror(err)}); the Mooncake tests need CAP_SYS_ADMIN (run them as "
                    "root, or in a container allowed to create network namespaces)")
            try:
                _bring_up_loopback()
                if not in_loopback_namespace():
                    raise MooncakeHarnessError("the new network namespace has interfaces "
                                               f"other than lo: {socket.if_nameindex()}")
                self._fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            finally:
                self._setns(home, "the host network namespace")
        finally:
            os.close(home)

    def _setns(self, fd: int, what: str) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            raise MooncakeHarnessError(f"cannot enter {what}: {os.strerror(ctypes.get_errno())}")

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread inside the namespace for the block, then back where it was."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            self._setns(self._fd, "the loopback-only network namespace")
            try:
                yield
            finally:
                self._setns(home, "the network namespace this thread came from")
        finally:
            os.close(home)

    def close(self) -> None:
        os.close(self._fd)


_SHARED: Optional[LoopbackNamespace] = None


def shared_namespace() -> LoopbackNamespace:
    """The process's one loopback-only namespace, made on first use. One per process: a
    Mooncake client keeps process-wide state bound in the namespace where the first client
    was set up, and a client set up later from another namespace fails (setup returns -1,
    seen when two test modules each made their own)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = LoopbackNamespace()
    return _SHARED


@contextlib.contextmanager
def loopback_namespace() -> Iterator[None]:
    """Run the calling thread in the process's loopback-only network namespace (only ``lo``,
    up), then return it to the namespace it was in. Mooncake processes started meanwhile stay
    in there."""
    with shared_namespace().entered():
        yield


def _bring_up_loopback() -> None:
    """``ip link set lo up`` without needing iproute2: SIOCSIFFLAGS on a socket of this namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = _IFREQ.unpack(fcntl.ioctl(s, _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0)))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 in the calling thread's namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str, log_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MooncakeHarnessError(f"{what} exited with code {proc.returncode}: "
                                       f"{_tail(log_path)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise MooncakeHarnessError(f"{what} did not listen on 127.0.0.1:{port} within "
                               f"{START_TIMEOUT_S}s: {_tail(log_path)}")


def wait_holder_ready(port: int, metrics_address: str, proc: subprocess.Popen,
                      log_path: str) -> None:
    """A segment holder listens on ``port`` and its segment is mounted at the master (the
    daemon listens before its segment is registered with the master)."""
    import urllib.request
    wait_listening(port, proc, "mooncake_client", log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{metrics_address}/get_all_segments",
                                        timeout=1) as r:
                if r.read().strip():
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise MooncakeHarnessError(f"mooncake_client's segment never appeared at the master: "
                               f"{_tail(log_path)}")


def _tail(path: str, n: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return "log: " + " / ".join(f.read().splitlines()[-n:])
    except OSError:
        return ""


def _stop(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGCONT)
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class MooncakeMaster:
    """``mooncake_master`` with RPC and metrics on 127.0.0.1 at free ports; stopped by PID.

    ``client_ttl_s``: how soon a killed client's segment (and its objects) is dropped;
    ``lease_ttl_ms``: the read lease every get grants (remove is refused meanwhile).
    """

    def __init__(self, *, client_ttl_s: int = 2, lease_ttl_ms: int = 200, start: bool = True):
        require_loopback_namespace("mooncake_master")
        self.port = free_port()
        self.metrics_port = free_port()
        self.client_ttl_s = client_ttl_s
        self.lease_ttl_ms = lease_ttl_ms
        self.dir = tempfile.mkdtemp(prefix="sc-mooncake-")
        self.log_path = os.path.join(self.dir, "master.log")
        self.proc: Optional[subprocess.Popen] = None
        if start:
            self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def start(self) -> "MooncakeMaster":
        require_loopback_namespace("mooncake_master")
        cmd = master_command(port=self.port, metrics_port=self.metrics_port,
                             client_ttl_s=self.client_ttl_s, lease_ttl_ms=self.lease_ttl_ms)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        wait_listening(self.port, self.proc, "mooncake_master", self.log_path)
        return self

    def kill(self) -> None:
        """SIGKILL: the master vanishes mid-run (every object's metadata is lost)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "MooncakeMaster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SegmentHolder:
    """A ``mooncake_client`` daemon: a long-lived process that contributes ``segment_bytes`` of
    memory to the store, so objects outlive the engines (clients with no segment of their own)."""

    def __init__(self, master: MooncakeMaster, segment_bytes: int = 256 << 20):
        require_loopback_namespace("mooncake_client")
        self.port = free_port()
        self.log_path = os.path.join(master.dir, f"holder-{self.port}.log")
        cmd, env = holder_command(master.address, segment_bytes=segment_bytes, port=self.port)
        env["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        wait_holder_ready(self.port, master.metrics_address, self.proc, self.log_path)

    def kill(self) -> None:
        """SIGKILL: its segment (and every object in it) goes with it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> "SegmentHolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raw_store(master: MooncakeMaster, segment_bytes: int = 0, buffer_bytes: int = 64 << 20):
    """A plain ``MooncakeDistributedStore`` set up against ``master`` (to corrupt or read values
    behind the tier's back, and for the raw baseline of the benchmark)."""
    require_loopback_namespace("a Mooncake client")
    os.environ["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
    from mooncake.store import MooncakeDistributedStore
    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", "P2PHANDSHAKE", segment_bytes, buffer_bytes, "tcp", "",
                     master.address)
    if rc != 0:
        raise MooncakeHarnessError(f"MooncakeDistributedStore.setup against {master.address} "
                                   f"returned {rc}")
    return store

