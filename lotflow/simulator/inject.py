"""Perturbations of one delivery, before it is placed in the stream.

A ``Delivery`` is a receipt (its lines already rendered against the PO revision in force),
the lots' CoA values and the facts the generator knows. Each perturbation changes it in
place and returns whether it could apply. Magnitudes are drawn *across* the documented
thresholds (see ``judge``); whether a perturbation made a fault is decided afterwards, by
``judge.judge_receipt`` on the finished documents.

Each ``Lot`` carries the baseline in force for it (``Lot.baseline``: the pair's, or after a
test-method change the new method's); CoA perturbations place values against it. Lots of the
co-movement pattern (``Lot.comoved``) get no further value placement, so the pattern stays
whole. ``agreed_over_ship`` is the agreement vendor's over-shipment; ``quantity_over`` draws
across the agreement for that vendor (``Delivery.agreed_over``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lotflow.simulator.judge import (
    GUARD,
    PRICE_TOLERANCE_PCT,
    SILENT_K,
    cumulative,
    price_deviation,
    quantity_deviation,
    tolerance,
)
from lotflow.simulator.units import (
    ALTERNATE_UNIT,
    COA_ALTERNATE_UNIT,
    COA_FOREIGN_UNIT,
    KG_PER_LB,
    LB_PER_KG,
    coa_factor,
    convertible,
    factor,
)
from lotflow.simulator.world import AGREED_OVER_RANGE, Material, PropertyProfile, Vendor, World

__all__ = [
    "INJECTORS",
    "OOS_RANGE",
    "QUANTITY_RANGE",
    "SHIFT_Z",
    "SLIP_NOISE",
    "Delivery",
    "Lot",
    "agreed_over_ship",
    "convert_lot_units",
    "over_ship",
]

Record = dict[str, Any]

QUANTITY_RANGE = (0.0, 3.0)  # quantity deviation, in multiples of the line's tolerance
PRICE_RANGE = (0.0, 0.30)  # price deviation either way
OVER_SHIP_RANGE = (0.3, 0.9)  # the over-shipping vendor, in multiples of the tolerance
OOS_RANGE = (-0.06, 0.06)  # out-of-spec placement: distance beyond a limit, fraction of the range
SHIFT_Z = (2.0, 9.0)  # silent_coa_drift: distance from the baseline mean, baseline std
SLIP_NOISE = 0.004  # relative std of a unit slip's factor
_TRIES = 50


@dataclass
class Lot:
    """One vendor lot's certificate content, in the spec's units."""

    vendor_lot: str
    material: Material
    values: dict[str, float]  # the lot's true values (what the merged certificates must say)
    baseline: dict[str, PropertyProfile] = field(default_factory=dict)  # in force for this lot, by property
    units: dict[str, str] = field(default_factory=dict)  # printed unit per property, if not the spec's
    shifted_z: dict[str, float] = field(default_factory=dict)  # values a perturbation placed
    drift_z: float = 0.0  # process drift of this lot (drifting vendor)
    post_jump: bool = False  # scattered with the jumped std (variance-jump vendor)
    method_changed: bool = False  # measured by the new test method (test_method_change vendor)
    comoved: bool = False  # every value placed 2-3 std from the baseline, one direction (coa_comovement)
    plan: str = "plain"  # plain | split | reissued
    wrong: dict[str, float] = field(default_factory=dict)  # reissued: the first certificate's (spec unit)
    published: bool = True  # False: the CoA never comes (missing_coa)

    def profile(self, world: World, vendor_id: str, prop: str) -> PropertyProfile:
        """The baseline in force for ``prop`` (the pair's when none was recorded)."""
        found = self.baseline.get(prop)
        return found if found is not None else world.supply(vendor_id, self.material.material_id).profile(prop)

    def printed(self, prop: str, value: float | None = None) -> tuple[float, str]:
        """(number, unit) as the certificate prints the property's value (or ``value``,
        given in the spec's unit)."""
        spec_unit = next(p.unit for p in self.material.properties if p.name == prop)
        unit = self.units.get(prop, spec_unit)
        value = self.values[prop] if value is None else value
        return (value if unit == spec_unit or unit == COA_FOREIGN_UNIT[spec_unit]
                else round(value * coa_factor(spec_unit, unit), 10)), unit


@dataclass
class Delivery:
    vendor: Vendor
    po: Record  # the revision in force
    receipt: Record
    lots: dict[str, Lot]  # by vendor lot (lines whose material requires a CoA)
    earlier: dict[int, list[tuple[float, str]]]  # per PO line, receipts decided before
    facts: set[str] = field(default_factory=set)  # generator-known fault codes
    publish_po: bool = True
    agreed_over: float = 0.0  # the vendor's standing over-delivery agreement in force (fraction, 0: none)

    def po_line(self, line: Record) -> Record:
        return next(pl for pl in self.po["lines"] if pl["line_no"] == line["po_line"])

    def lines(self) -> list[Record]:
        return list(self.receipt["lines"])


Injector = Callable[[random.Random, World, Delivery], bool]


def _spec_tolerance(world: World, material_id: str) -> float:
    material = world.materials.get(material_id)
    return tolerance({"quantity_tolerance_pct": material.quantity_tolerance_pct} if material else None)


def _set_deviation(rng: random.Random, d: Delivery, line: Record, tol: float,
                   draw: Callable[[], float], within: bool = False,
                   accept: Callable[[float], bool] | None = None) -> bool:
    """Set ``line``'s quantity so the PO line's cumulative deviates by ``draw()`` (not within
    GUARD of ±tol; ``within``: and inside the tolerance after rounding, else unchanged;
    ``accept``: instead, whether a realised deviation will do)."""
    pl = d.po_line(line)
    earlier = d.earlier.get(line["po_line"], [])
    before = cumulative(earlier, 0.0, pl["unit"], pl["unit"])
    for _ in range(_TRIES):
        target = pl["quantity"] * (1.0 + draw()) - before
        if target <= 0:
            continue
        q = _round(target * factor(pl["unit"], line["unit"]), line["unit"])
        if q <= 0:
            continue
        dev = quantity_deviation(cumulative(earlier, q, line["unit"], pl["unit"]), pl["quantity"])
        if accept(dev) if accept is not None else abs(abs(dev) - tol) > GUARD and (not within or abs(dev) < tol):
            line["quantity"] = q
            return True
    return False


def _round(q: float, unit: str) -> float:
    return float(round(q)) if unit == "EA" else round(q, 2)


def _quantity_lines(d: Delivery) -> list[Record]:
    return [ln for ln in d.lines() if not ln["partial"] and d.po_line(ln)["quantity"] > 0
            and ln["material_id"] == d.po_line(ln)["material_id"]]


def _quantity(rng: random.Random, world: World, d: Delivery, sign: int) -> bool:
    lines = _quantity_lines(d)
    if not lines:
        return False
    line = rng.choice(lines)
    tol = _spec_tolerance(world, line["material_id"])
    limit = max(tol, d.agreed_over) if sign > 0 else tol  # over: across the vendor's agreement
    if limit == tol:
        return _set_deviation(rng, d, line, tol, lambda: sign * rng.uniform(*QUANTITY_RANGE) * tol)

    def clear(dev: float) -> bool:  # not within GUARD of the tolerance or of the agreement
        return abs(abs(dev) - tol) > GUARD and abs(abs(dev) - limit) > GUARD

    return _set_deviation(rng, d, line, tol, lambda: sign * rng.uniform(*QUANTITY_RANGE) * limit, accept=clear)


def quantity_short(rng: random.Random, world: World, d: Delivery) -> bool:
    """Cumulative short by U(0, 3) x tolerance on a line not declared partial."""
    return _quantity(rng, world, d, -1)


def quantity_over(rng: random.Random, world: World, d: Delivery) -> bool:
    """Cumulative over by U(0, 3) x tolerance (x the agreement, for a vendor that has one)."""
    return _quantity(rng, world, d, +1)


def over_ship(rng: random.Random, world: World, d: Delivery) -> bool:
    """The over-shipping vendor: every non-partial line 0.3-0.9 x tolerance over (benign)."""
    lines = _quantity_lines(d)
    for line in lines:
        tol = _spec_tolerance(world, line["material_id"])

        def draw(t: float = tol) -> float:
            return rng.uniform(*OVER_SHIP_RANGE) * t

        _set_deviation(rng, d, line, tol, draw, within=True)
    return bool(lines)


def agreed_over_ship(rng: random.Random, world: World, d: Delivery, share: float) -> bool:
    """The agreement vendor: ``share`` of its non-partial lines over by U(2.3, 3.8) %, above
    the line's tolerance and inside the agreement after rounding (lines whose tolerance leaves
    no room, or whose unit rounding does, are not over-shipped). Benign: within the agreement,
    though beyond the tolerance."""
    changed = False
    for line in _quantity_lines(d):
        tol = _spec_tolerance(world, line["material_id"])
        low = max(AGREED_OVER_RANGE[0], tol + GUARD)
        high = min(AGREED_OVER_RANGE[1], d.agreed_over - GUARD)
        if high - low < 0.002 or rng.random() >= share:
            continue

        def draw(lo: float = low, hi: float = high) -> float:
            return rng.uniform(lo, hi)

        def in_band(dev: float, lo: float = low, hi: float = high) -> bool:
            return lo < dev <= hi

        changed |= _set_deviation(rng, d, line, tol, draw, accept=in_band)
    return changed


def unit_mismatch(rng: random.Random, world: World, d: Delivery) -> bool:
    """Another unit printed with the number the PO unit would have (physically wrong)."""
    lines = [ln for ln in _quantity_lines(d) if convertible(d.po_line(ln)["unit"])]
    if not lines:
        return False
    line = rng.choice(lines)
    pl = d.po_line(line)
    in_po_unit = _round(line["quantity"] * factor(line["unit"], pl["unit"]), pl["unit"])
    line["unit"] = ALTERNATE_UNIT[pl["unit"]]
    line["quantity"] = in_po_unit
    line["unit_price"] = None  # a price per the wrong unit would add a second symptom
    d.facts.add("UNIT_MISMATCH")
    return True


def silent_unit_label(rng: random.Random, world: World, d: Delivery) -> bool:
    """A lb/kg slip under the PO's label: KG line x 2.2046, LB line x 0.4536 (with noise)."""
    lines = [ln for ln in d.lines() if d.po_line(ln)["unit"] in ("KG", "LB") and d.po_line(ln)["quantity"] > 0
             and ln["material_id"] == d.po_line(ln)["material_id"]]
    if not lines:
        return False
    line = rng.choice(lines)
    pl = d.po_line(line)
    meant = line["quantity"] * factor(line["unit"], pl["unit"])
    slip = (LB_PER_KG if pl["unit"] == "KG" else KG_PER_LB) * (1.0 + rng.gauss(0.0, SLIP_NOISE))
    line["unit"] = pl["unit"]
    line["quantity"] = round(meant * slip, 2)
    if line["unit_price"] is not None:
        line["unit_price"] = pl["unit_price"]
    d.facts.add("SILENT_UNIT_LABEL")
    return True


def price_anomaly(rng: random.Random, world: World, d: Delivery) -> bool:
    """Printed price off the PO price by U(0, 30) % either way (in the PO's unit)."""
    lines = [ln for ln in d.lines() if d.po_line(ln)["quantity"] > 0 and d.po_line(ln)["unit_price"] > 0]
    if not lines:
        return False
    line = rng.choice(lines)
    pl = d.po_line(line)
    limit = PRICE_TOLERANCE_PCT / 100.0
    k = factor(line["unit"], pl["unit"])
    for _ in range(_TRIES):
        dev = rng.choice((-1.0, 1.0)) * rng.uniform(*PRICE_RANGE)
        price = round(pl["unit_price"] * (1.0 + dev) * k, 4)
        if price > 0 and abs(abs(price_deviation(price, line["unit"], pl["unit"], pl["unit_price"])) - limit) > GUARD:
            line["unit_price"] = price
            return True
    return False


def _lot(rng: random.Random, d: Delivery, place: bool = False) -> Lot | None:
    """A random published lot (``place``: one whose values may be placed, not a co-moved one)."""
    lots = [lot for lot in d.lots.values() if lot.published and not (place and lot.comoved)]
    return rng.choice(lots) if lots else None


def coa_out_of_spec(rng: random.Random, world: World, d: Delivery) -> bool:
    """One value placed from 6 % of the range inside a limit to 6 % outside it."""
    lot = _lot(rng, d, place=True)
    if lot is None:
        return False
    prop = rng.choice(lot.material.properties)
    sides = []
    if prop.min - OOS_RANGE[1] * prop.span >= 0.0:
        sides.append(-1)
    if not (prop.unit == "%" and prop.max + OOS_RANGE[1] * prop.span > 100.0):
        sides.append(+1)
    sign = rng.choice(sides)
    limit = prop.max if sign > 0 else prop.min
    profile = lot.profile(world, d.vendor.vendor_id, prop.name)
    for _ in range(_TRIES):
        value = round(limit + sign * rng.uniform(*OOS_RANGE) * prop.span, 4)
        if value < 0 or abs(value - limit) <= GUARD * prop.span:
            continue
        z = (value - profile.mean) / profile.std
        if abs(abs(z) - SILENT_K) > 1e-3:
            lot.values[prop.name] = value
            lot.shifted_z[prop.name] = z
            return True
    return False


def silent_coa_drift(rng: random.Random, world: World, d: Delivery) -> bool:
    """One value inside spec, U(2, 9) baseline std from the vendor's mean."""
    lot = _lot(rng, d, place=True)
    if lot is None:
        return False
    for _ in range(_TRIES):
        prop = rng.choice(lot.material.properties)
        profile = lot.profile(world, d.vendor.vendor_id, prop.name)
        z = rng.uniform(*SHIFT_Z) * rng.choice((-1.0, 1.0))
        value = round(profile.mean + z * profile.std, 4)
        if not prop.min <= value <= prop.max:
            value = round(profile.mean - z * profile.std, 4)
        realized = (value - profile.mean) / profile.std
        if prop.min <= value <= prop.max and abs(abs(realized) - SILENT_K) > 1e-3:
            lot.values[prop.name] = value
            lot.shifted_z[prop.name] = realized
            return True
    return False


def coa_unit_mismatch(rng: random.Random, world: World, d: Delivery) -> bool:
    """One value printed under a unit that does not convert to the spec's (number unchanged)."""
    lot = _lot(rng, d)
    if lot is None:
        return False
    prop = rng.choice(lot.material.properties)
    lot.units[prop.name] = COA_FOREIGN_UNIT[prop.unit]
    return True


def convert_lot_units(lot: Lot) -> bool:
    """Print the lot's values in the convertible alternative unit (benign). Values within
    1e-6 of the range from a limit stay in the spec unit (a conversion must not cross it)."""
    changed = False
    for prop in lot.material.properties:
        value = lot.values[prop.name]
        if prop.name in lot.units or min(abs(value - prop.min), abs(value - prop.max)) <= 1e-6 * prop.span:
            continue
        lot.units[prop.name] = COA_ALTERNATE_UNIT[prop.unit]
        changed = True
    return changed


def unknown_material(rng: random.Random, world: World, d: Delivery) -> bool:
    """A line's material has no spec and is not on the PO (its CoA is not sent either)."""
    line = rng.choice(d.lines())
    d.lots.pop(line["vendor_lot"], None)
    line["material_id"] = rng.choice(world.unknown_material_ids)
    d.facts.add("UNKNOWN_MATERIAL")
    return True


def missing_coa(rng: random.Random, world: World, d: Delivery) -> bool:
    lot = _lot(rng, d)
    if lot is None:
        return False
    lot.published = False
    d.facts.add("MISSING_COA")
    return True


def unknown_po(rng: random.Random, world: World, d: Delivery) -> bool:
    d.publish_po = False
    d.facts.add("UNKNOWN_PO")
    return True


INJECTORS: dict[str, Injector] = {
    "unit_mismatch": unit_mismatch,
    "quantity_short": quantity_short,
    "quantity_over": quantity_over,
    "coa_out_of_spec": coa_out_of_spec,
    "silent_unit_label": silent_unit_label,
    "silent_coa_drift": silent_coa_drift,
    "coa_unit_mismatch": coa_unit_mismatch,
    "unknown_po": unknown_po,
    "unknown_material": unknown_material,
    "missing_coa": missing_coa,
    "price_anomaly": price_anomaly,
}
