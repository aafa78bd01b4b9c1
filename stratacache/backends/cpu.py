"""CPU memory tier: one per-process arena, reserved up front, committed lazily.

The arena is a single uint8 tensor of ``capacity`` bytes. Unpinned, the OS
commits its pages only when first written, and the best-fit allocator keeps
the touched prefix (its high-water mark) as small as the data allows. Pinned
(CUDA present and ``pin_memory`` auto/true), the touched prefix is
page-locked in ``PIN_STEP`` steps with ``cudaHostRegister`` as it grows; a
failure to pin is reported with a warning and counted, never silently hidden.

Reads without ``out`` return views into the arena; the space behind a view is
reused only after the object is evicted or deleted, so callers that keep a
view take a lease with ``pin`` (the engine's ``pinned()`` does this).
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch

from stratacache._C import copy_bytes
from stratacache.backends.allocator import ArenaAllocator
from stratacache.backends.base import EvictCallback
from stratacache.backends.residency import Entry, ObjectTable, TableBackedLayer
from stratacache.core.artifact import Artifact, ArtifactMeta
from stratacache.core.keys import ArtifactKey
from stratacache.telemetry.metrics import TierCounters

log = logging.getLogger(__name__)

PIN_STEP = 256 << 20
ALIGN = 256


def arena_bytes(capacity: int) -> int:
    """The arena reserved for ``capacity`` bytes of payload. Slack beyond the capacity
    absorbs alignment padding and holes, so the byte accounting (not the allocator) is
    what limits the tier. It costs address space only: pages are committed (and pinned)
    as the high-water mark grows."""
    slack = max(capacity // 16, 1 << 20)
    return -(-(capacity + slack) // ALIGN) * ALIGN


class CpuMemoryLayer(TableBackedLayer):
    """Process-private arena tier (fastest; lost when the process exits)."""

    persistent = False

    def __init__(self, capacity_bytes: int, *, eviction: str = "s3fifo", pin_memory="auto",
                 lease_s: float = 30.0, quotas: Optional[dict] = None,
                 priorities: Optional[dict] = None, name: str = "cpu"):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.name = name
        self.capacity_bytes = int(capacity_bytes)
        self.on_evict: Optional[EvictCallback] = None
        self.counters = TierCounters(name)
        self._table = ObjectTable(self.capacity_bytes, eviction, lease_s, quotas, priorities)
        size = arena_bytes(self.capacity_bytes)
        try:
            self._arena = torch.empty(size, dtype=torch.uint8)
        except RuntimeError as exc:   # the host refuses the reservation
            raise ValueError(f"tiers.cpu.capacity: an arena of {size} bytes for "
                             f"{self.capacity_bytes} bytes of payload cannot be reserved "
                             f"({str(exc).splitlines()[0]})") from None
        self._alloc = ArenaAllocator(size, ALIGN)
        self.pin_failures = 0
        self._pin = pin_memory is True or (pin_memory == "auto" and torch.cuda.is_available())
        if self._pin and not torch.cuda.is_available():
            self._pin = False
            self.pin_failures += 1
            warnings.warn("stratacache cpu tier: pin_memory is true but CUDA is not available; "
                          "the arena is not page-locked", RuntimeWarning, stacklevel=2)
        self._pinned_upto = 0
        self._free_loc = lambda e: self._alloc.free(e.loc)

    @classmethod
    def from_config(cls, tier_cfg, cfg) -> "CpuMemoryLayer":
        ns = cfg.namespaces
        return cls(tier_cfg.capacity, eviction=tier_cfg.eviction, pin_memory=tier_cfg.pin_memory,
                   lease_s=cfg.lease_s,
                   quotas={k: ns[k].quota for k in ns}, priorities={k: ns[k].priority for k in ns})

    # -- MemoryLayer -------------------------------------------------------------------

    def _admit(self, key: ArtifactKey, meta: ArtifactMeta) -> Optional[Entry]:
        return self._table.admit(key, meta, self._place, self._free_loc, self.on_evict, self._view)

    def _write(self, entry: Entry, data: torch.Tensor) -> bool:
        self._ensure_pinned(self._alloc.high_water)
        copy_bytes(self._arena, entry.loc, data, 0, entry.size)
        return True

    def _read(self, entry: Entry, out: Optional[torch.Tensor]) -> Artifact:
        if out is None:
            return self._view(entry)
        copy_bytes(out, 0, self._arena, entry.loc, entry.size)
        return Artifact(entry.meta, out if out.numel() == entry.size else out.narrow(0, 0, entry.size))

    def pinned_get(self, key: ArtifactKey, lease_s: Optional[float] = None):
        """Atomically lease and view the object: (Artifact, release) or None.

        Unlike ``pin`` then ``get``, the view is of the very object leased, even if
        another thread overwrites the key in between.
        """
        lease = self._table.pin(key, lease_s)
        if lease is None:
            self.counters.add("misses")
            return None
        entry, deadline = lease
        self.counters.add_many(hits=1, bytes_out=entry.size)
        return self._view(entry), lambda: self._table.release_lease(entry, deadline, self._free_loc)

    def stats(self) -> dict:
        with self._table.lock:
            out = self.table_stats()
            out.update(pin_memory=self._pin, pinned_bytes=self._pinned_upto,
                       pin_failures=self.pin_failures, allocator=self._alloc.stats())
        return out

    def close(self) -> None:
        self._table.clear(self._free_loc)
        with self._table.lock:
            start = 0
            while start < self._pinned_upto:
                torch.cuda.cudart().cudaHostUnregister(self._arena.data_ptr() + start)
                start += PIN_STEP
            self._pinned_upto = 0

    # -- internals ---------------------------------------------------------------------

    def _place(self, size: int) -> Optional[int]:
        return self._alloc.alloc(size)

    def _view(self, entry: Entry) -> Artifact:
        return Artifact(entry.meta, self._arena.narrow(0, entry.loc, entry.size))

    def _ensure_pinned(self, upto: int) -> None:
        if not self._pin or upto <= self._pinned_upto:
            return
        with self._table.lock:
            while self._pin and self._pinned_upto < upto:
                start = self._pinned_upto
                n = min(PIN_STEP, self._arena.numel() - start)
                try:
                    err = int(torch.cuda.cudart().cudaHostRegister(self._arena.data_ptr() + start, n, 0))
                except Exception as exc:   # no CUDA runtime bindings in this build
                    err = f"{type(exc).__name__}: {exc}"
                if err != 0:
                    self.pin_failures += 1
                    self._pin = False
                    warnings.warn(f"stratacache cpu tier: page-locking {n} bytes of the arena failed "
                                  f"(cudaHostRegister: {err}); GPU copies from this tier "
                                  "will be slower (unpinned)", RuntimeWarning, stacklevel=3)
                    return
                self._pinned_upto = start + n

