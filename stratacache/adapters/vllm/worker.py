"""Worker-side half of the connector: moving KV pages between paged memory and the tiers.

* Loads (``_Loader``): one routine leases each chunk straight in tier memory
  (``engine.pinned``), checks its size and verifies its checksum ON THE
  SOURCE, before any of its bytes reach vLLM's paged memory: vLLM has already
  entered the destination blocks in its prefix cache, so a chunk verified only
  while or after being copied would let another request read corrupt pages.
  The lease keeps the verified bytes fixed until the copy has completed on the
  device (a ``DeviceFence``); only then is it released. A chunk that is
  missing, evicted, the wrong size or corrupt stops the request's load there:
  its blocks and every later block of the load are reported through
  ``load_errors`` so vLLM recomputes them. The same routine serves the three
  load modes: inline (``sync``), on a background thread (``async``, reported
  through ``finished_loads`` only once its copies completed), or layer by
  layer alongside the forward pass (``layerwise``, see ``layerwise.py``).
* Saves (``_Saver``): the buffer pool plus one store thread. The step loop
  only copies the chunks out of paged memory with one ``ops.gather_blocks``
  call (checksums computed while copying) into a pooled buffer (page-locked
  when the KV cache is on CUDA, so the gather writes it directly through
  UVA); the store thread waits for that copy, reads all its checksums at
  once, and stores. The saver is the one place that skips chunks already
  stored. A step whose loads failed saves nothing: its forward may have read
  pages that vLLM now recomputes.

Page bytes are opaque: a chunk payload is ``uint8 [blocks, layers, page_bytes]``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from stratacache import ops  # imported here: loading the ops costs ~0.4 s, not for a first hit to pay
from stratacache.adapters.vllm.keys import artifact_key
from stratacache.adapters.vllm.layerwise import LayerwiseLoad, OpenChunk
from stratacache.adapters.vllm.metadata import (
    ChunkLoad,
    ChunkSave,
    RequestLoad,
    StrataCacheConnectorMetadata,
    StrataCacheWorkerMetadata,
)
from stratacache.adapters.vllm.stats import StatsCounter

logger = logging.getLogger("vllm.stratacache")


class PagedKV:
    """The registered paged KV memory, as the planes the ops copy.

    vLLM 0.32 hands one tensor per layer, ``[num_blocks, ...]`` in whichever
    ``KVCacheLayout`` the backends resolved (``LBHNC``, ``LBNHC``, ``LHBNC``,
    ``BLHNC``, ``BLNHC``, ``BHLNC``; MLA's single latent plane; any dtype,
    fp8 included), possibly split into kernel blocks. Each layer's page (one
    block of it) is cut into its fewest contiguous byte runs, found from the
    strides: one run when the page is block-contiguous (every layout but
    ``LHBNC`` and ``BHLNC``, whose pages are one run per KV head). Each run is a
    *plane*: a ``uint8 [num_blocks, plane_bytes]`` view with contiguous rows,
    which is what ``ops.gather_blocks`` / ``ops.scatter_blocks`` take as a layer.
    A chunk payload is ``[blocks, planes, plane_bytes]``; the layout is part of
    the KV namespace, so payloads only ever meet pages of the same layout.
    """

    # Runs per page beyond which copying run by run would be a pathological layout.
    MAX_RUNS_PER_PAGE = 1024

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: Optional[int] = None,
                 layout: str = "unknown layout") -> None:
        seen: dict[int, int] = {}
        self.planes: list[torch.Tensor] = []
        self.layer_planes: list[tuple[int, int]] = []   # distinct layer -> [first, end) plane
        self.index_of: dict[str, int] = {}   # every layer name -> index of its (shared) tensor
        self.names: list[str] = []
        for name, tensor in kv_caches.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"StrataCache: KV cache of layer {name} is a "
                                 f"{type(tensor).__name__}, expected one tensor per layer")
            ptr = tensor.data_ptr()
            if ptr in seen:
                # a layer sharing another layer's KV (cross-layer sharing)
                self.index_of[name] = seen[ptr]
                continue
            seen[ptr] = self.index_of[name] = len(self.layer_planes)
            self.names.append(name)
            planes = _page_planes(tensor, num_blocks, name, layout)
            self.layer_planes.append((len(self.planes), len(self.planes) + len(planes)))
            self.planes.extend(planes)
        if not self.planes:
            raise ValueError("StrataCache: register_kv_caches received no KV cache tensors")
        first = self.planes[0]
        self.num_blocks = first.shape[0]
        self.page_bytes = first.shape[1]     # bytes of one plane of one block
        for (start, _), name in zip(self.layer_planes, self.names):
            plane = self.planes[start]
            if plane.shape != first.shape:
                raise ValueError(
                    f"StrataCache: layer {name} ({layout}) has {plane.shape[0]} blocks of "
                    f"{plane.shape[1]}-byte runs, but layer {self.names[0]} has "
                    f"{first.shape[0]} of {first.shape[1]}")
        self.layers = self.planes             # what the ops take as their layers
        self.device = first.device

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers (one row of a chunk payload)."""
        return len(self.planes) * self.page_bytes


def _page_planes(tensor: torch.Tensor, num_blocks: Optional[int], name: str,
                 layout: str) -> list[torch.Tensor]:
    """The contiguous byte runs of every page of one layer, as ``[num_blocks, run]`` uint8 views
    (in the page's memory order), or a clear error naming the layer and the layout."""
    t = tensor
    if num_blocks and t.dim() >= 1 and t.shape[0] != num_blocks and t.shape[0] % num_blocks == 0:
        t = t.unflatten(0, (num_blocks, -1))   # kernel blocks: one manager block is several
    where = f"layer {name} KV tensor {tuple(tensor.shape)} strides {tuple(tensor.stride())} " \
            f"{tensor.dtype} ({layout})"
    if t.dim() < 2 or t.shape[0] < 1 or t[0].numel() == 0:
        raise ValueError(f"StrataCache: {where} has no [num_blocks, page...] shape")
    dims = sorted(((t.stride(d), t.shape[d]) for d in range(1, t.dim()) if t.shape[d] != 1),
                  reverse=True)
    if any(stride <= 0 for stride, _ in dims) or (t.shape[0] > 1 and t.stride(0) <= 0):
        raise ValueError(f"StrataCache: {where} has overlapping elements")
    run = 1                                   # elements of the innermost contiguous run
    while dims and dims[-1][0] == run:
        run *= dims.pop()[1]
    n_runs = math.prod(size for _, size in dims)
    if run == 1 and dims or n_runs > PagedKV.MAX_RUNS_PER_PAGE:
        raise ValueError(f"StrataCache: {where}: a page is {n_runs} runs of {run} elements; "
                         f"this layout cannot be copied by pages (at most "
                         f"{PagedKV.MAX_RUNS_PER_PAGE} contiguous runs per page)")
    offsets = [0]
    for stride, size in dims:                 # outer dims, outermost first
        offsets = [o + i * stride for o in offsets for i in range(size)]
    planes = []
    for offset in offsets:
        plane = torch.as_strided(t, (t.shape[0], run), (t.stride(0), 1),
                                 t.storage_offset() + offset)
        planes.append(plane.view(torch.uint8))
    return planes


class DeviceFence:
    """A point in the device's queued work, and a wait for it.

    On CUDA the ops run asynchronously on the current stream: ``record`` puts
    an event there and ``wait`` blocks the calling thread until the device has
    passed it. On the CPU the ops have completed when they return. Leases on
    tier memory and pooled save buffers are released only after ``wait``.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device if device.type == "cuda" else None

    def record(self):
        if self._device is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        return event

    def wait(self, mark) -> None:
        if mark is not None:
            mark.synchronize()


class _BufferPool:
    """Reusable gather buffers, bounded in total bytes (a full pool drops saves).

    Page-locked when the KV cache is on CUDA, so a gather writes the host
    buffer directly through UVA instead of staging through device memory."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._free: list[torch.Tensor] = []
        self._used = 0
        self._lock = threading.Lock()
        self.pinned = False

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
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)


@dataclass
class _StoreJob:
    names: list[str]
    payloads: list[torch.Tensor]   # views of buf, one per chunk
    checksums: torch.Tensor        # int64 per chunk (host tensor, valid after `copied`)
    copied: object                 # DeviceFence mark of the gather
    buf: torch.Tensor
    req_ids: list[Optional[str]]   # per chunk: the remote decode it belongs to, if any
    done: threading.Event          # set once every chunk is stored or has failed


class _Saver:
    """The buffer pool plus the store thread: chunks leave paged memory in the step, reach
    the tiers in the background. The one place that skips chunks already stored."""

    def __init__(self, engine, key_of: Callable[[str], object], stats: StatsCounter,
                 limit_bytes: int) -> None:
        self.engine = engine
        self._key_of = key_of
        self.stats = stats
        self._pool = _BufferPool(limit_bytes)
        self._kv: Optional[PagedKV] = None
        self._fence = DeviceFence(torch.device("cpu"))
        self._queue: "queue.Queue[Optional[_StoreJob]]" = queue.Queue()
        self._lock = threading.Lock()
        self._stored_names: list[str] = []
        self._thread = threading.Thread(target=self._store_loop, name="stratacache-store",
                                        daemon=True)
        self._thread.start()

    def bind(self, kv: PagedKV, fence: DeviceFence) -> None:
        self._kv = kv
        self._fence = fence
        self._pool.pinned = kv.device.type == "cuda"

    def count_dropped(self, saves: list[ChunkSave], why: str) -> None:
        """Count chunks that will not be stored; a remote decode's are logged by name."""
        self.stats.add(save_dropped=len(saves))
        remote = [s for s in saves if s.req_id is not None]
        if remote:
            self.stats.add(pd_save_failed=len(remote))
            logger.warning("StrataCache: %d chunks of remote decodes %s not stored (%s); the "
                           "decode side computes them", len(remote),
                           sorted({s.req_id for s in remote}), why)

    def save(self, saves: list[ChunkSave]) -> dict[str, list[threading.Event]]:
        """Copy the chunks not stored yet out of paged memory now; store them in the background.
        A failed gather drops its chunks (counted), never raises into vLLM's step. Returns, per
        remote decode, the events of the store jobs holding its chunks."""
        kv = self._kv
        waits: dict[str, list[threading.Event]] = {}
        try:
            present = self.engine.contains_many([self._key_of(s.name) for s in saves])
        except Exception:
            logger.exception("StrataCache: looking up %d chunks to save failed", len(saves))
            self.count_dropped(saves, "the lookup failed")
            return waits
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
                self.count_dropped(group, "the save buffers are full")
                continue
            t0 = time.perf_counter()
            try:
                out = buf[:nbytes].view(len(group) * n_blocks, len(kv.layers), kv.page_bytes)
                ids = torch.tensor([b for s in group for b in s.block_ids], dtype=torch.int64)
                sums = ops.gather_blocks(kv.layers, ids, out, chunk_blocks=n_blocks)
                # All of the save's checksums come back in one transfer, read by the store thread.
                sums = sums.to("cpu", non_blocking=True) if sums.is_cuda else sums
                copied = self._fence.record()
            except Exception:
                logger.exception("StrataCache: gathering %d chunks to save failed", len(group))
                self.count_dropped(group, "the gather failed")
                self._pool.give(buf)
                continue
            self.stats.add(save_gather_seconds=time.perf_counter() - t0)
            payloads = [out[i * n_blocks:(i + 1) * n_blocks] for i in range(len(group))]
            job = _StoreJob([s.name for s in group], payloads, sums, copied, buf,
                            [s.req_id for s in group], threading.Event())
            for req_id in dict.fromkeys(s.req_id for s in group if s.req_id is not None):
                waits.setdefault(req_id, []).append(job.done)
            self._queue.put(job)
        return waits

    def _store_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            try:
                self._store(job)
            finally:
                self._pool.give(job.buf)
                job.done.set()
                self._queue.task_done()

    def _store(self, job: _StoreJob) -> None:
        t0 = time.perf_counter()
        stored = nbytes = 0
        names = []
        try:
            self._fence.wait(job.copied)
            checksums = job.checksums.tolist()
        except Exception:
            logger.exception("StrataCache: the gather of %d chunks failed", len(job.names))
            self._count_failed(job.names, job.req_ids)
            return
        failed: list[tuple[str, Optional[str]]] = []
        for name, payload, checksum, req_id in zip(job.names, job.payloads, checksums,
                                                   job.req_ids):
            try:
                ok = self.engine.store(self._key_of(name), payload, checksum=checksum)
            except Exception:
                logger.exception("StrataCache: storing chunk %s failed", name)
                ok = False
            if ok:
                stored += 1
                nbytes += payload.numel()
                names.append(name)
            else:
                failed.append((name, req_id))
        self.stats.add(save_chunks=stored, save_bytes=nbytes,
                       store_seconds=time.perf_counter() - t0)
        self._count_failed([n for n, _ in failed], [r for _, r in failed])
        with self._lock:
            self._stored_names.extend(names)

    def _count_failed(self, names: list[str], req_ids: list[Optional[str]]) -> None:
        """Count chunks a tier refused (or whose gather failed on the device)."""
        self.count_dropped([ChunkSave(name=n, block_ids=[], req_id=r)
                            for n, r in zip(names, req_ids)], "a tier refused them or failed")

    def take_stored_names(self) -> list[str]:
        with self._lock:
            names, self._stored_names = self._stored_names, []
        return names

    def queued(self) -> int:
        return self._queue.qsize()

    def unreported(self) -> int:
        with self._lock:
            return len(self._stored_names)

    def drain(self) -> None:
        """Wait until every gathered chunk has been handed to the tiers."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class _Loader:
    """Leases, verifies on the source, copies and reports: the one load routine of every mode."""

    def __init__(self, engine, key_of: Callable[[str], object], verify: bool,
                 stats: StatsCounter) -> None:
        self.engine = engine
        self._key_of = key_of
        self.verify = verify
        self.stats = stats
        self.kv: Optional[PagedKV] = None
        self.fence = DeviceFence(torch.device("cpu"))
        self._lock = threading.Lock()
        self._lost_names: list[str] = []

    def open_request(self, load: RequestLoad, leases: ExitStack) -> tuple[list[OpenChunk], set[int]]:
        """Lease and verify the chunks of one request, in order, until the first bad one.
        Returns the verified chunks (their leases held by ``leases``) and the block ids vLLM
        must recompute (the bad chunk's and every later one's)."""
        t0 = time.perf_counter()
        try:
            return self._open_chunks(load, leases)
        finally:
            self.stats.add(load_verify_seconds=time.perf_counter() - t0)

    def _open_chunks(self, load: RequestLoad, leases: ExitStack) -> tuple[list[OpenChunk], set[int]]:
        opened: list[OpenChunk] = []
        for index, chunk in enumerate(load.chunks):
            src = None
            try:
                src = self._lease_verified(chunk, leases)
            except Exception:  # a tier fault is a miss, never a crash of the step
                logger.exception("StrataCache: leasing chunk %s failed", chunk.name)
            if src is None:
                failed = {b for c in load.chunks[index:] for b in c.block_ids}
                self.chunk_lost(load.req_id, chunk.name, failed, "missing, wrong-sized or corrupt")
                return opened, failed
            opened.append(OpenChunk(req_id=load.req_id, name=chunk.name, src=src,
                                    block_ids=torch.tensor(chunk.block_ids, dtype=torch.int64)))
        return opened, set()

    def _lease_verified(self, chunk: ChunkLoad, leases: ExitStack) -> Optional[torch.Tensor]:
        """The payload blocks to write (``[n, L, P]`` in leased tier memory), or None when the
        chunk is missing, the wrong size or fails its checksum (then it is deleted)."""
        kv = self.kv
        key = self._key_of(chunk.name)
        expected_size = chunk.num_blocks * kv.block_bytes
        art = leases.enter_context(self.engine.pinned(key, verify=False))
        if art is None:
            return None
        if art.meta.size != expected_size:
            logger.warning("StrataCache: chunk %s holds %d bytes, expected %d; deleting it",
                           chunk.name, art.meta.size, expected_size)
            self.engine.delete(key)
            return None
        payload = art.data[:expected_size]
        if self.verify and ops.checksum64(payload) != int(art.meta.checksum) & ops.MASK64:
            logger.warning("StrataCache: chunk %s failed its checksum; deleting it", chunk.name)
            self.engine.delete(key)
            return None
        src = payload.view(chunk.num_blocks, len(kv.layers), kv.page_bytes)
        return src[chunk.skip_blocks:chunk.skip_blocks + len(chunk.block_ids)]

    def chunk_lost(self, req_id: str, name: str, failed: set[int], why: str) -> None:
        self.stats.add(load_errors=1, load_error_blocks=len(failed))
        with self._lock:
            self._lost_names.append(name)
        logger.warning("StrataCache: chunk %s of request %s %s; vLLM recomputes %d blocks",
                       name, req_id, why, len(failed))

    def unreported(self) -> int:
        with self._lock:
            return len(self._lost_names)

    def take_lost_names(self) -> list[str]:
        with self._lock:
            names, self._lost_names = self._lost_names, []
        return names

    def load_request(self, load: RequestLoad) -> set[int]:
        """Load every chunk of one request (sync and async modes); returns the block ids vLLM
        must recompute. Returns only once the device has finished reading the leased bytes."""
        t0 = time.perf_counter()
        with ExitStack() as leases:
            opened, failed = self.open_request(load, leases)
            mark = None
            try:
                for chunk in opened:
                    ops.scatter_blocks(chunk.src, chunk.block_ids, self.kv.layers)
                mark = self.fence.record()
            except Exception:  # an op fault: the copied pages cannot be trusted either
                logger.exception("StrataCache: copying request %s's chunks failed", load.req_id)
                failed = set(load.block_ids)
                self.stats.add(load_errors=1, load_error_blocks=len(failed))
                opened = []
                mark = self.fence.record()   # copies queued before the fault still read them
            self.fence.wait(mark)   # the leases outlive every read of the tier's bytes
        moved = sum(c.src.shape[0] for c in opened) * self.kv.block_bytes
        self.stats.add(load_chunks=len(opened), load_bytes=moved,
                       load_seconds=time.perf_counter() - t0)
        if failed and load.remote:
            self.stats.add(pd_load_errors=1)
        return failed


LOAD_MODES = ("sync", "async", "layerwise")
# How long a step waits for a remote decode's chunks to reach the tiers before it returns
# (and the prefill response goes out) anyway; the decode side then recomputes what is missing.
DURABLE_WAIT_S = 60.0


class WorkerSide:
    def __init__(self, *, engine, namespace: str, load_mode: str, verify: bool,
                 stats: StatsCounter, max_inflight_save_bytes: int = 1 << 30) -> None:
        if load_mode not in LOAD_MODES:
            raise ValueError(f"connector.load_mode must be one of {LOAD_MODES}, got {load_mode!r}")
        self.engine = engine
        self.namespace = namespace
        self.load_mode = load_mode
        self.stats = stats
        self.kv: Optional[PagedKV] = None
        self._loads = _Loader(engine, self._key, verify, stats)
        self._saver = _Saver(engine, self._key, stats, max_inflight_save_bytes)
        self._async: Optional[ThreadPoolExecutor] = None   # made on the first async load
        self._inflight_loads: dict[str, Future] = {}
        self._sends: dict[str, list[threading.Event]] = {}   # remote decode -> its store jobs
        self._sending: set[str] = set()    # finished remote decodes not reported yet
        self._layerwise: Optional[LayerwiseLoad] = None   # this step's layer-wise loads
        self._lock = threading.Lock()
        self._load_errors: set[int] = set()
        self._step_failed = False      # a sync or layer-wise load of this step failed
        self._closed = False

    # ---- setup ---------------------------------------------------------
    def register(self, kv_caches: dict[str, torch.Tensor], num_blocks: Optional[int] = None,
                 layout: str = "unknown layout", namespace: Optional[str] = None) -> None:
        """Take vLLM's KV tensors (``num_blocks``: manager blocks, when vLLM split them into
        kernel blocks; ``namespace``: the KV namespace now that the layout is resolved)."""
        if namespace is not None:
            self.namespace = namespace
        self.kv = PagedKV(kv_caches, num_blocks, layout)
        fence = DeviceFence(self.kv.device)
        self._loads.kv = self.kv
        self._loads.fence = fence
        self._saver.bind(self.kv, fence)
        logger.info("StrataCache: registered %d KV layers (%s) as %d planes, %d blocks of %d "
                    "bytes per plane, namespace %s", len(self.kv.layer_planes), layout,
                    len(self.kv.planes), self.kv.num_blocks, self.kv.page_bytes, self.namespace)
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
            if load.is_async:
                if self._async is None:
                    self._async = ThreadPoolExecutor(1, thread_name_prefix="stratacache-load")
                self._inflight_loads[load.req_id] = self._async.submit(self._loads.load_request, load)
            else:
                inline.append(load)
        if inline and self.load_mode == "layerwise":
            self.finish_layerwise()   # a step that never reached finish (defensive)
            self._layerwise = self._start_layerwise(inline)
            return
        for load in inline:
            self._step_errors(self._loads.load_request(load))

    def _step_errors(self, failed: set[int]) -> None:
        """Failed blocks of this step's inline (sync or layer-wise) loads."""
        if failed:
            with self._lock:
                self._load_errors.update(failed)
                self._step_failed = True

    # ---- layer-wise loads ------------------------------------------------
    def _start_layerwise(self, loads: list[RequestLoad]) -> Optional[LayerwiseLoad]:
        """Start this step's layer-wise loads: chunks are leased and verified on their source,
        then copied layer by layer, on the loader's own thread."""
        def open_all(leases: ExitStack) -> tuple[list[OpenChunk], set[int]]:
            chunks: list[OpenChunk] = []
            failed: set[int] = set()
            for load in loads:
                opened, bad = self._loads.open_request(load, leases)
                chunks.extend(opened)
                failed |= bad
            return chunks, failed

        every_block = {b for load in loads for b in load.block_ids}
        try:
            step = LayerwiseLoad(self.kv.planes, self.kv.layer_planes, open_all, every_block)
            step.start()
        except Exception:  # e.g. no CUDA stream to be had: the step's loads become misses
            logger.exception("StrataCache: starting layer-wise loads failed")
            failed = every_block
            self.stats.add(load_errors=1, load_error_blocks=len(failed))
            self._step_errors(failed)
            return None
        return step

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
        failed, chunks, seconds = step.finish()
        if step.error is not None:
            logger.error("StrataCache: layer-wise load failed (%r); vLLM recomputes %d blocks",
                         step.error, len(failed))
            self.stats.add(load_errors=1, load_error_blocks=len(failed))
        moved = sum(c.src.shape[0] for c in chunks) * self.kv.block_bytes
        self.stats.add(load_chunks=len(chunks), load_bytes=moved, load_seconds=seconds)
        self._step_errors(failed)

    def finished_loads(self) -> set[str]:
        """Async loads whose copies completed since the last call; their errors join load_errors."""
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
    def end_step(self, saves: list[ChunkSave]) -> None:
        """vLLM's wait_for_save: finish the step's layer-wise loads, then save.

        A step whose sync or layer-wise loads failed saves nothing: its forward
        ran on pages vLLM is about to recompute (the failed blocks, and blocks of
        other requests computed on top of them), and vLLM re-schedules every
        affected request, whose chunks the scheduler then asks to save again."""
        self.finish_layerwise()
        with self._lock:
            failed, self._step_failed = self._step_failed, False
        if failed and saves:
            logger.warning("StrataCache: not saving %d chunks of a step with failed loads",
                           len(saves))
            self._saver.count_dropped(saves, "their step's loads failed")
            return
        self._wait_durable(self.save(saves))

    def save(self, saves: list[ChunkSave]) -> dict[str, list[threading.Event]]:
        """Copy the chunks out of paged memory now; store them in the background. Returns the
        store jobs of each remote decode among them (also kept for ``finished_sending``)."""
        if self.kv is None or not saves or self._closed:
            return {}
        waits = self._saver.save(saves)
        for req_id, events in waits.items():
            self._sends.setdefault(req_id, []).extend(events)
        return waits

    def _wait_durable(self, waits: dict[str, list[threading.Event]]) -> None:
        """Return once the remote decodes' chunks are in the tiers (or failed): the step's
        output, and so the prefill's response, must not reach the decode side before its KV."""
        deadline = time.monotonic() + DURABLE_WAIT_S
        for req_id, events in waits.items():
            for event in events:
                if not event.wait(max(0.0, deadline - time.monotonic())):
                    logger.warning("StrataCache: remote decode %s's chunks are not stored after "
                                   "%.0f s; its response goes out first", req_id, DURABLE_WAIT_S)
                    return

    def finished_sending(self, finished: set[str]) -> set[str]:
        """Remote decodes (``finished``: newly reported by the scheduler) whose stores have all
        completed or failed: vLLM may free their blocks now."""
        self._sending |= finished
        done = {r for r in self._sending if all(e.is_set() for e in self._sends.get(r, ()))}
        self._sending -= done
        for req_id in done:
            self._sends.pop(req_id, None)
        return done

    def drain_saves(self) -> None:
        """Wait until every gathered chunk has been handed to the tiers."""
        self._saver.drain()

    # ---- reporting and shutdown ------------------------------------------
    def state_sizes(self) -> dict[str, int]:
        """Sizes of the per-request tables (tests assert they drain)."""
        with self._lock:
            return {"inflight_loads": len(self._inflight_loads),
                    "queued_stores": self._saver.queued(),
                    "sends": len(self._sends), "sending": len(self._sending),
                    "load_errors": len(self._load_errors),
                    "unreported_names": self._saver.unreported() + self._loads.unreported()}

    def worker_meta(self) -> Optional[StrataCacheWorkerMetadata]:
        stored, lost = self._saver.take_stored_names(), self._loads.take_lost_names()
        if not stored and not lost:
            return None
        return StrataCacheWorkerMetadata(stored=stored, lost=lost)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.finish_layerwise()
        for fut in list(self._inflight_loads.values()):
            fut.exception()
        if self._async is not None:
            self._async.shutdown(wait=True)
        self._saver.close()
        try:
            self.engine.flush()
        finally:
            self.engine.close()
