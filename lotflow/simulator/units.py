"""The unit conversions the simulator plays with.

Quantities: mass (KG/LB) and volume (L/GAL), with the exact international definitions
(1 lb = 0.45359237 kg, 1 gal = 3.785411784 L), so a correctly converted quantity converts
back without drift. CoA property units: each spec unit has one convertible alternative a
laboratory may print (``%``/``ppm``, ``cP``/``mPa.s``, ``g/cm3``/``kg/m3``, ``um``/``mm``)
and one *foreign* unit that measures something else (a unit mismatch, never convertible).
"""

from __future__ import annotations

__all__ = [
    "ALTERNATE_UNIT",
    "COA_ALTERNATE_UNIT",
    "COA_FOREIGN_UNIT",
    "KG_PER_LB",
    "LB_PER_KG",
    "L_PER_GAL",
    "coa_convertible",
    "coa_factor",
    "convertible",
    "factor",
]

KG_PER_LB = 0.45359237
LB_PER_KG = 1.0 / KG_PER_LB  # 2.2046226...
L_PER_GAL = 3.785411784

# The unit a vendor may print instead of the ordered one.
ALTERNATE_UNIT: dict[str, str] = {"KG": "LB", "LB": "KG", "L": "GAL", "GAL": "L"}

_TO_BASE: dict[str, tuple[str, float]] = {  # unit -> (dimension base, base units per unit)
    "KG": ("KG", 1.0),
    "LB": ("KG", KG_PER_LB),
    "L": ("L", 1.0),
    "GAL": ("L", L_PER_GAL),
}

# CoA units: unit -> (dimension, spec-unit value of one unit).
_COA_TO_BASE: dict[str, tuple[str, float]] = {
    "%": ("fraction", 1.0),
    "ppm": ("fraction", 1e-4),
    "cP": ("viscosity", 1.0),
    "mPa.s": ("viscosity", 1.0),
    "g/cm3": ("density", 1.0),
    "kg/m3": ("density", 1e-3),
    "um": ("length", 1.0),
    "mm": ("length", 1e3),
}
COA_ALTERNATE_UNIT: dict[str, str] = {"%": "ppm", "cP": "mPa.s", "g/cm3": "kg/m3", "um": "mm"}
COA_FOREIGN_UNIT: dict[str, str] = {"%": "cP", "cP": "%", "g/cm3": "um", "um": "g/cm3"}


def convertible(unit: str) -> bool:
    return unit in _TO_BASE


def factor(src: str, dst: str) -> float:
    """How many ``dst`` units one ``src`` unit is (``factor("KG", "LB") == 2.2046...``)."""
    if src == dst:
        return 1.0
    src_base, src_k = _TO_BASE[src]
    dst_base, dst_k = _TO_BASE[dst]
    if src_base != dst_base:
        raise ValueError(f"cannot convert {src} to {dst}")
    return src_k / dst_k


def coa_convertible(src: str, dst: str) -> bool:
    a, b = _COA_TO_BASE.get(src), _COA_TO_BASE.get(dst)
    return a is not None and b is not None and a[0] == b[0]


def coa_factor(src: str, dst: str) -> float:
    """How many ``dst`` one ``src`` is for CoA units (``coa_factor("%", "ppm") == 10000``)."""
    if src == dst:
        return 1.0
    if not coa_convertible(src, dst):
        raise ValueError(f"cannot convert {src} to {dst}")
    return _COA_TO_BASE[src][1] / _COA_TO_BASE[dst][1]
