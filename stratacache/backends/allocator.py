"""Best-fit, address-ordered arena allocator with coalescing.

Placement prefers the smallest free run that fits and, among equal sizes, the
lowest address, so the arena's high-water mark (the bytes ever touched, which
is what the OS or the GPU driver actually commits) grows only when no hole
fits. Freed runs merge with free neighbours at once. Every allocation is
rounded up to ``align`` bytes, so internal waste is below ``align`` per object;
external fragmentation is reported by ``stats()`` as
``1 - largest_free / free_bytes`` and never makes a put fail while an
evictable object is left (the tier evicts until a run fits).
"""

from __future__ import annotations

import bisect
from typing import Optional


class ArenaAllocator:
    """Hands out non-overlapping ``[offset, offset + size)`` runs of a ``size``-byte arena."""

    def __init__(self, size: int, align: int = 64):
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align must be a power of two, got {align}")
        self.align = align
        self.size = size - size % align
        self._by_size: list[tuple[int, int]] = []   # sorted (run size, offset) of free runs
        self._free_at: dict[int, int] = {}           # offset -> size of free runs
        self._free_end: dict[int, int] = {}          # end -> offset of free runs
        self._used: dict[int, int] = {}              # offset -> rounded size of allocations
        self.high_water = 0
        if self.size:
            self._add_free(0, self.size)

    def rounded(self, n: int) -> int:
        return max(self.align, -(-n // self.align) * self.align)

    def alloc(self, n: int) -> Optional[int]:
        """Offset of a new run of at least ``n`` bytes, or None when no free run fits."""
        align = self.align
        need = max(align, -(-n // align) * align)   # rounded(n), inline: on every put
        i = bisect.bisect_left(self._by_size, (need, -1))
        if i == len(self._by_size):
            return None
        run, off = self._by_size[i]
        self._remove_free(off, run, i)
        if run > need:
            self._add_free(off + need, run - need)
        self._used[off] = need
        self.high_water = max(self.high_water, off + need)
        return off

    def free(self, off: int) -> None:
        n = self._used.pop(off)   # KeyError: double free / unknown offset
        start, end = off, off + n
        before = self._free_end.get(start)
        if before is not None:
            self._remove_free(before, start - before)
            start = before
        after = self._free_at.get(end)
        if after is not None:
            self._remove_free(end, after)
            end += after
        self._add_free(start, end - start)

    def runs(self) -> list[tuple[int, int]]:
        """Allocated (offset, rounded size) runs, by address (for checks and inspection)."""
        return sorted(self._used.items())

    def stats(self) -> dict:
        free = self.size - sum(self._used.values())
        largest = self._by_size[-1][0] if self._by_size else 0
        return {
            "arena_bytes": self.size,
            "allocated_bytes": self.size - free,
            "free_bytes": free,
            "largest_free_run": largest,
            "free_runs": len(self._by_size),
            "fragmentation": 0.0 if free == 0 else 1.0 - largest / free,
            "high_water_bytes": self.high_water,
        }

    def _add_free(self, off: int, n: int) -> None:
        bisect.insort(self._by_size, (n, off))
        self._free_at[off] = n
        self._free_end[off + n] = off

    def _remove_free(self, off: int, n: int, index: Optional[int] = None) -> None:
        if index is None:
            index = bisect.bisect_left(self._by_size, (n, off))
        del self._by_size[index]
        del self._free_at[off]
        del self._free_end[off + n]
