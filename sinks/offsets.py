"""The sink group's offsets: commit after insert, the lag metric, and "caught up".

An offset is committed only after everything before it is in ClickHouse, and it is the
consumer's *position* (the next offset it will return), not ``last record + 1``: under
``read_committed`` a topic written in transactions has commit/abort markers and aborted
records the consumer skips, and the position lies past them. So after a drain the group's
committed offsets equal the partitions' end offsets, markers included, and lag reads 0.
A partition whose batch was given up is *blocked*: nothing is committed past it until a
rebalance (its next owner reads it again).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from lotflow.metrics import SinkMetrics
from lotflow.sinks.batches import Key

__all__ = ["Offsets"]

log = logging.getLogger(__name__)

_KAFKA_TIMEOUT_S = 10.0


class Offsets:
    """What the sink committed per partition, kept on the consumer's thread."""

    def __init__(self, metrics: SinkMetrics) -> None:
        self._metrics = metrics
        self.committed: dict[Key, int] = {}
        self.blocked: set[Key] = set()  # a batch was given up: commit nothing after it

    def clear(self) -> None:
        self.committed.clear()
        self.blocked.clear()

    def forget(self, key: Key) -> None:
        """The partition was revoked."""
        self.committed.pop(key, None)
        self.blocked.discard(key)
        with contextlib.suppress(KeyError):  # never measured
            self._metrics.consumer_lag.remove(key[0], str(key[1]))

    def positions(self, consumer: Consumer, keys: Iterable[Key]) -> dict[Key, int]:
        """The consumer's position per partition (negative when it has none yet)."""
        tps = consumer.position([TopicPartition(t, p) for t, p in keys])
        return {(tp.topic, tp.partition): tp.offset for tp in tps}

    def commit(self, consumer: Consumer, key: Key, offset: int) -> bool:
        """Commit ``offset`` synchronously; False (and logged) when the broker refused it."""
        topic, partition = key
        try:
            result = consumer.commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
            errors = [tp.error for tp in result or () if tp.error is not None]
            if errors:
                raise KafkaException(errors[0])
        except KafkaException as exc:
            # The rows are written; whoever re-reads them is deduplicated by ClickHouse.
            log.warning("sink: commit %s[%d]@%d failed: %s", topic, partition, offset, exc)
            return False
        self.committed[key] = offset
        return True

    def _known_committed(self, consumer: Consumer, keys: Iterable[Key]) -> None:
        unknown = [TopicPartition(t, p) for t, p in keys if (t, p) not in self.committed]
        if not unknown:
            return
        for tp in consumer.committed(unknown, timeout=_KAFKA_TIMEOUT_S):
            if tp.error is None:
                self.committed[(tp.topic, tp.partition)] = max(tp.offset, -1)

    @staticmethod
    def _watermarks(consumer: Consumer, keys: Iterable[Key]) -> dict[Key, tuple[int, int]]:
        """Low and end offsets (the last stable offset under read_committed) per partition.

        The values cached from the consumer's own fetch responses: asking the broker would
        queue behind the long-polling fetch on the same connection (~0.5 s a partition).
        Unknown (before the first fetch response) is negative.
        """
        return {(t, p): consumer.get_watermark_offsets(TopicPartition(t, p), cached=True) for t, p in keys}

    def update_lag(self, consumer: Consumer, assigned: Iterable[Key]) -> None:
        """Set ``lotflow_sink_consumer_lag``: end offset minus committed offset."""
        keys = sorted(assigned)
        try:
            self._known_committed(consumer, keys)
            marks = self._watermarks(consumer, keys)
        except KafkaException as exc:
            log.warning("sink: could not read offsets for the lag metric: %s", exc)
            return
        for key, (low, high) in marks.items():
            if high < 0:
                continue  # not fetched yet
            done = self.committed.get(key, -1)
            lag = high - (done if done >= 0 else max(low, 0))
            self._metrics.consumer_lag.labels(key[0], str(key[1])).set(max(lag, 0))

    def caught_up(self, consumer: Consumer, assigned: Iterable[Key]) -> bool:
        """Nothing buffered (the caller checks): is every assigned partition committed to its end?

        Also commits the consumer's position where it is past the committed offset: only
        records the consumer skipped (transaction markers, aborted records) lie between them
        then, e.g. a commit marker that arrived after the partition's last batch was sealed.
        """
        keys = sorted(assigned)
        if not keys:
            return False
        try:
            self._known_committed(consumer, keys)
            marks = self._watermarks(consumer, keys)
            positions = self.positions(consumer, keys)
        except KafkaException as exc:
            log.debug("sink: caught-up check failed: %s", exc)
            return False
        done = True
        for key, position in positions.items():
            low, high = marks[key]
            committed = self.committed.get(key, -1)
            if (
                position > committed
                and position >= 0
                and key not in self.blocked
                and self.commit(consumer, key, position)
            ):
                committed = position
            if high < 0 or (committed < high and not 0 <= high <= low):
                done = False  # end unknown yet, or records left (an emptied partition is done)
        return done
