"""What the review service reads from ClickHouse: queues, one exception, its history.

Every query binds its values server-side (``{name:Type}``): nothing a record or a request
carries is ever spliced into SQL. Reads use ``FINAL`` (the tables are ReplacingMergeTree: a
replayed record replaces its row). An exception is open while no person decision resolves it;
a reassignment is a decision that keeps it open in another queue (the exception row written
again by the worker carries the new queue, and until then the service shows the move itself).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

__all__ = ["DecisionRow", "ExceptionRow", "QueueFilter", "ReviewStore"]

RESOLVING = ("ACCEPT", "CONDITIONAL_ACCEPT", "REWORK", "REJECT")  # a REASSIGN keeps it open
MAX_PAGE = 500


@dataclass(frozen=True, slots=True)
class QueueFilter:
    vendor: str = ""
    material: str = ""
    reason: str = ""
    priority: str = ""  # HIGH | NORMAL | ""
    max_confidence: float | None = None
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True, slots=True)
class ExceptionRow:
    id: str
    subject_key: str
    subject_id: str
    queue: str
    priority: str
    confidence: float
    reason_codes: list[str]
    vendor_id: str
    material_id: str
    lot_ids: list[str]
    event_time: datetime
    decision_time: datetime
    recommended_action: str = ""
    historical_pattern: str = ""
    reasons: list[dict[str, Any]] | None = None
    contributions: list[dict[str, Any]] | None = None
    pattern: dict[str, Any] | None = None
    features: dict[str, float] | None = None
    input_refs: list[dict[str, Any]] | None = None
    model_version: str = ""


@dataclass(frozen=True, slots=True)
class DecisionRow:
    decision_id: str
    exception_id: str
    resolution: str
    decided_by: str
    role: str
    decided_at: datetime
    reasoning: str
    certainty: float
    condition: str
    reassign_to: str
    confidence_shown: float


_LIST_COLUMNS = """id, subject_key, subject_id, route_to, priority, confidence, reason_codes, vendor_id,
    JSONExtractString(pattern, 'material_id') AS material_id, lot_ids, event_time, decision_time"""
# the queue an exception is in now: its last reassignment's, else the one it was routed to
_QUEUE = "transform(id, {moved:Array(String)}, {moved_to:Array(String)}, route_to)"
_DETAIL_COLUMNS = f"""{_LIST_COLUMNS}, recommended_action, historical_pattern, reasons, contributions, pattern,
    features, input_refs, model_version"""
_DECISION_COLUMNS = """decision_id, exception_id, resolution, decided_by, role, decided_at, reasoning, certainty,
    condition, reassign_to, confidence_shown"""


class ReviewStore:
    """Queries over the sink's tables in ``database``; ``client`` may be shared with the sink."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.db = quote_identifier(database)

    # --- queues -------------------------------------------------------------------------
    def moves(self) -> dict[str, str]:
        """Exception id -> the queue its last reassignment moved it to. Reassignments are few, so
        they are read once per request and applied as two small arrays, not joined to every row."""
        rows = self.client.query(f"SELECT exception_id, argMax(reassign_to, decided_at) FROM {self.db}.decisions "
                                 "FINAL WHERE resolution = 'REASSIGN' GROUP BY exception_id").result_rows
        return {str(xid): str(queue) for xid, queue in rows}

    def _open_where(self, queues: Iterable[str], f: QueueFilter, exclude: Iterable[str],
                    moves: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
        queue_list = list(queues)
        where = [f"id NOT IN (SELECT exception_id FROM {self.db}.decisions FINAL "
                 "WHERE resolution IN {resolving:Array(String)})", "NOT has({exclude:Array(String)}, id)",
                 "queue IN {queues:Array(String)}"]
        params: dict[str, Any] = {"resolving": list(RESOLVING), "exclude": list(exclude), "queues": queue_list,
                                  "moved": list(moves), "moved_to": list(moves.values())}
        if f.vendor:
            where.append("vendor_id = {vendor:String}")
            params["vendor"] = f.vendor
        if f.material:
            where.append("JSONExtractString(pattern, 'material_id') = {material:String}")
            params["material"] = f.material
        if f.reason:
            where.append("has(reason_codes, {reason:String})")
            params["reason"] = f.reason
        if f.priority:
            where.append("priority = {priority:String}")
            params["priority"] = f.priority
        if f.max_confidence is not None:
            where.append("confidence <= {max_confidence:Float64}")
            params["max_confidence"] = f.max_confidence
        return " AND ".join(where), params

    def open_exceptions(self, queues: Iterable[str], f: QueueFilter = QueueFilter(),
                        exclude: Iterable[str] = ()) -> list[ExceptionRow]:
        """Open exceptions of ``queues``: HIGH priority first, then oldest first."""
        moves = self.moves()
        where, params = self._open_where(queues, f, exclude, moves)
        params.update(limit=max(1, min(f.limit, MAX_PAGE)), offset=max(0, f.offset))
        rows = self.client.query(
            f"SELECT {_LIST_COLUMNS}, {_QUEUE} AS queue FROM {self.db}.exceptions FINAL WHERE {where} "
            "ORDER BY priority = 'HIGH' DESC, decision_time ASC, id LIMIT {limit:UInt32} OFFSET {offset:UInt32}",
            parameters=params).result_rows
        return [_moved(_list_row(r), moves) for r in rows]

    def queue_counts(self, queues: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, int]:
        queue_list = list(queues)
        moves = self.moves()
        where, params = self._open_where(queue_list, QueueFilter(), exclude, moves)
        rows = self.client.query(f"SELECT {_QUEUE} AS queue, count() FROM {self.db}.exceptions FINAL WHERE {where} "
                                 "GROUP BY queue", parameters=params).result_rows
        counts = dict.fromkeys(queue_list, 0)
        counts.update({str(q): int(n) for q, n in rows})
        return counts

    # --- one exception -------------------------------------------------------------------
    def exception(self, exception_id: str) -> ExceptionRow | None:
        rows = self.client.query(f"SELECT {_DETAIL_COLUMNS} FROM {self.db}.exceptions FINAL "
                                 "WHERE id = {id:String} LIMIT 1", parameters={"id": exception_id}).result_rows
        return _moved(_detail_row(rows[0]), self.moves()) if rows else None

    def decisions_on(self, exception_id: str) -> list[DecisionRow]:
        rows = self.client.query(f"SELECT {_DECISION_COLUMNS} FROM {self.db}.decisions FINAL "
                                 "WHERE exception_id = {id:String} ORDER BY decided_at",
                                 parameters={"id": exception_id}).result_rows
        return [DecisionRow(*r) for r in rows]

    def earlier_decisions(self, vendor: str, material: str, limit: int = 20) -> list[tuple[DecisionRow, str]]:
        """Person decisions on this vendor's exceptions for this material, newest first, with their reasons."""
        rows = self.client.query(
            f"SELECT {', '.join('d.' + c.strip() for c in _DECISION_COLUMNS.split(','))}, "
            "arrayStringConcat(e.reason_codes, ', ') "
            f"FROM {self.db}.decisions AS d FINAL INNER JOIN "
            f"(SELECT id, reason_codes FROM {self.db}.exceptions FINAL WHERE vendor_id = {{vendor:String}} "
            "AND JSONExtractString(pattern, 'material_id') = {material:String}) AS e ON d.exception_id = e.id "
            "ORDER BY d.decided_at DESC LIMIT {limit:UInt32}",
            parameters={"vendor": vendor, "material": material, "limit": limit}).result_rows
        return [(DecisionRow(*r[:11]), str(r[11])) for r in rows]

    def lot_events(self, lots: Iterable[str]) -> list[dict[str, Any]]:
        rows = self.client.query(
            f"SELECT lot_id, event_type, node, decision, confidence, decision_time, subject_key "
            f"FROM {self.db}.lot_events FINAL WHERE has({{lots:Array(String)}}, lot_id) "
            "ORDER BY decision_time, lot_id", parameters={"lots": list(lots)}).result_rows
        names = ("lot_id", "event_type", "node", "decision", "confidence", "decision_time", "subject_key")
        return [dict(zip(names, r, strict=True)) for r in rows]

    def pattern(self, vendor: str, material: str, reason: str) -> dict[str, int]:
        """The historical pattern from everything stored: this vendor's decided receipts of the material,
        how many had the reason, how many of those a person decided and accepted."""
        params = {"vendor": vendor, "material": material, "reason": reason, "accepting": ["ACCEPT",
                                                                                           "CONDITIONAL_ACCEPT"],
                  "resolving": list(RESOLVING)}
        receipts = self.client.query(
            f"SELECT uniqExact(id) FROM {self.db}.verified FINAL WHERE vendor_id = {{vendor:String}} "
            "AND has(JSONExtract(lines, 'Array(Tuple(material_id String))').1, {material:String})",
            parameters=params).result_rows[0][0]
        row = self.client.query(
            f"SELECT uniqExact(e.id), uniqExactIf(e.id, has(e.reason_codes, {{reason:String}})), "
            "uniqExactIf(e.id, has(e.reason_codes, {reason:String}) AND d.resolution IN {resolving:Array(String)}), "
            "uniqExactIf(e.id, has(e.reason_codes, {reason:String}) AND d.resolution IN {accepting:Array(String)}) "
            f"FROM (SELECT id, reason_codes FROM {self.db}.exceptions FINAL WHERE vendor_id = {{vendor:String}} "
            "AND JSONExtractString(pattern, 'material_id') = {material:String}) AS e "
            f"LEFT JOIN (SELECT exception_id, resolution FROM {self.db}.decisions FINAL) AS d "
            "ON d.exception_id = e.id", parameters=params).result_rows[0]
        exceptions, with_reason, decided, accepted = (int(v) for v in row)
        return {"prior_receipts": int(receipts) + exceptions, "with_reason": with_reason, "decided_by_person": decided,
                "accepted_by_person": accepted}


def _moved(row: ExceptionRow, moves: Mapping[str, str]) -> ExceptionRow:
    queue = moves.get(row.id)
    return row if queue is None or queue == row.queue else dataclasses.replace(row, queue=queue)


def _json_field(value: Any, default: Any) -> Any:
    if not value:
        return default
    return json.loads(value) if isinstance(value, str) else value


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)  # DateTime64(3, 'UTC') read naive


def _list_row(r: Sequence[Any]) -> ExceptionRow:
    return ExceptionRow(id=r[0], subject_key=r[1], subject_id=r[2], queue=r[3], priority=r[4], confidence=r[5],
                        reason_codes=list(r[6]), vendor_id=r[7], material_id=r[8], lot_ids=list(r[9]),
                        event_time=_utc(r[10]), decision_time=_utc(r[11]))


def _detail_row(r: Sequence[Any]) -> ExceptionRow:
    base = _list_row(r[:12])
    extra: Mapping[str, Any] = {
        "recommended_action": r[12], "historical_pattern": r[13], "reasons": _json_field(r[14], []),
        "contributions": _json_field(r[15], []), "pattern": _json_field(r[16], {}), "features": dict(r[17]),
        "input_refs": _json_field(r[18], []), "model_version": r[19]}
    return dataclasses.replace(base, **extra)
