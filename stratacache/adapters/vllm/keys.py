"""KV chunk keys: which bytes a stored chunk holds, and whether two engines may share them.

A chunk is ``chunk_size`` tokens (a multiple of the KV block size). Its key
name is vLLM's chained block hash of the chunk's last block: the hash already
covers every earlier token, LoRA, multimodal inputs and ``cache_salt``, so a
chunk key identifies the whole prefix up to the chunk's end.

The namespace carries everything that makes page bytes incompatible: the
weights (a fingerprint of their bytes, or the operator's ``connector.model_id``),
the architecture config, compute dtype and quantization, KV dtype, the
attention backend's page layout, head geometry, block size and TP rank/size.
Two engines whose pages differ in any of these can never exchange bytes; two
hosts with byte-identical weights and settings always compute the same one.

Key names are stable across restarts when vLLM's block hash is (sha256 with
its fixed default seed); ``hash_stability_problem`` says when it is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from stratacache.core.keys import ArtifactKey

KIND = "kv"
_NON_REPRODUCIBLE_ALGOS = ("xxhash", "xxhash_cbor")
# "vllm2-": namespaces keyed by weight content; the older "vllm-" ones hashed paths and mtimes.
NAMESPACE_PREFIX = "vllm2-"
WEIGHTS_TAG_CHARS = 12
DIGEST_CHARS = 16
# Separates a partial chunk's block hash from its block count (never a hex digit).
PARTIAL_MARK = "-p"
_NAMESPACE_RE = re.compile(rf"{NAMESPACE_PREFIX}(?P<model>[A-Za-z0-9_.-]+)-"
                           rf"(?P<weights>[0-9a-f]{{{WEIGHTS_TAG_CHARS}}})-"
                           rf"(?P<digest>[0-9a-f]{{{DIGEST_CHARS}}})-tp(?P<rank>\d+)of(?P<size>\d+)")
# Keys of a serialized HF config that name where or by what it was loaded, not the model.
_CONFIG_PROVENANCE_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")


@dataclass(frozen=True)
class KVIdentity:
    """Everything that must match for two engines to share KV pages.

    No field depends on a path, an mtime, an inode or a host name, so every
    host that loads the same weights with the same settings computes the same
    namespace.
    """

    model_name: str         # connector.model_id, else the architecture (display only)
    weights: str            # "sha256:<hex>" of the weight bytes, or "id:<connector.model_id>"
    model_digest: str       # architecture config, compute dtype, quantization
    kv_dtype: str           # torch dtype of the pages and vLLM's cache_dtype
    layout: str             # attention backend page layout (e.g. cpu_attn/amx)
    block_size: int
    num_kv_heads: int
    head_size: int
    tp_size: int

    @property
    def weights_tag(self) -> str:
        """Short digest of ``weights``: the fingerprint prefix shown in namespaces."""
        return hashlib.sha256(self.weights.encode()).hexdigest()[:WEIGHTS_TAG_CHARS]

    def namespace(self, tp_rank: int) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model_name)[:48]
        return (f"{NAMESPACE_PREFIX}{safe or 'model'}-{self.weights_tag}-"
                f"{digest[:DIGEST_CHARS]}-tp{tp_rank}of{self.tp_size}")


def parse_namespace(namespace: str) -> Optional[dict]:
    """``{model, weights_tag, digest, tp_rank, tp_size}`` of a KV namespace of this scheme.

    None for anything else, e.g. the namespaces of the scheme before content
    fingerprints (``vllm-<dir name>-<digest>-tp..``), whose chunks are never
    matched again.
    """
    m = _NAMESPACE_RE.fullmatch(namespace)
    if m is None:
        return None
    return {"model": m["model"], "weights_tag": m["weights"], "digest": m["digest"],
            "tp_rank": int(m["rank"]), "tp_size": int(m["size"])}


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

    def partial_name(self, block_hashes: Sequence[bytes], end_token: int) -> str:
        """Key name of the partial chunk ending at ``end_token`` (block aligned, not a chunk
        boundary): the block hash there, which covers every earlier token, plus the number of
        blocks the payload holds (from the chunk boundary before it). The suffix keeps a
        partial chunk's key apart from every full chunk's (a bare hash), whatever the
        positions, so a full-chunk lookup never meets a partial payload or the reverse."""
        n_blocks = (end_token % self.chunk_size) // self.block_size
        if n_blocks == 0:
            raise ValueError(f"token {end_token} is a chunk boundary, not the end of a partial "
                             "chunk")
        return f"{self.name_at(block_hashes, end_token)}{PARTIAL_MARK}{n_blocks}"

    def range_name(self, block_hashes: Sequence[bytes], end_token: int) -> str:
        """Name of the stored range ending at ``end_token``: a full chunk at a chunk boundary,
        else the partial chunk that starts at the boundary before it."""
        if end_token % self.chunk_size == 0:
            return self.name_at(block_hashes, end_token)
        return self.partial_name(block_hashes, end_token)

    def prompt_ranges(self, block_hashes: Sequence[bytes], num_prompt_tokens: int) -> list[int]:
        """Ends (tokens) of every range a prompt is stored as for a remote decode: each full
        chunk, then the block-aligned partial chunk up to the last whole block before the
        prompt's last token (the token the decode side computes itself)."""
        savable = min(num_prompt_tokens, self.hashed_tokens(block_hashes))
        n_full = savable // self.chunk_size
        ends = [(i + 1) * self.chunk_size for i in range(n_full)]
        tail = self.partial_end(min(num_prompt_tokens - 1, savable))
        if tail > n_full * self.chunk_size:
            ends.append(tail)
        return ends


def block_hash_hex(name: str) -> str:
    """The vLLM block hash (hex) a chunk key name ends at (partial names carry a suffix)."""
    return name.split(PARTIAL_MARK, 1)[0]


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


def model_digest(hf_config: dict, dtype: str, quantization: Optional[str]) -> str:
    """Architecture config (without where it was loaded from), compute dtype, quantization."""
    config = {k: v for k, v in hf_config.items() if k not in _CONFIG_PROVENANCE_KEYS}
    blob = json.dumps({"config": config, "dtype": dtype, "quantization": quantization},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _hf_config_dict(hf_config) -> dict:
    try:
        return json.loads(hf_config.to_json_string(use_diff=False))
    except Exception:  # a config object without the HF serializer
        return {"repr": repr(hf_config)}


def model_weights_identity(model_config, load_config=None, model_id: Optional[str] = None) -> str:
    """``id:<model_id>`` when the operator names the weights, else their content fingerprint."""
    if model_id:
        return f"id:{model_id}"
    from stratacache.adapters.vllm.model_identity import weights_fingerprint

    return weights_fingerprint(str(model_config.model), model_config.revision,
                               download_dir=getattr(load_config, "download_dir", None))


def identity_from_vllm(vllm_config, kv_cache_config, model_id: Optional[str] = None) -> KVIdentity:
    """Derive the KV identity from vLLM's config; the same in the scheduler and the workers.

    Without ``model_id`` (connector.model_id) this hashes the weight files the
    first time on this host (see model_identity.py); later calls read the cache.
    """
    spec = single_attention_spec(kv_cache_config)
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    hf_config = _hf_config_dict(model_config.hf_config)
    architectures = hf_config.get("architectures") or [hf_config.get("model_type") or "model"]
    return KVIdentity(
        model_name=str(model_id or architectures[0]),
        weights=model_weights_identity(model_config, getattr(vllm_config, "load_config", None),
                                       model_id),
        model_digest=model_digest(hf_config, str(model_config.dtype),
                                  getattr(model_config, "quantization", None)),
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
