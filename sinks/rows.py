"""Decoded output records → ClickHouse rows: pure functions, one per table.

Each ``to_row(record, topic, partition, offset, ingested_at)`` returns a tuple in the order
of its table's ``columns``. Nested Avro values that are read whole (reasons, input refs,
verified lines) are stored as JSON strings next to flattened columns that queries filter
on (``reason_codes``; ``input_topic/partition/offset`` of the first input ref).

``TABLES`` maps every topic the sink reads to its table. The DDL lives in
``sinks/migrations.py``; a test checks both agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

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
from lotflow.verification.outputs import EMPTY_PATTERN

__all__ = [
    "AUDIT_COLUMNS",
    "DEAD_LETTER_COLUMNS",
    "DECISION_COLUMNS",
    "EXCEPTION_COLUMNS",
    "KAFKA_COLUMNS",
    "LABEL_COLUMNS",
    "LOT_EVENT_COLUMNS",
    "REJECTS",
    "REJECT_COLUMNS",
    "TABLES",
    "VERIFIED_COLUMNS",
    "Row",
    "TableSpec",
    "audit_row",
    "dead_letter_row",
    "decision_row",
    "exception_row",
    "label_row",
    "lot_event_row",
    "reject_row",
    "verified_row",
]

Row = tuple[Any, ...]
Record = Mapping[str, Any]
ToRow = Callable[[Record, str, int, int, datetime], Row]

KAFKA_COLUMNS = ("kafka_topic", "kafka_partition", "kafka_offset", "ingested_at")

_DECISION_COMMON = (
    "id",
    "node",
    "subject_key",
    "subject_id",
    "decision",
    "confidence",
    "reason_codes",
    "reasons",
    "model_version",
    "input_topic",
    "input_partition",
    "input_offset",
    "input_refs",
    "event_time",
    "decision_time",
    "vendor_id",
    "lot_ids",
)

VERIFIED_COLUMNS = (*_DECISION_COMMON, "lines", "decision_source", "decided_by", "condition", "exception_id",
                    "prior_decision", *KAFKA_COLUMNS)
EXCEPTION_COLUMNS = (
    *_DECISION_COMMON,
    "priority",
    "route_to",
    "recommended_action",
    "historical_pattern",
    "features",
    "contributions",
    "pattern",
    "prior_decision",
    *KAFKA_COLUMNS,
)
AUDIT_COLUMNS = (*_DECISION_COMMON, "actor", "output_topic", "output_id", "role", "resolution", "reasoning",
                 "certainty", "prev_hash", "hash", *KAFKA_COLUMNS)
LOT_EVENT_COLUMNS = (
    "id",
    "lot_id",
    "node",
    "event_type",
    "subject_key",
    "decision",
    "confidence",
    "parent_lots",
    "attributes",
    "event_time",
    "decision_time",
    *KAFKA_COLUMNS,
)
DEAD_LETTER_COLUMNS = (
    "id",
    "node",
    "source_topic",
    "source_partition",
    "source_offset",
    "original_key",
    "original_value",
    "original_size",
    "error_class",
    "reason",
    "failed_at",
    *KAFKA_COLUMNS,
)
DECISION_COLUMNS = (
    "decision_id",
    "exception_id",
    "node",
    "subject_key",
    "resolution",
    "decided_by",
    "decided_at",
    "reasoning",
    "certainty",
    "role",
    "condition",
    "reassign_to",
    "confidence_shown",
    "rebaseline",
    *KAFKA_COLUMNS,
)
LABEL_COLUMNS = (
    "label_id",
    "node",
    "exception_id",
    "subject_id",
    "vendor_id",
    "material_id",
    "reason_codes",
    "soft_codes",
    "features",
    "good",
    "resolution",
    "confidence",
    "spot_check",
    "by_rule",
    "decided_by",
    "decided_at",
    "decision_time",
    *KAFKA_COLUMNS,
)
REJECT_COLUMNS = (
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "raw_key",
    "raw_value",
    "error_class",
    "error",
    "rejected_at",
)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _reasons(reasons: Sequence[Mapping[str, Any]]) -> tuple[list[str], str]:
    codes = [r["code"] for r in reasons]
    return codes, _json(reasons)


def _input_refs(refs: Sequence[Mapping[str, Any]]) -> tuple[str, int, int, str]:
    if not refs:
        return "", -1, -1, "[]"
    first = refs[0]
    return first["topic"], first["partition"], first["offset"], _json(refs)


def _decision_common(r: Record) -> Row:
    codes, reasons = _reasons(r["reasons"])
    return (
        r["id"],
        r["node"],
        r["subject_key"],
        r["subject_id"],
        r["decision"],
        r["confidence"],
        codes,
        reasons,
        r["model_version"],
        *_input_refs(r["input_refs"]),
        r["event_time"],
        r["decision_time"],
        r.get("vendor_id", ""),
        list(r.get("lot_ids", ())),
    )


def verified_row(r: Record, topic: str, partition: int, offset: int, ingested_at: datetime) -> Row:
    return (
        *_decision_common(r),
        _json(r.get("lines", ())),
        r.get("decision_source", "MACHINE"),
        r.get("decided_by", ""),
        r.get("condition", ""),
        r.get("exception_id", ""),
        r.get("prior_decision", ""),  # '' also for records written before the field existed
        topic,
        partition,
        offset,
        ingested_at,
    )


def exception_row(r: Record, topic: str, partition: int, offset: int, ingested_at: datetime) -> Row:
    return (
        *_decision_common(r),
        r["priority"],
        r["route_to"],
        r["recommended_action"],
        r.get("historical_pattern", ""),
        dict(r.get("features", {})),
        _json(r.get("contributions", ())),
        _json(r.get("pattern", EMPTY_PATTERN)),
        r.get("prior_decision", ""),
        topic,
        partition,
        offset,
        ingested_at,
    )


def audit_row(r: Record, topic: str, partition: int, offset: int, ingested_at: datetime) -> Row:
    return (
        *_decision_common(r),
        r["actor"],
        r["output_topic"],
        r["output_id"],
        r.get("role", ""),
        r.get("resolution", ""),
        r.get("reasoning", ""),
        r.get("certainty", -1.0),
        r.get("prev_hash", ""),
        r.get("hash", ""),
        topic,
        partition,
        offset,
        ingested_at,
    )


def lot_event_row(r: Record, topic: str, partition: int, offset: int, ingested_at: datetime) -> Row:
    return (
        r["id"],
        r["lot_id"],
        r["node"],
        r["event_type"],
        r["subject_key"],
        r["decision"],
        r["confidence"],
        list(r.get("parent_lots", ())),
        dict(r.get("attributes", {})),
        r["event_time"],
        r["decision_time"],
        topic,
        partition,
        offset,
        ingested_at,
    )


def dead_letter_row(r: Record, topic: str, partition: int, offset: int, ingested_at: datetime) -> Row:
    return (
        r["id"],
        r["node"],
        r["source_topic"],
        r["source_partition"],
        r["source_offset"],
        r.get("original_key"),
        r.get("original_value"),
        r.get("original_size", -1),  # -1 also for records written before the field existed
        r["error_class"],
        r["reason"],
        r["failed_at"],
        topic,
        partition,
        offset,
        ingested_at,
    )


def decision_row(r: Record, topic: str, partition: int, offset: int, ingested_at: datetime) -> Row:
    return (
        r["decision_id"],
        r["exception_id"],
        r["node"],
        r["subject_key"],
        r["resolution"],
        r["decided_by"],
        r["decided_at"],
        r.get("reasoning", ""),
        r.get("certainty", 1.0),
        r.get("role", ""),
        r.get("condition", ""),
        r.get("reassign_to", ""),
        r.get("confidence_shown", -1.0),
        bool(r.get("rebaseline", False)),
        topic,
        partition,
        offset,
        ingested_at,
    )


def label_row(r: Record, topic: str, partition: int, offset: int, ingested_at: datetime) -> Row:
    return (
        r["label_id"],
        r["node"],
        r["exception_id"],
        r["subject_id"],
        r["vendor_id"],
        r["material_id"],
        list(r.get("reason_codes", ())),
        list(r.get("soft_codes", ())),
        dict(r["features"]),
        bool(r["good"]),
        r["resolution"],
        r["confidence"],
        bool(r.get("spot_check", False)),
        bool(r.get("by_rule", False)),
        r["decided_by"],
        r["decided_at"],
        r["decision_time"],
        topic,
        partition,
        offset,
        ingested_at,
    )


def reject_row(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error_class: str,
    error: str,
    rejected_at: datetime,
) -> Row:
    """A record the sink could not decode or map, kept with its raw bytes."""
    return (topic, partition, offset, key, value, error_class, error, rejected_at)


@dataclass(frozen=True)
class TableSpec:
    """Where one topic's records go and how a record becomes a row."""

    table: str
    columns: tuple[str, ...]
    to_row: ToRow
    avro_table: str | None = None
    """Null table whose materialized view maps raw Avro records into ``table`` (fast path)."""

    def __post_init__(self) -> None:
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"duplicate column in {self.table}")


TABLES: Mapping[TopicSpec, TableSpec] = {
    VERIFIED: TableSpec("verified", VERIFIED_COLUMNS, verified_row, "verified_avro"),
    EXCEPTIONS: TableSpec("exceptions", EXCEPTION_COLUMNS, exception_row, "exceptions_avro"),
    AUDIT: TableSpec("audit", AUDIT_COLUMNS, audit_row, "audit_avro"),
    LOT_EVENTS: TableSpec("lot_events", LOT_EVENT_COLUMNS, lot_event_row, "lot_events_avro"),
    DEAD_LETTERS: TableSpec("dead_letters", DEAD_LETTER_COLUMNS, dead_letter_row, "dead_letters_avro"),
    DECISIONS: TableSpec("decisions", DECISION_COLUMNS, decision_row, "decisions_avro"),
    LABELS: TableSpec("labels", LABEL_COLUMNS, label_row, "labels_avro"),
}
"""Every topic the sink reads (the output topics, decisions and the models' labels) → its table.
Model checkpoints (pickled learner state) are not landed."""

REJECTS = "sink_rejects"
"""Table of records the sink could not decode or map (columns: ``REJECT_COLUMNS``)."""
