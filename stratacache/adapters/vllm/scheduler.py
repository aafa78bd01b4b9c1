"""Scheduler-side half of the connector: prefix lookups and the per-step load/save plan.

Runs in vLLM's scheduler process, which never touches KV bytes. Its
StorageEngine is restricted to cross-process tiers (shared region, disk,
Redis): that is where it sees what the workers stored. It decides

* how many prompt tokens a request can load (``matched_tokens``: a prefix
  lookup over chunk keys, no data movement, no side effects but a memo of the
  lookup's start that ``on_alloc`` consumes);
* which chunks each worker loads (block ids + key names) and which freshly
  computed chunks it saves: every full chunk (and the prompt's partial one)
  the step completes, chunks that generated tokens complete included
  (``save_decode_chunks``: a chat's next turn resends the answer, whose KV
  decode has computed). Whether one is stored already is the workers' check,
  made when they save. A chunk whose tokens vLLM recomputes (a failed load,
  a preemption) is asked for again: the save cursor never stays past
  ``num_computed_tokens``.

Roles: a ``kv_producer`` never looks up (so never loads), a ``kv_consumer``
never plans saves. Disaggregated prefill (vLLM's ``kv_transfer_params``):

* a request with ``do_remote_decode`` (producer or kv_both) saves every range
  of its prompt, the partial chunk included whatever ``save_partial_chunks``
  says; ``request_finished`` returns ``delay_free`` and the parameters the
  decode side needs (``_remote_params``), and tells the workers, in the next
  step's metadata, to report it in ``finished_sending`` once its stores are done;
* a request with ``do_remote_prefill`` (consumer or kv_both) whose parameters
  name this engine's namespace and this prompt's own chunk names loads every
  stored range asynchronously, once; anything missing is computed by vLLM and
  counted (``pd_missing_tokens``), parameters that do not check out are logged,
  counted (``pd_rejected_params``) and ignored.

Per-request state lives from admission to ``request_finished``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from stratacache.adapters.vllm.keys import ChunkGeometry, encoded_key_prefix
from stratacache.adapters.vllm.metadata import (
    ChunkLoad,
    ChunkSave,
    RequestLoad,
    StrataCacheConnectorMetadata,
    StrataCacheWorkerMetadata,
)
from stratacache.adapters.vllm.settings import KV_ROLES
from stratacache.adapters.vllm.stats import StatsCounter

logger = logging.getLogger("vllm.stratacache")

# Bounds on bookkeeping that outlives a step, so nothing grows without bound
# even if vLLM never reports back on an entry.
MAX_LOOKUP_MEMOS = 4096
MAX_PENDING_EVENTS = 8192
# The connector's entry in kv_transfer_params (contract item 2), and its format version.
PD_PARAMS_KEY = "stratacache"
PD_PARAMS_VERSION = 1


@dataclass
class _Tracked:
    """A request between admission and request_finished."""

    request: object               # vllm Request (scheduler-local object)
    remote_decode: bool = False   # a producer's prefill: store every range, free late
    saved_chunks: int = 0         # full chunks handed to workers to save
    partial_saved: bool = False


@dataclass
class _Lookup:
    """What ``matched_tokens`` found, for ``on_alloc`` (vLLM does not pass it there)."""

    start: int                    # num_computed_tokens at the lookup
    tail_in_full_chunk: bool      # the hit ends inside a stored full chunk (its head)
    remote: bool                  # a remote prefill whose parameters checked out
    found_end: int                # end of the stored prefix found


@dataclass
class _EventInfo:
    block_hashes: list
    parent: Optional[bytes]
    token_ids: list[int]
    extra: dict


class SchedulerSide:
    def __init__(self, *, geometry: ChunkGeometry, namespaces: list[str], lookup_engine,
                 save_partial_chunks: bool, load_async: bool, stats: StatsCounter,
                 save_decode_chunks: bool = True,
                 role: str = "kv_both",
                 events_enabled: bool = False,
                 make_events: Optional[Callable[[_EventInfo, list], Iterable]] = None) -> None:
        if role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {KV_ROLES}, got {role!r}")
        self.geometry = geometry
        self.can_load = role != "kv_producer"      # a producer never loads
        self.can_save = role != "kv_consumer"      # a consumer never stores
        self.namespaces = namespaces          # one per TP rank: a chunk is present if all have it
        self._key_prefixes = [encoded_key_prefix(ns) for ns in namespaces]
        self.engine = lookup_engine           # None: no cross-process tier, never a hit
        self.save_partial = save_partial_chunks
        self.save_decode = save_decode_chunks
        self.load_async = load_async
        self.stats = stats
        self.events_enabled = events_enabled and make_events is not None
        self._make_events = make_events
        self._tracked: dict[str, _Tracked] = {}
        self._lookup_start: dict[str, _Lookup] = {}
        self._remote_seen: set[str] = set()      # remote prefills already planned (or refused)
        self._sending: set[str] = set()          # finished remote decodes, for the next step
        self._pending_loads: dict[str, RequestLoad] = {}
        self._pending_events: dict[str, _EventInfo] = {}
        self._events: list = []

    # ---- lookup --------------------------------------------------------
    def _present(self, names: list[str]) -> int:
        """Leading names present for every TP rank."""
        if not names:
            return 0
        n = len(names)
        for prefix in self._key_prefixes:
            n = min(n, self.engine.prefix_lookup([prefix + name.encode() for name in names[:n]]))
            if n == 0:
                break
        return n

    def _loadable_end(self, request, start: int, partial: bool) -> tuple[int, bool]:
        """End (tokens) of the stored prefix beyond ``start`` (``start`` if none), and whether
        its last, partly loaded range is the head of a stored full chunk. ``partial``: also
        look for the prompt's partial chunk.

        vLLM must compute at least the prompt's last token, so a prompt whose
        stored chunks cover it entirely (a length that is a multiple of the
        chunk size) loads the head of its last full chunk up to the last whole
        block before that token, as vLLM's own prefix cache would.
        """
        g = self.geometry
        stored_limit = min(request.num_prompt_tokens, g.hashed_tokens(request.block_hashes))
        limit = min(request.num_tokens - 1, stored_limit)
        first, n_full = start // g.chunk_size, limit // g.chunk_size
        n_lookup = stored_limit // g.chunk_size   # n_full, or n_full + 1 when a chunk spans `limit`
        end = start
        if first < n_lookup:
            hits = self._present(g.full_chunk_names(request.block_hashes, first, n_lookup))
            end = max(start, (first + min(hits, n_full - first)) * g.chunk_size)
            if first + hits > n_full:
                tail = g.partial_end(limit)
                return (tail, True) if tail > end else (end, False)
            if first + hits < n_full:
                return end, False
        if partial:
            partial_end = g.partial_end(limit)
            if partial_end > max(end, n_full * g.chunk_size) and \
                    self._present([g.partial_name(request.block_hashes, partial_end)]):
                end = partial_end
        return end, False

    def matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        if self.engine is None or not self.can_load:
            return 0, False
        t0 = time.perf_counter()
        remote = self._remote_prefill(request)
        end, tail_in_full_chunk = self._loadable_end(request, num_computed_tokens,
                                                     partial=self.save_partial or remote)
        self.stats.add(lookups=1, lookup_seconds=time.perf_counter() - t0)
        matched = max(0, end - num_computed_tokens)
        # Memo of where the hit starts: on_alloc needs it and vLLM does not pass it there.
        if len(self._lookup_start) >= MAX_LOOKUP_MEMOS:
            self._lookup_start.pop(next(iter(self._lookup_start)))
        self._lookup_start[request.request_id] = _Lookup(num_computed_tokens, tail_in_full_chunk,
                                                         remote, end)
        return matched, bool(matched) and (self.load_async or remote)

    # ---- disaggregated prefill -------------------------------------------
    def _remote_prefill(self, request) -> bool:
        """Whether ``request`` is a decode whose prompt a producer stored (``do_remote_prefill``
        with parameters that check out), to load in full and asynchronously. Parameters that
        do not match this engine's own keys are logged and counted; the request then finds
        what a plain lookup finds and computes the rest."""
        params = getattr(request, "kv_transfer_params", None) or {}
        if not params.get("do_remote_prefill") or request.request_id in self._remote_seen:
            return False
        problem = self._remote_params_problem(request, params.get(PD_PARAMS_KEY))
        if problem is None:
            return True
        self._remote_seen.add(request.request_id)
        self.stats.add(pd_rejected_params=1)
        logger.warning("StrataCache: request %s: remote prefill parameters %s; it loads what a "
                       "plain lookup finds and computes the rest", request.request_id, problem)
        return False

    def _remote_params_problem(self, request, ours) -> Optional[str]:
        """Why a remote prefill's parameters do not describe this request's KV here, or None."""
        if not isinstance(ours, dict):
            return f"carry no {PD_PARAMS_KEY!r} entry"
        if ours.get("version") != PD_PARAMS_VERSION:
            return f"have version {ours.get('version')!r}, this connector reads {PD_PARAMS_VERSION}"
        if ours.get("namespace") != self.namespaces[0]:
            return (f"name KV namespace {ours.get('namespace')!r}, this engine's is "
                    f"{self.namespaces[0]!r} (different weights, dtype, layout or TP)")
        num_tokens, names = self._prompt_chunks(request)
        if ours.get("chunks") != names or ours.get("num_tokens") != num_tokens:
            return (f"list {len(ours.get('chunks') or [])} chunks / {ours.get('num_tokens')!r} "
                    f"tokens that are not this prompt's {len(names)} chunks / "
                    f"{num_tokens} tokens (another prompt, chunk size or block size)")
        return None

    def _prompt_chunks(self, request) -> tuple[int, list[str]]:
        """The prompt's stored token count and chunk names, as a producer lists them."""
        ends = self.geometry.prompt_ranges(request.block_hashes, request.num_prompt_tokens)
        return (ends[-1] if ends else 0), [self.geometry.range_name(request.block_hashes, e)
                                           for e in ends]

    def _remote_params(self, request) -> dict:
        """What the decode side needs to find and check this prompt's KV (contract item 2)."""
        num_tokens, names = self._prompt_chunks(request)
        return {"do_remote_prefill": True, "do_remote_decode": False,
                PD_PARAMS_KEY: {"version": PD_PARAMS_VERSION, "namespace": self.namespaces[0],
                                "num_tokens": num_tokens, "chunks": names}}

    # ---- allocation ----------------------------------------------------
    def on_alloc(self, request, block_ids: list[int], num_external_tokens: int) -> None:
        req_id = request.request_id
        if req_id not in self._tracked:
            self._tracked[req_id] = _Tracked(request, remote_decode=self._remote_decode(request))
        memo = self._lookup_start.pop(req_id, None)
        if memo is None:
            return  # no lookup preceded this allocation (e.g. after an async load)
        start = memo.start
        end = start + max(0, num_external_tokens)
        self.stats.add(hit_tokens=max(0, num_external_tokens),
                       miss_tokens=max(0, request.num_prompt_tokens - end))
        if memo.remote:
            self._remote_seen.add(req_id)   # one remote load per request, as vLLM's connectors
            self._count_remote_load(request, start, end, memo.found_end)
        if num_external_tokens > 0:
            self._pending_loads[req_id] = self._load_plan(request, block_ids, start, end,
                                                          memo.tail_in_full_chunk, memo.remote)

    def _count_remote_load(self, request, start: int, end: int, found_end: int) -> None:
        g = self.geometry
        expected = max(start, g.partial_end(min(request.num_prompt_tokens - 1,
                                                g.hashed_tokens(request.block_hashes))))
        self.stats.add(pd_requests=1, pd_hit_tokens=end - start)
        if found_end < expected:
            self.stats.add(pd_missing_tokens=expected - found_end)
            logger.warning("StrataCache: request %s: the producer's KV is missing from token %d "
                           "of %d (evicted, deleted or never stored); vLLM computes the rest",
                           request.request_id, found_end, expected)

    def _load_plan(self, request, block_ids: list[int], start: int, end: int,
                   tail_in_full_chunk: bool, remote: bool = False) -> RequestLoad:
        g = self.geometry
        bs, chunk = g.block_size, g.chunk_size
        chunks = []
        for chunk_start in range(start - start % chunk, end, chunk):
            chunk_end = min(chunk_start + chunk, end)
            stored_end = chunk_start + chunk if tail_in_full_chunk else chunk_end
            first_block = chunk_start // bs
            skip = max(0, start - chunk_start) // bs
            chunks.append(ChunkLoad(
                name=g.range_name(request.block_hashes, stored_end),
                num_blocks=(stored_end - chunk_start) // bs, skip_blocks=skip,
                block_ids=list(block_ids[first_block + skip:chunk_end // bs])))
        return RequestLoad(req_id=request.request_id, chunks=chunks,
                           is_async=self.load_async or remote, block_size=bs, remote=remote)

    # ---- per step ------------------------------------------------------
    def build_meta(self, scheduler_output) -> StrataCacheConnectorMetadata:
        meta = StrataCacheConnectorMetadata(
            loads=list(self._pending_loads.values()),
            preempted_req_ids=set(scheduler_output.preempted_req_ids or ()),
            sending_req_ids=self._sending)
        self._pending_loads.clear()
        self._sending = set()
        if self.engine is not None and self.can_save:
            block_state = getattr(scheduler_output, "kv_connector_block_state", None)
            for req_id, n_new in scheduler_output.num_scheduled_tokens.items():
                tracked = self._tracked.get(req_id)
                if tracked is not None and n_new > 0:
                    meta.saves.extend(self._saves_for(tracked, n_new, block_state))
        return meta

    def _saves_for(self, tracked: _Tracked, n_new: int, block_state) -> list[ChunkSave]:
        g = self.geometry
        request = tracked.request
        computed = request.num_computed_tokens + n_new
        prompt = request.num_prompt_tokens
        # Tokens from num_computed_tokens on are computed by this step, again if vLLM rolled
        # them back (a failed load, whose step saved nothing; a preemption): save them again.
        tracked.saved_chunks = min(tracked.saved_chunks, request.num_computed_tokens // g.chunk_size)
        if request.num_computed_tokens < prompt:
            tracked.partial_saved = False
        # KV exists for tokens [0, computed): past the prompt, that is generated tokens the
        # decode steps have fed back (the last sampled token has none yet).
        kv_end = computed if self.save_decode else min(computed, prompt)
        savable = min(kv_end, g.hashed_tokens(request.block_hashes))
        n_full = savable // g.chunk_size
        wanted: list[tuple[str, int, int]] = []   # (name, start token, end token)
        for i in range(tracked.saved_chunks, n_full):
            end = (i + 1) * g.chunk_size
            wanted.append((g.name_at(request.block_hashes, end), i * g.chunk_size, end))
        tracked.saved_chunks = max(tracked.saved_chunks, n_full)
        partial = self.save_partial or tracked.remote_decode
        if partial and not tracked.partial_saved and computed >= prompt:
            tracked.partial_saved = True
            partial_end = g.partial_end(min(prompt - 1, g.hashed_tokens(request.block_hashes)))
            if partial_end > n_full * g.chunk_size:
                start = n_full * g.chunk_size
                wanted.append((g.partial_name(request.block_hashes, partial_end), start,
                               partial_end))
        if not wanted:
            return []
        block_ids = _request_block_ids(block_state, request)
        saves = []
        for name, start, end in wanted:
            ids = block_ids[start // g.block_size:end // g.block_size]
            if len(ids) != (end - start) // g.block_size:
                continue  # blocks not allocated (should not happen): skip, best effort
            saves.append(ChunkSave(name=name, block_ids=list(ids),
                                   req_id=request.request_id if tracked.remote_decode else None))
            if self.events_enabled:
                self._remember_event(request, name, start, end)
        return saves

    # ---- worker feedback and events --------------------------------------
    def _remember_event(self, request, name: str, start: int, end: int) -> None:
        g = self.geometry
        hb = g.hash_block_size
        if len(self._pending_events) >= MAX_PENDING_EVENTS:
            self._pending_events.pop(next(iter(self._pending_events)))
        self._pending_events[name] = _EventInfo(
            block_hashes=list(request.block_hashes[start // hb:end // hb]),
            parent=request.block_hashes[start // hb - 1] if start else None,
            token_ids=list(request.all_token_ids[start:end]),
            extra={"lora_name": getattr(getattr(request, "lora_request", None), "lora_name", None)})

    def on_worker_output(self, worker_meta) -> None:
        if not isinstance(worker_meta, StrataCacheWorkerMetadata) or not self.events_enabled:
            return
        for name in worker_meta.stored:
            info = self._pending_events.pop(name, None)
            if info is not None:
                self._events.extend(self._make_events(info, []))
        if worker_meta.lost:
            self._events.extend(self._make_events(None, worker_meta.lost))

    def take_events(self) -> list:
        events, self._events = self._events, []
        return events

    def _remote_decode(self, request) -> bool:
        """A prefill whose KV a decode instance loads (``do_remote_decode``): every range of its
        prompt is stored, and its blocks live until the stores are durable."""
        params = getattr(request, "kv_transfer_params", None) or {}
        return bool(params.get("do_remote_decode")) and self.can_save and self.engine is not None

    def request_finished(self, request) -> tuple[bool, Optional[dict]]:
        """Forget the request; for a remote decode, ``(True, params)``: vLLM keeps its blocks
        until the workers report it in ``finished_sending`` (its stores are durable or have
        failed), and the response carries the parameters the decode side loads with."""
        req_id = request.request_id
        tracked = self._tracked.pop(req_id, None)
        self._lookup_start.pop(req_id, None)
        self._pending_loads.pop(req_id, None)
        self._remote_seen.discard(req_id)
        if tracked is None or not tracked.remote_decode:
            return False, None
        self._sending.add(req_id)
        self.stats.add(pd_sent_requests=1)
        return True, self._remote_params(request)

    def state_sizes(self) -> dict[str, int]:
        """Sizes of the per-request tables (tests assert they drain)."""
        return {"tracked": len(self._tracked), "lookup_start": len(self._lookup_start),
                "pending_loads": len(self._pending_loads), "remote_seen": len(self._remote_seen),
                "sending": len(self._sending),
                "pending_events": len(self._pending_events), "events": len(self._events)}


def _request_block_ids(block_state, request) -> list[int]:
    if block_state is not None:
        ids = block_state.get_block_ids(request.request_id)
        if ids is not None:
            return list(ids[0])
    return []
