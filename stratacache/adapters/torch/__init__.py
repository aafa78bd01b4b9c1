"""Torch adapter: model parameters on the StrataCache storage plane.

* ``ParameterStoreClient``: put/get parameter tensors as ``params`` artifacts.
* ``offload(model, engine, prefetch=k, device=...)``: stream layer weights from
  the plane with prefetch; returns an ``OffloadedModel`` handle.
* ``save_to_plane`` / ``load_from_plane``: keep a whole model in a persistent
  tier and rebuild it in another process without its checkpoint.
"""

from stratacache.adapters.torch.offload import InferenceOnlyError, OffloadedModel, offload
from stratacache.adapters.torch.persist import load_from_plane, save_to_plane
from stratacache.adapters.torch.store import (ParameterStoreClient, ParamMissing, ParamRecord,
                                              ParamStoreError)

__all__ = ["ParameterStoreClient", "ParamRecord", "ParamStoreError", "ParamMissing", "InferenceOnlyError",
           "OffloadedModel", "offload", "save_to_plane", "load_from_plane"]
