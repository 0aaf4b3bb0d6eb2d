"""The receiving processor without Kafka: join order, document wait, replay, dead letters,
revisions, certificates, bounded state."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from lotflow.metrics import WorkerMetrics
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.settings import Settings
from lotflow.streams import topics
from lotflow.streams.receiving import ALL_READ, InputEvent, ReceivingProcessor
from lotflow.streams.state import DictState

from .receiving_fixtures import NOW_MS, SPECS, coa, po, receipt

SETTINGS = Settings(document_wait_s=10, spot_check_share=0.0)  # spot checks: their own tests
SOURCE = schema_source(None)
CODECS = {spec.name: AvroCodec(SOURCE, "x", spec.schema) for spec in topics.TOPICS}


class Clock:
    def __init__(self) -> None:
        self.now = NOW_MS / 1000

    def __call__(self) -> float:
        return self.now


class Run:
    """A processor with in-memory state; ``sent`` is every output decoded, batch by batch."""

    def __init__(self, clock: Clock | None = None, po_state: DictState | None = None,
                 settings: Settings = SETTINGS) -> None:
        self.po_state = po_state or DictState(encoded=True)  # as the worker holds it
        self.proc = ReceivingProcessor(settings, SOURCE, self.po_state, DictState(), SPECS,
                                       WorkerMetrics.create(CollectorRegistry()), clock=clock or Clock())
        self.proc.rebuild_indexes()
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def handle(self, *events: InputEvent) -> None:
        for e in events:
            self.proc.handle(e)
        self.end_batch()

    def sweep(self, limit: int = 100_000) -> int:
        n = self.proc.sweep(limit)
        self.end_batch()
        return n

    def end_batch(self) -> None:
        for m in self.proc.end_batch():
            assert m.value is not None
            self.sent.append((m.topic, m.key.decode(), CODECS[m.topic].decode(m.value)))

    def decisions(self) -> list[dict[str, Any]]:
        return [r for name, _, r in self.sent if name in ("lotflow.verified", "lotflow.exceptions")]

    def dead(self) -> list[dict[str, Any]]:
        return [r for name, _, r in self.sent if name == "lotflow.dead-letters"]

    def codes(self, i: int = -1) -> set[str]:
        return {r["code"] for r in self.decisions()[i]["reasons"]}


def event(spec: topics.TopicSpec, record: dict[str, Any], offset: int, partition: int = 0,
          key: bytes | None = None) -> InputEvent:
    value = CODECS[spec.name].encode(record)
    return InputEvent(spec.name, partition, offset, key if key is not None else record["po_number"].encode(),
                      value, NOW_MS)


def PO(offset: int = 0, **kw: Any) -> InputEvent:
    return event(topics.PURCHASE_ORDERS, po(**kw), offset)


def RECEIPT(offset: int = 0, **kw: Any) -> InputEvent:
    return event(topics.RECEIPTS, receipt(**kw), offset)


def COA(offset: int = 0, **kw: Any) -> InputEvent:
    return event(topics.CERTIFICATES, coa(**kw), offset)


@pytest.mark.parametrize("order", [["po", "coa", "receipt"], ["receipt", "po", "coa"], ["coa", "receipt", "po"]])
def test_arrival_order_does_not_change_the_decision(order: list[str]) -> None:
    run = Run()
    events = {"po": PO(), "receipt": RECEIPT(), "coa": COA()}
    for name in order:
        run.handle(events[name])
    [decision] = run.decisions()
    assert decision["decision"] == "VERIFIED"
    assert decision["id"] == "receiving:plant.receipts:0:0"
    assert [name for name, _, _ in run.sent] == ["lotflow.verified", "lotflow.audit", "lotflow.lot-events"]


def test_missing_po_becomes_an_exception_when_the_wait_expires() -> None:
    clock = Clock()
    run = Run(clock)
    run.handle(RECEIPT())
    assert run.sweep() == 0 and run.decisions() == []
    clock.now += 11
    assert run.sweep() == 1
    [decision] = run.decisions()
    assert decision["decision"] == "EXCEPTION" and decision["priority"] == "HIGH"
    assert run.codes() == {"UNKNOWN_PO", "MISSING_COA"}
    assert decision["route_to"] == "receiving"


def test_a_sweep_decides_at_most_its_limit_and_says_more_is_due() -> None:
    clock = Clock()
    run = Run(clock)
    run.handle(*(RECEIPT(offset=i, rid=f"R-{i}", lot=f"L-{i}") for i in range(3)))
    clock.now += 11
    assert run.sweep(limit=2) == 2 and run.proc.more_due
    assert run.sweep(limit=2) == 1 and not run.proc.more_due
    assert sorted(d["subject_id"] for d in run.decisions()) == ["R-0", "R-1", "R-2"]


def test_the_wait_survives_a_restart_because_it_is_in_the_state() -> None:
    clock = Clock()
    first = Run(clock)
    first.handle(RECEIPT())
    restarted = Run(clock, po_state=first.po_state)  # what Faust recovers from the changelog
    clock.now += 11
    assert restarted.sweep() == 1 and restarted.decisions()[0]["decision"] == "EXCEPTION"


def test_a_redelivered_input_is_skipped_by_its_committed_mark() -> None:
    run = Run()
    run.handle(PO(), COA(), RECEIPT())
    run.handle(PO(), COA(), RECEIPT())  # re-delivered after a crash after the commit
    assert [d["decision"] for d in run.decisions()] == ["VERIFIED"]
    assert run.proc.replayed == 3 and run.dead() == []


def test_a_second_booking_of_the_same_lot_is_a_duplicate_decided_at_once() -> None:
    run = Run()
    run.handle(PO(), COA(), RECEIPT())
    run.handle(RECEIPT(1, rid="R-2"))
    assert "DUPLICATE_RECEIPT" in run.codes()


def test_the_same_receipt_id_again_is_a_duplicate() -> None:
    run = Run()
    run.handle(PO(), COA(), RECEIPT())
    run.handle(RECEIPT(1, lot="L-9"), COA(1, lot="L-9"))
    assert "DUPLICATE_RECEIPT" in run.codes()


def test_bad_input_goes_to_dead_letters_and_processing_goes_on() -> None:
    run = Run()
    run.handle(InputEvent(topics.RECEIPTS.name, 0, 5, b"k", b"\x00\x01garbage", NOW_MS),
               RECEIPT(6, quantity=-3.0))
    run.handle(PO(), COA(), RECEIPT(7))
    dead = run.dead()
    assert [(d["source_offset"], d["error_class"]) for d in dead] == [(5, "SCHEMA"), (6, "INVALID_VALUE")]
    assert dead[0]["original_value"] == b"\x00\x01garbage" and dead[0]["original_size"] == 9
    assert run.decisions()[0]["decision"] == "VERIFIED"


def _po_with(**line: Any) -> dict[str, Any]:
    record = po()
    record["lines"][0].update(line)
    return record


@pytest.mark.parametrize("record, key, message", [
    (_po_with(unit_price=math.nan), b"PO-1", "unit_price"),
    (_po_with(quantity=math.inf), b"PO-1", "quantity"),
    (_po_with(quantity=-1.0), b"PO-1", "quantity"),
    ({**po(), "lines": po()["lines"] * 2}, b"PO-1", "appears twice"),
    ({**po(), "lines": []}, b"PO-1", "no lines"),
    (po(), b"PO-2", "differs"),
    ({**po(), "po_number": ""}, b"", "po_number is empty"),
    ({**po(), "order_date": 1000}, b"PO-1", "order_date"),
])
def test_invalid_purchase_orders_are_dead_letters(record: dict[str, Any], key: bytes, message: str) -> None:
    run = Run()
    run.handle(event(topics.PURCHASE_ORDERS, record, 3, key=key))
    [dead] = run.dead()
    assert dead["error_class"] == "INVALID_VALUE" and message in dead["reason"]
    assert run.po_state.get("P|PO-1") is None  # nothing of it was applied


@pytest.mark.parametrize("record, message", [
    ({**coa(), "values": [{"property": "purity", "value": math.nan, "unit": "%"}]}, "not finite"),
    ({**coa(), "values": []}, "no values"),
    ({**coa(), "vendor_lot": " "}, "vendor_lot"),
    ({**coa(), "values": coa()["values"] * 2}, "appears twice"),
])
def test_invalid_certificates_are_dead_letters(record: dict[str, Any], message: str) -> None:
    run = Run()
    run.handle(event(topics.CERTIFICATES, record, 3))
    [dead] = run.dead()
    assert dead["error_class"] == "INVALID_VALUE" and message in dead["reason"]


def test_negative_enum_index_is_a_decode_error() -> None:
    value = bytearray(CODECS[topics.RECEIPTS.name].encode(receipt(quantity=1000.0)))
    # The unit KG is enum index 0 (zigzag 0x00); -1 is zigzag 0x01 and would read as the last symbol.
    good = CODECS[topics.RECEIPTS.name].encode(receipt(unit="FT"))
    assert good != bytes(value)
    index = bytes(value).rindex(b"\x00", 0, bytes(value).index(b"L-1"))
    value[index] = 0x01
    run = Run()
    run.handle(InputEvent(topics.RECEIPTS.name, 0, 0, b"PO-1", bytes(value), NOW_MS))
    [dead] = run.dead()
    assert dead["error_class"] == "DECODE" and "index" in dead["reason"]


def test_a_po_tombstone_deletes_the_po() -> None:
    clock = Clock()
    run = Run(clock)
    run.handle(PO(), InputEvent(topics.PURCHASE_ORDERS.name, 0, 1, b"PO-1", None, NOW_MS))
    assert run.dead() == [] and run.po_state.get("P|PO-1")["po"] is None
    run.handle(COA(), RECEIPT())
    clock.now += 11
    run.sweep()
    assert "UNKNOWN_PO" in run.codes()


def test_a_cancelled_line_is_a_valid_po_and_a_receipt_against_it_an_exception() -> None:
    run = Run()
    run.handle(PO(quantity=0.0), COA(), RECEIPT())
    assert run.dead() == []
    assert run.decisions()[0]["decision"] == "EXCEPTION" and "PO_LINE_CANCELLED" in run.codes()


def test_an_exception_inside_the_checks_sends_the_receipt_to_the_dead_letters_state_untouched() -> None:
    run = Run()
    run.handle(PO(), COA())
    before = orjson.dumps(run.po_state.get("P|PO-1"))

    def broken(ctx: Any) -> list[Any]:
        raise ZeroDivisionError("division by zero")

    checks = run.proc.node.checks
    run.proc.node.checks = (*checks, broken)
    run.handle(RECEIPT())
    [dead] = run.dead()
    assert dead["error_class"] == "ZeroDivisionError" and dead["source_offset"] == 0
    assert orjson.dumps(run.po_state.get("P|PO-1")) == before
    run.proc.node.checks = checks
    run.handle(RECEIPT(1, rid="R-2", lot="L-2"), COA(1, lot="L-2"))
    assert run.decisions()[0]["decision"] == "VERIFIED"


def test_a_waiting_receipt_whose_decision_fails_is_a_dead_letter_with_its_bytes() -> None:
    run = Run()
    receipt_event = RECEIPT()
    run.handle(receipt_event)

    def broken(ctx: Any) -> list[Any]:
        raise RuntimeError("boom")

    run.proc.node.checks = (*run.proc.node.checks, broken)
    run.handle(PO(), COA())
    [dead] = run.dead()
    assert dead["original_value"] == receipt_event.value and dead["source_topic"] == topics.RECEIPTS.name
    assert not [k for k, _ in run.po_state.items() if k.startswith("W|")]


def test_a_huge_field_becomes_a_dead_letter_never_a_failed_flush() -> None:
    run = Run()
    run.handle(PO(), COA())
    huge = receipt(rid="R-" + "x" * (1 << 20))
    run.handle(event(topics.RECEIPTS, huge, 7))
    [dead] = run.dead()
    assert dead["error_class"] in ("OUTPUT_TOO_LARGE", "STATE_TOO_LARGE")
    assert dead["original_size"] > 1 << 20 and len(dead["original_value"]) == 64 * 1024
    run.handle(RECEIPT(8))
    assert run.decisions()[0]["decision"] == "VERIFIED"


def test_lines_on_the_same_po_line_are_added_up() -> None:
    run = Run()
    r = receipt()
    r["lines"] = [dict(r["lines"][0]), {**r["lines"][0], "vendor_lot": "L-2"}]
    run.handle(PO(), COA(), COA(1, lot="L-2"), event(topics.RECEIPTS, r, 0))
    assert "QUANTITY_OVER" in run.codes()
    [reason] = [x for x in run.decisions()[0]["reasons"] if x["code"] == "QUANTITY_OVER"]
    assert reason["evidence"]["received"] == "2000"


def test_split_certificates_are_merged_and_the_receipt_waits_for_every_property() -> None:
    spec = {**SPECS["MAT-1"], "properties": [{"name": "purity", "unit": "%", "min": 98.0, "max": 100.0},
                                             {"name": "moisture", "unit": "%", "min": 0.0, "max": 0.5}]}
    run = Run()
    run.proc.specs = {**SPECS, "MAT-1": spec}
    first = {**coa(), "coa_id": "C-a", "values": [{"property": "purity", "value": 99.0, "unit": "%"}]}
    second = {**coa(), "coa_id": "C-b", "values": [{"property": "moisture", "value": 0.2, "unit": "%"}]}
    run.handle(PO(), event(topics.CERTIFICATES, first, 0), RECEIPT())
    assert run.decisions() == []  # moisture is still to come
    run.handle(event(topics.CERTIFICATES, second, 1))
    [decision] = run.decisions()
    assert decision["decision"] == "VERIFIED"
    certificate_offsets = {r["offset"] for r in decision["input_refs"] if r["topic"] == topics.CERTIFICATES.name}
    assert certificate_offsets == {0, 1}  # the audit names every certificate used


def test_a_reissued_certificate_before_the_receipt_replaces_the_value() -> None:
    run = Run()
    corrected = {**coa(purity=99.2), "coa_id": "C-2", "issued_at": NOW_MS + 1000}
    run.handle(PO(), COA(purity=97.0), event(topics.CERTIFICATES, corrected, 1), RECEIPT())
    decision = run.decisions()[0]
    assert decision["decision"] == "VERIFIED"
    certificate_offsets = {r["offset"] for r in decision["input_refs"] if r["topic"] == topics.CERTIFICATES.name}
    assert certificate_offsets == {1}


def test_certificate_values_in_another_unit_are_converted_or_flagged() -> None:
    run = Run()
    run.handle(PO(), event(topics.CERTIFICATES, {**coa(), "values": [
        {"property": "purity", "value": 990_000.0, "unit": "ppm"}]}, 0), RECEIPT())
    assert run.decisions()[0]["decision"] == "VERIFIED"
    run.handle(PO(1, number="PO-2"), event(topics.CERTIFICATES, {**coa(number="PO-2"), "values": [
        {"property": "purity", "value": 99.0, "unit": "cP"}]}, 1), RECEIPT(1, number="PO-2", rid="R-2"))
    assert "COA_UNIT_MISMATCH" in run.codes()


def test_a_revision_before_the_decision_is_the_one_in_force() -> None:
    run = Run()
    run.handle(PO(), event(topics.PURCHASE_ORDERS, {**po(quantity=500.0), "revision": 1}, 1), COA(), RECEIPT())
    assert "QUANTITY_OVER" in run.codes()


def test_an_older_revision_arriving_late_changes_nothing() -> None:
    run = Run()
    run.handle(event(topics.PURCHASE_ORDERS, {**po(), "revision": 2}, 0),
               event(topics.PURCHASE_ORDERS, {**po(quantity=500.0), "revision": 1}, 1), COA(), RECEIPT())
    assert run.decisions()[0]["decision"] == "VERIFIED"


def test_a_revision_below_what_was_received_raises_an_exception_for_the_verified_receipt() -> None:
    run = Run()
    run.handle(PO(), COA(), RECEIPT())
    assert run.decisions()[0]["decision"] == "VERIFIED"
    run.handle(event(topics.PURCHASE_ORDERS, {**po(quantity=800.0), "revision": 1}, 1))
    late = run.decisions()[-1]
    assert late["decision"] == "EXCEPTION" and late["subject_id"] == "R-1"
    assert run.codes() == {"PO_REVISED_BELOW_RECEIVED"}
    audits = [r for name, _, r in run.sent if name == "lotflow.audit"]
    assert audits[-1]["output_id"] == late["id"]
    # the same revision again (a replay) and a raise of the quantity change nothing more
    run.handle(event(topics.PURCHASE_ORDERS, {**po(quantity=800.0), "revision": 1}, 2),
               event(topics.PURCHASE_ORDERS, {**po(quantity=2000.0), "revision": 2}, 3))
    assert len(run.decisions()) == 2


def test_a_revision_that_changes_the_unit_rebases_the_received_total() -> None:
    run = Run()
    first = receipt(quantity=500.0, partial=True)
    run.handle(PO(), COA(), event(topics.RECEIPTS, first, 0))
    pounds = {**po(quantity=1000.0 / 0.45359237, unit="LB"), "revision": 1}
    run.handle(event(topics.PURCHASE_ORDERS, pounds, 1))
    assert run.po_state.get("P|PO-1")["received"]["1"] == pytest.approx(500.0 / 0.45359237)
    second = receipt(rid="R-2", lot="L-2", quantity=500.0 / 0.45359237, unit="LB")
    run.handle(COA(1, lot="L-2"), event(topics.RECEIPTS, second, 1))
    assert run.decisions()[-1]["decision"] == "VERIFIED"


def test_a_blanket_po_keeps_its_state_records_small() -> None:
    run = Run()
    run.handle(PO(quantity=1_000_000.0))
    sizes = []
    for i in range(500):
        lot = f"L-{i}"
        run.handle(COA(i, lot=lot), RECEIPT(i, rid=f"R-{i}", lot=lot, quantity=1000.0, partial=True))
        sizes.append(len(orjson.dumps(run.po_state.get("P|PO-1"))))
    assert [d["decision"] for d in run.decisions()] == ["VERIFIED"] * 500
    assert max(sizes) <= sizes[0] + 32  # the PO's record does not grow with its receipts (longer numbers aside)
    assert run.po_state.get("P|PO-1")["received"]["1"] == pytest.approx(500_000.0)


def test_the_sweep_touches_only_what_is_due() -> None:
    clock = Clock()
    run = Run(clock)
    for i in range(100):
        run.handle(event(topics.PURCHASE_ORDERS, po(number=f"PO-{i}"), i))
    run.handle(RECEIPT(0, number="PO-X"))
    def due() -> int:
        return sum(len(d) for d in run.proc._deadlines.values())

    assert due() == 1
    clock.now += 11
    assert run.sweep() == 1 and due() == 0


def test_an_expired_wait_is_judged_only_once_its_documents_were_read() -> None:
    clock = Clock()
    read_until = {0: 0}
    run = Run(clock)
    run.proc.documents_read_until = lambda partition: read_until[partition]
    later = dataclasses.replace(RECEIPT(1, rid="R-2"), timestamp_ms=NOW_MS + 5000)
    run.handle(RECEIPT(0, rid="R-1"), later)
    clock.now += 11
    assert run.sweep() == 0 and run.decisions() == []  # a backlog of documents is not absence
    read_until[0] = NOW_MS + 10_000  # read past the first receipt's wait: its PO never came
    clock.now += 1
    assert run.sweep() == 1
    read_until[0] = ALL_READ
    clock.now += 1
    assert run.sweep() == 1
    assert [d["subject_id"] for d in run.decisions()] == ["R-1", "R-2"]
    assert all("UNKNOWN_PO" in {r["code"] for r in d["reasons"]} for d in run.decisions())


def test_idle_state_is_forgotten_after_retention() -> None:
    clock = Clock()
    run = Run(clock)
    run.handle(PO(), COA(), RECEIPT())
    assert run.po_state.get("P|PO-1") is not None and run.po_state.get("R|PO-1|R-1") is not None
    clock.now += SETTINGS.po_state_retention_s - 1
    run.sweep()
    assert run.po_state.get("P|PO-1") is not None
    clock.now += 2
    run.sweep()
    assert run.po_state.get("P|PO-1") is None and run.po_state.get("R|PO-1|R-1") is None
    assert run.po_state.get("O|plant.receipts|0") is not None  # input marks are never forgotten


def test_the_state_size_is_on_metrics_and_falls_when_idle_state_is_forgotten() -> None:
    clock = Clock()
    run = Run(clock)
    run.handle(PO(), COA(), RECEIPT())
    run.proc.publish_metrics()
    keys = run.proc.metrics.state_keys.labels("receiving", "po")
    held = keys._value.get()
    assert held == len(run.po_state._data()) >= 4
    clock.now += SETTINGS.po_state_retention_s + 1
    run.sweep()
    run.proc.publish_metrics()
    assert keys._value.get() == len(run.po_state._data()) < held


def test_expiry_with_a_batch_forgets_at_most_its_limit_of_idle_keys() -> None:
    clock = Clock()
    run = Run(clock)
    run.handle(PO(), COA(), RECEIPT())
    def kept() -> set[str]:  # input marks and audit chain heads are never forgotten
        return {k for k in run.po_state._data() if k[0] not in "OA"}

    idle = kept()
    assert len(idle) >= 3
    clock.now += SETTINGS.po_state_retention_s + 1
    run.proc.expire(1)
    run.end_batch()
    assert len(kept()) == len(idle) - 1
    run.proc.expire(100)
    assert kept() == set() and "A|0" in run.po_state._data()


def test_of_two_waiting_bookings_of_one_receipt_the_later_is_the_duplicate() -> None:
    run = Run()
    run.handle(RECEIPT(0), RECEIPT(1))  # the same receipt id twice, both before their documents
    run.handle(PO(), COA())
    first, second = sorted(run.decisions(), key=lambda d: d["input_refs"][0]["offset"])
    assert first["decision"] == "VERIFIED"
    assert "DUPLICATE_RECEIPT" in {r["code"] for r in second["reasons"]}


@pytest.mark.parametrize("restart_between", [False, True])
def test_a_receipt_waiting_for_two_certificates_and_its_po_is_decided_when_the_last_arrives(
        restart_between: bool) -> None:
    """The waiting index passes over a receipt while a document it lacked is still absent; it is
    rebuilt from the state after a restart (``needs`` is stored with the wait)."""
    two_lots = {**receipt(), "lines": [{**receipt()["lines"][0], "quantity": 500.0, "vendor_lot": "L-1"},
                                        {**receipt()["lines"][0], "quantity": 500.0, "vendor_lot": "L-2"}]}
    clock = Clock()
    run = Run(clock)
    run.handle(event(topics.RECEIPTS, two_lots, 0))
    run.handle(event(topics.CERTIFICATES, coa(lot="L-2"), 0))
    assert run.decisions() == []
    if restart_between:
        run = Run(clock, po_state=run.po_state)
    run.handle(PO())  # the certificate of L-1 is still missing
    assert run.decisions() == []
    run.handle(event(topics.CERTIFICATES, coa(lot="L-3"), 1))  # another lot's certificate: nothing changes
    assert run.decisions() == []
    run.handle(event(topics.CERTIFICATES, coa(lot="L-1"), 2))
    [decision] = run.decisions()
    assert decision["decision"] == "VERIFIED" and sorted(decision["lot_ids"]) == ["L-1", "L-2"]
    assert run.proc.sweep() == 0 and run.proc._waiting == {}


def test_a_receipt_that_waited_for_a_spec_is_decided_when_its_certificate_then_arrives() -> None:
    """What a waiting receipt lacks is learnt again at each full attempt: a spec that appears
    later (``recheck_waiting``) can make it lack a certificate it did not lack before."""
    run = Run()
    specs = dict(SPECS)
    later_spec = {**SPECS["MAT-1"], "material_id": "MAT-3"}
    run.proc.specs = specs
    new_material = {**receipt(), "lines": [{**receipt()["lines"][0], "material_id": "MAT-3"}]}
    run.handle(PO(), event(topics.RECEIPTS, new_material, 0))
    assert run.decisions() == []  # waits for the spec of MAT-3
    specs["MAT-3"] = later_spec
    run.proc.recheck_waiting()
    run.end_batch()
    assert run.decisions() == []  # now it lacks the certificate of L-1
    run.handle(event(topics.CERTIFICATES, {**coa(), "material_id": "MAT-3"}, 0))
    [decision] = run.decisions()
    assert decision["subject_id"] == "R-1"


def test_a_lot_received_on_another_line_of_the_receipt_is_not_waited_for() -> None:
    run = Run()
    two_line_po = {**po(), "lines": [po()["lines"][0], {**po()["lines"][0], "line_no": 2}]}
    line = receipt()["lines"][0]
    r2 = {**receipt(rid="R-2"), "lines": [{**line, "quantity": 100.0}, {**line, "po_line": 2, "quantity": 100.0},
                                          {**line, "vendor_lot": "L-2", "quantity": 100.0}]}
    run.handle(event(topics.RECEIPTS, r2, 0))  # waits for its PO and both certificates
    run.handle(COA())
    r1 = {**receipt(rid="R-1"), "lines": [{**line, "po_line": 2, "quantity": 100.0}]}
    run.handle(event(topics.PURCHASE_ORDERS, two_line_po, 0), event(topics.RECEIPTS, r1, 1))
    assert [d["subject_id"] for d in run.decisions()] == ["R-1"]  # R-1 took the certificate of L-1
    run.handle(event(topics.CERTIFICATES, coa(lot="L-2"), 1))
    assert [d["subject_id"] for d in run.decisions()] == ["R-1", "R-2"]


def test_an_exception_carries_its_contributions_and_the_vendors_pattern_for_the_material() -> None:
    run = Run()
    run.handle(PO(0, number="PO-1", quantity=10_000.0))
    for i in range(4):  # four good receipts, then one out of spec
        run.handle(COA(10 + i, lot=f"L-{i}"), RECEIPT(20 + i, rid=f"R-{i}", lot=f"L-{i}", quantity=100.0, partial=True))
    run.handle(COA(30, lot="L-9", purity=97.0), RECEIPT(31, rid="R-9", lot="L-9", quantity=100.0, partial=True))
    decisions = run.decisions()
    assert [d["decision"] for d in decisions] == ["VERIFIED"] * 4 + ["EXCEPTION"]
    exception = decisions[-1]
    assert exception["route_to"] == "supplier_quality"
    pull = exception["contributions"][0]  # the failed rule first; then too little CoA history
    assert pull["feature"] == "n_block" and pull["logit"] == -6.0
    assert pull["text"] == "1 rule failed (COA_OUT_OF_SPEC): \u22126.0 logit"
    assert exception["pattern"] == {"material_id": "MAT-1", "reason_code": "COA_OUT_OF_SPEC", "prior_receipts": 4,
                                    "with_reason": 0, "decided_by_person": 0, "accepted_by_person": 0}
    assert exception["historical_pattern"].startswith("Vendor V-1, material MAT-1: 4 prior receipts; "
                                                      "COA_OUT_OF_SPEC in 0 % of them (0); no person has decided")
    assert exception["recommended_action"].startswith("Quarantine the lot")


def DECISION(offset: int, exception_id: str, resolution: str = "ACCEPT", po: str = "PO-1", **kw: Any) -> InputEvent:
    record = {"decision_id": f"d-{offset}", "exception_id": exception_id, "node": "receiving", "subject_key": po,
              "resolution": resolution, "decided_by": "rita", "decided_at": NOW_MS, "reasoning": "recounted",
              "certainty": 0.9, "role": "supplier_quality", "condition": "", "reassign_to": "",
              "confidence_shown": 0.2,
              **kw}
    return event(topics.DECISIONS, record, offset, key=po.encode())


def _out_of_spec_exception(run: Run) -> dict[str, Any]:
    run.handle(PO(0), COA(1, purity=97.0), RECEIPT(2))
    [exception] = [r for name, _, r in run.sent if name == "lotflow.exceptions"]
    return exception


def test_a_persons_accept_releases_the_receipt_once() -> None:
    run = Run()
    exception = _out_of_spec_exception(run)
    run.sent.clear()
    run.handle(DECISION(0, exception["id"]))
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for name, _, record in run.sent:
        by_topic.setdefault(name, []).append(record)
    [verified] = by_topic["lotflow.verified"]
    assert verified["decision_source"] == "HUMAN" and verified["decided_by"] == "rita"
    assert verified["exception_id"] == exception["id"] and verified["id"] == f"{exception['id']}:released"
    assert verified["lines"] and verified["lines"][0]["vendor_lot"] == "L-1"
    assert [e["event_type"] for e in by_topic["lotflow.lot-events"]] == ["RELEASED"]
    [audit] = by_topic["lotflow.audit"]
    assert (audit["actor"], audit["role"], audit["resolution"], audit["certainty"]) == (
        "person:rita", "supplier_quality", "ACCEPT", 0.9)
    assert audit["reasoning"] == "recounted" and audit["confidence"] == exception["confidence"]
    # a second decision on it, one on an unknown exception, and a malformed one are dead letters
    run.sent.clear()
    run.handle(DECISION(1, exception["id"], "REJECT"), DECISION(2, "receiving:nope"),
               DECISION(3, exception["id"], "CONDITIONAL_ACCEPT"))
    assert [d["error_class"] for d in run.dead()] == ["ALREADY_DECIDED", "UNKNOWN_EXCEPTION", "INVALID_DECISION"]
    assert not [name for name, _, _ in run.sent if name != "lotflow.dead-letters"]


def test_reject_keeps_the_lot_held_and_reassign_keeps_the_exception_open() -> None:
    run = Run()
    exception = _out_of_spec_exception(run)
    run.sent.clear()
    run.handle(DECISION(0, exception["id"], "REASSIGN", reassign_to="qc_technician"))
    assert [name for name, _, _ in run.sent] == ["lotflow.audit"]
    run.handle(DECISION(1, exception["id"], "REJECT", reasoning="wrong grade", role="qc_technician"))
    lot_events = [r for name, _, r in run.sent if name == "lotflow.lot-events"]
    assert [e["event_type"] for e in lot_events] == ["REJECTED"]
    assert not [r for name, _, r in run.sent if name == "lotflow.verified"]
    state = run.po_state.get(f"X|{exception['id']}")
    assert state is not None and not state["open"] and state["queue"] == "qc_technician"


def test_audit_records_form_one_hash_chain_per_partition() -> None:
    from lotflow.verification import chain

    run = Run()
    exception = _out_of_spec_exception(run)
    run.handle(PO(10, number="PO-2"), COA(11, number="PO-2", lot="L-2"), RECEIPT(12, rid="R-2", number="PO-2",
                                                                                  lot="L-2"))
    run.handle(DECISION(0, exception["id"]))
    audits = [r for name, _, r in run.sent if name == "lotflow.audit"]
    assert len(audits) == 3
    prev = ""
    for record in audits:
        assert record["prev_hash"] == prev and record["hash"] == chain.link(prev, record)
        prev = record["hash"]
    tampered = {**audits[1], "reasoning": "edited"}
    assert chain.link(audits[1]["prev_hash"], tampered) != audits[1]["hash"]


def test_the_audit_chain_head_survives_a_restart_and_expiry() -> None:
    clock = Clock()
    run = Run(clock)
    _out_of_spec_exception(run)
    head = run.po_state.get("A|0")
    assert head is not None
    run.proc.rebuild_indexes()  # a restart over the same state
    clock.now += SETTINGS.po_state_retention_s + 1
    run.proc.expire(10_000)
    run.end_batch()
    assert run.po_state.get("A|0") == head


def test_a_decision_must_come_from_the_exceptions_current_queue() -> None:
    run = Run()
    exception = _out_of_spec_exception(run)  # routed to supplier_quality
    run.sent.clear()
    run.handle(DECISION(0, exception["id"], role="receiving"))
    assert [d["error_class"] for d in run.dead()] == ["WRONG_QUEUE"]
    run.handle(DECISION(1, exception["id"], "REASSIGN", role="supplier_quality", reassign_to="qc_technician"))
    run.handle(DECISION(2, exception["id"], role="supplier_quality"))  # moved away: no longer hers
    assert [d["error_class"] for d in run.dead()] == ["WRONG_QUEUE", "WRONG_QUEUE"]
    run.handle(DECISION(3, exception["id"], role="qc_technician"))
    assert [r["decision_source"] for name, _, r in run.sent if name == "lotflow.verified"] == ["HUMAN"]


def test_a_conditional_accept_releases_with_its_condition() -> None:
    run = Run()
    exception = _out_of_spec_exception(run)
    run.sent.clear()
    run.handle(DECISION(0, exception["id"], "CONDITIONAL_ACCEPT", condition="use as is, deviation DV-3"))
    [verified] = [r for name, _, r in run.sent if name == "lotflow.verified"]
    assert verified["condition"] == "use as is, deviation DV-3" and verified["decision_source"] == "HUMAN"
    [event] = [r for name, _, r in run.sent if name == "lotflow.lot-events"]
    assert event["event_type"] == "CONDITIONALLY_RELEASED" and event["attributes"]["condition"].endswith("DV-3")


def test_chart_slices_written_inside_old_vendor_profiles_are_pooled_and_moved_to_their_own_keys() -> None:
    # Before chart slices had their own keys they lived in the vendor profile ("spc"). After an
    # upgrade: another partition's old slice still counts (its reference window is full, so this
    # lot's value goes onto the chart, not into a new reference), this partition's old slices move
    # to their keys, and a slice already written under its key is never overwritten by an old one.
    from lotflow.scorers import history

    run = Run()
    vendor_state = run.proc.vendor_state
    chart = "MAT-1|purity"
    full = {"e": 0, "ref": [50.0, 99.0, 49 * 0.04], "v": [[NOW_MS - 1000, 99.1]], "r": 0}
    old_profile = {**history.empty_profile(), "spc": {chart: full}}
    vendor_state.apply(1, "V-1@1", old_profile, orjson.dumps(old_profile))
    newer = {"e": 0, "ref": [3.0, 5.0, 1.0], "v": [], "r": 0}
    vendor_state.apply(0, history.chart_key("V-1", 0, "MAT-9|x"), newer, orjson.dumps(newer))
    own_old = {**history.empty_profile(),
               "spc": {"MAT-9|x": {"e": 0, "ref": [1.0, 1.0, 0.0], "v": [], "r": 0},
                       "MAT-8|y": {"e": 0, "ref": [2.0, 7.0, 0.5], "v": [], "r": 0}}}
    vendor_state.apply(0, "V-1@0", own_old, orjson.dumps(own_old))

    run.handle(PO(0), COA(0, purity=99.2), RECEIPT(0))
    assert run.decisions()[-1]["decision"] == "VERIFIED"
    own = vendor_state.get(history.chart_key("V-1", 0, chart))
    assert own["ref"] == [0.0, 0.0, 0.0] and [v for _, v in own["v"]] == [99.2]  # charted against partition 1's
    assert "spc" not in vendor_state.get("V-1@0")
    assert vendor_state.get(history.chart_key("V-1", 0, "MAT-8|y"))["ref"] == [2.0, 7.0, 0.5]  # moved
    assert vendor_state.get(history.chart_key("V-1", 0, "MAT-9|x")) == newer  # not overwritten
    assert "spc" in vendor_state.get("V-1@1")  # another partition's moves with its own next write


def test_a_pooled_chart_is_computed_again_exactly_when_one_of_its_slices_changed() -> None:
    # The processor keeps each vendor chart's pooled view while its slices are the same objects
    # (slices are replaced on change, never changed in place); any new slice, from this partition
    # or another, gives a new view, equal to pooling the slices afresh.
    from lotflow.scorers import history

    run = Run()
    proc, vendor_state = run.proc, run.proc.vendor_state
    chart = "MAT-1|purity"
    slices = [{"e": 0, "ref": [30.0, 99.0 + q, 1.0], "v": [[NOW_MS - 10 + q, 99.0 + q]], "r": 0} for q in range(2)]
    for q, part in enumerate(slices):
        vendor_state.apply(q, history.chart_key("V-1", q, chart), part, orjson.dumps(part))
    first = proc._chart_view("V-1", 0, chart, slices[0])
    assert first == history.chart_view(slices)
    assert proc._chart_view("V-1", 1, chart, slices[1]) is first  # the same slices, from the other partition
    changed = history.observe_chart(slices[1], first, 98.0, NOW_MS, signalled=False, reference_n=100)
    assert slices[1]["ref"] == [30.0, 100.0, 1.0]  # observed into a new slice, the old one unchanged
    vendor_state.apply(1, history.chart_key("V-1", 1, chart), changed, orjson.dumps(changed))
    second = proc._chart_view("V-1", 0, chart, slices[0])
    assert second is not first and second == history.chart_view([slices[0], changed])
    assert second.reference != first.reference
    # this partition's own slice as staged in a unit (not yet in the table) counts too
    own = history.observe_chart(slices[0], second, 97.0, NOW_MS, signalled=False, reference_n=100)
    assert proc._chart_view("V-1", 0, chart, own) == history.chart_view([own, changed])


def test_a_lot_a_rule_held_counts_for_the_process_level_only_and_a_duplicate_not_at_all() -> None:
    # A drifting vendor's held lots are its drift: the level of passed lots alone was censored to
    # the ordinary-looking ones (learning run 23). The reference, the charts' values and the
    # vendor's statistics stay the passed lots'.
    from lotflow.scorers import history

    run = Run()
    vendor_state = run.proc.vendor_state
    key = history.chart_key("V-1", 0, "MAT-1|purity")
    frozen = {"e": 0, "ref": [50.0, 99.0, 49 * 0.04], "v": [[NOW_MS - 1000, 99.1]], "r": 0}
    vendor_state.apply(0, key, frozen, orjson.dumps(frozen))
    run.handle(PO(0), COA(0, purity=99.3), RECEIPT(0, quantity=1500.0))  # 50 % over: a rule holds it
    assert run.decisions()[-1]["decision"] == "EXCEPTION"
    slice_ = vendor_state.get(key)
    assert slice_["v"] == frozen["v"] and slice_["ref"] == frozen["ref"] and slice_["h"] == [[NOW_MS, 99.3]]
    assert "MAT-1|purity" not in vendor_state.get("V-1@0")["stats"]
    view = run.proc._chart_view("V-1", 0, "MAT-1|purity", slice_)
    assert view.values == [99.1] and view.recent == [99.1, 99.3]
    # the same lot booked again, and the same receipt again, each with a certificate read before
    # it: duplicates, whose lots were measured once already
    run.handle(event(topics.CERTIFICATES, {**coa(purity=99.6), "coa_id": "C-2"}, 1), RECEIPT(1, rid="R-2"))
    assert "DUPLICATE_RECEIPT" in run.codes() and vendor_state.get(key)["h"] == [[NOW_MS, 99.3]]
    run.handle(event(topics.CERTIFICATES, {**coa(purity=99.7), "coa_id": "C-3"}, 2), RECEIPT(2))
    assert "DUPLICATE_RECEIPT" in run.codes() and vendor_state.get(key)["h"] == [[NOW_MS, 99.3]]
