"""Worker-side half of the connector: moving KV pages between paged memory and the tiers.

* Loads: each chunk is read under a lease straight from tier memory
  (``engine.pinned``) and written into every layer's pages with one
  multi-layer ``ops.scatter_blocks`` call that verifies the chunk's checksum
  while copying. A chunk that is missing, evicted, the wrong size or corrupt
  stops the request's load there: its blocks and every later block of the
  load are reported through ``load_errors`` so vLLM recomputes them.
  Loads run inline (``sync``), on a background thread (``async``, finishing
  through ``finished_loads``), or layer by layer alongside the forward pass
  (``layerwise``, see ``layerwise.py``).
* Saves: the step loop only copies the chunks out of paged memory with one
  ``ops.gather_blocks`` call (checksums computed while copying) into a pooled
  buffer; a background thread stores them, so the step never waits on a tier.

Page bytes are opaque: a chunk payload is ``uint8 [blocks, layers, page_bytes]``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Optional

import torch

from stratacache import ops  # imported here: loading the ops costs ~0.4 s, not for a first hit to pay
from stratacache.adapters.vllm.keys import artifact_key
from stratacache.adapters.vllm.layerwise import LayerwiseChunk, LayerwiseLoad
from stratacache.adapters.vllm.metadata import (
    ChunkSave,
    RequestLoad,
    StrataCacheConnectorMetadata,
    StrataCacheWorkerMetadata,
)
from stratacache.adapters.vllm.stats import StatsCounter

logger = logging.getLogger("vllm.stratacache")


class PagedKV:
    """The registered paged KV memory: one tensor per distinct layer, same page size."""

    def __init__(self, kv_caches: dict[str, torch.Tensor]) -> None:
        seen: dict[int, str] = {}
        layers: list[torch.Tensor] = []
        self.index_of: dict[str, int] = {}   # every layer name -> index of its (shared) tensor
        for name, tensor in kv_caches.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"StrataCache: KV cache of layer {name} is a "
                                 f"{type(tensor).__name__}, expected one tensor per layer")
            ptr = tensor.data_ptr()
            if ptr in seen:
                # a layer sharing another layer's KV (cross-layer sharing)
                self.index_of[name] = self.index_of[seen[ptr]]
                continue
            seen[ptr] = name
            self.index_of[name] = len(layers)
            layers.append(tensor)
        if not layers:
            raise ValueError("StrataCache: register_kv_caches received no KV cache tensors")
        first = layers[0]
        self.num_blocks = first.shape[0]
        self.page_bytes = first[0].numel() * first.element_size()
        for name, tensor in zip(seen.values(), layers):
            page = tensor[0]
            if tensor.shape[0] != self.num_blocks or page.numel() * tensor.element_size() != \
                    self.page_bytes or not page.is_contiguous():
                raise ValueError(
                    f"StrataCache: layer {name} KV tensor {tuple(tensor.shape)} {tensor.dtype} does "
                    f"not have {self.num_blocks} contiguous pages of {self.page_bytes} bytes")
        self.layers = layers
        self.names = list(seen.values())
        self.device = first.device

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers (one row of a chunk payload)."""
        return len(self.layers) * self.page_bytes


class _BufferPool:
    """Reusable gather buffers, bounded in total bytes (a full pool drops saves)."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._free: list[torch.Tensor] = []
        self._used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Optional[torch.Tensor]:
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.numel() >= nbytes:
                    return self._free.pop(i)
            if self._used + nbytes > self._limit:
                # Make room by dropping idle buffers that are too small.
                while self._free and self._used + nbytes > self._limit:
                    self._used -= self._free.pop(0).numel()
                if self._used + nbytes > self._limit:
                    return None
            self._used += nbytes
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)


LOAD_MODES = ("sync", "async", "layerwise")


class WorkerSide:
    def __init__(self, *, engine, namespace: str, load_mode: str, verify: bool,
                 stats: StatsCounter, max_inflight_save_bytes: int = 1 << 30) -> None:
        if load_mode not in LOAD_MODES:
            raise ValueError(f"connector.load_mode must be one of {LOAD_MODES}, got {load_mode!r}")
        self.engine = engine
        self.namespace = namespace
        self.load_mode = load_mode
        self.verify = verify
        self.stats = stats
        self.kv: Optional[PagedKV] = None
        self._pool = _BufferPool(max_inflight_save_bytes)
        self._store_queue: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._store_thread = threading.Thread(target=self._store_loop, name="stratacache-store",
                                              daemon=True)
        self._store_thread.start()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="stratacache-load") \
            if load_mode == "async" else None
        self._inflight_loads: dict[str, Future] = {}
        self._layerwise: Optional[LayerwiseLoad] = None   # this step's layer-wise loads
        self._lock = threading.Lock()
        self._load_errors: set[int] = set()
        self._stored_names: list[str] = []
        self._lost_names: list[str] = []
        self._closed = False

    # ---- setup ---------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv = PagedKV(kv_caches)
        logger.info("StrataCache: registered %d KV layers, %d blocks of %d bytes per layer page, "
                    "namespace %s", len(self.kv.layers), self.kv.num_blocks, self.kv.page_bytes,
                    self.namespace)
        # Hits read persisted chunks out of the shared region; map their pages now,
        # off the hit path, while vLLM finishes starting up.
        self.engine.start_prefault()

    def _key(self, name: str):
        return artifact_key(self.namespace, name)

    # ---- loads ---------------------------------------------------------
    def start_loads(self, meta: StrataCacheConnectorMetadata) -> None:
        if self.kv is None:
            return
        inline = []
        for load in meta.loads:
            if load.is_async and self._loader is not None:
                self._inflight_loads[load.req_id] = self._loader.submit(self._load_request, load)
            else:
                inline.append(load)
        if inline and self.load_mode == "layerwise":
            self.finish_layerwise()   # a step that never reached finish (defensive)
            self._layerwise = self._start_layerwise(inline)
            return
        for load in inline:
            failed = self._load_request(load)
            if failed:
                with self._lock:
                    self._load_errors.update(failed)

    def _chunk_lost(self, req_id: str, name: str, failed: set[int], why: str) -> None:
        self.stats.add(load_errors=1, load_error_blocks=len(failed))
        with self._lock:
            self._lost_names.append(name)
        logger.warning("StrataCache: chunk %s of request %s %s; vLLM recomputes %d blocks",
                       name, req_id, why, len(failed))

    def _load_request(self, load: RequestLoad) -> set[int]:
        """Load every chunk of one request; returns the block ids vLLM must recompute."""
        t0 = time.perf_counter()
        moved = chunks_ok = 0
        for index, chunk in enumerate(load.chunks):
            ok = False
            try:
                ok = self._load_chunk(chunk)
            except Exception:  # a tier or op fault is a miss, never a crash of the step
                logger.exception("StrataCache: loading chunk %s failed", chunk.name)
            if not ok:
                failed = {b for c in load.chunks[index:] for b in c.block_ids}
                self._chunk_lost(load.req_id, chunk.name, failed, "missing or corrupt")
                break
            chunks_ok += 1
            moved += len(chunk.block_ids) * self.kv.block_bytes
        else:
            failed = set()
        self.stats.add(load_chunks=chunks_ok, load_bytes=moved,
                       load_seconds=time.perf_counter() - t0)
        return failed

    def _lease(self, chunk, leases: ExitStack) -> Optional[tuple[torch.Tensor, int]]:
        """Lease a stored chunk until ``leases`` closes: its payload as ``[blocks, L, P]`` and
        its stored checksum, or None when it is missing or the wrong size (then deleted)."""
        kv = self.kv
        key = self._key(chunk.name)
        expected_size = chunk.num_blocks * kv.block_bytes
        art = leases.enter_context(self.engine.pinned(key, verify=False))
        if art is None:
            return None
        if art.meta.size != expected_size:
            logger.warning("StrataCache: chunk %s holds %d bytes, expected %d", chunk.name,
                           art.meta.size, expected_size)
            self.engine.delete(key)
            return None
        src = art.data[:expected_size].view(chunk.num_blocks, len(kv.layers), kv.page_bytes)
        return src, art.meta.checksum

    def _partial_intact(self, chunk, src: torch.Tensor, checksum: int) -> bool:
        """Only part of the chunk is needed (its head is already in vLLM's own cache, or its
        tail is past what vLLM lets us load): verify the whole payload before writing part."""
        return (not self.verify) or _same_checksum(ops.checksum64(src), checksum)

    def _load_chunk(self, chunk) -> bool:
        kv = self.kv
        ids = torch.tensor(chunk.block_ids, dtype=torch.int64)
        with ExitStack() as leases:
            leased = self._lease(chunk, leases)
            if leased is None:
                return False
            src, checksum = leased
            if chunk.skip_blocks == 0 and len(chunk.block_ids) == chunk.num_blocks:
                # The scatter verifies the checksum while copying: no separate verification pass.
                expected = torch.tensor([_signed64(checksum)], dtype=torch.int64) \
                    if self.verify else None
                ok = ops.scatter_blocks(src, ids, kv.layers, chunk_blocks=chunk.num_blocks,
                                        expected=expected)
                good = bool(ok[0]) if self.verify else True
            else:
                good = self._partial_intact(chunk, src, checksum)
                if good:
                    ops.scatter_blocks(src[chunk.skip_blocks:chunk.skip_blocks + len(ids)], ids,
                                       kv.layers)
        if not good:
            self._drop_corrupt(chunk.name)
        return good

    def _drop_corrupt(self, name: str) -> None:
        logger.warning("StrataCache: chunk %s failed its checksum; deleting it", name)
        self.engine.delete(self._key(name))

    # ---- layer-wise loads ------------------------------------------------
    def _start_layerwise(self, loads: list[RequestLoad]) -> Optional[LayerwiseLoad]:
        """Lease every chunk of the step and start copying them layer by layer."""
        leases = ExitStack()
        chunks: list[LayerwiseChunk] = []
        for load in loads:
            for index, chunk in enumerate(load.chunks):
                failed = {b for c in load.chunks[index:] for b in c.block_ids}
                try:
                    leased = self._lease(chunk, leases)
                    partial = chunk.skip_blocks != 0 or len(chunk.block_ids) != chunk.num_blocks
                    if leased is not None and partial and \
                            not self._partial_intact(chunk, *leased):
                        self._drop_corrupt(chunk.name)
                        leased = None
                except Exception:  # a tier fault is a miss, never a crash of the step
                    logger.exception("StrataCache: leasing chunk %s failed", chunk.name)
                    leased = None
                if leased is None:
                    self._chunk_lost(load.req_id, chunk.name, failed, "missing or corrupt")
                    with self._lock:
                        self._load_errors.update(failed)
                    break
                src, checksum = leased
                first, n = chunk.skip_blocks, len(chunk.block_ids)
                chunks.append(LayerwiseChunk(
                    req_id=load.req_id, name=chunk.name, src=src[first:first + n],
                    block_ids=torch.tensor(chunk.block_ids, dtype=torch.int64),
                    checksum=checksum if self.verify and not partial else None,
                    fail_blocks=failed))
        if not chunks:
            leases.close()
            return None
        try:
            step = LayerwiseLoad(self.kv.layers, chunks, leases, on_bad_chunk=self._on_bad_layerwise)
            step.start()
        except Exception:  # e.g. no CUDA stream to be had: the step's loads become misses
            logger.exception("StrataCache: starting layer-wise loads failed")
            leases.close()
            failed = set().union(*(c.fail_blocks for c in chunks))
            self.stats.add(load_errors=1, load_error_blocks=len(failed))
            with self._lock:
                self._load_errors.update(failed)
            return None
        return step

    def _on_bad_layerwise(self, chunk: LayerwiseChunk) -> None:
        self._drop_corrupt(chunk.name)
        self._chunk_lost(chunk.req_id, chunk.name, chunk.fail_blocks, "failed its checksum")

    def wait_layer(self, layer_name: str) -> None:
        """vLLM's wait_for_layer_load: return once ``layer_name``'s pages may be read."""
        step = self._layerwise
        if step is not None:
            index = self.kv.index_of.get(layer_name)
            if index is not None:
                step.wait_layer(index)

    def finish_layerwise(self) -> None:
        """Complete this step's layer-wise loads (end of the forward): errors, stats, leases."""
        step, self._layerwise = self._layerwise, None
        if step is None:
            return
        failed, chunks_ok, seconds = step.finish()
        if step.error is not None:
            logger.error("StrataCache: layer-wise load failed (%r); vLLM recomputes %d blocks",
                         step.error, len(failed))
            self.stats.add(load_errors=1, load_error_blocks=len(failed))
        moved = sum(c.src.shape[0] for c in step.chunks
                    if int(c.block_ids[0]) not in failed) * self.kv.block_bytes
        self.stats.add(load_chunks=chunks_ok, load_bytes=moved, load_seconds=seconds)
        if failed:
            with self._lock:
                self._load_errors.update(failed)

    def finished_loads(self) -> set[str]:
        """Async loads that completed since the last call; their errors join load_errors."""
        done = {req_id for req_id, fut in self._inflight_loads.items() if fut.done()}
        for req_id in done:
            fut = self._inflight_loads.pop(req_id)
            failed = fut.result() if fut.exception() is None else set()
            if fut.exception() is not None:
                logger.error("StrataCache: async load of %s raised %r", req_id, fut.exception())
            with self._lock:
                self._load_errors.update(failed)
        return done

    def take_load_errors(self) -> set[int]:
        self.finish_layerwise()
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def wait_loads(self, req_ids) -> None:
        """Block until in-flight loads of ``req_ids`` are done (their blocks are being freed)."""
        for req_id in req_ids:
            fut = self._inflight_loads.get(req_id)
            if fut is not None:
                fut.exception()  # waits; the result is collected by finished_loads

    # ---- saves ---------------------------------------------------------
    def save(self, saves: list[ChunkSave]) -> None:
        """Copy the chunks out of paged memory now; store them in the background."""
        if self.kv is None or not saves or self._closed:
            return
        kv = self.kv
        present = self.engine.contains_many([self._key(s.name) for s in saves])
        todo = [s for s, have in zip(saves, present) if not have]
        if len(todo) < len(saves):
            self.stats.add(save_skipped=len(saves) - len(todo))
        # One gather per distinct chunk length (full chunks share one call).
        by_len: dict[int, list[ChunkSave]] = {}
        for s in todo:
            by_len.setdefault(len(s.block_ids), []).append(s)
        for n_blocks, group in by_len.items():
            nbytes = len(group) * n_blocks * kv.block_bytes
            buf = self._pool.take(nbytes)
            if buf is None:
                self.stats.add(save_dropped=len(group))
                continue
            t0 = time.perf_counter()
            out = buf[:nbytes].view(len(group) * n_blocks, len(kv.layers), kv.page_bytes)
            ids = torch.tensor([b for s in group for b in s.block_ids], dtype=torch.int64)
            checksums = ops.gather_blocks(kv.layers, ids, out, chunk_blocks=n_blocks)
            self.stats.add(save_gather_seconds=time.perf_counter() - t0)
            items = [(s.name, out[i * n_blocks:(i + 1) * n_blocks], int(checksums[i]))
                     for i, s in enumerate(group)]
            self._store_queue.put((items, buf))

    def _store_loop(self) -> None:
        while True:
            job = self._store_queue.get()
            if job is None:
                self._store_queue.task_done()
                return
            items, buf = job
            try:
                t0 = time.perf_counter()
                stored = dropped = nbytes = 0
                names = []
                for name, payload, checksum in items:
                    try:
                        ok = self.engine.store(self._key(name), payload, checksum=checksum)
                    except Exception:
                        logger.exception("StrataCache: storing chunk %s failed", name)
                        ok = False
                    if ok:
                        stored += 1
                        nbytes += payload.numel()
                        names.append(name)
                    else:
                        dropped += 1
                self.stats.add(save_chunks=stored, save_bytes=nbytes, save_dropped=dropped,
                               store_seconds=time.perf_counter() - t0)
                with self._lock:
                    self._stored_names.extend(names)
            finally:
                self._pool.give(buf)
                self._store_queue.task_done()

    def drain_saves(self) -> None:
        """Wait until every gathered chunk has been handed to the tiers."""
        self._store_queue.join()

    # ---- reporting and shutdown ------------------------------------------
    def state_sizes(self) -> dict[str, int]:
        """Sizes of the per-request tables (tests assert they drain)."""
        with self._lock:
            return {"inflight_loads": len(self._inflight_loads),
                    "queued_stores": self._store_queue.qsize(),
                    "load_errors": len(self._load_errors),
                    "unreported_names": len(self._stored_names) + len(self._lost_names)}

    def worker_meta(self) -> Optional[StrataCacheWorkerMetadata]:
        with self._lock:
            if not self._stored_names and not self._lost_names:
                return None
            meta = StrataCacheWorkerMetadata(stored=self._stored_names, lost=self._lost_names)
            self._stored_names, self._lost_names = [], []
        return meta

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.finish_layerwise()
        for fut in list(self._inflight_loads.values()):
            fut.exception()
        if self._loader is not None:
            self._loader.shutdown(wait=True)
        self._store_queue.put(None)
        self._store_thread.join()
        try:
            self.engine.flush()
        finally:
            self.engine.close()


def _signed64(value: int) -> int:
    """A 64-bit checksum as the int64 the ops' tensors hold."""
    value = int(value) & 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= (1 << 63) else value


def _same_checksum(a: int, b: int) -> bool:
    mask = 0xFFFFFFFFFFFFFFFF
    return (int(a) & mask) == (int(b) & mask)
