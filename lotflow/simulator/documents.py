"""Clean documents of one delivery: the PO, the receipt (packing list) and its CoAs.

A ``Draft`` holds them as plain dicts in the shape of their Avro schemas, minus the
timestamps, which the scheduler stamps when it places each record in the stream. Fault
injection (``inject``) then mutates a draft.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from lotflow.simulator.units import LB_PER_KG
from lotflow.simulator.world import CLEAN_MAX_Z, Material, PropertySpec, Supply, Vendor, World

__all__ = ["Draft", "Ids", "build_draft", "coas_for", "new_receipt", "receipt_line", "round_quantity", "sample_value"]

Record = dict[str, Any]

LB_PO_SHARE = 0.2  # POs that order KG materials in LB
PRICE_PRINTED_SHARE = 0.8  # packing-list lines that print a unit price
EXACT_QUANTITY_SHARE = 0.75  # clean lines that deliver exactly the ordered quantity
DOCKS = ("DOCK-1", "DOCK-2", "DOCK-3", "DOCK-4")


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


@dataclass
class Draft:
    """One delivery against one PO, before faults and timestamps."""

    vendor: Vendor
    po: Record  # lotflow.erp.PurchaseOrder without order_date/event_time
    receipt: Record  # lotflow.plant.Receipt without received_at/event_time
    coas: list[Record] = field(default_factory=list)  # one per requires_coa line, in line order
    publish_po: bool = True

    @property
    def po_number(self) -> str:
        return str(self.po["po_number"])

    def po_line(self, line_no: int) -> Record:
        for line in self.po["lines"]:
            if line["line_no"] == line_no:
                return dict(line)
        raise KeyError(line_no)


def round_quantity(quantity: float, unit: str) -> float:
    return float(round(quantity)) if unit == "EA" else round(quantity, 2)


def sample_value(rng: random.Random, prop: PropertySpec, supply: Supply) -> float:
    """A clean CoA value: N(mean, std) of the vendor's profile, inside spec and within 4 std."""
    profile = supply.profile(prop.name)
    for _ in range(100):
        value = round(rng.gauss(profile.mean, profile.std), 4)
        if prop.min <= value <= prop.max and abs(value - profile.mean) <= CLEAN_MAX_Z * profile.std:
            return value
    return round(min(max(profile.mean, prop.min), prop.max), 4)


def _coa(rng: random.Random, ids: Ids, vendor: Vendor, po_number: str, line: Record,
         material: Material, supply: Supply) -> Record:
    return {
        "coa_id": ids.next_coa(),
        "po_number": po_number,
        "vendor_id": vendor.vendor_id,
        "vendor_lot": line["vendor_lot"],
        "material_id": material.material_id,
        "issued_at": 0,
        "values": [
            {"property": prop.name, "value": sample_value(rng, prop, supply), "unit": prop.unit}
            for prop in material.properties
        ],
        "event_time": 0,
    }


def clean_quantity(rng: random.Random, ordered: float, unit: str, material: Material) -> float:
    if rng.random() < EXACT_QUANTITY_SHARE:
        return ordered
    spread = min(0.5 * material.quantity_tolerance_pct, 1.0) / 100.0
    quantity = round_quantity(ordered * (1.0 + rng.uniform(-spread, spread)), unit)
    return quantity if abs(quantity / ordered - 1.0) <= spread else ordered  # EA rounding


def receipt_line(rng: random.Random, ids: Ids, vendor: Vendor, po_line: Record,
                 material: Material, quantity: float | None = None) -> Record:
    """A clean packing-list line delivering ``po_line`` (or ``quantity`` of it)."""
    unit = str(po_line["unit"])
    return {
        "po_line": po_line["line_no"],
        "material_id": po_line["material_id"],
        "quantity": clean_quantity(rng, po_line["quantity"], unit, material) if quantity is None else quantity,
        "unit": unit,
        "vendor_lot": ids.next_lot(vendor),
        "unit_price": po_line["unit_price"] if rng.random() < PRICE_PRINTED_SHARE else None,
        "partial": False,
    }


def coas_for(rng: random.Random, ids: Ids, world: World, vendor: Vendor, po_number: str,
             lines: list[Record]) -> list[Record]:
    """One clean CoA per line whose material requires one."""
    coas: list[Record] = []
    for line in lines:
        material = world.materials.get(line["material_id"])
        if material is not None and material.requires_coa:
            supply = world.supply(vendor.vendor_id, material.material_id)
            coas.append(_coa(rng, ids, vendor, po_number, line, material, supply))
    return coas


def _po_lines(rng: random.Random, world: World, vendor: Vendor, first: str | None,
              force_kg: bool) -> list[Record]:
    count = rng.randint(1, min(3, len(vendor.materials)))
    chosen = rng.sample(vendor.materials, count)
    if first is not None:
        chosen = [first, *[m for m in chosen if m != first]][:count]
    in_lb = not force_kg and rng.random() < LB_PO_SHARE
    lines: list[Record] = []
    for line_no, material_id in enumerate(chosen, start=1):
        material = world.materials[material_id]
        supply = world.supply(vendor.vendor_id, material_id)
        unit = "LB" if in_lb and material.base_unit == "KG" else material.base_unit
        price = supply.unit_price * rng.uniform(0.97, 1.03)
        if unit == "LB":
            price /= LB_PER_KG
        step = 10 if unit == "EA" else 5
        lines.append({
            "line_no": line_no,
            "material_id": material_id,
            "quantity": float(rng.randrange(50, 5001, step)),
            "unit": unit,
            "unit_price": round(price, 4),
        })
    return lines


def build_draft(rng: random.Random, ids: Ids, world: World, vendor: Vendor, *,
                first: str | None = None, force_kg: bool = False) -> Draft:
    """A clean delivery of a fresh PO of ``vendor``.

    ``first``: a material that must be on the PO (as line 1); ``force_kg``: no PO in LB.
    """
    po_number = ids.next_po()
    po_lines = _po_lines(rng, world, vendor, first, force_kg)
    po = {
        "po_number": po_number,
        "revision": 0,
        "vendor_id": vendor.vendor_id,
        "vendor_name": vendor.name,
        "currency": "USD",
        "order_date": 0,
        "lines": po_lines,
        "event_time": 0,
    }
    lines = [receipt_line(rng, ids, vendor, pl, world.materials[pl["material_id"]]) for pl in po_lines]
    receipt = new_receipt(rng, ids, vendor, po_number, lines)
    return Draft(vendor, po, receipt, coas_for(rng, ids, world, vendor, po_number, lines))


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
