"""Output records of a verification node: verified | exception, plus audit and lot events.

Ids are deterministic (node + input topic/partition/offset), so re-processing an input after
a crash produces the same ids and the ClickHouse tables replace rather than add rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from lotflow.verification.node import Evaluation

__all__ = ["SHARED", "InputRef", "Output", "OutputKind", "PersonDecision", "Subject", "dead_letter", "outputs_for",
           "person_outputs", "record_id"]

Record = dict[str, Any]
DEAD_LETTER_KEEP_BYTES = 64 * 1024  # of the original value; the size is recorded
DEAD_LETTER_KEEP_TEXT = 4096  # of the key and the error message
# Key of the fields a decision's records have in common (the same dict in each): an encoder
# may write them once. The fields are in each record as well, so a record reads as it is.
SHARED = "__shared__"


class OutputKind(StrEnum):
    """What a node emits; the transport maps each kind to its topic (same declared name)."""

    VERIFIED = "lotflow.verified"
    EXCEPTIONS = "lotflow.exceptions"
    AUDIT = "lotflow.audit"
    LOT_EVENTS = "lotflow.lot-events"
    DEAD_LETTERS = "lotflow.dead-letters"
    LABELS = "lotflow.labels"


Output = tuple[OutputKind, str, Record]


@dataclass(slots=True)  # not frozen: built per event, and a frozen one costs 3x to build
class InputRef:
    topic: str
    partition: int
    offset: int

    def to_record(self) -> Record:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


def record_id(node: str, ref: InputRef) -> str:
    return f"{node}:{ref.topic}:{ref.partition}:{ref.offset}"


@dataclass(slots=True)  # not frozen: built per event, and a frozen one costs 3x to build
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
    pattern: Record | None = None  # HistoricalPattern, exceptions only
    recommended_action: str = ""  # exceptions only; empty: the route's default action
    id_suffix: str = ""  # when one input decides several subjects (a PO revision, per line)
    extra: Record = field(default_factory=dict)


EMPTY_PATTERN: Record = {"material_id": "", "reason_code": "", "prior_receipts": 0, "with_reason": 0,
                         "decided_by_person": 0, "accepted_by_person": 0}


def outputs_for(subject: Subject, evaluation: Evaluation, decision_time_ms: int) -> list[Output]:
    verdict = evaluation.verdict
    rid = record_id(subject.node, subject.refs[0]) + subject.id_suffix
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
        main_topic = OutputKind.VERIFIED
        main = {**common, SHARED: common, "lines": list(subject.verified_lines),
                "prior_decision": evaluation.prior_decision}
    else:
        assert verdict.route is not None
        main_topic = OutputKind.EXCEPTIONS
        main = {
            **common,
            SHARED: common,
            "priority": verdict.priority,
            "route_to": verdict.route.queue,
            "recommended_action": subject.recommended_action or verdict.route.action,
            "historical_pattern": subject.historical_pattern,
            "features": evaluation.features,
            "contributions": [c.to_record() for c in evaluation.contributions],
            "pattern": subject.pattern or EMPTY_PATTERN,
            "prior_decision": evaluation.prior_decision,
        }
    audit = {**common, SHARED: common, "actor": f"node:{subject.node}", "output_topic": main_topic.value,
             "output_id": rid}
    out: list[Output] = [(main_topic, subject.key, main), (OutputKind.AUDIT, subject.key, audit)]
    for lot, attributes in zip(subject.lot_ids, subject.lot_attributes, strict=True):
        out.append((OutputKind.LOT_EVENTS, lot, {
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


@dataclass(slots=True)
class PersonDecision:
    """A person's decision on an open exception, as the worker applies it."""

    decision_id: str
    resolution: str  # ACCEPT | CONDITIONAL_ACCEPT | REJECT | REASSIGN
    decided_by: str
    role: str
    decided_at_ms: int
    reasoning: str
    certainty: float
    condition: str
    reassign_to: str
    ref: InputRef  # the decision record on the decisions topic


LOT_EVENT_OF = {"ACCEPT": "RELEASED", "CONDITIONAL_ACCEPT": "CONDITIONALLY_RELEASED", "REJECT": "REJECTED"}


def person_outputs(exception: Record, decision: PersonDecision, now_ms: int) -> list[Output]:
    """What a person's decision releases: accept -> a verified record (HUMAN) and RELEASED lot
    events, conditional -> the same with its condition and CONDITIONALLY_RELEASED, reject ->
    REJECTED lot events (the lots stay held), reassign -> nothing but the audit record. Each writes
    an audit record with who, her role, when, the decision, her reasoning and certainty and the
    model's confidence at the time; each but a reassignment a label for the models (the features
    the exception was scored with, good = accepted). On a spot check the material proceeded
    already: an accept writes no verified record and no lot event, a conditional accept
    CONDITIONALLY_RELEASED events, a reject REJECTED ones. ``exception`` is what the worker kept
    of the open exception."""
    xid = exception["id"]
    refs = [decision.ref.to_record(), *({"topic": t, "partition": p, "offset": o} for t, p, o in exception["refs"])]
    released = decision.resolution in ("ACCEPT", "CONDITIONAL_ACCEPT")
    spot = exception.get("spot", False)  # a spot check: verified already, its lots proceeded
    common: Record = {
        "node": exception["node"],
        "subject_key": exception["po"],
        "subject_id": exception["rid"],
        "decision": "VERIFIED" if released else "EXCEPTION",
        "confidence": exception["confidence"],
        "reasons": [],
        "model_version": f"person:{decision.decided_by}",
        "input_refs": refs,
        "event_time": exception["event_time"],
        "decision_time": now_ms,
        "vendor_id": exception["vendor"],
        "lot_ids": list(exception["lots"]),
    }
    out: list[Output] = []
    output_topic, output_id = OutputKind.EXCEPTIONS.value, xid
    if released and not spot:
        output_topic, output_id = OutputKind.VERIFIED.value, f"{xid}:released"
        out.append((OutputKind.VERIFIED, exception["po"], {
            **common, "id": output_id, "lines": list(exception["lines"]), "decision_source": "HUMAN",
            "decided_by": decision.decided_by, "condition": decision.condition, "exception_id": xid}))
    event_type = LOT_EVENT_OF.get(decision.resolution)
    if spot and decision.resolution == "ACCEPT":
        event_type = None  # released already: a plain accept changes nothing for its lots
    if event_type is not None:
        for lot, attributes in zip(exception["lots"], exception["attrs"], strict=True):
            out.append((OutputKind.LOT_EVENTS, lot, {
                "id": f"{xid}:{decision.resolution.lower()}:{lot}", "lot_id": lot, "node": exception["node"],
                "event_type": event_type, "subject_key": exception["po"], "decision": common["decision"],
                "confidence": exception["confidence"], "parent_lots": [],
                "attributes": {**attributes, "decided_by": decision.decided_by, "exception_id": xid,
                               **({"condition": decision.condition} if decision.condition else {})},
                "event_time": exception["event_time"], "decision_time": now_ms}))
    out.append((OutputKind.AUDIT, exception["po"], {
        **common, "id": f"{xid}:{decision.decision_id}", "actor": f"person:{decision.decided_by}",
        "output_topic": output_topic, "output_id": output_id, "role": decision.role,
        "resolution": decision.resolution, "reasoning": decision.reasoning, "certainty": decision.certainty}))
    if decision.resolution in LOT_EVENT_OF:  # a reassignment teaches nothing
        out.append((OutputKind.LABELS, exception["node"], {
            "label_id": decision.decision_id, "node": exception["node"], "exception_id": xid,
            "subject_id": exception["rid"], "vendor_id": exception["vendor"], "material_id": exception["material"],
            "reason_codes": list(exception.get("codes", ())), "soft_codes": list(exception.get("soft", ())),
            "features": dict(exception.get("features", {})), "good": released, "resolution": decision.resolution,
            "confidence": exception["confidence"], "spot_check": spot, "by_rule": exception.get("rule", False),
            "decided_by": decision.decided_by,
            "decided_at": decision.decided_at_ms, "decision_time": now_ms}))
    return out


def dead_letter(node: str, ref: InputRef, key: bytes | None, value: bytes | None,
                error_class: str, reason: str, now_ms: int) -> Output:
    """A dead letter: error class, message, and the original bytes (a long value is cut, its size kept)."""
    size = -1 if value is None else len(value)
    kept = value if value is None or size <= DEAD_LETTER_KEEP_BYTES else value[:DEAD_LETTER_KEEP_BYTES]
    shown_key = (key or b"")[:DEAD_LETTER_KEEP_TEXT]
    if len(reason) > DEAD_LETTER_KEEP_TEXT:
        reason = reason[:DEAD_LETTER_KEEP_TEXT] + f"... ({len(reason)} characters)"
    return (OutputKind.DEAD_LETTERS, shown_key.decode("utf-8", "replace"), {
        "id": record_id(node, ref),
        "node": node,
        "source_topic": ref.topic,
        "source_partition": ref.partition,
        "source_offset": ref.offset,
        "original_key": shown_key if key is not None else None,
        "original_value": kept,
        "original_size": size,
        "error_class": error_class,
        "reason": reason,
        "failed_at": now_ms,
    })
