"""A decision's inputs read back from Kafka by their refs (topic, partition, offset).

Exceptions carry the refs of every input that went into them (the receipt, the PO revision in
force, the certificates); the detail page reads those records back rather than keeping copies
in ClickHouse. Inputs live as long as their topic's retention (30 days by default): an older
exception shows its stored reasons and evidence without the side-by-side view.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from lotflow.kafka_clients import client_config
from lotflow.schemas.serde import AvroCodec, DecodeError, schema_source
from lotflow.settings import Settings
from lotflow.streams import topics

__all__ = ["InputReader"]

CACHE_SIZE = 2048
READ_TIMEOUT_S = 3.0


class InputReader:
    """Thread-safe (one consumer behind a lock); decoded records cached by ref."""

    def __init__(self, settings: Settings) -> None:
        source = schema_source(settings.schema_registry_url)
        self._codecs = {spec.full_name(settings): (spec.name, AvroCodec(source, f"{spec.full_name(settings)}-value",
                                                                         spec.schema))
                        for spec in topics.INPUTS}
        self._consumer = Consumer(client_config(settings, **{
            "group.id": f"{settings.app_id}-review-inputs",  # required by librdkafka; never committed
            "enable.auto.commit": False, "enable.partition.eof": False, "isolation.level": "read_committed"}))
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int, int], tuple[str, dict[str, Any]] | None] = OrderedDict()

    def read(self, refs: Iterable[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        """(input topic's short name, record) per ref that can still be read, in ref order."""
        out = []
        for ref in refs:
            key = (str(ref["topic"]), int(ref["partition"]), int(ref["offset"]))
            if key[0] not in self._codecs:
                continue
            with self._lock:
                if key not in self._cache:
                    self._cache[key] = self._fetch(*key)
                    if len(self._cache) > CACHE_SIZE:
                        self._cache.popitem(last=False)
                found = self._cache[key]
            if found is not None:
                out.append(found)
        return out

    def _fetch(self, topic: str, partition: int, offset: int) -> tuple[str, dict[str, Any]] | None:
        self._consumer.assign([TopicPartition(topic, partition, offset)])
        try:
            for msg in self._consumer.consume(1, timeout=READ_TIMEOUT_S):
                if msg.error() or msg.offset() != offset or msg.value() is None:
                    return None  # expired (the next record came back) or a tombstone
                name, codec = self._codecs[topic]
                try:
                    return name, codec.decode(msg.value())
                except DecodeError:
                    return None
            return None
        finally:
            self._consumer.unassign()

    def close(self) -> None:
        self._consumer.close()
