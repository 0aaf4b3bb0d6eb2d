"""sinks/rows.py: decoded records → rows, the table registry, and its agreement with the DDL."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime
from typing import Any

import fastavro
import pytest

from lotflow.schemas.serde import AvroCodec, BundledSchemas, bundled_schema_json
from lotflow.settings import Settings
from lotflow.sinks.framing import avro_container, avro_long, avro_string, container_header
from lotflow.sinks.migrations import MIGRATIONS
from lotflow.sinks.rows import (
    KAFKA_COLUMNS,
    REJECT_COLUMNS,
    REJECTS,
    TABLES,
    TableSpec,
    audit_row,
    dead_letter_row,
    decision_row,
    exception_row,
    label_row,
    lot_event_row,
    reject_row,
    verified_row,
)
from lotflow.streams.topics import (
    AUDIT,
    DEAD_LETTERS,
    DECISIONS,
    EXCEPTIONS,
    LABELS,
    LEARNING,
    LOT_EVENTS,
    MODEL_CHECKPOINTS,
    OUTPUTS,
    VERIFIED,
    TopicSpec,
)

T0 = datetime(2026, 3, 14, 9, 26, 53, 589000, tzinfo=UTC)
T1 = datetime(2026, 3, 14, 9, 27, 0, 0, tzinfo=UTC)
INGESTED = datetime(2026, 3, 14, 9, 30, 0, 0, tzinfo=UTC)

REASONS = [
    {
        "code": "UNIT_MISMATCH",
        "message": "receipt in lb, PO in kg",
        "severity": "WARN",
        "evidence": {"po_unit": "kg", "receipt_unit": "lb"},
    },
    {"code": "QTY_DISCREPANCY", "message": "3.1 % short", "severity": "BLOCK", "evidence": {}},
]
REFS = [
    {"topic": "plant.receipts", "partition": 2, "offset": 41},
    {"topic": "erp.purchase-orders", "partition": 2, "offset": 7},
]


def decision_common(decision: str = "VERIFIED") -> dict[str, Any]:
    return {
        "id": "receiving:plant.receipts:2:41",
        "node": "receiving",
        "subject_key": "PO-1001",
        "subject_id": "R-77",
        "decision": decision,
        "confidence": 0.93,
        "reasons": REASONS,
        "model_version": "receiving-v3",
        "input_refs": REFS,
        "event_time": T0,
        "decision_time": T1,
        "vendor_id": "V-9",
        "lot_ids": ["L-1", "L-2"],
    }


SAMPLES: dict[TopicSpec, dict[str, Any]] = {
    VERIFIED: {
        **decision_common(),
        "lines": [
            {"po_line": 1, "material_id": "M-1", "quantity": 12.5, "unit": "kg", "vendor_lot": "VL-1"},
        ],
        "prior_decision": "EXCEPTION",  # the prior alone would have raised it; the learnt model did not
    },
    EXCEPTIONS: {
        **decision_common("EXCEPTION"),
        "priority": "HIGH",
        "route_to": "receiving",
        "recommended_action": "recount",
        "historical_pattern": "rare",
        "features": {"qty_ratio": 0.969, "price_z": 1.5},
        "prior_decision": "EXCEPTION",
    },
    AUDIT: {
        **decision_common(),
        "actor": "node:receiving",
        "output_topic": "lotflow.verified",
        "output_id": "receiving:plant.receipts:2:41",
    },
    LOT_EVENTS: {
        "id": "receiving:plant.receipts:2:41:L-1",
        "lot_id": "L-1",
        "node": "receiving",
        "event_type": "RECEIVED",
        "subject_key": "PO-1001",
        "decision": "VERIFIED",
        "confidence": 0.93,
        "parent_lots": ["VL-1"],
        "attributes": {"vendor": "V-9"},
        "event_time": T0,
        "decision_time": T1,
    },
    DEAD_LETTERS: {
        "id": "receiving:plant.receipts:0:5",
        "node": "receiving",
        "source_topic": "plant.receipts",
        "source_partition": 0,
        "source_offset": 5,
        "original_key": b"PO-1",
        "original_value": b"\x00\xff\x01",
        "error_class": "DECODE",
        "reason": "truncated",
        "failed_at": T1,
    },
    DECISIONS: {
        "decision_id": "D-1",
        "exception_id": "receiving:plant.receipts:2:41",
        "node": "receiving",
        "subject_key": "PO-1001",
        "resolution": "ACCEPT",
        "decided_by": "maria.lopez",
        "decided_at": T1,
        "reasoning": "vendor confirmed",
        "certainty": 0.8,
        "rebaseline": True,
    },
    LABELS: {
        "label_id": "D-1",
        "node": "receiving",
        "exception_id": "receiving:plant.receipts:2:41",
        "subject_id": "R-77",
        "vendor_id": "V-9",
        "material_id": "M-1",
        "reason_codes": ["UNIT_MISMATCH", "QTY_DISCREPANCY"],
        "soft_codes": ["QTY_DISCREPANCY"],
        "features": {"qty_ratio": 0.969, "price_z": 1.5},
        "good": True,
        "resolution": "ACCEPT",
        "confidence": 0.42,
        "spot_check": False,
        "decided_by": "maria.lopez",
        "decided_at": T1,
        "decision_time": INGESTED,
    },
}



def row_dict(spec: TopicSpec, record: dict[str, Any]) -> dict[str, Any]:
    table = TABLES[spec]
    row = table.to_row(record, "t.lotflow.x", 3, 99, INGESTED)
    assert len(row) == len(table.columns)
    return dict(zip(table.columns, row, strict=True))


def test_registry_covers_outputs_decisions_and_labels() -> None:
    assert set(TABLES) == {*OUTPUTS, DECISIONS, LABELS}
    assert MODEL_CHECKPOINTS in LEARNING and MODEL_CHECKPOINTS not in TABLES  # pickled state: not landed
    names = [t.table for t in TABLES.values()]
    assert sorted(names) == sorted(
        ["verified", "exceptions", "audit", "lot_events", "dead_letters", "decisions", "labels"]
    )
    assert REJECTS not in names
    for table in TABLES.values():
        assert table.columns[-4:] == KAFKA_COLUMNS
        assert table.avro_table == f"{table.table}_avro"


def test_label_topics_are_single_partition_and_kept() -> None:
    settings = Settings(partitions=8)
    assert LABELS.partitions(settings) == MODEL_CHECKPOINTS.partitions(settings) == 1
    assert LABELS.config() == {"cleanup.policy": "delete", "retention.ms": "-1"}  # never deleted
    assert MODEL_CHECKPOINTS.config() == {"cleanup.policy": "compact"}
    assert LABELS.key == MODEL_CHECKPOINTS.key == "node"
    assert not set(LEARNING) & set(OUTPUTS)


def test_table_spec_refuses_duplicate_columns() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        TableSpec("x", ("a", "a"), verified_row)


def test_decision_columns_flatten_reasons_and_input_refs() -> None:
    row = row_dict(AUDIT, SAMPLES[AUDIT])
    assert row["reason_codes"] == ["UNIT_MISMATCH", "QTY_DISCREPANCY"]
    assert json.loads(row["reasons"]) == REASONS
    assert (row["input_topic"], row["input_partition"], row["input_offset"]) == (
        "plant.receipts",
        2,
        41,
    )
    assert json.loads(row["input_refs"]) == REFS
    assert row["event_time"] == T0 and row["decision_time"] == T1
    assert row["lot_ids"] == ["L-1", "L-2"]
    assert (row["actor"], row["output_topic"]) == ("node:receiving", "lotflow.verified")
    assert (row["kafka_topic"], row["kafka_partition"], row["kafka_offset"]) == ("t.lotflow.x", 3, 99)
    assert row["ingested_at"] == INGESTED


def test_no_input_refs_and_no_reasons() -> None:
    record = {**SAMPLES[VERIFIED], "input_refs": [], "reasons": []}
    row = row_dict(VERIFIED, record)
    assert (row["input_topic"], row["input_partition"], row["input_offset"]) == ("", -1, -1)
    assert row["input_refs"] == "[]" and row["reasons"] == "[]" and row["reason_codes"] == []


def test_verified_lines_are_json() -> None:
    row = row_dict(VERIFIED, SAMPLES[VERIFIED])
    assert json.loads(row["lines"]) == SAMPLES[VERIFIED]["lines"]
    assert row["decision"] == "VERIFIED"


def test_exception_routing_and_features() -> None:
    row = row_dict(EXCEPTIONS, SAMPLES[EXCEPTIONS])
    assert (row["priority"], row["route_to"], row["recommended_action"]) == (
        "HIGH",
        "receiving",
        "recount",
    )
    assert row["features"] == {"qty_ratio": 0.969, "price_z": 1.5}


def test_lot_event_dead_letter_and_decision_rows() -> None:
    lot = row_dict(LOT_EVENTS, SAMPLES[LOT_EVENTS])
    assert (lot["lot_id"], lot["parent_lots"], lot["attributes"]) == ("L-1", ["VL-1"], {"vendor": "V-9"})
    dead = row_dict(DEAD_LETTERS, SAMPLES[DEAD_LETTERS])
    assert (dead["original_key"], dead["original_value"]) == (b"PO-1", b"\x00\xff\x01")
    assert row_dict(DEAD_LETTERS, {**SAMPLES[DEAD_LETTERS], "original_key": None})["original_key"] is None
    decision = row_dict(DECISIONS, SAMPLES[DECISIONS])
    assert (decision["decision_id"], decision["resolution"], decision["certainty"]) == ("D-1", "ACCEPT", 0.8)


def test_label_row() -> None:
    row = row_dict(LABELS, SAMPLES[LABELS])
    assert (row["label_id"], row["node"], row["vendor_id"], row["material_id"]) == ("D-1", "receiving", "V-9", "M-1")
    assert (row["reason_codes"], row["soft_codes"]) == (["UNIT_MISMATCH", "QTY_DISCREPANCY"], ["QTY_DISCREPANCY"])
    assert row["features"] == {"qty_ratio": 0.969, "price_z": 1.5}
    assert (row["good"], row["resolution"], row["confidence"], row["spot_check"]) == (True, "ACCEPT", 0.42, False)
    assert (row["decided_at"], row["decision_time"]) == (T1, INGESTED)
    assert (row["kafka_topic"], row["kafka_partition"], row["kafka_offset"]) == ("t.lotflow.x", 3, 99)
    record = {k: v for k, v in SAMPLES[LABELS].items() if k not in ("reason_codes", "soft_codes", "spot_check")}
    row = row_dict(LABELS, record)
    assert (row["reason_codes"], row["soft_codes"], row["spot_check"]) == ([], [], False)


def test_prior_decision_and_rebaseline() -> None:
    assert row_dict(VERIFIED, SAMPLES[VERIFIED])["prior_decision"] == "EXCEPTION"
    assert row_dict(EXCEPTIONS, SAMPLES[EXCEPTIONS])["prior_decision"] == "EXCEPTION"
    assert row_dict(DECISIONS, SAMPLES[DECISIONS])["rebaseline"] is True


def test_fields_added_later_default_for_records_written_before_them() -> None:
    """Records on the topics from before v8 (no prior_decision, no rebaseline) still map."""
    for spec in (VERIFIED, EXCEPTIONS):
        record = {k: v for k, v in SAMPLES[spec].items() if k != "prior_decision"}
        assert row_dict(spec, record)["prior_decision"] == ""
    record = {k: v for k, v in SAMPLES[DECISIONS].items() if k != "rebaseline"}
    assert row_dict(DECISIONS, record)["rebaseline"] is False


def test_defaults_of_optional_fields() -> None:
    record = {k: v for k, v in SAMPLES[DECISIONS].items() if k not in ("reasoning", "certainty")}
    row = row_dict(DECISIONS, record)
    assert (row["reasoning"], row["certainty"]) == ("", 1.0)
    record = {k: v for k, v in SAMPLES[AUDIT].items() if k not in ("vendor_id", "lot_ids")}
    row = row_dict(AUDIT, record)
    assert (row["vendor_id"], row["lot_ids"]) == ("", [])


def test_missing_required_field_raises() -> None:
    record = {k: v for k, v in SAMPLES[AUDIT].items() if k != "subject_key"}
    with pytest.raises(KeyError):
        audit_row(record, "t", 0, 0, INGESTED)


@pytest.mark.parametrize("spec", list(SAMPLES), ids=lambda s: s.name)
def test_every_sample_survives_the_avro_round_trip(spec: TopicSpec) -> None:
    codec = AvroCodec(BundledSchemas.default(), f"{spec.name}-value", spec.schema)
    decoded = codec.decode(codec.encode(SAMPLES[spec]))
    assert row_dict(spec, decoded) == row_dict(spec, SAMPLES[spec])


def test_reject_row_keeps_raw_bytes() -> None:
    row = reject_row("t", 1, 2, b"k", b"\x01garbage", "DECODE", "bad magic", INGESTED)
    assert dict(zip(REJECT_COLUMNS, row, strict=True)) == {
        "kafka_topic": "t",
        "kafka_partition": 1,
        "kafka_offset": 2,
        "raw_key": b"k",
        "raw_value": b"\x01garbage",
        "error_class": "DECODE",
        "error": "bad magic",
        "rejected_at": INGESTED,
    }


def test_to_row_functions_are_the_registered_ones() -> None:
    specs = (VERIFIED, EXCEPTIONS, AUDIT, LOT_EVENTS, DEAD_LETTERS, DECISIONS, LABELS)
    assert [TABLES[s].to_row for s in specs] == [
        verified_row,
        exception_row,
        audit_row,
        lot_event_row,
        dead_letter_row,
        decision_row,
        label_row,
    ]


# --- DDL agreement ------------------------------------------------------------------------


def ddl_columns(table: str) -> list[str]:
    """Column names, in order, of ``CREATE TABLE ... {db}.<table> (...)`` in the migrations,
    with the columns later versions add."""
    sql = "\n".join(s for m in MIGRATIONS for s in m.statements)
    match = re.search(rf"CREATE TABLE IF NOT EXISTS \{{db\}}\.{table} \(", sql)
    assert match, f"no CREATE TABLE for {table}"
    depth, start, items = 1, match.end(), []
    pos = start
    while depth:
        ch = sql[pos]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if (ch == "," and depth == 1) or depth == 0:
            items.append(sql[start:pos].strip())
            start = pos + 1
        pos += 1
    columns = [item.split()[0] for item in items if item]
    # later versions: ALTER TABLE {db}.<table> ADD COLUMN IF NOT EXISTS <name> ... AFTER <column>
    for added, after in re.findall(
        rf"ALTER TABLE \{{db\}}\.{table} ADD COLUMN IF NOT EXISTS (\w+) .*? AFTER (\w+)", sql
    ):
        if added not in columns:
            columns.insert(columns.index(after) + 1, added)
    return columns


@pytest.mark.parametrize("spec", list(TABLES), ids=lambda s: s.name)
def test_ddl_columns_match_row_columns(spec: TopicSpec) -> None:
    assert ddl_columns(TABLES[spec].table) == list(TABLES[spec].columns)


def test_reject_table_matches_reject_columns() -> None:
    assert ddl_columns(REJECTS) == list(REJECT_COLUMNS)


@pytest.mark.parametrize("spec", list(TABLES), ids=lambda s: s.name)
def test_avro_ingest_table_is_shaped_like_the_schema(spec: TopicSpec) -> None:
    avro_table = TABLES[spec].avro_table
    assert avro_table is not None
    fields = [f["name"] for f in bundled_schema_json(spec.schema)["fields"]]
    assert ddl_columns(avro_table) == [*fields, *KAFKA_COLUMNS]


def test_migrations_are_versioned_and_idempotent_sql() -> None:
    versions = [m.version for m in MIGRATIONS]
    assert versions == sorted(set(versions)) and versions[0] == 1
    for migration in MIGRATIONS:
        for statement in migration.statements:
            # IF NOT EXISTS, or replacing a view's query (the same result when repeated)
            assert "IF NOT EXISTS" in statement or " MODIFY QUERY " in statement, statement[:80]


# --- Avro container framing (fast path) ---------------------------------------------------


def test_avro_container_reads_back_with_kafka_fields() -> None:
    codec = AvroCodec(BundledSchemas.default(), "audit-value", AUDIT.schema)
    sync = bytes(range(16))
    header = container_header(bundled_schema_json(AUDIT.schema), sync)
    values = [codec.encode({**SAMPLES[AUDIT], "id": f"a{i}"}) for i in range(3)]
    offsets = [5, 300, 2**40]
    data = avro_container(
        header,
        sync,
        avro_string("t.lotflow.audit") + avro_long(7),
        [(v, o, 1_773_480_000_000 + i) for i, (v, o) in enumerate(zip(values, offsets, strict=True))],
    )
    records = list(fastavro.reader(io.BytesIO(data)))
    assert [r["id"] for r in records] == ["a0", "a1", "a2"]
    assert [r["kafka_offset"] for r in records] == offsets
    assert {(r["kafka_topic"], r["kafka_partition"]) for r in records} == {("t.lotflow.audit", 7)}
    assert records[1]["ingested_at"] == datetime.fromtimestamp(1_773_480_000.001, UTC)
    assert records[0]["reasons"][0]["evidence"] == REASONS[0]["evidence"]
    assert {r["confluent_header"] for r in records} == {values[0][:5]}


@pytest.mark.parametrize("n", [0, 1, -1, 63, -64, 64, 300, 2**31, -(2**40)])
def test_varint_is_avro_long(n: int) -> None:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema("long"), n)
    assert avro_long(n) == buf.getvalue()
