"""The public API of the storage plane: ``StorageEngine``."""

from stratacache.engine.engine import MODES, StorageEngine

__all__ = ["MODES", "StorageEngine"]
