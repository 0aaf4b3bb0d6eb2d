"""The receiving processor without Kafka: join order, document wait, replay, dead letters."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lotflow.metrics import WorkerMetrics
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.settings import Settings
from lotflow.streams import topics
from lotflow.streams.receiving import InputEvent, ReceivingProcessor
from lotflow.streams.state import DictState

from .receiving_fixtures import NOW_MS, SPECS, coa, po, receipt

SETTINGS = Settings(document_wait_s=10)
SOURCE = schema_source(None)


class Recorder:
    """Collects what the processor would produce (the unit under test is the processor)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def send(self, spec: topics.TopicSpec, key: str, record: dict[str, Any]) -> None:
        AvroCodec(SOURCE, "check", spec.schema).encode(record)  # every output fits its schema
        self.sent.append((spec.name, key, record))

    def decisions(self) -> list[dict[str, Any]]:
        return [r for name, _, r in self.sent if name in ("lotflow.verified", "lotflow.exceptions")]


class Clock:
    def __init__(self) -> None:
        self.now = NOW_MS / 1000

    def __call__(self) -> float:
        return self.now


def make(clock: Clock | None = None) -> tuple[ReceivingProcessor, Recorder, DictState]:
    rec, po_state = Recorder(), DictState()
    proc = ReceivingProcessor(SETTINGS, SOURCE, po_state, DictState(), SPECS, rec,  # type: ignore[arg-type]
                              WorkerMetrics.create(CollectorRegistry()), clock=clock or Clock())
    return proc, rec, po_state


def event(spec: topics.TopicSpec, record: dict[str, Any], offset: int, partition: int = 0) -> InputEvent:
    value = AvroCodec(SOURCE, "x", spec.schema).encode(record)
    return InputEvent(spec.name, partition, offset, b"PO-1", value, NOW_MS)


def feed(proc: ReceivingProcessor, order: list[str]) -> None:
    events = {"po": event(topics.PURCHASE_ORDERS, po(), 0), "receipt": event(topics.RECEIPTS, receipt(), 0),
              "coa": event(topics.CERTIFICATES, coa(), 0)}
    for name in order:
        proc.handle(events[name])


@pytest.mark.parametrize("order", [["po", "coa", "receipt"], ["receipt", "po", "coa"], ["coa", "receipt", "po"]])
def test_arrival_order_does_not_change_the_decision(order: list[str]) -> None:
    proc, rec, _ = make()
    feed(proc, order)
    [decision] = rec.decisions()
    assert decision["decision"] == "VERIFIED"
    assert decision["id"] == "receiving:plant.receipts:0:0"
    kinds = [name for name, _, _ in rec.sent]
    assert kinds == ["lotflow.verified", "lotflow.audit", "lotflow.lot-events"]


def test_missing_po_becomes_an_exception_when_the_wait_expires() -> None:
    clock = Clock()
    proc, rec, _ = make(clock)
    proc.handle(event(topics.RECEIPTS, receipt(), 0))
    assert proc.sweep() == 0 and rec.decisions() == []
    clock.now += 11
    assert proc.sweep() == 1
    [decision] = rec.decisions()
    assert decision["decision"] == "EXCEPTION" and decision["priority"] == "HIGH"
    assert {r["code"] for r in decision["reasons"]} == {"UNKNOWN_PO", "MISSING_COA"}
    assert decision["route_to"] == "receiving"


def test_the_wait_survives_a_restart_because_it_is_in_the_state() -> None:
    clock = Clock()
    proc, _, po_state = make(clock)
    proc.handle(event(topics.RECEIPTS, receipt(), 0))
    restarted, rec, _ = make(clock)
    restarted.po_state = po_state  # what Faust recovers from the changelog
    clock.now += 11
    assert restarted.sweep() == 1 and rec.decisions()[0]["decision"] == "EXCEPTION"


def test_replayed_receipt_is_not_decided_again_nor_a_duplicate() -> None:
    proc, rec, _ = make()
    feed(proc, ["po", "coa", "receipt"])
    proc.handle(event(topics.RECEIPTS, receipt(), 0))  # re-delivered after a crash
    [decision] = rec.decisions()
    assert decision["decision"] == "VERIFIED"


def test_a_second_booking_of_the_same_lot_is_a_duplicate() -> None:
    proc, rec, _ = make()
    feed(proc, ["po", "coa", "receipt"])
    proc.handle(event(topics.RECEIPTS, receipt(rid="R-2"), 1))
    assert "DUPLICATE_RECEIPT" in {r["code"] for r in rec.decisions()[1]["reasons"]}


def test_bad_input_goes_to_dead_letters_and_processing_goes_on() -> None:
    proc, rec, _ = make()
    proc.handle(InputEvent(topics.RECEIPTS.name, 0, 5, b"k", b"\x00\x01garbage", NOW_MS))
    proc.handle(event(topics.RECEIPTS, receipt(quantity=-3.0), 6))
    feed(proc, ["po", "coa", "receipt"])
    dead = [r for name, _, r in rec.sent if name == "lotflow.dead-letters"]
    assert [(d["source_offset"], d["error_class"]) for d in dead] == [(5, "SCHEMA"), (6, "INVALID_VALUE")]
    assert dead[0]["original_value"] == b"\x00\x01garbage"
    assert rec.decisions()[0]["decision"] == "VERIFIED"


def test_exception_is_explainable() -> None:
    proc, rec, _ = make()
    proc.handle(event(topics.PURCHASE_ORDERS, po(), 0))
    proc.handle(event(topics.CERTIFICATES, coa(purity=97.0), 0))
    proc.handle(event(topics.RECEIPTS, receipt(), 0))
    [exc] = rec.decisions()
    assert exc["route_to"] == "supplier_quality" and exc["recommended_action"]
    assert exc["features"]["n_block"] == 1.0 and exc["historical_pattern"].startswith("vendor V-1")
    reason = exc["reasons"][0]
    assert reason["code"] == "COA_OUT_OF_SPEC" and reason["evidence"]["value"] == "97"
    assert {r["topic"] for r in exc["input_refs"]} == {"plant.receipts", "erp.purchase-orders",
                                                       "plant.certificates-of-analysis"}


def test_absence_is_not_judged_while_documents_are_still_unread() -> None:
    clock = Clock()
    proc, rec, _ = make(clock)
    settled = {"now": False}
    proc.documents_settled = lambda partition, until_ms: settled["now"]
    proc.handle(event(topics.RECEIPTS, receipt(), 0))
    clock.now += 60
    assert proc.sweep() == 0 and rec.decisions() == []  # a backlog of POs may still hold it
    settled["now"] = True
    assert proc.sweep() == 1


def test_idle_po_state_is_forgotten_after_retention() -> None:
    clock = Clock()
    proc, _, po_state = make(clock)
    feed(proc, ["po", "coa", "receipt"])
    assert po_state.get("PO-1") is not None
    clock.now += SETTINGS.po_state_retention_s - 1
    proc.sweep()
    assert po_state.get("PO-1") is not None
    clock.now += 2
    proc.sweep()
    assert po_state.get("PO-1") is None
