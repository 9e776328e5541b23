"""Peak resident memory of a piece of work, measured from inside the process."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path


class PeakMemory:
    """Peak resident memory (RSS) of this process above its level at the start, sampled in a thread.

    glibc's free lists are trimmed first, so memory freed by earlier work is given back to the system rather
    than silently reused. ``peak_mb`` is ``None`` where ``/proc/self/statm`` does not exist.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_mb: float | None = None
        self.peak_mb: float | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        _trim_malloc()
        self.start_mb = self.peak_mb = _rss_mb()
        if self.start_mb is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start_mb is not None:
            self._stop.set()
            self._thread.join()
            self._update()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def _update(self) -> None:
        now = _rss_mb()
        if now is not None and self.peak_mb is not None:
            self.peak_mb = max(self.peak_mb, now)

    @property
    def extra_mb(self) -> float | None:
        """Peak RSS minus RSS at the start, in MiB."""
        return None if self.start_mb is None or self.peak_mb is None else self.peak_mb - self.start_mb


def _rss_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trim_malloc() -> None:
    # Not glibc: the measurement then includes whatever the allocator kept from earlier work.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
