"""The scheduler process never touches CUDA (issue 23, item 5).

vLLM's scheduler-side connector only looks chunk keys up. Its engine opens the
shared region with ``register_cuda`` off whatever the user configured, so it
neither creates a CUDA context on GPU 0 nor page-locks (and so commits) the
whole region at start-up. The workers keep the user's setting.
"""

from __future__ import annotations

import os

import pytest
import torch

from stratacache.adapters.vllm.connector_v1 import lookup_config
from stratacache.adapters.vllm.settings import settings_from_extra_config
from stratacache.engine import StorageEngine


def _no_cuda(*args, **kwargs):
    raise AssertionError("the scheduler's lookup engine touched torch.cuda")


@pytest.mark.parametrize("user_value", [None, "auto", True])
def test_scheduler_lookup_engine_opens_the_region_without_cuda(monkeypatch, user_value):
    region = f"/dev/shm/sc-test-sched-nocuda-{os.getpid()}.region"
    extra = {"tiers.shared.path": region, "tiers.shared.capacity": "16MiB",
             "tiers.cpu.enabled": False}
    if user_value is not None:
        extra["tiers.shared.register_cuda"] = user_value
    settings = settings_from_extra_config(extra)
    cfg = lookup_config(settings)
    assert cfg.tiers.shared.register_cuda is False
    assert settings.load().tiers.shared.register_cuda == ("auto" if user_value is None else user_value)
    for name in ("is_available", "cudart", "init", "current_device", "device_count"):
        monkeypatch.setattr(torch.cuda, name, _no_cuda)
    try:
        engine = StorageEngine(cfg, tiers=["shared"])
        try:
            shared = engine.stats()["tiers"]["shared"]
            assert engine.tier_names == ("shared",) and shared["detail"]["cuda_registered"] is False
            assert shared["detail"]["pin_failures"] == 0
            assert engine.contains_many([]) == []
        finally:
            engine.close()
    finally:
        if os.path.exists(region):
            os.unlink(region)
    assert not torch.cuda.is_initialized()
