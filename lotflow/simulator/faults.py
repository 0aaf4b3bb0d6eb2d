"""The fault catalogue and the fault mix a simulation run injects.

A fault mix gives, per catalogue entry, a rate in 0..1. Its meaning depends on the kind:

* ``rule`` / ``malformed`` / ``silent``: the fraction of receipt-topic records that get this
  perturbation (at most one per record, only after the history stretch). Several are drawn
  *across* their threshold, so only part of them end up faults: the ground truth is what
  ``judge`` decides by the documented thresholds, not the name of the perturbation;
* ``benign`` (exclusive per record): partial deliveries, blanket-PO releases, converted
  units, cancelled lines, PO revisions, split / reissued / unit-converted CoAs; none of them
  is a fault by the documented thresholds. Two benign entries are not per record:
  ``near_limit`` is the fraction of vendor-material pairs (with a CoA) whose values sit close
  to a spec limit, ``late_documents`` the fraction of POs and CoAs published after their
  receipt (not a ground-truth label);
* ``vendor``: a vendor behaviour (``world.BEHAVIOURS``); the rate is the fraction of that
  vendor's receipts showing it (for ``vendor_agreed_over_ship`` of its lines, for
  ``vendor_coa_comovement`` of its affected lots, for ``vendor_trend_clean`` of its
  receipts that draw a rule-visible perturbation). Behaviours make benign labels or silent
  faults, never a per-record fault of their own, so they are outside the fault budget:
  ``vendor_coa_comovement`` yields the silent fault ``SILENT_COA_COMOVEMENT`` but is a
  ``vendor`` entry, not a ``silent`` one (its rate is a share of one vendor-material's lots).

Presets: ``default`` (the rates the demos and tests run with; the four learning behaviours,
``vendor_agreed_over_ship``, ``vendor_test_method_change``, ``vendor_trend_clean`` and
``vendor_coa_comovement``, are off), ``none`` (nothing), and ``learning``: the default mix
with the learning behaviours on at their ``FaultInfo.learning_rate`` (patterns the
pipeline's rules get wrong in either direction, for the learning run).

Run parameters (``PARAMETERS``, given like rates, ``name=value``): ``coa_comovement_start``,
the progress (0..1) from which the co-movement vendor's lots move together (default 0.5).

``parse_fault_spec`` reads the ``--faults`` option, e.g.
``learning,coa_comovement_start=0.6,vendor_trend_clean=0.3``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "BENIGN",
    "CATALOGUE",
    "EXCLUSIVE_BENIGN",
    "FAULTS",
    "FAULT_CODES",
    "PARAMETERS",
    "PRESETS",
    "SILENT_CODES",
    "VENDOR_BEHAVIOURS",
    "FaultInfo",
    "FaultKind",
    "FaultMix",
    "fault_info",
    "parse_fault_spec",
]


class FaultKind(StrEnum):
    RULE = "rule"  # a single rule can see it (when beyond its threshold)
    MALFORMED = "malformed"  # bad bytes or impossible values: dead-letter material
    SILENT = "silent"  # no single rule sees it; the vendor's history may
    BENIGN = "benign"  # looks unusual, is fine: must not become an exception
    VENDOR = "vendor"  # a vendor behaviour: benign or silent faults, by the thresholds


@dataclass(frozen=True)
class FaultInfo:
    name: str
    kind: FaultKind
    default_rate: float
    description: str
    learning_rate: float | None = None  # rate in the ``learning`` preset, when not default_rate

    @property
    def code(self) -> str:
        """The ground-truth code this entry is reported under when it makes a fault (or is benign)."""
        return self.name.upper()

    @property
    def is_fault(self) -> bool:
        """Counts toward the per-record fault budget (at most one perturbation per record)."""
        return self.kind in (FaultKind.RULE, FaultKind.MALFORMED, FaultKind.SILENT)


CATALOGUE: tuple[FaultInfo, ...] = (
    FaultInfo("unit_mismatch", FaultKind.RULE, 0.005,
              "receipt line in the other unit (KG<->LB, L<->GAL) with the PO quantity's number unconverted"),
    FaultInfo("quantity_short", FaultKind.RULE, 0.009,
              "cumulative quantity on a non-partial line short by U(0, 3) x the tolerance "
              "(0-6 % at 2 %): a fault beyond the tolerance, about 2/3 of them"),
    FaultInfo("quantity_over", FaultKind.RULE, 0.009,
              "cumulative quantity over by U(0, 3) x the tolerance: a fault beyond it, about 2/3"),
    FaultInfo("coa_out_of_spec", FaultKind.RULE, 0.012,
              "one CoA value placed from 6 % of the range inside a limit to 6 % outside it: "
              "COA_OUT_OF_SPEC when outside, SILENT_COA_DRIFT when inside but > K std from the "
              "vendor's baseline"),
    FaultInfo("unknown_po", FaultKind.RULE, 0.005, "receipt against a PO that is never published"),
    FaultInfo("unknown_material", FaultKind.RULE, 0.004,
              "a receipt line's material has no spec and is not on the PO line"),
    FaultInfo("missing_coa", FaultKind.RULE, 0.005, "a line that requires a CoA never gets one"),
    FaultInfo("duplicate_receipt", FaultKind.RULE, 0.005,
              "an earlier delivery booked again under a new receipt id"),
    FaultInfo("price_anomaly", FaultKind.RULE, 0.009,
              "printed price off the PO price by U(0, 30) % either way (converted to the PO unit): "
              "a fault beyond 15 %, about half"),
    FaultInfo("po_line_cancelled", FaultKind.RULE, 0.003,
              "a receipt line against a PO line a revision cancelled (quantity 0)"),
    FaultInfo("coa_unit_mismatch", FaultKind.RULE, 0.003,
              "a CoA value printed in a unit that does not convert to the spec's (e.g. % as cP)"),
    FaultInfo("po_revised_below_received", FaultKind.RULE, 0.0,
              "after a receipt was verified, a PO revision lowers its line below what was received "
              "(a second outcome for that receipt; off by default)"),
    FaultInfo("malformed_bytes", FaultKind.MALFORMED, 0.003,
              "random bytes, empty value or JSON text on the receipts topic"),
    FaultInfo("malformed_missing_fields", FaultKind.MALFORMED, 0.003,
              "valid Confluent header, truncated Avro body"),
    FaultInfo("malformed_impossible_value", FaultKind.MALFORMED, 0.003,
              "schema-valid receipt with an impossible value"),
    FaultInfo("silent_unit_label", FaultKind.SILENT, 0.006,
              "a line labelled in the PO unit holding 2.2046 x (KG PO) or 0.4536 x (LB PO) the "
              "quantity, factor with 0.4 % noise; also on partial releases, where no rule sees it"),
    FaultInfo("silent_coa_drift", FaultKind.SILENT, 0.008,
              "one CoA value inside spec, U(2, 9) baseline std from the vendor's mean: a fault "
              "beyond K = 4 std"),
    FaultInfo("partial_delivery", FaultKind.BENIGN, 0.03,
              "a PO line delivered in 2-3 receipts, all but the last declared partial"),
    FaultInfo("blanket_po", FaultKind.BENIGN, 0.08,
              "releases of a blanket PO: one line ordered in bulk, 10-200 receipts declared partial"),
    FaultInfo("near_limit", FaultKind.BENIGN, 0.15,
              "fraction of vendor-material pairs whose values sit near a spec limit"),
    FaultInfo("converted_unit", FaultKind.BENIGN, 0.02,
              "receipt line in the other unit, quantity and price correctly converted"),
    FaultInfo("cancelled_line", FaultKind.BENIGN, 0.01,
              "a PO revision cancels one line (quantity 0); the receipt delivers the others"),
    FaultInfo("po_revision", FaultKind.BENIGN, 0.03,
              "the receipt is governed by a PO revision (quantity up/down, unit KG<->LB converted) "
              "published before it"),
    FaultInfo("coa_split", FaultKind.BENIGN, 0.02,
              "a lot's properties certified on two CoAs, each with a subset"),
    FaultInfo("coa_reissued", FaultKind.BENIGN, 0.01,
              "a wrong CoA value corrected by a later-issued certificate (published first in 30 %)"),
    FaultInfo("coa_converted_unit", FaultKind.BENIGN, 0.02,
              "CoA values printed in a convertible unit (ppm, mPa.s, kg/m3, mm)"),
    FaultInfo("late_documents", FaultKind.BENIGN, 0.30,
              "fraction of POs and of CoAs published after their receipt (within the document wait)"),
    FaultInfo("vendor_over_ship", FaultKind.VENDOR, 0.8,
              "one vendor ships 0.3-0.9 x the quantity tolerance over on this share of its lines (benign)"),
    FaultInfo("vendor_other_unit", FaultKind.VENDOR, 0.9,
              "one vendor prints this share of its receipts in the other unit, quantities and CoA "
              "values exactly converted (benign)"),
    FaultInfo("vendor_coa_drift", FaultKind.VENDOR, 1.0,
              "one property of one material of one vendor drifts slowly inside the limits "
              "(SILENT_VENDOR_DRIFT once the drift passes K = 4 baseline std)"),
    FaultInfo("vendor_variance_jump", FaultKind.VENDOR, 1.0,
              "one vendor's lot-to-lot spread jumps 3 x mid-run (SILENT_VARIANCE_JUMP for a lot with "
              "a value beyond K = 4 baseline std)"),
    # The learning behaviours: off by default, on in the ``learning`` preset.
    FaultInfo("vendor_agreed_over_ship", FaultKind.VENDOR, 0.0,
              "one vendor has a standing agreement allowing 4 % over-delivery (max(tolerance, 4 %)) and "
              "ships 2.3-3.8 % over on this share of its lines, beyond the spec tolerance (the "
              "QUANTITY_OVER rule fires), within the agreement: benign AGREED_OVER_SHIP; over 4 % "
              "stays QUANTITY_OVER (its quantity_over perturbations are drawn across the 4 %)",
              learning_rate=0.6),
    FaultInfo("vendor_test_method_change", FaultKind.VENDOR, 0.0,
              "at progress 0.25-0.4 one vendor changes the test method of one property of one CoA "
              "material: this share of its lots after the change report it 3-4.5 baseline std "
              "higher (lower where the spec has no room), in spec; the new mean is the baseline "
              "from then on: benign TEST_METHOD_CHANGE on every clean receipt with such a lot",
              learning_rate=1.0),
    FaultInfo("vendor_trend_clean", FaultKind.VENDOR, 0.0,
              "one vendor draws a rule-visible perturbation on this share of its receipts (its "
              "multiplier for rule faults; silent ones at the mix's rate, multiplier 1): at 0.42 "
              "about 30 % of its receipts are rule faults, the others as clean as anyone's (benign "
              "TREND_CLEAN when nothing else labels them)",
              learning_rate=0.42),
    FaultInfo("vendor_coa_comovement", FaultKind.VENDOR, 0.0,
              "from progress coa_comovement_start (default 0.5), this share of one vendor's lots of "
              "one material with >= 2 CoA properties have every value 2-3 baseline std from the "
              "mean, all in the same direction, in spec: SILENT_COA_COMOVEMENT (no value is "
              "beyond 3.5 std on its own)",
              learning_rate=1.0),
)

# Run parameters a fault spec may set (name -> (default, description)); values in 0..1.
PARAMETERS: dict[str, tuple[float, str]] = {
    "coa_comovement_start": (0.5, "progress from which the co-movement vendor's lots move together"),
}
PRESETS = ("default", "none", "learning")

# Ground-truth fault codes, in the precedence order a receipt's single ``fault`` field takes.
FAULT_CODES: tuple[str, ...] = (
    "MALFORMED_BYTES", "MALFORMED_MISSING_FIELDS", "MALFORMED_IMPOSSIBLE_VALUE",
    "UNKNOWN_PO", "DUPLICATE_RECEIPT", "UNKNOWN_MATERIAL", "MISSING_COA", "PO_LINE_CANCELLED",
    "UNIT_MISMATCH", "SILENT_UNIT_LABEL", "QUANTITY_OVER", "QUANTITY_SHORT",
    "PO_REVISED_BELOW_RECEIVED", "PRICE_ANOMALY", "COA_UNIT_MISMATCH", "COA_OUT_OF_SPEC",
    "SILENT_COA_DRIFT", "SILENT_VENDOR_DRIFT", "SILENT_VARIANCE_JUMP", "SILENT_COA_COMOVEMENT",
)
SILENT_CODES = frozenset({"SILENT_UNIT_LABEL", "SILENT_COA_DRIFT", "SILENT_VENDOR_DRIFT", "SILENT_VARIANCE_JUMP",
                          "SILENT_COA_COMOVEMENT"})

_BY_NAME: dict[str, FaultInfo] = {info.name: info for info in CATALOGUE}
FAULTS: tuple[str, ...] = tuple(info.name for info in CATALOGUE if info.is_fault)
BENIGN: tuple[str, ...] = tuple(info.name for info in CATALOGUE if info.kind is FaultKind.BENIGN)
VENDOR_BEHAVIOURS: tuple[str, ...] = tuple(info.name for info in CATALOGUE if info.kind is FaultKind.VENDOR)
# Benign entries drawn per record, one at most (near_limit and late_documents are not).
EXCLUSIVE_BENIGN: tuple[str, ...] = tuple(n for n in BENIGN if n not in ("near_limit", "late_documents"))


def fault_info(name: str) -> FaultInfo:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown fault {name!r}; valid names: {', '.join(_BY_NAME)}") from None


@dataclass(frozen=True)
class FaultMix:
    """A rate for every catalogue entry (missing entries are 0) and the run ``PARAMETERS``
    (missing ones take their default)."""

    rates: Mapping[str, float]
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self.params.items():
            if name not in PARAMETERS:
                raise ValueError(f"unknown parameter {name!r}; valid parameters: {', '.join(PARAMETERS)}")
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
        for name, rate in self.rates.items():
            fault_info(name)
            if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):  # NaN fails too
                raise ValueError(f"rate of {name} must be between 0 and 1, got {rate!r}")
        total = sum(rate for name, rate in self.rates.items() if fault_info(name).is_fault)
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"fault rates sum to {total:g} > 1 (a receipt carries at most one fault)"
            )
        benign = sum(self.rate(name) for name in EXCLUSIVE_BENIGN)
        if benign > 1.0 + 1e-9:
            raise ValueError(f"the rates of {', '.join(EXCLUSIVE_BENIGN)} sum to {benign:g} > 1")

    def rate(self, name: str) -> float:
        fault_info(name)
        return float(self.rates.get(name, 0.0))

    def param(self, name: str) -> float:
        """A run parameter: the value given, else its default."""
        try:
            default = PARAMETERS[name][0]
        except KeyError:
            raise ValueError(f"unknown parameter {name!r}; valid parameters: {', '.join(PARAMETERS)}") from None
        return float(self.params.get(name, default))

    @property
    def total_fault_rate(self) -> float:
        return sum(self.rate(name) for name in FAULTS)

    @classmethod
    def default(cls) -> FaultMix:
        return cls({info.name: info.default_rate for info in CATALOGUE if info.default_rate})

    @classmethod
    def none(cls) -> FaultMix:
        return cls({})

    @classmethod
    def learning(cls) -> FaultMix:
        """The default mix with the learning behaviours on (``FaultInfo.learning_rate``)."""
        rates = dict(cls.default().rates)
        for info in CATALOGUE:
            if info.learning_rate is not None:
                rates[info.name] = info.learning_rate
        return cls({name: rate for name, rate in rates.items() if rate})

    @classmethod
    def preset(cls, name: str) -> FaultMix:
        """``default``, ``none`` or ``learning``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return {"default": cls.default, "none": cls.none, "learning": cls.learning}[name]()

    def describe(self) -> str:
        """The mix as a spec string ``parse_fault_spec`` reads back."""
        parts = [f"{info.name}={self.rate(info.name):g}" for info in CATALOGUE if self.rate(info.name)]
        parts += [f"{name}={value:g}" for name, value in self.params.items()]
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
    """Read a fault mix: a preset (``default``, ``none``, ``learning``), or ``name=rate,...``.

    An optional first item, a preset, sets the base the ``name=rate`` items override;
    without it the base is ``none`` (only the listed faults are injected). Rates are
    fractions (``0.01``) or percentages (``1%``). A ``PARAMETERS`` name sets a run parameter
    the same way (``coa_comovement_start=0.6``).

    >>> parse_fault_spec("unit_mismatch=0.05").rate("unit_mismatch")
    0.05
    >>> parse_fault_spec("default,missing_coa=0").rate("missing_coa")
    0.0
    >>> parse_fault_spec("learning,coa_comovement_start=0.6").param("coa_comovement_start")
    0.6
    """
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise ValueError(
            f"empty fault spec item in {spec!r}; use 'default', 'none', 'learning' or 'name=rate,name=rate'"
        )
    rates: dict[str, float] = {}
    params: dict[str, float] = {}
    if items[0].lower() in PRESETS:
        base = FaultMix.preset(items.pop(0).lower())
        rates, params = dict(base.rates), dict(base.params)
    seen: set[str] = set()
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep:
            raise ValueError(
                f"fault spec item {item!r} is not name=rate ('default'/'none'/'learning' may only come "
                f"first); valid names: {', '.join(_BY_NAME)}, {', '.join(PARAMETERS)}"
            )
        if name not in PARAMETERS:
            fault_info(name)
        if name in seen:
            raise ValueError(f"fault {name} given twice in {spec!r}")
        seen.add(name)
        if name in PARAMETERS:
            params[name] = _parse_rate(name, value)
        else:
            rates[name] = _parse_rate(name, value)
    return FaultMix(rates, params)
