"""The ClickHouse sink on the real broker and the real embedded ClickHouse engine.

One chdb engine path per process: every test shares the session's engine under
``var/test-clickhouse`` and gets a fresh database (and, through ``topic_set``, fresh topics
and a fresh consumer group). Nothing is mocked; the failure tests wrap the real client.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import SecretStr

from lotflow.admin import committed_offsets, end_offsets
from lotflow.childproc import metric_value, parse_metrics
from lotflow.kafka_clients import client_config, producer_config
from lotflow.metrics import SinkMetrics
from lotflow.schemas.serde import AvroCodec, bundled_schema_json, schema_source
from lotflow.settings import Settings
from lotflow.sinks import migrations
from lotflow.sinks.client import connect, table_counts
from lotflow.sinks.framing import avro_container, container_header
from lotflow.sinks.migrations import MIGRATIONS, applied_versions, migrate
from lotflow.sinks.rows import REJECTS, TABLES
from lotflow.sinks.sink import ClickHouseSink, SinkProgress
from lotflow.streams.topics import (
    AUDIT,
    DEAD_LETTERS,
    DECISIONS,
    EXCEPTIONS,
    LABELS,
    LOT_EVENTS,
    VERIFIED,
    TopicSpec,
)

TopicSetFactory = Callable[..., Settings]  # the `topic_set` fixture, see conftest.py

SINK_TOPICS = list(TABLES)
NEW_IN_V8 = ("prior_decision", "rebaseline")  # fields of verified, exceptions and decisions
T0 = datetime(2026, 3, 14, 9, 0, 0, tzinfo=UTC)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def sink_settings(topic_set: TopicSetFactory, clickhouse_dsn: SecretStr) -> Iterator[Settings]:
    """Fresh topics, group and ClickHouse database (migrated) for one test."""
    database = f"sink_{uuid.uuid4().hex[:10]}"
    settings = topic_set(
        SINK_TOPICS,
        clickhouse_dsn=clickhouse_dsn,
        clickhouse_database=database,
        sink_batch_s=0.2,
        sink_max_retry_s=0.5,
    )
    client = connect(settings)
    migrate(client, database)
    yield settings
    client.command(f"DROP DATABASE IF EXISTS {database} SYNC")


@pytest.fixture
def client(sink_settings: Settings) -> Client:
    return connect(sink_settings)


# --- records ------------------------------------------------------------------------------


def decision_common(i: int, decision: str) -> dict[str, Any]:
    t = T0 + timedelta(seconds=i)
    return {
        "id": f"receiving:plant.receipts:{i % 4}:{i}",
        "node": "receiving",
        "subject_key": f"PO-{i:05d}",
        "subject_id": f"R-{i}",
        "decision": decision,
        "confidence": 0.5 + (i % 50) / 100,
        "reasons": [
            {
                "code": "UNIT_MISMATCH",
                "message": "kg vs lb",
                "severity": "WARN",
                "evidence": {"po_unit": "kg", "receipt_unit": "lb", "i": str(i)},
            }
        ],
        "model_version": "receiving-v1",
        "input_refs": [{"topic": "plant.receipts", "partition": i % 4, "offset": i}],
        "event_time": t,
        "decision_time": t + timedelta(milliseconds=250),
        "vendor_id": f"V-{i % 7}",
        "lot_ids": [f"L-{i}"],
    }


def sample(spec: TopicSpec, i: int) -> dict[str, Any]:
    t = T0 + timedelta(seconds=i)
    if spec is VERIFIED:
        return {
            **decision_common(i, "VERIFIED"),
            "lines": [
                {"po_line": 1, "material_id": "M-1", "quantity": 10.0 + i, "unit": "kg", "vendor_lot": f"VL-{i}"}
            ],
            "prior_decision": "EXCEPTION" if i % 3 == 0 else "VERIFIED",
        }
    if spec is EXCEPTIONS:
        return {
            **decision_common(i, "EXCEPTION"),
            "priority": "HIGH" if i % 2 else "NORMAL",
            "route_to": "receiving",
            "recommended_action": "recount",
            "historical_pattern": "",
            "features": {"qty_ratio": 0.97, "i": float(i)},
            "prior_decision": "VERIFIED" if i % 4 == 0 else "EXCEPTION",
        }
    if spec is AUDIT:
        return {
            **decision_common(i, "VERIFIED"),
            "actor": "node:receiving",
            "output_topic": "lotflow.verified",
            "output_id": f"out-{i}",
        }
    if spec is LOT_EVENTS:
        return {
            "id": f"lot-{i}",
            "lot_id": f"L-{i % 13}",
            "node": "receiving",
            "event_type": "RECEIVED",
            "subject_key": f"PO-{i:05d}",
            "decision": "VERIFIED",
            "confidence": 0.9,
            "parent_lots": [f"VL-{i}"],
            "attributes": {"vendor": "V-1"},
            "event_time": t,
            "decision_time": t,
        }
    if spec is DEAD_LETTERS:
        return {
            "id": f"dl-{i}",
            "node": "receiving",
            "source_topic": "plant.receipts",
            "source_partition": i % 4,
            "source_offset": i,
            "original_key": b"PO-1",
            "original_value": bytes([0, 255, i % 256]),
            "error_class": "DECODE",
            "reason": "truncated",
            "failed_at": t,
        }
    if spec is DECISIONS:
        return {
            "decision_id": f"D-{i}",
            "exception_id": f"E-{i}",
            "node": "receiving",
            "subject_key": f"PO-{i:05d}",
            "resolution": "ACCEPT",
            "decided_by": "maria",
            "decided_at": t,
            "reasoning": "ok",
            "certainty": 0.9,
            "rebaseline": i % 3 == 0,
        }
    if spec is LABELS:
        return {
            "label_id": f"D-{i}",
            "node": "receiving",
            "exception_id": f"E-{i}",
            "subject_id": f"R-{i}",
            "vendor_id": f"V-{i % 7}",
            "material_id": f"M-{i % 5}",
            "reason_codes": ["UNIT_MISMATCH", "QTY_DISCREPANCY"][: i % 3],
            "soft_codes": ["QTY_DISCREPANCY"] if i % 2 else [],
            "features": {"qty_ratio": 0.97, "i": float(i)},
            "good": i % 4 != 0,
            "resolution": "REJECT" if i % 4 == 0 else "ACCEPT",
            "confidence": 0.5 + (i % 50) / 100,
            "spot_check": i % 5 == 0,
            "decided_by": "maria",
            "decided_at": t,
            "decision_time": t + timedelta(seconds=1),
        }
    raise AssertionError(spec)


def produce(settings: Settings, specs: list[TopicSpec], n: int, *, garbage: int = 0) -> dict[str, int]:
    """``n`` valid records to each topic of ``specs`` (+ ``garbage`` undecodable ones to the
    first); returns records produced per topic."""
    producer = Producer(producer_config(settings, **{"linger.ms": 20}))
    source = schema_source(settings.schema_registry_url)
    produced: dict[str, int] = {}
    for spec in specs:
        topic = settings.topic(spec.name)
        codec = AvroCodec(source, f"{topic}-value", spec.schema)
        for i in range(n):
            producer.produce(topic, codec.encode(sample(spec, i)), key=f"k{i}".encode())
            if i % 5000 == 0:
                producer.poll(0)
        produced[topic] = n
    first = settings.topic(specs[0].name)
    for j in range(garbage):
        bad = [b"not avro", None, b"\x00\x00\x00\x00\x01\x02", b"\x00"][j % 4]
        producer.produce(first, bad, key=f"bad{j}".encode())
    produced[first] += garbage
    assert producer.flush(30) == 0
    return produced


# --- running the sink ---------------------------------------------------------------------


class SinkRun:
    def __init__(self, sink: ClickHouseSink, registry: CollectorRegistry) -> None:
        self.sink = sink
        self.registry = registry
        self.stop = threading.Event()
        self.progress: list[SinkProgress] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sink", daemon=True)

    def _run(self) -> None:
        try:
            self.sink.run(self.stop, on_progress=self.progress.append)
        except BaseException as exc:
            self.error = exc
            raise

    def metric(self, name: str, **labels: str) -> float:
        """As a scrape of the sink's /metrics would read it."""
        return metric_value(parse_metrics(generate_latest(self.registry).decode()), name, **labels)

    def wait_caught_up(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.sink.caught_up():
            assert self.thread.is_alive(), f"sink died: {self.error!r}"
            assert time.monotonic() < deadline, "sink did not catch up"
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "sink did not stop"
        assert self.error is None, self.error


def start_sink(settings: Settings, client: Any, **kwargs: Any) -> SinkRun:
    registry = CollectorRegistry()
    sink = ClickHouseSink(settings, client, SinkMetrics.create(registry), **kwargs)
    run = SinkRun(sink, registry)
    run.thread.start()
    return run


def drain(settings: Settings, client: Any, **kwargs: Any) -> SinkRun:
    run = start_sink(settings, client, **kwargs)
    try:
        run.wait_caught_up()
    finally:
        run.close()
    return run


def assert_committed_to_end(settings: Settings, specs: list[TopicSpec]) -> None:
    for spec in specs:
        topic = settings.topic(spec.name)
        assert committed_offsets(settings, settings.sink_group, topic) == end_offsets(settings, topic)


def rows(client: Client, settings: Settings, table: str, order: str) -> list[dict[str, Any]]:
    result = client.query(
        f"SELECT * EXCEPT ingested_at FROM {settings.clickhouse_database}.{table} FINAL ORDER BY {order}"
    )
    out = []
    for row in result.named_results():
        for name in ("reasons", "input_refs", "lines"):
            if name in row:
                row[name] = json.loads(row[name])
        out.append(row)
    return out


class FlakyClient:
    """The real client, whose first ``failures`` inserts raise (after ``on_failure``)."""

    def __init__(self, real: Client, failures: int, on_failure: Callable[[], None] = lambda: None):
        self.real = real
        self.failures = failures
        self.failed = 0
        self.on_failure = on_failure

    def _maybe_fail(self) -> None:
        if self.failed < self.failures:
            self.failed += 1
            self.on_failure()
            raise ConnectionError(f"injected ClickHouse failure {self.failed}")

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail()
        return self.real.insert(*args, **kwargs)

    def raw_insert(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail()
        return self.real.raw_insert(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


# --- tests --------------------------------------------------------------------------------


def test_migrations_apply_once_and_record_versions(client: Client, sink_settings: Settings) -> None:
    database = sink_settings.clickhouse_database  # the fixture already migrated it
    assert migrate(client, database) == []
    assert migrate(client, database) == []
    assert applied_versions(client, database) == {m.version for m in MIGRATIONS}
    tables = {r[0] for r in client.query(f"SHOW TABLES FROM {database}").result_rows}
    assert {t.table for t in TABLES.values()} | {REJECTS, "schema_migrations"} <= tables

    fresh = f"{database}_fresh"
    try:
        assert migrate(client, fresh) == [m.version for m in MIGRATIONS]
        assert migrate(client, fresh) == []
        recorded = client.query(
            f"SELECT version, count() FROM {fresh}.schema_migrations GROUP BY version ORDER BY version"
        ).result_rows
        assert recorded == [(m.version, 1) for m in MIGRATIONS]
    finally:
        client.command(f"DROP DATABASE IF EXISTS {fresh} SYNC")


def test_v8_upgrades_a_v7_database_with_rows_in_place(
    client: Client, sink_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database at v7 holding rows: v8 adds the columns (old rows get their defaults), the
    labels table, and the views' new queries, which the Avro path then writes through."""
    db = f"{sink_settings.clickhouse_database}_v7"
    monkeypatch.setattr(migrations, "MIGRATIONS", tuple(m for m in MIGRATIONS if m.version <= 7))
    try:
        assert migrate(client, db) == [1, 2, 3, 4, 5, 6, 7]
        now = datetime.now(UTC)
        old = {VERIFIED: "verified", EXCEPTIONS: "exceptions", DECISIONS: "decisions"}
        for spec, table in old.items():
            columns = [c for c in TABLES[spec].columns if c not in NEW_IN_V8]
            mapped = dict(zip(TABLES[spec].columns, TABLES[spec].to_row(sample(spec, 1), "t", 0, 1, now), strict=True))
            client.insert(table, [[mapped[c] for c in columns]], column_names=columns, database=db)
        monkeypatch.undo()
        assert migrate(client, db) == [8]
        assert client.query(f"SELECT prior_decision FROM {db}.verified").result_rows == [("",)]
        assert client.query(f"SELECT prior_decision FROM {db}.exceptions").result_rows == [("",)]
        assert client.query(f"SELECT rebaseline FROM {db}.decisions").result_rows == [(False,)]
        for spec in (*old, LABELS):
            table = TABLES[spec]
            codec = AvroCodec(schema_source(None), f"{spec.name}-value", spec.schema)
            sync = bytes(16)
            data = avro_container(
                container_header(bundled_schema_json(spec.schema), sync),
                sync,
                b"\x02t\x00",
                [(codec.encode(sample(spec, 3)), 7, 0)],
            )
            client.raw_insert(f"{db}.{table.avro_table}", insert_block=data, fmt="Avro")
        got = client.query(f"SELECT prior_decision FROM {db}.verified WHERE kafka_offset = 7").result_rows
        assert got == [("EXCEPTION",)]
        got = client.query(f"SELECT prior_decision FROM {db}.exceptions WHERE kafka_offset = 7").result_rows
        assert got == [("EXCEPTION",)]
        assert client.query(f"SELECT rebaseline FROM {db}.decisions WHERE kafka_offset = 7").result_rows == [(True,)]
        got = client.query(f"SELECT label_id, soft_codes, spot_check FROM {db}.labels").result_rows
        assert got == [("D-3", ["QTY_DISCREPANCY"], False)]
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db} SYNC")


def test_records_written_before_v8_land_with_the_defaults(client: Client, sink_settings: Settings) -> None:
    """Values written with the schemas of before prior_decision / rebaseline (another schema id:
    decoded in Python, resolved against the current schema) land with the fields' defaults."""
    specs = [VERIFIED, EXCEPTIONS, DECISIONS]
    producer = Producer(producer_config(sink_settings))
    source = schema_source(sink_settings.schema_registry_url)
    for spec in specs:
        topic = sink_settings.topic(spec.name)
        schema = bundled_schema_json(spec.schema)
        before = {**schema, "fields": [f for f in schema["fields"] if f["name"] not in NEW_IN_V8]}
        codec = AvroCodec(source, f"{topic}-value", before)
        current = AvroCodec(source, f"{topic}-value", spec.schema)
        assert codec.schema_id != current.schema_id
        for i in range(10):
            record = {k: v for k, v in sample(spec, i).items() if k not in NEW_IN_V8}
            producer.produce(topic, codec.encode(record), key=f"k{i}".encode())
        producer.produce(topic, current.encode(sample(spec, 12)), key=b"k12")  # and one with the current schema
    assert producer.flush(30) == 0
    drain(sink_settings, client)
    db = sink_settings.clickhouse_database
    assert table_counts(client, db, ["verified", "exceptions", "decisions", REJECTS]) == {
        "verified": 11, "exceptions": 11, "decisions": 11, REJECTS: 0
    }
    query = "SELECT {column}, count() FROM {db}.{table} FINAL GROUP BY {column} ORDER BY {column}"
    got = client.query(query.format(column="prior_decision", db=db, table="verified")).result_rows
    assert got == [("", 10), ("EXCEPTION", 1)]
    got = client.query(query.format(column="prior_decision", db=db, table="exceptions")).result_rows
    assert got == [("", 10), ("VERIFIED", 1)]
    got = client.query(query.format(column="rebaseline", db=db, table="decisions")).result_rows
    assert got == [(False, 10), (True, 1)]


def test_a_repeated_insert_with_the_same_token_is_dropped(client: Client, sink_settings: Settings) -> None:
    """non_replicated_deduplication_window makes the token work on the embedded engine,
    for direct inserts and through the Avro materialized view."""
    db = sink_settings.clickhouse_database
    codec = AvroCodec(schema_source(None), "audit-value", AUDIT.schema)
    records = [sample(AUDIT, i) for i in range(20)]
    table = TABLES[AUDIT]
    now = datetime.now(UTC)
    rows_ = [table.to_row(r, "t", 0, i, now) for i, r in enumerate(records)]
    sync = bytes(16)
    data = avro_container(
        container_header(bundled_schema_json(AUDIT.schema), sync),
        sync,
        b"\x02t\x00",
        [(codec.encode(r), 100 + i, 0) for i, r in enumerate(records)],
    )

    def raw_count() -> int:
        return int(client.query(f"SELECT count() FROM {db}.audit").result_rows[0][0])

    for _ in range(2):
        client.insert(
            "audit",
            rows_,
            column_names=list(table.columns),
            database=db,
            settings={"insert_deduplication_token": "t:0:0-19"},
        )
    assert raw_count() == 20
    for _ in range(2):
        client.raw_insert(
            f"{db}.audit_avro",
            insert_block=data,
            fmt="Avro",
            settings={
                "insert_deduplication_token": "t:0:100-119",
                "deduplicate_blocks_in_dependent_materialized_views": 1,
            },
        )
    assert raw_count() == 40
    client.insert(
        "audit",
        rows_,
        column_names=list(table.columns),
        database=db,
        settings={"insert_deduplication_token": "t:0:0-19:other"},
    )
    assert raw_count() == 60  # another token is written ...
    assert table_counts(client, db, ["audit"]) == {"audit": 20}  # ... and the same 20 ids collapse


def test_every_table_gets_every_record_once_and_replays_replace(client: Client, sink_settings: Settings) -> None:
    n, garbage = 300, 8
    produce(sink_settings, SINK_TOPICS, n, garbage=garbage)

    first = drain(sink_settings, client)
    expected = {t.table: n for t in TABLES.values()} | {REJECTS: garbage}
    assert table_counts(client, sink_settings.clickhouse_database) == expected
    assert_committed_to_end(sink_settings, SINK_TOPICS)
    assert first.metric("lotflow_sink_rows_total", table="audit") == n
    assert first.metric("lotflow_sink_rows_total", table=REJECTS) == garbage
    assert sum(p.rows + p.rejects for p in first.progress) == n * len(SINK_TOPICS) + garbage

    rejects = client.query(
        f"SELECT raw_value, error_class FROM {sink_settings.clickhouse_database}.{REJECTS} FINAL ORDER BY kafka_offset"
    ).result_rows
    assert {r[1] for r in rejects} == {"DECODE", "SCHEMA"}
    assert (None, "DECODE") in rejects  # a tombstone is kept, not dropped

    # A second consumer group re-reads everything: rows replace, never duplicate.
    again = sink_settings.model_copy(update={"sink_group": f"{sink_settings.sink_group}-again"})
    drain(again, client, decode_in_clickhouse=False)
    assert table_counts(client, sink_settings.clickhouse_database) == expected
    # The same group again: nothing left to read, nothing written.
    third = drain(sink_settings, client)
    assert third.metric("lotflow_sink_rows_total", table="audit") == 0


def test_clickhouse_and_python_decoding_write_identical_rows(client: Client, sink_settings: Settings) -> None:
    produce(sink_settings, SINK_TOPICS, 50)
    run = drain(sink_settings, client, decode_in_clickhouse=True)
    for table in TABLES.values():  # no Avro insert failed (→ a silent fallback to Python decoding)
        assert run.metric("lotflow_sink_errors_total", table=table.table) == 0, table.table
    fast = {t.table: rows(client, sink_settings, t.table, "kafka_topic, kafka_offset") for t in TABLES.values()}

    python_db = f"{sink_settings.clickhouse_database}_py"
    migrate(client, python_db)
    try:
        python = sink_settings.model_copy(
            update={"clickhouse_database": python_db, "sink_group": f"{sink_settings.sink_group}-py"}
        )
        drain(python, client, decode_in_clickhouse=False)
        for spec, table in TABLES.items():
            slow = rows(client, python, table.table, "kafka_topic, kafka_offset")
            assert len(slow) == 50, spec.name
            assert slow == fast[table.table], spec.name
    finally:
        client.command(f"DROP DATABASE IF EXISTS {python_db} SYNC")


def test_insert_failures_are_retried_and_offsets_wait_for_the_insert(client: Client, sink_settings: Settings) -> None:
    specs = [AUDIT, LOT_EVENTS]
    n = 400
    produce(sink_settings, specs, n)
    committed_at_failure: list[dict[int, int]] = []

    def snapshot() -> None:
        committed_at_failure.append(
            committed_offsets(sink_settings, sink_settings.sink_group, sink_settings.topic(AUDIT.name))
        )

    # Fail the Avro insert (→ Python fallback) and then two more inserts (→ back-off).
    flaky = FlakyClient(client, failures=3, on_failure=snapshot)
    run = drain(sink_settings, flaky)
    assert flaky.failed == 3
    assert all(set(c.values()) == {0} for c in committed_at_failure), committed_at_failure
    counts = table_counts(client, sink_settings.clickhouse_database, ["audit", "lot_events"])
    assert counts == {"audit": n, "lot_events": n}
    assert_committed_to_end(sink_settings, specs)
    errors = sum(run.metric("lotflow_sink_errors_total", table=t) for t in ("audit", "lot_events"))
    assert errors == 3


def test_nothing_is_committed_while_clickhouse_keeps_failing(client: Client, sink_settings: Settings) -> None:
    produce(sink_settings, [AUDIT], 100)
    down = FlakyClient(client, failures=10**9)
    run = start_sink(sink_settings, down)
    deadline = time.monotonic() + 30
    while down.failed < 4:  # the fast path, its fallback, then back-off retries
        assert time.monotonic() < deadline and run.thread.is_alive()
        time.sleep(0.05)
    topic = sink_settings.topic(AUDIT.name)
    assert set(committed_offsets(sink_settings, sink_settings.sink_group, topic).values()) == {0}
    assert not run.sink.caught_up()
    run.close()  # shutdown gives up after sink_max_retry_s without committing
    assert set(committed_offsets(sink_settings, sink_settings.sink_group, topic).values()) == {0}
    assert table_counts(client, sink_settings.clickhouse_database, ["audit"]) == {"audit": 0}

    # ClickHouse is back: the same group writes everything.
    drain(sink_settings, client)
    assert table_counts(client, sink_settings.clickhouse_database, ["audit"]) == {"audit": 100}
    assert_committed_to_end(sink_settings, [AUDIT])


def test_revoked_partitions_drop_their_buffers_and_are_reread(
    client: Client, sink_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A second member joins while the first holds unflushed batches: nothing is lost."""
    caplog.set_level(logging.INFO, logger="lotflow.sinks")
    n = 200
    produce(sink_settings, [AUDIT], n)
    slow = sink_settings.model_copy(update={"sink_batch_s": 3600.0, "sink_batch_rows": 10**6})
    fast_cfg = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
    first = start_sink(slow, client, consumer_config=fast_cfg)
    try:
        deadline = time.monotonic() + 30
        while first.sink.buffered() < n:  # consumed, not written
            assert time.monotonic() < deadline and first.thread.is_alive()
            time.sleep(0.05)
        second = start_sink(sink_settings, client, consumer_config=fast_cfg)
        try:
            second.wait_caught_up()  # its share is written and committed
            assert 0 < table_counts(client, sink_settings.clickhouse_database, ["audit"])["audit"] < n
        finally:
            second.close()
    finally:
        first.close()  # flushes what it still holds
    assert any("uncommitted records dropped" in r.getMessage() for r in caplog.records)
    assert table_counts(client, sink_settings.clickhouse_database, ["audit"]) == {"audit": n}
    assert_committed_to_end(sink_settings, [AUDIT])


def test_aborted_transactions_never_reach_clickhouse_and_offsets_pass_the_markers(
    client: Client, sink_settings: Settings
) -> None:
    """Output topics written in transactions (as the worker writes them): records of aborted
    transactions are never inserted, committed ones are, and the group's committed offsets
    end at each partition's end offset, commit/abort markers included."""
    topic = sink_settings.topic(AUDIT.name)
    codec = AvroCodec(schema_source(None), f"{topic}-value", AUDIT.schema)
    producer = Producer(producer_config(sink_settings, **{"transactional.id": f"sink-test-{uuid.uuid4().hex[:8]}"}))
    producer.init_transactions(30)
    committed_ids: set[str] = set()
    aborted_ids: set[str] = set()
    # committed, aborted, committed, aborted ...: aborted records lie between committed ones
    # and at the end of partitions; every partition gets markers after its last record.
    for txn in range(6):
        producer.begin_transaction()
        for i in range(txn * 50, txn * 50 + 50):
            record = sample(AUDIT, i)
            producer.produce(topic, codec.encode(record), key=f"k{i}".encode())
            (committed_ids if txn % 2 == 0 else aborted_ids).add(record["id"])
        if txn % 2 == 0:
            producer.commit_transaction(30)
        else:
            producer.flush(30)  # on the broker, then aborted
            producer.abort_transaction(30)

    run = drain(sink_settings, client)
    ids = {
        row[0] for row in client.query(f"SELECT id FROM {sink_settings.clickhouse_database}.audit FINAL").result_rows
    }
    assert ids == committed_ids
    assert not ids & aborted_ids
    assert table_counts(client, sink_settings.clickhouse_database, ["audit", REJECTS]) == {
        "audit": 150,
        REJECTS: 0,
    }
    assert run.metric("lotflow_sink_rows_total", table="audit") == 150
    ends = end_offsets(sink_settings, topic)
    assert sum(ends.values()) > 300  # 300 records + the markers
    assert committed_offsets(sink_settings, sink_settings.sink_group, topic) == ends
    # The flushes themselves commit the consumer's position, which is past the markers (and
    # the aborted records) behind their last record, not last offset + 1.
    last_flush = {p.partition: p.committed_offset for p in run.progress}
    assert last_flush == {p: end for p, end in ends.items() if end > 0}


def test_sink_consumer_reads_committed_with_the_connection_settings(sink_settings: Settings) -> None:
    secured = sink_settings.model_copy(
        update={
            "kafka_security_protocol": "SASL_PLAINTEXT",
            "kafka_sasl_mechanism": "SCRAM-SHA-256",
            "kafka_sasl_username": "sink",
            "kafka_sasl_password": SecretStr("s3cret"),
        }
    )
    sink = ClickHouseSink(secured, connect(sink_settings), SinkMetrics.create(CollectorRegistry()))
    config = sink.consumer_settings()
    assert config["isolation.level"] == "read_committed"
    assert config["enable.auto.commit"] is False
    assert config["group.id"] == secured.sink_group
    for key, value in client_config(secured).items():
        assert config[key] == value, key


def test_client_is_shared_safely_across_threads(client: Client, sink_settings: Settings) -> None:
    """Queries from another thread while the sink inserts, on the one cached client."""
    produce(sink_settings, [AUDIT], 3000)
    assert connect(sink_settings) is client
    run = start_sink(sink_settings, client)
    seen: list[int] = []
    try:
        while not run.sink.caught_up():
            assert run.thread.is_alive()
            seen.append(table_counts(client, sink_settings.clickhouse_database, ["audit"])["audit"])
    finally:
        run.close()
    assert seen == sorted(seen)
    assert table_counts(client, sink_settings.clickhouse_database, ["audit"]) == {"audit": 3000}
