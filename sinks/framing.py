"""Kafka values as Avro object containers for ClickHouse's ``Avro`` input format.

A value written with its topic's own schema is a Confluent-framed Avro record: a 5-byte
header (magic byte 0 + schema id), then the Avro body. The sink sends such values to
ClickHouse unchanged: each becomes one record of a container whose schema is the kafka_*
fields, the 5-byte header as a ``fixed`` (no column takes it, so ClickHouse skips it), then
the topic schema's fields. One record per block, so a malformed value fails its own block
instead of shifting the records after it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from lotflow.schemas.compiled_writer import avro_long

__all__ = [
    "CONFLUENT_HEADER",
    "avro_container",
    "avro_long",
    "avro_string",
    "container_block",
    "container_header",
]

CONFLUENT_HEADER = struct.Struct(">bI")  # magic byte 0, schema id


_KAFKA_FIELDS = [
    {"name": "kafka_topic", "type": "string"},
    {"name": "kafka_partition", "type": "int"},
    {"name": "kafka_offset", "type": "long"},
    {"name": "ingested_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
]

_HEADER_FIELD = {
    "name": "confluent_header",
    "type": {"type": "fixed", "name": "ConfluentHeader", "namespace": "lotflow.sink", "size": 5},
}


def avro_string(text: str) -> bytes:
    raw = text.encode()
    return avro_long(len(raw)) + raw


def container_header(schema: Mapping[str, Any], sync: bytes) -> bytes:
    """Avro object container header whose records are: the kafka_* fields, the 5-byte
    Confluent header, then the fields of ``schema`` — so a Kafka value is used as is,
    without copying its body."""
    wrapped = dict(schema)
    wrapped["fields"] = [*_KAFKA_FIELDS, _HEADER_FIELD, *schema["fields"]]
    meta = {"avro.schema": orjson.dumps(wrapped), "avro.codec": b"null"}
    entries = b"".join(avro_string(k) + avro_long(len(v)) + v for k, v in meta.items())
    return b"Obj\x01" + avro_long(len(meta)) + entries + avro_long(0) + sync


def container_block(topic_partition: bytes, offset: int, ingested: bytes, value: bytes) -> bytes:
    """The start of a one-record block (count, size, kafka_* fields); ``value`` and the sync
    marker follow it. ``ingested`` is ``avro_long(ingested_ms)``."""
    fields = topic_partition + avro_long(offset) + ingested
    return b"\x02" + avro_long(len(fields) + len(value)) + fields


def avro_container(
    header: bytes, sync: bytes, topic_partition: bytes, values: Iterable[tuple[bytes, int, int]]
) -> bytes:
    """An Avro object container of Confluent-framed ``(value, offset, ingested_ms)``
    (``topic_partition``: the encoded kafka_topic and kafka_partition)."""
    parts = [header]
    for value, offset, ingested_ms in values:
        parts += (container_block(topic_partition, offset, avro_long(ingested_ms), value), value, sync)
    return b"".join(parts)
