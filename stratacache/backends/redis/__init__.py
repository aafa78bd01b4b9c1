"""The Redis / Redis Cluster tier, split by concern:

* ``resp``: RESP2 framing and reply reading on redis-py's pooled connections, with
  one deadline per call (the only module that touches redis-py internals);
* ``cluster``: which server holds a key (slots -> primaries), each server's health;
* ``tier``: ``RedisTier``, the ``base.Tier`` itself.
"""

from stratacache.backends.redis.tier import RedisTier, RedisTierConfigError

__all__ = ["RedisTier", "RedisTierConfigError"]
