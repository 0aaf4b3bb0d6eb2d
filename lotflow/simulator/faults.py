"""The fault catalogue and the fault mix a simulation run injects.

A fault mix gives, per catalogue entry, a rate in 0..1:

* faults (rule-visible, malformed, silent) and the benign ``partial_delivery`` /
  ``converted_unit``: the fraction of receipt-topic records that carry it;
* ``near_limit``: the fraction of vendor-material pairs (with a certificate of analysis)
  whose characteristic values sit close to a spec limit; their receipts are benign.

A receipt carries at most one fault. ``parse_fault_spec`` reads the ``--faults`` option.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "BENIGN",
    "CATALOGUE",
    "FAULTS",
    "FaultInfo",
    "FaultKind",
    "FaultMix",
    "fault_info",
    "parse_fault_spec",
]


class FaultKind(StrEnum):
    RULE = "rule"  # a single rule can see it
    MALFORMED = "malformed"  # bad bytes or impossible values: dead-letter material
    SILENT = "silent"  # no single rule sees it; the vendor's history does
    BENIGN = "benign"  # looks unusual, is fine: must not become an exception


@dataclass(frozen=True)
class FaultInfo:
    name: str
    kind: FaultKind
    default_rate: float
    description: str

    @property
    def code(self) -> str:
        """The ground-truth code (``fault`` or ``benign`` field)."""
        return self.name.upper()

    @property
    def is_fault(self) -> bool:
        return self.kind is not FaultKind.BENIGN


CATALOGUE: tuple[FaultInfo, ...] = (
    FaultInfo("unit_mismatch", FaultKind.RULE, 0.006,
              "receipt unit differs from the PO unit (KG<->LB, L<->GAL), quantity not converted"),
    FaultInfo("quantity_short", FaultKind.RULE, 0.006, "received 10-40% less than the PO line"),
    FaultInfo("quantity_over", FaultKind.RULE, 0.006, "received 10-40% more than the PO line"),
    FaultInfo("coa_out_of_spec", FaultKind.RULE, 0.006,
              "a CoA value outside the spec range by 2-20% of the range"),
    FaultInfo("unknown_po", FaultKind.RULE, 0.006, "receipt against a PO that is never published"),
    FaultInfo("unknown_material", FaultKind.RULE, 0.006,
              "a receipt line's material has no spec and is not on the PO line"),
    FaultInfo("missing_coa", FaultKind.RULE, 0.006, "a line that requires a CoA never gets one"),
    FaultInfo("duplicate_receipt", FaultKind.RULE, 0.006,
              "an earlier delivery booked again under a new receipt id"),
    FaultInfo("price_anomaly", FaultKind.RULE, 0.006,
              "packing-list price 40-150% above or 40-70% below the PO price"),
    FaultInfo("malformed_bytes", FaultKind.MALFORMED, 0.003,
              "random bytes, empty value or JSON text on the receipts topic"),
    FaultInfo("malformed_missing_fields", FaultKind.MALFORMED, 0.003,
              "valid Confluent header, truncated Avro body"),
    FaultInfo("malformed_impossible_value", FaultKind.MALFORMED, 0.003,
              "schema-valid receipt with an impossible value"),
    FaultInfo("silent_unit_label", FaultKind.SILENT, 0.008,
              "PO quantity shipped in LB but labelled KG (quantity x 2.20462)"),
    FaultInfo("silent_coa_drift", FaultKind.SILENT, 0.008,
              "a CoA value inside spec but >= 6 std away from the vendor's usual value"),
    FaultInfo("partial_delivery", FaultKind.BENIGN, 0.04,
              "a PO line delivered in two receipts marked partial"),
    FaultInfo("near_limit", FaultKind.BENIGN, 0.15,
              "fraction of vendor-material pairs whose values sit near a spec limit"),
    FaultInfo("converted_unit", FaultKind.BENIGN, 0.03,
              "receipt in the other unit, quantity correctly converted"),
)

_BY_NAME: dict[str, FaultInfo] = {info.name: info for info in CATALOGUE}
FAULTS: tuple[str, ...] = tuple(info.name for info in CATALOGUE if info.is_fault)
BENIGN: tuple[str, ...] = tuple(info.name for info in CATALOGUE if not info.is_fault)


def fault_info(name: str) -> FaultInfo:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown fault {name!r}; valid names: {', '.join(_BY_NAME)}") from None


@dataclass(frozen=True)
class FaultMix:
    """A rate for every catalogue entry (missing entries are 0)."""

    rates: Mapping[str, float]

    def __post_init__(self) -> None:
        for name, rate in self.rates.items():
            fault_info(name)
            if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):  # NaN fails too
                raise ValueError(f"rate of {name} must be between 0 and 1, got {rate!r}")
        total = sum(rate for name, rate in self.rates.items() if fault_info(name).is_fault)
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"fault rates sum to {total:g} > 1 (a receipt carries at most one fault)"
            )
        if self.rate("partial_delivery") + self.rate("converted_unit") > 1.0 + 1e-9:
            raise ValueError("partial_delivery + converted_unit rates must not exceed 1")

    def rate(self, name: str) -> float:
        fault_info(name)
        return float(self.rates.get(name, 0.0))

    @property
    def total_fault_rate(self) -> float:
        return sum(self.rate(name) for name in FAULTS)

    @classmethod
    def default(cls) -> FaultMix:
        return cls({info.name: info.default_rate for info in CATALOGUE})

    @classmethod
    def none(cls) -> FaultMix:
        return cls({})

    def describe(self) -> str:
        """The mix as a spec string ``parse_fault_spec`` reads back."""
        parts = [f"{info.name}={self.rate(info.name):g}" for info in CATALOGUE if self.rate(info.name)]
        return ",".join(parts) or "none"


def _parse_rate(name: str, text: str) -> float:
    raw = text.strip()
    scale = 1.0
    if raw.endswith("%"):
        raw, scale = raw[:-1].strip(), 0.01
    try:
        rate = float(raw) * scale
    except ValueError:
        raise ValueError(f"rate of {name} is not a number: {text!r}") from None
    if math.isnan(rate) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate of {name} must be between 0 and 1 (or 0%..100%), got {text!r}")
    return rate


def parse_fault_spec(spec: str) -> FaultMix:
    """Read a fault mix: ``default``, ``none``, or ``name=rate,...``.

    An optional first item ``default`` or ``none`` sets the base the ``name=rate`` items
    override; without it the base is ``none`` (only the listed faults are injected).
    Rates are fractions (``0.01``) or percentages (``1%``).

    >>> parse_fault_spec("unit_mismatch=0.05").rate("unit_mismatch")
    0.05
    >>> parse_fault_spec("default,missing_coa=0").rate("missing_coa")
    0.0
    """
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise ValueError(
            f"empty fault spec item in {spec!r}; use 'default', 'none' or 'name=rate,name=rate'"
        )
    rates: dict[str, float] = {}
    if items[0].lower() in ("default", "none"):
        base = items.pop(0).lower()
        rates = dict(FaultMix.default().rates) if base == "default" else {}
    seen: set[str] = set()
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep:
            raise ValueError(
                f"fault spec item {item!r} is not name=rate ('default'/'none' may only come first); "
                f"valid names: {', '.join(_BY_NAME)}"
            )
        fault_info(name)
        if name in seen:
            raise ValueError(f"fault {name} given twice in {spec!r}")
        seen.add(name)
        rates[name] = _parse_rate(name, value)
    return FaultMix(rates)
