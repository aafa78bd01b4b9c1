"""offload(): run a module whose layer weights live in the storage plane.

The parameters of the chosen submodules ("units", the decoder layers by
default) are stored in the plane and replaced by meta-device placeholders, so
the module keeps its structure but holds no weight memory. A forward pre-hook
binds a unit's weights just before it runs and starts fetching the next
``prefetch`` units in the background (a worker thread; on CUDA it issues the
host-to-device copies on a side stream and the compute stream waits on an
event). A forward hook unbinds them afterwards. At most ``prefetch + 1`` units
are materialized at any time.

On a CPU compute device the weights can be zero-copy views of tier memory
(leased while bound); otherwise they are copied into memory the handle owns.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

from stratacache.adapters.torch.store import DEFAULT_SHARD_BYTES, ParameterStoreClient, ParamRecord


class InferenceOnlyError(RuntimeError):
    """An offloaded model was run with gradients enabled."""


@dataclass
class _Slot:
    """One offloaded parameter: where it is bound in the module and where it lives in the plane."""

    owner: nn.Module
    attr: str
    record: ParamRecord
    requires_grad: bool
    placeholder: nn.Parameter = field(init=False)

    def __post_init__(self) -> None:
        meta = torch.empty(self.record.shape, dtype=self.record.dtype, device="meta")
        self.placeholder = nn.Parameter(meta, requires_grad=False)

    def bind(self, tensor: Optional[torch.Tensor]) -> None:
        self.owner._parameters[self.attr] = (self.placeholder if tensor is None
                                             else nn.Parameter(tensor, requires_grad=False))


@dataclass
class _Unit:
    name: str
    module: nn.Module
    slots: list[_Slot]

    @property
    def nbytes(self) -> int:
        return sum(s.record.nbytes for s in self.slots)


@dataclass
class _Loaded:
    """A unit's weights on the compute device, with the leases / copy event keeping them valid."""

    tensors: list[torch.Tensor]
    leases: ExitStack
    event: Optional["torch.cuda.Event"] = None


class _LeaseKeeper:
    """Leases on every in-memory copy of every offloaded object (``engine.hold``), renewed
    before they expire: while a model is in use nothing (KV traffic, other models) can evict
    its weights. The plane's namespace priorities protect them too; leases also cover tiers
    without them."""

    def __init__(self, engine, keys: list, lease_s: float):
        self._engine = engine
        self._keys = keys
        self._lease_s = lease_s
        self._held: list = []
        self._stop = threading.Event()
        self._renew()
        self._thread = threading.Thread(target=self._run, name="stratacache-param-leases", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        fresh = self._engine.hold(self._keys, lease_s=self._lease_s)   # new leases before the old go
        old, self._held = self._held, fresh
        for lease in old:
            lease.release()

    def _run(self) -> None:
        while not self._stop.wait(self._lease_s / 3):
            self._renew()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for lease in self._held:
            lease.release()
        self._held = []


def resolve_units(model: nn.Module, submodules=None) -> list[tuple[str, nn.Module]]:
    """The units to offload: given modules / qualified names, else the largest ModuleList's children."""
    names = {id(m): n for n, m in model.named_modules()}
    if submodules is None:
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise ValueError("offload: the model has no nn.ModuleList of layers; pass submodules=[...]")
        name, layers = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
        units = [(f"{name}.{i}", m) for i, m in enumerate(layers)]
    else:
        units = []
        for item in submodules:
            if isinstance(item, str):
                try:
                    units.append((item, model.get_submodule(item)))
                except AttributeError as exc:
                    raise ValueError(f"offload: submodules names {item!r}, which is not a submodule") from exc
            elif isinstance(item, nn.Module) and id(item) in names:
                units.append((names[id(item)], item))
            else:
                raise ValueError(f"offload: submodules item {item!r} is not a submodule of the model")
    if not units:
        raise ValueError("offload: submodules is empty")
    for i, (a, _) in enumerate(units):
        for b, _ in units[i + 1:]:
            if a == b or a.startswith(b + ".") or b.startswith(a + ".") or a == "" or b == "":
                raise ValueError(f"offload: submodules {a!r} and {b!r} overlap")
    return units


def unit_parameters(model: nn.Module, unit_name: str, unit: nn.Module):
    """(owner, attr, module path, parameter) for every parameter of a unit; tied ones are refused."""
    uses: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        uses.setdefault(id(p), []).append(name)
    out = []
    for path, owner in unit.named_modules(prefix=unit_name):
        for attr, p in owner._parameters.items():
            if p is None:
                continue
            if len(uses.get(id(p), ())) > 1:
                raise ValueError(f"offload: parameter {path}.{attr} is shared ({', '.join(uses[id(p)])}); "
                                 "tied parameters cannot be released: leave that module out of submodules")
            out.append((owner, attr, path, p))
    return out


class OffloadedModel:
    """Handle of an offloaded module: hooks, prefetcher, residency accounting, restore/close."""

    def __init__(self, model: nn.Module, client: ParameterStoreClient, units: list[_Unit], *,
                 prefetch: int, device: torch.device, zero_copy: bool, owns_keys: bool):
        self.model = model
        self.client = client
        self.units = units
        self.device = device
        self.prefetch = min(prefetch, len(units) - 1)
        self.zero_copy = zero_copy
        self._owns_keys = owns_keys
        # Copies the handle owns can stay loaded between calls, so the window wraps around to
        # the first units; leased views are only held while a call is running.
        self._wrap = not zero_copy
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._active: dict[int, tuple[_Loaded, int]] = {}
        self._closed = False
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.loads = 0
        self.prefetch_hits = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # One copy thread; single-threaded so it does not oversubscribe the compute threads.
        self._worker = (ThreadPoolExecutor(1, thread_name_prefix="stratacache-prefetch",
                                           initializer=torch.set_num_threads, initargs=(1,))
                        if self.prefetch > 0 else None)
        for unit in units:
            for slot in unit.slots:
                slot.bind(None)
        lease_s = float(getattr(getattr(client.engine, "cfg", None), "lease_s", 30.0))
        self._leases = _LeaseKeeper(client.engine, [k for u in units for s in u.slots
                                                    for k in client.keys(s.record)], lease_s)
        self._hooks = []
        for i, unit in enumerate(units):
            self._hooks.append(unit.module.register_forward_pre_hook(self._make_pre_hook(i)))
            self._hooks.append(unit.module.register_forward_hook(self._make_post_hook(i), always_call=True))
        self._guards = []                       # registered after: a unit that owns weights binds first
        names = {id(m): n for n, m in model.named_modules()}
        for unit in units:
            for owner in {id(s.owner): s.owner for s in unit.slots}.values():
                self._guards.append(owner.register_forward_pre_hook(
                    self._make_guard(unit, owner, names.get(id(owner), unit.name))))

    # -- public ---------------------------------------------------------------
    @property
    def unit_bytes(self) -> list[int]:
        return [u.nbytes for u in self.units]

    @property
    def offloaded_bytes(self) -> int:
        return sum(self.unit_bytes)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_resident_bytes = self.resident_bytes

    def stats(self) -> dict:
        return {"units": len(self.units), "prefetch": self.prefetch, "device": str(self.device),
                "zero_copy": self.zero_copy, "offloaded_bytes": self.offloaded_bytes,
                "resident_bytes": self.resident_bytes, "peak_resident_bytes": self.peak_resident_bytes,
                "loads": self.loads, "prefetch_hits": self.prefetch_hits}

    def restore(self) -> nn.Module:
        """Make every unit resident on the compute device again and remove the hooks."""
        if self._closed:
            raise RuntimeError("restore(): the offloaded model was already closed or restored")
        # Everything is read before anything changes: a failed read leaves the model offloaded.
        tensors = [[self.client.get(s.record).to(self.device) for s in unit.slots] for unit in self.units]
        self._shutdown()
        for h in self._guards:
            h.remove()
        for unit, unit_tensors in zip(self.units, tensors):
            for slot, tensor in zip(unit.slots, unit_tensors):
                slot.owner._parameters[slot.attr] = nn.Parameter(tensor, requires_grad=slot.requires_grad)
        self._forget_keys()
        return self.model

    def close(self) -> None:
        """Release everything held; the units stay placeholders that refuse to run.

        (Torch would otherwise run some ops on meta weights and return wrong values silently.)
        """
        if self._closed:
            return
        self._shutdown()
        self._forget_keys()

    def __enter__(self) -> "OffloadedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # -- hooks ----------------------------------------------------------------
    def _make_pre_hook(self, i: int):
        def pre_hook(module, args):
            if torch.is_grad_enabled():
                raise InferenceOnlyError(
                    f"{self.units[i].name} is offloaded to StrataCache, which is inference-only: run the "
                    "model under torch.no_grad() or torch.inference_mode() (or call restore() first)")
            with self._lock:
                if i in self._active:           # re-entered (a unit called twice in one pass)
                    loaded, refs = self._active[i]
                    self._active[i] = (loaded, refs + 1)
                    return
                future = self._pending.pop(i, None)
                self.prefetch_hits += future is not None
            if future is not None:
                loaded = future.result()
            else:
                loaded = self._load(i)
            self._bind(i, loaded)
            with self._lock:
                self._active[i] = (loaded, 1)
            self._schedule_after(i)
        return pre_hook

    def _make_guard(self, unit: _Unit, owner: nn.Module, path: str):
        """Refuse to run a module whose weights are placeholders (called outside its unit, or closed)."""
        slots = [s for s in unit.slots if s.owner is owner]

        def guard(module, args):
            if any(owner._parameters.get(s.attr) is s.placeholder for s in slots):
                why = ("its offload handle was closed (rebuild it with load_from_plane, or use restore())"
                       if self._closed else f"it was called outside its offload unit {unit.name}")
                raise RuntimeError(f"{path} holds no weights: {why}")
        return guard

    def _make_post_hook(self, i: int):
        def post_hook(module, args, output):
            with self._lock:
                if i not in self._active:
                    return
                loaded, refs = self._active[i]
                if refs > 1:
                    self._active[i] = (loaded, refs - 1)
                    return
                del self._active[i]
            for slot in self.units[i].slots:
                slot.bind(None)
            self._release(i, loaded)
        return post_hook

    # -- loading --------------------------------------------------------------
    def _window(self, i: int) -> list[int]:
        n = len(self.units)
        ahead = [i + d for d in range(1, self.prefetch + 1)]
        return [j % n for j in ahead] if self._wrap else [j for j in ahead if j < n]

    def _schedule_after(self, i: int) -> None:
        if self._worker is None:
            return
        window = self._window(i)
        with self._lock:
            stale = [j for j in self._pending if j not in window]
            stale_futures = [self._pending.pop(j) for j in stale]
            wanted = [j for j in window if j not in self._pending and j not in self._active]
            for j in wanted:
                self._pending[j] = self._worker.submit(self._load, j)
        for j, future in zip(stale, stale_futures):   # ran out of order: keep the bound
            self._drop(j, future)

    def _drop(self, j: int, future: Future) -> None:
        """Release a prefetch that will not be used (a failed one holds nothing)."""
        try:
            loaded = future.result()
        except Exception:
            return
        self._release(j, loaded)

    def _account(self, delta: int) -> None:
        with self._lock:
            self.resident_bytes += delta
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
            if delta > 0:
                self.loads += 1

    def _load(self, i: int) -> _Loaded:
        unit = self.units[i]
        self._account(unit.nbytes)
        leases = ExitStack()
        try:
            if self._stream is not None:
                loaded = self._load_cuda(unit, leases)
            elif self.zero_copy:
                loaded = _Loaded([leases.enter_context(self.client.view(s.record)) for s in unit.slots], leases)
            else:
                loaded = _Loaded([self.client.get(s.record).to(self.device) for s in unit.slots], leases)
        except BaseException:
            leases.close()
            self._account(-unit.nbytes)
            raise
        return loaded

    def _load_cuda(self, unit: _Unit, leases: ExitStack) -> _Loaded:
        tensors = []
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            for slot in unit.slots:
                host = leases.enter_context(self.client.view(slot.record))
                dev = torch.empty(slot.record.shape, dtype=slot.record.dtype, device=self.device)
                dev.copy_(host, non_blocking=True)
                tensors.append(dev)
            event = torch.cuda.Event()
            event.record(self._stream)
        return _Loaded(tensors, leases, event)

    def _bind(self, i: int, loaded: _Loaded) -> None:
        if loaded.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(loaded.event)
            for t in loaded.tensors:
                t.record_stream(compute)       # the allocator must not reuse it before compute is done
        for slot, tensor in zip(self.units[i].slots, loaded.tensors):
            slot.bind(tensor)

    def _release(self, i: int, loaded: _Loaded) -> None:
        if loaded.event is not None:
            loaded.event.synchronize()         # host-side sources are read before their leases end
        loaded.tensors.clear()
        loaded.leases.close()
        self._account(-self.units[i].nbytes)

    def _shutdown(self) -> None:
        self._closed = True
        for h in self._hooks:
            h.remove()
        with self._lock:
            pending, self._pending = self._pending, {}
            active, self._active = self._active, {}
        for j, future in pending.items():
            self._drop(j, future)
        for j, (loaded, _) in active.items():
            for slot in self.units[j].slots:
                slot.bind(None)
            self._release(j, loaded)
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        self._leases.close()

    def _forget_keys(self) -> None:
        if self._owns_keys:
            self.client.delete([s.record for u in self.units for s in u.slots])


def _default_device(model: nn.Module, skip: set[int]) -> torch.device:
    for p in model.parameters():
        if id(p) not in skip and p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _move_rest(model: nn.Module, skip: set[int], device: torch.device) -> None:
    """Move every parameter and buffer outside the units to the compute device."""
    for owner in model.modules():
        for attr, p in list(owner._parameters.items()):
            if p is not None and id(p) not in skip and p.device != device:
                owner._parameters[attr] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
        for attr, b in list(owner._buffers.items()):
            if b is not None and b.device != device:
                owner._buffers[attr] = b.to(device)


def _check_options(prefetch, device, zero_copy) -> None:
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"offload: prefetch must be an int >= 0, got {prefetch!r}")
    if zero_copy and device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"offload: zero_copy=True needs a CPU compute device, got {device}")


def attach(model: nn.Module, client: ParameterStoreClient, units: list[tuple[str, nn.Module]],
           records: dict[str, ParamRecord], *, prefetch: int, device, zero_copy: Optional[bool],
           owns_keys: bool, requires_grad: Optional[dict[str, bool]] = None) -> OffloadedModel:
    """Hook units whose parameters are already in the plane (``records`` by qualified name)."""
    _check_options(prefetch, device, zero_copy)
    built = []
    skip: set[int] = set()
    for name, module in units:
        slots = []
        for owner, attr, path, p in unit_parameters(model, name, module):
            qual = f"{path}.{attr}"
            if qual not in records:
                raise ValueError(f"offload: no stored record for parameter {qual}")
            skip.add(id(p))
            grad = (requires_grad or {}).get(qual, p.requires_grad)
            slots.append(_Slot(owner, attr, records[qual], grad))
        built.append(_Unit(name, module, slots))
    device = torch.device(device) if device is not None else _default_device(model, skip)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if zero_copy is None:
        zero_copy = device.type == "cpu"
    _check_options(prefetch, device, zero_copy)
    _move_rest(model, skip, device)
    return OffloadedModel(model, client, built, prefetch=prefetch, device=device,
                          zero_copy=zero_copy, owns_keys=owns_keys)


def offload(model: nn.Module, engine, prefetch: int = 2, device: Union[str, torch.device, None] = None, *,
            submodules: Optional[Sequence[Union[str, nn.Module]]] = None, model_id: Optional[str] = None,
            revision: str = "main", zero_copy: Optional[bool] = None,
            shard_bytes: int = DEFAULT_SHARD_BYTES, verify: str = "once") -> OffloadedModel:
    """Store the units' parameters in ``engine`` and stream them back layer by layer.

    ``model_id``/``revision`` name the weights in the plane (so other processes
    can share them); without ``model_id`` they get a private name and are
    deleted on ``close()`` / ``restore()``. ``zero_copy`` (default: on for a
    CPU device) binds leased views of tier memory instead of copies; ``verify``
    says how often such views are checksummed (see ``ParameterStoreClient``).
    """
    _check_options(prefetch, device, zero_copy)
    units = resolve_units(model, submodules)
    client = ParameterStoreClient(engine, model_id or f"anonymous-{uuid.uuid4().hex}", revision,
                                  shard_bytes=shard_bytes, verify=verify)
    records: dict[str, ParamRecord] = {}
    for name, module in units:               # everything is stored before anything is released
        for _, attr, path, p in unit_parameters(model, name, module):
            records[f"{path}.{attr}"] = client.put(path, attr, p.detach())
    return attach(model, client, units, records, prefetch=prefetch, device=device,
                  zero_copy=zero_copy, owns_keys=model_id is None)
