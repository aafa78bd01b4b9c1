"""StrataCacheConnectorV1: vLLM 0.32's KV connector over the StrataCache storage plane.

Load it with::

    --kv-transfer-config '{"kv_connector":"StrataCacheConnectorV1",
      "kv_connector_module_path":"stratacache.adapters.vllm.connector_v1",
      "kv_role":"kv_both","kv_load_failure_policy":"recompute"}'

or ``LLM(kv_transfer_config=stratacache.adapters.vllm.kv_transfer_config())``.

vLLM makes one instance per role, in different processes. This class only
routes vLLM's calls: ``SchedulerSide`` (scheduler.py) plans, ``WorkerSide``
(worker.py) moves bytes. It is a best-effort cache: a chunk that cannot be
loaded is recomputed by vLLM.

Roles (``kv_role``): ``kv_both`` loads and stores; ``kv_producer`` only stores;
``kv_consumer`` only loads. For disaggregated prefill a producer's request with
``do_remote_decode`` stores every range of its prompt, keeps its blocks until the
stores are durable (``request_finished`` -> ``delay_free``, ``get_finished`` ->
``finished_sending``) and answers with the ``kv_transfer_params`` a consumer's
``do_remote_prefill`` request loads with (docs/vllm.md, "Roles and disaggregated
prefill").
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any, Iterable, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from stratacache.adapters.vllm.keys import (
    ChunkGeometry,
    block_hash_hex,
    hash_stability_problem,
    identity_from_vllm,
)
from stratacache.adapters.vllm.metadata import StrataCacheConnectorMetadata
from stratacache.config import load_config
from stratacache.adapters.vllm.scheduler import SchedulerSide
from stratacache.adapters.vllm.settings import settings_from_extra_config
from stratacache.adapters.vllm.stats import (
    PeriodicLogger,
    StatsCounter,
    StrataCacheConnectorStats,
    StrataCachePromMetrics,
)
from stratacache.adapters.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.stratacache")

# Tiers another process can see: the scheduler looks only there.
CROSS_PROCESS_TIERS = ("shared", "disk", "redis", "mooncake")
MEDIUM = "stratacache"


def lookup_config(settings):
    """The scheduler's config: the user's, with the shared region never registered with CUDA.

    The scheduler process never touches KV bytes, so it must not touch CUDA either:
    registering would create a CUDA context on GPU 0 and page-lock (and so commit) the
    whole region at start-up, defeating the lazy prefault."""
    overrides = copy.deepcopy(settings.overrides)
    overrides.setdefault("tiers", {}).setdefault("shared", {})["register_cuda"] = False
    return load_config(settings.config_path, overrides)


class StrataCacheConnectorV1(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        from stratacache.engine import StorageEngine

        settings = settings_from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        cfg = settings.load()
        conn = cfg.connector
        if conn.debug:
            logger.setLevel(logging.DEBUG)
        self._model_id = conn.model_id
        identity = identity_from_vllm(vllm_config, kv_cache_config, model_id=self._model_id)
        self._geometry = ChunkGeometry(
            chunk_size=int(conn.chunk_size), block_size=identity.block_size,
            hash_block_size=int(getattr(kv_cache_config, "hash_block_size", None)
                                or identity.block_size))
        self._stats = StatsCounter()
        self._load_async = conn.load_mode == "async"
        self._scheduler: Optional[SchedulerSide] = None
        self._worker: Optional[WorkerSide] = None

        if role == KVConnectorRole.SCHEDULER:
            for line in settings.deprecations:
                logger.warning("StrataCache: %s", line)
            problem = hash_stability_problem(vllm_config.cache_config.prefix_caching_hash_algo)
            if problem:
                logger.warning("StrataCache: %s", problem)
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                logger.warning("StrataCache: kv_load_failure_policy=%s fails a request whose "
                               "cached KV is lost or corrupt; use \"recompute\" (what "
                               "stratacache.adapters.vllm.kv_transfer_config() sets)",
                               self._kv_transfer_config.kv_load_failure_policy)
            logger.info("StrataCache: KV namespace %s (model %s, weights %s, TP size %d); hosts "
                        "share KV only where this matches", identity.namespace(0),
                        vllm_config.model_config.model, identity.weights[:24], identity.tp_size)
            tiers = [t for t in CROSS_PROCESS_TIERS if cfg.tiers[t].enabled]
            lookup_cfg = lookup_config(settings)
            engine = StorageEngine(lookup_cfg, tiers=tiers) if tiers else None
            if engine is None:
                logger.warning("StrataCache: no cross-process tier (shared, disk, redis, mooncake) is "
                               "enabled, so the scheduler can never find stored KV")
            events = vllm_config.kv_events_config
            self._scheduler = SchedulerSide(
                geometry=self._geometry,
                namespaces=[identity.namespace(rank) for rank in range(identity.tp_size)],
                lookup_engine=engine, save_partial_chunks=bool(conn.save_partial_chunks),
                save_decode_chunks=bool(conn.save_decode_chunks),
                load_async=self._load_async, stats=self._stats,
                role=str(self._kv_transfer_config.kv_role or "kv_both"),
                events_enabled=bool(events is not None and events.enable_kv_cache_events),
                make_events=self._make_events)
            self._log = PeriodicLogger(logger, "scheduler", bool(conn.log_stats),
                                       int(conn.log_every), float(conn.log_min_interval_s))
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._worker = WorkerSide(
                engine=StorageEngine(cfg),
                namespace=identity.namespace(get_tensor_model_parallel_rank()),
                load_mode=str(conn.load_mode), verify=bool(conn.verify_checksums),
                stats=self._stats)
            self._log = PeriodicLogger(logger, "worker", bool(conn.log_stats),
                                       int(conn.log_every), float(conn.log_min_interval_s))

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is only a future miss

    # ==================== worker side ====================
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        # The KV cache layout is resolved for certain by now (the tensors exist): derive the
        # namespace again so the worker's always names the layout the scheduler's names.
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        identity = identity_from_vllm(self._vllm_config, self._kv_cache_config,
                                      model_id=self._model_id)
        self._worker.register(kv_caches, num_blocks=int(self._kv_cache_config.num_blocks),
                              layout=identity.layout,
                              namespace=identity.namespace(get_tensor_model_parallel_rank()))

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._connector_metadata
        if isinstance(meta, StrataCacheConnectorMetadata) and meta.loads:
            self._worker.start_loads(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Only layer-wise loads are still running here: sync loads completed in
        # start_load_kv, async ones report through get_finished.
        self._worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # all layers are gathered at once in wait_for_save, after the forward

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        saves = meta.saves if isinstance(meta, StrataCacheConnectorMetadata) else []
        self._worker.end_step(saves)
        self._log.step(self._stats)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if isinstance(kv_connector_metadata, StrataCacheConnectorMetadata):
            self._worker.wait_loads(kv_connector_metadata.preempted_req_ids)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        if self._worker is None:
            return None, None
        meta = self._connector_metadata
        newly_sending = meta.sending_req_ids if isinstance(meta, StrataCacheConnectorMetadata) \
            else set()
        sent = self._worker.finished_sending(set(newly_sending))
        done = self._worker.finished_loads()
        return (sent or None), (done or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self):
        return self._worker.worker_meta() if self._worker is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None and self._scheduler.engine is not None:
            self._scheduler.engine.close()

    # ==================== scheduler side ====================
    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[Optional[int], bool]:
        return self._scheduler.matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self._scheduler.on_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = self._scheduler.build_meta(scheduler_output)
        self._log.step(self._stats)
        return meta

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        self._scheduler.on_worker_output(connector_output.kv_connector_worker_meta)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        return self._scheduler.request_finished(request)

    def take_events(self) -> Iterable:
        return self._scheduler.take_events() if self._scheduler is not None else ()

    def _make_events(self, info, lost_names: list[str]) -> list:
        from vllm.distributed.kv_events import BlockRemoved, BlockStored
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        if info is None:
            return [BlockRemoved(block_hashes=[maybe_convert_block_hash(
                bytes.fromhex(block_hash_hex(n))) for n in lost_names], medium=MEDIUM)]
        return [BlockStored(
            block_hashes=[maybe_convert_block_hash(h) for h in info.block_hashes],
            parent_block_hash=(maybe_convert_block_hash(info.parent)
                               if info.parent is not None else None),
            token_ids=info.token_ids, block_size=self._geometry.hash_block_size, lora_id=None,
            medium=MEDIUM, lora_name=info.extra.get("lora_name"))]

    # ==================== stats (both roles) ====================
    def get_kv_connector_stats(self) -> Optional[StrataCacheConnectorStats]:
        return self._stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[dict[str, Any]] = None):
        return StrataCacheConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return StrataCachePromMetrics(vllm_config, metric_types, labelnames,
                                      per_engine_labelvalues)
