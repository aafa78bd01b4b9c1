"""The MemoryLayer protocol: the one small interface every tier implements.

A tier stores opaque byte payloads under full ``ArtifactKey``s, with exact
byte accounting against ``capacity_bytes``. It owns its own eviction (the
TierChain only decides *where* data goes, never how a tier frees space).

Contract (all tiers):
* ``put`` returns True when the object is stored and readable (acknowledged),
  False when the tier could not take it (full of pinned objects, too large,
  quota, unhealthy remote). It never raises for "no room".
* ``get`` returns an ``Artifact`` or None. A corrupt object is a miss (counted
  in stats and removed). ``out`` (a 1-D uint8 tensor of at least ``meta.size``
  bytes) makes the tier copy into caller memory; without it the tier may return
  a zero-copy view into its memory, valid until the object is overwritten or
  evicted, so callers that keep a view must use ``pin``.
* ``pin`` takes a lease on an object so it cannot be evicted or overwritten
  while being read; leases expire after ``lease_s`` so a leaked pin cannot
  fill the tier. ``unpin`` releases it early.
* Batched forms exist so remote tiers can pipeline; the defaults loop.
* ``on_evict`` is set by the TierChain so evicted objects can be written down
  (write-back / demotion). Called as ``on_evict(key, artifact)`` before the
  space is reused; None (victims are simply freed) where nothing below needs them.
* Tiers are thread-safe.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence, runtime_checkable

import torch

from stratacache.core.artifact import Artifact, ArtifactMeta
from stratacache.core.keys import ArtifactKey

EvictCallback = Callable[[ArtifactKey, Artifact], None]


@runtime_checkable
class MemoryLayer(Protocol):
    name: str                 # config name of the tier: "cpu", "shared", "disk", "redis"
    capacity_bytes: int
    persistent: bool          # survives the process (shared, disk, redis)
    on_evict: Optional[EvictCallback]

    def put(self, key: ArtifactKey, data: torch.Tensor, meta: ArtifactMeta) -> bool: ...
    def get(self, key: ArtifactKey, out: Optional[torch.Tensor] = None) -> Optional[Artifact]: ...
    def contains(self, key: ArtifactKey) -> bool: ...
    def delete(self, key: ArtifactKey) -> bool: ...

    def put_many(self, items: Sequence[tuple[ArtifactKey, torch.Tensor, ArtifactMeta]]) -> list[bool]: ...
    def get_many(self, keys: Sequence[ArtifactKey],
                 outs: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[Optional[Artifact]]: ...
    def contains_many(self, keys: Sequence[ArtifactKey]) -> list[bool]: ...
    # Keys in ``ArtifactKey.encode()`` form: lookups that build no key objects (hot paths).
    def contains_encoded(self, encoded_keys: Sequence[bytes]) -> list[bool]: ...

    def pin(self, key: ArtifactKey, lease_s: Optional[float] = None) -> bool: ...
    def unpin(self, key: ArtifactKey) -> None: ...

    def keys(self) -> Iterator[ArtifactKey]: ...
    def used_bytes(self) -> int: ...
    def stats(self) -> dict: ...
    def close(self) -> None: ...


class BatchDefaults:
    """Mixin giving looped batched forms to tiers that have no faster path."""

    def put_many(self, items):
        return [self.put(k, d, m) for k, d, m in items]

    def get_many(self, keys, outs=None):
        outs = outs if outs is not None else [None] * len(keys)
        return [self.get(k, o) for k, o in zip(keys, outs)]

    def contains_many(self, keys: Iterable[ArtifactKey]):
        return [self.contains(k) for k in keys]

    def contains_encoded(self, encoded_keys: Iterable[bytes]):
        return self.contains_many([ArtifactKey.decode(e) for e in encoded_keys])
