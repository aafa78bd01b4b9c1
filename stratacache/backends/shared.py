"""Shared-region tier: one object store in an mmap'ed region that every process
on the host attaches to (a file under /dev/shm, a file on a DAX filesystem, or
a device-DAX CXL device such as /dev/dax0.0).

The index, allocator, eviction, locking and crash repair live in C++
(``csrc/shared_region.{h,cpp}``, bound as ``stratacache._C.SharedRegion``).
This module is the ``Tier`` face of it. A put is one native call that
reserves space (the object stays invisible), copies the payload in on torch's
intra-op threads with no lock held, then commits; a get with ``out`` leases
the current version, copies it out, releases and re-checks the version, so
neither a concurrent overwrite nor a killed writer can hand out a torn object.
A get without ``out`` returns a view into the mapping (hold it with
``acquire``, whose lease is the region's own (slot, generation) lease).
``ArtifactMeta.pack(key)`` travels with each object, so any process can
rebuild the caller's dtype and shape; its header checksum covers the key too,
so a damaged header is a counted miss, and that very version is erased.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Iterator, Optional

import torch

import stratacache._C as _C
from stratacache.backends.base import Lease, Tier, checksum_matches, inspect_report
from stratacache.backends.host_pinning import HostPinning
from stratacache.core.artifact import Artifact, ArtifactMeta, CorruptArtifact
from stratacache.core.errors import InvalidArgument
from stratacache.core.keys import ArtifactKey

log = logging.getLogger(__name__)

SharedRegionError = _C.SharedRegionError
DEFAULT_PATH = "/dev/shm/stratacache.region"


class SharedRegionTier(Tier):
    """A tier over a region shared by all processes; persists across restarts."""

    persistent = True
    zero_copy = True
    inspectable = True

    def __init__(self, path: str = DEFAULT_PATH, capacity: int = 4 << 30, max_objects: int = 65536, *,
                 numa_node: Optional[int] = None, file_mode: int = 0o600, reset: bool = False,
                 lease_s: float = 30.0, max_key_bytes: int = 512, block_bytes: int = 4096,
                 verify_reads: bool = False, register_cuda="auto", prefault_bytes: int = 0,
                 priorities: Optional[dict] = None, name: str = "shared"):
        if lease_s <= 0:
            raise InvalidArgument(f"lease_s must be positive, got {lease_s}")
        if prefault_bytes < 0:
            raise InvalidArgument(f"prefault_bytes must be >= 0, got {prefault_bytes}")
        self.path = os.path.expanduser(str(path))
        region = _C.SharedRegion(
            path=self.path, capacity=int(capacity), max_objects=int(max_objects),
            max_key_bytes=int(max_key_bytes), block_bytes=int(block_bytes),
            numa_node=-1 if numa_node is None else int(numa_node), file_mode=int(file_mode),
            reset=bool(reset))
        super().__init__(name, region.data_bytes)
        self._region = region
        # One tensor over the whole data area; every payload is a slice of it. It
        # keeps the mapping alive for as long as any view of it exists.
        self._data = torch.frombuffer(memoryview(region), dtype=torch.uint8)
        self.lease_s = float(lease_s)
        self.verify_reads = bool(verify_reads)
        # Eviction priority of each kind, recorded with every object: the region never
        # evicts an object for an incoming one of lower priority.
        self._priorities = {k: int(v) for k, v in (priorities or {}).items()}
        self._pinning = HostPinning("shared tier region", register_cuda)
        self._pinning.register(self._data.data_ptr(), self._data.numel())
        self.prefault_bytes = int(prefault_bytes)
        self._prefault: Optional[dict] = None

    @classmethod
    def from_config(cls, section, cfg) -> "SharedRegionTier":
        ns = cfg.namespaces
        return cls(section.path, section.capacity, section.max_objects,
                   numa_node=section.numa_node, file_mode=section.file_mode,
                   reset=section.reset, lease_s=cfg.lease_s, prefault_bytes=section.prefault,
                   register_cuda=section.register_cuda, priorities={k: ns[k].priority for k in ns})

    def start_prefault(self) -> None:
        """Map up to ``prefault_bytes`` of stored objects into this process on a
        background thread. A process that has just attached would otherwise pay a
        page fault per 4 KiB page on its first read of each object, on the hit
        path (about a third of a 256 MiB load, measured). No-op when disabled or
        already started."""
        if self.prefault_bytes <= 0 or self._prefault is not None:
            return
        state = self._prefault = {"bytes": 0, "seconds": 0.0, "done": False}
        region = self._region

        def run() -> None:
            t0 = time.perf_counter()
            try:
                state["bytes"] = region.prefault(self.prefault_bytes)
            except Exception:  # noqa: BLE001 - a hint only; reads fault the pages in anyway
                log.exception("stratacache shared tier: prefault of %s failed", self.path)
            state["seconds"] = time.perf_counter() - t0
            state["done"] = True

        threading.Thread(target=run, name="stratacache-prefault", daemon=True).start()

    # -- writes ------------------------------------------------------------------------

    def _put(self, key: ArtifactKey, data: torch.Tensor, meta: ArtifactMeta) -> bool:
        raw = key.encode()
        aux = meta.pack(raw)
        priority = self._priorities.get(key.kind, 0)
        # One native call reserves, copies (no lock held) and commits. With
        # on_evict set, this process's evictions go through it first.
        ok = self._region.put_tensor(raw, aux, data, evict=self.on_evict is None, priority=priority)
        while ok is None and self.on_evict is not None and self._hand_off_victim(priority):
            ok = self._region.put_tensor(raw, aux, data, evict=False, priority=priority)
        return bool(ok)

    def _hand_off_victim(self, priority: int) -> bool:
        """Lease the next CLOCK victim the incoming object may evict (one of priority at most
        ``priority``), give it to on_evict, then drop it. Evictions that other processes cause
        are theirs to hand down."""
        victim = self._region.pick_victim(self.lease_s, priority=priority)
        if victim is None:
            return False
        raw, (slot, gen, offset, size, aux) = victim
        try:
            key = ArtifactKey.decode(raw)
            meta, _ = ArtifactMeta.unpack(aux, raw)
            self.on_evict(key, Artifact(meta, self._data[offset:offset + size]))
        except Exception:  # noqa: BLE001 - a failed hand-off must not block the put
            log.exception("stratacache shared tier: on_evict failed for %r; evicting anyway", raw[:80])
        finally:
            self._region.erase_version(slot, gen, evicted=True)
            self._region.release(slot, gen)
        return True

    def delete(self, key: ArtifactKey) -> bool:
        gone = self._region.erase(key.encode())
        if gone:
            self.counters.add("deletes")
        return gone

    # -- reads -------------------------------------------------------------------------

    def _get(self, key: ArtifactKey, out: Optional[torch.Tensor]) -> Optional[Artifact]:
        if out is None:
            lease = self._acquire(key, None)
            if lease is None:
                return None
            lease.release()   # the view stays valid until the object is overwritten or evicted
            return lease.artifact
        raw = key.encode()
        # One native call leases, copies (no lock held), releases and re-checks the version.
        try:
            found = self._region.get_into(raw, self.lease_s, out)
        except ValueError as exc:   # "out holds N bytes but the object has M": nothing copied
            raise InvalidArgument(str(exc)) from None
        if found is None:
            return None
        slot, gen, size, aux, current = found
        if not current:   # the version changed under a lease that expired mid-copy
            return None
        return Artifact(self._meta(raw, slot, gen, aux, size), out[:size])

    def _acquire(self, key: ArtifactKey, lease_s: Optional[float]) -> Optional[Lease]:
        raw = key.encode()
        region = self._region
        handle = region.acquire(raw, self.lease_s if lease_s is None else lease_s)
        if handle is None:
            return None
        slot, gen, offset, size, aux = handle
        try:
            meta = self._meta(raw, slot, gen, aux, size)
        except CorruptArtifact:
            region.release(slot, gen)
            raise
        return Lease(Artifact(meta, self._data[offset:offset + size]), self.name,
                     lambda: region.release(slot, gen))

    def _drop(self, key: ArtifactKey, art: Optional[Artifact]) -> None:
        """Erase the stored version only if it is itself bad: ``art`` may be a copy, and
        the key may hold a newer, good version by now. Without ``art`` (a damaged header),
        ``_meta`` has already erased the exact version."""
        if art is None:
            return
        raw = key.encode()
        handle = self._region.acquire(raw, self.lease_s, count_stats=False)
        if handle is None:
            return
        slot, gen, offset, size, aux = handle
        try:
            meta, _ = ArtifactMeta.unpack(aux, raw)
            if not checksum_matches(Artifact(meta, self._data[offset:offset + size])):
                self._region.erase_version(slot, gen)
        except CorruptArtifact:
            self._region.erase_version(slot, gen)
        finally:
            self._region.release(slot, gen)

    def contains(self, encoded_keys) -> list[bool]:
        return self._region.contains_many(list(encoded_keys))

    # -- inventory ---------------------------------------------------------------------

    def keys(self) -> Iterator[ArtifactKey]:
        for raw in self._region.keys():
            try:
                yield ArtifactKey.decode(raw)
            except ValueError:
                continue   # not written through this API; not ours to interpret

    def _stats(self) -> dict:
        region = self._region.stats()
        # Evictions happen inside the region, possibly triggered by another process.
        out = {"items": region["items"], "used_bytes": region["used_bytes"],
               "evictions": region["evictions"], "path": self.path,
               "cuda_registered": self._pinning.pinned_bytes > 0, "region": region,
               **self._pinning.stats()}
        if self._prefault is not None:
            out["prefault"] = dict(self._prefault)
        return out

    def check(self) -> list[str]:
        """Reclaims dead writers' space, then audits the region: [] when consistent."""
        self._region.reclaim()
        return self._region.check()

    def clear(self) -> None:
        self._region.clear()

    def host_memory(self) -> list[torch.Tensor]:
        """The region's data area: mapped once at attach, at a size fixed when the region was
        made (it never grows or moves); nothing once closed."""
        return [] if self._data is None else [self._data]

    def close(self) -> None:
        """Detach. Leases still held stay valid until released or expired (each holds the region)."""
        if self._region is None:
            return
        self._pinning.unregister_all()
        # The mapping goes away once no tensor views it any more.
        self._data = None
        self._region = None

    # -- inspection --------------------------------------------------------------------

    @classmethod
    def inspect(cls, section, cfg) -> dict:
        """Read-only report on the region ``section.path`` names (no lock taken, nothing modified)."""
        path = os.path.expanduser(str(section.path))
        region = _C.SharedRegion(path=path, read_only=True)
        stats = region.stats()
        entries, foreign = [], 0
        for raw, size, _aux in region.snapshot():
            try:
                entries.append((ArtifactKey.decode(raw), size))
            except ValueError:
                foreign += 1
        return inspect_report(
            "shared", path, capacity_bytes=stats["capacity"], entries=entries, unreadable=foreign,
            reserved_bytes=stats["reserved_bytes"], max_objects=stats["max_objects"],
            counters={k: stats[k] for k in ("hits", "misses", "puts", "put_failures", "evictions",
                                            "deletes", "repairs", "reclaimed_writers")})

    # -- internals ---------------------------------------------------------------------

    def _meta(self, raw: bytes, slot: int, gen: int, aux: bytes, size: int) -> ArtifactMeta:
        """The stored header, checked against the key and the region's size. One that
        cannot be trusted is erased (exactly this version) and raised as CorruptArtifact."""
        try:
            meta, _ = ArtifactMeta.unpack(aux, raw)
            if meta.size != size:
                raise CorruptArtifact(f"header says {meta.size} bytes, region holds {size}")
            return meta
        except CorruptArtifact:
            self._region.erase_version(slot, gen)
            raise
