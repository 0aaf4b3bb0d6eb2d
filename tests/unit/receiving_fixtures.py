"""Builders for receiving records shared by the unit tests."""

from __future__ import annotations

import time
from typing import Any

NOW_MS = int(time.time() * 1000)

SPECS: dict[str, dict[str, Any]] = {
    "MAT-1": {"material_id": "MAT-1", "revision": 0, "base_unit": "KG", "quantity_tolerance_pct": 2.0,
              "requires_coa": True, "properties": [{"name": "purity", "unit": "%", "min": 98.0, "max": 100.0}]},
    "MAT-2": {"material_id": "MAT-2", "revision": 0, "base_unit": "EA", "quantity_tolerance_pct": 0.0,
              "requires_coa": False, "properties": []},
}


def po(number: str = "PO-1", quantity: float = 1000.0, unit: str = "KG", material: str = "MAT-1",
       price: float = 2.0, vendor: str = "V-1") -> dict[str, Any]:
    return {"po_number": number, "revision": 0, "vendor_id": vendor, "vendor_name": "", "currency": "USD",
            "order_date": NOW_MS, "event_time": NOW_MS,
            "lines": [{"line_no": 1, "material_id": material, "quantity": quantity, "unit": unit,
                       "unit_price": price}]}


def receipt(rid: str = "R-1", number: str = "PO-1", quantity: float = 1000.0, unit: str = "KG",
            material: str = "MAT-1", lot: str = "L-1", price: float | None = None, partial: bool = False,
            vendor: str = "V-1") -> dict[str, Any]:
    return {"receipt_id": rid, "po_number": number, "vendor_id": vendor, "dock": "", "received_at": NOW_MS,
            "event_time": NOW_MS,
            "lines": [{"po_line": 1, "material_id": material, "quantity": quantity, "unit": unit,
                       "vendor_lot": lot, "unit_price": price, "partial": partial}]}


def coa(number: str = "PO-1", lot: str = "L-1", purity: float = 99.0) -> dict[str, Any]:
    return {"coa_id": f"C-{lot}", "po_number": number, "vendor_id": "V-1", "vendor_lot": lot,
            "material_id": "MAT-1", "issued_at": NOW_MS, "event_time": NOW_MS,
            "values": [{"property": "purity", "value": purity, "unit": "%"}]}
