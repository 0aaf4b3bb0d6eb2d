"""The ClickHouse sink: output topics + decisions → one table each, exactly once in effect.

A plain confluent-kafka consumer (``enable.auto.commit=False``) buffers records per
topic-partition and flushes a partition when it holds ``sink_batch_rows`` records or its
oldest is ``sink_batch_s`` old. Each flush is one insert per table it touches, tagged with
``insert_deduplication_token = "{topic}:{partition}:{first}-{last}"``; the partition's
offset (``last + 1``) is committed synchronously only after every insert of the flush
succeeded. Flushes run on one writer thread, in order, while the consumer thread reads on;
failed inserts are retried there with capped exponential back-off, forever, never skipped
and never committed past; meanwhile the consumer stays in its group (it keeps polling, with
consumption paused once two batches' worth of records wait). A re-delivered batch is
dropped by the token, and any replay with other batch bounds is collapsed by the tables'
``ReplacingMergeTree`` (read with FINAL).
Partitions revoked by a rebalance drop their buffered records: they were not committed,
so whoever owns the partition next reads them again.

Two ways to turn a value into a row:

- fast path (default, ``decode_in_clickhouse=True``): a value written with the topic's
  own schema (Confluent header = this schema's id) is sent as is: the values of a flush,
  each preceded by its kafka_* fields, go to ClickHouse as one Avro object container
  file (one block per record, so a malformed record cannot shift the next ones) into
  ``<table>_avro``, whose materialized view maps it like ``sinks/rows.py``. The engine
  decodes Avro several times faster than Python can.
- Python path: ``AvroCodec.decode`` then ``TableSpec.to_row``, inserted natively. Used for
  values with another schema id (schema evolution), when the fast path is off, and for a
  whole batch after its fast-path insert failed once — so a batch ClickHouse cannot
  parse is decoded record by record and the bad records are found.

A value that does not decode (or map) goes to ``sink_rejects`` with its raw bytes and the
error — in the same flush and under the same commit rule, never silently dropped.

The embedded engine (chdb) needs no lock around the client: clickhouse-connect's chdb
backend serializes every call on a client's handle with its own lock (and the engine
releases the GIL while it works), so a web/query thread may share ``connect(settings)``
with the sink thread. An HTTP client is created without a session id, so concurrent
calls from several threads are safe there too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
import orjson
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry

from lotflow.metrics import SinkMetrics, serve
from lotflow.schemas.serde import AvroCodec, DecodeError, bundled_schema_json, schema_source
from lotflow.settings import Settings
from lotflow.sinks.migrations import migrate
from lotflow.sinks.rows import REJECT_COLUMNS, REJECTS, TABLES, Row, TableSpec, reject_row
from lotflow.streams.topics import TopicSpec

__all__ = [
    "ClickHouseSink",
    "SinkProgress",
    "avro_container",
    "connect",
    "container_block",
    "container_header",
    "run_sink",
    "table_counts",
]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">bI")
_FIRST_RETRY_S = 0.25
# optimize_on_insert=0: do not collapse equal ids inside each inserted block (costs ~40 % of
# an audit insert); the merges and FINAL collapse them anyway.
_INSERT_SETTINGS = {"optimize_on_insert": 0}
_LAG_INTERVAL_S = 5.0
_IDLE_CHECK_S = 0.2
_MAX_CONSUME = 10_000
_KAFKA_TIMEOUT_S = 10.0

# --------------------------------------------------------------------------- client


_clients: dict[str, Client] = {}
_clients_lock = threading.Lock()


def connect(settings: Settings) -> Client:
    """The process's ClickHouse client for ``settings.clickhouse_url()`` (created once).

    ``chdb:///abs/path`` opens the embedded engine (its directory is created);
    ``http(s)://user:password@host:port`` a server. The DSN is never logged.
    """
    url = settings.clickhouse_url()
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = _open_client(url)
        return client


def _open_client(url: str) -> Client:
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        where = parts.path if not parts.netloc else parts.netloc
        if where and not parts.netloc:
            Path(where).mkdir(parents=True, exist_ok=True)
        log.info("ClickHouse: embedded engine at %s", where or "memory")
        return clickhouse_connect.get_client(dsn=url)
    if parts.scheme in ("http", "https"):
        log.info("ClickHouse: server %s://%s:%s", parts.scheme, parts.hostname, parts.port)
        # No session: a session id makes concurrent calls from two threads fail.
        return clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False)
    raise ValueError(f"unsupported ClickHouse DSN scheme {parts.scheme!r} (chdb, http, https)")


def table_counts(client: Client, database: str, tables: Iterable[str] | None = None) -> dict[str, int]:
    """``SELECT count() FROM t FINAL`` for every sink table (or ``tables``)."""
    names = list(tables) if tables is not None else [s.table for s in TABLES.values()] + [REJECTS]
    db = quote_identifier(database)
    counts: dict[str, int] = {}
    for name in names:
        result = client.query(f"SELECT count() FROM {db}.{quote_identifier(name)} FINAL")
        counts[name] = int(result.result_rows[0][0])
    return counts


# --------------------------------------------------------------------------- Avro framing

_SMALL_VARINTS = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    """Avro ``long``: zig-zag, then base-128 little-endian."""
    n = (n << 1) ^ (n >> 63)
    if n < 0x80:
        return _SMALL_VARINTS[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 0x200000:
        return bytes((n & 0x7F | 0x80, (n >> 7) & 0x7F | 0x80, n >> 14))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _avro_string(text: str) -> bytes:
    raw = text.encode()
    return _varint(len(raw)) + raw


_KAFKA_FIELDS = [
    {"name": "kafka_topic", "type": "string"},
    {"name": "kafka_partition", "type": "int"},
    {"name": "kafka_offset", "type": "long"},
    {"name": "ingested_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
]


_CONFLUENT_HEADER = {
    "name": "confluent_header",
    "type": {"type": "fixed", "name": "ConfluentHeader", "namespace": "lotflow.sink", "size": 5},
}


def container_header(schema: Mapping[str, Any], sync: bytes) -> bytes:
    """Avro object container header whose records are: the kafka_* fields, the 5-byte
    Confluent header (a ``fixed`` no table column takes, so ClickHouse skips it), then the
    fields of ``schema`` — so a Kafka value is used as is, without copying its body."""
    wrapped = dict(schema)
    wrapped["fields"] = [*_KAFKA_FIELDS, _CONFLUENT_HEADER, *schema["fields"]]
    meta = {"avro.schema": orjson.dumps(wrapped), "avro.codec": b"null"}
    entries = b"".join(_avro_string(k) + _varint(len(v)) + v for k, v in meta.items())
    return b"Obj\x01" + _varint(len(meta)) + entries + _varint(0) + sync


def container_block(topic_partition: bytes, offset: int, ingested: bytes, value: bytes) -> bytes:
    """The start of a one-record block (count, size, kafka_* fields); ``value`` and the sync
    marker follow it. One record per block: a malformed value fails its own block instead
    of shifting the records after it. ``ingested`` is ``_varint(ingested_ms)``."""
    fields = topic_partition + _varint(offset) + ingested
    return b"\x02" + _varint(len(fields) + len(value)) + fields


def avro_container(
    header: bytes, sync: bytes, topic_partition: bytes, values: Iterable[tuple[bytes, int, int]]
) -> bytes:
    """An Avro object container of Confluent-framed ``(value, offset, ingested_ms)``
    (``topic_partition``: the encoded kafka_topic and kafka_partition)."""
    parts = [header]
    for value, offset, ingested_ms in values:
        parts += (container_block(topic_partition, offset, _varint(ingested_ms), value), value, sync)
    return b"".join(parts)


# --------------------------------------------------------------------------- sink


@dataclass(frozen=True)
class SinkProgress:
    """Reported to ``on_progress`` after each committed flush."""

    topic: str
    partition: int
    table: str
    rows: int
    rejects: int
    committed_offset: int


@dataclass(frozen=True)
class _Route:
    topic: str
    table: TableSpec
    codec: AvroCodec
    header: bytes  # Confluent header of values written with this topic's own schema
    fast: bool  # send those values to ClickHouse as Avro (TableSpec.avro_table)
    container_header: bytes
    topic_field: bytes  # Avro-encoded kafka_topic


@dataclass
class _Batch:
    """Consecutive records of one partition, written by one flush."""

    route: _Route
    partition: int
    first: int
    started: float  # monotonic
    ingested_ms: int  # wall clock when the batch was opened: its rows' ingested_at
    last: int = -1
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
        self.ingested = _varint(self.ingested_ms)
        self.topic_partition = self.route.topic_field + _varint(self.partition)

    @property
    def key(self) -> Key:
        return (self.route.topic, self.partition)

    @property
    def size(self) -> int:
        return len(self.raw) + len(self.rows) + len(self.rejects)

    @property
    def token(self) -> str:
        return f"{self.route.topic}:{self.partition}:{self.first}-{self.last}"


Key = tuple[str, int]


class ClickHouseSink:
    """Consume the output topics and decisions into ClickHouse; see the module docstring.

    Two threads: ``run``'s thread consumes, buffers, commits and handles rebalances; one
    writer thread inserts sealed batches in order (the engine works without the GIL, so
    the next batch is read while the last one is written). At most about two batches'
    worth of records wait for the writer; beyond that consumption is paused (while still
    polling, so the group membership holds through long ClickHouse outages).
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
        self._client = client
        self._metrics = metrics
        self._db = settings.clickhouse_database
        self._consumer_config = dict(consumer_config or {})
        self._sync = os.urandom(16)
        source = schema_source(settings.schema_registry_url)
        self._routes: dict[str, _Route] = {}
        for spec, table in registry.items():
            topic = settings.topic(spec.name)
            codec = AvroCodec(source, f"{topic}-value", spec.schema)
            self._routes[topic] = _Route(
                topic=topic,
                table=table,
                codec=codec,
                header=_HEADER.pack(0, codec.schema_id),
                fast=decode_in_clickhouse and table.avro_table is not None,
                container_header=container_header(bundled_schema_json(spec.schema), self._sync),
                topic_field=_avro_string(topic),
            )
        self._batches: dict[Key, _Batch] = {}  # open, filling
        self._pending: deque[tuple[_Batch, Future[bool]]] = deque()  # sealed, in write order
        self._pending_records = 0
        self._max_pending = 2 * settings.sink_batch_rows
        self._paused = False
        self._assigned: set[Key] = set()
        self._committed: dict[Key, int] = {}
        self._blocked: set[Key] = set()  # a batch was given up: commit nothing after it
        self._column_types: dict[str, Sequence[Any]] = {}
        self._caught_up = False
        self._stopping = threading.Event()
        self._give_up_at = float("inf")
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

    def run(self, stop: threading.Event, on_progress: Callable[[SinkProgress], None] | None = None) -> None:
        """Consume until ``stop`` is set; then flush what is buffered, commit, and close."""
        self._on_progress = on_progress
        self._reset()
        consumer = Consumer(self._config())
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
                msgs = consumer.consume(num_messages=consume_n, timeout=poll_s)
                if msgs:
                    self._caught_up = False
                    self._add(msgs)
                self._commit_written(consumer)
                self._seal(writer, force=False)
                self._backpressure(consumer)
                now = time.monotonic()
                if now >= next_lag:
                    self._update_lag(consumer)
                    next_lag = now + _LAG_INTERVAL_S
                if not msgs and not self._batches and not self._pending and now >= next_idle:
                    self._check_caught_up(consumer)
                    next_idle = now + _IDLE_CHECK_S
            # Graceful stop: write what is buffered (retrying for up to sink_max_retry_s).
            self._give_up_at = time.monotonic() + self._settings.sink_max_retry_s
            self._stopping.set()
            self._seal(writer, force=True)
            while self._pending:
                wait([self._pending[0][1]])
                self._commit_written(consumer)
        finally:
            self._give_up_at = 0.0  # on an error: the writer gives up at once
            self._stopping.set()
            writer.shutdown(wait=True, cancel_futures=True)
            left = self.buffered()
            if left:
                log.warning("sink: stopping with %d records not committed (they will be read again)", left)
            self._reset()
            consumer.close()
            log.info("sink: stopped")

    def _reset(self) -> None:
        self._batches.clear()
        self._pending.clear()
        self._pending_records = 0
        self._paused = False
        self._assigned.clear()
        self._committed.clear()
        self._blocked.clear()
        self._caught_up = False
        self._stopping.clear()
        self._give_up_at = float("inf")

    # ----------------------------------------------------------------- consuming

    def _config(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self._settings.bootstrap_servers,
            "group.id": self._settings.sink_group,
            "client.id": "lotflow-clickhouse-sink",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "max.partition.fetch.bytes": 8 << 20,  # fewer, larger fetches: ~20 % faster here
            **self._consumer_config,
        }

    def _add(self, msgs: Sequence[Message]) -> None:
        batches = self._batches
        sync = self._sync
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
                batch = batches[key] = _Batch(
                    self._routes[topic], partition, offset, time.monotonic(), time.time_ns() // 1_000_000
                )
                if batch.route.fast:
                    batch.blocks.append(batch.route.container_header)
            batch.last = offset
            value = msg.value()
            if batch.route.fast and value is not None and value.startswith(batch.route.header):
                batch.raw.append(msg)
                batch.blocks += (
                    container_block(batch.topic_partition, offset, batch.ingested, value),
                    value,
                    sync,
                )
            else:
                self._decode_into(batch, msg)

    def _decode_into(self, batch: _Batch, msg: Message) -> None:
        route = batch.route
        ingested_at = batch.ingested_at
        value = msg.value()
        offset = msg.offset() or 0
        try:
            record = route.codec.decode(value)
            row = route.table.to_row(record, route.topic, batch.partition, offset, ingested_at)
        except DecodeError as exc:
            error_class, error = exc.error_class, str(exc)
        except Exception as exc:  # a record that decodes but does not map is kept too
            error_class, error = "MAPPING", f"{type(exc).__name__}: {exc}"
        else:
            batch.rows.append(row)
            return
        batch.rejects.append(
            reject_row(route.topic, batch.partition, offset, msg.key(), value, error_class, error, ingested_at)
        )

    def _on_consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        log.warning("sink: consumer error: %s", err)

    def _backpressure(self, consumer: Consumer) -> None:
        """Pause consumption while the writer is behind (keeps polling: stays in the group)."""
        behind = self._pending_records >= self._max_pending
        if behind:
            consumer.pause(consumer.assignment())  # again: partitions may have been assigned
            self._paused = True
        elif self._paused:
            consumer.resume(consumer.assignment())
            self._paused = False

    # ----------------------------------------------------------------- rebalance

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        self._caught_up = False

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        dropped = 0
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        for key in revoked:
            self._assigned.discard(key)
            self._committed.pop(key, None)
            self._blocked.discard(key)
            batch = self._batches.pop(key, None)
            if batch is not None:
                dropped += batch.size
            with contextlib.suppress(KeyError):  # never measured
                self._metrics.consumer_lag.remove(key[0], str(key[1]))
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

    def _seal(self, writer: ThreadPoolExecutor, *, force: bool) -> None:
        """Hand the due batches (all of them if ``force``) to the writer thread."""
        max_rows, max_age = self._settings.sink_batch_rows, self._settings.sink_batch_s
        now = time.monotonic()
        for key, batch in list(self._batches.items()):
            if not force and batch.size < max_rows and now - batch.started < max_age:
                continue
            del self._batches[key]
            self._pending.append((batch, writer.submit(self._write, batch)))
            self._pending_records += batch.size

    def _commit_written(self, consumer: Consumer) -> None:
        """Commit the batches the writer finished, in order."""
        while self._pending and self._pending[0][1].done():
            batch, future = self._pending.popleft()
            self._pending_records -= batch.size
            try:
                written = future.result()
            except Exception:  # the writer only returns; be safe anyway
                log.exception("sink: writer failed")
                written = False
            key = batch.key
            if batch.abandoned:
                continue
            if not written or key in self._blocked:
                self._blocked.add(key)  # never commit past a batch that was not written
                continue
            offset = batch.last + 1
            if self._commit_offset(consumer, batch.route.topic, batch.partition, offset) and (
                self._on_progress is not None
            ):
                self._on_progress(
                    SinkProgress(
                        batch.route.topic,
                        batch.partition,
                        batch.route.table.table,
                        batch.written,
                        len(batch.rejects),
                        offset,
                    )
                )

    def _write(self, batch: _Batch) -> bool:
        """Writer thread: insert the batch, retrying with back-off until it succeeds.

        Returns False only when the batch was revoked or the sink stops and gives up.
        """
        table = batch.route.table.table
        attempt = 0
        while not batch.abandoned:
            if time.monotonic() >= self._give_up_at:
                return False
            try:
                self._write_once(batch)
                return True
            except Exception as exc:
                self._metrics.errors.labels(table).inc()
                if batch.raw and "avro" not in batch.done:
                    # Let Python find what ClickHouse could not parse; retry at once.
                    log.warning(
                        "sink: Avro insert into %s failed, decoding %d records in Python: %s",
                        table,
                        len(batch.raw),
                        exc,
                    )
                    self._decode_raw(batch)
                    continue
                delay = min(self._settings.sink_max_retry_s, _FIRST_RETRY_S * 2**attempt)
                attempt += 1
                log.warning(
                    "sink: insert into %s failed (attempt %d), retrying in %.2f s: %s", table, attempt, delay, exc
                )
                if self._stopping.is_set():
                    if time.monotonic() + delay >= self._give_up_at:
                        return False
                    time.sleep(delay)
                else:
                    self._stopping.wait(delay)  # cut short by a stop, to re-check the deadline
        return False

    def _decode_raw(self, batch: _Batch) -> None:
        for msg in batch.raw:
            self._decode_into(batch, msg)
        batch.raw = []
        batch.blocks = []

    def _write_once(self, batch: _Batch) -> None:
        spec = batch.route.table
        token = batch.token
        if batch.raw and "avro" not in batch.done:
            data = b"".join(batch.blocks)
            target = f"{quote_identifier(self._db)}.{quote_identifier(spec.avro_table or '')}"
            self._timed(
                spec.table,
                len(batch.raw),
                lambda: self._client.raw_insert(
                    target,
                    insert_block=data,
                    fmt="Avro",
                    settings={
                        "insert_deduplication_token": token,
                        "deduplicate_blocks_in_dependent_materialized_views": 1,
                        **_INSERT_SETTINGS,
                    },
                ),
            )
            batch.done.add("avro")
            batch.written += len(batch.raw)
        if batch.rows and "rows" not in batch.done:
            rows_token = f"{token}:rows" if "avro" in batch.done else token
            self._insert(spec.table, spec.columns, batch.rows, rows_token)
            batch.done.add("rows")
            batch.written += len(batch.rows)
        if batch.rejects and "rejects" not in batch.done:
            self._insert(REJECTS, REJECT_COLUMNS, batch.rejects, f"{token}:rejects")
            batch.done.add("rejects")

    def _insert(self, table: str, columns: Sequence[str], rows: list[Row], token: str) -> None:
        types = self._column_types.get(table)
        if types is None:
            ctx = self._client.create_insert_context(table, list(columns), database=self._db)
            types = self._column_types[table] = ctx.column_types
        self._timed(
            table,
            len(rows),
            lambda: self._client.insert(
                table,
                rows,
                column_names=list(columns),
                database=self._db,
                column_types=types,
                settings={"insert_deduplication_token": token, **_INSERT_SETTINGS},
            ),
        )

    def _timed(self, table: str, n: int, insert: Callable[[], object]) -> None:
        started = time.perf_counter()
        insert()
        self._metrics.batch_latency.labels(table).observe(time.perf_counter() - started)
        self._metrics.batch_rows.labels(table).observe(n)
        self._metrics.rows.labels(table).inc(n)

    def _commit_offset(self, consumer: Consumer, topic: str, partition: int, offset: int) -> bool:
        try:
            result = consumer.commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
            errors = [tp.error for tp in result or () if tp.error is not None]
            if errors:
                raise KafkaException(errors[0])
        except KafkaException as exc:
            # The rows are written; whoever re-reads them is deduplicated by ClickHouse.
            log.warning("sink: commit %s[%d]@%d failed: %s", topic, partition, offset, exc)
            return False
        self._committed[(topic, partition)] = offset
        return True

    # ----------------------------------------------------------------- offsets and lag

    def _known_committed(self, consumer: Consumer, keys: Iterable[Key]) -> None:
        unknown = [TopicPartition(t, p) for t, p in keys if (t, p) not in self._committed]
        if not unknown:
            return
        for tp in consumer.committed(unknown, timeout=_KAFKA_TIMEOUT_S):
            if tp.error is None:
                self._committed[(tp.topic, tp.partition)] = max(tp.offset, -1)

    def _watermarks(self, consumer: Consumer, keys: Iterable[Key]) -> dict[Key, tuple[int, int]]:
        """Low and end offsets (the last stable offset under read_committed) per partition.

        The values cached from the consumer's own fetch responses: asking the broker would
        queue behind the long-polling fetch on the same connection (~0.5 s a partition).
        Unknown (before the first fetch response) is negative.
        """
        marks: dict[Key, tuple[int, int]] = {}
        for t, p in keys:
            low, high = consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            marks[(t, p)] = (low, high)
        return marks

    def _update_lag(self, consumer: Consumer) -> None:
        keys = sorted(self._assigned)
        try:
            self._known_committed(consumer, keys)
            marks = self._watermarks(consumer, keys)
        except KafkaException as exc:
            log.warning("sink: could not read offsets for the lag metric: %s", exc)
            return
        for key, (low, high) in marks.items():
            if high < 0:
                continue  # not fetched yet
            done = self._committed.get(key, -1)
            lag = high - (done if done >= 0 else max(low, 0))
            self._metrics.consumer_lag.labels(key[0], str(key[1])).set(max(lag, 0))

    def _check_caught_up(self, consumer: Consumer) -> None:
        """Idle and nothing buffered: are all assigned partitions committed to their end?

        Also commits the consumer's position where it is past the committed offset (only
        transaction markers lie between them then), so the group's lag reads 0.
        """
        keys = sorted(self._assigned)
        if not keys or self._batches or self._pending:
            self._caught_up = False
            return
        try:
            self._known_committed(consumer, keys)
            marks = self._watermarks(consumer, keys)
            positions = consumer.position([TopicPartition(t, p) for t, p in keys])
        except KafkaException as exc:
            log.debug("sink: caught-up check failed: %s", exc)
            self._caught_up = False
            return
        done = True
        for tp in positions:
            key = (tp.topic, tp.partition)
            low, high = marks[key]
            committed = self._committed.get(key, -1)
            if (
                tp.offset > committed
                and tp.offset >= 0
                and key not in self._blocked
                and self._commit_offset(consumer, tp.topic, tp.partition, tp.offset)
            ):
                committed = tp.offset
            if high < 0 or (committed < high and not 0 <= high <= low):
                done = False  # end unknown yet, or records left (an emptied partition is done)
        self._caught_up = done


# --------------------------------------------------------------------------- process


def run_sink(settings: Settings, stop: threading.Event | None = None) -> None:
    """``lotflow sink``: migrate, serve /metrics, and sink until SIGTERM/SIGINT (or ``stop``)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())
    registry = CollectorRegistry()
    metrics = SinkMetrics.create(registry)
    serve(registry, settings.sink_metrics_port, settings.sink_metrics_host)
    client = connect(settings)
    applied = migrate(client, settings.clickhouse_database)
    if applied:
        log.info("sink: applied ClickHouse migrations %s", applied)
    ClickHouseSink(settings, client, metrics).run(stop)
