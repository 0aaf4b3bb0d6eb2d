"""Reference data every worker needs whole: the material specs.

Specs are keyed by material, not by PO, so they cannot be co-partitioned with receipts.
Each worker reads the whole compacted spec topic (all partitions, no consumer group) before
it starts and keeps polling it; a receipt whose spec is not known yet waits like any
missing document.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from lotflow.kafka_clients import client_config
from lotflow.schemas.serde import AvroCodec, DecodeError, SchemaSource
from lotflow.settings import Settings
from lotflow.streams.topics import MATERIAL_SPECS
from lotflow.verification.validation import InvalidRecord, validate_spec

__all__ = ["SpecCache", "normalize_spec"]

Record = dict[str, Any]


def normalize_spec(spec: Record) -> Record:
    """The spec as the checks use it; impossible limits raise ``InvalidRecord`` (a dead letter)."""
    return validate_spec(spec)


class SpecCache:
    def __init__(self, settings: Settings, source: SchemaSource,
                 on_bad_record: Callable[[Any, Exception], None] | None = None) -> None:
        self.topic = MATERIAL_SPECS.full_name(settings)
        self.specs: dict[str, Record] = {}
        self._codec = AvroCodec(source, f"{self.topic}-value", MATERIAL_SPECS.schema)
        self._on_bad = on_bad_record
        self._consumer = Consumer(client_config(
            settings,
            **{"group.id": f"{settings.app_id}-specs-unused",  # required by librdkafka; never committed
               "enable.auto.commit": False, "enable.partition.eof": False,
               "isolation.level": "read_committed"}))
        partitions = MATERIAL_SPECS.partitions(settings)
        self._tps = [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(partitions)]
        self._consumer.assign(self._tps)

    def load(self, timeout: float = 60.0) -> int:
        """Read up to the end offsets seen now; returns the number of specs."""
        ends = {tp.partition: self._consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in self._tps}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            positions = {tp.partition: tp.offset for tp in self._consumer.position(self._tps)}
            if all(end == 0 or positions.get(p, -1) >= end for p, end in ends.items()):
                return len(self.specs)
            self._apply(self._consumer.consume(10000, timeout=0.2))
        raise TimeoutError(f"material specs not loaded from {self.topic} within {timeout}s")

    def poll(self) -> int:
        """Apply whatever arrived since; never blocks."""
        messages = self._consumer.consume(10000, timeout=0)
        self._apply(messages)
        return len(messages)

    def _apply(self, messages: list[Any]) -> None:
        for msg in messages:
            if msg.error():
                continue
            if msg.value() is None:  # compaction tombstone: the spec was withdrawn
                self.specs.pop((msg.key() or b"").decode(), None)
                continue
            try:
                spec = normalize_spec(self._codec.decode(msg.value()))
            except (DecodeError, InvalidRecord, KeyError, TypeError) as exc:
                if self._on_bad is not None:
                    self._on_bad(msg, exc)
                continue
            current = self.specs.get(spec["material_id"])
            if current is None or current["revision"] <= spec["revision"]:
                self.specs[spec["material_id"]] = spec

    def close(self) -> None:
        self._consumer.close()
