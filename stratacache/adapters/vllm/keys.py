"""KV chunk keys: which bytes a stored chunk holds, and whether two engines may share them.

A chunk is ``chunk_size`` tokens (a multiple of the KV block size). Its key
name is vLLM's chained block hash of the chunk's last block: the hash already
covers every earlier token, LoRA, multimodal inputs and ``cache_salt``, so a
chunk key identifies the whole prefix up to the chunk's end.

The namespace carries everything that makes page bytes incompatible: model
identity (name, revision, architecture config, weight files), KV dtype, the
attention backend's page layout, head geometry, block size and TP rank/size.
Two engines whose pages differ in any of these can never exchange bytes.

Key names are stable across restarts when vLLM's block hash is (sha256 with
its fixed default seed); ``hash_stability_problem`` says when it is not.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from stratacache.core.keys import ArtifactKey

KIND = "kv"
_NON_REPRODUCIBLE_ALGOS = ("xxhash", "xxhash_cbor")


@dataclass(frozen=True)
class KVIdentity:
    """Everything that must match for two engines to share KV pages."""

    model: str
    revision: str
    model_digest: str       # architecture config + weight file stamps
    kv_dtype: str           # torch dtype of the pages and vLLM's cache_dtype
    layout: str             # attention backend page layout (e.g. cpu_attn/amx)
    block_size: int
    num_kv_heads: int
    head_size: int
    tp_size: int

    def namespace(self, tp_rank: int) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]
        name = Path(self.model.rstrip("/")).name or "model"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:48]
        return f"vllm-{safe}-{digest}-tp{tp_rank}of{self.tp_size}"


@dataclass(frozen=True)
class ChunkGeometry:
    """Token <-> block <-> chunk arithmetic shared by both roles."""

    chunk_size: int         # tokens per chunk
    block_size: int         # tokens per KV block
    hash_block_size: int    # tokens per entry of request.block_hashes

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.chunk_size % self.block_size:
            raise ValueError(f"connector.chunk_size: {self.chunk_size} must be a positive multiple "
                             f"of vLLM's KV block size {self.block_size}")
        if self.block_size % self.hash_block_size:
            raise ValueError(f"KV block size {self.block_size} is not a multiple of vLLM's hash "
                             f"block size {self.hash_block_size}")

    @property
    def chunk_blocks(self) -> int:
        return self.chunk_size // self.block_size

    def name_at(self, block_hashes: Sequence[bytes], end_token: int) -> str:
        """Key name of the stored range ending at token ``end_token`` (block aligned)."""
        return block_hashes[end_token // self.hash_block_size - 1].hex()

    def hashed_tokens(self, block_hashes: Sequence[bytes]) -> int:
        return len(block_hashes) * self.hash_block_size

    def full_chunk_names(self, block_hashes: Sequence[bytes], first: int, stop: int) -> list[str]:
        """Names of chunks ``first .. stop-1``."""
        c, hb = self.chunk_size, self.hash_block_size
        return [block_hashes[(i + 1) * c // hb - 1].hex() for i in range(first, stop)]

    def partial_end(self, limit_tokens: int) -> int:
        """End (tokens, block aligned) of the last partial chunk within ``limit_tokens``."""
        return limit_tokens // self.block_size * self.block_size


def artifact_key(namespace: str, name: str) -> ArtifactKey:
    return ArtifactKey(KIND, namespace, name)


def encoded_key_prefix(namespace: str) -> bytes:
    """``artifact_key(namespace, name).encode() == prefix + name.encode()``.

    The scheduler's lookups run on encoded keys built from this prefix, so a
    32-chunk lookup builds no ArtifactKey objects. The namespace is validated
    here; names are hex digests, valid by construction.
    """
    return artifact_key(namespace, "0").encode()[:-1]


def hash_stability_problem(hash_algo: str, env: Optional[dict] = None) -> Optional[str]:
    """Why chunk keys would not survive a restart, or None when they do."""
    env = os.environ if env is None else env
    if hash_algo in _NON_REPRODUCIBLE_ALGOS and env.get("PYTHONHASHSEED") is None:
        return (f"prefix_caching_hash_algo={hash_algo} seeds vLLM's block hashes randomly in every "
                "process, so StrataCache keys are not stable across restarts or shared between "
                "engines; set PYTHONHASHSEED to one value everywhere or use sha256")
    return None


def model_digest(model: str, hf_config_json: str) -> str:
    """Architecture config plus, for a local model directory, its weight files' size and mtime."""
    h = hashlib.sha256(hf_config_json.encode())
    root = Path(model).expanduser()
    if root.is_dir():
        for path in sorted(root.glob("*")):
            if path.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
                st = path.stat()
                h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def identity_from_vllm(vllm_config, kv_cache_config) -> KVIdentity:
    """Derive the KV identity from vLLM's config; the same in the scheduler and the workers."""
    spec = single_attention_spec(kv_cache_config)
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    try:
        hf_json = model_config.hf_config.to_json_string(use_diff=False)
    except Exception:  # a config object without the HF serializer
        hf_json = repr(model_config.hf_config)
    return KVIdentity(
        model=str(model_config.model),
        revision=str(model_config.revision or ""),
        model_digest=model_digest(str(model_config.model), hf_json),
        kv_dtype=f"{spec.dtype}/{cache_config.cache_dtype}",
        layout=page_layout(vllm_config, spec),
        block_size=int(spec.block_size),
        num_kv_heads=int(spec.num_kv_heads),
        head_size=int(spec.head_size),
        tp_size=int(vllm_config.parallel_config.tensor_parallel_size),
    )


def single_attention_spec(kv_cache_config):
    """The one full-attention KV spec this connector supports, or a clear error."""
    from vllm.v1.kv_cache_interface import AttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        raise ValueError("StrataCacheConnectorV1 supports models with exactly one attention KV "
                         f"cache group; this model has {kinds}")
    return groups[0].kv_cache_spec


def page_layout(vllm_config, spec) -> str:
    """Name of the byte layout of one page: the KV spec kind (full attention, MLA, ...), the
    resolved ``KVCacheLayout`` (the order of layers, blocks, heads, tokens and content in
    memory), the attention backend and, on CPU, the kernel ISA packing. Pages whose layout
    names differ never exchange bytes."""
    from vllm.platforms import current_platform

    device = str(current_platform.device_type)
    kv_layout = getattr(vllm_config.cache_config, "kv_cache_layout", None) or "unresolved"
    kind = type(spec).__name__
    if device == "cpu":
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        isa = _get_attn_isa(vllm_config.model_config.dtype, spec.block_size, spec.head_size,
                            vllm_config.cache_config.cache_dtype)
        return f"cpu_attn/{isa}/{kv_layout}/{kind}"
    backend = getattr(vllm_config.attention_config, "backend", None) if hasattr(
        vllm_config, "attention_config") else None
    return f"{device}/{backend or 'auto'}/{kv_layout}/{kind}"
