"""How fast does the ClickHouse sink drain the audit topic? Prints rows/s.

    .venv/bin/python load-tests/sink_bench.py [--rows 500000] [--batch-rows 50000]
                                              [--python-decode] [--dsn chdb:///abs/dir]

Produces ``--rows`` distinct AuditRecords to a fresh topic set (prefix ``bench<hex>.``) on
the broker of ``LOTFLOW_BOOTSTRAP_SERVERS`` (a throwaway local broker under
``var/bench-kafka`` is started, and stopped afterwards, if none answers), then runs the
sink in a fresh consumer group into a fresh database of an embedded engine under
``var/bench-clickhouse`` (or ``--dsn``) and times it from start until it reports caught
up (everything written and committed). Checks the table holds exactly ``--rows`` rows.
The topics and the database are dropped at the end. Bounded: it stops by itself.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.binding import quote_identifier
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import SecretStr

from lotflow import localkafka
from lotflow.admin import create_topics, delete_topics_with_prefix
from lotflow.childproc import metric_value, parse_metrics
from lotflow.kafka_clients import RedeliveringProducer, producer_config
from lotflow.metrics import SinkMetrics
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.settings import Settings
from lotflow.sinks.batches import routes
from lotflow.sinks.client import connect, table_counts
from lotflow.sinks.framing import avro_container, avro_long
from lotflow.sinks.migrations import migrate
from lotflow.sinks.rows import TABLES
from lotflow.sinks.sink import ClickHouseSink, SinkProgress
from lotflow.streams.topics import AUDIT

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 14, 9, 0, 0, tzinfo=UTC)


def audit_record(i: int) -> dict[str, Any]:
    t = T0 + timedelta(milliseconds=i)
    return {
        "id": f"receiving:plant.receipts:{i % 4}:{i}",
        "node": "receiving",
        "subject_key": f"PO-{i % 50_000:06d}",
        "subject_id": f"R-{i}",
        "decision": "VERIFIED" if i % 10 else "EXCEPTION",
        "confidence": 0.5 + (i % 50) / 100,
        "reasons": [
            {
                "code": "UNIT_MISMATCH",
                "message": "receipt in lb, PO in kg; converted",
                "severity": "WARN",
                "evidence": {"po_unit": "kg", "receipt_unit": "lb"},
            }
        ],
        "model_version": "receiving-v1",
        "input_refs": [
            {"topic": "plant.receipts", "partition": i % 4, "offset": i},
            {"topic": "erp.purchase-orders", "partition": i % 4, "offset": i // 3},
        ],
        "event_time": t,
        "decision_time": t + timedelta(milliseconds=40),
        "vendor_id": f"V-{i % 200}",
        "lot_ids": [f"L-{i}"],
        "actor": "node:receiving",
        "output_topic": "lotflow.verified",
        "output_id": f"receiving:plant.receipts:{i % 4}:{i}",
    }


def encoded_records(settings: Settings, n: int) -> list[tuple[bytes, bytes]]:
    """``n`` distinct audit records as (key, Confluent-framed Avro value)."""
    topic = settings.topic(AUDIT.name)
    codec = AvroCodec(schema_source(settings.schema_registry_url), f"{topic}-value", AUDIT.schema)
    return [(record["subject_key"].encode(), codec.encode(record)) for record in map(audit_record, range(n))]


def produce(settings: Settings, records: list[tuple[bytes, bytes]]) -> float:
    topic = settings.topic(AUDIT.name)
    producer = RedeliveringProducer(
        producer_config(settings, **{"linger.ms": 50, "queue.buffering.max.messages": 1_000_000})
    )
    started = time.perf_counter()
    for i, (key, value) in enumerate(records):
        producer.send(topic, key, value)
        if i % 10_000 == 0:
            producer.poll(0)
    producer.flush(300)  # raises if a record was not delivered
    return time.perf_counter() - started


def bare_insert_rows_per_s(settings: Settings, client: Any, records: list[tuple[bytes, bytes]]) -> float:
    """The engine alone: the same records, in the sink's batch size and its Avro container, inserted
    straight into a fresh database's table (no Kafka, no sink loop): what the sink is held against."""
    database = f"{settings.clickhouse_database}_bare"
    try:
        migrate(client, database)
        route = next(iter(routes(settings, {AUDIT: TABLES[AUDIT]}, decode_in_clickhouse=True).values()))
        target = f"{quote_identifier(database)}.{quote_identifier(TABLES[AUDIT].avro_table or '')}"
        topic_partition = route.topic_field + avro_long(0)
        now_ms = int(time.time() * 1000)
        size = settings.sink_batch_rows
        started = time.perf_counter()
        for first in range(0, len(records), size):
            values = ((value, first + i, now_ms) for i, (_, value) in enumerate(records[first:first + size]))
            block = avro_container(route.container_header, route.sync, topic_partition, values)
            client.raw_insert(target, insert_block=block, fmt="Avro",  # the settings the sink's inserts carry
                              settings={"insert_deduplication_token": f"bare:{first}",
                                        "deduplicate_blocks_in_dependent_materialized_views": 1,
                                        "optimize_on_insert": 0})
        elapsed = time.perf_counter() - started
        counted = table_counts(client, database, ["audit"])["audit"]
        if counted != len(records):
            raise RuntimeError(f"bare insert: audit holds {counted} rows, expected {len(records)}")
        return len(records) / elapsed
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database} SYNC")


def measure_sink_rows_per_s(
    settings: Settings,
    n_rows: int,
    *,
    decode_in_clickhouse: bool = True,
    timeout: float = 600,
    consumer_config: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Produce ``n_rows`` audit records to fresh topics and time the sink draining them
    (``consumer_config``: librdkafka settings over the sink's own, for experiments)."""
    tag = uuid.uuid4().hex[:8]
    settings = settings.model_copy(
        update={
            "topic_prefix": f"bench{tag}.",
            "sink_group": f"lotflow-sink-bench-{tag}",
            "clickhouse_database": f"bench_{tag}",
        }
    )
    client = connect(settings)
    create_topics(settings, [AUDIT])
    try:
        migrate(client, settings.clickhouse_database)
        records = encoded_records(settings, n_rows)
        produce_s = produce(settings, records)
        print(f"produced {n_rows} audit records in {produce_s:.1f} s ({n_rows / produce_s:,.0f}/s)", flush=True)

        progress: list[tuple[float, int]] = []

        def on_progress(p: SinkProgress) -> None:
            progress.append((time.perf_counter(), p.rows))

        registry = CollectorRegistry()
        sink = ClickHouseSink(
            settings,
            client,
            SinkMetrics.create(registry),
            {AUDIT: TABLES[AUDIT]},
            decode_in_clickhouse=decode_in_clickhouse,
            consumer_config=consumer_config,
        )
        stop = threading.Event()
        thread = threading.Thread(target=sink.run, args=(stop,), kwargs={"on_progress": on_progress})
        started = time.perf_counter()
        thread.start()
        try:
            while not sink.caught_up():
                if not thread.is_alive() or time.perf_counter() - started > timeout:
                    raise RuntimeError("the sink stopped or did not catch up in time")
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
        finally:
            stop.set()
            thread.join(60)
        counted = table_counts(client, settings.clickhouse_database, ["audit"])["audit"]
        if counted != n_rows:
            raise RuntimeError(f"audit holds {counted} rows, expected {n_rows}")
        # what the sink's /metrics would report
        samples = parse_metrics(generate_latest(registry).decode())
        inserted = metric_value(samples, "lotflow_sink_rows_total", table="audit")
        if inserted != n_rows:
            raise RuntimeError(f"lotflow_sink_rows_total reads {inserted:g}, expected {n_rows}")
        bare = bare_insert_rows_per_s(settings, client, records)
        first_t = progress[0][0]
        steady_rows = sum(rows for _, rows in progress[1:])
        steady_s = progress[-1][0] - first_t
        return {
            "rows": n_rows,
            "seconds": elapsed,
            "rows_per_s": n_rows / elapsed,
            "steady_rows_per_s": steady_rows / steady_s if steady_s > 0 else float("nan"),
            "inserts": len(progress),
            "bare_insert_rows_per_s": bare,
        }
    finally:
        client.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database} SYNC")
        delete_topics_with_prefix(settings, settings.topic_prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--batch-rows", type=int, default=50_000)
    parser.add_argument(
        "--python-decode",
        action="store_true",
        help="decode Avro in Python (the fallback path) instead of in ClickHouse",
    )
    parser.add_argument("--dsn", default=f"chdb://{ROOT / 'var' / 'bench-clickhouse'}")
    args = parser.parse_args()

    settings = Settings().model_copy(
        update={
            "clickhouse_dsn": SecretStr(args.dsn),
            "sink_batch_rows": args.batch_rows,
            "sink_batch_s": 1.0,
        }
    )
    started_broker = None
    if not localkafka.broker_answers(settings.kafka_port):
        started_broker = settings.model_copy(
            update={
                "var_dir": ROOT / "var" / "bench-kafka",
                "kafka_port": 9292,
                "zookeeper_port": 2381,
                "bootstrap_servers": "127.0.0.1:9292",
            }
        )
        localkafka.start(started_broker)
        settings = settings.model_copy(update={"bootstrap_servers": "127.0.0.1:9292"})
    try:
        result = measure_sink_rows_per_s(settings, args.rows, decode_in_clickhouse=not args.python_decode)
    finally:
        if started_broker is not None:
            localkafka.stop(started_broker)
    path = "Python decode" if args.python_decode else "ClickHouse decode"
    print(
        f"sink ({path}, batch {args.batch_rows} rows): {result['rows']:,} rows in "
        f"{result['seconds']:.2f} s = {result['rows_per_s']:,.0f} rows/s "
        f"(steady {result['steady_rows_per_s']:,.0f} rows/s over {result['inserts']:.0f} inserts); "
        f"bare insert of the same rows {result['bare_insert_rows_per_s']:,.0f} rows/s"
    )


if __name__ == "__main__":
    main()
