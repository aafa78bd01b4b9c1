"""One exponential back-off with a circuit breaker, shared by every retrying part of the plane.

After a fault the breaker is open: ``admit`` turns callers away until the
back-off has passed, then lets exactly one caller through as the probe; the
probe's ``ok`` closes the breaker (and resets the back-off), its ``fault``
opens it again with the back-off doubled, up to ``hi``. The Redis tier keeps
one per server (callers get a fast miss instead of waiting on a dead server);
the write-back flusher keeps one for the tier it writes down to (it waits the
returned delay before its next try).
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class Backoff:
    """Health of one remote thing; see the module docstring."""

    __slots__ = ("lo", "hi", "delay", "retry_at", "healthy", "probing", "_lock", "_clock")

    def __init__(self, lo: float, hi: float, clock: Callable[[], float] = time.monotonic):
        """``lo``: the first delay after a fault; ``hi``: the longest (at least ``lo``)."""
        self.lo, self.hi = float(lo), max(float(hi), float(lo))
        self.delay = self.lo          # the delay the next fault will start
        self.retry_at = 0.0
        self.healthy = True
        self.probing = False
        self._lock = threading.Lock()
        self._clock = clock

    def admit(self) -> bool:
        """May this caller try now? Always while healthy; once open, one probe per back-off."""
        if self.healthy:
            return True
        with self._lock:
            if self.healthy:
                return True
            if self.probing or self._clock() < self.retry_at:
                return False
            self.probing = True
            return True

    def ok(self) -> bool:
        """Record a success; True when it ends an outage."""
        if self.healthy:
            return False
        with self._lock:
            recovered = not self.healthy
            self.healthy, self.probing, self.delay = True, False, self.lo
            return recovered

    def abandon(self) -> None:
        """The probe ended without an answer either way (a caller error): let another try."""
        self.probing = False

    def fault(self) -> tuple[bool, float]:
        """Record a fault; (was it healthy until now, seconds until the next try)."""
        with self._lock:
            was_healthy = self.healthy
            if was_healthy:
                self.delay = self.lo
            self.healthy, self.probing = False, False
            retry_in = self.delay
            self.retry_at = self._clock() + retry_in
            self.delay = min(self.delay * 2 or self.lo, self.hi)
            return was_healthy, retry_in
