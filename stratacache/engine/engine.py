"""StorageEngine: the one public API of the storage plane.

The engine turns payloads into (bytes view, ArtifactMeta), computes the
checksum once, and drives the TierChain. It never raises for tier faults: a
tier that fails is counted and treated as a miss or a failed store. It does
raise for caller mistakes (a non-contiguous payload, a bad ``out``, an unknown
mode or tier name), with a message naming the argument.

The plane has one rule set for what can be stored, checked here once, so no tier
refuses what another accepted: a key is an ``ArtifactKey`` (``TypeError`` otherwise)
whose encoding is at most ``MAX_KEY_BYTES``; a payload is a contiguous CPU tensor of
a dtype in ``STORABLE_DTYPES`` with at most ``MAX_NDIM`` dims, or bytes-like. A
0-dim tensor comes back 0-dim.

Integrity: process-private tiers (the CPU arena) are trusted; an object read
from a persistent tier (shared region, disk, Redis) is verified against its
checksum unless that tier already verifies on read (``verifies_checksums``)
or the caller passes ``verify=False``. A mismatch is a counted miss and the
object is deleted from that tier.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch

from stratacache.core.artifact import (_DTYPE_CODES, MAX_NDIM, Artifact, ArtifactMeta,
                                       CorruptArtifact, as_bytes)
from stratacache.core.keys import ArtifactKey, key_bytes
from stratacache.tiering.chain import TierChain

MODES = ("chain", "exact", "prefer")
# The shared region's key slot (SharedRegionLayer max_key_bytes): the smallest key limit
# of any tier, so every tier can store every key the engine lets through.
MAX_KEY_BYTES = 512
STORABLE_DTYPES = frozenset(_DTYPE_CODES)   # the dtypes a stored header can name


def _checksum64(data: torch.Tensor) -> int:
    from stratacache.ops import checksum64
    return checksum64(data) & _U64


_U64 = 0xFFFFFFFFFFFFFFFF


def _check_out(out) -> None:
    if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != torch.uint8
                            or out.dim() != 1 or not out.is_contiguous() or out.is_cuda):
        raise ValueError("out must be a contiguous 1-D torch.uint8 CPU tensor")


def _check_key(key, arg: str = "key") -> None:
    if not isinstance(key, ArtifactKey):
        raise TypeError(f"{arg} must be an ArtifactKey, got {type(key).__name__} {key!r:.80}")


def _check_keys(keys, arg: str = "keys") -> None:
    for i, key in enumerate(keys):
        _check_key(key, f"{arg}[{i}]")


def _prepare(key: ArtifactKey, payload, checksum: Optional[int],
             arg: str = "") -> tuple[torch.Tensor, ArtifactMeta]:
    """Flat bytes and metadata of a payload, checked against the plane's rules; the
    checksum is computed unless given. ``arg`` prefixes names in errors (``items[3].``)."""
    _check_key(key, f"{arg}key")
    n = len(key_bytes(key))
    if n > MAX_KEY_BYTES:
        raise ValueError(f"{arg}key {str(key)[:80]!r} encodes to {n} bytes; keys are at most "
                         f"{MAX_KEY_BYTES} bytes (the longest every tier stores)")
    if isinstance(payload, torch.Tensor):
        if payload.dtype not in STORABLE_DTYPES:
            raise TypeError(f"{arg}payload dtype {payload.dtype} cannot be stored; storable dtypes: "
                            + ", ".join(sorted(str(d).replace("torch.", "") for d in STORABLE_DTYPES)))
        if payload.dim() > MAX_NDIM:
            raise ValueError(f"{arg}payload has {payload.dim()} dims; at most {MAX_NDIM} are stored")
    data = _flat_bytes(payload)
    cs = _checksum64(data) if checksum is None else int(checksum) & _U64
    if isinstance(payload, torch.Tensor):
        return data, ArtifactMeta(data.numel(), cs, payload.dtype, tuple(payload.shape))
    # Bytes come back as the 1-D uint8 tensor they are; shape () is a 0-dim tensor's.
    return data, ArtifactMeta(data.numel(), cs, torch.uint8, (data.numel(),))


def _flat_bytes(payload) -> torch.Tensor:
    """``as_bytes`` with a shortcut for what the connector stores: flat contiguous uint8 CPU tensors."""
    if isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and payload.dim() == 1 \
            and payload.is_contiguous() and not payload.is_cuda:
        return payload
    with warnings.catch_warnings():   # read-only bytes: tiers only ever read a payload
        warnings.simplefilter("ignore", UserWarning)
        return as_bytes(payload)


def _encoded_keys(keys) -> list[bytes]:
    """``keys`` (all ArtifactKeys, or all their ``encode()`` bytes) as bytes; a mix, or
    anything else, is a TypeError naming the first offending entry."""
    if keys and isinstance(keys[0], bytes):
        encoded = list(keys)
        if set(map(type, encoded)) != {bytes}:
            bad = next(i for i, k in enumerate(encoded) if type(k) is not bytes)
            raise TypeError(f"keys[{bad}] is {type(encoded[bad]).__name__}, but keys[0] is bytes: "
                            "pass all ArtifactKeys or all their encode() bytes")
        return encoded
    try:
        return list(map(key_bytes, keys))
    except AttributeError:
        bad = next(i for i, k in enumerate(keys) if not isinstance(k, ArtifactKey))
        raise TypeError(f"keys[{bad}] must be an ArtifactKey (or every key its encode() bytes), "
                        f"got {type(keys[bad]).__name__} {keys[bad]!r:.80}") from None


class StorageEngine:
    def __init__(self, cfg, tiers: Optional[Sequence[str]] = None, *, chain: Optional[TierChain] = None):
        self.cfg = cfg
        self.chain = chain if chain is not None else TierChain.from_config(cfg, tiers)
        self._all = tuple(range(len(self.chain.tiers)))
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("stores", "store_failures", "loads", "hits", "misses",
                                      "corrupt", "lookups"), 0)
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
    def tiers(self) -> list:
        return self.chain.tiers

    # -- helpers ---------------------------------------------------------------------------

    def _count(self, **n: int) -> None:
        with self._lock:
            for k, v in n.items():
                self._counts[k] += v

    def _order(self, mode: str, tier: Optional[str]) -> tuple[int, ...]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if tier is None:
            if mode != "chain":
                raise ValueError(f"mode={mode!r} needs tier=NAME")
            return self._all
        try:
            t = self.chain.index[tier]
        except KeyError:
            raise ValueError(f"tier {tier!r} is not in this engine; tiers are "
                             f"{', '.join(self.chain.index)}") from None
        if mode == "exact":
            return (t,)
        if mode == "prefer":
            return (t,) + tuple(i for i in self._all if i != t)
        return self._all[t:]

    # -- writes ------------------------------------------------------------------------------

    def store(self, key: ArtifactKey, payload, *, checksum: Optional[int] = None,
              tier: Optional[str] = None, mode: str = "chain") -> bool:
        """True once stored in the first target tier that takes it and in every tier its
        write_through links lead to (acknowledged); False if any of them refused it."""
        start = 0 if tier is None and mode == "chain" else self._order(mode, tier)[0]
        data, meta = _prepare(key, payload, checksum)
        ok = self.chain.store(key, data, meta, start=start, only=(mode == "exact"))
        self._count(stores=1, store_failures=0 if ok else 1)
        return ok

    def store_many(self, items, *, checksums: Optional[Sequence[Optional[int]]] = None,
                   tier: Optional[str] = None, mode: str = "chain") -> list[bool]:
        """Batched ``store``: one ``put_many`` per tier (pipelined by remote tiers)."""
        items = list(items)
        if checksums is not None and len(checksums) != len(items):
            raise ValueError(f"checksums has {len(checksums)} entries for {len(items)} items")
        start = 0 if tier is None and mode == "chain" else self._order(mode, tier)[0]
        cs = checksums if checksums is not None else [None] * len(items)
        prepared = [(k, *_prepare(k, p, c, f"items[{i}].")) for i, ((k, p), c) in enumerate(zip(items, cs))]
        ok = self.chain.store_many(prepared, start=start, only=(mode == "exact"))
        failed = ok.count(False)
        self._count(stores=len(ok) - failed, store_failures=failed)
        return ok

    def delete(self, key: ArtifactKey) -> bool:
        _check_key(key)
        return self.chain.delete(key)

    # -- reads ---------------------------------------------------------------------------------

    def load(self, key: ArtifactKey, *, out: Optional[torch.Tensor] = None, mode: str = "chain",
             tier: Optional[str] = None, verify: bool = True) -> Optional[Artifact]:
        _check_key(key)
        order = self._order(mode, tier)
        _check_out(out)
        art, found = self._read(key, out, order, verify)
        if art is not None and mode != "exact":
            self.chain.promote(key, art, found, order)
        self._count(loads=1, hits=art is not None, misses=art is None)
        return art

    def _read(self, key, out, order, verify) -> tuple[Optional[Artifact], int]:
        chain = self.chain
        for i in order:
            tier = chain.tiers[i]
            try:
                art = tier.get(key, out)
            except CorruptArtifact:
                self._count(corrupt=1)
                continue
            except ValueError as exc:
                if out is not None:
                    raise   # the caller's buffer does not fit the object
                chain.record_error(i, exc)
                continue
            except Exception as exc:
                chain.record_error(i, exc)
                continue
            art = self._verified(i, key, art, verify)
            if art is not None:
                return art, i
        return None, -1

    def _verified(self, i: int, key: ArtifactKey, art: Optional[Artifact], verify: bool) -> Optional[Artifact]:
        """``art`` unless it came from an untrusted tier and fails its checksum (then deleted there)."""
        tier = self.chain.tiers[i]
        if art is None or not verify or not tier.persistent or getattr(tier, "verifies_checksums", False):
            return art
        if _checksum64(art.data) == art.meta.checksum:
            return art
        self._count(corrupt=1)
        self.chain._call(i, tier.delete, key)
        return None

    def load_many(self, keys: Sequence[ArtifactKey], *, outs=None, mode: str = "chain",
                  tier: Optional[str] = None, verify: bool = True) -> list[Optional[Artifact]]:
        """Batched ``load``: one ``get_many`` per tier for the keys still missing."""
        keys = list(keys)
        _check_keys(keys)
        order = self._order(mode, tier)
        if outs is not None:
            outs = list(outs)
            if len(outs) != len(keys):
                raise ValueError(f"outs has {len(outs)} entries for {len(keys)} keys")
            for o in outs:
                _check_out(o)
        chain = self.chain
        results: list[Optional[Artifact]] = [None] * len(keys)
        todo = list(range(len(keys)))
        for i in order:
            if not todo:
                break
            sub_outs = None if outs is None else [outs[j] for j in todo]
            try:
                arts = chain.tiers[i].get_many([keys[j] for j in todo], sub_outs)
            except ValueError as exc:
                if outs is not None and not isinstance(exc, CorruptArtifact):
                    raise   # a caller buffer does not fit its object
                chain.record_error(i, exc)
                continue
            except Exception as exc:
                chain.record_error(i, exc)
                continue
            missing = []
            for j, art in zip(todo, arts):
                art = self._verified(i, keys[j], art, verify)
                if art is None:
                    missing.append(j)
                else:
                    results[j] = art
                    if mode != "exact":
                        chain.promote(keys[j], art, i, order)
            todo = missing
        self._count(loads=len(keys), hits=len(keys) - len(todo), misses=len(todo))
        return results

    @contextmanager
    def pinned(self, key: ArtifactKey, *, mode: str = "chain",
               tier: Optional[str] = None, verify: bool = True) -> Iterator[Optional[Artifact]]:
        """A zero-copy view of ``key`` held under a lease for the with-block (None on a miss).

        Tiers with ``pinned_get`` lease and view the same object atomically; for
        others the view comes from ``pin`` + ``get``; where nothing can be pinned
        (a remote tier) the artifact is an owned copy.
        """
        _check_key(key)
        order = self._order(mode, tier)
        chain = self.chain
        for i in order:
            t = chain.tiers[i]
            leased = getattr(t, "pinned_get", None)
            if leased is not None:
                got = chain._call(i, leased, key)
                if got is None:
                    continue
                art, release = got
                art = self._verified(i, key, art, verify)
            elif chain._call(i, t.pin, key, default=False):
                release = lambda i=i, t=t: chain._call(i, t.unpin, key)  # noqa: E731
                art, _ = self._read(key, None, (i,), verify)
            else:
                continue
            try:
                if art is not None:
                    self._count(loads=1, hits=1)
                    yield art
                    return
            finally:
                release()
        yield self.load(key, mode=mode, tier=tier, verify=verify)   # a miss, or found only where pins do not apply

    def contains(self, key: ArtifactKey, *, mode: str = "chain", tier: Optional[str] = None) -> bool:
        _check_key(key)
        return self.chain.find(key, self._order(mode, tier)) is not None

    def contains_many(self, keys: Union[Sequence[ArtifactKey], Sequence[bytes]]) -> list[bool]:
        """Whether each key is present in some tier; no data moves, nothing is promoted.

        ``keys`` is a sequence of ArtifactKeys or one of their ``encode()`` bytes:
        every tier looks keys up by their bytes, so a caller on a hot path (the
        vLLM scheduler) can skip building key objects.
        """
        encoded = _encoded_keys(keys)
        present = [False] * len(encoded)
        todo = range(len(encoded))
        for i, tier in enumerate(self.chain.tiers):
            batch = encoded if i == 0 else [encoded[j] for j in todo]
            hits = self.chain._call(i, tier.contains_encoded, batch, default=[False] * len(batch))
            for j, hit in zip(todo, hits):
                if hit:
                    present[j] = True
            todo = [j for j in todo if not present[j]]
            if not todo:
                break
        return present

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
        for t in self.chain.tiers:
            start = getattr(t, "start_prefault", None)
            if start is not None:
                start()

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
        chain = self.chain
        tiers = {}
        errors = chain.errors()
        for i, t in enumerate(chain.tiers):
            s = chain._call(i, t.stats, default={}) or {}
            s = dict(s)
            s["errors"] = s.get("errors", 0) + errors.get(t.name, 0)
            tiers[t.name] = s
        with self._lock:
            engine = dict(self._counts)
        return {"engine": engine, "tiers": tiers, "writeback": chain.flusher.stats(),
                "prometheus_port": self._exporter.port if self._exporter else None}
