"""Tiers: one module (or package) per tier, each a ``base.Tier``.

Tier modules are imported lazily (by ``stratacache.tiering.tier_class``) so a
process only loads the tiers it enables.
"""

from stratacache.backends.base import Lease, Tier

__all__ = ["Lease", "Tier"]
