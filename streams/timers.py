"""A due-time index: what is due now, without scanning everything that is not.

The document-wait timer and state retention both ask "which keys are due?" every second.
Scanning every PO's state for that made cost and memory grow with the number of POs; this
heap answers in O(due · log n). Entries are hints: the caller re-checks the state when one
comes due (a receipt may have been decided meanwhile), so stale entries cost nothing but a
lookup. The index lives in memory and is rebuilt from the table after recovery.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable

__all__ = ["DueIndex"]


class DueIndex:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Hashable]] = []
        self._seq = itertools.count()  # ties in time keep insertion order; items are never compared

    def push(self, due_ms: int, item: Hashable) -> None:
        heapq.heappush(self._heap, (due_ms, next(self._seq), item))

    def pop_due(self, now_ms: int, limit: int = 100_000) -> list[Hashable]:
        """Items due at or before ``now_ms``, earliest first (at most ``limit`` per call)."""
        out: list[Hashable] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms and len(out) < limit:
            out.append(heapq.heappop(heap)[2])
        return out

    def first_due(self, now_ms: int) -> Hashable | None:
        """The earliest item if it is due at ``now_ms`` (left in the index), else None."""
        heap = self._heap
        return heap[0][2] if heap and heap[0][0] <= now_ms else None

    def drop_first(self) -> None:
        heapq.heappop(self._heap)

    def next_due(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def clear(self) -> None:
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)
