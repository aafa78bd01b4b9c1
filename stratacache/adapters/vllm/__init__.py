"""vLLM integration: the StrataCacheConnectorV1 KV connector and its config helper.

``kv_transfer_config()`` builds the dict for ``LLM(kv_transfer_config=...)`` /
``--kv-transfer-config`` without importing vLLM. The connector class itself
lives in ``connector_v1`` (the module vLLM loads through
``kv_connector_module_path``); it is imported here lazily.
"""

from stratacache.adapters.vllm.settings import (
    CONNECTOR_MODULE,
    CONNECTOR_NAME,
    kv_transfer_config,
    settings_from_extra_config,
)

__all__ = ["kv_transfer_config", "settings_from_extra_config", "CONNECTOR_NAME",
           "CONNECTOR_MODULE", "StrataCacheConnectorV1"]


def __getattr__(name):
    if name == "StrataCacheConnectorV1":
        from stratacache.adapters.vllm.connector_v1 import StrataCacheConnectorV1
        return StrataCacheConnectorV1
    raise AttributeError(name)
