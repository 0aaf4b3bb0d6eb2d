"""Faust's aiokafka transport reading ``read_committed``, and table recovery that finishes on
a changelog written in transactions.

Faust's worker consumer (which also recovers the tables from their changelogs) reads
``read_uncommitted`` unless Faust's own exactly-once mode is on. lotflow writes outputs and
changelogs in its own Kafka transactions (one per batch) while Faust keeps at-least-once
commits, so the consumer must skip aborted records: this transport sets the isolation level
on the aiokafka consumer Faust builds, before it starts.
Use it with a ``lotflow-kafka://host:port`` broker URL.

Hand-off: for every message, Faust's drainer awaits ``wait_first(callback(message),
suspend_flow.wait())``, which wraps both in tasks and adds two more for stop and crash: four
tasks and an ``asyncio.wait`` per message, the largest part of Faust's own per-message cost.
The consumer here first steps the callback once: when it completes without waiting (the
stream's buffer has room, no rebalance), nothing else is needed; only a callback that must
wait goes the original way, so a rebalance or a stop can still interrupt it. ``RawSchema`` turns
a message into an event without the serializer registry (lotflow decodes the bytes itself).

Recovery: Faust recovers a changelog partition up to ``end offset - 1``. When the changelog is
written in transactions, that last offset is a commit marker no consumer ever receives, and
Faust's own fix-up (moving on once the consumer position passed the end) runs only in its
exactly-once mode, so recovery never completes and the worker never starts. ``MarkerAwareRecovery``
applies the same fix-up under at-least-once: when a partition's consumer position has passed
its target and nothing is queued (seen twice in a row), the partition is recovered.

Resuming the inputs after recovery: Faust's ``on_recovery_completed`` resumes the input
partitions, then awaits ``perform_seek`` (one committed-offset lookup per partition, in turn),
then resumes flow control, which empties every stream queue. A fetch that lands in that window
moves records past the fetch position into the agent's queue, and the clear discards them: up to
the queue's size (4,096 records) silently lost, never acked, so Faust never commits an input
offset again (a CI run of the crash test lost 763 receipts that way, found in its Kafka logs).
``MarkerAwareRecovery`` holds the inputs paused until Faust's method has returned, so nothing is
read before the seek and the clear are done. The consumer also hands aiokafka a copy of the active
partitions per fetch: the live set can become empty while a fetch waits, which aiokafka reads as
"every partition", and Faust then drops the paused partitions' records it gets back.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Coroutine, Generator
from typing import Any

from faust import Schema
from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.transport import drivers
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode import Service
from mode.services import WaitArgT, WaitResults

__all__ = ["SCHEME", "MarkerAwareTableManager", "RawSchema", "ReadCommittedTransport", "register"]

SCHEME = "lotflow-kafka"


# How long the broker may hold a fetch that finds no data. Faust hard-codes 1,500 ms, and aiokafka
# sends one fetch per broker at a time, leaving out partitions whose fetched records the worker has
# not taken yet: once a batch takes longer than the fetcher's 0.1 s prefetch backoff (after a
# backlog), the next fetch asks only for the quiet partitions (the decisions topic), the broker
# holds it 1.5 s, and the busy partitions wait behind it. Measured at 200 receipts/s after a
# 20,000-receipt backlog: p50 1.1-1.5 s from publish to decision with Faust's value.
FETCH_MAX_WAIT_MS = 50


class _ReadCommittedThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # both read by the fetcher that start() creates
        consumer._isolation_level = "read_committed"
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class RawSchema(Schema):
    """Events whose key and value are the message's bytes, made without the serializer registry."""

    def __init__(self) -> None:
        super().__init__(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    def compile(self, app: Any, **kwargs: Any) -> Any:
        event_type = app.conf.Event  # looked up once, not per message

        async def decode(message: Any, *, propagate: bool = False) -> Any:
            return event_type(app, message.key, message.value, message.headers, message)

        return decode


class _Resumed:
    """Awaitable that goes on with a coroutine that was stepped once and yielded ``pending``."""

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        pending = self._pending
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # cancellation and errors go into the coroutine
                try:
                    pending = self._coro.throw(exc)
                except StopIteration as done:
                    return done.value
                continue
            try:
                pending = self._coro.send(sent)
            except StopIteration as done:
                return done.value


class _ReadCommittedConsumer(faust_aiokafka.Consumer):
    _held: set[Any] | None = None  # partitions to resume once recovery has finished (see the module doc)
    seek_delay_s = 0.0  # testing only: widens the window between resuming the inputs and the seek

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ReadCommittedThread(self, loop=self.loop, beacon=self.beacon)

    def hold_resumes(self) -> None:
        """From now on ``resume_partitions`` only notes its partitions, until ``release_resumes``."""
        self._held = set()

    def release_resumes(self, resume: bool) -> None:
        held, self._held = self._held or set(), None
        if resume and held:
            super().resume_partitions(held)

    def resume_partitions(self, tps: Any) -> None:
        if self._held is not None:
            self._held.update(tps)
        else:
            super().resume_partitions(tps)

    async def perform_seek(self) -> None:
        if self.seek_delay_s:
            await asyncio.sleep(self.seek_delay_s)
        await super().perform_seek()

    async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
        # a copy: pausing must not change the partitions of a fetch already waiting
        return await super()._getmany(None if active_partitions is None else set(active_partitions), timeout)

    async def wait_first(self, *coros: WaitArgT, timeout: Any = None) -> WaitResults:
        if (len(coros) == 2 and timeout is None and inspect.iscoroutine(coros[0])
                and inspect.iscoroutine(coros[1])
                and inspect.getcoroutinelocals(coros[1]).get("self") is self.suspend_flow
                and not (self.suspend_flow.is_set() or self._stopped.is_set() or self._crashed.is_set())):
            callback = coros[0]
            try:
                pending = callback.send(None)
            except StopIteration as done:  # handed over without waiting: the common case
                coros[1].close()
                return WaitResults([callback], [done.value], False)
            # It must wait (a full buffer, flow control): let a rebalance or a stop interrupt it.
            return await super().wait_first(_Resumed(callback, pending), coros[1])
        return await super().wait_first(*coros, timeout=timeout)


class ReadCommittedTransport(faust_aiokafka.Transport):
    Consumer = _ReadCommittedConsumer


def register(seek_delay_s: float = 0.0) -> None:
    """Make ``lotflow-kafka://`` URLs use this transport (``seek_delay_s``: testing only)."""
    drivers.TRANSPORTS[SCHEME] = f"{__name__}:ReadCommittedTransport"
    _ReadCommittedConsumer.seek_delay_s = seek_delay_s


class MarkerAwareRecovery(Recovery):
    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        consumer = self.app.consumer
        if not isinstance(consumer, _ReadCommittedConsumer):
            await super().on_recovery_completed(generation_id)
            return
        consumer.hold_resumes()
        resume = False
        try:
            await super().on_recovery_completed(generation_id)
            resume = self.app.consumer_generation_id == generation_id  # else a new rebalance owns them
        finally:
            consumer.release_resumes(resume)

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
