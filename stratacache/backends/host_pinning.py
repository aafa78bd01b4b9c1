"""Page-locking host memory for CUDA (``cudaHostRegister``), done and reported one way.

The CPU arena and the shared region are memory the GPU copies from and into;
page-locked, such a copy is one DMA instead of a staged one. Each asks for it
with a setting: ``"auto"`` (when CUDA is present), ``True`` or ``False``. Memory
that cannot be page-locked still works, only GPU copies are slower, so a
failure is a ``RuntimeWarning`` and a counted ``pin_failures``, never an error,
and no further range is tried.
"""

from __future__ import annotations

import warnings

import torch


class HostPinning:
    """The page-locked ranges of one tier's memory, and how often locking failed."""

    def __init__(self, what: str, setting):
        self.what = what                  # names the memory in warnings, e.g. "cpu tier arena"
        self.failures = 0
        self._ranges: list[tuple[int, int]] = []
        self.enabled = setting is True or (setting == "auto" and torch.cuda.is_available())
        if self.enabled and not torch.cuda.is_available():
            self._fail("page-locking was requested (true) but CUDA is not available")

    @property
    def pinned_bytes(self) -> int:
        return sum(n for _ptr, n in self._ranges)

    def register(self, ptr: int, nbytes: int) -> bool:
        """Page-lock ``[ptr, ptr + nbytes)``; False (warned and counted) when it fails."""
        if not self.enabled:
            return False
        try:
            err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
        except Exception as exc:  # noqa: BLE001 - no CUDA runtime bindings in this build
            err = f"{type(exc).__name__}: {exc}"
        if err != 0:
            self._fail(f"page-locking {nbytes} bytes failed (cudaHostRegister: {err})")
            return False
        self._ranges.append((ptr, nbytes))
        return True

    def unregister_all(self) -> None:
        ranges, self._ranges = self._ranges, []
        for ptr, _n in ranges:
            torch.cuda.cudart().cudaHostUnregister(ptr)

    def stats(self) -> dict:
        return {"pin_memory": self.enabled, "pinned_bytes": self.pinned_bytes,
                "pin_failures": self.failures}

    def _fail(self, why: str) -> None:
        self.failures += 1
        self.enabled = False
        warnings.warn(f"stratacache {self.what}: {why}; it is not page-locked, so GPU copies "
                      "from it are slower", RuntimeWarning, stacklevel=4)
