"""Is the worker making progress? The answer behind ``/healthz`` (liveness and readiness).

Unhealthy while a transaction commit keeps failing (the broker is away, or a record cannot be
written), and whenever input is waiting (consumer lag above zero) but no batch completed for
``stall_timeout_s``: a process that is up but stuck must say so. Also unhealthy when the worker
has held no input partition for ``stall_timeout_s``: aiokafka can fail a group join (seen after a
Kafka 2.3 broker restart with static membership: "Unexpected error in join group") and then wait
for its error to be read by a consumer that, holding no partitions, never reads; the process
would idle forever outside its group. The worker exits then (its supervisor restarts it), so
deploy no more workers than input partitions.
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

    def batch_done(self) -> None:
        self._last_batch = self._clock()

    def observe_lag(self, lag: int) -> None:
        self._lag = lag

    def observe_assignment(self, partitions: int) -> None:
        if partitions:
            self._unassigned_since = None
        elif self._unassigned_since is None:
            self._unassigned_since = self._clock()

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
        if self.unassigned_for() > self.stall_timeout_s:
            problems.append(f"no input partition assigned for {self.unassigned_for():.0f}s")
        return not problems, {"ok": not problems, "problems": problems, "consumer_lag": self._lag,
                              "seconds_since_last_batch": round(idle, 1)}
