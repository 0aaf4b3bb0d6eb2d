"""The local broker and lotflow.admin against a real Kafka: topics, partitioning, offsets."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource
from pydantic import SecretStr

from lotflow import localkafka
from lotflow.admin import (
    TopicMismatchError,
    committed_offsets,
    consumer_lag,
    create_topics,
    end_offsets,
)
from lotflow.kafka_clients import client_config, produce, producer_config
from lotflow.settings import Settings
from lotflow.streams.topics import RECEIPTS, TOPICS, Cleanup

TopicSetFactory = Callable[..., Settings]  # the `topic_set` fixture, see conftest.py


def java_murmur2_partition(key: bytes, partitions: int) -> int:
    """Partition the Java client (and aiokafka, Faust) chooses for ``key``."""
    m, r = 0x5BD1E995, 24
    length = len(key)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(key[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length & ~3
    extra = length % 4
    if extra >= 3:
        h ^= key[tail + 2] << 16
    if extra >= 2:
        h ^= key[tail + 1] << 8
    if extra >= 1:
        h ^= key[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


def test_murmur2_helper_matches_java() -> None:
    # Values of Kafka's Java DefaultPartitioner with 1000 partitions (kafka-python's test).
    expected = {b"": 681, b"a": 524, b"ab": 434, b"abc": 107, b"123456789": 566, b"\x00 ": 742}
    assert {k: java_murmur2_partition(k, 1000) for k in expected} == expected


def test_create_topics_is_idempotent(topic_set: TopicSetFactory) -> None:
    settings = topic_set(create=False)
    names = sorted(spec.full_name(settings) for spec in TOPICS)

    assert create_topics(settings) == names
    assert create_topics(settings) == []  # second time: nothing new, no error

    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    md = admin.list_topics(timeout=10)
    for spec in TOPICS:
        topic = md.topics[spec.full_name(settings)]
        assert len(topic.partitions) == spec.partitions(settings), spec.name
    assert len(md.topics[RECEIPTS.full_name(settings)].partitions) == settings.partitions

    resources = [ConfigResource("topic", spec.full_name(settings)) for spec in TOPICS]
    for spec, future in zip(TOPICS, admin.describe_configs(resources).values(), strict=True):
        config = future.result()
        assert config["cleanup.policy"].value == spec.cleanup.value, spec.name
        if spec.cleanup is Cleanup.DELETE:
            assert config["retention.ms"].value == str(spec.retention_ms), spec.name


def test_mismatched_partition_count_raises(topic_set: TopicSetFactory) -> None:
    settings = topic_set([RECEIPTS])
    wider = settings.model_copy(update={"partitions": settings.partitions + 2})

    with pytest.raises(TopicMismatchError, match=RECEIPTS.full_name(settings)):
        create_topics(wider, [RECEIPTS])


def test_produce_consume_round_trip(topic_set: TopicSetFactory) -> None:
    settings = topic_set([RECEIPTS])
    topic = RECEIPTS.full_name(settings)
    partitions = RECEIPTS.partitions(settings)
    sent = {f"PO-{i:05d}".encode(): f"receipt {i}".encode() for i in range(300)}

    # the project's producer settings: murmur2_random, the Java clients' partitioner
    producer = Producer(producer_config(settings, **{"linger.ms": 5}))
    for key, value in sent.items():
        produce(producer, topic, key, value)
    assert producer.flush(30) == 0

    assert sum(end_offsets(settings, topic).values()) == len(sent)

    group = f"{settings.app_id}-round-trip"
    consumer = Consumer(client_config(settings, **{
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }))
    received: dict[bytes, tuple[bytes, int]] = {}
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(received) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got_key, got_value, partition = msg.key(), msg.value(), msg.partition()
            assert got_key is not None and got_value is not None and partition is not None
            received[got_key] = (got_value, partition)
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()

    assert {k: v for k, (v, _) in received.items()} == sent
    # Each key landed where a Java/aiokafka/Faust producer would have put it.
    assert {k: p for k, (_, p) in received.items()} == {
        k: java_murmur2_partition(k, partitions) for k in sent
    }
    assert len({p for _, p in received.values()}) == partitions
    assert committed_offsets(settings, group, topic) == end_offsets(settings, topic)
    assert set(consumer_lag(settings, group, topic).values()) == {0}


# --- SASL listener options (refused before anything starts) ------------------------------------


def test_sasl_port_needs_a_user(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path, kafka_port=9593, zookeeper_port=2681).model_copy(
        update={"kafka_sasl_port": 9594})  # model_copy skips validation, like `kafka start --sasl-port`
    with pytest.raises(localkafka.LocalKafkaError, match="LOTFLOW_KAFKA_SASL_USERNAME"):
        localkafka.start(settings)
    assert not (tmp_path / "kafka").exists()


@pytest.mark.parametrize("password", ['with"quote', "with,comma", "with space", "with]bracket"])
def test_sasl_password_the_jaas_file_cannot_carry_is_refused(tmp_path: Path, password: str) -> None:
    settings = Settings(var_dir=tmp_path, kafka_port=9593, zookeeper_port=2681, kafka_sasl_port=9594,
                        kafka_sasl_username="lotflow", kafka_sasl_password=SecretStr(password))
    with pytest.raises(localkafka.LocalKafkaError, match="must not contain") as exc:
        localkafka.start(settings)
    assert password not in str(exc.value)


def test_sasl_port_must_differ(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path, kafka_port=9593, zookeeper_port=2681, kafka_sasl_port=9593,
                        kafka_sasl_username="lotflow", kafka_sasl_password=SecretStr("pw"))
    with pytest.raises(localkafka.LocalKafkaError, match="must differ"):
        localkafka.start(settings)


def test_running_broker_without_sasl_listener_is_reported(kafka_settings: Settings) -> None:
    """The session's broker has no SASL listener: asking for one must say so, not pretend."""
    if localkafka.port_open(9595):
        pytest.skip("port 9595 is taken")
    settings = kafka_settings.model_copy(update={
        "kafka_sasl_port": 9595, "kafka_sasl_username": "u", "kafka_sasl_password": SecretStr("p")})
    with pytest.raises(localkafka.LocalKafkaError, match="no SASL listener"):
        localkafka.start(settings)
