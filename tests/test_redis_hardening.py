"""Redis tier against hostile servers: one deadline bounds a whole call, protocol garbage
is a counted fault and a miss, and credentials refused by a server that came up after
start-up are logged once as an authentication failure and shown by ``stratacache inspect``.

The misbehaving servers are real sockets on 127.0.0.1 written here: they answer the
start-up probe (PING, EXISTS, INFO) like Redis, then misbehave on GET.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import torch
import yaml

from stratacache.backends.redis import RedisTier
from stratacache.config import load_config
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine
from tests.redis_server import RedisServer, free_port

OP_TIMEOUT = 0.3
BOUND = 3 * OP_TIMEOUT + 1.0    # generous: the old per-recv timeout held a call for minutes
TRICKLE_S = 0.24                 # one byte this often: always just inside op_timeout_s
GIVE_UP_S = 12.0                 # the fake server stops trickling, so old code fails, not hangs


class FakeRedis:
    """A TCP server that speaks just enough RESP to pass the start-up probe; ``get_reply``
    decides what a GET gets: ``"trickle"`` (a 1 MiB bulk header, then one byte every
    TRICKLE_S) or raw bytes sent as they are."""

    def __init__(self, get_reply):
        self.get_reply = get_reply
        self.gets = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _commands(buf: bytearray):
        """Complete RESP arrays at the front of ``buf`` (consumed), as lists of bytes."""
        while True:
            if not buf.startswith(b"*"):
                return
            end = buf.find(b"\r\n")
            if end < 0:
                return
            n, pos, args = int(buf[1:end]), end + 2, []
            for _ in range(n):
                e = buf.find(b"\r\n", pos)
                if e < 0:
                    return
                size = int(buf[pos + 1:e])
                if len(buf) < e + 2 + size + 2:
                    return
                args.append(bytes(buf[e + 2:e + 2 + size]))
                pos = e + 2 + size + 2
            del buf[:pos]
            yield args

    def _serve(self, conn):
        buf = bytearray()
        with conn:
            while not self.stop.is_set():
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                try:
                    for args in list(self._commands(buf)):
                        if not self._answer(conn, args[0].upper()):
                            return
                except OSError:        # the client gave up on a reply and closed
                    return

    def _answer(self, conn, cmd: bytes) -> bool:
        if cmd == b"PING":
            conn.sendall(b"+PONG\r\n")
        elif cmd == b"EXISTS":
            conn.sendall(b":0\r\n")
        elif cmd == b"INFO":
            body = b"# Memory\r\nused_memory:1000\r\nmaxmemory:0\r\n"
            conn.sendall(b"$%d\r\n%s\r\n" % (len(body), body))
        elif cmd == b"GET":
            self.gets += 1
            if self.get_reply != "trickle":
                conn.sendall(self.get_reply)
                return True
            conn.sendall(b"$1048600\r\n")
            t_end = time.monotonic() + GIVE_UP_S
            while time.monotonic() < t_end and not self.stop.is_set():
                time.sleep(TRICKLE_S)
                try:
                    conn.sendall(b"\x00")
                except OSError:
                    return False       # the client gave up and closed: what we want
            return False
        else:                          # CLIENT SETINFO and the like
            conn.sendall(b"+OK\r\n")
        return True

    def close(self):
        self.stop.set()
        self.sock.close()


def engine_on(url: str, **redis_kw) -> StorageEngine:
    cfg = load_config(overrides={"tiers": {
        "cpu": {"enabled": False}, "shared": {"enabled": False}, "disk": {"enabled": False},
        "redis": {"enabled": True, "url": url, "op_timeout_s": OP_TIMEOUT,
                  "connect_timeout_s": 0.5, **redis_kw}}})
    return StorageEngine(cfg)


def K(i: int) -> ArtifactKey:
    return ArtifactKey("kv", "hostile", f"k{i}")


@pytest.fixture
def trickler():
    srv = FakeRedis("trickle")
    yield srv
    srv.close()


def test_trickling_server_cannot_hold_a_load_past_the_timeout(trickler):
    eng = engine_on(trickler.url, retry_backoff_s=0.0, retry_backoff_max_s=0.0)
    try:
        for out in (None, torch.empty(2 << 20, dtype=torch.uint8)):
            t0 = time.monotonic()
            assert eng.load(K(1), out=out) is None
            took = time.monotonic() - t0
            assert took < BOUND, f"load held {took:.2f}s with op_timeout_s={OP_TIMEOUT}"
        st = eng.stats()["tiers"]["redis"]
        assert st["detail"]["timeouts"] >= 2 and st["errors"] >= 2
        assert trickler.gets >= 2
    finally:
        eng.close()


def test_trickling_server_cannot_hold_a_batch_past_the_timeout(trickler):
    """Eight keys, one pipeline: the deadline is the batch's, not each key's."""
    eng = engine_on(trickler.url, retry_backoff_s=0.0, retry_backoff_max_s=0.0)
    try:
        outs = [torch.empty(2 << 20, dtype=torch.uint8) for _ in range(8)]
        t0 = time.monotonic()
        assert eng.load_many([K(i) for i in range(8)], outs=outs) == [None] * 8
        took = time.monotonic() - t0
        assert took < BOUND, f"load_many held {took:.2f}s with op_timeout_s={OP_TIMEOUT}"
    finally:
        eng.close()


@pytest.mark.parametrize("garbage", [b"$abc\r\n", b"$12x\r\nAAAA\r\n", b":nope\r\n"])
def test_malformed_bulk_length_is_a_counted_fault_and_a_miss(garbage):
    srv = FakeRedis(garbage)
    eng = engine_on(srv.url, retry_backoff_s=0.0, retry_backoff_max_s=0.0)
    try:
        out = torch.empty(1 << 16, dtype=torch.uint8)
        assert eng.load(K(1), out=out) is None
        assert eng.load(K(2)) is None
        outs = [torch.empty(1 << 16, dtype=torch.uint8) for _ in range(3)]
        assert eng.load_many([K(3), K(4), K(5)], outs=outs) == [None] * 3
        st = eng.stats()
        assert st["tiers"]["redis"]["errors"] >= 3
        assert st["engine"]["misses"] == 5 and st["engine"]["hits"] == 0
    finally:
        eng.close()
        srv.close()


# -- credentials refused by a server that came up after start-up -----------------------

def _wait_for(pred, timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_one_refusal_is_logged_once_whichever_path_read_it(caplog):
    """The tier's own RESP reader keeps a reply's NOAUTH word, redis-py's parser drops it
    (INFO, SCAN, DBSIZE go through redis-py): the same refusal is still one ERROR line."""
    srv = FakeRedis(b"$-1\r\n")
    tier = RedisTier(srv.url, retry_backoff_s=0.0, retry_backoff_max_s=0.0)
    caplog.set_level(logging.INFO, logger="stratacache.backends.redis")
    try:
        for text in ("NOAUTH Authentication required.", "Authentication required.",
                     "NOAUTH Authentication required."):
            tier._fault(tier._health, redis.AuthenticationError(text))
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "(Authentication required.)" in errors[0], errors
        detail = tier.stats()["detail"]
        assert detail["auth_failures"] >= 3 and "tiers.redis.password" in detail["auth_error"]
    finally:
        tier.close()
        srv.close()


@pytest.mark.parametrize("client_password", [None, "wrong-password"])
def test_server_up_later_requiring_a_password_is_an_auth_error_logged_once(
        client_password, caplog, tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    kw = dict(retry_backoff_s=0.02, retry_backoff_max_s=0.05, connect_timeout_s=0.2)
    if client_password:
        kw["password"] = client_password
    caplog.set_level(logging.INFO, logger="stratacache.backends.redis")
    eng = engine_on(url, **kw)                   # nothing listens yet: a fault, not an error
    srv = None
    try:
        payload = torch.randint(0, 256, (4096,), dtype=torch.uint8)
        assert eng.store(K(0), payload) is False
        srv = RedisServer(port=port, password="s3cret-pw")
        assert _wait_for(lambda: (eng.store(K(1), payload) or True)
                         and eng.stats()["tiers"]["redis"]["detail"]["auth_error"]), \
            "the refused credentials were never reported in stats()['detail']['auth_error']"
        for i in range(40):                      # keep trying across many back-offs
            assert eng.store(K(i), payload) is False
            assert eng.load(K(i)) is None
            time.sleep(0.01)
        st = eng.stats()["tiers"]["redis"]["detail"]
        assert st["healthy"] is False and "authentication" in st["auth_error"]
        assert "tiers.redis.password" in st["auth_error"] and "s3cret" not in st["auth_error"]
        auth_logs = [r for r in caplog.records
                     if r.levelno >= logging.ERROR and "authentication" in r.getMessage()]
        assert len(auth_logs) == 1, [r.getMessage() for r in caplog.records]

        config = tmp_path / "c.yaml"
        redis_section = {"enabled": True, "url": url, "connect_timeout_s": 0.5}
        if client_password:
            redis_section["password"] = client_password
        config.write_text(yaml.safe_dump({"tiers": {"redis": redis_section}}))
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        res = subprocess.run([sys.executable, "-m", "stratacache.cli", "inspect", "--config",
                              str(config), "--tier", "redis", "--json"],
                             capture_output=True, text=True, timeout=60, env=env, cwd=root)
        assert res.returncode != 0
        report = json.loads(res.stdout)["tiers"][0]
        assert report["state"] == "error" and "authentication" in report["error"]
        assert "tiers.redis.password" in report["error"] and "s3cret" not in report["error"]

        # The right password (a new engine, as after a config fix) works at once.
        good = engine_on(url, password="s3cret-pw")
        try:
            assert good.store(K(99), payload) and torch.equal(good.load(K(99)).data, payload)
        finally:
            good.close()
    finally:
        eng.close()
        if srv is not None:
            srv.close()
