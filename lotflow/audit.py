"""``lotflow audit verify``, ``lotflow why ID`` and ``lotflow holds``: reading the trail back.

``verify`` walks every audit partition in offset order and recomputes each record's hash
(``lotflow/verification/chain.py``): the first row whose content no longer gives its hash, or
whose ``prev_hash`` is not the hash of the row before it, is reported, and the command fails.
``why`` tells one receipt's, lot's, exception's or PO's story in order from the stored records.
With the embedded engine these open the engine themselves, so run them while no other process
(the sink, the review service) holds it; against a server they run any time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

from lotflow.verification.chain import link

__all__ = ["Break", "holds", "verify_chain", "why"]

_CHAIN_COLUMNS = ("id", "node", "subject_key", "subject_id", "decision", "confidence", "reasons", "model_version",
                  "input_refs", "event_time", "decision_time", "vendor_id", "lot_ids", "actor", "output_topic",
                  "output_id", "role", "resolution", "reasoning", "certainty")


@dataclass(frozen=True, slots=True)
class Break:
    partition: int
    offset: int
    id: str
    problem: str


def _millis(value: Any) -> int:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return round(aware.timestamp() * 1000)
    return int(value)


def _record(row: Sequence[Any]) -> dict[str, Any]:
    record = dict(zip(_CHAIN_COLUMNS, row, strict=True))
    record["reasons"] = json.loads(record["reasons"])
    record["input_refs"] = json.loads(record["input_refs"])
    record["event_time"] = _millis(record["event_time"])
    record["decision_time"] = _millis(record["decision_time"])
    record["lot_ids"] = list(record["lot_ids"])
    return record


def verify_chain(client: Client, database: str,
                 progress: Callable[[str], None] | None = None) -> tuple[int, Break | None]:
    """(audit records checked, the first broken link or None)."""
    db = quote_identifier(database)
    checked = 0
    previous: dict[int, str] = {}
    with client.query_row_block_stream(
            f"SELECT kafka_partition, kafka_offset, {', '.join(_CHAIN_COLUMNS)}, prev_hash, hash "
            f"FROM {db}.audit FINAL ORDER BY kafka_partition, kafka_offset") as stream:
        for block in stream:
            for row in block:
                partition, offset, prev_hash, stored = int(row[0]), int(row[1]), row[-2], row[-1]
                record = _record(row[2:-2])
                checked += 1
                if progress is not None and checked % 100_000 == 0:
                    progress(f"{checked} audit records checked")
                if not stored and partition not in previous:
                    continue  # written before the chain existed (an upgraded database): nothing to check
                if not stored:
                    return checked, Break(partition, offset, record["id"],
                                          "a record without a hash after the chain began (inserted afterwards)")
                expected_prev = previous.get(partition, "")
                if prev_hash != expected_prev:
                    what = "the first record of its partition names a predecessor" if not expected_prev else \
                        "its prev_hash is not the hash of the record before it (a record deleted or inserted)"
                    return checked, Break(partition, offset, record["id"], what)
                if link(prev_hash, record) != stored:
                    return checked, Break(partition, offset, record["id"],
                                          "its content does not give its hash (the record was altered)")
                previous[partition] = stored
    return checked, None


def _rows(client: Client, sql: str, parameters: dict[str, Any]) -> Iterator[dict[str, Any]]:
    result = client.query(sql, parameters=parameters)
    for row in result.result_rows:
        yield dict(zip(result.column_names, row, strict=True))


def why(client: Client, database: str, subject: str) -> list[str]:
    """The story of a receipt, lot, exception or PO, oldest first, as lines of text."""
    db = quote_identifier(database)
    params = {"s": subject}
    audits = list(_rows(client, (
        f"SELECT * FROM {db}.audit FINAL WHERE id = {{s:String}} OR subject_id = {{s:String}} "
        "OR subject_key = {s:String} OR output_id = {s:String} OR has(lot_ids, {s:String}) "
        "OR startsWith(id, concat({s:String}, ':')) ORDER BY decision_time, kafka_partition, kafka_offset"), params))
    if not audits:
        return [f"nothing stored about {subject!r} (a receipt, lot, exception id or PO number)"]
    lines = [f"The story of {subject}:"]
    lots: set[str] = set()
    for a in audits:
        lots.update(a["lot_ids"])
        when = a["decision_time"]
        person = str(a["actor"]).startswith("person:")
        lines.append("")
        lines.append(f"{when} {'PERSON' if person else 'MACHINE'} {a['actor']}: {a['output_topic']} {a['output_id']}")
        lines.append(f"  receipt {a['subject_id']} on PO {a['subject_key']}, vendor {a['vendor_id']}, "
                     f"lots {', '.join(a['lot_ids'])}")
        refs = json.loads(a["input_refs"])
        lines.append("  inputs: " + "; ".join(f"{r['topic']}[{r['partition']}]@{r['offset']}" for r in refs))
        if person:
            lines.append(f"  decision: {a['resolution']} by {str(a['actor'])[7:]} as {a['role']}, certainty "
                         f"{100 * float(a['certainty']):.0f} %, "
                         f"model confidence then {100 * float(a['confidence']):.1f} %")
            lines.append(f"  reasoning: {a['reasoning']}")
        else:
            lines.append(f"  decision: {a['decision']} with confidence {100 * float(a['confidence']):.1f} % "
                         f"(model {a['model_version']})")
            for r in json.loads(a["reasons"]):
                evidence = ", ".join(f"{k}={v}" for k, v in (r.get("evidence") or {}).items())
                lines.append(f"  check {r['code']} ({r['severity']}): {r['message']}" +
                             (f" [{evidence}]" if evidence else ""))
            if a["output_topic"].endswith("exceptions"):
                for x in _rows(client, f"SELECT contributions, historical_pattern, route_to, recommended_action "
                                       f"FROM {db}.exceptions FINAL WHERE id = {{id:String}}", {"id": a["output_id"]}):
                    for c in json.loads(x["contributions"]):
                        lines.append(f"  confidence pulled down: {c['text']}")
                    lines.append(f"  routed to {x['route_to']}: {x['recommended_action']}")
                    lines.append(f"  pattern: {x['historical_pattern']}")
        lines.append(f"  audit hash {str(a['hash'])[:16]}... (previous {str(a['prev_hash'])[:16] or '-'}...)")
    events = list(_rows(client, f"SELECT lot_id, event_type, decision_time, attributes FROM {db}.lot_events FINAL "
                                "WHERE has({lots:Array(String)}, lot_id) ORDER BY decision_time, lot_id",
                        {"lots": sorted(lots)}))
    if events:
        lines.append("")
        lines.append("lot events:")
        for e in events:
            who = e["attributes"].get("decided_by")
            lines.append(f"  {e['decision_time']} {e['lot_id']}: {e['event_type']}" + (f" (by {who})" if who else ""))
    return lines


def holds(client: Client, database: str) -> list[dict[str, Any]]:
    """Lots held by an open exception: lot, exception, queue, since when."""
    from lotflow.review.store import QueueFilter, ReviewStore
    from lotflow.verification.queues import Queue

    store = ReviewStore(client, database)
    out = []
    offset = 0
    while True:
        page = store.open_exceptions([q.value for q in Queue], QueueFilter(limit=500, offset=offset))
        for row in page:
            for lot in row.lot_ids:
                out.append({"lot_id": lot, "exception_id": row.id, "queue": row.queue, "since": row.decision_time,
                            "priority": row.priority, "vendor_id": row.vendor_id})
        if len(page) < 500:
            return out
        offset += 500
