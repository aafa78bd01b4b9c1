"""RESP2 on redis-py's pooled connections: the only module that touches redis-py internals.

redis-py's own data path copies every value (hiredis packs each command into
one new buffer; replies are built as bytes from hiredis' read buffer), so GET,
SET, EXISTS and DEL are framed and parsed here instead: a payload goes from
tensor memory to ``sendall`` and from ``recv_into`` to its destination, and
the only copy is the kernel's. Everything else (PING, INFO, SCAN, STRLEN, the
cluster's slot discovery) goes through redis-py's public client.

What this module relies on in redis-py, checked in its source for 7.0 to 8.1
(the range ``requirements.txt`` pins): ``Connection._sock``, ``connect()``,
``disconnect()``; ``ConnectionPool.get_connection()`` without arguments,
``release()``, ``disconnect(inuse_connections=False)``, ``connection_kwargs``;
and, for a cluster, ``RedisCluster.get_node_from_key``,
``nodes_manager.initialize()`` / ``nodes_cache`` and
``ClusterNode.redis_connection`` / ``name``. (5.x and 6.x lack
``BlockingConnectionPool.disconnect(inuse_connections=...)``.)
"""

from __future__ import annotations

import re
import ssl
import time
from typing import Callable, Iterable
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# Server faults: the server (or cluster primary) backs off; its keys are misses until a probe succeeds.
FAULTS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError,
          redis.exceptions.RedisClusterException, OSError)
_AUTH_WORDS = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid username-password")
_AUTH_REPLIES = (b"WRONGPASS", b"NOAUTH", b"NOPERM")
_SERVER_DOWN_REPLIES = (b"CLUSTERDOWN", b"LOADING", b"MASTERDOWN", b"TRYAGAIN", b"BUSY")
_SEND_COALESCE = 64 * 1024


# -- clients ---------------------------------------------------------------------------

def client_options(*, username, password, tls_ca_file, tls_cert_file, tls_key_file,
                   connect_timeout_s: float, op_timeout_s: float, max_connections: int) -> dict:
    """redis-py options: no retries of its own (the tier backs off), RESP2 (what we parse)."""
    return dict(username=username, password=password,
                socket_connect_timeout=connect_timeout_s, socket_timeout=op_timeout_s,
                max_connections=max_connections, retry=Retry(NoBackoff(), 0),
                health_check_interval=0, decode_responses=False, protocol=2,
                ssl_ca_certs=tls_ca_file, ssl_certfile=tls_cert_file,
                ssl_keyfile=tls_key_file, ssl_cert_reqs="required")


def make_client(url: str, cluster: bool, tls: bool, opts: dict):
    """A client whose pools block (up to op_timeout_s) when all connections are busy.
    A cluster client discovers the slot map when it is made, so this can fail like a request."""
    seeds = [u.strip() for u in url.split(",")] if cluster else [url]
    if tls:
        seeds = ["rediss://" + u[len("redis://"):] if u.startswith("redis://") else u
                 for u in seeds]
    else:
        opts = {k: v for k, v in opts.items() if not k.startswith("ssl_")}
    opts = dict(opts, timeout=opts["socket_timeout"])
    if not cluster:
        return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(seeds[0], **opts))
    others = [redis.cluster.ClusterNode(urlsplit(u).hostname, urlsplit(u).port or 6379)
              for u in seeds[1:]]
    return redis.RedisCluster(url=seeds[0], startup_nodes=others or None,
                              connection_pool_class=redis.BlockingConnectionPool,
                              require_full_coverage=True, **opts)


def server_pool(client):
    """The connection pool of a single-server client."""
    return client.connection_pool


def refresh_slots(client) -> None:
    """Re-read the cluster's slot map (after MOVED / ASK or a fault)."""
    client.nodes_manager.initialize()


def primary_of(client, rkey: bytes):
    """(name "host:port", connection pool) of the cluster primary that owns ``rkey``'s slot."""
    node = client.get_node_from_key(rkey)
    return node.name, node.redis_connection.connection_pool


def cluster_pools(client) -> list:
    return [n.redis_connection.connection_pool for n in client.nodes_manager.nodes_cache.values()
            if n.redis_connection is not None]


def drop_idle(pool) -> None:
    """Close a pool's idle sockets, so a restarted server is not met with stale ones."""
    pool.disconnect(inuse_connections=False)


def where(pool) -> str:
    return f"{pool.connection_kwargs.get('host')}:{pool.connection_kwargs.get('port')}"


# -- one pipelined exchange ----------------------------------------------------------------

def exchange(pool, deadline: float, chunks: Iterable, read: Callable[["RespReader"], None],
             op_timeout_s: float) -> None:
    """Send ``chunks`` on one pooled connection, then ``read(reader)`` the replies, all
    within ``deadline``. A connection that failed mid-reply is dropped, never reused."""
    conn = pool.get_connection()
    try:
        io = DeadlineSocket(conn, deadline)
        for chunk in coalesce(chunks):
            io.send(chunk)
        read(RespReader(io))
    except BaseException:
        conn.disconnect()
        raise
    finally:
        if conn._sock is not None:   # back to redis-py's own per-operation timeout
            conn._sock.settimeout(op_timeout_s)
        pool.release(conn)


def bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def bulk_array(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


def coalesce(chunks) -> list:
    """Join small chunks so a pipeline is a few sendall calls; large ones pass as they are."""
    out: list = []
    small = bytearray()
    for c in chunks:
        if len(c) < _SEND_COALESCE:
            small += c
            continue
        if small:
            out.append(bytes(small))
            small.clear()
        out.append(c)
    if small:
        out.append(bytes(small))
    return out


class DeadlineSocket:
    """A connection's socket where every send and receive of one call shares one deadline.

    A per-``recv`` timeout alone lets a server that trickles one byte just inside it hold
    a call for as long as it likes; here each socket operation gets only the time left.
    """

    __slots__ = ("sock", "deadline")
    _SEND_SLICE = 1 << 18   # a TLS socket times each send, so large payloads go in slices

    def __init__(self, conn, deadline: float):
        if conn._sock is None:
            conn.connect()
        self.sock = conn._sock
        self.deadline = deadline

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise redis.TimeoutError("redis call ran past tiers.redis.op_timeout_s")
        self.sock.settimeout(left)

    def send(self, chunk) -> None:
        view = memoryview(chunk).cast("B")
        try:
            for lo in range(0, len(view), self._SEND_SLICE):
                self._arm()
                self.sock.sendall(view[lo:lo + self._SEND_SLICE])
        except TimeoutError:
            raise redis.TimeoutError("redis call ran past tiers.redis.op_timeout_s "
                                     "while sending") from None
        except OSError as exc:
            raise redis.ConnectionError(f"error writing to redis: {exc}") from None

    def recv_into(self, view: memoryview) -> int:
        self._arm()
        try:
            n = self.sock.recv_into(view)
        except TimeoutError:
            raise redis.TimeoutError("redis call ran past tiers.redis.op_timeout_s "
                                     "while reading") from None
        except OSError as exc:
            raise redis.ConnectionError(f"error reading from redis: {exc}") from None
        if n == 0:
            raise redis.ConnectionError("connection closed by the redis server")
        return n


class RespReader:
    """Reads RESP replies from a connection's socket, bulk values straight into caller memory.

    Used only on a connection whose earlier replies were all consumed (redis-py's own
    parser holds nothing), and the connection is dropped on any error mid-reply.
    """

    __slots__ = ("io", "buf", "mv", "lo", "hi")

    def __init__(self, io: DeadlineSocket):
        self.io = io
        self.buf = bytearray(64 * 1024)
        self.mv = memoryview(self.buf)
        self.lo = self.hi = 0

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.lo, self.hi)
            if end >= 0:
                line = bytes(self.mv[self.lo:end])
                self.lo = end + 2
                return line
            if self.lo:                       # make room at the end of the buffer
                self.buf[:self.hi - self.lo] = self.mv[self.lo:self.hi]
                self.hi -= self.lo
                self.lo = 0
            if self.hi == len(self.buf):
                raise redis.ConnectionError("reply line longer than 64 KiB")
            self.hi += self.io.recv_into(self.mv[self.hi:])

    def into(self, view: memoryview) -> None:
        """Fill ``view`` exactly: buffered bytes first, then directly from the socket."""
        have = min(len(view), self.hi - self.lo)
        view[:have] = self.mv[self.lo:self.lo + have]
        self.lo += have
        pos = have
        while pos < len(view):
            pos += self.io.recv_into(view[pos:])

    def skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n > 0:
            step = min(n, len(scratch))
            self.into(scratch[:step])
            n -= step

    def crlf(self) -> None:
        if self.line() != b"":
            raise redis.ConnectionError("malformed bulk reply (no CRLF after the value)")

    def integer(self, line: bytes, op: str) -> int:
        """The integer of a ``:n`` or ``$n`` reply line; garbage is a protocol fault."""
        try:
            return int(line[1:])
        except ValueError:
            raise redis.ConnectionError(f"malformed reply to {op}: {line[:80]!r}") from None


# -- what a reply or an exception means ---------------------------------------------------

def error_reply_kind(err: bytes) -> str:
    """What an error reply (without its ``-``) means for the tier:
    "auth" (credentials refused), "moved" (MOVED / ASK: the slot map is stale),
    "down" (the server cannot serve now), "full" (OOM under noeviction) or "other"."""
    word = err.split(b" ", 1)[0]
    if word in _AUTH_REPLIES:
        return "auth"
    if word in (b"MOVED", b"ASK"):
        return "moved"
    if word in _SERVER_DOWN_REPLIES:
        return "down"
    return "full" if word == b"OOM" else "other"


def is_tls_failure(exc: BaseException) -> bool:
    """A TLS handshake was refused (certificate, protocol): a set-up error, not an outage."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ssl.SSLError) or "[SSL" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def is_auth_failure(exc: BaseException) -> bool:
    return isinstance(exc, (redis.AuthenticationError, redis.exceptions.NoPermissionError)) or \
        any(w in str(exc) for w in _AUTH_WORDS)


def auth_reason(exc: BaseException) -> str:
    """The server's reason for refusing credentials, the same whichever path read the reply
    (redis-py drops the leading NOAUTH / WRONGPASS / NOPERM; a raw reply keeps it)."""
    text = str(exc)
    word, _, rest = text.partition(" ")
    return rest if word.encode() in _AUTH_REPLIES and rest else text


def redact(url: str) -> str:
    """The URL without its password, for messages and stats."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def scan_pattern(prefix: bytes) -> bytes:
    """A SCAN MATCH pattern for keys starting with ``prefix`` (glob characters escaped)."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", prefix) + b"*"

