"""The two unit conversions the simulator plays with: mass (KG/LB) and volume (L/GAL)."""

from __future__ import annotations

__all__ = ["ALTERNATE_UNIT", "LB_PER_KG", "L_PER_GAL", "convertible", "factor"]

LB_PER_KG = 2.20462
L_PER_GAL = 3.78541

# The unit a vendor may print instead of the ordered one.
ALTERNATE_UNIT: dict[str, str] = {"KG": "LB", "LB": "KG", "L": "GAL", "GAL": "L"}

_TO_BASE: dict[str, tuple[str, float]] = {  # unit -> (dimension base, base units per unit)
    "KG": ("KG", 1.0),
    "LB": ("KG", 1.0 / LB_PER_KG),
    "L": ("L", 1.0),
    "GAL": ("L", L_PER_GAL),
}


def convertible(unit: str) -> bool:
    return unit in _TO_BASE


def factor(src: str, dst: str) -> float:
    """How many ``dst`` units one ``src`` unit is (``factor("KG", "LB") == 2.20462``)."""
    src_base, src_k = _TO_BASE[src]
    dst_base, dst_k = _TO_BASE[dst]
    if src_base != dst_base:
        raise ValueError(f"cannot convert {src} to {dst}")
    return src_k / dst_k
