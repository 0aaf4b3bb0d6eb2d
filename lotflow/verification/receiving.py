"""Receiving / material verification: the first configuration of the verification node.

A receipt (packing-list lines) is joined with its PO, the material specs, the certificates
of analysis of its vendor lots and the vendor's history; ``derive`` computes every fact the
checks and features need once, and the checks are pure functions of those facts.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lotflow.scorers import history, spc
from lotflow.scorers.history import ChartView
from lotflow.scorers.learner import PatternKey
from lotflow.verification.explain import Describe, signed
from lotflow.verification.node import SPOT_CHECK, NodeConfig, Reason, Route, Severity, SoftEnvelope, Verdict, graded
from lotflow.verification.queues import ReasonClass, route
from lotflow.verification.units import IncompatibleUnits, conversion_factor, property_factor

__all__ = [
    "CHECKS",
    "DESCRIBE",
    "ROUTES",
    "SOFT_REASONS",
    "CoaLot",
    "ReceivingContext",
    "ReceivingRules",
    "derive",
    "features",
    "identity",
    "merge_coa",
    "missing_documents",
    "node_config",
    "pattern_keys",
    "pattern_of",
    "pattern_text",
    "recommendation",
    "revise_po",
    "spc_pattern_keys",
]

Record = dict[str, Any]
ATYPICAL_Z = 3.5
# The control charts of CoA values: CUSUM for a mean shift (k = 0.5, h = 7), the variance CUSUM
# (hv = 14) and Nelson's trend rule, z clipped at 3 sigma (clean CoA values have heavy tails:
# one far lot is the confidence model's to weigh, not a shift), a reference window of 50 lots.
# With a reference *estimated* from lots the textbook h = 5 fires far more often than its known-
# parameter ARL of 465: measured (simulated, 3 % of lots at 3x spread) 0.71 % of lots per
# property with h = 5 / hv = 10 / 30 lots, 0.25 % with these (ARL0 ~400), while a 2 sigma shift
# still signals after ~6 lots (2.5 sigma ~5, 1 sigma ~17). EWMA and Nelson 2, 5, 6 are
# computed but raise nothing: a sustained shift is the CUSUM's anyway, and each adds false alarms.
# Nelson 1 counts at 4 sigma, not 3: one lot far from the frozen reference is what a drift the
# vendor's running history has absorbed looks like (learning run: 4-6 sigma values verified at
# 0.98 once the model had unlearnt the prior's distance penalty), and at 3 the heavy tails of
# clean lots fire it. Its signal resets the charts like any other: kept, because a run where
# rule 1 alone left the CUSUMs running missed 20 slow vendor drifts instead of 1 (recall 96.8 %
# against 98.6 %). The average run lengths above were measured without rule 1.
REF_Z_FREE = 3.0  # a value this far from its chart's reference is ordinary scatter
JOINT_Z_FREE = 2.0  # and the lot's values together this far
# On a control-chart signal, a value of the lot further than this from its chart's reference is a
# pattern people must have accepted (``spc_pattern_keys``): below 4 sigma of the truth (a fault)
# while the reference sigma overstates it up to 1.6 x.
SPC_FREE_Z = 2.5
# The process level: the mean z of a chart's last LEVEL_N values (this lot's included; every lot's,
# held ones too: ``ChartView.recent``), once it has LEVEL_MIN, counts when it is LEVEL_FREE
# reference sigma out and LEVEL_T standard errors of those values from zero (a one-sample t
# statistic: the spread of a vendor whose variance jumped is not a moved mean).
LEVEL_N, LEVEL_MIN, LEVEL_FREE, LEVEL_T = 10, 5, 1.5, 3.0
PROCESS_LEVEL = "PROCESS_LEVEL"  # the chart of an SPC_SIGNAL raised by the level alone (an X-bar of LEVEL_N lots)
# The process spread: a lot more than SPC_FREE_Z reference sigma out while at least SPREAD_K of the
# chart's last LEVEL_N values (this lot's included, held lots' too) lie beyond SPREAD_Z. After a
# vendor's spread widened, its variance CUSUM signals and starts again from zero, and between
# signals a lot beyond 4 sigma of the truth passed wherever 50 heavy-tailed lots had put the
# reference sigma 1.2-1.5 x too wide (learning run 28: 5 of the variance-jump vendor's lots, no
# chart signal). Simulated on Student-t (4 dof) lots with a reference from 50 of them: in control
# it fires on 0.13 % of values, after a 3 x spread on 25 % (74 % of those beyond 4 true sigma).
SPREAD_Z, SPREAD_K = 2.0, 4
assert SPREAD_Z < SPC_FREE_Z  # ``process_spread`` counts a lot beyond SPC_FREE_Z as beyond SPREAD_Z
PROCESS_SPREAD = "PROCESS_SPREAD"  # the chart of an SPC_SIGNAL raised by the spread alone
_PATTERN_UNSAFE = re.compile(r"[|~/:;]")  # separators of a pattern string (and of a history file's list)
CHART = spc.ChartConfig(reference_n=50, h=7.0, variance_h=14.0, clip_z=3.0, point_limit=4.0,
                        charts=frozenset({"CUSUM_MEAN", "CUSUM_VARIANCE", "NELSON_3", "NELSON_1"}))
VENDOR_TREND_RATE = 0.15
UNIT_SLIP_FACTORS = (conversion_factor("LB", "KG"), conversion_factor("KG", "LB"),
                     conversion_factor("GAL", "L"), conversion_factor("L", "GAL"))
# A merged certificate of one lot: property -> [value, unit, coa_id, issued_at, [topic, partition, offset]]
CoaLot = dict[str, list[Any]]


@dataclass(frozen=True)
class ReceivingRules:
    quantity_tolerance_pct: float = 2.0
    price_tolerance_pct: float = 15.0
    unit_slip_tolerance: float = 0.01  # relative distance to 2.2046 etc. that reads as a unit slip

    def tolerance_pct(self, spec: Record | None) -> float:
        return spec["quantity_tolerance_pct"] if spec else self.quantity_tolerance_pct


def merge_coa(lot: CoaLot | None, coa: Record, ref: list[Any]) -> CoaLot:
    """Merge one certificate into what is known of its lot, property by property.

    A later certificate (by issue time, then by offset) of a property replaces an earlier one,
    so split, reissued and corrected certificates all count; re-reading the same certificate
    changes nothing.
    """
    merged: CoaLot = dict(lot or {})
    for prop, (value, unit) in coa["values"].items():
        current = merged.get(prop)
        if current is None or (coa["issued_at"], ref[2]) >= (current[3], current[4][2]):
            merged[prop] = [value, unit, coa["coa_id"], coa["issued_at"], ref]
    return merged


def missing_documents(receipt: Record, po: Record | None, specs: Mapping[str, Record],
                      coas: Mapping[str, CoaLot], received_lots: Collection[str] = ()) -> list[str]:
    """What the receipt still waits for: PO, SPEC:<material>, COA:<vendor lot>.

    A lot waits until every property of its spec has a certificate value (split certificates);
    a lot already received on this PO waits for nothing: it is a duplicate, decided at once.
    """
    missing = [] if po is not None else ["PO"]
    for line in receipt["lines"]:
        spec = specs.get(line["material_id"])
        if spec is None:
            missing.append(f"SPEC:{line['material_id']}")
        elif spec["requires_coa"] and line["vendor_lot"] not in received_lots:
            lot = coas.get(line["vendor_lot"])
            # split certificates: the lot is complete when every property of the spec has a value
            if lot is None or any(p["name"] not in lot for p in spec["properties"]):
                missing.append(f"COA:{line['vendor_lot']}")
    return missing


@dataclass(frozen=True, slots=True)
class OverReceived:
    """A PO line that a new revision leaves over-delivered."""

    line_no: int
    received: float
    ordered: float
    unit: str
    tolerance_pct: float


def revise_po(received: Mapping[str, float], old: Record | None, new: Record, specs: Mapping[str, Record],
              rules: ReceivingRules) -> tuple[dict[str, float], list[OverReceived]]:
    """Re-base the running received totals on a new PO revision.

    Totals are kept per line in the PO's unit; when the revision changes a line's unit the
    total is converted (kept as is if the units do not convert). Returns the new totals and the
    lines the revision leaves over-delivered beyond their tolerance.
    """
    old_units = {str(ln["line_no"]): ln["unit"] for ln in old["lines"]} if old else {}
    totals: dict[str, float] = {}
    over: list[OverReceived] = []
    for ln in new["lines"]:
        key = str(ln["line_no"])
        total = received.get(key, 0.0)
        if total and old_units.get(key, ln["unit"]) != ln["unit"]:
            with contextlib.suppress(IncompatibleUnits):  # units that do not convert: kept as they were
                total *= conversion_factor(old_units[key], ln["unit"])
        if total:
            totals[key] = total
        tol = rules.tolerance_pct(specs.get(ln["material_id"]))
        if total > ln["quantity"] * (1 + tol / 100.0) and total > 0:
            over.append(OverReceived(ln["line_no"], total, ln["quantity"], ln["unit"], tol))
    return totals, over


@dataclass(slots=True)
class CoaFact:
    prop: str
    value: float | None
    low: float
    high: float
    z: float | None
    history: tuple[int, float, float]
    unit_error: str = ""
    reported: str = ""  # the value as the certificate gave it, when it was converted
    chart: ChartView | None = None  # the vendor x material x property control chart
    ref_z: float | None = None  # distance from the chart's frozen reference window, in its sigma
    signals: list[spc.Signal] = field(default_factory=list)
    level: float | None = None  # where the recent lots' mean moved, in reference sigma (None: it did not)
    spread: int | None = None  # how many recent lots lie beyond SPREAD_Z where the spread widened (None: not)


@dataclass(slots=True)
class LineFact:
    line: Record
    po_line: Record | None
    spec: Record | None
    factor: float | None = None
    unit_error: str = ""
    qty_in_po_unit: float | None = None
    tolerance_pct: float = 0.0
    price_dev: float | None = None
    coa: CoaLot | None = None
    coa_facts: list[CoaFact] = field(default_factory=list)
    duplicate_lot_of: str = ""


@dataclass(slots=True)
class PoLineTotal:
    """Every packing-list line of this receipt on one PO line, added up in the PO's unit."""

    po_line: Record
    spec: Record | None
    quantity: float  # this receipt
    previously_received: float
    partial: bool
    declared_units: set[str]


@dataclass(slots=True)
class ReceivingContext:
    receipt: Record
    po: Record | None
    lines: list[LineFact]
    totals: list[PoLineTotal]
    missing: list[str]
    duplicate_receipt_of: str
    vendor_profile: history.Profile
    rules: ReceivingRules


def _coa_facts(line: Record, spec: Record, coa: CoaLot, stats: Mapping[str, Any],
               charts: Mapping[str, history.ChartView]) -> list[CoaFact]:
    facts = []
    for prop in spec["properties"]:
        entry = coa.get(prop["name"])
        key = f"{line['material_id']}|{prop['name']}"
        stat = stats.get(key)
        value: float | None = None
        unit_error = reported = ""
        if entry is not None:
            raw, unit = entry[0], entry[1]
            try:
                value = raw * property_factor(unit, prop["unit"]) if prop.get("unit") else raw
                if prop.get("unit") and unit != prop["unit"]:
                    reported = f"{raw:g} {unit}"
            except IncompatibleUnits as exc:
                unit_error = f"{exc}: reported {raw:g} {unit}, the spec is in {prop['unit']}"
        z = history.zscore(stat, value) if value is not None else None
        fact = CoaFact(prop["name"], value, prop["min"], prop["max"], z, history.stat_summary(stat),
                       unit_error, reported, charts.get(key))
        chart = fact.chart
        if chart is not None and value is not None and math.isfinite(value) and chart.frozen(CHART.reference_n):
            assert chart.reference is not None
            _, mean, std = history.stat_summary(chart.reference)
            scale = max(std, 1e-9 * max(1.0, abs(mean)))
            fact.ref_z = (value - mean) / scale
            if prop["min"] <= value <= prop["max"]:  # out of spec is a rule's, not a chart's
                fact.signals = spc.scan(chart.reference, [*chart.values, value], CHART)
                recent = [(v - mean) / scale for v in chart.recent[-(LEVEL_N - 1):]]
                fact.level = process_level(recent, fact.ref_z)
                fact.spread = process_spread(recent, fact.ref_z)
        facts.append(fact)
    return facts


def process_spread(recent: Sequence[float], z: float) -> int | None:
    """How many of the recent standardized values and ``z`` (the newest) lie beyond ``SPREAD_Z``,
    where ``z`` itself is more than ``SPC_FREE_Z`` out and they are at least ``SPREAD_K`` of at
    least ``LEVEL_MIN``; None otherwise (a wider spread is not what made this lot stand out).

    >>> process_spread([2.6, -0.3, -2.4, 0.8, 3.1], -2.9)
    4
    >>> process_spread([2.6, -0.3, -2.4, 0.8, 0.1], -2.9) is None  # 3 of 6: one far lot is no wider spread
    True
    """
    if not abs(z) > SPC_FREE_Z or len(recent) + 1 < LEVEL_MIN:
        return None
    wide = 1 + sum(1 for v in recent if abs(v) > SPREAD_Z)  # NaN compares False: not beyond
    return wide if wide >= SPREAD_K else None


def process_level(recent: Sequence[float], z: float) -> float | None:
    """The mean of the recent standardized values and ``z`` (the newest) where it moved: at least
    ``LEVEL_FREE`` out and ``LEVEL_T`` standard errors from zero; None otherwise.

    >>> round(process_level([2.1, 2.4, 1.9, 2.6], 2.2), 2)
    2.24
    >>> process_level([3.0, 0.2, 3.1, 0.1], 2.9) is None  # 1.9 out, but within 3 standard errors
    True
    """
    zs = [max(-1e6, min(1e6, v)) for v in (*recent, z) if math.isfinite(v)]  # bounded: no overflow squaring
    n = len(zs)
    if n < LEVEL_MIN:
        return None
    level = math.fsum(zs) / n  # plain sums: ``statistics`` cost ~30 us per CoA value on the hot path
    if abs(level) < LEVEL_FREE:
        return None
    spread = math.sqrt(max(0.0, math.fsum((v - level) * (v - level) for v in zs) / (n - 1)))
    if abs(level) * math.sqrt(n) < LEVEL_T * spread:
        return None
    return level


def derive(receipt: Record, po: Record | None, received: Mapping[str, float], coas: Mapping[str, CoaLot],
           specs: Mapping[str, Record], vendor_profile: history.Profile, rules: ReceivingRules, *,
           duplicate_receipt: bool = False, lot_owners: Mapping[tuple[str, str], str] | None = None,
           missing: list[str] | None = None, charts: Mapping[str, history.ChartView] | None = None) -> ReceivingContext:
    """Join the receipt with the PO revision in force, its lots' certificates and history; facts once.

    ``received`` holds what earlier receipts delivered per PO line (in the PO's unit);
    ``lot_owners`` maps (PO line, vendor lot) of this receipt's lines to a receipt that
    already delivered them; ``missing`` is ``missing_documents`` of the same inputs when the
    caller has it already; ``charts`` the control charts of the receipt's material properties.
    """
    owners = lot_owners or {}
    charts = charts or {}
    po_lines = {pl["line_no"]: pl for pl in po["lines"]} if po else {}
    stats = vendor_profile["stats"]
    facts = []
    totals: dict[int, PoLineTotal] = {}
    for line in receipt["lines"]:
        po_line = po_lines.get(line["po_line"])
        spec = specs.get(line["material_id"])
        fact = LineFact(line, po_line, spec)
        fact.duplicate_lot_of = owners.get((str(line["po_line"]), line["vendor_lot"]), "")
        if po_line is not None:
            fact.tolerance_pct = rules.tolerance_pct(spec)
            try:
                fact.factor = conversion_factor(line["unit"], po_line["unit"])
                fact.qty_in_po_unit = line["quantity"] * fact.factor
            except IncompatibleUnits as exc:
                fact.unit_error = str(exc)
            price = line.get("unit_price")
            if price is not None and fact.factor and po_line["unit_price"] > 0:
                fact.price_dev = (price / fact.factor - po_line["unit_price"]) / po_line["unit_price"]
            if fact.qty_in_po_unit is not None:
                total = totals.get(line["po_line"])
                if total is None:
                    total = totals[line["po_line"]] = PoLineTotal(
                        po_line, spec, 0.0, received.get(str(line["po_line"]), 0.0), False, set())
                total.quantity += fact.qty_in_po_unit
                total.partial = total.partial or line["partial"]
                total.declared_units.add(line["unit"])
        if spec is not None and spec["requires_coa"]:
            coa = coas.get(line["vendor_lot"])
            fact.coa = coa
            if coa is not None:
                fact.coa_facts = _coa_facts(line, spec, coa, stats, charts)
        facts.append(fact)
    if missing is None:
        missing = missing_documents(receipt, po, specs, coas, {lot for _, lot in owners})
    return ReceivingContext(receipt, po, facts, list(totals.values()), missing,
                            receipt["receipt_id"] if duplicate_receipt else "", vendor_profile, rules)


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
        elif not any(f.coa is not None for f in ctx.lines if f.line["vendor_lot"] == ref):
            # (a lot with some certificates is COA_INCOMPLETE, from check_certificates)
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
    """PO line, material, unit and price of every packing-list line; quantity per PO line."""
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
        ordered, tol = pl["quantity"], f.tolerance_pct / 100.0
        if line["unit"] != pl["unit"] and ordered > 0:
            # The ordered number in another unit reads as "not converted" -- unless the line is a
            # declared partial, whose number can be anything.
            if not line["partial"] and abs(line["quantity"] - ordered) <= tol * ordered:
                out.append(_r("UNIT_MISMATCH", Severity.BLOCK,
                              f"{line['quantity']:g} {line['unit']} looks like the PO's {ordered:g} {pl['unit']} "
                              f"unconverted: it is {f.qty_in_po_unit:.6g} {pl['unit']}", quantity=line["quantity"],
                              unit=line["unit"], po_quantity=ordered, po_unit=pl["unit"],
                              converted=f.qty_in_po_unit))
            else:
                out.append(_r("UNIT_CONVERTED", Severity.INFO, f"converted {line['unit']} to {pl['unit']}",
                              factor=f.factor or 0.0, converted=f.qty_in_po_unit))
        if f.price_dev is not None and abs(f.price_dev) > ctx.rules.price_tolerance_pct / 100.0:
            out.append(_r("PRICE_ANOMALY", Severity.BLOCK, f"line {line['po_line']}: price differs "
                          f"{100 * f.price_dev:+.1f}% from the PO", po_line=line["po_line"], price=line["unit_price"],
                          po_price=pl["unit_price"], deviation_pct=100 * f.price_dev))
    for total in ctx.totals:
        out.extend(_check_quantity(ctx, total))
    return out


def _check_quantity(ctx: ReceivingContext, t: PoLineTotal) -> list[Reason]:
    """Cumulative quantity on one PO line (all its packing-list lines, all earlier receipts)."""
    pl = t.po_line
    no, ordered, unit = pl["line_no"], pl["quantity"], pl["unit"]
    if ordered <= 0:
        return [_r("PO_LINE_CANCELLED", Severity.BLOCK, f"line {no} of the PO is cancelled (ordered 0 {unit})",
                   po_line=no, received=t.quantity)]
    tol = ctx.rules.tolerance_pct(t.spec) / 100.0
    out = []
    cumulative = t.previously_received + t.quantity
    deviation = (cumulative - ordered) / ordered
    if deviation > tol:
        out.append(_r("QUANTITY_OVER", Severity.BLOCK, f"line {no}: received {cumulative:.6g} {unit} of "
                      f"{ordered:g} ordered", po_line=no, received=cumulative, ordered=ordered,
                      deviation_pct=100 * deviation, tolerance_pct=100 * tol))
    elif t.partial:
        out.append(_r("PARTIAL_DELIVERY", Severity.INFO, "declared partial shipment",
                      received=cumulative, ordered=ordered))
    elif deviation < -tol:
        out.append(_r("QUANTITY_SHORT", Severity.BLOCK, f"line {no}: received {cumulative:.6g} {unit} of "
                      f"{ordered:g} ordered", po_line=no, received=cumulative, ordered=ordered,
                      deviation_pct=100 * deviation, tolerance_pct=100 * tol))
    # A unit slip: the quantity is what was expected times a lb/kg or gal/L factor. Expected is the
    # ordered quantity, or for a declared partial the open remainder (a final partial shipment).
    expected = ordered - t.previously_received if t.partial else ordered
    if expected > 0 and unit in t.declared_units:
        ratio = t.quantity / expected
        slip = next((k for k in UNIT_SLIP_FACTORS if abs(ratio / k - 1) <= ctx.rules.unit_slip_tolerance), None)
        if slip is not None:
            out.append(_r("PROBABLE_UNIT_MISLABEL", Severity.WARN,
                          f"quantity is {ratio:.4f} x the {'open remainder' if t.partial else 'PO'}: "
                          "the unit on the label is probably wrong", ratio=ratio, unit_factor=slip))
    return out


def check_certificates(ctx: ReceivingContext) -> list[Reason]:
    out = []
    for f in ctx.lines:
        for c in f.coa_facts:
            lot = f.line["vendor_lot"]
            if c.unit_error:
                out.append(_r("COA_UNIT_MISMATCH", Severity.BLOCK, f"CoA of lot {lot}, {c.prop}: {c.unit_error}",
                              vendor_lot=lot, property=c.prop))
            elif c.value is None:
                out.append(_r("COA_INCOMPLETE", Severity.BLOCK, f"CoA of lot {lot} has no {c.prop}",
                              vendor_lot=lot, property=c.prop))
            elif not c.low <= c.value <= c.high:
                out.append(_r("COA_OUT_OF_SPEC", Severity.BLOCK, f"{c.prop} {c.value:g} outside "
                              f"[{c.low:g}, {c.high:g}]", vendor_lot=lot, property=c.prop, value=c.value,
                              min=c.low, max=c.high, **({"reported": c.reported} if c.reported else {})))
            elif c.signals:
                charts = ", ".join(dict.fromkeys(sig.chart for sig in c.signals))
                out.append(_r("SPC_SIGNAL", Severity.WARN, f"{c.prop} of lot {lot}: "
                              + "; ".join(sig.message for sig in c.signals), vendor_lot=lot, property=c.prop,
                              charts=charts, **c.signals[0].evidence))
            elif c.level is not None and c.ref_z is not None:
                # No chart signals on this lot's own value, but the recent lots' mean has moved: a
                # drifting process makes every lot bad whatever its own value, and right after a
                # signal the CUSUMs start again from zero (lots of the drifting vendor were verified
                # there, learning runs 18, 21 and 23).
                out.append(_r("SPC_SIGNAL", Severity.WARN, f"{c.prop} of lot {lot}: the last {LEVEL_N} lots "
                              f"average {c.level:+.1f} sigma from the chart's reference (this lot {c.ref_z:+.1f})",
                              vendor_lot=lot, property=c.prop, charts=PROCESS_LEVEL, z=c.ref_z,
                              process_level=c.level))
            elif c.spread is not None and c.ref_z is not None:
                # The lot's own value is far and the chart's recent lots scatter wider than its
                # reference: what a vendor whose spread widened looks like between its variance
                # CUSUM's signals (``SPREAD_K``).
                out.append(_r("SPC_SIGNAL", Severity.WARN, f"{c.prop} of lot {lot}: {c.ref_z:+.1f} sigma from the "
                              f"chart's reference while {c.spread} of its recent lots (the last {LEVEL_N} at most) "
                              f"lie beyond {SPREAD_Z:g} sigma (a wider spread)", vendor_lot=lot, property=c.prop,
                              charts=PROCESS_SPREAD, z=c.ref_z, wide_lots=c.spread))
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

_DOCS = route(ReasonClass.DOCUMENTS, "Contact the supplier or buyer for the missing document; hold the goods in "
                                     "quarantine.")
ROUTES: dict[str, Route] = {
    "UNKNOWN_PO": _DOCS,
    "MISSING_COA": _DOCS,
    "COA_INCOMPLETE": route(ReasonClass.DOCUMENTS, "Request a complete CoA from the supplier."),
    "UNKNOWN_PO_LINE": route(ReasonClass.PURCHASE_ORDER, "Check the packing list against the PO with the buyer."),
    "DUPLICATE_RECEIPT": route(ReasonClass.PURCHASE_ORDER, "Compare with the earlier receipt; reverse the double "
                                                           "booking."),
    "VENDOR_MISMATCH": route(ReasonClass.PURCHASE_ORDER, "Confirm the shipper; re-book against the right PO."),
    "QUANTITY_OVER": route(ReasonClass.PURCHASE_ORDER, "Recount; return the excess or ask the buyer to amend the "
                                                       "PO."),
    "QUANTITY_SHORT": route(ReasonClass.PURCHASE_ORDER, "Recount; open a shortage claim with the supplier."),
    "PO_LINE_CANCELLED": route(ReasonClass.PURCHASE_ORDER, "The PO line is cancelled: return the goods or ask the "
                                                           "buyer to reinstate the line."),
    "PO_REVISED_BELOW_RECEIVED": route(ReasonClass.PURCHASE_ORDER, "A PO revision left this delivery over the "
                                                                   "ordered quantity: return the excess or amend "
                                                                   "the PO."),
    "UNIT_MISMATCH": route(ReasonClass.MEASUREMENT, "Re-weigh or recount and correct the unit on the receipt."),
    "UNIT_INCOMPATIBLE": route(ReasonClass.MEASUREMENT, "Correct the unit of measure on the receipt."),
    "PROBABLE_UNIT_MISLABEL": route(ReasonClass.MEASUREMENT, "Re-weigh: the quantity matches a lb/kg or gal/L "
                                                             "slip."),
    "COA_UNIT_MISMATCH": route(ReasonClass.MEASUREMENT, "The CoA reports a unit that does not convert to the "
                                                        "spec's: request a corrected certificate."),
    "UNKNOWN_MATERIAL": route(ReasonClass.MATERIAL, "Identify the material; reject or create a spec."),
    "MATERIAL_MISMATCH": route(ReasonClass.MATERIAL, "Wrong material delivered: quarantine and contact the "
                                                     "supplier."),
    "COA_OUT_OF_SPEC": route(ReasonClass.SPEC, "Quarantine the lot; retest or reject and raise a SCAR."),
    "COA_ATYPICAL": route(ReasonClass.MEASUREMENT, "In spec but unusual for this supplier: retest a sample."),
    "PRICE_ANOMALY": route(ReasonClass.COST, "Check the price with purchasing before invoice matching."),
    "SPC_SIGNAL": route(ReasonClass.SPEC, "In spec, but the control chart signals a change at this supplier: "
                                          "compare with its recent lots and retest; if the supplier changed its "
                                          "method, accept and re-baseline the chart."),
    SPOT_CHECK: route(ReasonClass.DOCUMENTS, "Spot check of an automatically verified receipt (the material has "
                                             "proceeded): check it against its PO and certificates."),
}

# Which reasons the model may learn to verify, and within which envelope; every other WARN or
# BLOCK reason is hard (always a person's): unknown PO or material, missing or out-of-spec
# CoA, cancelled line, a unit that does not convert or was not converted, duplicates, vendor
# mismatch, shortages, a probable unit slip. INFO reasons never stop a receipt; they are listed
# here where the model weighs them.
SOFT_REASONS: dict[str, SoftEnvelope] = {
    "QUANTITY_OVER": SoftEnvelope("over-delivery up to 5 % of the ordered quantity", "deviation_pct", 5.0,
                                  graded_by="deviation_pct"),
    "PRICE_ANOMALY": SoftEnvelope("a price deviation up to 25 % either way", "deviation_pct", 25.0,
                                  graded_by="deviation_pct", signed=True),
    # graded per property of the lot (``spc_pattern_keys``)
    "SPC_SIGNAL": SoftEnvelope("an in-spec CoA value on a control-chart signal (mean shift, spread, run rule)"),
    "COA_ATYPICAL": SoftEnvelope("an in-spec CoA value atypical for the vendor (INFO: weighed by the model)"),
    "UNIT_CONVERTED": SoftEnvelope("a receipt line in another unit, converted (INFO)"),
    "VENDOR_TREND": SoftEnvelope("a vendor whose recent receipts failed rules more often (INFO)"),
}
# No rule failed but the vendor's history makes it unusual: a supplier question.
LOW_CONFIDENCE = route(ReasonClass.MATERIAL, "No rule failed but the history makes this unusual: review the lot.")


def node_config(verify_threshold: float, high_priority_threshold: float) -> NodeConfig:
    return NodeConfig("receiving", verify_threshold, high_priority_threshold, ROUTES, LOW_CONFIDENCE, SOFT_REASONS)


def identity(ctx: ReceivingContext) -> tuple[str, str]:
    """(receipt id, vendor id): what a spot check is drawn by, and whose drift tightens it."""
    return ctx.receipt["receipt_id"], ctx.receipt["vendor_id"]


def pattern_keys(ctx: ReceivingContext, reason: Reason) -> list[PatternKey]:
    """Vendor x material x reason, with its size where it is graded (``QUANTITY_OVER~3.40`` for
    3.4 % over): what people's decisions on a soft reason are counted by. A control-chart signal
    stands for the receipt's CoA values as a whole: one pattern per property that stands out
    (``spc_pattern_keys``)."""
    if reason.code == "SPC_SIGNAL":
        keys = spc_pattern_keys(ctx)
        if keys:
            return keys
    envelope = SOFT_REASONS.get(reason.code)
    pattern = envelope.pattern(reason) if envelope is not None else reason.code
    return [(ctx.receipt["vendor_id"], _material_of(ctx, reason), pattern)]


def spc_pattern_keys(ctx: ReceivingContext) -> list[PatternKey]:
    """The graded patterns of a receipt's CoA values on a control-chart signal, per vendor x
    material x property: ``SPC_SIGNAL:<property>~<|z|>`` for each value that signals or stands
    more than ``SPC_FREE_Z`` reference sigma out, and ``SPC_LEVEL:<property>~<|level|>`` where the
    recent lots' mean has moved (``CoaFact.level``), over every lot of the receipt (the largest per
    material and property). Per property, because each chart's reference
    sigma errs its own way (0.6-1.5 x the truth from 50 heavy-tailed lots): one band pooled over
    a lot's properties mixed good and bad lots. The level, because a drifting process makes every
    lot bad whatever its own value, and lots accepted early in the drift would clear the later
    ones. A re-baselined chart's patterns are new ones (``/<epoch>``)."""
    sizes: dict[tuple[str, str], float] = {}
    for f in ctx.lines:
        material = f.line["material_id"]
        for c in f.coa_facts:
            if c.ref_z is None or not math.isfinite(c.ref_z) or c.value is None or not c.low <= c.value <= c.high:
                continue  # out of spec is a rule's: a waiver accepted for it clears no in-spec distance
            prop = _PATTERN_UNSAFE.sub("_", c.prop)
            suffix = f"/{c.chart.epoch}" if c.chart is not None and c.chart.epoch else ""
            points = []
            if c.signals or abs(c.ref_z) > SPC_FREE_Z:
                points.append((f"SPC_SIGNAL:{prop}{suffix}", abs(c.ref_z)))
            if c.level is not None:
                points.append((f"SPC_LEVEL:{prop}{suffix}", abs(c.level)))
            for code, size in points:
                sizes[(material, code)] = max(sizes.get((material, code), 0.0), size)
    vendor = ctx.receipt["vendor_id"]
    return [(vendor, material, graded(code, size)) for (material, code), size in sizes.items()]


def features(ctx: ReceivingContext, reasons: Sequence[Reason]) -> dict[str, float]:
    """Plain-dict features for the confidence model (River style: keys may come and go).

    Only what may explain a good or bad hand-off, mostly zero on a clean one: the regression has
    no learnt intercept, and a feature every receipt carries (the number of lines, the vendor's
    receipt count — both were here) becomes one, learnt from the biased sample people label.
    """
    x: dict[str, float] = {
        "n_block": float(sum(r.severity is Severity.BLOCK for r in reasons)),
        "n_warn": float(sum(r.severity is Severity.WARN for r in reasons)),
        "vendor_exception_rate": history.exception_rate(ctx.vendor_profile),
    }
    for r in reasons:
        x[f"reason_{r.code.lower()}"] = 1.0
    zs = [abs(c.z) for f in ctx.lines for c in f.coa_facts if c.z is not None]
    needs_history = any(f.coa_facts for f in ctx.lines)
    if zs:
        x["coa_max_abs_z"] = max(zs)
    if needs_history:
        x["coa_history_missing"] = float(any(c.z is None for f in ctx.lines for c in f.coa_facts))
    devs = [abs((t.previously_received + t.quantity) / t.po_line["quantity"] - 1.0)
            for t in ctx.totals if not t.partial and t.po_line["quantity"] > 0]
    if devs:
        x["quantity_max_abs_dev"] = max(devs)
    prices = [abs(f.price_dev) for f in ctx.lines if f.price_dev is not None]
    if prices:
        x["price_max_abs_dev"] = max(prices)
    # Against each chart's frozen reference window: how far the farthest value, and the lot's
    # properties taken together (|sum of z| / sqrt(k): values moving together), go beyond what
    # clean lots reach. Hinges, not distances: a linear model on a distance would tax every
    # clean lot for its ordinary scatter (measured: -0.65 logit per sigma of joint z, learnt).
    joint, farthest = 0.0, 0.0
    for f in ctx.lines:
        ref_zs = [c.ref_z for c in f.coa_facts if c.ref_z is not None]
        if ref_zs:
            farthest = max(farthest, *(abs(z) for z in ref_zs))
            if len(ref_zs) > 1:
                joint = max(joint, abs(sum(ref_zs)) / math.sqrt(len(ref_zs)))
    if farthest > REF_Z_FREE:
        x["coa_ref_z_excess"] = farthest - REF_Z_FREE
    if joint > JOINT_Z_FREE:
        x["coa_joint_z_excess"] = joint - JOINT_Z_FREE
    signals = sum(1 for f in ctx.lines for c in f.coa_facts if c.signals)
    if signals:
        x["spc_signals"] = float(signals)
    margins = [min(c.value - c.low, c.high - c.value) / (c.high - c.low) for f in ctx.lines for c in f.coa_facts
               if c.value is not None and c.high > c.low and c.low <= c.value <= c.high]
    if margins:
        x["coa_min_margin"] = min(margins)  # near a limit: learnt from decisions, not a reason by itself
    return x


# --- explanations ----------------------------------------------------------------------------
def _codes(reasons: Sequence[Reason], severity: Severity) -> str:
    codes = sorted({r.code for r in reasons if r.severity is severity})
    return ", ".join(codes) if codes else "none"


def _describe_blocks(ctx: ReceivingContext, reasons: Sequence[Reason], value: float) -> str:
    return f"{value:.0f} rule{'s' if value != 1 else ''} failed ({_codes(reasons, Severity.BLOCK)})"


def _describe_warnings(ctx: ReceivingContext, reasons: Sequence[Reason], value: float) -> str:
    return f"{value:.0f} warning{'s' if value != 1 else ''} ({_codes(reasons, Severity.WARN)})"


def _describe_coa_distance(ctx: ReceivingContext, reasons: Sequence[Reason], value: float) -> str:
    facts = [(abs(c.z), c, f) for f in ctx.lines for c in f.coa_facts if c.z is not None]
    if not facts:
        return f"a CoA value {value:.1f} \u03c3 from this vendor's history"
    _, fact, line = max(facts, key=lambda item: item[0])
    return (f"CoA {fact.prop} of lot {line.line['vendor_lot']} {signed(fact.z or 0.0)} \u03c3 from this vendor's last "
            f"{fact.history[0]} lots of {line.line['material_id']}")


def _describe_vendor_rate(ctx: ReceivingContext, reasons: Sequence[Reason], value: float) -> str:
    return (f"vendor {ctx.receipt['vendor_id']}: {100 * value:.0f} % of recent receipts failed a rule "
            f"({ctx.vendor_profile['n']} receipts seen)")


def _describe_no_history(ctx: ReceivingContext, reasons: Sequence[Reason], value: float) -> str:
    missing = sorted({f"{f.line['material_id']} {c.prop}" for f in ctx.lines for c in f.coa_facts
                      if c.z is None and c.value is not None})
    what = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "") if missing else "its CoA values"
    return f"too little history of this vendor to judge {what}"


DESCRIBE: Describe[ReceivingContext] = Describe({
    "n_block": _describe_blocks,
    "n_warn": _describe_warnings,
    "coa_max_abs_z": _describe_coa_distance,
    "vendor_exception_rate": _describe_vendor_rate,
    "coa_history_missing": _describe_no_history,
    "quantity_max_abs_dev": lambda ctx, reasons, v: f"quantity {100 * v:.1f} % off the PO",
    "price_max_abs_dev": lambda ctx, reasons, v: f"price {100 * v:.1f} % off the PO",
    "n_soft": lambda ctx, reasons, v: (f"{v:.0f} deviation{'s' if v != 1 else ''} people may accept "
                                       f"({', '.join(sorted({r.code for r in reasons if r.code in SOFT_REASONS}))})"),
    "prior_logit": lambda ctx, reasons, v: f"the documented prior's score (logit {v:+.1f})",
    "pattern_accept_share": lambda ctx, reasons, v: f"people accepted {100 * v:.0f} % of this vendor's similar "
                                                    "exceptions (smoothed)",
    "pattern_labels_log": lambda ctx, reasons, v: f"{math.expm1(v):.0f} decisions by people on this pattern "
                                                  "(of a size: as large accepted, as small rejected)",
    "coa_ref_z_excess": lambda ctx, reasons, v: f"a CoA value {v + REF_Z_FREE:.1f} \u03c3 from its control chart's "
                                                "reference",
    "coa_joint_z_excess": lambda ctx, reasons, v: f"the lot's CoA values together {v + JOINT_Z_FREE:.1f} \u03c3 "
                                                  "from the reference (moving together)",
    "spc_signals": lambda ctx, reasons, v: f"{v:.0f} control-chart signal{'s' if v != 1 else ''}",
    "coa_min_margin": lambda ctx, reasons, v: f"a CoA value {100 * v:.0f} % of the spec range from a limit",
})


# --- the historical pattern and the recommended next step -------------------------------------
LOW_CONFIDENCE_CODE = "LOW_CONFIDENCE"  # the pattern key of an exception no rule raised
MIN_DECISIONS_FOR_ADVICE = 3  # fewer person decisions than this: the route's default step
_RESOLUTION_VERBS = {"ACCEPT": ("Accept", "accepted"), "CONDITIONAL_ACCEPT": ("Accept with a condition",
                     "accepted with a condition"), "REJECT": ("Reject", "rejected")}


def _material_of(ctx: ReceivingContext, reason: Reason | None) -> str:
    """The material a reason is about: named in its evidence, or the line its lot or PO line names."""
    if reason is not None:
        evidence = reason.evidence
        if evidence.get("material_id"):
            return evidence["material_id"]
        if reason.code in ("MATERIAL_MISMATCH", "UNKNOWN_MATERIAL") and evidence.get("received"):
            return evidence["received"]  # the material delivered (elsewhere "received" is a quantity)
        for f in ctx.lines:
            if evidence.get("vendor_lot") == f.line["vendor_lot"] or evidence.get("po_line") == str(f.line["po_line"]):
                return str(f.line["material_id"])
    return str(ctx.lines[0].line["material_id"]) if ctx.lines else ""


def pattern_of(ctx: ReceivingContext, reason: Reason | None) -> history.PatternCounts:
    """How often this vendor's receipts of the material had the routed reason, and what people did."""
    code = reason.code if reason is not None else LOW_CONFIDENCE_CODE
    return history.pattern_counts(ctx.vendor_profile, _material_of(ctx, reason), code)


def pattern_text(ctx: ReceivingContext, pattern: history.PatternCounts) -> str:
    """In the form "Vendor V, material M: 212 prior receipts; this reason in 6 % of them; accepted by a
    person in 71 % of those", then what is unusual about its CoA values."""
    vendor = ctx.receipt["vendor_id"]
    head = f"Vendor {vendor}, material {pattern.material_id}: {pattern.prior_receipts} prior receipts"
    parts = [head]
    if pattern.prior_receipts:
        share = 100 * pattern.with_reason / pattern.prior_receipts
        parts.append(f"{pattern.reason_code} in {share:.0f} % of them ({pattern.with_reason})")
    if pattern.decided:
        accepted = pattern.accepted + pattern.conditional
        parts.append(f"accepted by a person in {100 * accepted / pattern.decided:.0f} % of those "
                     f"({accepted} of {pattern.decided} decided)")
    else:
        parts.append("no person has decided one yet")
    for f in ctx.lines:
        for c in f.coa_facts:
            n, mean, std = c.history
            if n and c.z is not None and abs(c.z) >= ATYPICAL_Z and c.value is not None:
                parts.append(f"{c.prop} of {f.line['material_id']}: {mean:.4g} +/- {std:.2g} over {n} lots, "
                             f"this lot {c.value:.4g}")
    return "; ".join(parts)


def recommendation(pattern: history.PatternCounts, verdict: Verdict) -> str:
    """What people did most often in similar cases, and how often; the route's step until enough did."""
    default = verdict.route.action if verdict.route is not None else ""
    if pattern.decided < MIN_DECISIONS_FOR_ADVICE:
        return default
    counts = {"ACCEPT": pattern.accepted, "CONDITIONAL_ACCEPT": pattern.conditional, "REJECT": pattern.rejected}
    resolution = max(counts, key=lambda name: counts[name])
    verb, done = _RESOLUTION_VERBS[resolution]
    return (f"{verb}: people {done} {counts[resolution]} of {pattern.decided} similar exceptions "
            f"({100 * counts[resolution] / pattern.decided:.0f} %). Otherwise: {default}")
