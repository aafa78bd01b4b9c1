"""The Mooncake Store tier: the distributed KV engine large deployments already run.

A Mooncake cluster is a master (metadata, allocation) plus memory segments that
clients contribute; values move between segments with Mooncake's transfer
engine (RDMA, or TCP where there is none). Each of our objects is one Mooncake
object under ``key_prefix + ArtifactKey.encode()`` whose value is
``ArtifactMeta.pack(key.encode())`` zero-padded to ``HEADER_SLOT`` bytes,
followed by the payload. Nothing is pickled.

Why the padded header: a read scatters the value in one call
(``batch_get_into_multi_buffers``) into a small header buffer and the
destination itself (the caller's ``out``), so no payload byte is copied by us;
Mooncake needs the exact split, which a fixed header slot gives. Writes of new
keys gather the header slot and the payload's own memory into one object in one
batch call (``batch_put_from_multi_buffers``); Mooncake's ``put`` keeps an
existing value, so keys already stored are replaced with ``upsert_parts``.

Trust: the header (its own checksum and the key it was written under), the
padding and the value's size are checked on every read, so a corrupt, partial,
foreign or vanished value is a miss (``CorruptArtifact``, dropped by the base);
the payload checksum is checked when the caller asks (``verify``) or when
``verify_reads`` is set.

Faults: Mooncake returns negative codes and never raises. Codes that mean the
master could not be reached (RPC failed or timed out) mark the tier unhealthy:
every call then answers at once (miss / not stored) without touching Mooncake,
and after a back-off doubling from ``retry_backoff_s`` to ``retry_backoff_max_s``
one caller probes with its real request. Mooncake's own RPC timeouts
(``MC_RPC_TIMEOUT_MS``, ``MC_RPC_CONNECT_TIMEOUT_MS``, read when a client is
made) are set from ``op_timeout_s`` / ``connect_timeout_s`` unless the
environment already sets them, so a hung master costs one timeout, not
Mooncake's default 30 s. A value whose segment died (``TRANSFER_FAIL``), a full
store or an absent key are plain misses / refusals. docs/mooncake.md has the
topology, the config keys and the failure table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from typing import Iterator, Optional, Sequence

import torch

from stratacache.backends.base import Tier, fit_out, inspect_report
from stratacache.core.artifact import Artifact, ArtifactMeta, MAX_NDIM
from stratacache.core.backoff import Backoff
from stratacache.core.errors import ConfigError, CorruptArtifact, TierFault
from stratacache.core.keys import ArtifactKey

log = logging.getLogger(__name__)

HEADER_SLOT = ArtifactMeta.header_size(MAX_NDIM)   # every value's header, zero-padded to this
_ZERO_SLOT = bytes(HEADER_SLOT)

# Mooncake error codes (negative return values) the tier tells apart; others (-704 absent,
# -200 no space, ...) are plain misses / refusals.
LEASE_HELD = -706          # remove refused: a reader holds the object's lease
LEASE_EXPIRED = -707       # a read outlasted its lease (--default_kv_lease_ttl): not trusted
INVALID_PARAMS = -600
TRANSFER_FAIL = -800       # the segment holding the value is gone, or the split was wrong
_MASTER_FAULTS = range(-999, -899)   # -900 RPC_FAIL, -901 RPC_TIMEOUT, ...: the master is away
_DOWN = object()           # a size lookup's answer when the master is away
# The master's Prometheus metrics (whole store) that stats() reports, by our names.
_OCCUPANCY = {"master_key_count": "items", "master_allocated_bytes": "used_bytes",
              "master_total_capacity_bytes": "capacity_bytes",
              "master_evicted_key_count": "evictions", "master_evicted_size_bytes": "evicted_bytes"}
_QUERY_BATCH = 100         # keys per /batch_query_keys request of inspect()

PROTOCOLS = ("tcp", "rdma")

# Config keys of tiers.mooncake, with their defaults (docs/mooncake.md describes each).
DEFAULTS = {
    "master_address": "127.0.0.1:50051",
    "metadata_server": "P2PHANDSHAKE",
    "local_hostname": "127.0.0.1",
    "protocol": "tcp",
    "device_names": "",
    "global_segment_size": 0,
    "local_buffer_size": 64 << 20,
    "replica_num": 1,
    "connect_timeout_s": 0.5,
    "op_timeout_s": 1.0,
    "retry_backoff_s": 1.0,
    "retry_backoff_max_s": 30.0,
    "key_prefix": "sc:",
    "verify_reads": False,
    "metrics_address": "127.0.0.1:9003",
}

_HOSTPORT = re.compile(r"^[A-Za-z0-9._:\[\]-]+:\d{1,5}$")


class HeaderSlots:
    """Header slots for the batches: blocks of one buffer that the tier registers once like
    the CPU arena, so that on RDMA a batch from or into registered memory registers nothing
    per call. A batch larger than a block, or one that finds every block taken (many threads
    at once), gets a buffer of its own (registered for that call)."""

    def __init__(self, blocks: int = 8, slots: int = 256):
        self.block_bytes = slots * HEADER_SLOT
        self.memory = torch.zeros(blocks * self.block_bytes, dtype=torch.uint8)
        self._free = list(range(blocks))
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self, n: int) -> Iterator[torch.Tensor]:
        """``n`` zeroed header slots, for the block."""
        nbytes = n * HEADER_SLOT
        block = None
        if nbytes <= self.block_bytes:
            with self._lock:
                block = self._free.pop() if self._free else None
        if block is None:
            yield torch.zeros(nbytes, dtype=torch.uint8)
            return
        heads = self.memory.narrow(0, block * self.block_bytes, nbytes)
        heads.zero_()
        try:
            yield heads
        finally:
            with self._lock:
                self._free.append(block)


class MooncakeTier(Tier):
    """A tier on a Mooncake Store cluster, shared by every host attached to its master."""

    name = "mooncake"
    persistent = True
    zero_copy = False
    inspectable = True
    registers_memory = True      # RDMA moves only registered memory: the chain hands us the
                                 # CPU arena and the shared region once (register_memory)

    def __init__(self, name: str = "mooncake", **options):
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"tiers.{name}: unknown option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(DEFAULTS)}")
        opt = dict(DEFAULTS, **options)
        _validate(name, opt)
        super().__init__(name, 0)
        self.options = opt
        self.master_address = opt["master_address"]
        self.protocol = opt["protocol"]
        self.key_prefix = opt["key_prefix"]
        self.verify_reads = bool(opt["verify_reads"])
        self.op_timeout_s = float(opt["op_timeout_s"])
        self._health = Backoff(float(opt["retry_backoff_s"]), float(opt["retry_backoff_max_s"]))
        self._extra = Counter()           # fast_misses, faults, recoveries, transfer_failures, ...
        self._extra_lock = threading.Lock()
        self._store = None
        self._store_lock = threading.Lock()
        # (address, bytes) given to register_memory; replaced whole (never mutated) so the
        # data path reads it without a lock.
        self._registered: tuple[tuple[int, int], ...] = ()
        self._headers = HeaderSlots()
        self.register_memory(self._headers.memory)
        self._config = None
        self._occupancy_at = -1.0
        self._last_occupancy: dict = {"items": 0, "used_bytes": 0}
        with self._store_lock:
            if self._open():
                self._occupancy()   # capacity_bytes: the store's, from the master's metrics
                self._occupancy_at = -1.0   # and stats() reads the occupancy afresh

    @classmethod
    def from_config(cls, section, cfg) -> "MooncakeTier":
        """Reads the ``DEFAULTS`` keys as attributes of ``section`` (``cfg.tiers.mooncake``)."""
        options = {k: getattr(section, k) for k in DEFAULTS if hasattr(section, k)}
        return cls(getattr(section, "name", None) or "mooncake", **options)

    # -- the client ---------------------------------------------------------------------

    def _open(self) -> bool:
        """Make and set up the Mooncake client; a master that is away is a fault, not an error.

        ``setup`` holds the GIL and, against a master that is away, retries for a minute or
        more; so the master's port is tried first (``connect_timeout_s``), and Mooncake's own
        set-up retries are capped (``MC_STORE_CLIENT_SETUP_RETRIES``) for a master that dies
        in between."""
        try:
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        except ImportError as exc:
            raise ConfigError(f"tiers.{self.name} needs the pip package "
                              "mooncake-transfer-engine-non-cuda (and Debian's libibverbs1): "
                              f"{exc}") from None
        opt = self.options
        host, port = self.master_address.rsplit(":", 1)
        try:
            socket.create_connection((host.strip("[]"), int(port)),
                                     timeout=float(opt["connect_timeout_s"])).close()
        except OSError as exc:
            self._fault(f"master {self.master_address} unreachable ({exc})")
            return False
        for var, value in (("MC_RPC_TIMEOUT_MS", int(self.op_timeout_s * 1000)),
                           ("MC_RPC_CONNECT_TIMEOUT_MS", int(float(opt["connect_timeout_s"]) * 1000)),
                           ("MC_STORE_CLIENT_SETUP_RETRIES", 2),
                           ("MC_TCP_BIND_ADDRESS", opt["local_hostname"])):
            os.environ.setdefault(var, str(value))
        store = MooncakeDistributedStore()
        rc = store.setup(opt["local_hostname"], opt["metadata_server"],
                         int(opt["global_segment_size"]), int(opt["local_buffer_size"]),
                         opt["protocol"], opt["device_names"], self.master_address)
        if rc != 0:
            self._fault(f"client set-up against master {self.master_address} returned {rc}")
            return False
        if self.protocol == "rdma":
            self._reregister(store)
        config = ReplicateConfig()
        config.replica_num = int(opt["replica_num"])
        self._config, self._store = config, store
        return True

    def _client(self):
        """The set-up client, or None while backing off (or when a probe's set-up failed)."""
        if not self._health.admit():
            self._count("fast_misses")
            return None
        if self._store is None:
            with self._store_lock:
                if self._store is None and not self._open():
                    return None
        return self._store

    def register_memory(self, memory: torch.Tensor) -> None:
        """Register memory that payloads are put from and read into (the CPU arena, the shared
        region; the chain hands them over when it is built) once for the process, so RDMA
        moves them without a registration per call. The range is kept and registered again
        with every new client (``_open``, after a reconnect). TCP moves any memory, so there
        only the range is kept (``_pinned`` never registers on TCP). A refused registration
        is a ``TierFault`` and the range stays unregistered: moves of it register per call."""
        addr, nbytes = memory.data_ptr(), memory.numel() * memory.element_size()
        with self._store_lock:
            if nbytes <= 0 or _covered(self._registered, addr, nbytes):
                return
            if self.protocol == "rdma" and self._store is not None:
                rc = self._store.register_buffer(addr, nbytes)
                if rc != 0:
                    self._count("registration_failures")
                    raise TierFault(f"tiers.{self.name}: register_buffer of {nbytes} bytes at "
                                    f"{addr:#x} returned {rc}; that memory is registered per "
                                    "call instead")
            self._registered += ((addr, nbytes),)

    @property
    def registered_memory(self) -> tuple[tuple[int, int], ...]:
        """The (address, bytes) ranges registered once (see ``register_memory``)."""
        return self._registered

    def _reregister(self, store) -> None:
        """Register the kept ranges with a new client; one it refuses is dropped from the
        kept ranges (and so registered per call), logged and counted."""
        kept = []
        for addr, nbytes in self._registered:
            rc = store.register_buffer(addr, nbytes)
            if rc == 0:
                kept.append((addr, nbytes))
            else:
                self._count("registration_failures")
                log.warning("mooncake tier: register_buffer of %d bytes at %#x returned %d; "
                            "that memory is registered per call instead", nbytes, addr, rc)
        self._registered = tuple(kept)

    # -- health ---------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._extra_lock:
            self._extra[name] += n

    def _fault(self, what: str) -> None:
        self.counters.add("errors")
        self._count("faults")
        was_healthy, retry_in = self._health.fault()
        if was_healthy:
            log.warning("mooncake tier: %s; serving misses, retry in %.2fs", what, retry_in)

    def _settle(self, codes: Sequence[int], op: str) -> None:
        """Health after a call: any master fault backs off; anything else is an answer."""
        bad = [c for c in codes if c in _MASTER_FAULTS]
        if bad:
            self._fault(f"{op} at master {self.master_address} failed with code {bad[0]}")
        elif self._health.ok():
            log.info("mooncake tier: master %s is back", self.master_address)
            self._count("recoveries")

    @property
    def healthy(self) -> bool:
        return self._health.healthy

    def _mkey(self, key: ArtifactKey) -> str:
        return self.key_prefix + key.encode().decode("utf-8")

    # -- writes -------------------------------------------------------------------------

    def _put(self, key, data, meta) -> bool:
        return self._put_many([(key, data, meta)])[0]

    def _put_many(self, items) -> list[bool]:
        """New keys: one zero-copy ``batch_put_from_multi_buffers`` (header slot + the payload's
        own memory). Keys already stored: ``upsert_parts`` each, since Mooncake's put would keep
        the old value. A key another writer creates between the two calls keeps that writer's
        (complete) value, as if its put had come second."""
        store = self._client()
        if store is None:
            return [False] * len(items)
        mkeys = [self._mkey(k) for k, _, _ in items]
        found = list(store.batch_is_exist(mkeys))
        if any(f in _MASTER_FAULTS for f in found):
            self._settle(found, "exist")
            return [False] * len(items)
        codes = [0] * len(items)
        new, first = [], set()           # a key twice in one batch: the later one upserts
        for i, f in enumerate(found):
            if f != 1 and mkeys[i] not in first:
                new.append(i)
                first.add(mkeys[i])
        with self._headers.take(len(items)) as heads:
            slots = memoryview(heads.numpy())
            for i in new:
                key, _, meta = items[i]
                slots[i * HEADER_SLOT:(i + 1) * HEADER_SLOT] = _header(key, meta)
            if new:
                base = heads.data_ptr()
                ptrs = [[base + i * HEADER_SLOT]
                        + ([items[i][1].data_ptr()] if items[i][2].size else []) for i in new]
                lens = [[HEADER_SLOT] + ([items[i][2].size] if items[i][2].size else []) for i in new]
                regions = [(base, heads.numel())] + [(items[i][1].data_ptr(), items[i][2].size)
                                                     for i in new]
                with self._pinned(store, regions):
                    got = store.batch_put_from_multi_buffers([mkeys[i] for i in new], ptrs, lens,
                                                             self._config)
                for i, rc in zip(new, got):
                    codes[i] = rc
        for i in sorted(set(range(len(items))) - set(new)):
            key, data, meta = items[i]
            if any(c in _MASTER_FAULTS for c in codes):
                codes[i] = _MASTER_FAULTS[0]    # not tried: it would cost another timeout
                continue
            with self._pinned(store, [(data.data_ptr(), meta.size)]):
                codes[i] = store.upsert_parts(mkeys[i], _header(key, meta),
                                              memoryview(data.numpy()), config=self._config)
        self._settle(codes, "put")
        refused = sum(1 for c in codes if c != 0 and c not in _MASTER_FAULTS)
        if refused:
            self._count("refused", refused)
        return [c == 0 for c in codes]

    def delete(self, key: ArtifactKey) -> bool:
        """Remove ``key``. Mooncake refuses while a reader holds the object's read lease (every
        get grants one, ``--default_kv_lease_ttl``): the remove is retried until that lease has
        passed, within ``op_timeout_s``; past it, False (counted as ``delete_leased``) and the
        object stays until a later delete. Readers in flight are never cut off."""
        store = self._client()
        if store is None:
            return False
        deadline = time.monotonic() + self.op_timeout_s
        rc = store.remove(self._mkey(key))
        while rc == LEASE_HELD and time.monotonic() < deadline:
            time.sleep(0.01)
            rc = store.remove(self._mkey(key))
        self._settle([rc], "remove")
        if rc == LEASE_HELD:
            self._count("delete_leased")
        elif rc == 0:
            self.counters.add("deletes")
        return rc == 0

    def _drop(self, key: ArtifactKey, art: Optional[Artifact]) -> None:
        """A value that failed a check goes at once, lease or not (no reader can trust it);
        but only that version: after a delayed check (``art`` given) the value now stored is
        read again and kept if it is another version (a good one written since). Mooncake
        has no version numbers, so this costs one read, on the corrupt path only."""
        store = self._client()
        if store is None:
            return
        if art is not None:
            try:
                now = self._get(key, None)
            except CorruptArtifact:
                now = art          # the stored value is damaged itself: drop it
            if now is None or now.meta != art.meta:
                return             # gone, or replaced by another version: nothing to drop
        self._settle([store.remove(self._mkey(key), True)], "remove")

    # -- reads ----------------------------------------------------------------------------

    def _get(self, key, out):
        res = self._get_many([key], None if out is None else [out])[0]
        if isinstance(res, CorruptArtifact):
            raise res
        return res

    def _get_many(self, keys, outs) -> list:
        """Each value scattered into a header slot and its destination in one batch. The
        split must be exact: ``out``'s size is tried first (pages have one size); a value of
        another size, or one read without ``out``, is sized with ``get_size`` first."""
        if not keys:
            return []
        store = self._client()
        if store is None:
            return [None] * len(keys)
        outs = list(outs) if outs is not None else [None] * len(keys)
        mkeys = [self._mkey(k) for k in keys]
        results: list = [None] * len(keys)
        with self._headers.take(len(keys)) as heads:
            plan = {}                                   # index -> (destination, payload bytes)
            for i, out in enumerate(outs):
                if out is not None:
                    plan[i] = (out, out.numel())
                    continue
                n = self._value_size(store, mkeys[i], results, i)
                if n is _DOWN:
                    return [None] * len(keys)
                if n is not None:
                    plan[i] = (torch.empty(n, dtype=torch.uint8), n)
            codes = self._read(store, mkeys, heads, plan)
            slots = memoryview(heads.numpy())
            resize = {}
            for i, rc in codes.items():
                if rc >= 0:
                    results[i] = _checked(keys[i], slots, i, rc, plan[i][0])
                elif rc in (TRANSFER_FAIL, INVALID_PARAMS) and outs[i] is not None:
                    resize[i] = outs[i]                 # the value may be of another size
                elif rc == TRANSFER_FAIL:
                    self._count("transfer_failures")    # its segment is gone
                elif rc == LEASE_EXPIRED:
                    self._count("lease_expired")
            self._settle(list(codes.values()), "get")
            if resize and self._health.healthy:
                self._read_resized(store, keys, mkeys, heads, resize, results)
        return results

    def _value_size(self, store, mkey: str, results: list, i: int):
        """Payload bytes stored under ``mkey``; None for a miss (results[i] says if corrupt);
        _DOWN when the master is away."""
        n = store.get_size(mkey)
        if n in _MASTER_FAULTS:
            self._settle([n], "get_size")
            return _DOWN
        if n < 0:
            return None
        if n < HEADER_SLOT:
            results[i] = CorruptArtifact(f"value of {n} bytes is shorter than a header")
            return None
        return n - HEADER_SLOT

    def _read_resized(self, store, keys, mkeys, heads, resize: dict, results: list) -> None:
        """Values that did not fit ``out``'s size: read again with their own. One larger than
        ``out`` is read aside first: corrupt is a miss, a real one is the caller's mistake."""
        plan = {}
        for i, out in resize.items():
            n = self._value_size(store, mkeys[i], results, i)
            if n is _DOWN:
                return
            if n is None or n == out.numel():
                self._count("transfer_failures")    # gone, or the transfer itself failed
                continue
            plan[i] = (out.narrow(0, 0, n) if n <= out.numel()
                       else torch.empty(n, dtype=torch.uint8), n)
        codes = self._read(store, mkeys, heads, plan)
        slots = memoryview(heads.numpy())
        for i, rc in codes.items():
            if rc >= 0:
                results[i] = _checked(keys[i], slots, i, rc, plan[i][0])
                if isinstance(results[i], Artifact):
                    fit_out(resize[i], results[i].meta.size, f"out for {keys[i]}")
            elif rc == TRANSFER_FAIL:
                self._count("transfer_failures")
        self._settle(list(codes.values()), "get")

    def _read(self, store, mkeys, heads, plan: dict) -> dict:
        """``batch_get_into_multi_buffers`` for the planned indices: index -> return code."""
        if not plan:
            return {}
        order = list(plan)
        base = heads.data_ptr()
        ptrs, lens, regions = [], [], [(base, heads.numel())]
        for i in order:
            dest, n = plan[i]
            ptrs.append([base + i * HEADER_SLOT] + ([dest.data_ptr()] if n else []))
            lens.append([HEADER_SLOT] + ([n] if n else []))
            if n:
                regions.append((dest.data_ptr(), n))
        with self._pinned(store, regions):
            codes = store.batch_get_into_multi_buffers([mkeys[i] for i in order], ptrs, lens)
        return dict(zip(order, codes))

    @contextlib.contextmanager
    def _pinned(self, store, regions):
        """RDMA moves only registered memory: register, for this call, what ``register_memory``
        did not cover (TCP moves any memory, and staging through a copy measured slower)."""
        if self.protocol == "tcp":
            yield
            return
        registered = self._registered
        temp = [(p, n) for p, n in regions if n and not _covered(registered, p, n)]
        for p, n in temp:
            store.register_buffer(p, n)
        try:
            yield
        finally:
            for p, _ in temp:
                store.unregister_buffer(p)

    def contains(self, encoded_keys: Sequence[bytes]) -> list[bool]:
        if not encoded_keys:
            return []
        store = self._client()
        if store is None:
            return [False] * len(encoded_keys)
        prefix = self.key_prefix
        found = store.batch_is_exist([prefix + e.decode("utf-8") for e in encoded_keys])
        self._settle(found, "exist")
        return [f == 1 for f in found]

    # -- listing and accounting ----------------------------------------------------------

    def keys(self) -> Iterator[ArtifactKey]:
        """Every well-formed key under ``key_prefix``, from the master's HTTP listing at
        ``metrics_address`` (read-only); nothing while the tier is backing off."""
        listing = self._master_http("/get_all_keys") if self._health.healthy else None
        if listing is None:
            return
        n = len(self.key_prefix)
        for line in listing.splitlines():
            if not line.startswith(self.key_prefix):
                continue
            try:
                yield ArtifactKey.decode(line[n:].encode("utf-8"))
            except ValueError:
                continue

    def _stats(self) -> dict:
        """Occupancy is the whole store's (every client's keys: Mooncake accounts per cluster,
        not per prefix), from the master's Prometheus metrics, read at most once a second."""
        with self._extra_lock:
            extra = dict(self._extra)
        out = dict(self._occupancy())
        out.update(healthy=self.healthy, master_address=self.master_address,
                   protocol=self.protocol)
        for k in ("fast_misses", "faults", "recoveries", "transfer_failures", "lease_expired",
                  "refused", "delete_leased", "listing_failures", "registration_failures"):
            out[k] = extra.get(k, 0)
        out["registered_bytes"] = sum(n for _, n in self._registered)
        return out

    def _master_http(self, path: str) -> Optional[str]:
        """GET ``path`` from the master's HTTP server (``metrics_address``), or None (counted)."""
        try:
            return _http_get(self.options["metrics_address"], path, self.op_timeout_s)
        except OSError as exc:
            self._count("listing_failures")
            log.warning("mooncake tier: cannot read %s from %s: %s", path,
                        self.options["metrics_address"], exc)
            return None

    def _occupancy(self) -> dict:
        now = time.monotonic()
        if now - self._occupancy_at < 1.0 or not self._health.healthy:
            return self._last_occupancy
        self._occupancy_at = now
        text = self._master_http("/metrics")
        if text is None:
            return self._last_occupancy
        values = _occupancy_metrics(text)
        if "capacity_bytes" in values:
            self.capacity_bytes = values["capacity_bytes"]
        self._last_occupancy = values
        return values

    @classmethod
    def inspect(cls, section, cfg) -> dict:
        """What a configured store holds under ``key_prefix``, from the master's HTTP server
        alone (no Mooncake client is made, so nothing is set up or opened to listen). Stored
        bytes include each value's header slot; ``capacity_bytes`` is the whole store's."""
        opt = dict(DEFAULTS, **{k: getattr(section, k) for k in DEFAULTS if hasattr(section, k)})
        _validate(getattr(section, "name", None) or "mooncake", opt)
        address, timeout, prefix = opt["metrics_address"], float(opt["op_timeout_s"]), opt["key_prefix"]
        try:
            listing = _http_get(address, "/get_all_keys", timeout)
            capacity = _occupancy_metrics(_http_get(address, "/metrics", timeout))
        except OSError as exc:
            raise TierFault(f"tiers.mooncake: the master's HTTP server at metrics_address "
                            f"{address} cannot be read: {exc}") from None
        mine = [line for line in listing.splitlines() if line.startswith(prefix)]
        entries, unreadable = [], 0
        for lo in range(0, len(mine), _QUERY_BATCH):
            chunk = mine[lo:lo + _QUERY_BATCH]
            batch = [k for k in chunk if "," not in k]   # the query separates keys by commas
            unreadable += len(chunk) - len(batch)
            if not batch:
                continue
            query = ",".join(urllib.parse.quote(k, safe="") for k in batch)
            try:
                found = json.loads(_http_get(address, f"/batch_query_keys?keys={query}", timeout))
            except (OSError, ValueError) as exc:
                raise TierFault(f"tiers.mooncake: querying keys at {address} failed: {exc}") from None
            for mkey in batch:
                info = (found.get("data") or {}).get(mkey) or {}
                try:
                    key = ArtifactKey.decode(mkey[len(prefix):].encode("utf-8"))
                    entries.append((key, int(info["values"][0]["size_"])))
                except (ValueError, KeyError, IndexError, TypeError):
                    unreadable += 1
        return inspect_report("mooncake", f"mooncake://{opt['master_address']}/{prefix}",
                              capacity_bytes=capacity.get("capacity_bytes", 0), entries=entries,
                              unreadable=unreadable, master_address=opt["master_address"])

    def close(self) -> None:
        """Close the client. Objects in segments of other processes (a segment holder) stay;
        objects in this client's own segment (``global_segment_size`` > 0) go with it.
        The registered ranges are forgotten: the tiers that own that memory close with the
        chain, and a range unmapped and mapped again must never count as registered."""
        with self._store_lock:
            store, self._store = self._store, None
            self._registered = ()
        if store is not None:
            store.close()


def _covered(ranges, addr: int, nbytes: int) -> bool:
    """``[addr, addr + nbytes)`` lies inside one of the (address, bytes) ``ranges``."""
    return any(a <= addr and addr + nbytes <= a + n for a, n in ranges)


def _http_get(address: str, path: str, timeout: float) -> str:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as reply:
        return reply.read().decode("utf-8", "replace")


def _occupancy_metrics(text: str) -> dict:
    """The ``_OCCUPANCY`` values out of the master's Prometheus text."""
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _OCCUPANCY:
            try:
                values[_OCCUPANCY[name]] = int(float(value))
            except ValueError:
                continue
    return values


def _checked(key: ArtifactKey, heads: memoryview, i: int, nread: int, dest: torch.Tensor):
    """The artifact read for ``key`` once its header, padding and size are checked, or the
    ``CorruptArtifact`` that says what was wrong. ``heads``: the batch's header slots."""
    head = heads[i * HEADER_SLOT:(i + 1) * HEADER_SLOT]
    try:
        meta, hlen = ArtifactMeta.unpack(head, key.encode())
        if head[hlen:] != _ZERO_SLOT[hlen:]:
            raise CorruptArtifact("header padding is not zero")
        if meta.size != dest.numel() or nread != HEADER_SLOT + meta.size:
            raise CorruptArtifact(f"value is {nread} bytes, its header says "
                                  f"{HEADER_SLOT}+{meta.size}")
    except CorruptArtifact as exc:
        return exc
    return Artifact(meta, dest)


def _header(key: ArtifactKey, meta: ArtifactMeta) -> bytes:
    head = meta.pack(key.encode())
    return head + bytes(HEADER_SLOT - len(head))


def _validate(name: str, opt: dict) -> None:
    """Every option's type and range; ``ConfigError`` names the key."""
    def bad(key, why):
        raise ConfigError(f"tiers.{name}.{key}: {why} (got {opt[key]!r})")

    for key in ("master_address", "metrics_address"):
        if not isinstance(opt[key], str) or not _HOSTPORT.match(opt[key]):
            bad(key, "must be host:port")
    for key in ("metadata_server", "local_hostname", "device_names", "key_prefix"):
        if not isinstance(opt[key], str):
            bad(key, "must be a string")
    if not opt["local_hostname"]:
        bad("local_hostname", "must not be empty")
    if opt["protocol"] not in PROTOCOLS:
        bad("protocol", f"must be one of {', '.join(PROTOCOLS)}")
    for key in ("global_segment_size", "local_buffer_size", "replica_num"):
        if isinstance(opt[key], bool) or not isinstance(opt[key], int) or opt[key] < 0:
            bad(key, "must be an integer >= 0")
    if opt["replica_num"] < 1:
        bad("replica_num", "must be >= 1")
    for key in ("connect_timeout_s", "op_timeout_s", "retry_backoff_s", "retry_backoff_max_s"):
        if isinstance(opt[key], bool) or not isinstance(opt[key], (int, float)) or opt[key] <= 0:
            bad(key, "must be a number of seconds > 0")
    if opt["retry_backoff_max_s"] < opt["retry_backoff_s"]:
        bad("retry_backoff_max_s", "must be >= retry_backoff_s")
    if not isinstance(opt["verify_reads"], bool):
        bad("verify_reads", "must be true or false")
