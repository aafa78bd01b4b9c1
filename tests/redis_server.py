"""Real redis-server processes for tests and benchmarks.

Each server listens on 127.0.0.1 at a free port, persists nothing
(``--save '' --appendonly no``), keeps its files in a private temp dir, and is
stopped by PID. If ``redis-server`` cannot be found or does not come up, this
raises ``RedisServerError``: tests that need Redis fail, they never skip.

    with RedisServer(password="pw", maxmemory="4mb") as srv:
        srv.url, srv.port, srv.client()
        srv.kill(); srv.start()          # same port, empty data set
        srv.pause(); srv.resume()        # SIGSTOP / SIGCONT: a server that hangs
    with RedisCluster(3) as cl:          # cluster mode, all 16384 slots covered
        cl.url                           # a seed node

plus ``random_chunks`` / ``tier_items``: test payloads shared by the Redis tests, and
``commands_run_by``: which commands the server ran for one call (INFO commandstats).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional, Sequence

import random
from collections import Counter

import redis
import torch

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
START_TIMEOUT_S = 15.0


class RedisServerError(RuntimeError):
    """redis-server could not be started or stopped."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(bus: bool = False) -> int:
    """A port free on 127.0.0.1 now; with ``bus`` also port+10000 (cluster bus)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus or (port + 10000 < 65536 and _port_free(port + 10000)):
            return port
    raise RedisServerError("no free port pair found for a cluster node")


class RedisServer:
    """One redis-server process on 127.0.0.1 (see the module docstring)."""

    def __init__(self, *, password: Optional[str] = None,
                 users: Sequence[str] = (),
                 maxmemory: Optional[str] = None, maxmemory_policy: str = "allkeys-lru",
                 cluster: bool = False,
                 tls: Optional[dict] = None,
                 extra_args: Sequence[str] = (),
                 port: Optional[int] = None,
                 start: bool = True):
        """``users``: ACL rules, e.g. ``"alice on >secret ~* +@all"``.
        ``tls``: ``{"cert": path, "key": path, "ca": path}`` serves TLS only."""
        if not os.path.exists(REDIS_SERVER):
            raise RedisServerError(f"redis-server not found (looked for {REDIS_SERVER}); "
                                   "install the Debian package redis-server (./dev setup)")
        self.password = password
        self.users = list(users)
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.cluster = cluster
        self.tls = tls
        self.extra_args = list(extra_args)
        self.port = port or free_port(bus=cluster)
        self.dir: Optional[str] = None      # made by start(), removed by close()
        self.proc: Optional[subprocess.Popen] = None
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # -- lifecycle ---------------------------------------------------------
    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "redis.log")

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        argv = [REDIS_SERVER, "--bind", "127.0.0.1", "--protected-mode", "yes",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", self.dir, "--logfile", self.log_path,
                "--dbfilename", "unused.rdb"]
        if self.tls:
            argv += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", self.tls["cert"], "--tls-key-file", self.tls["key"],
                     "--tls-ca-cert-file", self.tls["ca"],
                     "--tls-auth-clients", "optional" if not self.tls.get("require_client_cert")
                     else "yes"]
        else:
            argv += ["--port", str(self.port)]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        for rule in self.users:
            argv += ["--user", *rule.split()]
        if self.maxmemory:
            argv += ["--maxmemory", str(self.maxmemory),
                     "--maxmemory-policy", self.maxmemory_policy,
                     "--maxmemory-samples", "10"]
        if self.cluster:
            argv += ["--cluster-enabled", "yes",
                     "--cluster-config-file", os.path.join(self.dir, "nodes.conf"),
                     "--cluster-node-timeout", "2000"]
        return argv + self.extra_args

    def start(self) -> "RedisServer":
        """Start (or restart after ``kill``/``stop``) on the same port; waits for PING."""
        if self.proc and self.proc.poll() is None:
            return self
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="sc-redis-test-")
        self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RedisServerError(
                    f"redis-server exited with code {self.proc.returncode} on port {self.port}: "
                    f"{err.strip()} {self._log_tail()}")
            try:
                self.admin_client(socket_timeout=1.0).ping()
                return self
            except redis.AuthenticationError:
                return self
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                last = exc
                time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server on port {self.port} did not answer PING within "
                               f"{START_TIMEOUT_S}s: {last} {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path) as f:
                return "| log: " + " / ".join(f.read().splitlines()[-5:])
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RedisServerError(f"redis-server on port {self.port} is not running")
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL by PID: the server vanishes mid-run (its data is lost)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the server still accepts TCP connections but never answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()

    def close(self) -> None:
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- clients -----------------------------------------------------------
    def admin_client(self, **kw) -> redis.Redis:
        """A client with full rights (the default user's password) for test set-up."""
        kw.setdefault("socket_timeout", 5.0)
        if self.tls:
            kw.setdefault("ssl_ca_certs", self.tls["ca"])
            kw.setdefault("ssl_certfile", self.tls.get("cert"))
            kw.setdefault("ssl_keyfile", self.tls.get("key"))
        return redis.Redis.from_url(self.url, password=self.password, **kw)


class RedisCluster:
    """``n`` cluster-mode servers on loopback joined by ``redis-cli --cluster create``."""

    def __init__(self, n: int = 3, **server_kw):
        if n < 3:
            raise RedisServerError("a Redis cluster needs at least 3 primaries")
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(n):
                self.nodes.append(RedisServer(cluster=True, **server_kw))
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        addrs = [f"127.0.0.1:{s.port}" for s in self.nodes]
        cmd = [REDIS_CLI, "--cluster", "create", *addrs, "--cluster-replicas", "0",
               "--cluster-yes"]
        if self.nodes[0].password:
            cmd += ["-a", self.nodes[0].password, "--no-auth-warning"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RedisServerError(f"redis-cli --cluster create failed: {res.stdout} {res.stderr}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            infos = [s.admin_client().execute_command("CLUSTER INFO") for s in self.nodes]
            if all(_cluster_ok(i) for i in infos):
                return
            time.sleep(0.05)
        raise RedisServerError(f"cluster on {addrs} did not reach cluster_state:ok")

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.nodes]

    def close(self) -> None:
        for s in self.nodes:
            s.close()

    def __enter__(self) -> "RedisCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cluster_ok(info) -> bool:
    if isinstance(info, bytes):
        info = info.decode()
    if isinstance(info, str):
        return "cluster_state:ok" in info
    return info.get("cluster_state") == "ok"


def make_tls_files(directory: str) -> dict:
    """A self-signed CA and a server certificate for 127.0.0.1, made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RedisServerError("openssl not found; it is needed to make test TLS certificates")
    p = {name: os.path.join(directory, name) for name in
         ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "ext.cnf")}
    with open(p["ext.cnf"], "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=stratacache-test-ca", "-keyout", p["ca.key"], "-out", p["ca.crt"]],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", p["server.key"], "-out", p["server.csr"]],
        [openssl, "x509", "-req", "-in", p["server.csr"], "-CA", p["ca.crt"],
         "-CAkey", p["ca.key"], "-CAcreateserial", "-days", "2",
         "-extfile", p["ext.cnf"], "-out", p["server.crt"]],
    ]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RedisServerError(f"{' '.join(cmd[:3])} failed: {res.stderr}")
    return {"ca": p["ca.crt"], "cert": p["server.crt"], "key": p["server.key"]}


def random_chunks(seed: int, n: int) -> list:
    """Deterministic random (ArtifactKey, tensor) pairs of mixed dtypes and shapes, so
    another process can rebuild exactly what one process stored."""
    from stratacache.core.keys import ArtifactKey

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        dtype = rng.choice([torch.uint8, torch.bfloat16, torch.float32, torch.int32])
        shape = (rng.randint(1, 64), rng.randint(1, 2048))
        out.append((ArtifactKey("kv", f"llama-{seed}", f"{i:04d}"),
                    torch.randint(-50, 50, shape, generator=g).to(dtype)))
    return out


def tier_items(pairs) -> list:
    """(key, flat bytes, ArtifactMeta) triples, as the engine hands them to a tier."""
    from stratacache.core.artifact import as_bytes, meta_for
    from stratacache.ops import checksum64

    out = []
    for key, t in pairs:
        data = as_bytes(t)
        out.append((key, data, meta_for(t, checksum64(data))))
    return out


def _server_calls(admin: redis.Redis) -> Counter:
    """Calls per command the server has answered (INFO commandstats), without INFO itself."""
    stats = admin.info("commandstats")
    return Counter({name[len("cmdstat_"):]: v["calls"] for name, v in stats.items()
                    if name != "cmdstat_info"})


def commands_run_by(admin: redis.Redis, op):
    """(op(), {command: calls} the server ran meanwhile); nothing else may use the server."""
    before = _server_calls(admin)
    result = op()
    return result, dict(_server_calls(admin) - before)
