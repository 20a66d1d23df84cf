"""Cheap per-frame measurements: a fixed ring of samples summarised as p50/p99/max on demand.

Recording runs 50 times a second per direction per call, so it must not allocate: it writes
one float into a preallocated numpy array. Summaries are computed only when metrics are read.
"""

from __future__ import annotations

import numpy as np


class LatencyStats:
    """The last `capacity` samples of one measurement (any unit), plus a total count."""

    __slots__ = ("_values", "_capacity", "count", "max")

    def __init__(self, capacity: int = 4096):
        self._values = np.zeros(capacity, dtype=np.float64)
        self._capacity = capacity
        self.count = 0
        self.max = 0.0

    def add(self, value: float) -> None:
        self._values[self.count % self._capacity] = value
        self.count += 1
        if value > self.max:
            self.max = value

    def summary(self, digits: int = 1) -> dict[str, float | int | None]:
        """{"count", "p50", "p99", "max"}; percentiles over the most recent samples."""
        if self.count == 0:
            return {"count": 0, "p50": None, "p99": None, "max": None}
        recent = self._values[: min(self.count, self._capacity)]
        p50, p99 = np.percentile(recent, [50, 99])
        return {
            "count": self.count,
            "p50": round(float(p50), digits),
            "p99": round(float(p99), digits),
            "max": round(float(self.max), digits),
        }
