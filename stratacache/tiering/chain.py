"""TierChain: the one owner of every call into the tiers, for reads and writes.

Tiers are ``stratacache.backends.base.Tier`` objects, ordered fastest first.
Link ``i`` joins tier ``i`` to tier ``i + 1`` and follows tier ``i``'s
``write_policy``:

* ``write_through``: a store reaches tier ``i + 1`` before it is acknowledged;
  one that tier ``i + 1`` refuses is reported as not stored (False).
* ``write_back``: the store is acknowledged by tier ``i``; the object is marked
  dirty and the flusher writes it down (then continues down the chain).

Reads (``load``, ``load_many``, ``lease``) walk an order of tier positions
(the engine's mode: the whole chain, one tier, or one tier first) and ask each
tier at most once; a hit in a later tier is copied into every tier before it
in the order whose ``promote`` is set. Which tiers' reads are checksum-verified
is the caller's policy (``verify``: a set of positions); the tiers do the
verify-and-drop themselves. When tier ``i`` evicts an object, it is written
down if it is still dirty on a write_back link, or if tier ``i`` has
``demote_on_evict``; otherwise it is simply dropped (a copy exists below).

Fault isolation: every call into a tier goes through ``_call``. An exception
from a tier (a dead server, an I/O error) is counted as that tier's error and
treated as a miss or a refused store, so callers never see tier faults; only
``InvalidArgument`` (the caller's mistake, e.g. an ``out`` buffer smaller than
the object) is re-raised. No chain-wide lock exists: each tier protects itself
and bytes are copied without any lock held.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Collection, Optional, Sequence

import torch

from stratacache.backends.base import Lease, Tier
from stratacache.core.artifact import Artifact, ArtifactMeta
from stratacache.core.errors import ConfigError, InvalidArgument, InvalidType
from stratacache.core.keys import ArtifactKey
from stratacache.tiering.flusher import GONE, WriteBackFlusher

log = logging.getLogger(__name__)

# config name -> "module:Class"; imported only when the tier is enabled.
TIER_CLASSES = {
    "cpu": "stratacache.backends.cpu:CpuTier",
    "shared": "stratacache.backends.shared:SharedRegionTier",
    "disk": "stratacache.backends.disk:DiskTier",
    "redis": "stratacache.backends.redis:RedisTier",
    "mooncake": "stratacache.backends.mooncake:MooncakeTier",
}
TIER_ORDER = ("cpu", "shared", "disk", "redis", "mooncake")


def tier_class(name: str) -> type:
    try:
        module, cls = TIER_CLASSES[name].split(":")
    except KeyError:
        raise InvalidArgument(f"unknown tier {name!r}; tiers are {', '.join(TIER_ORDER)}") from None
    return getattr(importlib.import_module(module), cls)


def inspect_tier(name: str, cfg) -> Optional[dict]:
    """The read-only ``inspect()`` report (``base.INSPECT_KEYS`` shape) on what the configured
    tier ``name`` holds, from outside any process using it; None for a tier private to the
    process that uses it (not ``inspectable``). Errors of the tier propagate."""
    cls = tier_class(name)
    if not cls.inspectable:
        return None
    return cls.inspect(cfg.tiers[name], cfg)


@dataclass
class TierSettings:
    """How one tier takes part in the chain (from its config section)."""

    write_policy: str = "write_through"   # of the link to the next tier below
    promote: bool = True
    demote_on_evict: bool = False

    @classmethod
    def from_config(cls, tier_cfg) -> "TierSettings":
        return cls(write_policy=tier_cfg.get("write_policy", "write_through"),
                   promote=tier_cfg.get("promote", True),
                   demote_on_evict=tier_cfg.get("demote_on_evict", False))


class TierChain:
    def __init__(self, tiers: Sequence[Tier], settings: Optional[Sequence[TierSettings]] = None, *,
                 retry_backoff_s: float = 0.1, retry_backoff_max_s: float = 10.0,
                 max_dirty_bytes: int = 1 << 30):
        self.tiers = list(tiers)
        for i, tier in enumerate(self.tiers):
            if not isinstance(tier, Tier):
                raise InvalidType(f"tiers[{i}] must be a stratacache.backends.base.Tier, "
                                  f"got {type(tier).__name__}")
        self.settings = list(settings) if settings is not None else [TierSettings() for _ in self.tiers]
        if len(self.settings) != len(self.tiers):
            raise InvalidArgument(f"settings has {len(self.settings)} entries for {len(self.tiers)} tiers")
        self.names = tuple(t.name for t in self.tiers)
        if len(set(self.names)) != len(self.names):
            raise InvalidArgument(f"tier names must be unique, got {list(self.names)}")
        self.persistent = tuple(bool(t.persistent) for t in self.tiers)
        self._all = tuple(range(len(self.tiers)))
        self.flusher = WriteBackFlusher(self._flush_one, retry_backoff_s=retry_backoff_s,
                                        retry_backoff_max_s=retry_backoff_max_s,
                                        max_dirty_bytes=max_dirty_bytes)
        self._closed: Optional[bool] = None   # close()'s result once closed
        self._close_lock = threading.Lock()
        self._owner_pid = os.getpid()
        _OPEN_CHAINS.add(self)
        self._errors = dict.fromkeys(self.names, 0)
        self._err_lock = threading.Lock()
        self._last_log = 0.0
        for i, tier in enumerate(self.tiers):
            # Only a victim that may have to go down needs the handler; without one the
            # tier frees victims at once, with no view of their bytes made.
            needs = i + 1 < len(self.tiers) and (self.settings[i].write_policy == "write_back"
                                                 or self.settings[i].demote_on_evict)
            tier.on_evict = self._evict_handler(i) if needs else None
        self._register_host_memory()

    def _register_host_memory(self) -> None:
        """Hand each tier that ``registers_memory`` the other tiers' host memory (the CPU
        arena, the shared region), once, here: payloads move between exactly those buffers,
        and neither is ever replaced. A refused registration is a counted fault, not fatal."""
        for i, tier in enumerate(self.tiers):
            if not tier.registers_memory:
                continue
            for j, other in enumerate(self.tiers):
                if j != i:
                    for memory in other.host_memory():
                        self._call(i, tier.register_memory, memory)

    @classmethod
    def from_config(cls, cfg, names: Optional[Sequence[str]] = None) -> "TierChain":
        enabled = [n for n in TIER_ORDER if cfg.tiers[n].enabled]
        if names is None:
            names = enabled
        else:
            names = list(names)
            for n in names:
                if n not in TIER_CLASSES:
                    raise InvalidArgument(f"tiers: unknown tier {n!r}; tiers are {', '.join(TIER_ORDER)}")
                if n not in enabled:
                    raise InvalidArgument(f"tiers: tier {n!r} is not enabled (set tiers.{n}.enabled: true)")
        if not names:
            raise ConfigError("tiers: no tier is enabled; enable at least one of " + ", ".join(TIER_ORDER))
        tiers = []
        try:
            for n in names:
                tiers.append(tier_class(n).from_config(cfg.tiers[n], cfg))
        except BaseException:
            for t in tiers:
                t.close()
            raise
        wb = cfg.writeback
        return cls(tiers, [TierSettings.from_config(cfg.tiers[n]) for n in names],
                   retry_backoff_s=wb.retry_backoff_s, retry_backoff_max_s=wb.retry_backoff_max_s,
                   max_dirty_bytes=wb.max_dirty_bytes)

    # -- fault isolation ---------------------------------------------------------------

    def _call(self, i: int, fn: Callable, *args, default=None, **kwargs):
        """``fn(*args, **kwargs)`` on tier ``i``: a fault is counted and gives ``default``;
        ``InvalidArgument`` (the caller's mistake) is re-raised."""
        try:
            return fn(*args, **kwargs)
        except InvalidArgument:
            raise
        except Exception as exc:
            self._record_error(i, exc)
            return default

    def _record_error(self, i: int, exc: BaseException) -> None:
        name = self.names[i]
        with self._err_lock:
            self._errors[name] += 1
            now = time.monotonic()
            quiet = now - self._last_log < 5.0
            if not quiet:
                self._last_log = now
        if not quiet:
            log.warning("stratacache tier %s failed (%s: %s); treated as a miss / failed store",
                        name, type(exc).__name__, exc)

    # -- writes ----------------------------------------------------------------------------

    def store(self, key: ArtifactKey, data: torch.Tensor, meta: ArtifactMeta, *,
              start: int = 0, only: bool = False) -> bool:
        """Store into the first tier from ``start`` that takes it, then down the links."""
        last = start + 1 if only else len(self.tiers)
        for i in range(start, last):
            if self._call(i, self.tiers[i].put, key, data, meta, default=False):
                return only or self._write_down_from(i, key, data, meta)
        return False

    def store_many(self, items: Sequence[tuple[ArtifactKey, torch.Tensor, ArtifactMeta]], *,
                   start: int = 0, only: bool = False) -> list[bool]:
        """Batched ``store``: each tier gets one ``put_many`` (remote tiers pipeline it)."""
        ok = [False] * len(items)
        pending = list(range(len(items)))
        last = start + 1 if only else len(self.tiers)
        for i in range(start, last):
            if not pending:
                break
            res = self._call(i, self.tiers[i].put_many, [items[j] for j in pending],
                             default=[False] * len(pending))
            here = [j for j, r in zip(pending, res) if r]
            pending = [j for j, r in zip(pending, res) if not r]
            down = [True] * len(here) if only else \
                self._write_down_many(i, [items[j] for j in here])
            for j, reached in zip(here, down):
                ok[j] = reached
        return ok

    def _write_down_many(self, i: int, items: list) -> list[bool]:
        """Batched ``_write_down_from``: one ``put_many`` per write_through link."""
        reached = [True] * len(items)
        todo = list(range(len(items)))
        while todo and i + 1 < len(self.tiers):
            if self.settings[i].write_policy == "write_back":
                for j in todo:
                    key, _data, meta = items[j]
                    self.flusher.mark(i, key, meta.size)
                break
            res = self._call(i + 1, self.tiers[i + 1].put_many, [items[j] for j in todo],
                             default=[False] * len(todo))
            for j, r in zip(todo, res):
                reached[j] = reached[j] and bool(r)
            todo = [j for j, r in zip(todo, res) if r]
            i += 1
        return reached

    def _write_down_from(self, i: int, key: ArtifactKey, data: torch.Tensor, meta: ArtifactMeta) -> bool:
        """``key`` was just stored in tier ``i``: follow the links below it. True when every
        write_through link on the way took it (down to the end, or to a write_back link,
        whose flusher then owns it); False when a tier below refused it (counted by the
        tier / ``_call``; the copies above stay, and the caller is told it was not stored
        as its write_through links promise)."""
        while i + 1 < len(self.tiers):
            if self.settings[i].write_policy == "write_back":
                self.flusher.mark(i, key, meta.size)
                return True
            if not self._call(i + 1, self.tiers[i + 1].put, key, data, meta, default=False):
                return False
            i += 1
        return True

    def _flush_one(self, link: int, key: ArtifactKey, spilled: Optional[Artifact]):
        """Flusher callback: write ``key`` from tier ``link`` (or its spilled copy) down."""
        if spilled is not None:
            lease = Lease(spilled, "spilled")
        else:
            lease = self._call(link, self.tiers[link].acquire, key)
            if lease is None:
                # Gone from the upper tier: deleted (nothing to do) or evicted (its
                # eviction handler writes it down or spills it, perhaps right now).
                return GONE
        with lease as art:
            if self._call(link + 1, self.tiers[link + 1].put, key, art.data, art.meta, default=False):
                self._write_down_from(link + 1, key, art.data, art.meta)
                return True
            return False

    def _evict_handler(self, i: int):
        def on_evict(key: ArtifactKey, art: Artifact) -> None:
            dirty = self.flusher.take(i, key)
            if not (dirty or self.settings[i].demote_on_evict):
                return
            lower = self.tiers[i + 1]
            if not dirty and self._call(i + 1, lower.contains, [key.encode()], default=[False])[0]:
                return
            if self._call(i + 1, lower.put, key, art.data, art.meta, default=False):
                self._write_down_from(i + 1, key, art.data, art.meta)
            elif dirty:
                self.flusher.spill(i, key, art)
        return on_evict

    # -- reads -------------------------------------------------------------------------------
    # ``order``: tier positions to ask, in turn (default: the whole chain, top-down).
    # ``verify``: positions whose reads are checksum-verified (the engine's policy).

    def load(self, key: ArtifactKey, out: Optional[torch.Tensor] = None, *,
             order: Optional[Sequence[int]] = None, verify: Collection[int] = ()) -> Optional[Artifact]:
        """The first tier's copy in ``order`` (into ``out`` when given), promoted; None on a miss."""
        order = self._all if order is None else order
        for i in order:
            art = self._call(i, self.tiers[i].get, key, out, verify=i in verify)
            if art is not None:
                self._promote([(key, art)], i, order)
                return art
        return None

    def load_many(self, keys: Sequence[ArtifactKey], outs: Optional[Sequence[Optional[torch.Tensor]]] = None,
                  *, order: Optional[Sequence[int]] = None,
                  verify: Collection[int] = ()) -> list[Optional[Artifact]]:
        """Batched ``load``: one ``get_many`` per tier for the keys still missing."""
        order = self._all if order is None else order
        results: list[Optional[Artifact]] = [None] * len(keys)
        todo = list(range(len(keys)))
        for i in order:
            if not todo:
                break
            sub_outs = None if outs is None else [outs[j] for j in todo]
            arts = self._call(i, self.tiers[i].get_many, [keys[j] for j in todo], sub_outs,
                              verify=i in verify)
            if arts is None:
                continue
            found = []
            for j, art in zip(todo, arts):
                if art is not None:
                    results[j] = art
                    found.append(j)
            if found:
                self._promote([(keys[j], results[j]) for j in found], i, order)
                todo = [j for j in todo if results[j] is None]
        return results

    def lease(self, key: ArtifactKey, lease_s: Optional[float] = None, *,
              order: Optional[Sequence[int]] = None, verify: Collection[int] = ()) -> Optional[Lease]:
        """A ``Lease`` from the first tier in ``order`` holding ``key`` (a view of its memory
        on zero_copy tiers, an owned copy elsewhere); None on a miss. Not promoted: the holder
        reads the bytes where they are, and a copy into a tier above would be a second copy on
        the path that needs a lease most (the vLLM worker's KV loads from the shared region)."""
        order = self._all if order is None else order
        for i in order:
            lease = self._leased(i, self._call(i, self.tiers[i].acquire, key, lease_s,
                                               verify=i in verify))
            if lease is not None:
                return lease
        return None

    def hold(self, keys: Sequence[ArtifactKey], lease_s: Optional[float] = None) -> list[Lease]:
        """Leases on every in-memory copy (the zero_copy tiers') of ``keys``, so nothing
        evicts them until released or ``lease_s`` passes; for objects that must stay
        resident (an offloaded model's weights). Unverified, nothing promoted."""
        encoded = [key.encode() for key in keys]
        leases = []
        for i, tier in enumerate(self.tiers):
            if not tier.zero_copy:
                continue
            present = self._call(i, tier.contains, encoded, default=[False] * len(keys))
            for key, here in zip(keys, present):
                lease = self._leased(i, self._call(i, tier.acquire, key, lease_s)) if here else None
                if lease is not None:
                    leases.append(lease)
        return leases

    def _leased(self, i: int, lease: Optional[Lease]) -> Optional[Lease]:
        """``lease`` with its release fault-isolated like every other call into tier ``i``."""
        if lease is None or not lease.held:
            return lease
        return Lease(lease.artifact, lease.tier, lambda: self._call(i, lease.release))

    def contains(self, encoded_keys: Sequence[bytes], *,
                 order: Optional[Sequence[int]] = None) -> list[bool]:
        """Whether each key (``ArtifactKey.encode()`` bytes) is in some tier of ``order``;
        each tier is asked once, for the keys not yet found; no data moves."""
        order = self._all if order is None else order
        present = [False] * len(encoded_keys)
        todo = list(range(len(encoded_keys)))
        for i in order:
            if not todo:
                break
            batch = encoded_keys if len(todo) == len(encoded_keys) else [encoded_keys[j] for j in todo]
            hits = self._call(i, self.tiers[i].contains, batch, default=[False] * len(todo))
            for j, hit in zip(todo, hits):
                present[j] = bool(hit)
            todo = [j for j in todo if not present[j]]
        return present

    def _promote(self, hits: list[tuple[ArtifactKey, Artifact]], found: int, order: Sequence[int]) -> None:
        """Copy hits of tier ``found`` into the tiers before it in ``order`` that promote."""
        for i in order:
            if i == found:
                return
            if self.settings[i].promote:
                if len(hits) == 1:
                    key, art = hits[0]
                    self._call(i, self.tiers[i].put, key, art.data, art.meta)
                else:
                    self._call(i, self.tiers[i].put_many, [(k, a.data, a.meta) for k, a in hits])

    # -- the rest ------------------------------------------------------------------------------

    def delete(self, key: ArtifactKey) -> bool:
        self.flusher.forget(key)
        removed = False
        for i, tier in enumerate(self.tiers):
            removed = bool(self._call(i, tier.delete, key, default=False)) or removed
        return removed

    def start_prefault(self) -> None:
        """Ask every tier to start mapping its stored objects in the background (a hint)."""
        for i, tier in enumerate(self.tiers):
            self._call(i, tier.start_prefault)

    def stats(self) -> dict:
        """Per tier name: the tier's ``stats()``, its ``errors`` including the faults counted here."""
        with self._err_lock:
            errors = dict(self._errors)
        out = {}
        for i, tier in enumerate(self.tiers):
            s = dict(self._call(i, tier.stats, default=None) or {"tier": tier.name})
            s["errors"] = s.get("errors", 0) + errors[tier.name]
            out[tier.name] = s
        return out

    def flush(self, timeout: Optional[float] = None) -> bool:
        return self.flusher.flush(timeout)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Drain the write_back links, stop the flusher and close every tier (once)."""
        with self._close_lock:
            if self._closed is not None:
                return self._closed
            _OPEN_CHAINS.discard(self)
            drained = self.flusher.close(timeout)
            for i, tier in enumerate(self.tiers):
                self._call(i, tier.close)
            self._closed = drained
            return drained


# Chains not yet closed. At a normal interpreter exit each is closed (drained) by the atexit
# hook below, so a store acknowledged over a write_back link is written down even when the
# program never called close(). It also stops the flusher thread before the interpreter
# finalizes: a daemon thread still inside a native call with the GIL released (the disk
# tier's write_record) would otherwise wake into a finalizing interpreter, be unwound
# through pybind11's noexcept gil_scoped_release destructor, and abort the process with
# "terminate called without an active exception".
_OPEN_CHAINS: "weakref.WeakSet[TierChain]" = weakref.WeakSet()


@atexit.register
def _close_open_chains() -> None:
    for chain in list(_OPEN_CHAINS):
        if chain._owner_pid == os.getpid():   # a forked child's copies are its parent's
            chain.close()
