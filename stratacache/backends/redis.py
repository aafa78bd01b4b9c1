"""The remote tier: Redis or Redis Cluster (Valkey speaks the same protocol).

Many hosts point at one Redis deployment, so a chunk computed on one host can
be loaded on every other. Each object is one Redis string under
``key_prefix + ArtifactKey.encode()`` whose value is ``ArtifactMeta.pack(key.encode())``
followed by the payload bytes. Nothing is pickled.

A remote tier must never slow the caller beyond its timeout or raise into the
engine, so server faults (refused, reset, timed out, cluster down) are counted
and mark the tier unhealthy. While unhealthy every operation answers at once
(miss / not stored) without touching the network; after a back-off that
doubles from ``retry_backoff_s`` up to ``retry_backoff_max_s``, one caller
probes the server with its real request and the tier recovers on success.
In a cluster each primary has its own health, so one dead primary costs only
the keys it holds. Configuration mistakes that Redis reports at start-up (wrong password, unknown
user, TLS certificate rejected) are raised by the constructor as
``RedisTierConfigError`` naming the problem.

Copies on the data path: GET and SET are framed and parsed here (RESP2) on
redis-py's pooled connections, because redis-py's own path copies every value
(hiredis packs each command into one new buffer; replies are built as bytes from
hiredis' read buffer). ``put`` frames the header and the payload as one bulk
string and hands the payload's memory to ``sendall`` (no user-space copy);
``get`` reads the header, then ``recv_into`` the destination (``out`` when
given, else a new tensor) directly, so the only copy is the kernel's; each
payload's checksum is checked there after the round trip. EXISTS and DEL are
framed the same way (one code path for routing and faults); SCAN, STRLEN and
INFO go through redis-py.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections import Counter
from typing import Iterator, Optional, Sequence
from urllib.parse import urlsplit

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from stratacache.config.schema import redis_url_problem
from stratacache.core.artifact import Artifact, ArtifactMeta, CorruptArtifact
from stratacache.core.keys import ArtifactKey
from stratacache.ops import checksum64
from stratacache.telemetry.metrics import TierCounters

log = logging.getLogger(__name__)

# Largest header ArtifactMeta.pack(key) writes (16 dims): get reads this much (or the
# whole value if shorter) before it knows where the payload starts.
_MAX_HEADER = ArtifactMeta.header_size(16)

# Server faults: the server (or cluster primary) backs off; its keys are misses until a probe succeeds.
_FAULTS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError,
           redis.exceptions.RedisClusterException, OSError)
_AUTH_WORDS = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid username-password")
_AUTH_REPLIES = (b"WRONGPASS", b"NOAUTH", b"NOPERM")


class RedisTierConfigError(ValueError):
    """The Redis tier cannot work as configured (bad credentials, TLS files, URL)."""


class _Backoff:
    """Health of one server: after a fault, callers are turned away until a back-off
    (doubling from ``lo`` up to ``hi``) has passed; then one caller probes."""

    __slots__ = ("lo", "hi", "delay", "retry_at", "healthy", "probing", "lock")

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi, self.delay = lo, hi, lo
        self.retry_at = 0.0
        self.healthy = True
        self.probing = False
        self.lock = threading.Lock()

    def admit(self) -> bool:
        if self.healthy:
            return True
        with self.lock:
            if self.healthy:
                return True
            if self.probing or time.monotonic() < self.retry_at:
                return False
            self.probing = True
            return True

    def ok(self) -> bool:
        """Record a success; True when this ends an outage."""
        if self.healthy:
            return False
        with self.lock:
            recovered = not self.healthy
            self.healthy, self.probing, self.delay = True, False, self.lo
            return recovered

    def abandon(self) -> None:
        """The probe ended without an answer either way (a caller error): let another try."""
        self.probing = False

    def fault(self) -> tuple[bool, float]:
        """Record a fault; (was it healthy until now, seconds until the next probe)."""
        with self.lock:
            was_healthy = self.healthy
            if was_healthy:
                self.delay = self.lo
            self.healthy, self.probing = False, False
            self.retry_at = time.monotonic() + self.delay
            retry_in = self.delay
            self.delay = min(self.delay * 2 or self.lo, self.hi)
            return was_healthy, retry_in


class RedisMemoryLayer:
    """A MemoryLayer on Redis / Redis Cluster, shared by every host that uses it."""

    name = "redis"
    persistent = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *,
                 cluster: bool = False,
                 username: Optional[str] = None,
                 password: Optional[str] = None,
                 tls: bool = False,
                 tls_ca_file: Optional[str] = None,
                 tls_cert_file: Optional[str] = None,
                 tls_key_file: Optional[str] = None,
                 connect_timeout_s: float = 0.5,
                 op_timeout_s: float = 1.0,
                 ttl_s: Optional[float] = None,
                 max_connections: int = 16,
                 retry_backoff_s: float = 1.0,
                 retry_backoff_max_s: float = 30.0,
                 key_prefix: str = "sc:",
                 verify: bool = True):
        """``verify``: check each loaded payload against its stored checksum."""
        problem = redis_url_problem(url) if isinstance(url, str) else f"{url!r} is not a URL"
        if problem:
            raise RedisTierConfigError(f"tiers.redis.url: {problem}")
        if bool(tls_cert_file) != bool(tls_key_file):
            raise RedisTierConfigError("tiers.redis.tls_cert_file and tls_key_file must be "
                                       "given together (client certificate and its key)")
        if (tls_ca_file or tls_cert_file) and not (tls or url.startswith("rediss://")):
            raise RedisTierConfigError("tiers.redis.tls_ca_file/tls_cert_file are set but "
                                       "tls is false")
        if url.startswith("unix://") and (cluster or tls):
            raise RedisTierConfigError("tiers.redis.url: a unix:// socket cannot be used with "
                                       "tiers.redis.cluster or tiers.redis.tls")
        if retry_backoff_max_s < retry_backoff_s:
            raise RedisTierConfigError("tiers.redis.retry_backoff_max_s must be >= "
                                       "retry_backoff_s")
        self.url = url
        self.cluster = cluster
        self.ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self.key_prefix = key_prefix.encode("utf-8")
        self.verify = verify
        self.op_timeout_s = op_timeout_s
        self.auth_error: Optional[str] = None   # set while the server refuses our credentials
        self.on_evict = None
        self.capacity_bytes = 0
        self._backoff_range = (retry_backoff_s, retry_backoff_max_s)
        # The client and (in a cluster) the slot map; for a single server, the server.
        self._health = _Backoff(*self._backoff_range)
        self._node_health: dict[str, _Backoff] = {}   # cluster primaries, by "host:port"
        self._refresh_topology = False
        self._client_lock = threading.Lock()
        self.counters = TierCounters(self.name)
        self._extra = Counter()   # redis-only counters: fast_misses, timeouts, recoveries
        self._extra_lock = threading.Lock()

        tls = tls or url.startswith("rediss://")
        opts = dict(username=username, password=password,
                    socket_connect_timeout=connect_timeout_s, socket_timeout=op_timeout_s,
                    max_connections=max_connections, retry=Retry(NoBackoff(), 0),
                    health_check_interval=0, decode_responses=False,
                    protocol=2)   # RESP2: the reply framing _RespReader parses
        opts.update(ssl_ca_certs=tls_ca_file, ssl_certfile=tls_cert_file,
                    ssl_keyfile=tls_key_file, ssl_cert_reqs="required")
        self._client_args = (url, cluster, tls, opts)
        self._client_obj = None
        self._probe_startup()

    @classmethod
    def from_config(cls, tier_cfg, cfg) -> "RedisMemoryLayer":
        return cls(tier_cfg.url, cluster=tier_cfg.cluster, username=tier_cfg.username,
                   password=tier_cfg.password, tls=tier_cfg.tls,
                   tls_ca_file=tier_cfg.tls_ca_file, tls_cert_file=tier_cfg.tls_cert_file,
                   tls_key_file=tier_cfg.tls_key_file,
                   connect_timeout_s=tier_cfg.connect_timeout_s,
                   op_timeout_s=tier_cfg.op_timeout_s, ttl_s=tier_cfg.ttl_s,
                   max_connections=tier_cfg.max_connections,
                   retry_backoff_s=tier_cfg.retry_backoff_s,
                   retry_backoff_max_s=tier_cfg.retry_backoff_max_s,
                   key_prefix=tier_cfg.key_prefix)

    # -- connection set-up -------------------------------------------------
    @property
    def _client(self):
        """The redis-py client, made on first use: a cluster client discovers the slot map
        when it is made, so making it can fail like any request while the server is down."""
        if self._client_obj is None:
            with self._client_lock:
                if self._client_obj is None:
                    self._client_obj = self._make_client(*self._client_args)
        return self._client_obj

    @staticmethod
    def _make_client(url: str, cluster: bool, tls: bool, opts: dict):
        """A client whose pools block (up to op_timeout_s) when all connections are busy."""
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

    def _probe_startup(self) -> None:
        """PING now: bad credentials / TLS / ACL are errors; a server that is down is a fault."""
        try:
            self._client.ping()
            self._client.exists(self.key_prefix + b"\x1fstartup-probe")   # ACL may read the prefix?
            self._read_capacity()
        except redis.AuthenticationError as exc:
            raise RedisTierConfigError(
                f"tiers.redis: authentication to {_redact(self.url)} failed ({exc}); "
                "check tiers.redis.username and tiers.redis.password") from None
        except redis.ResponseError as exc:
            if isinstance(exc, redis.exceptions.NoPermissionError) or \
                    any(w in str(exc) for w in _AUTH_WORDS):
                raise RedisTierConfigError(
                    f"tiers.redis: {_redact(self.url)} refused the client ({exc}); "
                    "check tiers.redis.username / password and that the user's ACL allows "
                    f"keys under tiers.redis.key_prefix {self.key_prefix!r}") from None
            raise RedisTierConfigError(f"tiers.redis: {_redact(self.url)}: {exc}") from None
        except _FAULTS as exc:
            if _is_tls_failure(exc):
                raise RedisTierConfigError(
                    f"tiers.redis: TLS handshake with {_redact(self.url)} failed ({exc}); "
                    "check tiers.redis.tls and tls_ca_file / tls_cert_file / tls_key_file"
                ) from None
            self._fault(self._health, exc, " at start-up")

    def _read_capacity(self) -> None:
        """capacity_bytes: the server's maxmemory (summed over cluster primaries); 0 = no limit."""
        infos = self._client.info("memory")
        if self.cluster:
            infos = list(infos.values()) if isinstance(infos, dict) and "maxmemory" not in infos \
                else [infos]
        else:
            infos = [infos]
        self.capacity_bytes = sum(int(i.get("maxmemory", 0)) for i in infos)

    # -- health --------------------------------------------------------------
    def _count(self, name: str) -> None:
        with self._extra_lock:
            self._extra[name] += 1

    def _admit(self, health: "_Backoff") -> bool:
        """May this call use the network? False (and counted) while backing off."""
        if health.admit():
            return True
        self._count("fast_misses")
        return False

    def _ok(self, health: "_Backoff", what: str = "") -> None:
        if health.ok():
            log.info("redis tier: %s%s is back", _redact(self.url), what)
            self._count("recoveries")
            self.auth_error = None

    def _auth_failed(self, exc: BaseException, what: str = "") -> None:
        """The server (up, perhaps only since start-up) refuses our credentials: a
        configuration problem, logged as such once per distinct refusal, and kept in
        ``stats()["auth_error"]`` (shown by ``stratacache inspect``) until a call succeeds."""
        message = (f"authentication to {_redact(self.url)}{what} failed ({exc}); check "
                   "tiers.redis.username and tiers.redis.password")
        with self._extra_lock:
            first = self.auth_error != message
            self.auth_error = message
            self._extra["auth_failures"] += 1
        if first:
            log.error("redis tier: %s; serving misses and retrying with back-off", message)

    def _fault(self, health: "_Backoff", exc: BaseException, what: str = "",
               pool=None) -> None:
        """Count a server fault, back off, and drop idle sockets to that server."""
        self.counters.add("errors")
        if isinstance(exc, (redis.TimeoutError, TimeoutError)):
            self._count("timeouts")
        was_healthy, retry_in = health.fault()
        if _is_auth_failure(exc):
            self._auth_failed(exc, what)
        elif was_healthy:
            log.warning("redis tier: %s%s failed (%s: %s); serving misses, retry in %.2fs",
                        _redact(self.url), what, type(exc).__name__, exc, retry_in)
        if self.cluster:
            self._refresh_topology = True   # a failover may have moved the dead node's slots
        if pool is not None:
            pool.disconnect(inuse_connections=False)
        else:
            self._reset_connections()

    def _reset_connections(self) -> None:
        """Close idle pooled sockets so a restarted server is not met with stale ones."""
        if self._client_obj is None:
            return
        if self.cluster:
            pools = [n.redis_connection.connection_pool
                     for n in self._client.nodes_manager.nodes_cache.values()
                     if n.redis_connection is not None]
        else:
            pools = [self._client.connection_pool]
        for pool in pools:
            pool.disconnect(inuse_connections=False)

    def _remote(self, fn):
        """``fn()`` through redis-py, or _DOWN: at once while backing off (no network
        call), or after a fault (counted; the tier backs off)."""
        if not self._admit(self._health):
            return _DOWN
        try:
            result = fn()
        except _FAULTS as exc:
            self._fault(self._health, exc)
            return _DOWN
        except BaseException:
            self._health.abandon()
            raise
        self._ok(self._health)
        return result

    @property
    def healthy(self) -> bool:
        """No fault is being backed off from (the server, or every cluster primary)."""
        return self._health.healthy and all(h.healthy for h in list(self._node_health.values()))

    @property
    def verifies_checksums(self) -> bool:
        """Loads are checked here, so the engine need not check them again."""
        return self.verify

    # -- keys ---------------------------------------------------------------
    def _rkey(self, key: ArtifactKey) -> bytes:
        return self.key_prefix + key.encode()

    def _route(self, rkeys: Sequence[bytes]) -> list:
        """[(health, pool, indices of the keys that server holds)]: one server, or one
        group per cluster primary (the slot map is refreshed first when it went stale)."""
        if not self.cluster:
            return [(self._health, self._client.connection_pool, list(range(len(rkeys))))]
        client = self._client
        if self._refresh_topology:
            self._refresh_topology = False
            client.nodes_manager.initialize()
        groups: dict = {}
        for i, rk in enumerate(rkeys):
            node = client.get_node_from_key(rk)
            groups.setdefault(node.name, (node, []))[1].append(i)
        out = []
        for name, (node, idxs) in groups.items():
            health = self._node_health.get(name)
            if health is None:
                health = self._node_health.setdefault(name, _Backoff(*self._backoff_range))
            out.append((health, node.redis_connection.connection_pool, idxs))
        return out

    def _exchange(self, rkeys: Sequence[bytes], request, reply) -> list:
        """One pipelined round trip per server: send every ``request(i)``, then read each
        ``reply(i, reader)`` straight off the socket, in order. Keys on a server that is
        backing off or fails now come back as _DOWN; other servers' keys are unaffected."""
        results: list = [_DOWN] * len(rkeys)
        deadline = time.monotonic() + self.op_timeout_s
        if self.cluster:   # making the client and routing need the slot map
            routes = self._remote(lambda: self._route(rkeys))
            if routes is _DOWN:
                return results
        else:
            routes = self._route(rkeys)
        for health, pool, idxs in routes:
            if not self._admit(health):
                continue
            where = f" ({pool.connection_kwargs.get('host')}:" \
                    f"{pool.connection_kwargs.get('port')})" if self.cluster else ""
            if time.monotonic() >= deadline:   # an earlier server used the whole call's time
                self._count("deadline_skips")
                continue
            try:
                conn = pool.get_connection()
                try:
                    io = _DeadlineSocket(conn, deadline)
                    for chunk in _coalesce(c for i in idxs for c in request(i)):
                        io.send(chunk)
                    reader = _RespReader(io)
                    for i in idxs:
                        results[i] = reply(i, reader)
                except BaseException:
                    conn.disconnect()
                    raise
                finally:
                    _restore_timeout(conn, self.op_timeout_s)
                    pool.release(conn)
            except _FAULTS as exc:
                for i in idxs:
                    results[i] = _DOWN
                self._fault(health, exc, where, pool)
                continue
            except BaseException:
                health.abandon()
                raise
            self._ok(health, where)
        return results

    def _server_reply_error(self, err: bytes, op: str) -> None:
        """An error reply for one key: topology moves refresh the map, server-state
        errors are faults, anything else is counted and logged."""
        word = err.split(b" ", 1)[0]
        if word in _AUTH_REPLIES:   # e.g. the server came up later with requirepass
            raise redis.AuthenticationError(err.decode("utf-8", "replace"))
        if word in (b"MOVED", b"ASK"):
            self._refresh_topology = True
        elif word in (b"CLUSTERDOWN", b"LOADING", b"MASTERDOWN", b"TRYAGAIN", b"BUSY"):
            raise redis.ConnectionError(err.decode("utf-8", "replace"))
        elif word != b"OOM":   # OOM: full under noeviction, a plain "not stored"
            self.counters.add("errors")
            log.warning("redis tier: %s refused: %s", op, err.decode("utf-8", "replace"))

    # -- writes ---------------------------------------------------------------
    def put(self, key: ArtifactKey, data: torch.Tensor, meta: ArtifactMeta) -> bool:
        return self.put_many([(key, data, meta)])[0]

    def put_many(self, items: Sequence[tuple[ArtifactKey, torch.Tensor, ArtifactMeta]]
                 ) -> list[bool]:
        """SET (PX with ttl_s) every item in one pipeline; payloads go from tensor memory
        to the socket without a copy (header and payload are framed as one RESP value)."""
        if not items:
            return []
        for _, data, meta in items:
            _check_put(data, meta)
        rkeys = [self._rkey(k) for k, _, _ in items]
        ttl = b"" if self.ttl_ms is None else _bulk(b"PX") + _bulk(b"%d" % self.ttl_ms)
        nargs = 3 if self.ttl_ms is None else 5

        def request(i):
            key, data, meta = items[i]
            header = meta.pack(key.encode())
            head = (b"*%d\r\n" % nargs) + _bulk(b"SET") + _bulk(rkeys[i]) \
                + b"$%d\r\n" % (len(header) + meta.size) + header
            return (head, memoryview(data.numpy()), b"\r\n" + ttl) if meta.size \
                else (head, b"\r\n" + ttl)

        def reply(i, reader):
            line = reader.line()
            if line == b"+OK":
                return True
            if line[:1] != b"-":
                raise redis.ConnectionError(f"unexpected reply to SET: {line[:80]!r}")
            self._server_reply_error(line[1:], "SET")
            return False

        t0 = time.perf_counter()
        ok = [r is True for r in self._exchange(rkeys, request, reply)]
        stored = sum(m.size for (_, _, m), good in zip(items, ok) if good)
        self.counters.add_many(puts=sum(ok), put_failures=len(ok) - sum(ok), bytes_in=stored)
        self.counters.observe("put", time.perf_counter() - t0)
        return ok

    def delete(self, key: ArtifactKey) -> bool:
        n = self._integer_replies(b"DEL", [self._rkey(key)])[0]
        self.counters.add("deletes", n)
        return n > 0

    def _integer_replies(self, command: bytes, rkeys: Sequence[bytes]) -> list[int]:
        """``command key`` for each key, pipelined; 0 for a key whose server is down."""
        def request(i):
            return (_bulk_array(command, rkeys[i]),)

        def reply(i, reader):
            line = reader.line()
            if line[:1] == b":":
                return _reply_int(line, command.decode())
            if line[:1] != b"-":
                raise redis.ConnectionError(f"unexpected reply to {command.decode()}: "
                                            f"{line[:80]!r}")
            self._server_reply_error(line[1:], command.decode())
            return 0

        return [0 if r is _DOWN else r for r in self._exchange(rkeys, request, reply)]

    # -- reads ----------------------------------------------------------------
    def get(self, key: ArtifactKey, out: Optional[torch.Tensor] = None) -> Optional[Artifact]:
        return self.get_many([key], None if out is None else [out])[0]

    def get_many(self, keys: Sequence[ArtifactKey],
                 outs: Optional[Sequence[Optional[torch.Tensor]]] = None
                 ) -> list[Optional[Artifact]]:
        """GET every key in one pipeline; each payload is received from the socket
        straight into its destination (``outs[i]`` or a new tensor), then verified."""
        if not keys:
            return []
        if outs is not None and len(outs) != len(keys):
            raise ValueError(f"get_many: {len(outs)} outs for {len(keys)} keys")
        for o in outs or ():
            _check_out(o)
        rkeys = [self._rkey(k) for k in keys]
        too_small: list[str] = []

        def request(i):
            return (_bulk_array(b"GET", rkeys[i]),)

        def reply(i, reader):
            """-> Artifact (not yet verified), None (miss) or _CORRUPT."""
            line = reader.line()
            if line[:1] == b"-":
                if line.startswith(b"-WRONGTYPE"):   # someone else's key under our prefix
                    return _CORRUPT
                self._server_reply_error(line[1:], "GET")
                return None
            if line[:1] != b"$":
                raise redis.ConnectionError(f"unexpected reply to GET: {line[:80]!r}")
            n = _reply_int(line, "GET")
            if n < 0:
                return None
            head = bytearray(min(n, _MAX_HEADER))
            reader.into(memoryview(head))
            try:
                meta, hlen = ArtifactMeta.unpack(head, keys[i].encode())
                if n != hlen + meta.size:
                    raise CorruptArtifact(f"value is {n} bytes, header says {hlen}+{meta.size}")
            except CorruptArtifact:
                reader.skip(n - len(head))
                reader.crlf()
                return _CORRUPT
            out = outs[i] if outs is not None else None
            if out is not None and out.numel() < meta.size:
                too_small.append(f"out holds {out.numel()} bytes but {keys[i]} has {meta.size}")
                reader.skip(n - len(head))
                reader.crlf()
                return None
            dest = out[:meta.size] if out is not None else torch.empty(meta.size, dtype=torch.uint8)
            if meta.size:
                view = memoryview(dest.numpy())
                early = len(head) - hlen          # payload bytes read along with the header
                view[:early] = head[hlen:]
                reader.into(view[early:])
            reader.crlf()
            return Artifact(meta, dest)

        t0 = time.perf_counter()
        got = self._exchange(rkeys, request, reply)
        if too_small:
            raise ValueError("get: " + "; ".join(too_small))
        results, bad = [], []
        for key, rk, art in zip(keys, rkeys, got):
            # Verified after the round trip, so the connection is not held meanwhile.
            if isinstance(art, Artifact) and self.verify \
                    and checksum64(art.data) != art.meta.checksum:
                log.warning("redis tier: dropping %s: payload checksum mismatch", key)
                art = _CORRUPT
            if art is _CORRUPT:
                bad.append(rk)
            results.append(art if isinstance(art, Artifact) else None)
        hits = [a for a in results if a is not None]
        self.counters.add_many(hits=len(hits), misses=len(keys) - len(hits), corrupt=len(bad),
                               bytes_out=sum(a.meta.size for a in hits))
        self.counters.observe("get", time.perf_counter() - t0)
        if bad:
            self._delete_quietly(bad)
        return results

    def _delete_quietly(self, rkeys: list[bytes]) -> None:
        self._integer_replies(b"DEL", rkeys)

    def contains(self, key: ArtifactKey) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[ArtifactKey]) -> list[bool]:
        return self.contains_encoded([k.encode() for k in keys])

    def contains_encoded(self, encoded_keys: Sequence[bytes]) -> list[bool]:
        """EXISTS per key, pipelined (one reply each, also across cluster slots)."""
        if not encoded_keys:
            return []
        prefix = self.key_prefix
        return [n == 1 for n in self._integer_replies(b"EXISTS", [prefix + e for e in encoded_keys])]

    def pin(self, key: ArtifactKey, lease_s: Optional[float] = None) -> bool:
        """Reads always copy out of Redis, so no view can go stale: pinning only checks presence."""
        return self.contains(key)

    def unpin(self, key: ArtifactKey) -> None:
        return None

    # -- listing and accounting ----------------------------------------------
    def _scan(self) -> Iterator[bytes]:
        pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", self.key_prefix) + b"*"
        return self._client.scan_iter(match=pattern, count=1000)

    def keys(self) -> Iterator[ArtifactKey]:
        """Every well-formed key under key_prefix (SCAN: read-only, not a snapshot).
        Nothing while the tier is backing off (a listing is never the recovery probe)."""
        if not self._health.healthy:
            return
        n = len(self.key_prefix)
        try:
            for rk in self._scan():
                try:
                    yield ArtifactKey.decode(rk[n:])
                except ValueError:
                    continue
        except _FAULTS as exc:
            self._fault(self._health, exc)

    def used_bytes(self) -> int:
        """Server-side memory in use (INFO used_memory, summed over cluster primaries)."""
        info = self._remote(lambda: self._client.info("memory"))
        if info is _DOWN:
            return 0
        if self.cluster and "used_memory" not in info:
            return sum(int(i.get("used_memory", 0)) for i in info.values())
        return int(info.get("used_memory", 0))

    def stats(self) -> dict:
        out = self.counters.snapshot()
        with self._extra_lock:
            out.update({k: self._extra[k] for k in ("fast_misses", "timeouts", "recoveries",
                                                    "deadline_skips", "auth_failures")})
        out.update(tier=self.name, healthy=self.healthy, auth_error=self.auth_error,
                   url=_redact(self.url),
                   cluster=self.cluster, capacity_bytes=self.capacity_bytes)
        return out

    def inspect_usage(self) -> dict:
        """Items and value bytes under key_prefix, per kind and namespace (SCAN + STRLEN)."""
        usage: dict = {"items": 0, "bytes": 0, "kinds": {}, "foreign_keys": 0}
        n = len(self.key_prefix)
        batch: list[bytes] = []

        def flush():
            pipe = self._client.pipeline(transaction=False)
            for rk in batch:
                pipe.strlen(rk)
            for rk, size in zip(batch, pipe.execute(raise_on_error=False)):
                if not isinstance(size, int) or size == 0:
                    continue
                try:
                    key = ArtifactKey.decode(rk[n:])
                except ValueError:
                    usage["foreign_keys"] += 1
                    continue
                ns = usage["kinds"].setdefault(key.kind, {}).setdefault(
                    key.namespace, {"items": 0, "bytes": 0})
                ns["items"] += 1
                ns["bytes"] += size
                usage["items"] += 1
                usage["bytes"] += size
            batch.clear()

        for rk in self._scan():
            batch.append(rk)
            if len(batch) >= 512:
                flush()
        if batch:
            flush()
        return usage

    @classmethod
    def inspect(cls, tier_cfg=None, **kwargs) -> dict:
        """Read-only report for ``stratacache inspect``: usage per kind/namespace, server memory.

        Pass the validated ``tiers.redis`` section, or the constructor's keyword
        arguments (``url=...``). Refused credentials give ``{"healthy": False, "auth":
        "failed", "error": ...}``; other configuration errors raise RedisTierConfigError;
        an unreachable server gives ``{"healthy": False, "error": ...}``.
        """
        try:
            layer = cls.from_config(tier_cfg, None) if tier_cfg is not None else cls(**kwargs)
        except RedisTierConfigError as exc:
            if "authentication" not in str(exc) and "refused the client" not in str(exc):
                raise
            url = tier_cfg.url if tier_cfg is not None else kwargs.get("url", "")
            return {"tier": "redis", "url": _redact(url), "healthy": False, "auth": "failed",
                    "error": str(exc)}
        try:
            report = {"tier": "redis", "url": _redact(layer.url), "cluster": layer.cluster,
                      "key_prefix": layer.key_prefix.decode("utf-8", "replace"),
                      "auth": "unknown" if not layer.healthy else "ok"}
            if not layer.healthy:
                return {**report, "healthy": False, "error": "server unreachable"}
            try:
                report.update(layer.inspect_usage())
                report.update(used_memory=layer.used_bytes(), maxmemory=layer.capacity_bytes,
                              healthy=True)
            except _FAULTS as exc:
                report.update(healthy=False, error=f"{type(exc).__name__}: {exc}")
            return report
        finally:
            layer.close()

    def close(self) -> None:
        client, self._client_obj = self._client_obj, None
        if client is not None:
            try:
                client.close()
            except Exception:   # closing a client to a dead server must not raise
                pass


def _check_put(data: torch.Tensor, meta: ArtifactMeta) -> None:
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1 \
            or not data.is_contiguous():
        raise ValueError("put: data must be a contiguous 1-D uint8 tensor (use as_bytes)")
    if data.device.type != "cpu":
        raise ValueError(f"put: data must be on the CPU, got {data.device}")
    if data.numel() != meta.size:
        raise ValueError(f"put: data has {data.numel()} bytes but meta.size is {meta.size}")


_CORRUPT = object()   # get_many's marker for a value that failed validation
_DOWN = object()      # _remote's answer when the server was not (or could not be) asked
_SEND_COALESCE = 64 * 1024


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def _bulk_array(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


def _coalesce(chunks) -> list:
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


class _DeadlineSocket:
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


def _restore_timeout(conn, timeout: float) -> None:
    """Give a pooled connection back with redis-py's own per-operation timeout."""
    if conn._sock is not None:
        conn._sock.settimeout(timeout)


def _reply_int(line: bytes, op: str) -> int:
    """The integer of a ``:n`` or ``$n`` reply line; garbage is a protocol fault."""
    try:
        return int(line[1:])
    except ValueError:
        raise redis.ConnectionError(f"malformed reply to {op}: {line[:80]!r}") from None


class _RespReader:
    """Reads RESP replies from a connection's socket, bulk values straight into caller memory.

    Used only on a connection whose earlier replies were all consumed (redis-py's own
    parser holds nothing), and the connection is dropped on any error mid-reply.
    """

    __slots__ = ("io", "buf", "mv", "lo", "hi")

    def __init__(self, io: _DeadlineSocket):
        self.io = io
        self.buf = bytearray(64 * 1024)
        self.mv = memoryview(self.buf)
        self.lo = self.hi = 0

    def _recv_into(self, view: memoryview) -> int:
        return self.io.recv_into(view)

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
            self.hi += self._recv_into(self.mv[self.hi:])

    def into(self, view: memoryview) -> None:
        """Fill ``view`` exactly: buffered bytes first, then directly from the socket."""
        have = min(len(view), self.hi - self.lo)
        view[:have] = self.mv[self.lo:self.lo + have]
        self.lo += have
        pos = have
        while pos < len(view):
            pos += self._recv_into(view[pos:])

    def skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n > 0:
            step = min(n, len(scratch))
            self.into(scratch[:step])
            n -= step

    def crlf(self) -> None:
        if self.line() != b"":
            raise redis.ConnectionError("malformed bulk reply (no CRLF after the value)")


def _check_out(out: Optional[torch.Tensor]) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.dim() != 1 \
            or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError("out must be a contiguous 1-D uint8 CPU tensor")


def _is_tls_failure(exc: BaseException) -> bool:
    """A TLS handshake was refused (certificate, protocol): a set-up error, not an outage."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ssl.SSLError) or "[SSL" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _is_auth_failure(exc: BaseException) -> bool:
    return isinstance(exc, (redis.AuthenticationError, redis.exceptions.NoPermissionError)) or \
        any(w in str(exc) for w in _AUTH_WORDS)


def _redact(url: str) -> str:
    """The URL without its password, for messages and stats."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
