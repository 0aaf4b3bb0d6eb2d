"""The worker's output path: Avro-encode and produce through librdkafka, not Faust's producer.

Faust's own send path (aiokafka, a future per message) costs far more than the work; the
agent produces here and calls ``flush`` before it asks for the next batch, so Faust acks and
commits an input only after its outputs and state changes are on the broker.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaException, Producer

from lotflow.schemas.serde import AvroCodec, SchemaSource
from lotflow.settings import Settings
from lotflow.streams.topics import TopicSpec

__all__ = ["OutputProducer", "producer_config"]


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        # Java clients, aiokafka and Faust hash keys with murmur2; librdkafka's default (CRC32)
        # would put the same key on another partition and break co-partitioned joins.
        "partitioner": "murmur2_random",
        "enable.idempotence": True,
        "linger.ms": 2,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500000,
    }
    config.update(overrides)
    return config


class OutputProducer:
    def __init__(self, settings: Settings, source: SchemaSource, producer: Producer | None = None) -> None:
        self._settings = settings
        self._source = source
        self._producer = producer or Producer(producer_config(settings))
        self._codecs: dict[str, tuple[str, AvroCodec]] = {}
        self._errors: list[str] = []

    def codec(self, spec: TopicSpec) -> tuple[str, AvroCodec]:
        entry = self._codecs.get(spec.name)
        if entry is None:
            topic = spec.full_name(self._settings)
            entry = self._codecs[spec.name] = (topic, AvroCodec(self._source, f"{topic}-value", spec.schema))
        return entry

    def send(self, spec: TopicSpec, key: str, record: dict[str, Any]) -> None:
        topic, codec = self.codec(spec)
        self._produce(topic, key.encode(), codec.encode(record), None)

    def send_raw(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
        self._produce(topic, key, value, partition)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def _produce(self, topic: str, key: bytes, value: bytes | None, partition: int | None) -> None:
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": self._on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until everything produced is acknowledged; raise if anything failed."""
        remaining = self._producer.flush(timeout)
        if remaining:
            raise KafkaException(f"{remaining} messages not delivered within {timeout}s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise KafkaException(f"{len(errors)} deliveries failed, first: {errors[0]}")
