"""Tier coordination: the only caller of the tiers (reads, writes, promotion, write-through /
write-back links, eviction hand-off, inspection)."""

from stratacache.tiering.chain import (TIER_CLASSES, TIER_ORDER, TierChain, TierSettings,
                                       inspect_tier, tier_class)
from stratacache.tiering.flusher import WriteBackFlusher

__all__ = ["TIER_CLASSES", "TIER_ORDER", "TierChain", "TierSettings", "WriteBackFlusher",
           "inspect_tier", "tier_class"]
