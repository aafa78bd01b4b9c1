"""StrataCache: a tiered KV-cache and artifact store for LLM inference.

Layers, from the bottom up: native ops (``stratacache.ops``) -> memory layers
(``stratacache.backends``) -> tier coordination (``stratacache.tiering``) ->
the public ``StorageEngine`` (``stratacache.engine``) -> adapters for vLLM
and torch models (``stratacache.adapters``).
"""

__version__ = "0.1.0"
