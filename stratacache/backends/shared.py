"""Shared-region tier: one object store in an mmap'ed region that every process
on the host attaches to (a file under /dev/shm, a file on a DAX filesystem, or
a device-DAX CXL device such as /dev/dax0.0).

The index, allocator, eviction, locking and crash repair live in C++
(``csrc/shared_region.{h,cpp}``, bound as ``stratacache._C.SharedRegion``).
This module is the MemoryLayer face of it. A put is one native call that
reserves space (the object stays invisible), copies the payload in on torch's
intra-op threads with no lock held, then commits; a get with ``out`` leases
the current version, copies it out, releases and re-checks the version, so
neither a concurrent overwrite nor a killed writer can hand out a torn object.
A get without ``out`` returns a view into the mapping (hold it under ``pin``
or ``pinned_get``). ``ArtifactMeta.pack(key)`` travels with each object, so any
process can rebuild the caller's dtype and shape; its header checksum covers
the key too, so a damaged header is a counted miss.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

import stratacache._C as _C
from stratacache.backends.base import BatchDefaults, EvictCallback
from stratacache.core.artifact import Artifact, ArtifactMeta, CorruptArtifact, as_bytes
from stratacache.core.keys import ArtifactKey
from stratacache.telemetry.metrics import TierCounters

log = logging.getLogger(__name__)

SharedRegionError = _C.SharedRegionError
DEFAULT_PATH = "/dev/shm/stratacache.region"


class SharedRegionLayer(BatchDefaults):
    """MemoryLayer over a region shared by all processes; persists across restarts."""

    name = "shared"
    persistent = True

    def __init__(self, path: str = DEFAULT_PATH, capacity: int = 4 << 30, max_objects: int = 65536, *,
                 numa_node: Optional[int] = None, file_mode: int = 0o600, reset: bool = False,
                 lease_s: float = 30.0, max_key_bytes: int = 512, block_bytes: int = 4096,
                 verify_checksums: bool = False, register_cuda="auto", prefault_bytes: int = 0):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        if prefault_bytes < 0:
            raise ValueError(f"prefault_bytes must be >= 0, got {prefault_bytes}")
        self.path = os.path.expanduser(str(path))
        self._region = _C.SharedRegion(
            path=self.path, capacity=int(capacity), max_objects=int(max_objects),
            max_key_bytes=int(max_key_bytes), block_bytes=int(block_bytes),
            numa_node=-1 if numa_node is None else int(numa_node), file_mode=int(file_mode),
            reset=bool(reset))
        # One tensor over the whole data area; every payload is a slice of it. It
        # keeps the mapping alive for as long as any view of it exists.
        self._data = torch.frombuffer(memoryview(self._region), dtype=torch.uint8)
        self.capacity_bytes = self._region.data_bytes
        self.lease_s = float(lease_s)
        self.verifies_checksums = bool(verify_checksums)
        self.on_evict: Optional[EvictCallback] = None
        self.counters = TierCounters(self.name)
        self._pins: dict[ArtifactKey, list[tuple[int, int]]] = {}
        self._pins_lock = threading.Lock()
        self._cuda_registered = _register_cuda(self._data) if _want_cuda(register_cuda) else False
        self.prefault_bytes = int(prefault_bytes)
        self._prefault: Optional[dict] = None

    @classmethod
    def from_config(cls, tier_cfg, cfg) -> "SharedRegionLayer":
        return cls(tier_cfg.path, tier_cfg.capacity, tier_cfg.max_objects,
                   numa_node=tier_cfg.numa_node, file_mode=tier_cfg.file_mode,
                   reset=tier_cfg.reset, lease_s=cfg.lease_s, prefault_bytes=tier_cfg.prefault,
                   register_cuda=tier_cfg.register_cuda)

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

    def put(self, key: ArtifactKey, data: torch.Tensor, meta: ArtifactMeta) -> bool:
        t0 = time.perf_counter()
        src = as_bytes(data)
        if src.numel() != meta.size:
            raise ValueError(f"payload has {src.numel()} bytes but meta.size is {meta.size}")
        raw = key.encode()
        aux = meta.pack(raw)
        # One native call reserves, copies (no lock held) and commits. With
        # on_evict set, this process's evictions go through it first.
        ok = self._region.put_tensor(raw, aux, src, evict=self.on_evict is None)
        while ok is None and self.on_evict is not None and self._hand_off_victim():
            ok = self._region.put_tensor(raw, aux, src, evict=False)
        if ok:
            self.counters.add_many(puts=1, bytes_in=meta.size)
            self.counters.observe("put", time.perf_counter() - t0)
        else:
            self.counters.add("put_failures")
        return bool(ok)

    def _hand_off_victim(self) -> bool:
        """Lease the next CLOCK victim, give it to on_evict, then drop it. Evictions
        that other processes cause are theirs to hand down."""
        victim = self._region.pick_victim(self.lease_s)
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

    def get(self, key: ArtifactKey, out: Optional[torch.Tensor] = None) -> Optional[Artifact]:
        if out is None:
            got = self.pinned_get(key)
            if got is None:
                return None
            art, release = got
            release()   # the view stays valid until the object is overwritten or evicted
            return art
        t0 = time.perf_counter()
        _check_out(out)
        # One native call leases, copies (no lock held), releases and re-checks the version.
        raw = key.encode()
        found = self._region.get_into(raw, self.lease_s, out)
        if found is None:
            self.counters.add("misses")
            return None
        slot, gen, size, aux, current = found
        if not current:   # the version changed under a lease that expired mid-copy
            self.counters.add("misses")
            return None
        meta = self._meta(key, raw, slot, gen, aux, size)
        dst = out[:size]
        if meta is None or not self._verified(key, slot, gen, dst, meta):
            return None
        self.counters.add_many(hits=1, bytes_out=size)
        self.counters.observe("get", time.perf_counter() - t0)
        return Artifact(meta, dst)

    def pinned_get(self, key: ArtifactKey, lease_s: Optional[float] = None):
        """Lease and view the same version atomically: (Artifact, release) or None."""
        raw = key.encode()
        handle = self._region.acquire(raw, self.lease_s if lease_s is None else lease_s)
        if handle is None:
            self.counters.add("misses")
            return None
        slot, gen, offset, size, aux = handle
        meta = self._meta(key, raw, slot, gen, aux, size)
        view = self._data[offset:offset + size]
        if meta is None or not self._verified(key, slot, gen, view, meta):
            self._region.release(slot, gen)
            return None
        self.counters.add_many(hits=1, bytes_out=size)
        return Artifact(meta, view), lambda: self._region.release(slot, gen)

    @contextmanager
    def pinned(self, key: ArtifactKey, lease_s: Optional[float] = None):
        """Context manager giving a leased zero-copy Artifact (or None)."""
        got = self.pinned_get(key, lease_s)
        if got is None:
            yield None
            return
        art, release = got
        try:
            yield art
        finally:
            release()

    def contains(self, key: ArtifactKey) -> bool:
        return self._region.contains(key.encode())

    def contains_many(self, keys) -> list[bool]:
        return self._region.contains_many([k.encode() for k in keys])

    def contains_encoded(self, encoded_keys: list) -> list[bool]:
        """contains_many for keys already in ``ArtifactKey.encode()`` form."""
        return self._region.contains_many(encoded_keys)

    # -- leases ------------------------------------------------------------------------

    def pin(self, key: ArtifactKey, lease_s: Optional[float] = None) -> bool:
        handle = self._region.acquire(key.encode(), self.lease_s if lease_s is None else lease_s,
                                      count_stats=False)
        if handle is None:
            return False
        with self._pins_lock:
            self._pins.setdefault(key, []).append((handle[0], handle[1]))
        return True

    def unpin(self, key: ArtifactKey) -> None:
        with self._pins_lock:
            held = self._pins.get(key)
            if not held:
                return
            slot, gen = held.pop()
            if not held:
                del self._pins[key]
        self._region.release(slot, gen)

    # -- inventory ---------------------------------------------------------------------

    def keys(self) -> Iterator[ArtifactKey]:
        for raw in self._region.keys():
            try:
                yield ArtifactKey.decode(raw)
            except ValueError:
                continue   # not written through this API; not ours to interpret

    def used_bytes(self) -> int:
        return self._region.stats()["used_bytes"]

    def stats(self) -> dict:
        region = self._region.stats()
        out = self.counters.snapshot()
        out.update(tier=self.name, path=self.path, capacity_bytes=self.capacity_bytes,
                   used_bytes=region["used_bytes"], items=region["items"],
                   cuda_registered=self._cuda_registered,
                   region={k: v for k, v in region.items()})
        if self._prefault is not None:
            out["prefault"] = dict(self._prefault)
        # Evictions happen inside the region, possibly triggered by another process.
        out["evictions"] = region["evictions"]
        return out

    def check(self) -> list[str]:
        """Reclaims dead writers' space, then audits the region: [] when consistent."""
        self._region.reclaim()
        return self._region.check()

    def clear(self) -> None:
        self._region.clear()

    def close(self) -> None:
        with self._pins_lock:
            held = [h for hs in self._pins.values() for h in hs]
            self._pins.clear()
        if self._region is None:
            return
        for slot, gen in held:
            self._region.release(slot, gen)
        if self._cuda_registered:
            torch.cuda.cudart().cudaHostUnregister(self._data.data_ptr())
            self._cuda_registered = False
        # The mapping goes away once no tensor views it any more.
        self._data = None
        self._region = None

    # -- inspection --------------------------------------------------------------------

    @staticmethod
    def inspect(path: str) -> dict:
        """Read-only report on an existing region (no lock taken, nothing modified)."""
        path = os.path.expanduser(str(path))
        region = _C.SharedRegion(path=path, read_only=True)
        stats = region.stats()
        by_namespace: dict[str, dict] = {}
        by_kind: dict[str, dict] = {}
        foreign = 0
        for raw, size, _aux in region.snapshot():
            try:
                key = ArtifactKey.decode(raw)
            except ValueError:
                foreign += 1
                continue
            for table, name in ((by_kind, key.kind), (by_namespace, f"{key.kind}/{key.namespace}")):
                use = table.setdefault(name, {"items": 0, "bytes": 0})
                use["items"] += 1
                use["bytes"] += size
        return {"tier": "shared", "path": path, "items": stats["items"],
                "used_bytes": stats["used_bytes"], "capacity_bytes": stats["capacity"],
                "reserved_bytes": stats["reserved_bytes"], "max_objects": stats["max_objects"],
                "hits": stats["hits"], "misses": stats["misses"],
                "counters": {k: stats[k] for k in ("hits", "misses", "puts", "put_failures",
                                                   "evictions", "deletes", "repairs",
                                                   "reclaimed_writers")},
                "by_kind": by_kind, "by_namespace": by_namespace, "unreadable_keys": foreign}

    # -- internals ---------------------------------------------------------------------

    def _meta(self, key: ArtifactKey, raw: bytes, slot: int, gen: int, aux: bytes,
              size: int) -> Optional[ArtifactMeta]:
        """The stored header, checked against the key and the region's size; None (a
        counted miss, the object dropped) when it cannot be trusted."""
        try:
            meta, _ = ArtifactMeta.unpack(aux, raw)
            if meta.size != size:
                raise CorruptArtifact(f"header says {meta.size} bytes, region holds {size}")
            return meta
        except CorruptArtifact as exc:
            log.warning("stratacache shared tier: dropping %s: %s", key, exc)
            self.counters.add_many(misses=1, corrupt=1)
            self._region.erase_version(slot, gen)
            return None

    def _verified(self, key: ArtifactKey, slot: int, gen: int, data: torch.Tensor,
                  meta: ArtifactMeta) -> bool:
        """The checksum check, when configured; a corrupt object is dropped (a miss)."""
        if self.verifies_checksums:
            from stratacache.ops import checksum64
            if (checksum64(data) & 0xFFFFFFFFFFFFFFFF) != meta.checksum:
                log.warning("stratacache shared tier: %s failed its checksum; dropped", key)
                self.counters.add_many(misses=1, corrupt=1)
                self._region.erase_version(slot, gen)
                return False
        return True


def _check_out(out: torch.Tensor) -> None:
    if (out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous()
            or out.device.type != "cpu"):
        raise ValueError(f"out must be a contiguous 1-D uint8 CPU tensor, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")


def _want_cuda(register_cuda) -> bool:
    if register_cuda == "auto":
        return torch.cuda.is_available()
    return bool(register_cuda)


def _register_cuda(data: torch.Tensor) -> bool:
    """Page-lock the mapping for CUDA so transfers go region <-> GPU in one copy."""
    if not torch.cuda.is_available():
        raise RuntimeError("register_cuda=True but CUDA is not available")
    err = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), data.numel(), 0)
    if int(err) != 0:
        log.warning("stratacache shared tier: cudaHostRegister of %d bytes failed (error %s); "
                    "GPU copies will stage through pageable memory", data.numel(), int(err))
        return False
    return True
