"""Versioned, idempotent ClickHouse migrations.

``MIGRATIONS`` is an ordered list of ``Migration(version, description, statements)``.
``migrate(client, database)`` creates the database and ``schema_migrations``, then applies
the versions not yet recorded there, each recorded only after all of its statements ran.
Every statement is itself idempotent (``IF NOT EXISTS``), so a version interrupted half-way
is simply applied again. A released version is never edited: change the schema with a new
version.

Tables are ``ReplacingMergeTree(ingested_at)``: the sorting key ends in the record's
deterministic id, so a re-processed input (same id, same subject and event time) replaces
its row; read with ``FINAL`` for exact counts. ``non_replicated_deduplication_window``
makes ``insert_deduplication_token`` work on plain (non-replicated) MergeTree tables, which
is what the embedded engine and a single server have: a retried insert of the same batch
is dropped by the server instead of written twice.

Sorting keys start with the column the traceability queries filter on: ``audit`` and the
decision tables by ``subject_key`` ("why was this PO/lot approved?"), ``lot_events`` by
``lot_id`` (genealogy); ``v2`` adds skip indexes for lot ids inside arrays. ``v3`` adds the
sink's Avro ingestion path: ``<table>_avro`` (Null engine, shaped like the Avro record) and
``<table>_avro_mv`` mapping it into ``<table>`` exactly as ``sinks/rows.py`` does in Python.
``v4`` adds ``dead_letters.original_size`` (``ALTER ... ADD COLUMN IF NOT EXISTS``, and the
view's query replaced in place); ``v5`` adds ``exceptions.contributions`` and ``.pattern`` the
same way; ``v6`` the review service's decision fields; ``v7`` person decisions on
verified and audit records and the audit hash chain; ``v8`` ``prior_decision`` on verified and
exceptions, ``decisions.rebaseline``, and the ``labels`` table (with its Avro path) of what the
confidence models learn from, sorted by ``(node, vendor_id, label_id)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

__all__ = ["MIGRATIONS", "Migration", "applied_versions", "migrate"]

log = logging.getLogger(__name__)

DB = "{db}"  # replaced by the quoted database name


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


_TABLE_SETTINGS = "SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 8192"

_KAFKA = """
    kafka_topic LowCardinality(String),
    kafka_partition Int32,
    kafka_offset Int64,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)"""

_DECISION_COMMON = """
    id String,
    node LowCardinality(String),
    subject_key String,
    subject_id String,
    decision LowCardinality(String),
    confidence Float64,
    reason_codes Array(LowCardinality(String)),
    reasons String,
    model_version LowCardinality(String),
    input_topic LowCardinality(String),
    input_partition Int32,
    input_offset Int64,
    input_refs String,
    event_time DateTime64(3, 'UTC'),
    decision_time DateTime64(3, 'UTC'),
    vendor_id LowCardinality(String),
    lot_ids Array(String),"""

_V1 = (
    f"""CREATE TABLE IF NOT EXISTS {DB}.verified ({_DECISION_COMMON}
    lines String,{_KAFKA}
) ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (subject_key, id)
{_TABLE_SETTINGS}""",
    f"""CREATE TABLE IF NOT EXISTS {DB}.exceptions ({_DECISION_COMMON}
    priority LowCardinality(String),
    route_to LowCardinality(String),
    recommended_action String,
    historical_pattern String,
    features Map(String, Float64),{_KAFKA}
) ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (subject_key, id)
{_TABLE_SETTINGS}""",
    f"""CREATE TABLE IF NOT EXISTS {DB}.audit ({_DECISION_COMMON}
    actor LowCardinality(String),
    output_topic LowCardinality(String),
    output_id String,{_KAFKA}
) ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (subject_key, id)
{_TABLE_SETTINGS}""",
    f"""CREATE TABLE IF NOT EXISTS {DB}.lot_events (
    id String,
    lot_id String,
    node LowCardinality(String),
    event_type LowCardinality(String),
    subject_key String,
    decision LowCardinality(String),
    confidence Float64,
    parent_lots Array(String),
    attributes Map(String, String),
    event_time DateTime64(3, 'UTC'),
    decision_time DateTime64(3, 'UTC'),{_KAFKA}
) ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (lot_id, id)
{_TABLE_SETTINGS}""",
    f"""CREATE TABLE IF NOT EXISTS {DB}.dead_letters (
    id String,
    node LowCardinality(String),
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    original_key Nullable(String),
    original_value Nullable(String),
    error_class LowCardinality(String),
    reason String,
    failed_at DateTime64(3, 'UTC'),{_KAFKA}
) ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(failed_at)
ORDER BY id
{_TABLE_SETTINGS}""",
    f"""CREATE TABLE IF NOT EXISTS {DB}.decisions (
    decision_id String,
    exception_id String,
    node LowCardinality(String),
    subject_key String,
    resolution LowCardinality(String),
    decided_by LowCardinality(String),
    decided_at DateTime64(3, 'UTC'),
    reasoning String,
    certainty Float64,{_KAFKA}
) ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(decided_at)
ORDER BY (subject_key, decision_id)
{_TABLE_SETTINGS}""",
    # Not partitioned by time: a re-read reject must land in the same part set to replace.
    f"""CREATE TABLE IF NOT EXISTS {DB}.sink_rejects (
    kafka_topic LowCardinality(String),
    kafka_partition Int32,
    kafka_offset Int64,
    raw_key Nullable(String),
    raw_value Nullable(String),
    error_class LowCardinality(String),
    error String,
    rejected_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = ReplacingMergeTree(rejected_at)
ORDER BY (kafka_topic, kafka_partition, kafka_offset)
{_TABLE_SETTINGS}""",
)

_SKIP_INDEX = "TYPE bloom_filter(0.01) GRANULARITY 4"
_V2 = (
    f"ALTER TABLE {DB}.audit ADD INDEX IF NOT EXISTS idx_lot_ids lot_ids {_SKIP_INDEX}",
    f"ALTER TABLE {DB}.verified ADD INDEX IF NOT EXISTS idx_lot_ids lot_ids {_SKIP_INDEX}",
    f"ALTER TABLE {DB}.exceptions ADD INDEX IF NOT EXISTS idx_lot_ids lot_ids {_SKIP_INDEX}",
    f"ALTER TABLE {DB}.lot_events ADD INDEX IF NOT EXISTS idx_parent_lots parent_lots {_SKIP_INDEX}",
)

# --- v3: Avro ingestion -------------------------------------------------------------------
# The sink's fast path hands ClickHouse the Kafka values as Avro (an object container file
# whose records are the topic's records plus the four kafka_* fields) and lets the engine
# decode them: `<table>_avro` (Null engine, columns shaped like the Avro record) feeds
# `<table>` through `<table>_avro_mv`, which does what sinks/rows.py does in Python.

_AVRO_KAFKA = """
    kafka_topic String,
    kafka_partition Int32,
    kafka_offset Int64,
    ingested_at DateTime64(3, 'UTC')"""

_AVRO_DECISION_COMMON = """
    id String,
    node String,
    subject_key String,
    subject_id String,
    decision String,
    confidence Float64,
    reasons Array(Tuple(code String, message String, severity String, evidence Map(String, String))),
    model_version String,
    input_refs Array(Tuple(topic String, partition Int32, offset Int64)),
    event_time DateTime64(3, 'UTC'),
    decision_time DateTime64(3, 'UTC'),
    vendor_id String,
    lot_ids Array(String),"""

_MV_DECISION_COMMON = """
    id, node, subject_key, subject_id, decision, confidence,
    arrayMap(r -> r.code, src.reasons) AS reason_codes,
    toJSONString(src.reasons) AS reasons,
    model_version,
    if(empty(src.input_refs), '', src.input_refs[1].topic) AS input_topic,
    if(empty(src.input_refs), -1, src.input_refs[1].partition) AS input_partition,
    if(empty(src.input_refs), -1, src.input_refs[1].offset) AS input_offset,
    toJSONString(src.input_refs) AS input_refs,
    event_time, decision_time, vendor_id, lot_ids,"""

_MV_KAFKA = "\n    kafka_topic, kafka_partition, kafka_offset, ingested_at"


def _avro_ingest(table: str, avro_columns: str, select: str) -> tuple[str, str]:
    return (
        f"CREATE TABLE IF NOT EXISTS {DB}.{table}_avro ({avro_columns}{_AVRO_KAFKA}\n) ENGINE = Null",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {DB}.{table}_avro_mv TO {DB}.{table} AS SELECT"
        f"{select}{_MV_KAFKA}\nFROM {DB}.{table}_avro AS src",
    )


_V3 = (
    *_avro_ingest(
        "verified",
        f"""{_AVRO_DECISION_COMMON}
    lines Array(Tuple(po_line Int32, material_id String, quantity Float64, unit String,
                      vendor_lot String)),""",
        f"{_MV_DECISION_COMMON}\n    toJSONString(src.lines) AS lines,",
    ),
    *_avro_ingest(
        "exceptions",
        f"""{_AVRO_DECISION_COMMON}
    priority String,
    route_to String,
    recommended_action String,
    historical_pattern String,
    features Map(String, Float64),""",
        f"{_MV_DECISION_COMMON}\n    priority, route_to, recommended_action, historical_pattern, features,",
    ),
    *_avro_ingest(
        "audit",
        f"""{_AVRO_DECISION_COMMON}
    actor String,
    output_topic String,
    output_id String,""",
        f"{_MV_DECISION_COMMON}\n    actor, output_topic, output_id,",
    ),
    *_avro_ingest(
        "lot_events",
        """
    id String,
    lot_id String,
    node String,
    event_type String,
    subject_key String,
    decision String,
    confidence Float64,
    parent_lots Array(String),
    attributes Map(String, String),
    event_time DateTime64(3, 'UTC'),
    decision_time DateTime64(3, 'UTC'),""",
        """
    id, lot_id, node, event_type, subject_key, decision, confidence, parent_lots, attributes,
    event_time, decision_time,""",
    ),
    *_avro_ingest(
        "dead_letters",
        """
    id String,
    node String,
    source_topic String,
    source_partition Int32,
    source_offset Int64,
    original_key Nullable(String),
    original_value Nullable(String),
    error_class String,
    reason String,
    failed_at DateTime64(3, 'UTC'),""",
        """
    id, node, source_topic, source_partition, source_offset, original_key, original_value,
    error_class, reason, failed_at,""",
    ),
    *_avro_ingest(
        "decisions",
        """
    decision_id String,
    exception_id String,
    node String,
    subject_key String,
    resolution String,
    decided_by String,
    decided_at DateTime64(3, 'UTC'),
    reasoning String,
    certainty Float64,""",
        """
    decision_id, exception_id, node, subject_key, resolution, decided_by, decided_at,
    reasoning, certainty,""",
    ),
)

# v4: DeadLetter.original_size (the value may be cut to 64 KiB; this is its full size). The view's
# query is replaced in place (no drop/create window in which an Avro insert would be lost).
_V4 = (
    f"ALTER TABLE {DB}.dead_letters ADD COLUMN IF NOT EXISTS original_size Int64 DEFAULT -1 AFTER original_value",
    f"ALTER TABLE {DB}.dead_letters_avro ADD COLUMN IF NOT EXISTS original_size Int64 DEFAULT -1 AFTER original_value",
    f"""ALTER TABLE {DB}.dead_letters_avro_mv MODIFY QUERY SELECT
    id, node, source_topic, source_partition, source_offset, original_key, original_value,
    original_size, error_class, reason, failed_at,{_MV_KAFKA}
FROM {DB}.dead_letters_avro AS src""",
)

# v5: ExceptionRecord.contributions and .pattern (what pulled confidence down; the historical
# pattern in numbers), stored as JSON like the other nested fields.
_V5 = (
    f"ALTER TABLE {DB}.exceptions ADD COLUMN IF NOT EXISTS contributions String DEFAULT '[]' AFTER features",
    f"ALTER TABLE {DB}.exceptions ADD COLUMN IF NOT EXISTS pattern String DEFAULT '{{}}' AFTER contributions",
    f"ALTER TABLE {DB}.exceptions_avro ADD COLUMN IF NOT EXISTS contributions "
    "Array(Tuple(feature String, logit Float64, text String)) AFTER features",
    f"ALTER TABLE {DB}.exceptions_avro ADD COLUMN IF NOT EXISTS pattern "
    "Tuple(material_id String, reason_code String, prior_receipts Int64, with_reason Int64, "
    "decided_by_person Int64, accepted_by_person Int64) AFTER contributions",
    f"""ALTER TABLE {DB}.exceptions_avro_mv MODIFY QUERY SELECT{_MV_DECISION_COMMON}
    priority, route_to, recommended_action, historical_pattern, features,
    toJSONString(src.contributions) AS contributions, toJSONString(src.pattern) AS pattern,{_MV_KAFKA}
FROM {DB}.exceptions_avro AS src""",
)

# v6: HumanDecision.role, .condition, .reassign_to, .confidence_shown (the review service's decisions).
_DECISION_V6 = (("role", "String DEFAULT ''", "certainty"), ("condition", "String DEFAULT ''", "role"),
                ("reassign_to", "String DEFAULT ''", "condition"),
                ("confidence_shown", "Float64 DEFAULT -1", "reassign_to"))
_V6 = (
    *(f"ALTER TABLE {DB}.{table} ADD COLUMN IF NOT EXISTS {name} {kind} AFTER {after}"
      for table in ("decisions", "decisions_avro") for name, kind, after in _DECISION_V6),
    f"""ALTER TABLE {DB}.decisions_avro_mv MODIFY QUERY SELECT
    decision_id, exception_id, node, subject_key, resolution, decided_by, decided_at,
    reasoning, certainty, role, condition, reassign_to, confidence_shown,{_MV_KAFKA}
FROM {DB}.decisions_avro AS src""",
)

# v7: person decisions on the verified and audit records, and the audit hash chain.
_VERIFIED_V7 = (("decision_source", "String DEFAULT 'MACHINE'", "lines"), ("decided_by", "String DEFAULT ''",
                                                                           "decision_source"),
                ("condition", "String DEFAULT ''", "decided_by"), ("exception_id", "String DEFAULT ''", "condition"))
_AUDIT_V7 = (("role", "String DEFAULT ''", "output_id"), ("resolution", "String DEFAULT ''", "role"),
             ("reasoning", "String DEFAULT ''", "resolution"), ("certainty", "Float64 DEFAULT -1", "reasoning"),
             ("prev_hash", "String DEFAULT ''", "certainty"), ("hash", "String DEFAULT ''", "prev_hash"))
_V7 = (
    *(f"ALTER TABLE {DB}.{table} ADD COLUMN IF NOT EXISTS {name} {kind} AFTER {after}"
      for table, columns in (("verified", _VERIFIED_V7), ("verified_avro", _VERIFIED_V7), ("audit", _AUDIT_V7),
                             ("audit_avro", _AUDIT_V7))
      for name, kind, after in columns),
    f"""ALTER TABLE {DB}.verified_avro_mv MODIFY QUERY SELECT{_MV_DECISION_COMMON}
    toJSONString(src.lines) AS lines, decision_source, decided_by, condition, exception_id,{_MV_KAFKA}
FROM {DB}.verified_avro AS src""",
    f"""ALTER TABLE {DB}.audit_avro_mv MODIFY QUERY SELECT{_MV_DECISION_COMMON}
    actor, output_topic, output_id, role, resolution, reasoning, certainty, prev_hash, hash,{_MV_KAFKA}
FROM {DB}.audit_avro AS src""",
)

# v8: VerifiedRecord/ExceptionRecord.prior_decision (what the documented prior alone would have
# decided), HumanDecision.rebaseline, and the labels the confidence models learn from (lotflow.labels;
# the model checkpoints are pickled state and are not landed).
_VERIFIED_V8 = (("prior_decision", "String DEFAULT ''", "exception_id"),)
_EXCEPTIONS_V8 = (("prior_decision", "String DEFAULT ''", "pattern"),)
_DECISION_V8 = (("rebaseline", "Bool DEFAULT false", "confidence_shown"),)
_V8 = (
    *(f"ALTER TABLE {DB}.{table} ADD COLUMN IF NOT EXISTS {name} {kind} AFTER {after}"
      for table, columns in (("verified", _VERIFIED_V8), ("verified_avro", _VERIFIED_V8),
                             ("exceptions", _EXCEPTIONS_V8), ("exceptions_avro", _EXCEPTIONS_V8),
                             ("decisions", _DECISION_V8), ("decisions_avro", _DECISION_V8))
      for name, kind, after in columns),
    f"""ALTER TABLE {DB}.verified_avro_mv MODIFY QUERY SELECT{_MV_DECISION_COMMON}
    toJSONString(src.lines) AS lines, decision_source, decided_by, condition, exception_id, prior_decision,{_MV_KAFKA}
FROM {DB}.verified_avro AS src""",
    f"""ALTER TABLE {DB}.exceptions_avro_mv MODIFY QUERY SELECT{_MV_DECISION_COMMON}
    priority, route_to, recommended_action, historical_pattern, features,
    toJSONString(src.contributions) AS contributions, toJSONString(src.pattern) AS pattern,
    prior_decision,{_MV_KAFKA}
FROM {DB}.exceptions_avro AS src""",
    f"""ALTER TABLE {DB}.decisions_avro_mv MODIFY QUERY SELECT
    decision_id, exception_id, node, subject_key, resolution, decided_by, decided_at,
    reasoning, certainty, role, condition, reassign_to, confidence_shown, rebaseline,{_MV_KAFKA}
FROM {DB}.decisions_avro AS src""",
    # Sorted by node and vendor ("what did the receiving model learn about this vendor?"); a label's
    # id is its decision's id, so a re-read label replaces its row.
    f"""CREATE TABLE IF NOT EXISTS {DB}.labels (
    label_id String,
    node LowCardinality(String),
    exception_id String,
    subject_id String,
    vendor_id LowCardinality(String),
    material_id LowCardinality(String),
    reason_codes Array(LowCardinality(String)),
    soft_codes Array(LowCardinality(String)),
    features Map(String, Float64),
    good Bool,
    resolution LowCardinality(String),
    confidence Float64,
    spot_check Bool,
    by_rule Bool,
    decided_by LowCardinality(String),
    decided_at DateTime64(3, 'UTC'),
    decision_time DateTime64(3, 'UTC'),{_KAFKA}
) ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(decided_at)
ORDER BY (node, vendor_id, label_id)
{_TABLE_SETTINGS}""",
    *_avro_ingest(
        "labels",
        """
    label_id String,
    node String,
    exception_id String,
    subject_id String,
    vendor_id String,
    material_id String,
    reason_codes Array(String),
    soft_codes Array(String),
    features Map(String, Float64),
    good Bool,
    resolution String,
    confidence Float64,
    spot_check Bool,
    by_rule Bool,
    decided_by String,
    decided_at DateTime64(3, 'UTC'),
    decision_time DateTime64(3, 'UTC'),""",
        """
    label_id, node, exception_id, subject_id, vendor_id, material_id, reason_codes, soft_codes, features,
    good, resolution, confidence, spot_check, by_rule, decided_by, decided_at, decision_time,""",
    ),
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "output, decision and reject tables", _V1),
    Migration(2, "skip indexes for lot ids inside arrays (traceability lookups)", _V2),
    Migration(3, "Avro ingestion: <table>_avro Null tables and <table>_avro_mv views", _V3),
    Migration(4, "dead_letters.original_size", _V4),
    Migration(5, "exceptions.contributions and exceptions.pattern", _V5),
    Migration(6, "decisions.role, condition, reassign_to, confidence_shown", _V6),
    Migration(7, "person decisions on verified and audit records; the audit hash chain", _V7),
    Migration(8, "prior_decision on verified and exceptions; decisions.rebaseline; the labels table", _V8),
)

_MIGRATIONS_TABLE = f"""CREATE TABLE IF NOT EXISTS {DB}.schema_migrations (
    version UInt32,
    description String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version"""


def _render(statement: str, database: str) -> str:
    return statement.replace(DB, quote_identifier(database))


def applied_versions(client: Client, database: str) -> set[int]:
    """Versions recorded in ``database.schema_migrations``."""
    table = f"{quote_identifier(database)}.schema_migrations"
    result = client.query(f"SELECT DISTINCT version FROM {table}")
    return {int(row[0]) for row in result.result_rows}


def migrate(client: Client, database: str) -> list[int]:
    """Create ``database`` and apply pending migrations; return the versions applied now."""
    versions = [m.version for m in MIGRATIONS]
    if versions != sorted(set(versions)):
        raise ValueError("migration versions must be unique and increasing")
    client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
    client.command(_render(_MIGRATIONS_TABLE, database))
    done = applied_versions(client, database)
    applied: list[int] = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for statement in migration.statements:
            client.command(_render(statement, database))
        client.insert(
            "schema_migrations",
            [(migration.version, migration.description)],
            column_names=("version", "description"),
            database=database,
        )
        log.info("ClickHouse migration %d applied: %s", migration.version, migration.description)
        applied.append(migration.version)
    return applied
