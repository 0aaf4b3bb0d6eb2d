"""Receiving / material verification: the first configuration of the verification node.

A receipt (packing-list lines) is joined with its PO, the material specs, the certificates
of analysis of its vendor lots and the vendor's history; ``derive`` computes every fact the
checks and features need once, and the checks are pure functions of those facts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lotflow.scorers import history
from lotflow.verification.node import NodeConfig, Reason, Route, Severity
from lotflow.verification.units import IncompatibleUnits, conversion_factor

__all__ = [
    "CHECKS",
    "InvalidRecord",
    "ReceivingContext",
    "ReceivingRules",
    "derive",
    "features",
    "missing_documents",
    "node_config",
    "validate_receipt",
]

Record = dict[str, Any]
EARLIEST_MS = 946_684_800_000  # 2000-01-01
FUTURE_SLACK_MS = 24 * 3600 * 1000
ATYPICAL_Z = 3.5
VENDOR_TREND_RATE = 0.15
UNIT_SLIP_FACTORS = (conversion_factor("LB", "KG"), conversion_factor("KG", "LB"),
                     conversion_factor("GAL", "L"), conversion_factor("L", "GAL"))


class InvalidRecord(ValueError):
    """A decodable record with impossible values: it goes to the dead-letter topic."""


@dataclass(frozen=True)
class ReceivingRules:
    quantity_tolerance_pct: float = 2.0
    price_tolerance_pct: float = 15.0
    unit_slip_tolerance: float = 0.01  # relative distance to 2.2046 etc. that reads as a unit slip


def validate_receipt(receipt: Record, now_ms: int) -> None:
    """Reject what no real dock could have produced."""
    if not receipt["po_number"]:
        raise InvalidRecord("po_number is empty")
    if not receipt["lines"]:
        raise InvalidRecord("receipt has no lines")
    received = receipt["received_at"]
    if received < EARLIEST_MS or received > now_ms + FUTURE_SLACK_MS:
        raise InvalidRecord(f"received_at {received} is outside 2000-01-01 .. now + 1 day")
    for line in receipt["lines"]:
        qty = line["quantity"]
        if not math.isfinite(qty) or qty <= 0:
            raise InvalidRecord(f"line {line['po_line']}: quantity {qty} is not a positive number")
        price = line.get("unit_price")
        if price is not None and (not math.isfinite(price) or price < 0):
            raise InvalidRecord(f"line {line['po_line']}: unit_price {price} is impossible")


def missing_documents(receipt: Record, po: Record | None, specs: Mapping[str, Record],
                      coas: Mapping[str, Any]) -> list[str]:
    """What the receipt still waits for: PO, SPEC:<material>, COA:<vendor lot>."""
    missing = [] if po is not None else ["PO"]
    for line in receipt["lines"]:
        spec = specs.get(line["material_id"])
        if spec is None:
            missing.append(f"SPEC:{line['material_id']}")
        elif spec["requires_coa"] and line["vendor_lot"] not in coas:
            missing.append(f"COA:{line['vendor_lot']}")
    return missing


@dataclass(slots=True)
class CoaFact:
    prop: str
    value: float | None
    low: float
    high: float
    z: float | None
    history: tuple[int, float, float]


@dataclass(slots=True)
class LineFact:
    line: Record
    po_line: Record | None
    spec: Record | None
    factor: float | None = None
    unit_error: str = ""
    qty_in_po_unit: float | None = None
    previously_received: float = 0.0
    tolerance_pct: float = 0.0
    price_dev: float | None = None
    coa: Record | None = None
    coa_facts: list[CoaFact] = field(default_factory=list)
    duplicate_lot_of: str = ""


@dataclass(slots=True)
class ReceivingContext:
    receipt: Record
    po: Record | None
    lines: list[LineFact]
    missing: list[str]
    duplicate_receipt_of: str
    vendor_profile: history.Profile
    rules: ReceivingRules


def derive(receipt: Record, po_state: Mapping[str, Any], specs: Mapping[str, Record],
           vendor_profile: history.Profile, rules: ReceivingRules, source_offset: int) -> ReceivingContext:
    """Join the receipt with everything known about its PO and compute the facts once."""
    po: Record | None = po_state.get("po")
    coas: Mapping[str, Any] = po_state.get("coas", {})
    applied: Mapping[str, Any] = po_state.get("receipts", {})
    receipt_id = receipt["receipt_id"]
    # Re-processing the same input (after a crash) must not see its own earlier effects.
    others = {rid: r for rid, r in applied.items() if not (rid == receipt_id and r["offset"] == source_offset)}
    duplicate_of = receipt_id if receipt_id in others else ""
    lot_owner = {(str(ln), lot): rid for rid, r in others.items() for ln, lot in r["lots"]}
    po_lines = {pl["line_no"]: pl for pl in po["lines"]} if po else {}
    stats = vendor_profile["stats"]
    facts = []
    for line in receipt["lines"]:
        po_line = po_lines.get(line["po_line"])
        spec = specs.get(line["material_id"])
        fact = LineFact(line, po_line, spec)
        fact.duplicate_lot_of = lot_owner.get((str(line["po_line"]), line["vendor_lot"]), "")
        if po_line is not None:
            try:
                fact.factor = conversion_factor(line["unit"], po_line["unit"])
                fact.qty_in_po_unit = line["quantity"] * fact.factor
            except IncompatibleUnits as exc:
                fact.unit_error = str(exc)
            fact.previously_received = sum(
                r["qty"].get(str(line["po_line"]), 0.0) for r in others.values())
            fact.tolerance_pct = spec["quantity_tolerance_pct"] if spec else rules.quantity_tolerance_pct
            price = line.get("unit_price")
            if price is not None and fact.factor and po_line["unit_price"] > 0:
                fact.price_dev = (price / fact.factor - po_line["unit_price"]) / po_line["unit_price"]
        if spec is not None and spec["requires_coa"]:
            coa = coas.get(line["vendor_lot"])
            fact.coa = coa
            if coa is not None:
                values = coa["values"]
                for prop in spec["properties"]:
                    value = values.get(prop["name"])
                    stat = stats.get(f"{line['material_id']}|{prop['name']}")
                    z = history.zscore(stat, value) if value is not None else None
                    fact.coa_facts.append(CoaFact(prop["name"], value, prop["min"], prop["max"], z,
                                                  history.stat_summary(stat)))
        facts.append(fact)
    return ReceivingContext(receipt, po, facts, missing_documents(receipt, po, specs, coas),
                            duplicate_of, vendor_profile, rules)


def _r(code: str, severity: Severity, message: str, **evidence: object) -> Reason:
    return Reason(code, message, severity, {k: f"{v:.6g}" if isinstance(v, float) else str(v)
                                            for k, v in evidence.items()})


def check_documents(ctx: ReceivingContext) -> list[Reason]:
    """Documents still missing when the wait expired."""
    out = []
    for item in ctx.missing:
        kind, _, ref = item.partition(":")
        if kind == "PO":
            out.append(_r("UNKNOWN_PO", Severity.BLOCK, f"PO {ctx.receipt['po_number']} was not received in time",
                          po_number=ctx.receipt["po_number"]))
        elif kind == "SPEC":
            out.append(_r("UNKNOWN_MATERIAL", Severity.BLOCK, f"no material spec for {ref}", material_id=ref))
        else:
            out.append(_r("MISSING_COA", Severity.BLOCK, f"no certificate of analysis for lot {ref}", vendor_lot=ref))
    return out


def check_identity(ctx: ReceivingContext) -> list[Reason]:
    out = []
    if ctx.duplicate_receipt_of:
        out.append(_r("DUPLICATE_RECEIPT", Severity.BLOCK, "this receipt id was already booked",
                      receipt_id=ctx.duplicate_receipt_of))
    if ctx.po is not None and ctx.po["vendor_id"] != ctx.receipt["vendor_id"]:
        out.append(_r("VENDOR_MISMATCH", Severity.BLOCK, "packing-list vendor differs from the PO vendor",
                      receipt_vendor=ctx.receipt["vendor_id"], po_vendor=ctx.po["vendor_id"]))
    for f in ctx.lines:
        if f.duplicate_lot_of:
            out.append(_r("DUPLICATE_RECEIPT", Severity.BLOCK,
                          f"lot {f.line['vendor_lot']} was already received on this PO line",
                          vendor_lot=f.line["vendor_lot"], earlier_receipt=f.duplicate_lot_of,
                          po_line=f.line["po_line"]))
    return out


def check_lines(ctx: ReceivingContext) -> list[Reason]:
    """PO line, material, unit, quantity and price of every packing-list line."""
    out: list[Reason] = []
    if ctx.po is None:
        return out
    for f in ctx.lines:
        line, pl = f.line, f.po_line
        if pl is None:
            out.append(_r("UNKNOWN_PO_LINE", Severity.BLOCK, f"PO has no line {line['po_line']}",
                          po_line=line["po_line"]))
            continue
        if line["material_id"] != pl["material_id"]:
            code = "MATERIAL_MISMATCH" if f.spec is not None else "UNKNOWN_MATERIAL"
            out.append(_r(code, Severity.BLOCK, f"line {line['po_line']} delivers {line['material_id']}, "
                          f"the PO ordered {pl['material_id']}", received=line["material_id"],
                          ordered=pl["material_id"]))
        if f.unit_error:
            out.append(_r("UNIT_INCOMPATIBLE", Severity.BLOCK, f.unit_error, unit=line["unit"], po_unit=pl["unit"]))
            continue
        assert f.qty_in_po_unit is not None
        ordered, qty, tol = pl["quantity"], f.qty_in_po_unit, f.tolerance_pct / 100.0
        if line["unit"] != pl["unit"]:
            if abs(line["quantity"] - ordered) <= tol * ordered:
                out.append(_r("UNIT_MISMATCH", Severity.BLOCK,
                              f"{line['quantity']:g} {line['unit']} looks like the PO's {ordered:g} {pl['unit']} "
                              f"unconverted: it is {qty:.6g} {pl['unit']}", quantity=line["quantity"],
                              unit=line["unit"], po_quantity=ordered, po_unit=pl["unit"], converted=qty))
            else:
                out.append(_r("UNIT_CONVERTED", Severity.INFO, f"converted {line['unit']} to {pl['unit']}",
                              factor=f.factor or 0.0, converted=qty))
        cumulative = f.previously_received + qty
        deviation = (cumulative - ordered) / ordered
        if deviation > tol:
            out.append(_r("QUANTITY_OVER", Severity.BLOCK, f"line {line['po_line']}: received {cumulative:.6g} "
                          f"{pl['unit']} of {ordered:g} ordered", received=cumulative, ordered=ordered,
                          deviation_pct=100 * deviation, tolerance_pct=f.tolerance_pct))
        elif line["partial"]:
            out.append(_r("PARTIAL_DELIVERY", Severity.INFO, "declared partial shipment",
                          received=cumulative, ordered=ordered))
        elif deviation < -tol:
            out.append(_r("QUANTITY_SHORT", Severity.BLOCK, f"line {line['po_line']}: received {cumulative:.6g} "
                          f"{pl['unit']} of {ordered:g} ordered", received=cumulative, ordered=ordered,
                          deviation_pct=100 * deviation, tolerance_pct=f.tolerance_pct))
        ratio = qty / ordered
        slip = next((k for k in UNIT_SLIP_FACTORS if abs(ratio / k - 1) <= ctx.rules.unit_slip_tolerance), None)
        # A declared partial shipment may be any fraction of the line, 45 % (= 1 lb/kg) included.
        if slip is not None and line["unit"] == pl["unit"] and not line["partial"]:
            out.append(_r("PROBABLE_UNIT_MISLABEL", Severity.WARN,
                          f"quantity is {ratio:.4f} x the PO: the unit on the label is probably wrong",
                          ratio=ratio, unit_factor=slip))
        if f.price_dev is not None and abs(f.price_dev) > ctx.rules.price_tolerance_pct / 100.0:
            out.append(_r("PRICE_ANOMALY", Severity.BLOCK, f"line {line['po_line']}: price differs "
                          f"{100 * f.price_dev:+.1f}% from the PO", price=line["unit_price"],
                          po_price=pl["unit_price"], deviation_pct=100 * f.price_dev))
    return out


def check_certificates(ctx: ReceivingContext) -> list[Reason]:
    out = []
    for f in ctx.lines:
        for c in f.coa_facts:
            lot = f.line["vendor_lot"]
            if c.value is None:
                out.append(_r("COA_INCOMPLETE", Severity.BLOCK, f"CoA of lot {lot} has no {c.prop}",
                              vendor_lot=lot, property=c.prop))
            elif not c.low <= c.value <= c.high:
                out.append(_r("COA_OUT_OF_SPEC", Severity.BLOCK, f"{c.prop} {c.value:g} outside "
                              f"[{c.low:g}, {c.high:g}]", vendor_lot=lot, property=c.prop, value=c.value,
                              min=c.low, max=c.high))
            elif c.z is not None and abs(c.z) >= ATYPICAL_Z:
                n, mean, std = c.history
                # INFO: the confidence model weighs the distance; this only explains it.
                out.append(_r("COA_ATYPICAL", Severity.INFO, f"{c.prop} {c.value:g} is in spec but {c.z:+.1f} "
                              f"std from this vendor's history", vendor_lot=lot, property=c.prop,
                              value=c.value, vendor_mean=mean, vendor_std=std, history_n=n, z=c.z))
    return out


def check_vendor_history(ctx: ReceivingContext) -> list[Reason]:
    rate = history.exception_rate(ctx.vendor_profile)
    if rate < VENDOR_TREND_RATE:
        return []
    return [_r("VENDOR_TREND", Severity.INFO, f"{100 * rate:.0f}% of this vendor's recent receipts were exceptions",
               vendor_id=ctx.receipt["vendor_id"], recent_exception_rate=rate, receipts=ctx.vendor_profile["n"])]


CHECKS = (check_documents, check_identity, check_lines, check_certificates, check_vendor_history)

_DOCS = Route("receiving", "Contact the supplier or buyer for the missing document; hold the goods in quarantine.")
ROUTES: dict[str, Route] = {
    "UNKNOWN_PO": _DOCS,
    "MISSING_COA": _DOCS,
    "UNKNOWN_PO_LINE": Route("receiving", "Check the packing list against the PO with the buyer."),
    "DUPLICATE_RECEIPT": Route("receiving", "Compare with the earlier receipt; reverse the double booking."),
    "VENDOR_MISMATCH": Route("receiving", "Confirm the shipper; re-book against the right PO."),
    "UNIT_MISMATCH": Route("receiving", "Re-weigh or recount and correct the unit on the receipt."),
    "UNIT_INCOMPATIBLE": Route("receiving", "Correct the unit of measure on the receipt."),
    "QUANTITY_OVER": Route("receiving", "Recount; return the excess or ask the buyer to amend the PO."),
    "QUANTITY_SHORT": Route("receiving", "Recount; open a shortage claim with the supplier."),
    "PROBABLE_UNIT_MISLABEL": Route("receiving", "Re-weigh: the quantity matches a lb/kg or gal/L slip."),
    "UNKNOWN_MATERIAL": Route("supplier_quality", "Identify the material; reject or create a spec."),
    "MATERIAL_MISMATCH": Route("supplier_quality", "Wrong material delivered: quarantine and contact the supplier."),
    "COA_OUT_OF_SPEC": Route("supplier_quality", "Quarantine the lot; retest or reject and raise a SCAR."),
    "COA_INCOMPLETE": Route("supplier_quality", "Request a complete CoA from the supplier."),
    "COA_ATYPICAL": Route("supplier_quality", "In spec but unusual for this supplier: retest a sample."),
    "PRICE_ANOMALY": Route("operations_analyst", "Check the price with purchasing before invoice matching."),
}
LOW_CONFIDENCE = Route("supplier_quality", "No rule failed but the history makes this unusual: review the lot.")


def node_config(verify_threshold: float, high_priority_threshold: float) -> NodeConfig:
    return NodeConfig("receiving", verify_threshold, high_priority_threshold, ROUTES, LOW_CONFIDENCE)


def features(ctx: ReceivingContext, reasons: Sequence[Reason]) -> dict[str, float]:
    """Plain-dict features for the confidence model (River style: keys may come and go)."""
    x: dict[str, float] = {
        "n_block": float(sum(r.severity is Severity.BLOCK for r in reasons)),
        "n_warn": float(sum(r.severity is Severity.WARN for r in reasons)),
        "n_lines": float(len(ctx.lines)),
        "vendor_exception_rate": history.exception_rate(ctx.vendor_profile),
        "vendor_receipts_log": math.log1p(ctx.vendor_profile["n"]),
    }
    for r in reasons:
        x[f"reason_{r.code.lower()}"] = 1.0
    zs = [abs(c.z) for f in ctx.lines for c in f.coa_facts if c.z is not None]
    needs_history = any(f.coa_facts for f in ctx.lines)
    if zs:
        x["coa_max_abs_z"] = max(zs)
    if needs_history:
        x["coa_history_missing"] = float(any(c.z is None for f in ctx.lines for c in f.coa_facts))
    devs = [abs((f.previously_received + f.qty_in_po_unit) / f.po_line["quantity"] - 1.0)
            for f in ctx.lines if f.qty_in_po_unit is not None and f.po_line and not f.line["partial"]]
    if devs:
        x["quantity_max_abs_dev"] = max(devs)
    prices = [abs(f.price_dev) for f in ctx.lines if f.price_dev is not None]
    if prices:
        x["price_max_abs_dev"] = max(prices)
    return x
