"""The resident-object table shared by the CPU and disk tiers.

It owns what both tiers must get exactly right: byte accounting against the
capacity and per-kind quotas, the eviction order, reader reference counts,
pins as expiring leases, and the rule that an object's space is reused only
when nobody reads it. The tier supplies where bytes live (an arena offset, a
file) through three callables; the table never copies payload bytes, and a
tier copies them with the table's lock released.

Life of an object: ``admit`` (space reserved and accounted, not yet visible)
-> the tier writes the bytes -> ``publish`` (visible, evictable) -> ``detach``
(gone from the index; its space is freed once no reader or lease holds it).
Accounting drops only when space is actually freed, so ``used_bytes`` never
under-reports what the tier occupies.
"""

from __future__ import annotations

import operator
import threading
import time
from typing import Any, Callable, Optional

from stratacache.backends.base import BatchDefaults
from stratacache.backends.eviction import make_policy
from stratacache.core.artifact import Artifact, ArtifactMeta
from stratacache.core.keys import ArtifactKey


# (kind, namespace, name): hashed and compared in C, unlike the dataclass key itself.
key_tuple = operator.attrgetter("kind", "namespace", "name")


class Entry:
    __slots__ = ("key", "meta", "loc", "size", "refs", "leases", "visible")

    def __init__(self, key: ArtifactKey, meta: ArtifactMeta, loc: Any, size: int):
        self.key, self.meta, self.loc = key, meta, loc
        self.size = size                  # bytes charged: the payload plus any per-object overhead
        self.refs = 0
        self.leases: list[float] = []     # monotonic deadlines of pins
        self.visible = False

    def busy(self, now: float) -> bool:
        if self.leases and self.leases[0] <= now:
            self.leases = [d for d in self.leases if d > now]
        return self.refs > 0 or bool(self.leases)


class ObjectTable:
    """Index + accounting + eviction for one tier. All methods take ``self.lock``."""

    def __init__(self, capacity_bytes: int, eviction: str = "lru", lease_s: float = 30.0,
                 quotas: Optional[dict] = None, priorities: Optional[dict] = None):
        self.capacity = int(capacity_bytes)
        self.lease_s = float(lease_s)
        self.quotas = dict(quotas or {})
        self.priorities = dict(priorities or {})
        self.policy = make_policy(eviction, self.capacity)
        self.lock = threading.RLock()
        self.entries: dict[ArtifactKey, Entry] = {}
        self.present: set[tuple] = set()        # key_tuple of every visible entry (fast lookups)
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
        """
        size = meta.size + overhead
        kind = key.kind
        quota = self.quotas.get(kind)
        if size > self.capacity or (quota is not None and size > quota):
            return None
        prio = self.priorities.get(kind, 0)
        while True:
            held: list[Entry] = []
            with self.lock:
                old = self.entries.get(key)
                if old is not None:
                    self._detach(old, free_loc)
                self._reap(free_loc)
                while True:
                    if self._fits(kind, size, quota):
                        loc = place(size)
                        if loc is not None:
                            entry = Entry(key, meta, loc, size)
                            self._account(entry, +1)
                            return entry
                    pending = sum(e.size for e in held)
                    need_quota = quota is not None and \
                        self.used_by_kind.get(kind, 0) - pending + size > quota
                    if held and not need_quota and self.used - pending + size <= self.capacity:
                        break   # enough is being evicted; place after the write-down
                    victim = self._pick_victim(kind, prio, need_quota)
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
        """Make an admitted entry visible (replacing any object published meanwhile)."""
        with self.lock:
            old = self.entries.get(entry.key)
            if old is not None:
                self._detach(old, free_loc)
            entry.visible = True
            self.entries[entry.key] = entry
            self.present.add(key_tuple(entry.key))
            self.policy.insert(entry.key, entry.size)

    def abort(self, entry: Entry, free_loc: Callable[[Entry], None]) -> None:
        """Give back an admitted entry whose bytes could not be written."""
        with self.lock:
            self._free(entry, free_loc)

    # -- readers and leases --------------------------------------------------------

    def acquire(self, key: ArtifactKey, touch: bool = True) -> Optional[Entry]:
        """The entry with a reader reference held (release it), or None."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return None
            entry.refs += 1
            if touch:
                self.policy.touch(key)
            return entry

    def release(self, entry: Entry, free_loc: Callable[[Entry], None]) -> None:
        with self.lock:
            entry.refs -= 1
            self._free_if_idle(entry, free_loc)

    def pin(self, key: ArtifactKey, lease_s: Optional[float] = None) -> Optional[tuple[Entry, float]]:
        """Lease the object now stored under ``key``: (entry, deadline), or None on a miss.

        Leases last at most the table's ``lease_s``, so a leaked pin cannot hold space forever.
        """
        lease = self.lease_s if lease_s is None else min(float(lease_s), self.lease_s)
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return None
            deadline = time.monotonic() + lease
            entry.leases.append(deadline)
            entry.leases.sort()
            return entry, deadline

    def release_lease(self, entry: Entry, deadline: float, free_loc: Callable[[Entry], None]) -> None:
        """End one lease of ``entry`` early (it may have been replaced or deleted meanwhile)."""
        with self.lock:
            try:
                entry.leases.remove(deadline)
            except ValueError:
                pass   # already expired and pruned
            self._free_if_idle(entry, free_loc)

    def unpin(self, key: ArtifactKey, free_loc: Callable[[Entry], None]) -> None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None and entry.leases:
                entry.leases.pop()
            self._reap(free_loc)

    # -- removal -------------------------------------------------------------------

    def remove(self, key: ArtifactKey, free_loc: Callable[[Entry], None]) -> bool:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return False
            self._detach(entry, free_loc)
            return True

    def clear(self, free_loc: Callable[[Entry], None]) -> None:
        with self.lock:
            for entry in list(self.entries.values()):
                self._detach(entry, free_loc)

    def prefix_count(self, keys) -> int:
        """How many leading ``keys`` are resident (lock-free: set membership is atomic)."""
        present = self.present
        n = 0
        for t in map(key_tuple, keys):
            if t not in present:
                break
            n += 1
        return n

    def pinned_count(self) -> int:
        now = time.monotonic()
        with self.lock:
            return sum(1 for e in self.entries.values() if e.leases and e.busy(now))

    # -- internals (lock held) -------------------------------------------------------

    def _fits(self, kind: str, size: int, quota: Optional[int]) -> bool:
        if self.used + size > self.capacity:
            return False
        return quota is None or self.used_by_kind.get(kind, 0) + size <= quota

    def _pick_victim(self, kind: str, prio: int, same_kind_only: bool) -> Optional[Entry]:
        now = time.monotonic()
        entries, priorities = self.entries, self.priorities

        def eligible(k: ArtifactKey) -> bool:
            e = entries[k]
            if e.busy(now):
                return False
            if same_kind_only:
                return k.kind == kind
            return priorities.get(k.kind, 0) <= prio

        key = self.policy.victim(eligible)
        if key is None:
            return None
        entry = entries.pop(key)
        self.present.discard(key_tuple(key))
        entry.visible = False
        return entry

    def _detach(self, entry: Entry, free_loc) -> None:
        del self.entries[entry.key]
        self.present.discard(key_tuple(entry.key))
        self.policy.remove(entry.key)
        entry.visible = False
        if entry.busy(time.monotonic()):
            self._detached.add(entry)
        else:
            self._free(entry, free_loc)

    def _free_if_idle(self, entry: Entry, free_loc) -> None:
        if entry in self._detached and not entry.busy(time.monotonic()):
            self._detached.discard(entry)
            self._free(entry, free_loc)

    def _reap(self, free_loc) -> None:
        if not self._detached:
            return
        now = time.monotonic()
        for entry in [e for e in self._detached if not e.busy(now)]:
            self._detached.discard(entry)
            self._free(entry, free_loc)

    def _free(self, entry: Entry, free_loc) -> None:
        self._account(entry, -1)
        free_loc(entry)

    def _account(self, entry: Entry, sign: int) -> None:
        self.used += sign * entry.size
        kind = entry.key.kind
        self.used_by_kind[kind] = self.used_by_kind.get(kind, 0) + sign * entry.size


class TableBackedLayer(BatchDefaults):
    """MemoryLayer methods that only consult the ObjectTable (shared by the CPU and disk tiers).

    A subclass sets ``self._table``, ``self._free_loc``, ``self.counters`` and
    ``self.capacity_bytes`` and implements put/get/close.
    """

    _table: ObjectTable

    def contains(self, key: ArtifactKey) -> bool:
        return key in self._table.entries

    def contains_many(self, keys) -> list[bool]:
        present = self._table.present
        return [t in present for t in map(key_tuple, keys)]

    def prefix_count(self, keys) -> int:
        """Leading ``keys`` resident here, at set-probe cost (the engine's prefix_lookup fast path)."""
        return self._table.prefix_count(keys)

    def delete(self, key: ArtifactKey) -> bool:
        removed = self._table.remove(key, self._free_loc)
        if removed:
            self.counters.add("deletes")
        return removed

    def pin(self, key: ArtifactKey, lease_s: Optional[float] = None) -> bool:
        return self._table.pin(key, lease_s) is not None

    def unpin(self, key: ArtifactKey) -> None:
        self._table.unpin(key, self._free_loc)

    def keys(self):
        with self._table.lock:
            return iter(list(self._table.entries))

    def meta(self, key: ArtifactKey) -> Optional[ArtifactMeta]:
        entry = self._table.entries.get(key)
        return None if entry is None else entry.meta

    def used_bytes(self) -> int:
        return self._table.used

    def table_stats(self) -> dict:
        """Counters plus occupancy; call with ``self._table.lock`` held."""
        t = self._table
        out = self.counters.snapshot()
        out.update(items=len(t.entries), used_bytes=t.used, capacity_bytes=self.capacity_bytes,
                   used_by_kind=dict(t.used_by_kind), evictions=t.evictions,
                   evicted_bytes=t.evicted_bytes, pinned=t.pinned_count(), eviction_policy=t.policy.name)
        return out
