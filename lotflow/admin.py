"""Kafka administration on ``confluent_kafka.admin.AdminClient``: topics and offsets.

Uses only client APIs that work on Kafka 2.3 as well as on current brokers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from lotflow.kafka_clients import client_config
from lotflow.settings import Settings
from lotflow.streams.topics import TOPICS, TopicSpec

__all__ = [
    "TopicMismatchError",
    "committed_offsets",
    "consumer_lag",
    "create_topics",
    "delete_topics_with_prefix",
    "end_offsets",
]


class TopicMismatchError(RuntimeError):
    """An existing topic does not have the partition count its TopicSpec declares."""


def _admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def _metadata(admin: AdminClient, timeout: float) -> ClusterMetadata:
    return admin.list_topics(timeout=timeout)


def _partition_counts(md: ClusterMetadata) -> dict[str, int]:
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


def _check_partitions(wanted: dict[str, int], existing: dict[str, int]) -> None:
    wrong = {n: (existing[n], p) for n, p in wanted.items() if n in existing and existing[n] != p}
    if wrong:
        detail = "; ".join(f"{n} has {have} partitions, declared {want}"
                           for n, (have, want) in sorted(wrong.items()))
        raise TopicMismatchError(
            f"existing topics differ from their declaration ({detail}). Co-partitioned joins "
            "would silently break: delete and recreate these topics or fix settings.partitions."
        )


def _ready(md: ClusterMetadata, wanted: dict[str, int]) -> bool:
    for name, partitions in wanted.items():
        topic = md.topics.get(name)
        if topic is None or topic.error is not None or len(topic.partitions) != partitions:
            return False
        if any(p.leader < 0 for p in topic.partitions.values()):
            return False
    return True


def create_topics(
    settings: Settings, specs: Iterable[TopicSpec] = TOPICS, *, timeout: float = 60.0
) -> list[str]:
    """Create every declared topic that does not exist yet; return the names created.

    Idempotent. Raises :class:`TopicMismatchError` when an existing topic's partition count
    differs from its spec, and ``TimeoutError`` when metadata does not show every topic
    (with a leader for each partition) within ``timeout`` seconds.
    """
    specs = list(specs)
    wanted = {s.full_name(settings): s.partitions(settings) for s in specs}
    admin = _admin(settings)
    existing = _partition_counts(_metadata(admin, timeout))
    _check_partitions(wanted, existing)

    new = [
        NewTopic(
            s.full_name(settings),
            num_partitions=s.partitions(settings),
            replication_factor=settings.replication_factor,
            config=s.config(),
        )
        for s in specs
        if s.full_name(settings) not in existing
    ]
    created: list[str] = []
    if new:
        futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
        for name, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                err = exc.args[0]
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # created concurrently: its partitions are checked below
                raise
            created.append(name)

    deadline = time.monotonic() + timeout
    while True:
        md = _metadata(admin, max(1.0, deadline - time.monotonic()))
        _check_partitions(wanted, _partition_counts(md))
        if _ready(md, wanted):
            return sorted(created)
        if time.monotonic() >= deadline:
            missing = sorted(n for n in wanted if not _ready(md, {n: wanted[n]}))
            raise TimeoutError(f"topics not ready after {timeout:.0f} s: {', '.join(missing)}")
        time.sleep(0.2)


def delete_topics_with_prefix(
    settings: Settings, prefix: str, *, timeout: float = 60.0
) -> list[str]:
    """Delete every topic whose name starts with ``prefix`` (for tests); return their names.

    Waits until metadata no longer lists them. An empty prefix is refused.
    """
    if not prefix:
        raise ValueError("refusing to delete topics with an empty prefix (that is every topic)")
    admin = _admin(settings)
    names = sorted(n for n in _metadata(admin, timeout).topics if n.startswith(prefix))
    if not names:
        return []
    futures = admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
    for future in futures.values():
        try:
            future.result()
        except KafkaException as exc:
            err = exc.args[0]
            if not (isinstance(err, KafkaError)
                    and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
                raise
    deadline = time.monotonic() + timeout
    while True:
        left = [n for n in _metadata(admin, timeout).topics if n in names]
        if not left:
            return names
        if time.monotonic() >= deadline:
            raise TimeoutError(f"topics still listed {timeout:.0f} s after deletion: {left}")
        time.sleep(0.2)


def _consumer(settings: Settings, group: str | None) -> Consumer:
    conf: dict[str, Any] = client_config(settings, **{
        "group.id": group or f"lotflow-admin-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
    })
    return Consumer(conf)


def _partitions_of(consumer: Consumer, topic: str, timeout: float) -> list[int]:
    md = consumer.list_topics(topic, timeout=timeout)
    tmd = md.topics.get(topic)
    if tmd is None or tmd.error is not None:
        reason = tmd.error if tmd is not None else "not in metadata"
        raise KeyError(f"topic {topic!r} is unknown: {reason}")
    return sorted(tmd.partitions)


def end_offsets(settings: Settings, topic: str, *, timeout: float = 10.0) -> dict[int, int]:
    """High watermark (the offset the next record will get) of every partition of ``topic``."""
    consumer = _consumer(settings, None)
    try:
        result: dict[int, int] = {}
        for p in _partitions_of(consumer, topic, timeout):
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            result[p] = high
        return result
    finally:
        consumer.close()


def committed_offsets(
    settings: Settings, group: str, topic: str, *, timeout: float = 10.0
) -> dict[int, int]:
    """The offsets ``group`` committed on each partition of ``topic``.

    Every partition is present; one without a committed offset maps to 0 (nothing
    consumed yet). The group is not joined: this reads offsets, it does not rebalance.
    """
    consumer = _consumer(settings, group)
    try:
        parts = [TopicPartition(topic, p) for p in _partitions_of(consumer, topic, timeout)]
        committed = consumer.committed(parts, timeout=timeout)
        result: dict[int, int] = {}
        for tp in committed:
            if tp.error is not None:
                raise KafkaException(tp.error)
            result[tp.partition] = max(tp.offset, 0)  # OFFSET_INVALID (-1001): none committed
        return result
    finally:
        consumer.close()


def consumer_lag(
    settings: Settings, group: str, topic: str, *, timeout: float = 10.0
) -> dict[int, int]:
    """End offset minus committed offset, per partition of ``topic``, for ``group``."""
    ends = end_offsets(settings, topic, timeout=timeout)
    committed = committed_offsets(settings, group, topic, timeout=timeout)
    return {p: end - committed.get(p, 0) for p, end in ends.items()}
