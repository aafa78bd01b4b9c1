"""StorageEngine: the one public API of the storage plane.

The engine turns payloads into (bytes view, ArtifactMeta), computes the
checksum once, checks its arguments, decides which reads are verified, counts,
and drives the TierChain, which makes every call into the tiers (the engine
never touches a tier). It never raises for tier faults: a tier that fails is
counted and treated as a miss or a failed store. It raises ``InvalidArgument``
(a ``ValueError``) or ``InvalidType`` (a ``TypeError``) for caller mistakes (a
non-contiguous payload, a bad ``out``, an unknown mode or tier name), with a
message naming the argument.

The plane has one rule set for what can be stored, checked here once, so no tier
refuses what another accepted: a key is an ``ArtifactKey`` (``InvalidType`` otherwise)
whose encoding is at most ``MAX_KEY_BYTES``; a payload is a contiguous CPU tensor of
a dtype in ``STORABLE_DTYPES`` with at most ``MAX_NDIM`` dims, or bytes-like. A
0-dim tensor comes back 0-dim.

Integrity: process-private tiers (the CPU arena) are trusted; an object read
from a persistent tier (shared region, disk, Redis) is verified against its
checksum unless the caller passes ``verify=False`` (a tier that checks on read
itself, ``verifies_checksums``, does it fused; one with ``verify_reads`` checks
every read whatever is asked). A mismatch is a counted miss and the object is
dropped from that tier.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch

from stratacache.backends.base import Lease, check_out
from stratacache.core.artifact import _DTYPE_CODES, MAX_NDIM, Artifact, ArtifactMeta, as_bytes, meta_for
from stratacache.core.errors import InvalidArgument, InvalidType
from stratacache.core.keys import ArtifactKey, key_bytes
from stratacache.tiering.chain import TierChain

MODES = ("chain", "exact", "prefer")
# The shared region's key slot (SharedRegionTier max_key_bytes): the smallest key limit
# of any tier, so every tier can store every key the engine lets through.
MAX_KEY_BYTES = 512
STORABLE_DTYPES = frozenset(_DTYPE_CODES)   # the dtypes a stored header can name


def _checksum64(data: torch.Tensor) -> int:
    from stratacache.ops import checksum64
    return checksum64(data) & _U64


_U64 = 0xFFFFFFFFFFFFFFFF


def _check_key(key, arg: str = "key") -> None:
    if not isinstance(key, ArtifactKey):
        raise InvalidType(f"{arg} must be an ArtifactKey, got {type(key).__name__} {key!r:.80}")


def _check_keys(keys, arg: str = "keys") -> None:
    for i, key in enumerate(keys):
        _check_key(key, f"{arg}[{i}]")


def _prepare(key: ArtifactKey, payload, checksum: Optional[int],
             arg: str = "") -> tuple[torch.Tensor, ArtifactMeta]:
    """Flat bytes and metadata of a payload, checked against the plane's rules; the
    checksum is computed unless given. ``arg`` prefixes names in errors (``items[3].``)."""
    if not isinstance(key, ArtifactKey):
        _check_key(key, f"{arg}key")   # raises, naming the argument
    n = len(key_bytes(key))
    if n > MAX_KEY_BYTES:
        raise InvalidArgument(f"{arg}key {str(key)[:80]!r} encodes to {n} bytes; keys are at most "
                              f"{MAX_KEY_BYTES} bytes (the longest every tier stores)")
    if isinstance(payload, torch.Tensor):
        # `is uint8` first: hashing a dtype for the set lookup costs 0.3 us on every store.
        if payload.dtype is not torch.uint8 and payload.dtype not in STORABLE_DTYPES:
            raise InvalidType(f"{arg}payload dtype {payload.dtype} cannot be stored; storable dtypes: "
                              + ", ".join(sorted(str(d).replace("torch.", "") for d in STORABLE_DTYPES)))
        if payload.dim() > MAX_NDIM:
            raise InvalidArgument(f"{arg}payload has {payload.dim()} dims; at most {MAX_NDIM} are stored")
    data = _flat_bytes(payload)
    cs = _checksum64(data) if checksum is None else int(checksum) & _U64
    return data, meta_for(payload, cs)


def _flat_bytes(payload) -> torch.Tensor:
    """``as_bytes`` with a shortcut for what the connector stores: flat contiguous uint8 CPU tensors."""
    if isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and payload.dim() == 1 \
            and payload.is_contiguous() and not payload.is_cuda:
        return payload
    with warnings.catch_warnings():   # read-only bytes: tiers only ever read a payload
        warnings.simplefilter("ignore", UserWarning)
        try:
            return as_bytes(payload)
        except TypeError as exc:
            raise InvalidType(str(exc)) from None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None


def _encoded_keys(keys) -> list[bytes]:
    """``keys`` (all ArtifactKeys, or all their ``encode()`` bytes) as bytes; a mix, or
    anything else, is an ``InvalidType`` naming the first offending entry."""
    if keys and isinstance(keys[0], bytes):
        encoded = list(keys)
        if set(map(type, encoded)) != {bytes}:
            bad = next(i for i, k in enumerate(encoded) if type(k) is not bytes)
            raise InvalidType(f"keys[{bad}] is {type(encoded[bad]).__name__}, but keys[0] is bytes: "
                              "pass all ArtifactKeys or all their encode() bytes")
        return encoded
    try:
        return list(map(key_bytes, keys))
    except AttributeError:
        bad = next(i for i, k in enumerate(keys) if not isinstance(k, ArtifactKey))
        raise InvalidType(f"keys[{bad}] must be an ArtifactKey (or every key its encode() bytes), "
                        f"got {type(keys[bad]).__name__} {keys[bad]!r:.80}") from None


class StorageEngine:
    def __init__(self, cfg, tiers: Optional[Sequence[str]] = None, *, chain: Optional[TierChain] = None):
        self.cfg = cfg
        self.chain = chain if chain is not None else TierChain.from_config(cfg, tiers)
        self._all = tuple(range(len(self.chain.names)))
        # The checksum policy: verify=True checks what the persistent tiers return.
        self._untrusted = frozenset(i for i, p in enumerate(self.chain.persistent) if p)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("stores", "store_failures", "loads", "hits", "misses"), 0)
        self._closed = False
        self._exporter = None
        if cfg is not None and cfg.telemetry.prometheus:
            from stratacache.telemetry import PrometheusExporter
            self._exporter = PrometheusExporter(self.stats)
            self._exporter.start(cfg.telemetry.host, cfg.telemetry.port)

    @classmethod
    def from_config(cls, path=None, overrides=None, tiers: Optional[Sequence[str]] = None) -> "StorageEngine":
        from stratacache.config import load_config
        return cls(load_config(path, overrides), tiers)

    @property
    def tier_names(self) -> tuple[str, ...]:
        """The names of this engine's tiers, fastest first."""
        return self.chain.names

    # -- helpers ---------------------------------------------------------------------------

    # Two fixed-argument counters rather than one taking **kwargs: they run on every store
    # and load, where building the kwargs dict and looping over it cost about 0.5 us.
    def _count_stores(self, attempted: int, failed: int) -> None:
        with self._lock:
            c = self._counts
            c["stores"] += attempted
            c["store_failures"] += failed

    def _count_loads(self, hits: int, misses: int) -> None:
        with self._lock:
            c = self._counts
            c["loads"] += hits + misses
            c["hits"] += hits
            c["misses"] += misses

    def _order(self, mode: str, tier: Optional[str]) -> tuple[int, ...]:
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {MODES}, got {mode!r}")
        if tier is None:
            if mode != "chain":
                raise InvalidArgument(f"mode={mode!r} needs tier=NAME")
            return self._all
        try:
            t = self.chain.names.index(tier)
        except ValueError:
            raise InvalidArgument(f"tier {tier!r} is not in this engine; tiers are "
                                  f"{', '.join(self.chain.names)}") from None
        if mode == "exact":
            return (t,)
        if mode == "prefer":
            return (t,) + tuple(i for i in self._all if i != t)
        return self._all[t:]

    def _verify(self, verify: bool) -> frozenset:
        return self._untrusted if verify else frozenset()

    # -- writes ------------------------------------------------------------------------------

    def store(self, key: ArtifactKey, payload, *, checksum: Optional[int] = None,
              tier: Optional[str] = None, mode: str = "chain") -> bool:
        """True once stored in the first target tier that takes it and in every tier its
        write_through links lead to (acknowledged); False if any of them refused it."""
        start = 0 if tier is None and mode == "chain" else self._order(mode, tier)[0]
        data, meta = _prepare(key, payload, checksum)
        ok = self.chain.store(key, data, meta, start=start, only=(mode == "exact"))
        self._count_stores(1, 0 if ok else 1)
        return ok

    def store_many(self, items, *, checksums: Optional[Sequence[Optional[int]]] = None,
                   tier: Optional[str] = None, mode: str = "chain") -> list[bool]:
        """Batched ``store``: one ``put_many`` per tier (pipelined by remote tiers)."""
        items = list(items)
        if checksums is not None and len(checksums) != len(items):
            raise InvalidArgument(f"checksums has {len(checksums)} entries for {len(items)} items")
        start = 0 if tier is None and mode == "chain" else self._order(mode, tier)[0]
        cs = checksums if checksums is not None else [None] * len(items)
        prepared = [(k, *_prepare(k, p, c, f"items[{i}].")) for i, ((k, p), c) in enumerate(zip(items, cs))]
        ok = self.chain.store_many(prepared, start=start, only=(mode == "exact"))
        failed = ok.count(False)
        self._count_stores(len(ok), failed)
        return ok

    def delete(self, key: ArtifactKey) -> bool:
        _check_key(key)
        return self.chain.delete(key)

    # -- reads ---------------------------------------------------------------------------------

    def load(self, key: ArtifactKey, *, out: Optional[torch.Tensor] = None, mode: str = "chain",
             tier: Optional[str] = None, verify: bool = True) -> Optional[Artifact]:
        """The object (copied into ``out`` when given) from the first tier in the mode's order
        that holds a trusted copy, promoted into the tiers above it; None on a miss."""
        _check_key(key)
        order = self._order(mode, tier)
        if out is not None:
            check_out(out)
        art = self.chain.load(key, out, order=order, verify=self._verify(verify))
        self._count_loads(art is not None, art is None)
        return art

    def load_many(self, keys: Sequence[ArtifactKey], *, outs=None, mode: str = "chain",
                  tier: Optional[str] = None, verify: bool = True) -> list[Optional[Artifact]]:
        """Batched ``load``: one ``get_many`` per tier for the keys still missing."""
        keys = list(keys)
        _check_keys(keys)
        order = self._order(mode, tier)
        if outs is not None:
            outs = list(outs)
            if len(outs) != len(keys):
                raise InvalidArgument(f"outs has {len(outs)} entries for {len(keys)} keys")
            for i, o in enumerate(outs):
                if o is not None:
                    check_out(o, f"outs[{i}]")
        results = self.chain.load_many(keys, outs, order=order, verify=self._verify(verify))
        misses = results.count(None)
        self._count_loads(len(keys) - misses, misses)
        return results

    def lease(self, key: ArtifactKey, *, lease_s: Optional[float] = None, mode: str = "chain",
              tier: Optional[str] = None, verify: bool = True) -> Optional[Lease]:
        """A ``Lease`` on ``key`` from the first tier in the mode's order that holds it (None on
        a miss): on a zero_copy tier (CPU arena, shared region) ``lease.artifact`` views tier
        memory, kept from eviction and overwrite until this holder releases it (``release()``
        or a with-block) or ``lease_s`` (default ``cfg.lease_s``) passes; elsewhere it is an
        owned copy. A lease reads in place: a hit in a lower tier is not promoted (a promotion
        would be a second copy of every chunk the vLLM worker leases from the shared region)."""
        _check_key(key)
        order = self._order(mode, tier)
        lease = self.chain.lease(key, lease_s, order=order, verify=self._verify(verify))
        self._count_loads(lease is not None, lease is None)
        return lease

    @contextmanager
    def pinned(self, key: ArtifactKey, *, mode: str = "chain",
               tier: Optional[str] = None, verify: bool = True) -> Iterator[Optional[Artifact]]:
        """``lease`` as a with-block: yields the leased artifact (None on a miss) and releases
        the lease when the block ends."""
        lease = self.lease(key, mode=mode, tier=tier, verify=verify)
        if lease is None:
            yield None
            return
        with lease as art:
            yield art

    def hold(self, keys: Sequence[ArtifactKey], *, lease_s: Optional[float] = None) -> list[Lease]:
        """Leases on every in-memory (zero_copy tier) copy of ``keys``: nothing evicts them
        until each is released or ``lease_s`` passes. For objects that must stay resident
        while in use (an offloaded model's weights); renew by holding again before
        releasing. Unverified, not counted as loads (the tiers count the hits)."""
        keys = list(keys)
        _check_keys(keys)
        return self.chain.hold(keys, lease_s)

    def contains(self, key: ArtifactKey, *, mode: str = "chain", tier: Optional[str] = None) -> bool:
        _check_key(key)
        return self.chain.contains([key_bytes(key)], order=self._order(mode, tier))[0]

    def contains_many(self, keys: Union[Sequence[ArtifactKey], Sequence[bytes]]) -> list[bool]:
        """Whether each key is present in some tier; no data moves, nothing is promoted.

        ``keys`` is a sequence of ArtifactKeys or one of their ``encode()`` bytes:
        every tier looks keys up by their bytes, so a caller on a hot path (the
        vLLM scheduler) can skip building key objects.
        """
        return self.chain.contains(_encoded_keys(keys))

    def prefix_lookup(self, keys: Union[Sequence[ArtifactKey], Sequence[bytes]]) -> int:
        """How many leading keys are present in some tier (keys as for ``contains_many``)."""
        n = 0
        for hit in self.contains_many(keys):
            if not hit:
                break
            n += 1
        return n

    # -- lifecycle ------------------------------------------------------------------------------

    def start_prefault(self) -> None:
        """Start mapping persisted objects into this process on the tiers that
        support it (the shared region), in the background; see the tier's
        ``start_prefault``."""
        self.chain.start_prefault()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every write_back link has written its dirty objects down."""
        return self.chain.flush(timeout)

    def close(self, timeout: Optional[float] = None) -> bool:
        if self._closed:
            return True
        self._closed = True
        drained = self.chain.close(timeout)
        if self._exporter is not None:
            self._exporter.stop()
        return drained

    def __enter__(self) -> "StorageEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """``engine``: this engine's counters, ``corrupt`` summed over its tiers (each
        dropped object once); ``tiers``: each tier's ``stats()`` with the faults the chain
        counted added to its ``errors``; ``writeback``: the flusher's."""
        tiers = self.chain.stats()
        with self._lock:
            engine = dict(self._counts)
        engine["corrupt"] = sum(s.get("corrupt", 0) for s in tiers.values())
        return {"engine": engine, "tiers": tiers, "writeback": self.chain.flusher.stats(),
                "prometheus_port": self._exporter.port if self._exporter else None}
