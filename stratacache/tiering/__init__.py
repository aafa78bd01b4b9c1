"""Tier coordination: read-through, promotion, write-through / write-back links."""

from stratacache.tiering.chain import TIER_CLASSES, TIER_ORDER, TierChain, TierSettings, tier_class
from stratacache.tiering.flusher import WriteBackFlusher

__all__ = ["TIER_CLASSES", "TIER_ORDER", "TierChain", "TierSettings", "WriteBackFlusher", "tier_class"]
