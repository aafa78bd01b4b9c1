"""Memory layers: one module per tier, each implementing ``base.MemoryLayer``.

Tier modules are imported lazily (by ``stratacache.tiering.tier_class``) so a
process only loads the tiers it enables.
"""

from stratacache.backends.base import BatchDefaults, MemoryLayer

__all__ = ["BatchDefaults", "MemoryLayer"]
