"""TierChain: ordered memory layers with read-through, promotion and per-link write policies.

Tiers are ordered fastest first. Link ``i`` joins tier ``i`` to tier ``i + 1``
and follows tier ``i``'s ``write_policy``:

* ``write_through``: a store reaches tier ``i + 1`` before it is acknowledged;
  one that tier ``i + 1`` refuses is reported as not stored (False).
* ``write_back``: the store is acknowledged by tier ``i``; the object is marked
  dirty and the flusher writes it down (then continues down the chain).

A chain read looks top-down; a hit in tier ``j`` is copied into every tier
above it whose ``promote`` is set. When tier ``i`` evicts an object, it is
written down if it is still dirty on a write_back link, or if tier ``i`` has
``demote_on_evict``; otherwise it is simply dropped (a copy exists below).

Every call into a tier goes through ``_call``: a tier that raises (a dead
server, an I/O error) is counted as an error and treated as a miss or a
failed store, so callers never see tier faults. No chain-wide lock exists;
each tier protects itself and bytes are copied without any lock held.
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
from typing import Callable, Optional, Sequence

import torch

from stratacache.core.artifact import Artifact, ArtifactMeta
from stratacache.core.keys import ArtifactKey
from stratacache.tiering.flusher import GONE, WriteBackFlusher

log = logging.getLogger(__name__)

# config name -> "module:Class"; imported only when the tier is enabled.
TIER_CLASSES = {
    "cpu": "stratacache.backends.cpu:CpuMemoryLayer",
    "shared": "stratacache.backends.shared:SharedRegionLayer",
    "disk": "stratacache.backends.disk:DiskMemoryLayer",
    "redis": "stratacache.backends.redis:RedisMemoryLayer",
}
TIER_ORDER = ("cpu", "shared", "disk", "redis")


def tier_class(name: str):
    try:
        module, cls = TIER_CLASSES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown tier {name!r}; tiers are {', '.join(TIER_ORDER)}") from None
    return getattr(importlib.import_module(module), cls)


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
    def __init__(self, tiers: Sequence, settings: Optional[Sequence[TierSettings]] = None, *,
                 retry_backoff_s: float = 0.1, retry_backoff_max_s: float = 10.0,
                 max_dirty_bytes: int = 1 << 30):
        self.tiers = list(tiers)
        self.settings = list(settings) if settings is not None else [TierSettings() for _ in self.tiers]
        if len(self.settings) != len(self.tiers):
            raise ValueError("one TierSettings per tier is required")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.index = {t.name: i for i, t in enumerate(self.tiers)}
        self.flusher = WriteBackFlusher(self._flush_one, retry_backoff_s=retry_backoff_s,
                                        retry_backoff_max_s=retry_backoff_max_s,
                                        max_dirty_bytes=max_dirty_bytes)
        self._closed: Optional[bool] = None   # close()'s result once closed
        self._close_lock = threading.Lock()
        self._owner_pid = os.getpid()
        _OPEN_CHAINS.add(self)
        self._errors = {t.name: 0 for t in self.tiers}
        self._err_lock = threading.Lock()
        self._last_log = 0.0
        for i, tier in enumerate(self.tiers):
            # Only a victim that may have to go down needs the handler; without one the
            # tier frees victims at once, with no view of their bytes made.
            needs = i + 1 < len(self.tiers) and (self.settings[i].write_policy == "write_back"
                                                 or self.settings[i].demote_on_evict)
            tier.on_evict = self._evict_handler(i) if needs else None

    @classmethod
    def from_config(cls, cfg, names: Optional[Sequence[str]] = None) -> "TierChain":
        enabled = [n for n in TIER_ORDER if cfg.tiers[n].enabled]
        if names is None:
            names = enabled
        else:
            names = list(names)
            for n in names:
                if n not in TIER_CLASSES:
                    raise ValueError(f"tiers: unknown tier {n!r}; tiers are {', '.join(TIER_ORDER)}")
                if n not in enabled:
                    raise ValueError(f"tiers: tier {n!r} is not enabled (set tiers.{n}.enabled: true)")
        if not names:
            raise ValueError("tiers: no tier is enabled; enable at least one of " + ", ".join(TIER_ORDER))
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

    def _call(self, i: int, fn: Callable, *args, default=None):
        try:
            return fn(*args)
        except Exception as exc:
            self.record_error(i, exc)
            return default

    def record_error(self, i: int, exc: BaseException) -> None:
        name = self.tiers[i].name
        with self._err_lock:
            self._errors[name] += 1
            now = time.monotonic()
            quiet = now - self._last_log < 5.0
            if not quiet:
                self._last_log = now
        if not quiet:
            log.warning("stratacache tier %s failed (%s: %s); treated as a miss / failed store",
                        name, type(exc).__name__, exc)

    def errors(self) -> dict:
        with self._err_lock:
            return dict(self._errors)

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
        upper, lower = self.tiers[link], self.tiers[link + 1]
        if spilled is not None:
            art, pinned = spilled, False
        else:
            pinned = bool(self._call(link, upper.pin, key, default=False))
            art = self._call(link, upper.get, key) if pinned else None
            if art is None:
                if pinned:
                    self._call(link, upper.unpin, key)
                # Gone from the upper tier: deleted (nothing to do) or evicted (its
                # eviction handler writes it down or spills it, perhaps right now).
                return GONE
        try:
            if self._call(link + 1, lower.put, key, art.data, art.meta, default=False):
                self._write_down_from(link + 1, key, art.data, art.meta)
                return True
            return False
        finally:
            if pinned:
                self._call(link, upper.unpin, key)

    def _evict_handler(self, i: int):
        def on_evict(key: ArtifactKey, art: Artifact) -> None:
            dirty = self.flusher.take(i, key)
            if not (dirty or self.settings[i].demote_on_evict):
                return
            lower = self.tiers[i + 1]
            if not dirty and self._call(i + 1, lower.contains, key, default=False):
                return
            if self._call(i + 1, lower.put, key, art.data, art.meta, default=False):
                self._write_down_from(i + 1, key, art.data, art.meta)
            elif dirty:
                self.flusher.spill(i, key, art)
        return on_evict

    # -- reads -------------------------------------------------------------------------------

    def find(self, key: ArtifactKey, order: Sequence[int]) -> Optional[int]:
        for i in order:
            if self._call(i, self.tiers[i].contains, key, default=False):
                return i
        return None

    def promote(self, key: ArtifactKey, art: Artifact, found: int, order: Sequence[int]) -> None:
        """Copy a hit from tier ``found`` into the tiers before it in ``order`` that promote."""
        for i in order:
            if i == found:
                return
            if self.settings[i].promote:
                self._call(i, self.tiers[i].put, key, art.data, art.meta, default=False)

    def delete(self, key: ArtifactKey) -> bool:
        self.flusher.forget(key)
        removed = False
        for i, tier in enumerate(self.tiers):
            removed = bool(self._call(i, tier.delete, key, default=False)) or removed
        return removed

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
