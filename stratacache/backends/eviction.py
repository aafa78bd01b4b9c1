"""Pluggable eviction policies: LRU and S3-FIFO.

A policy only orders keys; the tier decides which keys may go (pins, readers,
quotas, priorities) through the ``eligible`` predicate handed to ``victim``.
A key that is not eligible stays resident and keeps its place as far as the
policy allows.

S3-FIFO (Yang et al., SOSP'23) is scan-resistant: new keys enter a small FIFO
(10% of the bytes); only keys touched again while there move to the main
FIFO, and keys evicted from the small queue are remembered in a ghost list so
a quick return goes straight to main. A one-pass scan therefore flushes only
the small queue, not the working set.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Optional

Eligible = Callable[[Hashable], bool]


class LruPolicy:
    name = "lru"

    def __init__(self, capacity_bytes: int = 0):
        self._order: OrderedDict = OrderedDict()

    def insert(self, key, size: int) -> None:
        self._order[key] = size
        self._order.move_to_end(key)

    def touch(self, key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key) -> None:
        self._order.pop(key, None)

    def victim(self, eligible: Eligible) -> Optional[Hashable]:
        for key in self._order:
            if eligible(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)


class S3FifoPolicy:
    name = "s3fifo"
    SMALL_FRACTION = 0.10
    MAX_FREQ = 3

    def __init__(self, capacity_bytes: int):
        self._small_target = max(1, int(capacity_bytes * self.SMALL_FRACTION))
        self._small: OrderedDict = OrderedDict()   # key -> size
        self._main: OrderedDict = OrderedDict()
        self._ghost: OrderedDict = OrderedDict()
        self._freq: dict = {}
        self._small_bytes = 0

    def insert(self, key, size: int) -> None:
        if key in self._freq:   # already queued (the tiers remove a key before re-inserting it)
            self.remove(key)
        self._freq[key] = 0
        if self._ghost.pop(key, None) is not None:
            self._main[key] = size
        else:
            self._small[key] = size
            self._small_bytes += size

    def touch(self, key) -> None:
        f = self._freq.get(key)
        if f is not None and f < self.MAX_FREQ:
            self._freq[key] = f + 1

    def remove(self, key) -> None:
        if key in self._small:
            self._small_bytes -= self._small.pop(key)
        else:
            self._main.pop(key, None)
        self._freq.pop(key, None)

    def victim(self, eligible: Eligible) -> Optional[Hashable]:
        # Each key is re-queued at most MAX_FREQ + 1 times before it must go.
        budget = (self.MAX_FREQ + 2) * (len(self._small) + len(self._main)) + 2
        while budget > 0 and (self._small or self._main):
            budget -= 1
            if self._small and (self._small_bytes >= self._small_target or not self._main):
                key, size = self._small.popitem(last=False)
                self._small_bytes -= size
                if not eligible(key):
                    self._small[key] = size
                    self._small_bytes += size
                elif self._freq[key] > 0:
                    self._freq[key] = 0
                    self._main[key] = size
                else:
                    del self._freq[key]
                    self._remember_ghost(key)
                    return key
            else:
                key, size = self._main.popitem(last=False)
                if not eligible(key):
                    self._main[key] = size
                elif self._freq[key] > 0:
                    self._freq[key] -= 1
                    self._main[key] = size
                else:
                    del self._freq[key]
                    return key
        # Everything left at the front is ineligible: take any eligible key at all.
        for queue in (self._small, self._main):
            for key in queue:
                if eligible(key):
                    self.remove(key)
                    return key
        return None

    def _remember_ghost(self, key) -> None:
        self._ghost[key] = True
        while len(self._ghost) > max(16, len(self._main) + len(self._small)):
            self._ghost.popitem(last=False)

    def __len__(self) -> int:
        return len(self._small) + len(self._main)


POLICIES = {"lru": LruPolicy, "s3fifo": S3FifoPolicy}


def make_policy(name: str, capacity_bytes: int):
    try:
        return POLICIES[name](capacity_bytes)
    except KeyError:
        raise ValueError(f"eviction policy must be one of {sorted(POLICIES)}, got {name!r}") from None
