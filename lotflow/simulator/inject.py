"""Fault and benign-anomaly injection into a clean delivery draft.

Each injector mutates one ``Draft`` in place and returns whether it could apply (the
scheduler shapes the PO so that it can: see ``NEEDS``). The semantics here are the
contract the pipeline's checks are written to.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from lotflow.simulator.documents import Draft, round_quantity
from lotflow.simulator.units import ALTERNATE_UNIT, LB_PER_KG, convertible, factor
from lotflow.simulator.world import Material, PropertyProfile, PropertySpec, Supply, World

__all__ = ["DRIFT_MIN_Z", "INJECTORS", "NEEDS", "Need", "drift_candidates", "inject_drift"]

Record = dict[str, Any]
Injector = Callable[[random.Random, World, Draft], bool]

DRIFT_MIN_Z = 6.0
_DRIFT_Z = (6.2, 9.0)  # drawn z of a drifted value (margin over DRIFT_MIN_Z for rounding)

# What the PO must contain for a fault to apply: a line whose material/unit is of this kind.
Need = str  # "convertible" (KG/LB/L line), "kg" (a line ordered in KG), "coa" (requires_coa)


def _first_line(draft: Draft, pred: Callable[[Record, Record], bool]) -> Record | None:
    for line in draft.receipt["lines"]:
        if pred(line, draft.po_line(line["po_line"])):
            return line
    return None


def _random_line(rng: random.Random, draft: Draft) -> Record:
    lines: list[Record] = draft.receipt["lines"]
    return lines[rng.randrange(len(lines))]


def unit_mismatch(rng: random.Random, world: World, draft: Draft) -> bool:
    """Other unit, the PO quantity's number unconverted (physically the wrong amount)."""
    line = _first_line(draft, lambda _line, po: convertible(po["unit"]))
    if line is None:
        return False
    po = draft.po_line(line["po_line"])
    line["unit"] = ALTERNATE_UNIT[po["unit"]]
    line["quantity"] = po["quantity"]
    line["unit_price"] = None  # a price per the wrong unit would add a second symptom
    return True


def converted_unit(rng: random.Random, world: World, draft: Draft) -> bool:
    """Benign: other unit, quantity (and printed price) correctly converted."""
    line = _first_line(draft, lambda _line, po: convertible(po["unit"]))
    if line is None:
        return False
    po = draft.po_line(line["po_line"])
    unit = ALTERNATE_UNIT[po["unit"]]
    k = factor(po["unit"], unit)
    line["unit"] = unit
    line["quantity"] = round(po["quantity"] * k, 2)
    if line["unit_price"] is not None:
        line["unit_price"] = round(po["unit_price"] / k, 4)
    return True


def _quantity_off(rng: random.Random, draft: Draft, sign: int) -> bool:
    line = _random_line(rng, draft)
    po = draft.po_line(line["po_line"])
    off = po["quantity"] * (1.0 + sign * rng.uniform(0.105, 0.395))
    if po["unit"] == "EA":
        line["quantity"] = float(math.ceil(off) if sign > 0 else math.floor(off))
    else:
        line["quantity"] = round_quantity(off, po["unit"])
    return True


def quantity_short(rng: random.Random, world: World, draft: Draft) -> bool:
    return _quantity_off(rng, draft, -1)


def quantity_over(rng: random.Random, world: World, draft: Draft) -> bool:
    return _quantity_off(rng, draft, +1)


def _out_of_spec_value(rng: random.Random, prop: PropertySpec) -> float:
    delta = prop.span * rng.uniform(0.025, 0.195)
    below_ok = prop.min - delta >= 0.0 or prop.min < 0.0
    above_ok = not (prop.unit == "%" and prop.max + delta > 100.0)
    below = below_ok and (not above_ok or rng.random() < 0.5)
    return round(prop.min - delta if below else prop.max + delta, 4)


def coa_out_of_spec(rng: random.Random, world: World, draft: Draft) -> bool:
    """One CoA value outside [min, max] by 2-20% of the range."""
    if not draft.coas:
        return False
    coa = draft.coas[rng.randrange(len(draft.coas))]
    material = world.materials[coa["material_id"]]
    k = rng.randrange(len(material.properties))
    coa["values"][k]["value"] = _out_of_spec_value(rng, material.properties[k])
    return True


def _drift_sides(prop: PropertySpec, profile: PropertyProfile) -> list[tuple[int, float]]:
    """(direction, largest z that stays inside spec) for each side with room for a drift."""
    sides = []
    for sign, room in ((+1, prop.max - profile.mean), (-1, profile.mean - prop.min)):
        z_max = min((room - 1e-4) / profile.std, _DRIFT_Z[1])
        if z_max >= _DRIFT_Z[0]:
            sides.append((sign, z_max))
    return sides


def drift_candidates(material: Material, supply: Supply) -> list[int]:
    """Indexes of the properties that can drift >= 6 std and stay inside spec."""
    return [
        k for k, prop in enumerate(material.properties)
        if _drift_sides(prop, supply.profile(prop.name))
    ]


def inject_drift(rng: random.Random, world: World, draft: Draft, material_id: str) -> bool:
    """One value of ``material_id``'s CoA inside spec but >= 6 std from the vendor's mean."""
    coa = next((c for c in draft.coas if c["material_id"] == material_id), None)
    if coa is None:
        return False
    material = world.materials[material_id]
    supply = world.supply(draft.vendor.vendor_id, material_id)
    candidates = drift_candidates(material, supply)
    if not candidates:
        return False
    k = rng.choice(candidates)
    prop = material.properties[k]
    profile = supply.profile(prop.name)
    sign, z_max = rng.choice(_drift_sides(prop, profile))
    value = round(profile.mean + sign * rng.uniform(_DRIFT_Z[0], z_max) * profile.std, 4)
    coa["values"][k]["value"] = min(max(value, prop.min), prop.max)
    return True


def silent_unit_label(rng: random.Random, world: World, draft: Draft) -> bool:
    """PO line in KG, the PO quantity shipped in LB but labelled KG."""
    line = _first_line(draft, lambda _line, po: po["unit"] == "KG")
    if line is None:
        return False
    po = draft.po_line(line["po_line"])
    line["unit"] = "KG"
    line["quantity"] = round(po["quantity"] * LB_PER_KG, 2)
    return True


def unknown_po(rng: random.Random, world: World, draft: Draft) -> bool:
    draft.publish_po = False
    return True


def unknown_material(rng: random.Random, world: World, draft: Draft) -> bool:
    """A line's material has no spec and is not on the PO (its CoA is not sent either)."""
    line = _random_line(rng, draft)
    draft.coas = [c for c in draft.coas if c["vendor_lot"] != line["vendor_lot"]]
    line["material_id"] = rng.choice(world.unknown_material_ids)
    return True


def missing_coa(rng: random.Random, world: World, draft: Draft) -> bool:
    if not draft.coas:
        return False
    draft.coas.pop(rng.randrange(len(draft.coas)))
    return True


def price_anomaly(rng: random.Random, world: World, draft: Draft) -> bool:
    line = _random_line(rng, draft)
    price = draft.po_line(line["po_line"])["unit_price"]
    if rng.random() < 0.5:
        line["unit_price"] = round(price * (1.0 + rng.uniform(0.405, 1.495)), 4)
    else:
        line["unit_price"] = round(price * (1.0 - rng.uniform(0.405, 0.695)), 4)
    return True


INJECTORS: dict[str, Injector] = {
    "unit_mismatch": unit_mismatch,
    "converted_unit": converted_unit,
    "quantity_short": quantity_short,
    "quantity_over": quantity_over,
    "coa_out_of_spec": coa_out_of_spec,
    "silent_unit_label": silent_unit_label,
    "unknown_po": unknown_po,
    "unknown_material": unknown_material,
    "missing_coa": missing_coa,
    "price_anomaly": price_anomaly,
}

NEEDS: dict[str, Need] = {
    "unit_mismatch": "convertible",
    "converted_unit": "convertible",
    "silent_unit_label": "kg",
    "coa_out_of_spec": "coa",
    "missing_coa": "coa",
}
