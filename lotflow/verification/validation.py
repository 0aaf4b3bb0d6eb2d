"""Validation and normalisation of the receiving node's input documents.

Every document type is checked the same way before it can change state: what no real dock,
ERP or laboratory could have produced (non-finite or negative numbers, empty keys, a record
key that differs from the record's own PO number, empty or repeated lines, impossible dates)
raises ``InvalidRecord`` and the record goes to the dead letters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

__all__ = [
    "EARLIEST_MS",
    "FUTURE_SLACK_MS",
    "InvalidRecord",
    "normalize_coa",
    "normalize_po",
    "normalize_receipt",
    "validate_spec",
]

Record = dict[str, Any]
EARLIEST_MS = 946_684_800_000  # 2000-01-01
FUTURE_SLACK_MS = 24 * 3600 * 1000


class InvalidRecord(ValueError):
    """A decodable record with impossible values: it goes to the dead-letter topic."""


def _ms(value: datetime | int) -> int:
    return value if isinstance(value, int) else int(value.timestamp() * 1000)


def _date(name: str, value: datetime | int, now_ms: int) -> int:
    ms = _ms(value)
    if ms < EARLIEST_MS or ms > now_ms + FUTURE_SLACK_MS:
        raise InvalidRecord(f"{name} {ms} is outside 2000-01-01 .. now + 1 day")
    return ms


def _text(name: str, value: str) -> str:
    if not value or not value.strip():
        raise InvalidRecord(f"{name} is empty")
    return value


def _number(name: str, value: float, *, positive: bool = False) -> float:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "a positive number" if positive else "a finite number >= 0"
        raise InvalidRecord(f"{name} {value!r} is not {kind}")
    return value


def _key_matches(key: bytes | None, po_number: str) -> None:
    if key is not None and key != po_number.encode():
        shown = key[:80].decode("utf-8", "replace")
        raise InvalidRecord(f"record key {shown!r} differs from its po_number {po_number!r}")


def _unique(name: str, values: Iterable[object]) -> None:
    seen: set[object] = set()
    for v in values:
        if v in seen:
            raise InvalidRecord(f"{name} {v!r} appears twice")
        seen.add(v)


def normalize_receipt(r: Record, key: bytes | None, now_ms: int) -> Record:
    """The fields the node uses, validated. Several lines may name the same PO line (split pallets)."""
    po_number = _text("po_number", r["po_number"])
    _key_matches(key, po_number)
    if not r["lines"]:
        raise InvalidRecord("receipt has no lines")
    lines = []
    for ln in r["lines"]:
        where = f"line {ln['po_line']}"
        price = ln["unit_price"]
        lines.append({
            "po_line": ln["po_line"], "material_id": _text(f"{where}: material_id", ln["material_id"]),
            "quantity": _number(f"{where}: quantity", ln["quantity"], positive=True), "unit": ln["unit"],
            "vendor_lot": _text(f"{where}: vendor_lot", ln["vendor_lot"]),
            "unit_price": None if price is None else _number(f"{where}: unit_price", price),
            "partial": ln["partial"],
        })
    return {
        "receipt_id": _text("receipt_id", r["receipt_id"]), "po_number": po_number,
        "vendor_id": _text("vendor_id", r["vendor_id"]),
        "received_at": _date("received_at", r["received_at"], now_ms),
        "event_time": _date("event_time", r["event_time"], now_ms),
        "lines": lines,
    }


def normalize_po(po: Record, key: bytes | None, now_ms: int) -> Record:
    """A PO revision. A line with quantity 0 is a cancelled line, which is valid."""
    po_number = _text("po_number", po["po_number"])
    _key_matches(key, po_number)
    if not po["lines"]:
        raise InvalidRecord("PO has no lines")
    if po["revision"] < 0:
        raise InvalidRecord(f"revision {po['revision']} is negative")
    _unique("line_no", (ln["line_no"] for ln in po["lines"]))
    _date("order_date", po["order_date"], now_ms)
    return {
        "po_number": po_number, "revision": po["revision"], "vendor_id": _text("vendor_id", po["vendor_id"]),
        "lines": [{"line_no": ln["line_no"], "material_id": _text("material_id", ln["material_id"]),
                   "quantity": _number(f"line {ln['line_no']}: quantity", ln["quantity"]), "unit": ln["unit"],
                   "unit_price": _number(f"line {ln['line_no']}: unit_price", ln["unit_price"])}
                  for ln in po["lines"]],
        "event_time": _date("event_time", po["event_time"], now_ms),
    }


def normalize_coa(coa: Record, key: bytes | None, now_ms: int) -> Record:
    po_number = _text("po_number", coa["po_number"])
    _key_matches(key, po_number)
    if not coa["values"]:
        raise InvalidRecord("certificate has no values")
    _unique("property", (v["property"] for v in coa["values"]))
    values = {}
    for v in coa["values"]:
        value = v["value"]
        if not math.isfinite(value):
            raise InvalidRecord(f"{v['property']}: value {value!r} is not finite")
        values[_text("property", v["property"])] = (value, v["unit"])
    return {
        "coa_id": _text("coa_id", coa["coa_id"]), "po_number": po_number,
        "vendor_lot": _text("vendor_lot", coa["vendor_lot"]),
        "issued_at": _date("issued_at", coa["issued_at"], now_ms), "values": values,
    }


def validate_spec(spec: Record) -> Record:
    """A material spec as the checks use it."""
    material = _text("material_id", spec["material_id"])
    _number("quantity_tolerance_pct", spec["quantity_tolerance_pct"])
    _unique("property", (p["name"] for p in spec["properties"]))
    props = []
    for p in spec["properties"]:
        low, high = p["min"], p["max"]
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise InvalidRecord(f"{material}: property {p['name']} has limits [{low}, {high}]")
        props.append({"name": _text("property name", p["name"]), "unit": p.get("unit", ""), "min": low,
                      "max": high})
    return {"material_id": material, "revision": spec["revision"], "base_unit": spec["base_unit"],
            "quantity_tolerance_pct": spec["quantity_tolerance_pct"], "requires_coa": spec["requires_coa"],
            "properties": props}
