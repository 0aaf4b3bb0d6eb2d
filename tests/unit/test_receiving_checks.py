"""The receiving checks are pure: facts in, reason codes with evidence out."""

from __future__ import annotations

from typing import Any

import pytest

from lotflow.scorers import history
from lotflow.verification import receiving as rv
from lotflow.verification.node import Severity
from lotflow.verification.validation import InvalidRecord, normalize_receipt

from .receiving_fixtures import NOW_MS, SPECS, coa, po, receipt

RULES = rv.ReceivingRules()


def state(po_record: dict[str, Any] | None = None, coas: dict[str, Any] | None = None,
          receipts: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the processor keeps for a PO, written the short way: CoA values per lot and earlier
    receipts as {rid: {offset, qty per line, lots}}."""
    p = po_record or po()
    return {
        "po": {k: p[k] for k in ("po_number", "revision", "vendor_id", "lines")},
        "coas": coas if coas is not None else {"L-1": {"values": {"purity": 99.0}}},
        "receipts": receipts or {},
    }


def context(r: dict[str, Any], st: dict[str, Any], profile: dict[str, Any] | None = None,
            offset: int = 0) -> rv.ReceivingContext:
    coas = {lot: {prop: [v, "%", f"C-{lot}", 0, ["t", 0, 0]] for prop, v in c["values"].items()}
            for lot, c in st["coas"].items()}
    others = st["receipts"]
    received: dict[str, float] = {}
    owners: dict[tuple[str, str], str] = {}
    for rid, earlier in others.items():
        if rid == r["receipt_id"] and earlier["offset"] == offset:
            continue  # its own replay
        for line, qty in earlier["qty"].items():
            received[line] = received.get(line, 0.0) + qty
        for line, lot in earlier["lots"]:
            owners[(line, lot)] = rid
    duplicate = r["receipt_id"] in others and others[r["receipt_id"]]["offset"] != offset
    return rv.derive(r, st["po"], received, coas, SPECS, profile or history.empty_profile(), RULES,
                     duplicate_receipt=duplicate, lot_owners=owners)


def codes(r: dict[str, Any], st: dict[str, Any], profile: dict[str, Any] | None = None,
          offset: int = 0) -> dict[str, Severity]:
    ctx = context(r, st, profile, offset)
    return {reason.code: reason.severity for check in rv.CHECKS for reason in check(ctx)}


def test_clean_receipt_has_no_blocking_reason() -> None:
    assert codes(receipt(), state()) == {}


def test_unconverted_pounds_are_a_unit_mismatch() -> None:
    found = codes(receipt(quantity=1000.0, unit="LB"), state())
    assert found["UNIT_MISMATCH"] is Severity.BLOCK
    assert found["QUANTITY_SHORT"] is Severity.BLOCK  # 1000 lb is 453.6 kg of 1000 kg


def test_correctly_converted_pounds_pass_with_an_info_reason() -> None:
    assert codes(receipt(quantity=2204.62, unit="LB"), state()) == {"UNIT_CONVERTED": Severity.INFO}


def test_pounds_labelled_kilograms_are_over_and_flagged_as_a_probable_mislabel() -> None:
    found = codes(receipt(quantity=2204.62), state())
    assert found["QUANTITY_OVER"] is Severity.BLOCK
    assert found["PROBABLE_UNIT_MISLABEL"] is Severity.WARN


@pytest.mark.parametrize(("quantity", "code"), [(850.0, "QUANTITY_SHORT"), (1150.0, "QUANTITY_OVER")])
def test_quantity_beyond_tolerance(quantity: float, code: str) -> None:
    assert codes(receipt(quantity=quantity), state())[code] is Severity.BLOCK


def test_quantity_within_spec_tolerance_passes() -> None:
    assert codes(receipt(quantity=985.0), state()) == {}


def test_declared_partial_delivery_is_benign_and_the_rest_completes_the_line() -> None:
    assert codes(receipt(quantity=400.0, partial=True), state()) == {"PARTIAL_DELIVERY": Severity.INFO}
    earlier = {"R-0": {"offset": 5, "qty": {"1": 400.0}, "lots": [["1", "L-0"]]}}
    assert codes(receipt(quantity=600.0, partial=True), state(receipts=earlier)) == {"PARTIAL_DELIVERY": Severity.INFO}


def test_partial_deliveries_beyond_the_order_are_over() -> None:
    earlier = {"R-0": {"offset": 5, "qty": {"1": 900.0}, "lots": [["1", "L-0"]]}}
    assert codes(receipt(quantity=400.0, partial=True), state(receipts=earlier))["QUANTITY_OVER"] is Severity.BLOCK


def test_same_lot_booked_twice_is_a_duplicate_but_its_own_replay_is_not() -> None:
    booked = {"R-0": {"offset": 5, "qty": {"1": 1000.0}, "lots": [["1", "L-1"]]}}
    assert codes(receipt(), state(receipts=booked))["DUPLICATE_RECEIPT"] is Severity.BLOCK
    replay = {"R-1": {"offset": 9, "qty": {"1": 1000.0}, "lots": [["1", "L-1"]]}}
    assert codes(receipt(), state(receipts=replay), offset=9) == {}
    assert "DUPLICATE_RECEIPT" in codes(receipt(), state(receipts=replay), offset=10)


def test_price_anomaly_is_judged_per_po_unit() -> None:
    assert codes(receipt(price=2.1), state()) == {}
    assert codes(receipt(price=3.5), state())["PRICE_ANOMALY"] is Severity.BLOCK
    # 0.907 $/lb is 2.0 $/kg: not an anomaly once converted
    assert "PRICE_ANOMALY" not in codes(receipt(quantity=2204.62, unit="LB", price=0.9072), state())


def test_coa_out_of_spec_and_missing_property() -> None:
    out = {"L-1": {"values": {"purity": 97.0}}}
    assert codes(receipt(), state(coas=out))["COA_OUT_OF_SPEC"] is Severity.BLOCK
    empty = {"L-1": {"values": {}}}
    assert codes(receipt(), state(coas=empty))["COA_INCOMPLETE"] is Severity.BLOCK


def test_coa_far_from_vendor_history_is_explained_not_blocked() -> None:
    profile = history.empty_profile()
    stat = None
    for v in [99.0, 99.02, 98.98, 99.01, 98.99] * 4:
        stat = history.observe_value(stat, v)
    profile["stats"]["MAT-1|purity"] = stat
    far = {"L-1": {"values": {"purity": 99.6}}}
    assert codes(receipt(), state(coas=far), profile) == {"COA_ATYPICAL": Severity.INFO}


def test_wrong_material_vendor_and_po_line() -> None:
    assert codes(receipt(material="MAT-2"), state())["MATERIAL_MISMATCH"] is Severity.BLOCK
    assert codes(receipt(material="MAT-9"), state())["UNKNOWN_MATERIAL"] is Severity.BLOCK
    assert codes(receipt(vendor="V-2"), state())["VENDOR_MISMATCH"] is Severity.BLOCK
    r = receipt()
    r["lines"][0]["po_line"] = 7
    assert codes(r, state())["UNKNOWN_PO_LINE"] is Severity.BLOCK


def test_missing_documents_are_listed_and_become_reasons() -> None:
    r = receipt()
    assert rv.missing_documents(r, None, SPECS, {}) == ["PO", "COA:L-1"]
    ctx = context(r, {"po": None, "coas": {}, "receipts": {}})
    found = {x.code for x in rv.check_documents(ctx)}
    assert found == {"UNKNOWN_PO", "MISSING_COA"}


@pytest.mark.parametrize("field,value", [("quantity", -1.0), ("quantity", float("nan")), ("quantity", 0.0)])
def test_impossible_line_values_are_invalid(field: str, value: float) -> None:
    r = receipt()
    r["lines"][0][field] = value
    with pytest.raises(InvalidRecord):
        normalize_receipt(r, b"PO-1", NOW_MS)


def test_impossible_dates_and_empty_receipts_are_invalid() -> None:
    for change in ({"received_at": 0}, {"received_at": NOW_MS + 3 * 86_400_000}, {"lines": []}):
        with pytest.raises(InvalidRecord):
            normalize_receipt({**receipt(), **change}, b"PO-1", NOW_MS)


def test_coa_builder_is_consistent_with_the_state_shape() -> None:
    c = coa()
    assert c["vendor_lot"] == "L-1" and c["values"][0]["property"] == "purity"


def test_the_unit_slip_check_covers_partial_lines_against_the_open_remainder() -> None:
    earlier = {"R-0": {"offset": 5, "qty": {"1": 600.0}, "lots": [["1", "L-0"]]}}
    # the last 400 kg shipped labelled kg but counted in lb: 881.85 "kg"
    found = codes(receipt(quantity=881.85, partial=True), state(receipts=earlier))
    assert found["PROBABLE_UNIT_MISLABEL"] is Severity.WARN and found["QUANTITY_OVER"] is Severity.BLOCK
    # 400 lb of the remaining 400 kg labelled kg: 181.4 -- only a warning, a partial may be any fraction
    found = codes(receipt(quantity=181.44, partial=True), state(receipts=earlier))
    assert found == {"PARTIAL_DELIVERY": Severity.INFO, "PROBABLE_UNIT_MISLABEL": Severity.WARN}
    assert codes(receipt(quantity=300.0, partial=True), state(receipts=earlier)) == {
        "PARTIAL_DELIVERY": Severity.INFO}


def test_a_cancelled_po_line_is_an_exception_not_a_division_by_zero() -> None:
    assert codes(receipt(), state(po(quantity=0.0)))["PO_LINE_CANCELLED"] is Severity.BLOCK


def test_lines_on_one_po_line_are_summed() -> None:
    r = receipt(quantity=500.0)
    r["lines"].append({**r["lines"][0], "vendor_lot": "L-2"})
    st = state(coas={"L-1": {"values": {"purity": 99.0}}, "L-2": {"values": {"purity": 99.0}}})
    assert codes(r, st) == {}
    r["lines"].append({**r["lines"][0], "vendor_lot": "L-3"})
    st["coas"]["L-3"] = {"values": {"purity": 99.0}}
    assert codes(r, st)["QUANTITY_OVER"] is Severity.BLOCK


def test_a_revision_rebases_totals_and_reports_over_received_lines() -> None:
    old = po()
    new = {**po(quantity=1500.0 / 0.45359237 * 0.5, unit="LB"), "revision": 1}
    totals, over = rv.revise_po({"1": 900.0}, old, new, SPECS, RULES)
    assert totals["1"] == pytest.approx(900.0 / 0.45359237)
    assert [o.line_no for o in over] == [1]
