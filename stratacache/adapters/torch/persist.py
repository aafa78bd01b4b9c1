"""save_to_plane / load_from_plane: a model that lives in a persistent tier.

``save_to_plane`` stores every parameter and buffer of a model (tied tensors
once) plus a JSON manifest: the tensor records, which submodules are offload
units, and, for a transformers model, its architecture and config. The
manifest is written last, so its presence means the model is complete.

``load_from_plane`` builds the module skeleton on the meta device (from the
stored config, or a caller's ``builder``), materializes the small non-unit
tensors and offloads the units straight from the plane: no checkpoint file is
read.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from stratacache.adapters.torch.offload import OffloadedModel, attach, resolve_units
from stratacache.adapters.torch.store import (DEFAULT_SHARD_BYTES, ParameterStoreClient, ParamMissing,
                                              ParamRecord, ParamStoreError)

MANIFEST_FORMAT = 1


def _tensors(model: nn.Module):
    """(module path, attr, kind, tensor) for every parameter and buffer, tied ones repeated."""
    for path, owner in model.named_modules(remove_duplicate=False):
        for attr, p in owner._parameters.items():
            if p is not None:
                yield path, attr, "param", p
        for attr, b in owner._buffers.items():
            if b is not None:
                yield path, attr, "buffer", b


def _qual(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr


def save_to_plane(model: nn.Module, engine, model_id: str, revision: str = "main", *,
                  submodules: Optional[Sequence[Union[str, nn.Module]]] = None,
                  shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Store the whole model under ``model_id@revision``; returns the manifest."""
    client = ParameterStoreClient(engine, model_id, revision, shard_bytes=shard_bytes)
    units = [name for name, _ in resolve_units(model, submodules)]
    entries, first_name = [], {}
    for path, attr, kind, tensor in _tensors(model):
        qual = _qual(path, attr)
        if id(tensor) in first_name:
            entries.append({"kind": kind, "qualname": qual, "alias": first_name[id(tensor)]})
            continue
        first_name[id(tensor)] = qual
        record = client.put(path, attr, tensor.detach())
        entries.append({"kind": kind, "qualname": qual, "record": record.to_json()})
    manifest = {"format": MANIFEST_FORMAT, "model_id": model_id, "revision": revision,
                "units": units, "tensors": entries, "config": None, "architecture": None}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        manifest["config"] = config.to_dict()
        manifest["architecture"] = type(model).__name__
    client.put_manifest(manifest)
    return manifest


def _transformers_skeleton(manifest: dict) -> nn.Module:
    import transformers

    arch, config = manifest.get("architecture"), manifest.get("config")
    if not arch or not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{manifest.get('model_id')}@{manifest.get('revision')} was not saved from a "
                         "transformers model: pass builder= to load_from_plane")
    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"manifest architecture {arch!r} is not a transformers model class")
    fields = dict(config)
    cfg = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        return cls._from_config(cfg)


def load_from_plane(engine, model_id: str, revision: str = "main", *, prefetch: int = 2,
                    device: Union[str, torch.device, None] = None,
                    builder: Optional[Callable[[], nn.Module]] = None,
                    zero_copy: Optional[bool] = None, verify: str = "once") -> OffloadedModel:
    """Build an offloaded model from the plane alone (see module docstring).

    ``builder`` makes the module skeleton for a model that is not a transformers
    model; it runs under ``torch.device("meta")``.
    """
    client = ParameterStoreClient(engine, model_id, revision, verify=verify)
    manifest = client.get_manifest()
    if manifest is None:
        raise ParamMissing(f"no model {client.namespace} in the storage plane (no manifest)")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ParamStoreError(f"manifest of {client.namespace} has unsupported format {manifest.get('format')!r}")
    entries = manifest["tensors"]
    records = {e["qualname"]: ParamRecord.from_json(e["record"]) for e in entries if "record" in e}
    present = client.contains(list(records.values()))
    missing = [q for q, ok in zip(records, present) if not ok]
    if missing:
        raise ParamMissing(f"{client.namespace}: {len(missing)} of {len(records)} tensors are not in the plane "
                           f"(evicted or deleted), e.g. {missing[:3]}")
    if builder is not None:
        with torch.device("meta"):          # the skeleton allocates nothing
            model = builder()
    else:
        model = _transformers_skeleton(manifest)
    units = resolve_units(model, manifest["units"])
    unit_prefixes = tuple(f"{u}." for u, _ in units)
    device = torch.device(device) if device is not None else torch.device("cpu")

    bound: dict[str, torch.Tensor] = {}
    for e in entries:
        qual, kind = e["qualname"], e["kind"]
        path, _, attr = qual.rpartition(".")
        try:
            owner = model.get_submodule(path)
        except AttributeError as exc:
            raise ParamStoreError(f"the skeleton has no module {path!r} for stored tensor {qual}") from exc
        table = owner._parameters if kind == "param" else owner._buffers
        if attr not in table:
            raise ParamStoreError(f"the skeleton's {path or 'root'} has no {kind} {attr!r} (stored {qual})")
        if "alias" in e:
            tensor = bound[e["alias"]]
        elif kind == "param" and qual.startswith(unit_prefixes):
            record = records[qual]       # offloaded: attach() swaps in a placeholder of the stored shape
            tensor = nn.Parameter(torch.empty(record.shape, dtype=record.dtype, device="meta"),
                                  requires_grad=False)
        else:
            data = client.get(records[qual]).to(device)
            tensor = nn.Parameter(data, requires_grad=False) if kind == "param" else data
        table[attr] = tensor
        bound[qual] = tensor
    leftover = [_qual(p, a) for p, a, _, t in _tensors(model) if t.device.type == "meta"
                and not _qual(p, a).startswith(unit_prefixes)]
    if leftover:
        raise ParamStoreError(f"the skeleton has tensors the manifest of {client.namespace} lacks: {leftover[:5]}")
    return attach(model, client, units, records, prefetch=prefetch, device=device,
                  zero_copy=zero_copy, owns_keys=False)
