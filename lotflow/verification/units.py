"""Unit conversion for units of measure, backed by pint.

pint is slow per call (tens of µs), so factors are computed once per unit pair and cached:
the hot path multiplies by a float.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pint

__all__ = ["PROPERTY_UNITS", "UNIT_NAMES", "IncompatibleUnits", "conversion_factor", "convert", "property_factor"]

# Avro UnitOfMeasure symbols -> pint unit names ("EA" is a count, not a physical unit).
UNIT_NAMES: dict[str, str] = {
    "KG": "kilogram",
    "G": "gram",
    "LB": "pound",
    "OZ": "ounce",
    "T": "metric_ton",
    "L": "liter",
    "ML": "milliliter",
    "GAL": "gallon",
    "M": "meter",
    "FT": "foot",
    "EA": "count",
}

# Units of certificate-of-analysis properties as laboratories write them -> pint expressions.
PROPERTY_UNITS: dict[str, str] = {
    "%": "percent",
    "ppm": "ppm",
    "cP": "centipoise",
    "mPa.s": "millipascal * second",
    "mPa*s": "millipascal * second",
    "g/cm3": "gram / centimeter ** 3",
    "g/mL": "gram / milliliter",
    "kg/m3": "kilogram / meter ** 3",
    "um": "micrometer",
    "mm": "millimeter",
}

_REGISTRY: Any = pint.UnitRegistry()


class IncompatibleUnits(ValueError):
    """The two units measure different things (mass vs volume, count vs mass)."""


def _factor(table: dict[str, str], kind: str, from_unit: str, to_unit: str) -> float:
    if from_unit == to_unit:
        return 1.0
    try:
        src, dst = table[from_unit], table[to_unit]
    except KeyError as exc:
        raise IncompatibleUnits(f"unknown {kind} {exc.args[0]!r}") from None
    try:
        return round(float(_REGISTRY.Quantity(1.0, src).to(dst).magnitude), 12)
    except pint.DimensionalityError:
        raise IncompatibleUnits(f"cannot convert {from_unit} to {to_unit}") from None


@cache
def conversion_factor(from_unit: str, to_unit: str) -> float:
    """How many ``to_unit`` one ``from_unit`` is.

    >>> round(conversion_factor("LB", "KG"), 6)
    0.453592
    >>> conversion_factor("KG", "KG")
    1.0
    """
    return _factor(UNIT_NAMES, "unit", from_unit, to_unit)


def convert(quantity: float, from_unit: str, to_unit: str) -> float:
    return quantity * conversion_factor(from_unit, to_unit)


@cache
def property_factor(from_unit: str, to_unit: str) -> float:
    """How many ``to_unit`` one ``from_unit`` of a CoA property is (same spelling: 1).

    >>> property_factor("%", "ppm")
    10000.0
    >>> property_factor("cP", "mPa.s")
    1.0
    """
    return _factor(PROPERTY_UNITS, "property unit", from_unit, to_unit)
