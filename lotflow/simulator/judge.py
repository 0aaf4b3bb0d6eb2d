"""The ground truth: what a correct reviewer decides about one receipt, by the documented
thresholds, not by what the pipeline's code happens to do.

Rule-visible faults (given the documents in force when the receipt is decided):

* quantity: the receipt lines on one PO line are summed with every earlier receipt on that
  line (all of them, faulty ones included, each converted to the PO unit of the revision in
  force); ``deviation = (cumulative - ordered) / ordered``. ``deviation > tol`` is
  ``QUANTITY_OVER``; on a line *not* declared partial, ``deviation < -tol`` is
  ``QUANTITY_SHORT``; ``tol`` is the spec's ``quantity_tolerance_pct`` (else
  ``QUANTITY_TOLERANCE_PCT``) / 100. A vendor with a standing over-delivery agreement (the
  ``agreed_over_ship`` vendor, when its behaviour is on) may over-deliver up to ``agreed_over``
  = ``max(tol, 4 %)``: for its receipts ``QUANTITY_OVER`` is ``deviation > agreed_over`` (a
  correct reviewer knows the agreement; the pipeline's rule does not). A PO line of quantity
  0 is cancelled: a receipt line on it is ``PO_LINE_CANCELLED``;
* price: ``|printed price / factor(line unit -> PO unit) / PO price - 1| > 15 %`` is
  ``PRICE_ANOMALY`` (a line without a printed price has no price fault);
* CoA: the certificates of a lot are merged per property, a later ``issued_at`` replacing an
  earlier one; a value in another unit is converted when the pair converts (``%``/``ppm``,
  ``cP``/``mPa.s``, ``g/cm3``/``kg/m3``, ``um``/``mm``), else it is ``COA_UNIT_MISMATCH``; a
  value outside ``[min, max]`` is ``COA_OUT_OF_SPEC``.

Generator facts no threshold expresses: ``UNKNOWN_PO`` (never published),
``UNKNOWN_MATERIAL`` (no spec), ``MISSING_COA`` (never published), ``DUPLICATE_RECEIPT``,
``UNIT_MISMATCH`` (the PO's number printed in another unit, unconverted),
``SILENT_UNIT_LABEL`` (a lb/kg slip under the PO's unit label), ``PO_REVISED_BELOW_RECEIVED``
and the silent CoA faults, each defined against the vendor-material pair's *baseline*
(mean, std: ``world.Supply.profiles``; for the property whose test method changed, the new
method's mean from the change on, ``world.Supply.baseline``: a lot of the
``test_method_change`` vendor measured by the new method is judged against it and is clean,
``TEST_METHOD_CHANGE``) with ``SILENT_K`` = 4:

* ``SILENT_COA_DRIFT``: an in-spec value put more than K baseline std from the mean by a
  perturbation (``silent_coa_drift``, or ``coa_out_of_spec`` landing inside the limits);
* ``SILENT_VENDOR_DRIFT``: a lot of the drifting vendor whose process mean has moved more
  than K baseline std (whatever the lot's own value);
* ``SILENT_VARIANCE_JUMP``: a lot of the variance-jump vendor, after the jump, with a value
  more than K baseline std from the mean;
* ``SILENT_COA_COMOVEMENT``: a lot of the co-movement vendor-material, after the pattern's
  start, whose values all sit 2-3 baseline std from the mean in the same direction (in spec,
  none beyond 3.5 std): each value is unremarkable, together they are not.

Ordinary lot-to-lot noise is never a fault, however far its heavy tail reaches. A receipt
can have several faults; ``fault`` reports the first in ``faults.FAULT_CODES`` order.
Perturbations are drawn so that no realised deviation lies within ``GUARD`` of its
threshold: float rounding in the checks cannot flip a label.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lotflow.simulator.faults import FAULT_CODES, SILENT_CODES
from lotflow.simulator.units import coa_convertible, coa_factor, factor

__all__ = [
    "GUARD",
    "PRICE_TOLERANCE_PCT",
    "QUANTITY_TOLERANCE_PCT",
    "SILENT_K",
    "coa_in_spec_unit",
    "cumulative",
    "judge_receipt",
    "merge_certificates",
    "order_codes",
    "over_limit",
    "price_deviation",
    "quantity_deviation",
    "tolerance",
]

Record = dict[str, Any]

QUANTITY_TOLERANCE_PCT = 2.0  # when the spec gives none
PRICE_TOLERANCE_PCT = 15.0
SILENT_K = 4.0
GUARD = 1e-5  # relative distance to a threshold a perturbation never lands within


def tolerance(spec: Mapping[str, Any] | None) -> float:
    pct = spec.get("quantity_tolerance_pct") if spec else None
    return (QUANTITY_TOLERANCE_PCT if pct is None else float(pct)) / 100.0


def cumulative(earlier: Iterable[tuple[float, str]], quantity: float, unit: str, po_unit: str) -> float:
    """Earlier receipts' (quantity, unit) on a PO line plus this one, in ``po_unit``."""
    total = 0.0
    for q, u in earlier:
        total += q * factor(u, po_unit)
    return total + quantity * factor(unit, po_unit)


def quantity_deviation(cum: float, ordered: float) -> float:
    return (cum - ordered) / ordered


def price_deviation(price: float, line_unit: str, po_unit: str, po_price: float) -> float:
    return (price / factor(line_unit, po_unit) - po_price) / po_price


def coa_in_spec_unit(value: float, unit: str, spec_unit: str) -> float | None:
    """The value in the spec's unit, or None when the units do not convert."""
    if unit == spec_unit:
        return value
    if not coa_convertible(unit, spec_unit):
        return None
    return value * coa_factor(unit, spec_unit)


def merge_certificates(certificates: Sequence[Record]) -> dict[str, tuple[float, str]]:
    """Per property, the (value, unit) of the latest-issued certificate that carries it."""
    merged: dict[str, tuple[float, str]] = {}
    for cert in sorted(certificates, key=lambda c: c["issued_at"]):  # stable: ties keep order
        for v in cert["values"]:
            merged[v["property"]] = (v["value"], v["unit"])
    return merged


def order_codes(codes: Iterable[str]) -> list[str]:
    """Distinct codes in precedence order."""
    rank = {code: n for n, code in enumerate(FAULT_CODES)}
    return sorted(set(codes), key=lambda c: rank[c])


def is_silent(codes: Sequence[str]) -> bool:
    return bool(codes) and all(c in SILENT_CODES for c in codes)


def over_limit(spec: Mapping[str, Any] | None, agreed_over: float = 0.0) -> float:
    """The cumulative over-delivery (fraction) beyond which a line is ``QUANTITY_OVER``: the
    tolerance, or a larger standing agreement of the vendor (``agreed_over``)."""
    return max(tolerance(spec), agreed_over)


def judge_receipt(receipt: Record, po: Record | None, earlier: Mapping[int, Sequence[tuple[float, str]]],
                  specs: Mapping[str, Record], lot_values: Mapping[str, Mapping[str, tuple[float, str]] | None],
                  facts: Iterable[str] = (), *, agreed_over: float = 0.0) -> list[str]:
    """Fault codes of ``receipt`` in precedence order (empty: a clean receipt).

    ``po``: the revision in force (None: never published); ``earlier``: per PO line the
    (quantity, unit) of every receipt decided before this one; ``specs``: material specs by
    id; ``lot_values``: per vendor lot its merged CoA values (None: no certificate);
    ``facts``: generator-known codes (see the module doc); ``agreed_over``: the vendor's
    standing over-delivery agreement (fraction, 0: none).
    """
    codes = list(facts)
    if po is None:
        return order_codes([*codes, "UNKNOWN_PO"])
    po_lines = {pl["line_no"]: pl for pl in po["lines"]}
    for line in receipt["lines"]:
        spec = specs.get(line["material_id"])
        pl = po_lines.get(line["po_line"])
        if spec is None or pl is None or pl["material_id"] != line["material_id"]:
            codes.append("UNKNOWN_MATERIAL")
            continue
        if pl["quantity"] == 0:
            codes.append("PO_LINE_CANCELLED")
        else:
            tol = tolerance(spec)
            cum = cumulative(earlier.get(line["po_line"], ()), line["quantity"], line["unit"], pl["unit"])
            dev = quantity_deviation(cum, pl["quantity"])
            if dev > over_limit(spec, agreed_over):
                codes.append("QUANTITY_OVER")
            elif dev < -tol and not line["partial"]:
                codes.append("QUANTITY_SHORT")
            price = line.get("unit_price")
            limit = PRICE_TOLERANCE_PCT / 100
            if (price is not None and pl["unit_price"] > 0
                    and abs(price_deviation(price, line["unit"], pl["unit"], pl["unit_price"])) > limit):
                codes.append("PRICE_ANOMALY")
        if spec["requires_coa"]:
            merged = lot_values.get(line["vendor_lot"])
            if merged is None:
                codes.append("MISSING_COA")
                continue
            for prop in spec["properties"]:
                found = merged.get(prop["name"])
                if found is None:
                    codes.append("MISSING_COA")  # never generated: every lot is fully certified
                    continue
                value = coa_in_spec_unit(found[0], found[1], prop["unit"])
                if value is None:
                    codes.append("COA_UNIT_MISMATCH")
                elif not prop["min"] <= value <= prop["max"]:
                    codes.append("COA_OUT_OF_SPEC")
    return order_codes(codes)
