"""The write-back flusher: moves dirty objects down write_back links.

A store acknowledged by an upper tier over a write_back link is *dirty* until
the tier below has it. The flusher thread writes dirty objects down oldest
first. A failed write (tier down, full, raising) is counted, the object stays
dirty, and the thread backs off (doubling from ``retry_backoff_s`` up to
``retry_backoff_max_s``) before retrying; any exception is caught and counted,
and a thread that somehow died is restarted by the next ``mark``. When a dirty
object is evicted from its upper tier before it was written down and the
write-down fails, the flusher keeps its own copy ("spilled") so acknowledged
data is not lost while the process lives.

Dirty data lives only in this process until written down: ``flush()`` returning
True is the durability promise (everything acknowledged before it is in the tier
below); a crash before that loses what was still dirty. A normal interpreter exit
drains (the TierChain's atexit hook).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Callable, Optional

from stratacache.core.artifact import Artifact
from stratacache.core.backoff import Backoff
from stratacache.core.keys import ArtifactKey

log = logging.getLogger(__name__)

# write_down(link, key, spilled) -> True (written down) | False (retry later) | GONE
WriteDown = Callable[[int, ArtifactKey, Optional[Artifact]], object]
GONE = "gone"   # no longer in the upper tier: deleted, or being evicted (its handler writes it down)


class _Dirty:
    __slots__ = ("size", "spilled")

    def __init__(self, size: int, spilled: Optional[Artifact] = None):
        self.size = size
        self.spilled = spilled


class WriteBackFlusher:
    def __init__(self, write_down: WriteDown, *, retry_backoff_s: float = 0.1,
                 retry_backoff_max_s: float = 10.0, max_dirty_bytes: int = 1 << 30):
        self._write_down = write_down
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = max(retry_backoff_max_s, retry_backoff_s)
        self.max_dirty_bytes = max_dirty_bytes
        self.stall_s = max(10.0, 3 * self.retry_backoff_max_s)
        self._backoff = Backoff(self.retry_backoff_s, self.retry_backoff_max_s)  # of the tiers below
        self._dirty: "OrderedDict[tuple[int, ArtifactKey], _Dirty]" = OrderedDict()
        self._dirty_bytes = 0
        self._busy: Optional[tuple[int, ArtifactKey]] = None
        # Dirty objects the flusher found gone from their tier: an eviction whose
        # hand-off may still be running; it must still see them as dirty (take()).
        self._gone: set[tuple[int, ArtifactKey]] = set()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.flushed = 0
        self.flush_failures = 0
        self.flusher_errors = 0
        self.restarts = 0
        self.waits = 0
        self.last_error: Optional[str] = None

    # -- producers -----------------------------------------------------------------------

    def mark(self, link: int, key: ArtifactKey, size: int) -> None:
        """``key`` in the tier above ``link`` is not yet in the tier below."""
        with self._cond:
            item = self._dirty.pop((link, key), None)
            if item is not None:
                self._dirty_bytes -= item.size
            self._gone.discard((link, key))
            self._dirty[(link, key)] = _Dirty(size)
            self._dirty_bytes += size
            self._ensure_thread()
            self._cond.notify_all()
            if self._dirty_bytes > self.max_dirty_bytes:
                # Back-pressure, bounded: a dead lower tier must not hang the caller.
                self.waits += 1
                self._cond.wait_for(lambda: self._dirty_bytes <= self.max_dirty_bytes or self._stop,
                                    timeout=self.retry_backoff_max_s)

    def take(self, link: int, key: ArtifactKey) -> bool:
        """Remove ``key``'s dirty mark (the caller writes it down now); was it dirty?

        Also True while the flusher itself is writing ``key`` down: it may not
        have pinned the object yet, so the caller's copy must not be dropped.
        """
        with self._cond:
            if (link, key) in self._gone:
                self._gone.discard((link, key))
                return True
            item = self._dirty.pop((link, key), None)
            if item is None:
                return self._busy == (link, key)
            self._dirty_bytes -= item.size
            self._cond.notify_all()
            return True

    def spill(self, link: int, key: ArtifactKey, art: Artifact) -> None:
        """Keep an owned copy of an evicted dirty object until the tier below takes it."""
        owned = Artifact(art.meta, art.data.clone())
        with self._cond:
            old = self._dirty.pop((link, key), None)
            if old is not None:
                self._dirty_bytes -= old.size
            self._dirty[(link, key)] = _Dirty(art.meta.size, owned)
            self._dirty_bytes += art.meta.size
            self._ensure_thread()
            self._cond.notify_all()

    def forget(self, key: ArtifactKey, timeout: float = 60.0) -> None:
        """The key is being deleted: drop its dirty marks and wait out an in-flight write
        of it, so the write cannot land after the delete and resurrect the object."""
        with self._cond:
            for dk in [dk for dk in self._dirty if dk[1] == key]:
                self._dirty_bytes -= self._dirty.pop(dk).size
            self._gone = {g for g in self._gone if g[1] != key}
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._busy is None or self._busy[1] != key, timeout=timeout)

    # -- draining ------------------------------------------------------------------------

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until nothing is dirty; False on timeout.

        ``timeout=None`` waits as long as the flusher makes progress, and gives up
        (False) once nothing has been written down for ``stall_s`` seconds, so a
        dead lower tier cannot hang a caller that is shutting down.
        """
        drained = lambda: not self._dirty and self._busy is None  # noqa: E731
        with self._cond:
            if self._dirty:
                self._ensure_thread()
                self._cond.notify_all()
            if timeout is not None:
                return self._cond.wait_for(drained, timeout=timeout)
            while True:
                seen = self.flushed
                if self._cond.wait_for(lambda: drained() or self.flushed != seen, timeout=self.stall_s):
                    if drained():
                        return True
                    continue
                return False

    def close(self, timeout: Optional[float] = None) -> bool:
        drained = self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not drained:
            log.error("stratacache write-back: %d objects (%d bytes) could not be written down before close",
                      len(self._dirty), self._dirty_bytes)
        return drained

    def stats(self) -> dict:
        with self._cond:
            return {"dirty_items": len(self._dirty), "dirty_bytes": self._dirty_bytes,
                    "spilled_items": sum(1 for d in self._dirty.values() if d.spilled is not None),
                    "awaiting_eviction_handoff": len(self._gone),
                    "flushed": self.flushed, "flush_failures": self.flush_failures,
                    "flusher_errors": self.flusher_errors, "flusher_restarts": self.restarts,
                    "backpressure_waits": self.waits, "last_error": self.last_error,
                    "flusher_alive": self._thread is not None and self._thread.is_alive()}

    # -- the thread ----------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._stop:
            return
        if self._thread is None or not self._thread.is_alive():
            if self._thread is not None:
                self.restarts += 1
                log.error("stratacache write-back flusher thread had died; restarted")
            self._thread = threading.Thread(target=self._run, name="stratacache-writeback", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        backoff = self._backoff
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._stop)
                if not self._dirty:
                    return   # stopped and drained
                if self._stop and not backoff.healthy:
                    return   # closing and the lower tier still fails: leave the rest counted
                (link, key), item = self._dirty.popitem(last=False)
                self._dirty_bytes -= item.size
                self._busy = (link, key)
            try:
                ok = self._write_down(link, key, item.spilled)
            except Exception as exc:  # the flusher must survive anything a tier throws
                ok = False
                self.flusher_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("stratacache write-back of %s failed: %s", key, self.last_error)
            with self._cond:
                self._busy = None
                if ok is GONE:
                    self._gone.add((link, key))
                    ok = True
                if ok:
                    self.flushed += 1
                    backoff.ok()
                elif (link, key) not in self._dirty:   # not re-stored meanwhile: retry later
                    self.flush_failures += 1
                    self._dirty[(link, key)] = item
                    self._dirty_bytes += item.size
                self._cond.notify_all()
                if not ok:
                    retry_in = backoff.fault()[1]
                    if not self._stop:
                        self._cond.wait_for(lambda: self._stop, timeout=retry_in)
