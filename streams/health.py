"""Is the worker making progress? The answer behind ``/healthz`` (liveness and readiness).

Unhealthy while a transaction commit keeps failing (the broker is away, or a record cannot be
written), and whenever input is waiting (consumer lag above zero) but no batch completed for
``stall_timeout_s``: a process that is up but stuck must say so. Also unhealthy when the worker
has held no input partition for ``stall_timeout_s``: aiokafka can fail a group join (seen after a
Kafka 2.3 broker restart with static membership: "Unexpected error in join group") and then wait
for its error to be read by a consumer that, holding no partitions, never reads; the process
would idle forever outside its group. The worker exits then (its supervisor restarts it), so
deploy no more workers than input partitions. And unhealthy when records were handled past the
group's committed input offsets but those offsets have not moved for ``stall_timeout_s``: Faust
commits an offset only when every record before it was acked, so one record it never handed to
the agent holds every later commit back (the batch outputs are committed, the input offsets are
not, and a restart would read everything since again).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["Health"]


class Health:
    def __init__(self, stall_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_timeout_s = stall_timeout_s
        self._clock = clock
        self._last_batch = clock()
        self._lag = 0
        self._unassigned_since: float | None = clock()  # no partitions until the first assignment
        self._committed = -1
        self._uncommitted_since: float | None = None  # handled past the committed offsets, unmoved since
        self._uncommitted = 0

    def batch_done(self) -> None:
        self._last_batch = self._clock()

    def observe_lag(self, lag: int) -> None:
        self._lag = lag

    def observe_assignment(self, partitions: int) -> None:
        if partitions:
            self._unassigned_since = None
        elif self._unassigned_since is None:
            self._unassigned_since = self._clock()

    def observe_offsets(self, handled: int, committed: int) -> None:
        """Sums over the input partitions: the next offset to handle, and the group's committed offset."""
        self._uncommitted = max(0, handled - committed)
        if not self._uncommitted:
            self._uncommitted_since = None
        elif committed != self._committed or self._uncommitted_since is None:
            self._uncommitted_since = self._clock()
        self._committed = committed

    def uncommitted_for(self) -> float:
        """Seconds the committed input offsets have stayed behind what was handled (0 when caught up)."""
        return 0.0 if self._uncommitted_since is None else self._clock() - self._uncommitted_since

    def unassigned_for(self) -> float:
        """Seconds without any input partition (0 while some are assigned)."""
        return 0.0 if self._unassigned_since is None else self._clock() - self._unassigned_since

    def check(self, commit_failing_since: float | None) -> tuple[bool, dict[str, Any]]:
        now = self._clock()
        idle = now - self._last_batch
        problems = []
        if commit_failing_since is not None:
            problems.append(f"transaction commit failing for {now - commit_failing_since:.1f}s")
        if self._lag > 0 and idle > self.stall_timeout_s:
            problems.append(f"{self._lag} input records waiting and no batch completed for {idle:.0f}s")
        if self.uncommitted_for() > self.stall_timeout_s:
            problems.append(f"{self._uncommitted} handled input records not committed; the committed offsets "
                            f"have not moved for {self.uncommitted_for():.0f}s")
        if self.unassigned_for() > self.stall_timeout_s:
            problems.append(f"no input partition assigned for {self.unassigned_for():.0f}s")
        return not problems, {"ok": not problems, "problems": problems, "consumer_lag": self._lag,
                              "uncommitted_inputs": self._uncommitted,
                              "seconds_since_last_batch": round(idle, 1)}
