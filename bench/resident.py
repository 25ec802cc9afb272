"""Peak resident memory of a block of code, for benches that report memory next to time.

torch's CPU allocations are invisible to tracemalloc, and `ru_maxrss` only ever grows over the whole
process, so the block's own peak is sampled from /proc/self/statm every 2 ms by a thread (a peak
shorter than that can be missed; the benches' blocks allocate for much longer). Linux only.
"""

from __future__ import annotations

import os
import threading


def resident_bytes() -> int:
    """This process's resident set size now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """`with PeakRSS() as mem: ...`; then `mem.beyond` = peak resident bytes beyond the start of the block."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def beyond(self) -> int:
        return self.peak - self.start
