"""The tier protocol: the one small base class every tier derives from.

A tier stores opaque byte payloads under full ``ArtifactKey``s, with exact
byte accounting against ``capacity_bytes``, and owns its own eviction (the
``TierChain`` decides *where* data goes, never how a tier frees space). Only
``stratacache.tiering`` calls a tier; everything above goes through the chain.

What a tier implements (about eight things): ``from_config``, ``_put``,
``_get``, ``contains``, ``delete``, ``keys``, ``_stats``, ``close``; and, where
it can do better than the defaults, ``_put_many`` / ``_get_many`` (pipelining),
``_acquire`` (a zero-copy view under a lease), ``_drop`` (remove exactly the
version that failed a check), ``inspect`` and ``start_prefault``.

What the base does once, for every tier, so no tier re-implements it:
* validates payloads and ``out`` buffers (``InvalidArgument`` naming them),
* counts hits, misses, puts, refusals, corrupt objects and latencies,
* verify-and-drop: a read that must be verified and fails its checksum, or a
  ``CorruptArtifact`` raised by the tier, is dropped and is a counted miss,
* the ``stats()`` shape, the same for every tier.

Contract:
* ``put`` returns True when the object is stored and readable (acknowledged),
  False when the tier could not take it (full of leased objects, too large,
  quota, unhealthy remote). It never raises for "no room"; it raises
  ``InvalidArgument`` for a malformed payload and may raise ``TierFault`` (or
  any other error) for a fault, which the chain counts and treats as a refusal.
* ``get`` returns an ``Artifact`` or None. With ``out`` (a contiguous 1-D
  uint8 CPU tensor of at least the object's size) the bytes are copied there;
  without it the artifact owns its bytes, or is a view valid until the object is
  overwritten or evicted (``zero_copy`` tiers): hold it with ``acquire``.
* ``acquire`` returns a ``Lease``: the artifact of one version, kept from being
  evicted or overwritten until the holder releases it (or ``lease_s`` passes, so
  a leaked lease cannot fill a tier). Tiers that are not ``zero_copy`` hand out
  an owned copy under a lease that holds nothing.
* ``contains`` takes keys in ``ArtifactKey.encode()`` form, so hot paths (the
  vLLM scheduler) build no key objects; no data moves.
* ``on_evict`` is set by the chain where victims may have to be written down;
  the tier calls ``on_evict(key, artifact)`` before the space is reused.
* Tiers are thread-safe.

Capabilities are declared class or instance attributes with defaults; callers
read them, never probe for methods.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Iterator, Optional, Sequence

import torch

from stratacache.core.artifact import Artifact, ArtifactMeta
from stratacache.core.errors import CorruptArtifact, InvalidArgument
from stratacache.core.keys import ArtifactKey
from stratacache.telemetry.metrics import TierCounters

log = logging.getLogger("stratacache.tiers")
EvictCallback = Callable[[ArtifactKey, Artifact], None]
_U64 = 0xFFFFFFFFFFFFFFFF

# stats() keys every tier reports at the top level; anything else a tier reports goes under "detail".
STATS_KEYS = ("tier", "persistent", "capacity_bytes", "items", "used_bytes",
              "evictions", "evicted_bytes")
# inspect() keys every inspectable tier reports; anything else goes under "detail".
INSPECT_KEYS = ("tier", "location", "items", "used_bytes", "capacity_bytes",
                "by_kind", "by_namespace", "unreadable")


class Lease:
    """One holder's hold on one stored version, with its artifact.

    Used as a context manager (``with tier.acquire(key) as art``) or released
    explicitly; ``release`` is idempotent and ends only this lease, never
    another holder's. Releasing it is the holder's job: other holders of the
    same key keep theirs.
    """

    __slots__ = ("artifact", "tier", "_release", "_lock")

    def __init__(self, artifact: Artifact, tier: str, release: Optional[Callable[[], None]] = None):
        self.artifact = artifact
        self.tier = tier                  # name of the tier the artifact came from
        self._release = release
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._release is not None

    def release(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Artifact:
        return self.artifact

    def __exit__(self, *exc) -> None:
        self.release()


def check_out(out, arg: str = "out") -> None:
    """``out`` must be a contiguous 1-D uint8 CPU tensor (its size is checked against the object)."""
    if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.dim() != 1 \
            or not out.is_contiguous() or not out.is_cpu:
        desc = (f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor)
                else type(out).__name__)
        raise InvalidArgument(f"{arg} must be a contiguous 1-D torch.uint8 CPU tensor, got {desc}")


def fit_out(out: torch.Tensor, size: int, arg: str = "out") -> torch.Tensor:
    """The first ``size`` bytes of ``out``; ``InvalidArgument`` if it is smaller."""
    if out.numel() < size:
        raise InvalidArgument(f"{arg} has {out.numel()} bytes but the stored object has {size}")
    return out if out.numel() == size else out.narrow(0, 0, size)


def check_payload(data, meta: ArtifactMeta, arg: str = "data") -> None:
    # On every put: is_cpu, not device.type (which builds a device object, ~0.4 us).
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1 \
            or not data.is_contiguous() or not data.is_cpu:
        desc = (f"{data.dtype} {tuple(data.shape)} on {data.device}" if isinstance(data, torch.Tensor)
                else type(data).__name__)
        raise InvalidArgument(f"{arg} must be a contiguous 1-D torch.uint8 CPU tensor, got {desc}")
    if data.numel() != meta.size:
        raise InvalidArgument(f"{arg} has {data.numel()} bytes but meta.size is {meta.size}")


def checksum_matches(art: Artifact) -> bool:
    from stratacache.ops import checksum64   # imported late: the ops load the native library
    return (checksum64(art.data) & _U64) == art.meta.checksum


class Tier(ABC):
    """Base of every tier; see the module docstring for the contract."""

    name: str = ""
    persistent: ClassVar[bool] = False     # survives the process (shared, disk, redis)
    zero_copy: ClassVar[bool] = False      # acquire() views the tier's own memory under a real lease
    inspectable: ClassVar[bool] = False    # inspect() reports on stored data from outside the process
    verifies_checksums: bool = False       # _get/_acquire check payload checksums themselves (fused)
    verify_reads: bool = False             # policy: verify every read, whatever the caller asks
    registers_memory: ClassVar[bool] = False   # wants the other tiers' host_memory() once (RDMA)
    capacity_bytes: int = 0
    on_evict: Optional[EvictCallback] = None

    def __init__(self, name: str, capacity_bytes: int):
        self.name = name
        self.capacity_bytes = int(capacity_bytes)
        self.on_evict = None
        self.counters = TierCounters(name)

    @classmethod
    @abstractmethod
    def from_config(cls, section, cfg) -> "Tier":
        """The tier its config section (``cfg.tiers.<name>``) describes."""

    # -- the protocol -----------------------------------------------------------------

    def put(self, key: ArtifactKey, data: torch.Tensor, meta: ArtifactMeta) -> bool:
        check_payload(data, meta)
        t0 = time.perf_counter()
        ok = bool(self._put(key, data, meta))
        self._count_put(ok, meta.size, time.perf_counter() - t0)
        return ok

    def put_many(self, items: Sequence[tuple[ArtifactKey, torch.Tensor, ArtifactMeta]]) -> list[bool]:
        for i, (_key, data, meta) in enumerate(items):
            check_payload(data, meta, f"items[{i}].data")
        t0 = time.perf_counter()
        oks = [bool(ok) for ok in self._put_many(items)]
        each = (time.perf_counter() - t0) / max(1, len(items))
        for ok, (_key, _data, meta) in zip(oks, items):
            self._count_put(ok, meta.size, each)
        return oks

    def get(self, key: ArtifactKey, out: Optional[torch.Tensor] = None, *,
            verify: bool = False) -> Optional[Artifact]:
        """The object (copied into ``out`` when given), or None: absent, or untrusted and dropped.
        ``verify`` asks for the payload checksum to be checked (done once, here or fused in the tier)."""
        if out is not None:
            check_out(out)
        t0 = time.perf_counter()
        try:
            art = self._get(key, out)
        except CorruptArtifact as exc:
            self._dropped(key, None, exc)
            art = None
        return self._count_get(key, self._trusted(key, art, verify), time.perf_counter() - t0)

    def get_many(self, keys: Sequence[ArtifactKey], outs: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 *, verify: bool = False) -> list[Optional[Artifact]]:
        if outs is not None:
            if len(outs) != len(keys):
                raise InvalidArgument(f"outs has {len(outs)} entries for {len(keys)} keys")
            for i, o in enumerate(outs):
                if o is not None:
                    check_out(o, f"outs[{i}]")
        t0 = time.perf_counter()
        arts = self._get_many(keys, outs)
        each = (time.perf_counter() - t0) / max(1, len(keys))
        out = []
        for key, art in zip(keys, arts):
            if isinstance(art, CorruptArtifact):
                self._dropped(key, None, art)
                art = None
            out.append(self._count_get(key, self._trusted(key, art, verify), each))
        return out

    def acquire(self, key: ArtifactKey, lease_s: Optional[float] = None, *,
                verify: bool = False) -> Optional[Lease]:
        """A ``Lease`` on the version now stored under ``key``, or None (absent or untrusted)."""
        t0 = time.perf_counter()
        try:
            lease = self._acquire(key, lease_s)
        except CorruptArtifact as exc:
            self._dropped(key, None, exc)
            lease = None
        if lease is not None and self._trusted(key, lease.artifact, verify) is None:
            lease.release()
            lease = None
        self._count_get(key, None if lease is None else lease.artifact, time.perf_counter() - t0)
        return lease

    @abstractmethod
    def contains(self, encoded_keys: Sequence[bytes]) -> list[bool]:
        """Whether each key (``ArtifactKey.encode()`` bytes) is stored here; no data moves."""

    @abstractmethod
    def delete(self, key: ArtifactKey) -> bool:
        """Remove ``key``; True if something was removed. Existing leases keep their bytes."""

    @abstractmethod
    def keys(self) -> Iterator[ArtifactKey]:
        """The keys stored here (a snapshot; keys this API did not write are skipped)."""

    def stats(self) -> dict:
        """Counters and occupancy in one shape for every tier: the ``STATS_KEYS`` and
        the counters at the top level, whatever else the tier reports under ``detail``."""
        out = self.counters.snapshot()
        own = dict(self._stats())
        out.update(tier=self.name, persistent=self.persistent, capacity_bytes=self.capacity_bytes)
        for k in STATS_KEYS:
            if k in own:
                out[k] = own.pop(k)
        out.setdefault("items", 0)
        out.setdefault("used_bytes", 0)
        out["detail"] = own
        return out

    @classmethod
    def inspect(cls, section, cfg) -> dict:
        """A read-only report on the data a configured tier holds, from outside any
        process using it, in the ``INSPECT_KEYS`` shape (see ``inspect_report``)."""
        raise InvalidArgument(f"tier {cls.name or cls.__name__!r} is private to the process "
                              "that uses it; there is nothing to inspect from outside")

    def start_prefault(self) -> None:
        """Start mapping stored objects into this process in the background (a hint; default none)."""

    def host_memory(self) -> list[torch.Tensor]:
        """The host memory this tier's payloads live in (an arena, a mapped region), each a
        1-D uint8 tensor fixed for the tier's life: what a ``registers_memory`` tier registers
        once so that moves from and into it need no per-call registration. Default: none."""
        return []

    def register_memory(self, memory: torch.Tensor) -> None:
        """Only for ``registers_memory`` tiers: ``memory`` (another tier's ``host_memory()``)
        will be the source and destination of this tier's moves; register it once, for the
        life of the process. Called by the chain when it is built. Default: nothing to do."""

    @abstractmethod
    def close(self) -> None:
        """Release the tier's resources; persistent tiers keep their data."""

    # -- what a tier implements -----------------------------------------------------------

    @abstractmethod
    def _put(self, key: ArtifactKey, data: torch.Tensor, meta: ArtifactMeta) -> bool:
        """Store a validated payload; False when there is no room (never raise for that)."""

    @abstractmethod
    def _get(self, key: ArtifactKey, out: Optional[torch.Tensor]) -> Optional[Artifact]:
        """The object or None; raise ``CorruptArtifact`` for a damaged one (the base drops it).
        ``out`` is already checked for dtype, shape and device; use ``fit_out`` for its size."""

    def _put_many(self, items) -> list[bool]:
        return [self._put(k, d, m) for k, d, m in items]

    def _get_many(self, keys, outs) -> list:
        """One result per key: an Artifact, None, or the ``CorruptArtifact`` it raised."""
        outs = outs if outs is not None else [None] * len(keys)
        res = []
        for k, o in zip(keys, outs):
            try:
                res.append(self._get(k, o))
            except CorruptArtifact as exc:
                res.append(exc)
        return res

    def _acquire(self, key: ArtifactKey, lease_s: Optional[float]) -> Optional[Lease]:
        """Default for tiers that are not zero_copy: an owned copy under a lease that holds nothing."""
        art = self._get(key, None)
        return None if art is None else Lease(art, self.name)

    def _drop(self, key: ArtifactKey, art: Optional[Artifact]) -> None:
        """Remove the version that failed a check (default: whatever is stored under ``key``)."""
        self.delete(key)

    @abstractmethod
    def _stats(self) -> dict:
        """At least ``items`` and ``used_bytes``; may give ``evictions`` / ``evicted_bytes``;
        anything else ends up under ``stats()["detail"]``."""

    # -- internals -------------------------------------------------------------------------

    def _trusted(self, key: ArtifactKey, art: Optional[Artifact], verify: bool) -> Optional[Artifact]:
        if art is None or not (verify or self.verify_reads) or self.verifies_checksums:
            return art
        if checksum_matches(art):
            return art
        self._dropped(key, art, CorruptArtifact("payload checksum mismatch"))
        return None

    def _dropped(self, key: ArtifactKey, art: Optional[Artifact], exc: CorruptArtifact) -> None:
        self.counters.add("corrupt")
        _log_corrupt(self.name, key, exc)
        try:
            self._drop(key, art)
        except Exception:  # noqa: BLE001 - it is a miss either way; the next put replaces it
            pass

    def _count_put(self, ok: bool, size: int, seconds: float) -> None:
        if ok:
            self.counters.record_transfer("put", seconds, "puts", "bytes_in", size)
        else:
            self.counters.add("put_failures")

    def _count_get(self, key: ArtifactKey, art: Optional[Artifact], seconds: float) -> Optional[Artifact]:
        if art is None:
            self.counters.add("misses")
        else:
            self.counters.record_transfer("get", seconds, "hits", "bytes_out", art.meta.size)
        return art


def inspect_report(tier: str, location: str, *, capacity_bytes: int, entries, unreadable: int = 0,
                   **detail) -> dict:
    """The ``inspect()`` shape from ``entries``: (ArtifactKey, stored bytes) pairs."""
    by_kind: dict[str, dict] = {}
    by_namespace: dict[str, dict] = {}
    items = used = 0
    for key, nbytes in entries:
        items += 1
        used += nbytes
        for table, name in ((by_kind, key.kind), (by_namespace, f"{key.kind}/{key.namespace}")):
            use = table.setdefault(name, {"items": 0, "bytes": 0})
            use["items"] += 1
            use["bytes"] += nbytes
    return {"tier": tier, "location": location, "items": items, "used_bytes": used,
            "capacity_bytes": capacity_bytes, "by_kind": by_kind, "by_namespace": by_namespace,
            "unreadable": unreadable, "detail": detail}


def _log_corrupt(tier: str, key: ArtifactKey, exc: BaseException) -> None:
    log.warning("stratacache tier %s: dropping %s: %s", tier, key, exc)
