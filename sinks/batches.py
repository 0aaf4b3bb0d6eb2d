"""Per-partition batches: the consecutive records of one partition that one flush writes.

A batch knows its routing (topic → table, codec, whether ClickHouse decodes its Avro), holds
its records in the form they are inserted (raw values in an Avro container for the fast
path, mapped rows, rejects), and names its insert: ``token`` is the deduplication token
``"{topic}:{partition}:{first}-{last}"``, so a re-delivered batch is dropped by ClickHouse.
``end`` is the offset committed once it is written: the consumer's position after its last
record, which lies past any transaction marker that follows it (see ``sinks/sink.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import Message

from lotflow.schemas.serde import AvroCodec, DecodeError, bundled_schema_json, schema_source
from lotflow.settings import Settings
from lotflow.sinks.framing import CONFLUENT_HEADER, avro_long, avro_string, container_block, container_header
from lotflow.sinks.rows import Row, TableSpec, reject_row
from lotflow.streams.topics import TopicSpec

__all__ = ["Batch", "Key", "Route", "routes"]

Key = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True)
class Route:
    """Where one topic's records go and how they are decoded."""

    topic: str
    table: TableSpec
    codec: AvroCodec
    header: bytes  # Confluent header of values written with this topic's own schema
    fast: bool  # send those values to ClickHouse as Avro (TableSpec.avro_table)
    container_header: bytes
    topic_field: bytes  # Avro-encoded kafka_topic
    sync: bytes  # the container's sync marker


def routes(
    settings: Settings, registry: Mapping[TopicSpec, TableSpec], *, decode_in_clickhouse: bool
) -> dict[str, Route]:
    """A route per topic of ``registry`` (full topic name → route)."""
    sync = os.urandom(16)
    source = schema_source(settings.schema_registry_url)
    out: dict[str, Route] = {}
    for spec, table in registry.items():
        topic = settings.topic(spec.name)
        codec = AvroCodec(source, f"{topic}-value", spec.schema)
        out[topic] = Route(
            topic=topic,
            table=table,
            codec=codec,
            header=CONFLUENT_HEADER.pack(0, codec.schema_id),
            fast=decode_in_clickhouse and table.avro_table is not None,
            container_header=container_header(bundled_schema_json(spec.schema), sync),
            topic_field=avro_string(topic),
            sync=sync,
        )
    return out


@dataclass
class Batch:
    """Consecutive records of one partition, written by one flush."""

    route: Route
    partition: int
    first: int
    started: float  # monotonic
    ingested_ms: int  # wall clock when the batch was opened: its rows' ingested_at
    last: int = -1
    end: int = -1  # offset to commit once written (set when sealed); at least last + 1
    raw: list[Message] = field(default_factory=list)  # values ClickHouse decodes
    blocks: list[bytes] = field(default_factory=list)  # their Avro container (fast path)
    rows: list[Row] = field(default_factory=list)
    rejects: list[Row] = field(default_factory=list)
    written: int = 0  # rows that went to the topic's table
    done: set[str] = field(default_factory=set)  # inserts already accepted (on retries)
    abandoned: bool = False  # revoked: never commit it
    ingested_at: datetime = field(init=False)
    ingested: bytes = field(init=False)  # ingested_ms as an Avro long
    topic_partition: bytes = field(init=False)  # kafka_topic and kafka_partition, Avro

    def __post_init__(self) -> None:
        self.ingested_at = datetime.fromtimestamp(self.ingested_ms / 1000, UTC)
        self.ingested = avro_long(self.ingested_ms)
        self.topic_partition = self.route.topic_field + avro_long(self.partition)
        if self.route.fast:
            self.blocks.append(self.route.container_header)

    @property
    def key(self) -> Key:
        return (self.route.topic, self.partition)

    @property
    def size(self) -> int:
        return len(self.raw) + len(self.rows) + len(self.rejects)

    @property
    def token(self) -> str:
        return f"{self.route.topic}:{self.partition}:{self.first}-{self.last}"

    def add(self, msg: Message, offset: int) -> None:
        """Append the record at ``offset``: as is for the fast path, else decoded."""
        self.last = offset
        value = msg.value()
        route = self.route
        if route.fast and value is not None and value.startswith(route.header):
            self.raw.append(msg)
            self.blocks += (container_block(self.topic_partition, offset, self.ingested, value), value, route.sync)
        else:
            self.decode(msg)

    def decode(self, msg: Message) -> None:
        """Decode and map in Python: a row, or a reject that keeps the raw bytes and the error."""
        route = self.route
        value = msg.value()
        offset = msg.offset() or 0
        try:
            record = route.codec.decode(value)
            row = route.table.to_row(record, route.topic, self.partition, offset, self.ingested_at)
        except DecodeError as exc:
            error_class, error = exc.error_class, str(exc)
        except Exception as exc:  # a record that decodes but does not map is kept too
            error_class, error = "MAPPING", f"{type(exc).__name__}: {exc}"
        else:
            self.rows.append(row)
            return
        self.rejects.append(
            reject_row(route.topic, self.partition, offset, msg.key(), value, error_class, error, self.ingested_at)
        )

    def decode_raw(self) -> None:
        """Move the fast-path values to the Python path (after ClickHouse refused them)."""
        for msg in self.raw:
            self.decode(msg)
        self.raw = []
        self.blocks = []
