"""Faust's aiokafka transport reading ``read_committed``, and table recovery that finishes on
a changelog written in transactions.

Faust's worker consumer (which also recovers the tables from their changelogs) reads
``read_uncommitted`` unless Faust's own exactly-once mode is on. lotflow writes outputs and
changelogs in its own Kafka transactions (one per batch) while Faust keeps at-least-once
commits, so the consumer must skip aborted records: this transport sets the isolation level
on the aiokafka consumer Faust builds, before it starts, and changes nothing else.
Use it with a ``lotflow-kafka://host:port`` broker URL.

Recovery: Faust recovers a changelog partition up to ``end offset - 1``. When the changelog is
written in transactions, that last offset is a commit marker no consumer ever receives, and
Faust's own fix-up (moving on once the consumer position passed the end) runs only in its
exactly-once mode, so recovery never completes and the worker never starts. ``MarkerAwareRecovery``
applies the same fix-up under at-least-once: when a partition's consumer position has passed
its target and nothing is queued (seen twice in a row), the partition is recovered.
"""

from __future__ import annotations

from typing import Any

from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.transport import drivers
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode import Service

__all__ = ["SCHEME", "MarkerAwareTableManager", "ReadCommittedTransport", "register"]

SCHEME = "lotflow-kafka"


class _ReadCommittedThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._isolation_level = "read_committed"  # read by the fetcher that start() creates
        return consumer


class _ReadCommittedConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ReadCommittedThread(self, loop=self.loop, beacon=self.beacon)


class ReadCommittedTransport(faust_aiokafka.Transport):
    Consumer = _ReadCommittedConsumer


def register() -> None:
    drivers.TRANSPORTS[SCHEME] = f"{__name__}:ReadCommittedTransport"


class MarkerAwareRecovery(Recovery):
    @Service.task
    async def _skip_trailing_markers(self) -> None:
        seen: dict[Any, int] = {}  # partition -> position at the previous look
        while not self.should_stop:
            await self.sleep(0.5)
            if not self.in_recovery:
                seen.clear()
                continue
            queue_empty = self.tables.changelog_queue.empty()
            for tp, target in list(self.active_highwaters.items()):
                offset = self.active_offsets.get(tp)
                if target is None or offset is None or offset >= target:
                    continue
                try:
                    position = await self.app.consumer.position(tp)
                except Exception:  # no position yet: look again next time
                    continue
                if position is not None and position > target and queue_empty:
                    if seen.get(tp) == position:
                        self.active_offsets[tp] = target
                    seen[tp] = position
                else:
                    seen.pop(tp, None)
            if self.in_recovery and not self.need_recovery():
                self.flush_buffers()
                self._set_recovery_ended()
                self.signal_recovery_end.set()


class MarkerAwareTableManager(TableManager):
    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = MarkerAwareRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
