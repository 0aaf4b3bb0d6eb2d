"""Clean documents: POs (and their revisions), receipt (packing-list) lines, CoAs.

Records are plain dicts in the shape of their Avro schemas; timestamps are stamped by the
scheduler when it places each record in the stream. Perturbations (``inject``) then change
them.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Any

from lotflow.simulator.units import ALTERNATE_UNIT, LB_PER_KG, factor
from lotflow.simulator.world import T_DOF, Material, PropertySpec, Vendor, World

__all__ = [
    "Ids",
    "clean_quantity",
    "coa_record",
    "new_po",
    "new_receipt",
    "render_line",
    "revise",
    "round_quantity",
    "sample_value",
    "student_t",
]

Record = dict[str, Any]

LB_PO_SHARE = 0.2  # POs that order KG materials in LB
PRICE_PRINTED_SHARE = 0.8  # packing-list lines that print a unit price
EXACT_QUANTITY_SHARE = 0.75  # clean lines that deliver exactly the ordered quantity
DOCKS = ("DOCK-1", "DOCK-2", "DOCK-3", "DOCK-4")
_T_SCALE = math.sqrt((T_DOF - 2) / T_DOF)  # Student-t scaled to unit variance


@dataclass
class Ids:
    """Unique, seed-scoped document ids."""

    seed: int
    po: int = 0
    receipt: int = 0
    coa: int = 0
    lot: int = 0
    malformed: int = 0

    def next_po(self) -> str:
        self.po += 1
        return f"PO-{self.seed}-{self.po:07d}"

    def next_receipt(self) -> str:
        self.receipt += 1
        return f"RCV-{self.seed}-{self.receipt:07d}"

    def next_coa(self) -> str:
        self.coa += 1
        return f"COA-{self.seed}-{self.coa:07d}"

    def next_lot(self, vendor: Vendor) -> str:
        self.lot += 1
        return f"{vendor.lot_prefix}-{self.seed}-{self.lot:07d}"

    def next_malformed(self) -> str:
        self.malformed += 1
        return f"MALFORMED-{self.seed}-{self.malformed:06d}"


def round_quantity(quantity: float, unit: str) -> float:
    return float(round(quantity)) if unit == "EA" else round(quantity, 2)


def student_t(rng: random.Random) -> float:
    """A Student-t draw with ``T_DOF`` degrees of freedom scaled to unit variance."""
    chi2 = rng.gammavariate(T_DOF / 2.0, 2.0)
    return rng.gauss(0.0, 1.0) / math.sqrt(chi2 / T_DOF) * _T_SCALE


def sample_value(rng: random.Random, prop: PropertySpec, mean: float, std: float) -> float:
    """A lot value: ``mean + std * t`` (heavy-tailed), redrawn until inside the spec.

    Clean lots are in spec by definition; only perturbations put a value outside.
    """
    for _ in range(200):
        value = round(mean + std * student_t(rng), 4)
        if prop.min <= value <= prop.max:
            return value
    return round(min(max(mean, prop.min), prop.max), 4)


def clean_quantity(rng: random.Random, ordered: float, unit: str, tolerance_pct: float) -> float:
    """What a clean delivery of ``ordered`` weighs: exact, or within half the tolerance (max 1 %)."""
    if rng.random() < EXACT_QUANTITY_SHARE:
        return ordered
    spread = min(0.5 * tolerance_pct, 1.0) / 100.0
    quantity = round_quantity(ordered * (1.0 + rng.uniform(-spread, spread)), unit)
    return quantity if abs(quantity / ordered - 1.0) <= spread else ordered  # EA rounding


def render_line(rng: random.Random, ids: Ids, vendor: Vendor, po_line: Record, quantity: float,
                unit: str | None = None, *, price: bool | None = None) -> Record:
    """A packing-list line delivering ``quantity`` (in the PO line's unit) of ``po_line``,
    printed in ``unit`` (default the PO's) with the quantity and price converted."""
    po_unit = str(po_line["unit"])
    unit = unit or po_unit
    k = factor(po_unit, unit) if unit != po_unit else 1.0
    printed = rng.random() < PRICE_PRINTED_SHARE if price is None else price
    return {
        "po_line": po_line["line_no"],
        "material_id": po_line["material_id"],
        "quantity": round_quantity(quantity * k, unit),
        "unit": unit,
        "vendor_lot": ids.next_lot(vendor),
        "unit_price": round(po_line["unit_price"] / k, 4) if printed else None,
        "partial": False,
    }


def coa_record(ids: Ids, vendor: Vendor, po_number: str, vendor_lot: str, material_id: str,
               values: list[Record]) -> Record:
    return {
        "coa_id": ids.next_coa(),
        "po_number": po_number,
        "vendor_id": vendor.vendor_id,
        "vendor_lot": vendor_lot,
        "material_id": material_id,
        "issued_at": 0,
        "values": values,
        "event_time": 0,
    }


def _po_line(rng: random.Random, world: World, vendor: Vendor, line_no: int, material_id: str,
             in_lb: bool, bulk: bool) -> Record:
    material: Material = world.materials[material_id]
    supply = world.supply(vendor.vendor_id, material_id)
    unit = "LB" if in_lb and material.base_unit == "KG" else material.base_unit
    price = supply.unit_price * rng.uniform(0.97, 1.03)
    if unit == "LB":
        price /= LB_PER_KG
    step = 10 if unit == "EA" else 5
    quantity = float(rng.randrange(50, 5001, step))
    if bulk:
        quantity = float(rng.randrange(20_000, 400_001, 100))
    return {"line_no": line_no, "material_id": material_id, "quantity": quantity, "unit": unit,
            "unit_price": round(price, 4)}


def new_po(rng: random.Random, ids: Ids, world: World, vendor: Vendor, *, first: str | None = None,
           min_lines: int = 1, max_lines: int = 3, in_lb: bool | None = None, bulk: bool = False) -> Record:
    """A fresh revision-0 PO of ``vendor``: ``first`` (a material) is line 1 when given;
    ``bulk``: quantities of a blanket order."""
    count = rng.randint(min(min_lines, len(vendor.materials)), min(max_lines, len(vendor.materials)))
    chosen = rng.sample(vendor.materials, count)
    if first is not None:
        chosen = [first, *[m for m in chosen if m != first]][:count]
    lb = rng.random() < LB_PO_SHARE if in_lb is None else in_lb
    lines = [_po_line(rng, world, vendor, n, m, lb, bulk) for n, m in enumerate(chosen, start=1)]
    return {
        "po_number": ids.next_po(),
        "revision": 0,
        "vendor_id": vendor.vendor_id,
        "vendor_name": vendor.name,
        "currency": "USD",
        "order_date": 0,
        "lines": lines,
        "event_time": 0,
    }


def revise(po: Record, line_no: int, *, quantity: float | None = None, unit: str | None = None) -> Record:
    """The next revision of ``po`` with line ``line_no``'s quantity and/or unit changed
    (a unit change converts the quantity, unless given, and the price exactly)."""
    new = copy.deepcopy(po)
    new["revision"] = po["revision"] + 1
    line = next(pl for pl in new["lines"] if pl["line_no"] == line_no)
    if unit is not None and unit != line["unit"]:
        k = factor(line["unit"], unit)
        line["quantity"] = round_quantity(line["quantity"] * k, unit)
        line["unit_price"] = round(line["unit_price"] / k, 4)
        line["unit"] = unit
    if quantity is not None:
        line["quantity"] = quantity
    return new


def alternate_unit(unit: str) -> str | None:
    return ALTERNATE_UNIT.get(unit)


def new_receipt(rng: random.Random, ids: Ids, vendor: Vendor, po_number: str,
                lines: list[Record]) -> Record:
    return {
        "receipt_id": ids.next_receipt(),
        "po_number": po_number,
        "vendor_id": vendor.vendor_id,
        "dock": rng.choice(DOCKS),
        "received_at": 0,
        "lines": lines,
        "event_time": 0,
    }
