"""Output records of a verification node: verified | exception, plus audit and lot events.

Ids are deterministic (node + input topic/partition/offset), so re-processing an input after
a crash produces the same ids and the ClickHouse tables replace rather than add rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lotflow.streams import topics
from lotflow.verification.node import Evaluation

__all__ = ["InputRef", "Subject", "dead_letter", "outputs_for", "record_id"]

Record = dict[str, Any]
Output = tuple[topics.TopicSpec, str, Record]


@dataclass(frozen=True, slots=True)
class InputRef:
    topic: str
    partition: int
    offset: int

    def to_record(self) -> Record:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


def record_id(node: str, ref: InputRef) -> str:
    return f"{node}:{ref.topic}:{ref.partition}:{ref.offset}"


@dataclass(frozen=True, slots=True)
class Subject:
    """What was verified, and the inputs that went into the decision (the first is the subject)."""

    node: str
    key: str
    subject_id: str
    refs: Sequence[InputRef]
    event_time_ms: int
    vendor_id: str = ""
    lot_ids: Sequence[str] = ()
    lot_attributes: Sequence[dict[str, str]] = ()
    verified_lines: Sequence[Record] = ()
    historical_pattern: str = ""
    extra: Record = field(default_factory=dict)


def outputs_for(subject: Subject, evaluation: Evaluation, decision_time_ms: int) -> list[Output]:
    verdict = evaluation.verdict
    rid = record_id(subject.node, subject.refs[0])
    common: Record = {
        "id": rid,
        "node": subject.node,
        "subject_key": subject.key,
        "subject_id": subject.subject_id,
        "decision": verdict.decision,
        "confidence": verdict.confidence,
        "reasons": [r.to_record() for r in evaluation.reasons],
        "model_version": evaluation.model_version,
        "input_refs": [r.to_record() for r in subject.refs],
        "event_time": subject.event_time_ms,
        "decision_time": decision_time_ms,
        "vendor_id": subject.vendor_id,
        "lot_ids": list(subject.lot_ids),
    }
    if verdict.decision == "VERIFIED":
        main_topic = topics.VERIFIED
        main = {**common, "lines": list(subject.verified_lines)}
    else:
        assert verdict.route is not None
        main_topic = topics.EXCEPTIONS
        main = {
            **common,
            "priority": verdict.priority,
            "route_to": verdict.route.queue,
            "recommended_action": verdict.route.action,
            "historical_pattern": subject.historical_pattern,
            "features": evaluation.features,
        }
    audit = {**common, "actor": f"node:{subject.node}", "output_topic": main_topic.name, "output_id": rid}
    out: list[Output] = [(main_topic, subject.key, main), (topics.AUDIT, subject.key, audit)]
    for lot, attributes in zip(subject.lot_ids, subject.lot_attributes, strict=True):
        out.append((topics.LOT_EVENTS, lot, {
            "id": f"{rid}:{lot}",
            "lot_id": lot,
            "node": subject.node,
            "event_type": "RECEIVED" if verdict.decision == "VERIFIED" else "HELD",
            "subject_key": subject.key,
            "decision": verdict.decision,
            "confidence": verdict.confidence,
            "parent_lots": [],
            "attributes": attributes,
            "event_time": subject.event_time_ms,
            "decision_time": decision_time_ms,
        }))
    return out


def dead_letter(node: str, ref: InputRef, key: bytes | None, value: bytes | None,
                error_class: str, reason: str, now_ms: int) -> Output:
    return (topics.DEAD_LETTERS, (key or b"").decode("utf-8", "replace"), {
        "id": record_id(node, ref),
        "node": node,
        "source_topic": ref.topic,
        "source_partition": ref.partition,
        "source_offset": ref.offset,
        "original_key": key,
        "original_value": value,
        "error_class": error_class,
        "reason": reason,
        "failed_at": now_ms,
    })
