"""ParameterStoreClient: model parameters as ``params`` artifacts in the storage plane.

One tensor (a parameter or buffer) is one ``ParamRecord``. It is stored as one
or more shards keyed ``ArtifactKey("params", "<model>@<revision>",
"<module path>/<tensor name>/<i>of<n>/<dtype>")``, so the key says which model,
revision, layer, tensor, shard and dtype the bytes are. Going through the
engine gives parameters the ``params`` namespace quota and priority: KV traffic
(lower priority) cannot evict them.

A shard is a flat run of whole elements of the tensor's dtype; a tensor larger
than ``shard_bytes`` is split so that no single object dominates a tier.

Integrity: copies are always checksum-verified by the engine. A leased
zero-copy view is verified the first time this client sees that object at that
address (``verify="once"``, the default) or on every read (``"always"``).
Weights are re-read on every forward pass, so re-hashing unchanged memory each
time would double the memory traffic of a decode step; an object that is
re-stored or moved has a new address or checksum and is verified again.
"""

from __future__ import annotations

import json
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from stratacache.core.keys import ArtifactKey
from stratacache.ops import checksum64

DEFAULT_SHARD_BYTES = 256 << 20
VERIFY_MODES = ("once", "always")
MANIFEST_NAME = "manifest"   # has no "/", so it can never collide with a tensor key


class ParamStoreError(RuntimeError):
    """The plane refused to store a parameter, or holds bytes that do not match it."""


class ParamMissing(ParamStoreError):
    """A parameter shard is not in the plane (never stored, deleted or evicted)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ParamStoreError(f"unknown dtype name {name!r} in a stored parameter record")
    return dtype


@dataclass(frozen=True)
class ParamRecord:
    """Where one tensor lives in the plane and what it must look like when read back."""

    module: str                  # qualified module path ("" for the root module)
    name: str                    # attribute name on that module ("weight", "inv_freq")
    dtype: torch.dtype
    shape: tuple[int, ...]
    num_shards: int = 1

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def shard_elems(self) -> list[tuple[int, int]]:
        """(start, stop) element ranges of the shards, in order."""
        per = math.ceil(self.numel / self.num_shards) if self.numel else 0
        return [(min(i * per, self.numel), min((i + 1) * per, self.numel)) for i in range(self.num_shards)]

    def to_json(self) -> dict:
        return {"module": self.module, "name": self.name, "dtype": dtype_name(self.dtype),
                "shape": list(self.shape), "shards": self.num_shards}

    @classmethod
    def from_json(cls, d: dict) -> "ParamRecord":
        try:
            return cls(module=str(d["module"]), name=str(d["name"]), dtype=dtype_from_name(d["dtype"]),
                       shape=tuple(int(s) for s in d["shape"]), num_shards=int(d["shards"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ParamStoreError(f"malformed parameter record in the manifest: {d!r}") from exc


class ParameterStoreClient:
    """Put and get the tensors of one model revision through a ``StorageEngine``."""

    def __init__(self, engine, model_id: str, revision: str = "main", *,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, verify: str = "once"):
        for arg, value in (("model_id", model_id), ("revision", revision)):
            if not isinstance(value, str) or not value or "\x1f" in value:
                raise ValueError(f"{arg} must be a non-empty string, got {value!r}")
        if "@" in revision:
            raise ValueError(f"revision must not contain '@', got {revision!r}")
        if not isinstance(shard_bytes, int) or shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.engine = engine
        self.model_id = model_id
        self.revision = revision
        self.namespace = f"{model_id}@{revision}"
        self.shard_bytes = shard_bytes
        self.verify = verify
        self._verified: dict[ArtifactKey, tuple[int, int]] = {}   # key -> (address, checksum) seen intact
        self._verified_lock = threading.Lock()

    # -- keys -----------------------------------------------------------------
    def keys(self, record: ParamRecord) -> list[ArtifactKey]:
        for part in (record.module, record.name):
            if "/" in part:
                raise ValueError(f"module path and tensor name must not contain '/': {record.qualname!r}")
        module = record.module or "."
        return [ArtifactKey("params", self.namespace,
                            f"{module}/{record.name}/{i}of{record.num_shards}/{dtype_name(record.dtype)}")
                for i in range(record.num_shards)]

    def record_for(self, module: str, name: str, tensor: torch.Tensor) -> ParamRecord:
        nbytes = tensor.numel() * tensor.element_size()
        shards = max(1, math.ceil(nbytes / self.shard_bytes))
        shards = min(shards, max(1, tensor.numel()))
        return ParamRecord(module, name, tensor.dtype, tuple(tensor.shape), shards)

    # -- writes ---------------------------------------------------------------
    def put(self, module: str, name: str, tensor: torch.Tensor) -> ParamRecord:
        """Store one tensor (copied to the CPU if needed); raises if the plane refuses it."""
        if tensor.device.type == "meta":
            raise ParamStoreError(f"{module + '.' if module else ''}{name} is on the meta device: "
                                  "it has no data to store")
        record = self.record_for(module, name, tensor)
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        for key, (lo, hi) in zip(self.keys(record), record.shard_elems()):
            if not self.engine.store(key, flat[lo:hi]):
                raise ParamStoreError(f"the storage plane refused {key} ({(hi - lo) * tensor.element_size()} "
                                      "bytes): its first tier is full of pinned data, the params quota "
                                      "is exhausted or the tier failed (see engine.stats())")
        return record

    def put_manifest(self, manifest: dict) -> None:
        payload = bytearray(json.dumps(manifest, sort_keys=True).encode("utf-8"))
        key = ArtifactKey("params", self.namespace, MANIFEST_NAME)
        if not self.engine.store(key, payload):
            raise ParamStoreError(f"the storage plane refused the manifest {key}")

    # -- reads ----------------------------------------------------------------
    def get_manifest(self) -> Optional[dict]:
        art = self.engine.load(ArtifactKey("params", self.namespace, MANIFEST_NAME))
        if art is None:
            return None
        try:
            return json.loads(bytes(art.data.numpy()).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ParamStoreError(f"the manifest of {self.namespace} is not valid JSON") from exc

    def get(self, record: ParamRecord, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Copy a tensor out of the plane into ``out`` (a contiguous CPU tensor) or a new one."""
        if out is None:
            out = torch.empty(record.shape, dtype=record.dtype)
        elif (out.dtype != record.dtype or tuple(out.shape) != record.shape or not out.is_contiguous()
              or out.device.type != "cpu"):
            raise ValueError(f"out must be a contiguous CPU {record.dtype} tensor of shape {record.shape}")
        flat = out.reshape(-1)
        for key, (lo, hi) in zip(self.keys(record), record.shard_elems()):
            try:
                art = self.engine.load(key, out=flat[lo:hi].view(torch.uint8))
            except ValueError as exc:          # the stored object does not fit the record's size
                raise ParamStoreError(f"{key} does not fit {record.qualname}: the plane holds a different "
                                      f"tensor under this key ({exc})") from exc
            if art is None:
                raise ParamMissing(f"{key} is not in the storage plane")
            self._check(key, art.meta, record, hi - lo)
        return out

    @contextmanager
    def view(self, record: ParamRecord) -> Iterator[torch.Tensor]:
        """The tensor as a zero-copy view of tier memory, leased for the with-block.

        Falls back to a private copy when the tensor is sharded or the tier's
        bytes are not aligned for the dtype.
        """
        if record.num_shards != 1:
            yield self.get(record)
            return
        key = self.keys(record)[0]
        always = self.verify == "always"
        with self.engine.pinned(key, verify=always) as art:
            if art is not None and (always or self._intact(key, art)):
                yield self._as_tensor(key, art, record)
                return
        with self.engine.pinned(key) as art:      # corrupt: the engine drops it and tries lower tiers
            if art is None:
                raise ParamMissing(f"{key} is not in the storage plane")
            yield self._as_tensor(key, art, record)

    def _intact(self, key: ArtifactKey, art) -> bool:
        """Checksum-verified, or already verified here at the same address and checksum."""
        seen = (art.data.data_ptr(), art.meta.checksum)
        with self._verified_lock:
            if self._verified.get(key) == seen:
                return True
        if checksum64(art.data) & 0xFFFFFFFFFFFFFFFF != art.meta.checksum:
            return False
        with self._verified_lock:
            self._verified[key] = seen
        return True

    def _as_tensor(self, key: ArtifactKey, art, record: ParamRecord) -> torch.Tensor:
        self._check(key, art.meta, record, record.numel)
        data = art.data
        if data.device.type != "cpu" or data.storage_offset() % record.dtype.itemsize:
            data = data.clone()
        return data.view(record.dtype).view(record.shape)

    def contains(self, records: Sequence[ParamRecord]) -> list[bool]:
        """Per record: are all of its shards in the plane?"""
        keys = [self.keys(r) for r in records]
        present = iter(self.engine.contains_many([k for ks in keys for k in ks]))
        return [all([next(present) for _ in ks]) for ks in keys]

    def delete(self, records: Sequence[ParamRecord], manifest: bool = False) -> None:
        for record in records:
            for key in self.keys(record):
                self.engine.delete(key)
        if manifest:
            self.engine.delete(ArtifactKey("params", self.namespace, MANIFEST_NAME))

    @staticmethod
    def _check(key: ArtifactKey, meta, record: ParamRecord, numel: int) -> None:
        want = numel * record.dtype.itemsize
        if meta.size != want or meta.dtype != record.dtype:
            raise ParamStoreError(f"{key} holds {meta.size} bytes of {meta.dtype}, expected {want} bytes "
                                  f"of {record.dtype}: the plane holds a different tensor under this key")
