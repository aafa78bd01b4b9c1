"""What the scheduler tells the workers each step, and what they report back.

Only block ids and chunk key names cross the process boundary (never token
lists); the worker completes each name into a full key with its own
TP-rank namespace. Everything here is plain data so vLLM can serialize it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorMetadata,
        KVConnectorWorkerMetadata,
    )
except ImportError:  # the worker's data path runs without vLLM (GPU checks): plain data then
    KVConnectorMetadata = KVConnectorWorkerMetadata = object


@dataclass
class ChunkLoad:
    name: str               # key name of the stored chunk
    num_blocks: int         # blocks held by the stored payload
    skip_blocks: int        # leading payload blocks already present locally (not written)
    block_ids: list[int]    # destination blocks of payload blocks skip_blocks, skip_blocks + 1, ...
                            # (fewer than num_blocks - skip_blocks when only a head is needed)


@dataclass
class RequestLoad:
    req_id: str
    chunks: list[ChunkLoad]
    is_async: bool
    block_size: int
    remote: bool = False    # a remote prefill's load (counted apart: pd_load_errors)

    @property
    def block_ids(self) -> list[int]:
        return [b for chunk in self.chunks for b in chunk.block_ids]


@dataclass
class ChunkSave:
    name: str
    block_ids: list[int]    # source blocks, in token order
    req_id: Optional[str] = None   # set for a remote decode's chunk: stored before the step
                                   # ends, reported through finished_sending


@dataclass
class StrataCacheConnectorMetadata(KVConnectorMetadata):
    loads: list[RequestLoad] = field(default_factory=list)
    saves: list[ChunkSave] = field(default_factory=list)
    preempted_req_ids: set[str] = field(default_factory=set)
    sending_req_ids: set[str] = field(default_factory=set)   # finished remote decodes whose
                                                             # blocks wait for finished_sending

    def is_empty(self) -> bool:
        return not (self.loads or self.saves or self.preempted_req_ids or self.sending_req_ids)


@dataclass
class StrataCacheWorkerMetadata(KVConnectorWorkerMetadata):
    """Chunk names the workers stored, and names found missing or corrupt at load time."""

    stored: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "KVConnectorWorkerMetadata":
        assert isinstance(other, StrataCacheWorkerMetadata)
        # With TP, every rank stores its own shard under the same name: report once.
        stored = list(dict.fromkeys(self.stored + other.stored))
        lost = list(dict.fromkeys(self.lost + other.lost))
        return StrataCacheWorkerMetadata(stored=stored, lost=lost)
