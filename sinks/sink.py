"""The sink's consumer loop: output topics + decisions → ClickHouse, commit after insert.

A confluent-kafka consumer (``read_committed``, no auto-commit) buffers records per
topic-partition (``sinks/batches.py``) and seals a partition's batch when it holds
``sink_batch_rows`` records or its oldest is ``sink_batch_s`` old. Sealed batches are
inserted on one writer thread, in order (``sinks/writer.py``, retried forever with back-off,
``sinks/retry.py``), while this thread reads on; a batch's offset — the consumer's position
after it — is committed synchronously only after all its inserts succeeded
(``sinks/offsets.py``). Meanwhile the consumer stays in its group: it keeps polling, with
no more read while two batches' worth of records wait for the writer (it waits for the
oldest write; once no write has finished for ``_PAUSE_AFTER_S``, it pauses and polls on). Partitions
revoked by a rebalance drop their buffered records: they were not committed, so whoever
owns the partition next reads them again, and ClickHouse drops the replayed inserts by
their tokens (any other replay is collapsed by the ``ReplacingMergeTree`` tables).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from lotflow.kafka_clients import client_config
from lotflow.metrics import SinkMetrics
from lotflow.settings import Settings
from lotflow.sinks.batches import Batch, Key, routes
from lotflow.sinks.offsets import Offsets
from lotflow.sinks.retry import Retry
from lotflow.sinks.rows import TABLES, TableSpec
from lotflow.sinks.writer import BatchWriter
from lotflow.streams.topics import TopicSpec

__all__ = ["ClickHouseSink", "SinkProgress"]

log = logging.getLogger(__name__)

_LAG_INTERVAL_S = 5.0
_IDLE_CHECK_S = 0.2
_MAX_CONSUME = 10_000
_PAUSE_AFTER_S = 2.0  # no write finished for this long (an insert takes ~0.2-0.6 s): pause and poll on


@dataclass(frozen=True)
class SinkProgress:
    """Reported to ``on_progress`` after each committed flush."""

    topic: str
    partition: int
    table: str
    rows: int
    rejects: int
    committed_offset: int


class ClickHouseSink:
    """Consume the output topics and decisions into ClickHouse; see the module docstring.

    ``decode_in_clickhouse``: send values written with their topic's own schema to
    ClickHouse as Avro (the fast path); else decode every value in Python.
    ``consumer_config``: librdkafka settings over the sink's own (tests).
    """

    def __init__(
        self,
        settings: Settings,
        client: Client,
        metrics: SinkMetrics,
        registry: Mapping[TopicSpec, TableSpec] = TABLES,
        *,
        decode_in_clickhouse: bool = True,
        consumer_config: Mapping[str, Any] | None = None,
    ) -> None:
        self._settings = settings
        self._db = settings.clickhouse_database
        self._consumer_config = dict(consumer_config or {})
        self._routes = routes(settings, registry, decode_in_clickhouse=decode_in_clickhouse)
        self._retry = Retry(settings.sink_max_retry_s)
        self._writer = BatchWriter(client, self._db, metrics, self._retry)
        self._offsets = Offsets(metrics)
        self._batches: dict[Key, Batch] = {}  # open, filling
        self._pending: deque[tuple[Batch, Future[bool]]] = deque()  # sealed, in write order
        self._pending_records = 0
        self._max_pending = 2 * settings.sink_batch_rows
        self._paused = False
        self._behind_since: float | None = None  # since when the writer is behind
        self._assigned: set[Key] = set()
        self._caught_up = False
        self._on_progress: Callable[[SinkProgress], None] | None = None

    # ----------------------------------------------------------------- public

    @property
    def topics(self) -> list[str]:
        return sorted(self._routes)

    def buffered(self) -> int:
        """Records consumed but not yet committed (buffered or being written)."""
        batches = list(self._batches.values()) + [b for b, _ in list(self._pending)]
        return sum(b.size for b in batches)

    def caught_up(self) -> bool:
        """True once every assigned partition is committed up to its end offset and
        nothing is buffered (refreshed while the sink is idle). Thread-safe to read."""
        return self._caught_up

    def consumer_settings(self) -> dict[str, Any]:
        """The consumer's librdkafka configuration (connection and security from the settings)."""
        return client_config(
            self._settings,
            **{
                "group.id": self._settings.sink_group,
                "client.id": "lotflow-clickhouse-sink",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "max.partition.fetch.bytes": 8 << 20,  # fewer, larger fetches: ~20 % faster here
                # librdkafka stops fetching for this long once its queue holds queued.min.messages
                # (100k): its default, 1 s, held the sink at ~90k rows/s on a day the engine
                # inserted 200k (20 ms: +12 %)
                "fetch.queue.backoff.ms": 20,
                **self._consumer_config,
            },
        )

    def run(self, stop: threading.Event, on_progress: Callable[[SinkProgress], None] | None = None) -> None:
        """Consume until ``stop`` is set; then flush what is buffered, commit, and close."""
        self._on_progress = on_progress
        self._reset()
        consumer = Consumer(self.consumer_settings())
        consumer.subscribe(
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink-writer")
        log.info("sink: %d topics → ClickHouse database %s", len(self._routes), self._db)
        poll_s = min(0.1, self._settings.sink_batch_s)
        consume_n = max(1, min(self._settings.sink_batch_rows, _MAX_CONSUME))
        next_lag = next_idle = 0.0
        try:
            while not stop.is_set():
                if self._backpressure(consumer, poll_s):
                    msgs = []
                else:
                    msgs = consumer.consume(num_messages=consume_n, timeout=poll_s)
                if msgs:
                    self._caught_up = False
                    self._add(msgs)
                self._commit_written(consumer)
                self._seal(consumer, writer, force=False)
                now = time.monotonic()
                if now >= next_lag:
                    self._offsets.update_lag(consumer, self._assigned)
                    next_lag = now + _LAG_INTERVAL_S
                if not msgs and not self._batches and not self._pending and now >= next_idle:
                    self._caught_up = self._offsets.caught_up(consumer, self._assigned)
                    next_idle = now + _IDLE_CHECK_S
            # Graceful stop: write what is buffered (retrying for up to sink_max_retry_s).
            self._retry.stop(self._settings.sink_max_retry_s)
            self._seal(consumer, writer, force=True)
            while self._pending:
                wait([self._pending[0][1]])
                self._commit_written(consumer)
        finally:
            self._retry.abort()  # on an error: the writer gives up at once
            writer.shutdown(wait=True, cancel_futures=True)
            left = self.buffered()
            if left:
                log.warning("sink: stopping with %d records not committed (they will be read again)", left)
            self._reset()
            consumer.close()
            log.info("sink: stopped")

    # ----------------------------------------------------------------- consuming

    def _reset(self) -> None:
        self._batches.clear()
        self._pending.clear()
        self._pending_records = 0
        self._paused = False
        self._behind_since = None
        self._assigned.clear()
        self._offsets.clear()
        self._caught_up = False
        self._retry.reset()

    def _add(self, msgs: Sequence[Message]) -> None:
        batches = self._batches
        for msg in msgs:
            err = msg.error()
            if err is not None:
                self._on_consumer_error(err)
                continue
            topic = msg.topic()
            partition = msg.partition()
            offset = msg.offset()
            if topic is None or partition is None or offset is None:
                continue
            key = (topic, partition)
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = Batch(
                    self._routes[topic], partition, offset, time.monotonic(), time.time_ns() // 1_000_000
                )
            batch.add(msg, offset)

    def _on_consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        log.warning("sink: consumer error: %s", err)

    def _backpressure(self, consumer: Consumer, poll_s: float) -> bool:
        """Whether to skip reading this round because the writer is behind.

        First wait for its oldest write: pausing the partitions would make librdkafka drop what
        it prefetched, to fetch it again (the sink drained 0.5 x the bare insert that way, 0.9 x
        now). Once no write has finished for ``_PAUSE_AFTER_S`` (ClickHouse down, retrying), pause
        and read on, so the consumer keeps polling: it stays in its group and a rebalance waits
        for it at most that long.
        """
        if self._pending_records < self._max_pending:
            self._behind_since = None
            if self._paused:
                consumer.resume(consumer.assignment())
                self._paused = False
            return False
        now = time.monotonic()
        if self._behind_since is None:
            self._behind_since = now
        if now - self._behind_since < _PAUSE_AFTER_S and self._pending:
            wait([self._pending[0][1]], timeout=poll_s)
            return True
        consumer.pause(consumer.assignment())  # again: partitions may have been assigned
        self._paused = True
        return False

    # ----------------------------------------------------------------- rebalance

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        self._caught_up = False

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        dropped = 0
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        for key in revoked:
            self._assigned.discard(key)
            self._offsets.forget(key)
            batch = self._batches.pop(key, None)
            if batch is not None:
                dropped += batch.size
        for batch, _ in self._pending:
            if batch.key in revoked and not batch.abandoned:
                batch.abandoned = True  # its insert may still land: replays are deduplicated
                dropped += batch.size
        self._caught_up = False
        if dropped:
            log.info(
                "sink: %d partitions revoked, %d uncommitted records dropped (re-read by their next owner)",
                len(partitions),
                dropped,
            )

    # ----------------------------------------------------------------- writing

    def _seal(self, consumer: Consumer, writer: ThreadPoolExecutor, *, force: bool) -> None:
        """Hand the due batches (all of them if ``force``) to the writer thread.

        A sealed batch holds every record of its partition the consumer returned so far, so
        the consumer's position now is where the partition continues after it: past the
        transaction markers and aborted records behind its last record that the consumer
        has already skipped. That position is what gets committed once it is written.
        """
        max_rows, max_age = self._settings.sink_batch_rows, self._settings.sink_batch_s
        now = time.monotonic()
        due = [b for b in self._batches.values() if force or b.size >= max_rows or now - b.started >= max_age]
        if not due:
            return
        try:
            positions = self._offsets.positions(consumer, [b.key for b in due])
        except KafkaException as exc:  # then last + 1; the idle check commits past the markers
            log.debug("sink: no consumer positions: %s", exc)
            positions = {}
        for batch in due:
            del self._batches[batch.key]
            batch.end = max(positions.get(batch.key, -1), batch.last + 1)
            size = batch.size  # before the writer thread starts on it (decoding moves its records)
            self._pending.append((batch, writer.submit(self._writer.write, batch)))
            self._pending_records += size

    def _commit_written(self, consumer: Consumer) -> None:
        """Commit the batches the writer finished, in order."""
        blocked = self._offsets.blocked
        while self._pending and self._pending[0][1].done():
            batch, future = self._pending.popleft()
            self._pending_records -= batch.size
            self._behind_since = None  # a write finished: the writer is slow at most, not stuck
            try:
                written = future.result()
            except Exception:  # the writer only returns; be safe anyway
                log.exception("sink: writer failed")
                written = False
            key = batch.key
            if batch.abandoned:
                continue
            if not written or key in blocked:
                blocked.add(key)  # never commit past a batch that was not written
                continue
            if self._offsets.commit(consumer, key, batch.end) and self._on_progress is not None:
                self._on_progress(
                    SinkProgress(
                        batch.route.topic,
                        batch.partition,
                        batch.route.table.table,
                        batch.written,
                        len(batch.rejects),
                        batch.end,
                    )
                )
