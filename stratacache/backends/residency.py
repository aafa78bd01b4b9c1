"""The resident-object table shared by the CPU and disk tiers, and ``TableTier``,
the part of both tiers that only consults it.

It owns what both tiers must get exactly right: byte accounting against the
capacity and per-kind quotas, the eviction order, reader reference counts,
leases (each holder's own, expiring), and the rule that an object's space is
reused only when nobody reads it. The tier supplies where bytes live (an arena offset, a
file) through three callables; the table never copies payload bytes, and a
tier copies them with the table's lock released.

Life of an object: ``admit`` (space reserved and accounted, not yet visible)
-> the tier writes the bytes -> ``publish`` (visible, evictable) -> ``detach``
(gone from the index; its space is freed once no reader or lease holds it).
Accounting drops only when space is actually freed, so ``used_bytes`` never
under-reports what the tier occupies.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any, Callable, Iterator, Optional

import torch

from stratacache.backends.base import Tier
from stratacache.backends.eviction import make_policy
from stratacache.core.artifact import Artifact, ArtifactMeta
from stratacache.core.errors import CorruptArtifact
from stratacache.core.keys import ArtifactKey, key_bytes


class Entry:
    __slots__ = ("key", "kb", "meta", "loc", "size", "refs", "leases")

    def __init__(self, key: ArtifactKey, kb: bytes, meta: ArtifactMeta, loc: Any, size: int):
        self.key, self.kb, self.meta, self.loc = key, kb, meta, loc
        self.size = size                  # bytes charged: the payload plus any per-object overhead
        self.refs = 0
        self.leases: list[float] = []     # monotonic deadlines of the leases held, soonest first

    def busy(self, now: float) -> bool:
        if self.leases and self.leases[0] <= now:
            self.leases = [d for d in self.leases if d > now]
        return self.refs > 0 or bool(self.leases)


class ObjectTable:
    """Index + accounting + eviction for one tier. All methods take ``self.lock``.

    Internally objects are keyed by ``key.encode()`` bytes, so lookups by
    already-encoded keys (``TableTier.contains``) need no key objects at all.
    """

    def __init__(self, capacity_bytes: int, eviction: str = "lru", lease_s: float = 30.0,
                 quotas: Optional[dict] = None, priorities: Optional[dict] = None):
        self.capacity = int(capacity_bytes)
        self.lease_s = float(lease_s)
        self.quotas = {k: v for k, v in (quotas or {}).items() if v is not None}
        self.priorities = dict(priorities or {})
        self.policy = make_policy(eviction, self.capacity)
        self.lock = threading.RLock()
        self.entries: dict[bytes, Entry] = {}   # key.encode() -> visible entry
        self.used = 0
        self.used_by_kind: dict[str, int] = {}
        self._detached: set[Entry] = set()      # out of the index, space still held by a reader/lease
        self.evictions = 0
        self.evicted_bytes = 0

    # -- admission ---------------------------------------------------------------

    def admit(self, key: ArtifactKey, meta: ArtifactMeta,
              place: Callable[[int], Any], free_loc: Callable[[Entry], None],
              on_evict: Optional[Callable[[ArtifactKey, Artifact], None]] = None,
              evict_view: Optional[Callable[[Entry], Artifact]] = None,
              overhead: int = 0) -> Optional[Entry]:
        """Reserve room for ``key`` (evicting as needed); None when it cannot fit.

        ``place(size)`` returns a location or None (e.g. no contiguous run yet);
        ``free_loc`` releases one. With ``on_evict``, victims are handed to it
        with the lock released and their space is reused only afterwards.
        ``overhead`` bytes (e.g. a file header) are charged on top of the payload.
        An object already stored under ``key`` stays readable until ``publish``,
        unless room is needed: then it goes first (it is being replaced), so an
        overwrite never evicts another object to make room beside its own old version.
        """
        size = meta.size + overhead
        kind = key.kind
        quota = self.quotas.get(kind) if self.quotas else None
        capacity = self.capacity
        if size > capacity or (quota is not None and size > quota):
            return None
        kb = key_bytes(key)
        while True:
            held: list[Entry] = []
            with self.lock:
                if self._detached:
                    self._reap(free_loc)
                while True:
                    if self.used + size <= capacity and \
                            (quota is None or self.used_by_kind.get(kind, 0) + size <= quota):
                        loc = place(size)
                        if loc is not None:
                            self.used += size
                            self.used_by_kind[kind] = self.used_by_kind.get(kind, 0) + size
                            return Entry(key, kb, meta, loc, size)
                    old = self.entries.get(kb)
                    if old is not None and not held:
                        self._detach(old, free_loc)   # replaced anyway: not an eviction
                        continue
                    pending = sum(e.size for e in held)
                    need_quota = quota is not None and \
                        self.used_by_kind.get(kind, 0) - pending + size > quota
                    if held and not need_quota and self.used - pending + size <= capacity:
                        break   # enough is being evicted; place after the write-down
                    victim = self._pick_victim(kind, need_quota)
                    if victim is None:
                        if held:
                            break
                        return None
                    self.evictions += 1
                    self.evicted_bytes += victim.size
                    if on_evict is None:
                        self._free(victim, free_loc)
                    else:
                        victim.refs += 1
                        self._detached.add(victim)
                        held.append(victim)
            for victim in held:
                try:
                    on_evict(victim.key, evict_view(victim))
                finally:
                    self.release(victim, free_loc)

    def publish(self, entry: Entry, free_loc: Callable[[Entry], None]) -> None:
        """Make an admitted entry visible, replacing the object previously stored under its key."""
        with self.lock:
            old = self.entries.get(entry.kb)
            if old is not None:
                self._detach(old, free_loc)
            self.entries[entry.kb] = entry
            self.policy.insert(entry.kb, entry.size)

    def abort(self, entry: Entry, free_loc: Callable[[Entry], None]) -> None:
        """Give back an admitted entry whose bytes could not be written."""
        with self.lock:
            self._free(entry, free_loc)

    # -- readers and leases --------------------------------------------------------

    def acquire(self, key: ArtifactKey) -> Optional[Entry]:
        """The entry with a reader reference held (release it), or None."""
        kb = key_bytes(key)
        with self.lock:
            entry = self.entries.get(kb)
            if entry is None:
                return None
            entry.refs += 1
            self.policy.touch(kb)
            return entry

    def release(self, entry: Entry, free_loc: Callable[[Entry], None]) -> None:
        with self.lock:
            entry.refs -= 1
            if self._detached:
                self._free_if_idle(entry, free_loc)

    def pin(self, key: ArtifactKey, lease_s: Optional[float] = None) -> Optional[tuple[Entry, float]]:
        """Lease the object now stored under ``key``: (entry, deadline), or None on a miss.
        ``release_lease(entry, deadline)`` ends exactly this lease, whoever else holds one.

        Leases last at most the table's ``lease_s``, so a leaked lease cannot hold space forever.
        """
        lease = self.lease_s if lease_s is None else min(float(lease_s), self.lease_s)
        kb = key_bytes(key)
        with self.lock:
            entry = self.entries.get(kb)
            if entry is None:
                return None
            deadline = time.monotonic() + lease
            bisect.insort(entry.leases, deadline)
            self.policy.touch(kb)
            return entry, deadline

    def release_lease(self, entry: Entry, deadline: float, free_loc: Callable[[Entry], None]) -> None:
        """End one lease of ``entry`` early (it may have been replaced or deleted meanwhile)."""
        with self.lock:
            try:
                entry.leases.remove(deadline)
            except ValueError:
                pass   # already expired and pruned
            self._free_if_idle(entry, free_loc)

    # -- lookups and removal -----------------------------------------------------------

    def get(self, key: ArtifactKey) -> Optional[Entry]:
        return self.entries.get(key_bytes(key))

    def __contains__(self, key: ArtifactKey) -> bool:
        return key_bytes(key) in self.entries

    def remove(self, key: ArtifactKey, free_loc: Callable[[Entry], None]) -> bool:
        with self.lock:
            entry = self.entries.get(key_bytes(key))
            if entry is None:
                return False
            self._detach(entry, free_loc)
            return True

    def remove_entry(self, entry: Entry, free_loc: Callable[[Entry], None]) -> bool:
        """Remove ``entry`` only if it is still the object stored under its key."""
        with self.lock:
            if self.entries.get(entry.kb) is not entry:
                return False
            self._detach(entry, free_loc)
            return True

    def clear(self, free_loc: Callable[[Entry], None]) -> None:
        with self.lock:
            for entry in list(self.entries.values()):
                self._detach(entry, free_loc)

    def leased_count(self) -> int:
        """Objects held by at least one unexpired lease; call with ``self.lock`` held."""
        now = time.monotonic()
        return sum(1 for e in self.entries.values() if e.leases and e.busy(now))

    # -- internals (lock held) -------------------------------------------------------

    def _pick_victim(self, kind: str, same_kind_only: bool) -> Optional[Entry]:
        now = time.monotonic()
        entries, priorities = self.entries, self.priorities
        prio = priorities.get(kind, 0)

        def eligible(kb: bytes) -> bool:
            entry = entries[kb]
            if entry.busy(now):
                return False
            if same_kind_only:
                return entry.key.kind == kind
            return priorities.get(entry.key.kind, 0) <= prio

        kb = self.policy.victim(eligible)
        return None if kb is None else entries.pop(kb)

    def _detach(self, entry: Entry, free_loc) -> None:
        del self.entries[entry.kb]
        self.policy.remove(entry.kb)
        if entry.refs or (entry.leases and entry.busy(time.monotonic())):
            self._detached.add(entry)
        else:
            self._free(entry, free_loc)

    def _free_if_idle(self, entry: Entry, free_loc) -> None:
        if entry in self._detached and not entry.busy(time.monotonic()):
            self._detached.discard(entry)
            self._free(entry, free_loc)

    def _reap(self, free_loc) -> None:
        now = time.monotonic()
        for entry in [e for e in self._detached if not e.busy(now)]:
            self._detached.discard(entry)
            self._free(entry, free_loc)

    def _free(self, entry: Entry, free_loc) -> None:
        self.used -= entry.size
        self.used_by_kind[entry.key.kind] -= entry.size   # charged by admit, so present
        free_loc(entry)




class TableTier(Tier):
    """The ``Tier`` methods of a tier whose objects an ``ObjectTable`` indexes (CPU, disk).

    ``_put`` and ``_get`` are templates: the tier supplies ``_admit`` (reserve
    space, or None), ``_write`` (copy the bytes in, no lock held; False on an
    I/O failure) and ``_read`` (copy or view the bytes out; ``CorruptArtifact``
    for a damaged object). A subclass sets ``self._table`` and
    ``self._free_loc`` and implements ``from_config`` and ``close``.
    """

    _table: ObjectTable
    _free_loc: Callable[[Entry], None]

    def _admit(self, key: ArtifactKey, meta: ArtifactMeta) -> Optional[Entry]:
        raise NotImplementedError

    def _write(self, entry: Entry, data: torch.Tensor) -> bool:
        raise NotImplementedError

    def _read(self, entry: Entry, out: Optional[torch.Tensor]) -> Artifact:
        raise NotImplementedError

    def _put(self, key: ArtifactKey, data: torch.Tensor, meta: ArtifactMeta) -> bool:
        entry = self._admit(key, meta)
        if entry is None:
            return False
        if not self._write(entry, data):
            self._table.abort(entry, self._free_loc)
            return False
        self._table.publish(entry, self._free_loc)
        return True

    def _get(self, key: ArtifactKey, out: Optional[torch.Tensor]) -> Optional[Artifact]:
        table = self._table
        entry = table.acquire(key)
        if entry is None:
            return None
        try:
            return self._read(entry, out)
        except CorruptArtifact:
            table.remove_entry(entry, self._free_loc)   # exactly the version read, not a newer one
            raise
        finally:
            table.release(entry, self._free_loc)

    def _drop(self, key: ArtifactKey, art: Optional[Artifact]) -> None:
        """Remove the version ``art`` was read from. Its meta is the entry's own object,
        so a version stored since is left alone. Without ``art`` (``_read`` raised),
        ``_get`` has already removed the bad version."""
        if art is None:
            return
        table = self._table
        with table.lock:
            entry = table.entries.get(key_bytes(key))
            if entry is not None and entry.meta is art.meta:
                table.remove_entry(entry, self._free_loc)

    def contains(self, encoded_keys) -> list[bool]:
        entries = self._table.entries   # lock-free: a dict probe is atomic
        return [kb in entries for kb in encoded_keys]

    def delete(self, key: ArtifactKey) -> bool:
        removed = self._table.remove(key, self._free_loc)
        if removed:
            self.counters.add("deletes")
        return removed

    def keys(self) -> Iterator[ArtifactKey]:
        with self._table.lock:
            return iter([e.key for e in self._table.entries.values()])

    def _stats(self) -> dict:
        t = self._table
        with t.lock:
            return {"items": len(t.entries), "used_bytes": t.used, "evictions": t.evictions,
                    "evicted_bytes": t.evicted_bytes, "used_by_kind": dict(t.used_by_kind),
                    "leased": t.leased_count(), "eviction_policy": t.policy.name}
