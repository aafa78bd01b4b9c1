"""CPU memory tier: one per-process arena, reserved up front, committed lazily.

The arena is a single uint8 tensor of ``capacity`` bytes. Unpinned, the OS
commits its pages only when first written, and the best-fit allocator keeps
the touched prefix (its high-water mark) as small as the data allows. Pinned
(CUDA present and ``pin_memory`` auto/true), the touched prefix is
page-locked in ``PIN_STEP`` steps as it grows (``host_pinning``); a failure
to pin is warned about and counted, never silently hidden.

Reads without ``out`` return views into the arena; the space behind a view is
reused only after the object is evicted or deleted, so a caller that keeps a
view holds it under ``acquire``'s lease.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from stratacache._C import copy_bytes
from stratacache.backends.allocator import ArenaAllocator
from stratacache.backends.base import Lease, fit_out
from stratacache.backends.host_pinning import HostPinning
from stratacache.backends.residency import Entry, ObjectTable, TableTier
from stratacache.core.artifact import Artifact, ArtifactMeta
from stratacache.core.errors import ConfigError, InvalidArgument
from stratacache.core.keys import ArtifactKey

PIN_STEP = 256 << 20
ALIGN = 256


def arena_bytes(capacity: int) -> int:
    """The arena reserved for ``capacity`` bytes of payload. Slack beyond the capacity
    absorbs alignment padding and holes, so the byte accounting (not the allocator) is
    what limits the tier. It costs address space only: pages are committed (and pinned)
    as the high-water mark grows."""
    slack = max(capacity // 16, 1 << 20)
    return -(-(capacity + slack) // ALIGN) * ALIGN


class CpuTier(TableTier):
    """Process-private arena tier (fastest; lost when the process exits)."""

    zero_copy = True

    def __init__(self, capacity_bytes: int, *, eviction: str = "s3fifo", pin_memory="auto",
                 lease_s: float = 30.0, quotas: Optional[dict] = None,
                 priorities: Optional[dict] = None, name: str = "cpu"):
        if capacity_bytes <= 0:
            raise InvalidArgument(f"capacity_bytes must be positive, got {capacity_bytes}")
        super().__init__(name, capacity_bytes)
        self._table = ObjectTable(self.capacity_bytes, eviction, lease_s, quotas, priorities)
        size = arena_bytes(self.capacity_bytes)
        try:
            self._arena = torch.empty(size, dtype=torch.uint8)
        except RuntimeError as exc:   # the host refuses the reservation
            raise ConfigError(f"tiers.cpu.capacity: an arena of {size} bytes for "
                              f"{self.capacity_bytes} bytes of payload cannot be reserved "
                              f"({str(exc).splitlines()[0]})") from None
        self._alloc = ArenaAllocator(size, ALIGN)
        self._pinning = HostPinning("cpu tier arena", pin_memory)
        self._pinned_upto = 0
        self._free_loc = lambda e: self._alloc.free(e.loc)

    @classmethod
    def from_config(cls, section, cfg) -> "CpuTier":
        ns = cfg.namespaces
        return cls(section.capacity, eviction=section.eviction, pin_memory=section.pin_memory,
                   lease_s=cfg.lease_s,
                   quotas={k: ns[k].quota for k in ns}, priorities={k: ns[k].priority for k in ns})

    # -- TableTier ---------------------------------------------------------------------

    def _admit(self, key: ArtifactKey, meta: ArtifactMeta) -> Optional[Entry]:
        return self._table.admit(key, meta, self._alloc.alloc, self._free_loc, self.on_evict, self._view)

    def _write(self, entry: Entry, data: torch.Tensor) -> bool:
        if self._pinning.enabled and self._alloc.high_water > self._pinned_upto:
            self._pin_upto(self._alloc.high_water)
        copy_bytes(self._arena, entry.loc, data, 0, entry.size, True)   # streaming stores: not read back soon
        return True

    def _read(self, entry: Entry, out: Optional[torch.Tensor]) -> Artifact:
        if out is None:
            return self._view(entry)
        dst = fit_out(out, entry.size)
        copy_bytes(dst, 0, self._arena, entry.loc, entry.size)
        return Artifact(entry.meta, dst)

    def _acquire(self, key: ArtifactKey, lease_s: Optional[float]) -> Optional[Lease]:
        got = self._table.pin(key, lease_s)
        if got is None:
            return None
        entry, deadline = got
        return Lease(self._view(entry), self.name,
                     partial(self._table.release_lease, entry, deadline, self._free_loc))

    def _stats(self) -> dict:
        out = super()._stats()
        with self._table.lock:
            out.update(self._pinning.stats(), allocator=self._alloc.stats())
        return out

    def host_memory(self) -> list[torch.Tensor]:
        """The arena: reserved once in the constructor and never replaced."""
        return [self._arena]

    def close(self) -> None:
        self._table.clear(self._free_loc)
        with self._table.lock:
            self._pinning.unregister_all()
            self._pinned_upto = 0

    # -- internals ---------------------------------------------------------------------

    def _view(self, entry: Entry) -> Artifact:
        return Artifact(entry.meta, self._arena.narrow(0, entry.loc, entry.size))

    def _pin_upto(self, upto: int) -> None:
        """Page-lock the arena up to ``upto`` bytes, in ``PIN_STEP`` steps."""
        with self._table.lock:
            while self._pinning.enabled and self._pinned_upto < upto:
                start = self._pinned_upto
                n = min(PIN_STEP, self._arena.numel() - start)
                if not self._pinning.register(self._arena.data_ptr() + start, n):
                    return
                self._pinned_upto = start + n
