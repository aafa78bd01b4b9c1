"""The remote tier: Redis or Redis Cluster (Valkey speaks the same protocol).

Many hosts point at one Redis deployment, so a chunk computed on one host can
be loaded on every other. Each object is one Redis string under
``key_prefix + ArtifactKey.encode()`` whose value is ``ArtifactMeta.pack(key.encode())``
followed by the payload bytes. Nothing is pickled.

A hit is one round trip: ``get`` and ``acquire`` send one GET (an owned copy;
Redis values are never viewed in place, so nothing needs holding), batches one
pipelined GET per key per server. ``contains`` is a pipelined EXISTS and moves
no data. The payload checksum is verified by the base after the round trip
(``verify_reads``, on by default), so the connection is not held meanwhile.

A remote tier must never slow the caller beyond its timeout or raise into the
engine, so server faults (refused, reset, timed out, cluster down) are counted
(``errors``) and open that server's circuit breaker (``core.backoff``): while
open every operation answers at once (miss / not stored) without touching the
network; after a back-off that doubles from ``retry_backoff_s`` up to
``retry_backoff_max_s`` one caller probes with its real request and the tier
recovers on success. ``op_timeout_s`` bounds a whole call, however the server
trickles its reply. Configuration mistakes that Redis reports at start-up
(wrong password, unknown user, TLS certificate rejected) are raised by the
constructor as ``RedisTierConfigError`` naming the problem.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Iterator, Optional, Sequence

import redis
import torch

from stratacache.backends.base import Tier, fit_out, inspect_report
from stratacache.backends.redis import resp
from stratacache.backends.redis.cluster import ClusterRoutes, ServerRoutes
from stratacache.config.schema import redis_url_problem
from stratacache.core.artifact import Artifact, ArtifactMeta
from stratacache.core.backoff import Backoff
from stratacache.core.errors import ConfigError, CorruptArtifact, InvalidArgument, TierFault
from stratacache.core.keys import ArtifactKey

log = logging.getLogger(__name__)

# Largest header ArtifactMeta.pack(key) writes (16 dims): a GET reads this much (or the
# whole value if shorter) before it knows where the payload starts.
_MAX_HEADER = ArtifactMeta.header_size(16)
_DOWN = object()      # the answer for a key whose server was not (or could not be) asked
_EXTRA = ("fast_misses", "timeouts", "recoveries", "deadline_skips", "auth_failures")


class RedisTierConfigError(ConfigError):
    """The Redis tier cannot work as configured (bad credentials, TLS files, URL)."""


class RedisTier(Tier):
    """A tier on Redis / Redis Cluster, shared by every host that uses it."""

    name = "redis"
    persistent = True
    zero_copy = False
    inspectable = True

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
                 verify_reads: bool = True):
        """``verify_reads``: check every loaded payload against its stored checksum."""
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
        super().__init__("redis", 0)
        self.url = url
        self.cluster = cluster
        self.verify_reads = verify_reads
        self.ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self.key_prefix = key_prefix.encode("utf-8")
        self.op_timeout_s = op_timeout_s
        self.auth_error: Optional[str] = None   # set while the server refuses our credentials
        self.last_error: Optional[str] = None   # the last server fault, for stats and inspect
        backoff_range = (retry_backoff_s, retry_backoff_max_s)
        self._routes = ClusterRoutes(backoff_range) if cluster else ServerRoutes(backoff_range)
        self._health = self._routes.health      # the server, or reaching the cluster at all
        self._client_lock = threading.Lock()
        self._extra = Counter()                 # redis-only counters (_EXTRA)
        self._extra_lock = threading.Lock()
        tls = tls or url.startswith("rediss://")
        opts = resp.client_options(username=username, password=password, tls_ca_file=tls_ca_file,
                                   tls_cert_file=tls_cert_file, tls_key_file=tls_key_file,
                                   connect_timeout_s=connect_timeout_s, op_timeout_s=op_timeout_s,
                                   max_connections=max_connections)
        self._client_args = (url, cluster, tls, opts)
        self._client_obj = None
        self._probe_startup()

    @classmethod
    def from_config(cls, section, cfg) -> "RedisTier":
        return cls(section.url, cluster=section.cluster, username=section.username,
                   password=section.password, tls=section.tls,
                   tls_ca_file=section.tls_ca_file, tls_cert_file=section.tls_cert_file,
                   tls_key_file=section.tls_key_file,
                   connect_timeout_s=section.connect_timeout_s,
                   op_timeout_s=section.op_timeout_s, ttl_s=section.ttl_s,
                   max_connections=section.max_connections,
                   retry_backoff_s=section.retry_backoff_s,
                   retry_backoff_max_s=section.retry_backoff_max_s,
                   key_prefix=section.key_prefix)

    # -- connection set-up -------------------------------------------------
    @property
    def _client(self):
        """The redis-py client, made on first use (a cluster client needs the cluster up)."""
        if self._client_obj is None:
            with self._client_lock:
                if self._client_obj is None:
                    self._client_obj = resp.make_client(*self._client_args)
        return self._client_obj

    def _probe_startup(self) -> None:
        """PING now: bad credentials / TLS / ACL are errors; a server that is down is a fault."""
        try:
            self._client.ping()
            self._client.exists(self.key_prefix + b"\x1fstartup-probe")   # ACL may read the prefix?
            self._read_capacity()
        except redis.AuthenticationError as exc:
            raise RedisTierConfigError(
                f"tiers.redis: authentication to {resp.redact(self.url)} failed ({exc}); "
                "check tiers.redis.username and tiers.redis.password") from None
        except redis.ResponseError as exc:
            if resp.is_auth_failure(exc):
                raise RedisTierConfigError(
                    f"tiers.redis: {resp.redact(self.url)} refused the client ({exc}); "
                    "check tiers.redis.username / password and that the user's ACL allows "
                    f"keys under tiers.redis.key_prefix {self.key_prefix!r}") from None
            raise RedisTierConfigError(f"tiers.redis: {resp.redact(self.url)}: {exc}") from None
        except resp.FAULTS as exc:
            if resp.is_tls_failure(exc):
                raise RedisTierConfigError(
                    f"tiers.redis: TLS handshake with {resp.redact(self.url)} failed ({exc}); "
                    "check tiers.redis.tls and tls_ca_file / tls_cert_file / tls_key_file"
                ) from None
            self._fault(self._health, exc, " at start-up")

    def _read_capacity(self) -> None:
        """capacity_bytes: the server's maxmemory (summed over cluster primaries); 0 = no limit."""
        self.capacity_bytes = sum(int(i.get("maxmemory", 0)) for i in self._infos("memory"))

    def _infos(self, section: str) -> list[dict]:
        """INFO ``section`` of the server, or of each cluster primary."""
        infos = self._client.info(section)
        if self.cluster and isinstance(infos, dict) and all(isinstance(v, dict)
                                                           for v in infos.values()):
            return list(infos.values())
        return [infos]

    # -- health --------------------------------------------------------------
    def _count(self, name: str) -> None:
        with self._extra_lock:
            self._extra[name] += 1

    def _admit(self, health: Backoff) -> bool:
        """May this call use the network? False (and counted) while backing off."""
        if health.admit():
            return True
        self._count("fast_misses")
        return False

    def _ok(self, health: Backoff, where: str = "") -> None:
        if health.ok():
            log.info("redis tier: %s%s is back", resp.redact(self.url), where)
            self._count("recoveries")
            self.auth_error = None

    def _auth_failed(self, exc: BaseException, where: str = "") -> None:
        """The server (up, perhaps only since start-up) refuses our credentials: a
        configuration problem, logged as such once per distinct refusal, and kept in
        ``stats()["detail"]["auth_error"]`` until a call succeeds."""
        message = (f"authentication to {resp.redact(self.url)}{where} failed "
                   f"({resp.auth_reason(exc)}); check tiers.redis.username and tiers.redis.password")
        with self._extra_lock:
            first = self.auth_error != message
            self.auth_error = message
            self._extra["auth_failures"] += 1
        if first:
            log.error("redis tier: %s; serving misses and retrying with back-off", message)

    def _fault(self, health: Backoff, exc: BaseException, where: str = "", pool=None) -> None:
        """Count a server fault, back off, and drop idle sockets to that server."""
        self.counters.add("errors")
        self.last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (redis.TimeoutError, TimeoutError)):
            self._count("timeouts")
        was_healthy, retry_in = health.fault()
        if resp.is_auth_failure(exc):
            self._auth_failed(exc, where)
        elif was_healthy:
            log.warning("redis tier: %s%s failed (%s); serving misses, retry in %.2fs",
                        resp.redact(self.url), where, self.last_error, retry_in)
        self._routes.stale()
        for p in [pool] if pool is not None else self._pools():
            resp.drop_idle(p)

    def _pools(self) -> list:
        return [] if self._client_obj is None else self._routes.pools(self._client_obj)

    def _remote(self, fn):
        """``fn()`` through redis-py, or _DOWN: at once while backing off (no network
        call), or after a fault (counted; the tier backs off)."""
        if not self._admit(self._health):
            return _DOWN
        try:
            result = fn()
        except resp.FAULTS as exc:
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
        return self._routes.healthy

    # -- one pipelined round trip per server -----------------------------------
    def _rkey(self, key: ArtifactKey) -> bytes:
        return self.key_prefix + key.encode()

    def _exchange(self, rkeys: Sequence[bytes], request, reply) -> list:
        """Send every ``request(i)``, then read each ``reply(i, reader)`` straight off the
        socket, in order: one pipeline per server, all within one op_timeout_s. Keys on a
        server that is backing off or fails now come back as _DOWN; other servers' keys
        are unaffected."""
        results: list = [_DOWN] * len(rkeys)
        deadline = time.monotonic() + self.op_timeout_s
        if self.cluster:   # making the client and routing need the slot map
            routes = self._remote(lambda: self._routes.routes(self._client, rkeys))
            if routes is _DOWN:
                return results
        else:
            routes = self._routes.routes(self._client, rkeys)
        for route in routes:
            if not self._admit(route.health):
                continue
            if time.monotonic() >= deadline:   # an earlier server used the whole call's time
                self._count("deadline_skips")
                continue

            def read(reader, idxs=route.idxs):
                for i in idxs:
                    results[i] = reply(i, reader)

            try:
                resp.exchange(route.pool, deadline, (c for i in route.idxs for c in request(i)),
                              read, self.op_timeout_s)
            except resp.FAULTS as exc:
                for i in route.idxs:
                    results[i] = _DOWN
                self._fault(route.health, exc, route.where, route.pool)
                continue
            except BaseException:
                route.health.abandon()
                raise
            self._ok(route.health, route.where)
        return results

    def _error_reply(self, err: bytes, op: str) -> None:
        """An error reply for one key: a stale slot map is refreshed, server-state errors
        are faults, a full server (OOM) is a plain refusal, anything else is counted."""
        kind = resp.error_reply_kind(err)
        text = err.decode("utf-8", "replace")
        if kind == "auth":   # e.g. the server came up later with requirepass
            raise redis.AuthenticationError(text)
        if kind == "down":
            raise redis.ConnectionError(text)
        if kind == "moved":
            self._routes.stale()
        elif kind == "other":
            self.counters.add("errors")
            log.warning("redis tier: %s refused: %s", op, text)

    def _integer_replies(self, command: bytes, rkeys: Sequence[bytes]) -> list[int]:
        """``command key`` for each key, pipelined; 0 for a key whose server is down."""
        op = command.decode()

        def request(i):
            return (resp.bulk_array(command, rkeys[i]),)

        def reply(i, reader):
            line = reader.line()
            if line[:1] == b":":
                return reader.integer(line, op)
            if line[:1] != b"-":
                raise redis.ConnectionError(f"unexpected reply to {op}: {line[:80]!r}")
            self._error_reply(line[1:], op)
            return 0

        return [0 if r is _DOWN else r for r in self._exchange(rkeys, request, reply)]

    # -- writes ---------------------------------------------------------------
    def _put(self, key: ArtifactKey, data: torch.Tensor, meta: ArtifactMeta) -> bool:
        return self._put_many([(key, data, meta)])[0]

    def _put_many(self, items) -> list[bool]:
        """SET (PX with ttl_s) every item in one pipeline; payloads go from tensor memory
        to the socket without a copy (header and payload are framed as one RESP value).
        A payload larger than the whole capacity (maxmemory) is refused without sending it."""
        cap = self.capacity_bytes
        fits = [not cap or meta.size < cap for _, _, meta in items]
        if not all(fits):
            stored = iter(self._put_many([it for it, ok in zip(items, fits) if ok]))
            return [ok and next(stored) for ok in fits]
        if not items:
            return []
        rkeys = [self._rkey(k) for k, _, _ in items]
        ttl = b"" if self.ttl_ms is None else resp.bulk(b"PX") + resp.bulk(b"%d" % self.ttl_ms)
        nargs = 3 if self.ttl_ms is None else 5

        def request(i):
            key, data, meta = items[i]
            header = meta.pack(key.encode())
            head = (b"*%d\r\n" % nargs) + resp.bulk(b"SET") + resp.bulk(rkeys[i]) \
                + b"$%d\r\n" % (len(header) + meta.size) + header
            return (head, memoryview(data.numpy()), b"\r\n" + ttl) if meta.size \
                else (head, b"\r\n" + ttl)

        def reply(i, reader):
            line = reader.line()
            if line == b"+OK":
                return True
            if line[:1] != b"-":
                raise redis.ConnectionError(f"unexpected reply to SET: {line[:80]!r}")
            self._error_reply(line[1:], "SET")
            return False

        return [r is True for r in self._exchange(rkeys, request, reply)]

    def delete(self, key: ArtifactKey) -> bool:
        n = self._integer_replies(b"DEL", [self._rkey(key)])[0]
        self.counters.add("deletes", n)
        return n > 0

    def _drop(self, key: ArtifactKey, art: Optional[Artifact]) -> None:
        """A value that failed validation goes (counted as corrupt by the base, not as a delete)."""
        self._integer_replies(b"DEL", [self._rkey(key)])

    # -- reads ----------------------------------------------------------------
    def _get(self, key: ArtifactKey, out: Optional[torch.Tensor]) -> Optional[Artifact]:
        got = self._fetch([key], None if out is None else [out], lambda i: "out")[0]
        if isinstance(got, CorruptArtifact):
            raise got
        return got

    def _get_many(self, keys, outs) -> list:
        return self._fetch(keys, outs, lambda i: f"outs[{i}]")

    def _fetch(self, keys: Sequence[ArtifactKey], outs, out_arg) -> list:
        """GET every key in one pipeline; each payload is received from the socket straight
        into its destination (``outs[i]`` or a new tensor). One result per key: an
        Artifact (not yet verified), None (absent, or its server is down), or a
        CorruptArtifact. An ``out`` too small is an InvalidArgument, raised once every
        reply has been read (the connection stays usable)."""
        if not keys:
            return []
        rkeys = [self._rkey(k) for k in keys]
        too_small: list[InvalidArgument] = []

        def request(i):
            return (resp.bulk_array(b"GET", rkeys[i]),)

        def reply(i, reader):
            line = reader.line()
            if line[:1] == b"-":
                if line.startswith(b"-WRONGTYPE"):   # someone else's key under our prefix
                    return CorruptArtifact(f"{keys[i]}: not a string value")
                self._error_reply(line[1:], "GET")
                return None
            if line[:1] != b"$":
                raise redis.ConnectionError(f"unexpected reply to GET: {line[:80]!r}")
            n = reader.integer(line, "GET")
            if n < 0:
                return None
            head = bytearray(min(n, _MAX_HEADER))
            reader.into(memoryview(head))
            try:
                meta, hlen = ArtifactMeta.unpack(head, keys[i].encode())
                if n != hlen + meta.size:
                    raise CorruptArtifact(f"value is {n} bytes, header says {hlen}+{meta.size}")
            except CorruptArtifact as exc:
                reader.skip(n - len(head))
                reader.crlf()
                return exc
            out = outs[i] if outs is not None else None
            if out is not None:
                try:
                    dest = fit_out(out, meta.size, out_arg(i))
                except InvalidArgument as exc:
                    too_small.append(exc)
                    reader.skip(n - len(head))
                    reader.crlf()
                    return None
            else:
                dest = torch.empty(meta.size, dtype=torch.uint8)
            if meta.size:
                view = memoryview(dest.numpy())
                early = len(head) - hlen          # payload bytes read along with the header
                view[:early] = head[hlen:]
                reader.into(view[early:])
            reader.crlf()
            return Artifact(meta, dest)

        got = self._exchange(rkeys, request, reply)
        if too_small:
            raise too_small[0]
        return [None if r is _DOWN else r for r in got]

    def contains(self, encoded_keys: Sequence[bytes]) -> list[bool]:
        """EXISTS per key, pipelined (one reply each, also across cluster slots); False for
        keys whose server is down."""
        if not encoded_keys:
            return []
        prefix = self.key_prefix
        return [n == 1 for n in self._integer_replies(b"EXISTS", [prefix + e for e in encoded_keys])]

    # -- listing and accounting ----------------------------------------------
    def _scan(self) -> Iterator[bytes]:
        return self._client.scan_iter(match=resp.scan_pattern(self.key_prefix), count=1000)

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
        except resp.FAULTS as exc:
            self._fault(self._health, exc)

    def _stats(self) -> dict:
        """``items`` and ``used_bytes`` are the server's (DBSIZE and INFO
        used_memory_dataset, summed over cluster primaries: every key prefix); 0 while the
        server is down. ``inspect`` counts exactly what is under key_prefix."""
        usage = self._remote(self._server_usage)
        items, used, used_memory = (0, 0, 0) if usage is _DOWN else usage
        with self._extra_lock:
            extra = {k: self._extra[k] for k in _EXTRA}
        return dict(extra, items=items, used_bytes=used, used_memory=used_memory,
                    healthy=self.healthy,
                    auth_error=self.auth_error, last_error=self.last_error,
                    url=resp.redact(self.url), cluster=self.cluster)

    def _server_usage(self) -> tuple[int, int, int]:
        """(DBSIZE, INFO used_memory_dataset, used_memory), summed over cluster primaries.
        The dataset is what the keys take, so it stays within maxmemory (used_memory also
        counts Redis' own overhead and client buffers, and can pass it while a reply is made)."""
        items = self._client.dbsize()
        infos = self._infos("memory")
        dataset = sum(i.get("used_memory_dataset", 0) for i in infos)
        used = sum(i.get("used_memory", 0) for i in infos)
        if not all(isinstance(n, int) for n in (items, dataset, used)):
            raise redis.ConnectionError(f"malformed reply to DBSIZE / INFO memory: {items!r:.80}")
        return items, dataset, used

    def _usage(self) -> tuple[list, int]:
        """([(key, value bytes)] under key_prefix, number of keys there that are not ours)."""
        n = len(self.key_prefix)
        entries: list = []
        foreign = 0
        batch: list[bytes] = []

        def flush():
            nonlocal foreign
            pipe = self._client.pipeline(transaction=False)
            for rk in batch:
                pipe.strlen(rk)
            for rk, size in zip(batch, pipe.execute(raise_on_error=False)):
                if not isinstance(size, int) or size == 0:
                    continue
                try:
                    entries.append((ArtifactKey.decode(rk[n:]), size))
                except ValueError:
                    foreign += 1
            batch.clear()

        for rk in self._scan():
            batch.append(rk)
            if len(batch) >= 512:
                flush()
        if batch:
            flush()
        return entries, foreign

    @classmethod
    def inspect(cls, section, cfg) -> dict:
        """Read-only report for ``stratacache inspect``: the values under key_prefix per
        kind and namespace (SCAN + STRLEN; ``unreadable``: keys there this API did not
        write), and the server's memory. Refused credentials, TLS or ACL problems raise
        ``RedisTierConfigError``; an unreachable server raises ``TierFault``."""
        tier = cls.from_config(section, cfg)
        try:
            if not tier.healthy:
                raise TierFault(f"tiers.redis: {resp.redact(tier.url)} is unreachable "
                                f"({tier.last_error})")
            try:
                entries, foreign = tier._usage()
                used_memory = tier._server_usage()[2]
            except resp.FAULTS as exc:
                raise TierFault(f"tiers.redis: {resp.redact(tier.url)}: "
                                f"{type(exc).__name__}: {exc}") from None
            return inspect_report("redis", resp.redact(tier.url),
                                  capacity_bytes=tier.capacity_bytes, entries=entries,
                                  unreadable=foreign, url=resp.redact(tier.url),
                                  cluster=tier.cluster,
                                  key_prefix=tier.key_prefix.decode("utf-8", "replace"),
                                  used_memory=used_memory, auth="ok")
        finally:
            tier.close()

    def close(self) -> None:
        client, self._client_obj = self._client_obj, None
        if client is not None:
            try:
                client.close()
            except Exception:   # closing a client to a dead server must not raise
                pass
