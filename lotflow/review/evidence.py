"""The detail page's evidence: the receipt's lines against the PO revision, spec limits and CoA
values side by side, each cell marked when a reason of the exception points at it.

The records are the decision's own inputs (read back from Kafka by their input refs) and the
material specs in force; which cells mismatch comes from the reasons' evidence, so the page
highlights exactly what the checks found, not a second opinion.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Cell", "LineView", "PropertyView", "side_by_side"]

Record = Mapping[str, Any]

# reason code -> the receipt-line cells it points at
_LINE_CELLS: dict[str, tuple[str, ...]] = {
    "QUANTITY_OVER": ("quantity",), "QUANTITY_SHORT": ("quantity",), "PO_LINE_CANCELLED": ("quantity",),
    "PO_REVISED_BELOW_RECEIVED": ("quantity",), "PROBABLE_UNIT_MISLABEL": ("quantity", "unit"),
    "UNIT_MISMATCH": ("quantity", "unit"), "UNIT_INCOMPATIBLE": ("unit",),
    "MATERIAL_MISMATCH": ("material",), "UNKNOWN_MATERIAL": ("material",), "PRICE_ANOMALY": ("price",),
    "UNKNOWN_PO_LINE": ("po_line",), "DUPLICATE_RECEIPT": ("lot",), "MISSING_COA": ("lot",),
}
_PROPERTY_CODES = ("COA_OUT_OF_SPEC", "COA_INCOMPLETE", "COA_ATYPICAL", "COA_UNIT_MISMATCH")


@dataclass(frozen=True, slots=True)
class Cell:
    received: str
    ordered: str = ""
    mismatch: bool = False


@dataclass(frozen=True, slots=True)
class PropertyView:
    name: str
    low: str
    high: str
    unit: str
    value: str  # as certified ("" if the CoA does not give it)
    mismatch: bool
    note: str = ""  # the reason's message about it


@dataclass(slots=True)
class LineView:
    po_line: Cell
    material: Cell
    quantity: Cell
    unit: Cell
    price: Cell
    lot: Cell
    properties: list[PropertyView] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # codes that point at this line


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _points_at(reason: Record, line: Record) -> bool:
    evidence = reason.get("evidence") or {}
    if not evidence:
        return True  # a reason without evidence concerns the whole receipt
    if "vendor_lot" in evidence:
        return bool(evidence["vendor_lot"] == line["vendor_lot"])
    if "po_line" in evidence:
        return bool(evidence["po_line"] == str(line["po_line"]))
    return True


def side_by_side(receipt: Record, po: Record | None, coas: Iterable[Record], specs: Mapping[str, Record],
                 reasons: Sequence[Record]) -> list[LineView]:
    """One view per receipt line; ``coas`` are the certificates that went into the decision."""
    po_lines = {ln["line_no"]: ln for ln in (po or {}).get("lines", ())}
    certified: dict[str, dict[str, tuple[Any, str]]] = {}
    for coa in coas:
        values = certified.setdefault(coa["vendor_lot"], {})
        for v in coa.get("values", ()):
            values[v["property"]] = (v["value"], v.get("unit", ""))
    views = []
    for line in receipt.get("lines", ()):
        ordered = po_lines.get(line["po_line"])
        mine = [r for r in reasons if r.get("severity") != "INFO" and _points_at(r, line)]
        marked = {cell for r in mine for cell in _LINE_CELLS.get(r["code"], ())}
        view = LineView(
            po_line=Cell(_fmt(line["po_line"]), _fmt(ordered["line_no"]) if ordered else "(none)",
                         "po_line" in marked),
            material=Cell(line["material_id"], ordered["material_id"] if ordered else "", "material" in marked),
            quantity=Cell(_fmt(line["quantity"]), _fmt(ordered["quantity"]) if ordered else "", "quantity" in marked),
            unit=Cell(line["unit"], ordered["unit"] if ordered else "", "unit" in marked),
            price=Cell(_fmt(line.get("unit_price")), _fmt(ordered["unit_price"]) if ordered else "",
                       "price" in marked),
            lot=Cell(line["vendor_lot"], "", "lot" in marked),
            reasons=sorted({r["code"] for r in mine}),
        )
        spec = specs.get(line["material_id"])
        values = certified.get(line["vendor_lot"], {})
        for prop in (spec or {}).get("properties", ()):
            about = [r for r in mine if r["code"] in _PROPERTY_CODES
                     and (r.get("evidence") or {}).get("property") == prop["name"]]
            value, unit = values.get(prop["name"], (None, ""))
            view.properties.append(PropertyView(
                prop["name"], _fmt(prop["min"]), _fmt(prop["max"]), prop.get("unit") or "",
                f"{_fmt(value)} {unit}".strip() if value is not None else "", bool(about),
                "; ".join(r["message"] for r in about)))
        views.append(view)
    return views
