"""Which server holds a key, and that server's health.

A single server is one route. In a Redis Cluster each key goes to the primary
that owns its slot (replicas are not read from), a batch is split into one
pipeline per primary, and each primary has its own ``Backoff``, so one dead
primary costs only the keys it holds. A MOVED or ASK reply (resharding, a
failover) or a fault marks the slot map stale; it is re-read before the next
call, and the key that met MOVED is a miss (or "not stored") this once.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Sequence

from stratacache.backends.redis import resp
from stratacache.core.backoff import Backoff


class Route(NamedTuple):
    health: Backoff
    pool: object          # redis-py connection pool of that server
    where: str            # " (host:port)" in a cluster, for messages; "" for a single server
    idxs: list            # indices of the keys (in the caller's list) this server holds


class ServerRoutes:
    """One server: every key goes to it."""

    cluster = False

    def __init__(self, backoff_range: tuple[float, float]):
        self.health = Backoff(*backoff_range)   # the server's

    def routes(self, client, rkeys: Sequence[bytes]) -> list[Route]:
        return [Route(self.health, resp.server_pool(client), "", list(range(len(rkeys))))]

    def stale(self) -> None:
        """A single server has no slot map."""

    def pools(self, client) -> list:
        return [resp.server_pool(client)]

    @property
    def healthy(self) -> bool:
        return self.health.healthy


class ClusterRoutes:
    """A cluster's primaries, by slot; see the module docstring."""

    cluster = True

    def __init__(self, backoff_range: tuple[float, float]):
        self._range = backoff_range
        self.health = Backoff(*backoff_range)   # reaching the cluster at all (slot discovery)
        self._nodes: dict[str, Backoff] = {}     # primaries, by "host:port"
        self._lock = threading.Lock()
        self._stale = False

    def routes(self, client, rkeys: Sequence[bytes]) -> list[Route]:
        if self._stale:
            self._stale = False
            resp.refresh_slots(client)
        groups: dict[str, tuple] = {}
        for i, rk in enumerate(rkeys):
            name, pool = resp.primary_of(client, rk)
            groups.setdefault(name, (pool, []))[1].append(i)
        return [Route(self._node(name), pool, f" ({resp.where(pool)})", idxs)
                for name, (pool, idxs) in groups.items()]

    def _node(self, name: str) -> Backoff:
        health = self._nodes.get(name)
        if health is None:
            with self._lock:
                health = self._nodes.setdefault(name, Backoff(*self._range))
        return health

    def stale(self) -> None:
        """MOVED / ASK, or a fault (a failover may have moved a dead node's slots)."""
        self._stale = True

    def pools(self, client) -> list:
        return resp.cluster_pools(client)

    @property
    def healthy(self) -> bool:
        return self.health.healthy and all(h.healthy for h in list(self._nodes.values()))
