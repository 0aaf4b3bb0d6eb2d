"""The simulated event stream: pure, deterministic, in publish order.

``generate(seed, count, mix)`` yields first every material spec, then ``count``
receipt-topic records with the documents around them, the way real systems publish them:

* every step emits one receipt-topic record: either the next release of an open order
  (a partial delivery's next part, a blanket PO's next release) when one is due, or a new
  delivery (a fresh PO, possibly revised or with a cancelled line, and its receipt);
* POs and CoAs come before their receipt, or (``late_documents``) 0-4 receipts after it,
  always within the document wait; a PO revision governing a receipt is published before
  it; the next release of an order comes at least 6 receipts after the previous one, so
  the earlier receipt is decided first (its late documents are out) and "cumulative
  received" is well defined;
* each record's ground truth is computed by ``judge.judge_receipt`` from the finished
  documents, the PO revision in force, the earlier receipts on its PO lines and the
  vendor's standing over-delivery agreement (``agreed_over_ship``, when on);
* a clean record's ``benign`` names why it looks unusual: the perturbation or benign entry
  drawn for it, with two labels taking precedence over the others: ``AGREED_OVER_SHIP``
  (the agreement vendor delivered beyond a line's tolerance, within its agreement) and
  ``TEST_METHOD_CHANGE`` (a lot of the ``test_method_change`` vendor-material measured by
  the new method: a simulated reviewer knows the lot is from after the change); after the
  other vendor behaviours' labels comes ``TREND_CLEAN``, a clean receipt of the
  ``trend_clean`` vendor, then ``NEAR_LIMIT``.

No Kafka, no global state: the same arguments give the same sequence.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from lotflow.simulator.documents import (
    Ids,
    clean_quantity,
    coa_record,
    new_po,
    new_receipt,
    render_line,
    revise,
    round_quantity,
    sample_value,
)
from lotflow.simulator.faults import (
    EXCLUSIVE_BENIGN,
    FAULTS,
    FaultKind,
    FaultMix,
    fault_info,
)
from lotflow.simulator.inject import INJECTORS, Delivery, Lot, agreed_over_ship, convert_lot_units, over_ship
from lotflow.simulator.judge import (
    SILENT_K,
    cumulative,
    is_silent,
    judge_receipt,
    merge_certificates,
    order_codes,
    quantity_deviation,
    tolerance,
)
from lotflow.simulator.malformed import garbage_bytes, make_impossible, truncated_receipt
from lotflow.simulator.units import ALTERNATE_UNIT, factor
from lotflow.simulator.world import COMOVE_Z, JUMP_FACTOR, Supply, Vendor, World, build_world
from lotflow.streams.topics import CERTIFICATES, MATERIAL_SPECS, PURCHASE_ORDERS, RECEIPTS, TopicSpec

__all__ = ["HISTORY_SHARE", "SimEvent", "generate", "truth_record"]

Record = dict[str, Any]

HISTORY_SHARE = 0.10  # the first receipts carry no perturbation, so vendor profiles exist
DUPLICATE_POOL = 16  # recent clean single-delivery receipts per vendor a duplicate may repeat
LATE_PO_MAX = 4  # a late PO comes 0..4 receipts after its receipt
LATE_COA_MAX = 3
REVISION_DUE = 4  # a revision between releases comes 4 receipts after the previous release
RELEASE_GAP = {"partial_delivery": (6, 30), "blanket_po": (6, 40)}
RELEASES = {"partial_delivery": (2, 3), "blanket_po": (10, 200)}
REISSUE_FIRST_SHARE = 0.3  # reissued certificates published before the one they correct
REVERSED_REVISION_SHARE = 0.3  # revised POs whose newer revision is published first
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

# Perturbations that can land on a release of an open order (quantity ones on the final only).
_RELEASE_FAULTS = frozenset({"quantity_short", "quantity_over", "price_anomaly", "coa_out_of_spec",
                             "coa_unit_mismatch", "silent_unit_label", "silent_coa_drift"})
# What a new PO needs on line 1 for a perturbation to apply.
_NEEDS = {"unit_mismatch": "convertible", "converted_unit": "convertible", "silent_unit_label": "mass",
          "coa_out_of_spec": "coa", "missing_coa": "coa", "silent_coa_drift": "coa",
          "coa_unit_mismatch": "coa", "coa_reissued": "coa", "coa_converted_unit": "coa",
          "coa_split": "coa2", "po_revision": "mass"}
# Benign label of a perturbation that stayed within its threshold.
_WITHIN = {"quantity_short": "QUANTITY_WITHIN_TOLERANCE", "quantity_over": "QUANTITY_WITHIN_TOLERANCE",
           "price_anomaly": "PRICE_WITHIN_TOLERANCE", "coa_out_of_spec": "COA_WITHIN_LIMITS",
           "silent_coa_drift": "COA_SHIFT_WITHIN_K"}


@dataclass(frozen=True, slots=True)
class SimEvent:
    """One record to publish: ``value`` is a schema dict, or raw bytes for malformed ones.

    ``truth`` (GroundTruth fields without the source_* ones) is set for every record on the
    receipts topic and ``None`` otherwise; ``injected`` names the catalogue perturbation
    drawn for it (empty: none), whether or not it ended up a fault.
    """

    topic: TopicSpec
    key: str
    value: Record | bytes
    truth: Record | None = None
    injected: str = ""


@dataclass(slots=True)
class _Pending:
    topic: TopicSpec
    key: str
    value: Record | bytes
    truth: Record | None = None
    lags: dict[str, int] = field(default_factory=dict)  # field -> ms before event_time
    truncate: bool = False  # encode as a truncated receipt (malformed_missing_fields)
    injected: str = ""


@dataclass(slots=True)
class _Order:
    po: Record  # the revision in force
    vendor: Vendor
    earlier: dict[int, list[tuple[float, str]]] = field(default_factory=dict)


@dataclass(slots=True)
class _Series:
    order: _Order
    line_no: int
    kind: str  # partial_delivery | blanket_po
    planned: list[float]  # quantities (PO unit) of the releases still to come, the final excluded
    due: int
    seq: int
    revised: bool = False


def truth_record(subject_id: str, subject_key: str, vendor_id: str, codes: list[str] | str | None,
                 benign: str = "") -> Record:
    """GroundTruth fields of one receipt-topic record (event_time is stamped on emission).

    ``codes``: the fault codes (precedence order), a catalogue name, or None for a clean one.
    """
    if isinstance(codes, str):
        codes = [fault_info(codes).code]
    codes = codes or []
    return {
        "subject_id": subject_id,
        "subject_key": subject_key,
        "vendor_id": vendor_id,
        "fault": codes[0] if codes else "NONE",
        "is_fault": bool(codes),
        "silent": is_silent(codes),
        "benign": "" if codes else benign.upper(),
        "event_time": 0,
    }


class _Run:
    """State of one generation run; ``events()`` yields the stream."""

    def __init__(self, seed: int, count: int, mix: FaultMix, start_ms: int, gap_ms: float) -> None:
        self.rng = random.Random(seed)
        self.mix = mix
        self.world: World = build_world(seed, mix.rate("near_limit"))
        self.specs = {m.material_id: m.spec_record(0) for m in self.world.materials.values()}
        self.ids = Ids(seed)
        self.count = count
        self.history = int(count * HISTORY_SHARE)
        self.clock = float(start_ms)
        self.gap_ms = gap_ms
        self.emitted = 0  # receipt-topic records yielded
        self.heap: list[tuple[int, int, _Pending]] = []
        self.seq = 0
        self.series: list[_Series] = []
        self.clean_pool: dict[str, deque[Record]] = {
            v.vendor_id: deque(maxlen=DUPLICATE_POOL) for v in self.world.vendors
        }
        self.vendors = self.world.vendors
        self.cum_volume = list(accumulate(v.volume for v in self.vendors))
        self.late = mix.rate("late_documents")
        self.behaviour = {
            v.vendor_id: (v.behaviour, mix.rate(f"vendor_{v.behaviour}") if v.behaviour else 0.0)
            for v in self.vendors
        }
        self.comove_start = mix.param("coa_comovement_start")
        self._vendor_materials()
        self._probabilities(mix)

    # --- setup ------------------------------------------------------------------------
    def _vendor_materials(self) -> None:
        mats = self.world.materials
        self.needs: dict[tuple[str, str], list[str]] = {}
        for v in self.vendors:
            kinds = {
                "convertible": [m for m in v.materials if mats[m].base_unit in ALTERNATE_UNIT],
                "mass": [m for m in v.materials if mats[m].base_unit == "KG"],
                "coa": [m for m in v.materials if mats[m].requires_coa],
                "coa2": [m for m in v.materials if len(mats[m].properties) >= 2],
            }
            for kind, ids in kinds.items():
                self.needs[(v.vendor_id, kind)] = ids

    def _probabilities(self, mix: FaultMix) -> None:
        # Fault rates are per receipt-topic record over the whole run, drawn only after history.
        after_history = (self.count - self.history) / self.count if self.count else 1.0
        scale = 1.0 / after_history if after_history > 0 else 0.0
        self.fault_p = [
            (name, mix.rate(name) * scale, fault_info(name).kind)
            for name in FAULTS if mix.rate(name) > 0
        ]
        # The trend_clean vendor's multipliers (rule, silent): its rate is the share of its
        # receipts (after history) that draw a rule-visible fault; silent ones come at the
        # mix's rate (multiplier 1), so its other receipts are as clean as an average vendor's.
        rule_p = sum(p for _, p, kind in self.fault_p if kind is FaultKind.RULE)
        self.trend_multipliers = {
            v.vendor_id: (rate / rule_p, 1.0) for v in self.vendors
            if (rate := self._rate(v, "trend_clean")) > 0 and rule_p > 0
        }
        # Benign rates are per record too; releases of open orders take a share of the steps.
        mean = {k: (lo + hi) / 2 for k, (lo, hi) in RELEASES.items()}
        continuing = sum(mix.rate(k) * (mean[k] - 1) / mean[k] for k in RELEASES)
        fresh = max(1.0 - continuing - mix.total_fault_rate, 0.05)
        self.benign_p: list[tuple[str, float]] = []
        for name in EXCLUSIVE_BENIGN:
            p = mix.rate(name) / fresh
            if name in RELEASES:
                p /= mean[name]
            if p > 0:
                self.benign_p.append((name, p))
        self.revision_p = mix.rate("po_revision")

    # --- stream -------------------------------------------------------------------------
    def events(self) -> Iterator[SimEvent]:
        for material in self.world.materials.values():
            yield self._emit(_Pending(MATERIAL_SPECS, material.material_id, material.spec_record(0)))
        while self.emitted < self.count:
            yield from self._flush_due()
            yield from self._step()
        while self.heap:
            yield self._emit(heapq.heappop(self.heap)[2])

    def _flush_due(self) -> Iterator[SimEvent]:
        while self.heap and self.heap[0][0] <= self.emitted:
            yield self._emit(heapq.heappop(self.heap)[2])

    def _defer(self, pending: _Pending, due: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, pending))

    def _emit(self, p: _Pending) -> SimEvent:
        if p.topic is RECEIPTS:
            self.clock += self.gap_ms * self.rng.uniform(0.5, 1.5)
            self.emitted += 1
        t = int(self.clock)
        value = p.value
        if isinstance(value, dict):
            value["event_time"] = t
            for name, lag in p.lags.items():
                value[name] = t - lag
            if p.truncate:
                value = truncated_receipt(self.rng, value)
        if p.truth is not None:
            p.truth["event_time"] = t
        return SimEvent(p.topic, p.key, value, p.truth, p.injected)

    def _receipt_pending(self, receipt: Record, truth: Record, injected: str) -> _Pending:
        lag = self.rng.randint(5 * 60_000, 4 * HOUR_MS)
        return _Pending(RECEIPTS, receipt["po_number"], receipt, truth, {"received_at": lag}, injected=injected)

    def _po_pending(self, po: Record) -> _Pending:
        return _Pending(PURCHASE_ORDERS, po["po_number"], po,
                        lags={"order_date": self.rng.randint(1 * DAY_MS, 30 * DAY_MS)})

    # --- one step -----------------------------------------------------------------------
    def _vendor(self) -> Vendor:
        return self.rng.choices(self.vendors, cum_weights=self.cum_volume)[0]

    def _draw_fault(self, vendor: Vendor, progress: float) -> str | None:
        m = vendor.multiplier(progress)
        rule_m, silent_m = self.trend_multipliers.get(vendor.vendor_id, (m, m))
        probs = [(name, p if kind is FaultKind.MALFORMED else p * (rule_m if kind is FaultKind.RULE else silent_m))
                 for name, p, kind in self.fault_p]
        total = sum(p for _, p in probs)
        u = self.rng.random() * max(total, 1.0)
        for name, p in probs:
            if u < p:
                return name
            u -= p
        return None

    def _draw_benign(self) -> str:
        u = self.rng.random()
        for name, p in self.benign_p:
            if u < p:
                return name
            u -= p
        return ""

    def _behaves(self, vendor: Vendor, behaviour: str) -> bool:
        kind, rate = self.behaviour[vendor.vendor_id]
        return kind == behaviour and rate > 0 and self.rng.random() < rate

    def _rate(self, vendor: Vendor, behaviour: str) -> float:
        """The mix's rate of ``behaviour`` for ``vendor`` (0: not its behaviour, or off)."""
        kind, rate = self.behaviour[vendor.vendor_id]
        return rate if kind == behaviour else 0.0

    def _agreement(self, vendor: Vendor) -> float:
        """The vendor's standing over-delivery agreement (fraction; 0: none, or its behaviour is off)."""
        return vendor.agreed_over_pct / 100.0 if self._rate(vendor, "agreed_over_ship") > 0 else 0.0

    def _due_series(self) -> _Series | None:
        due = [s for s in self.series if s.due <= self.emitted]
        return min(due, key=lambda s: (s.due, s.seq)) if due else None

    def _step(self) -> Iterator[SimEvent]:
        progress = self.emitted / self.count
        series = self._due_series()
        vendor = series.order.vendor if series else self._vendor()
        fault = self._draw_fault(vendor, progress) if self.emitted >= self.history else None
        if series is not None and self._fits(series, fault):
            yield from self._release(series, fault, progress)
            return
        if fault is not None and fault_info(fault).kind is FaultKind.MALFORMED:
            yield from self._malformed(vendor, fault)
            return
        if fault == "duplicate_receipt":
            duplicate = self._duplicate(vendor)
            if duplicate is not None:
                yield self._emit(duplicate)
                return
            fault = None
        benign = self._draw_benign() if fault is None else ""
        if benign in RELEASES:
            yield from self._start_series(vendor, benign, progress)
        else:
            yield from self._single(vendor, fault, benign, progress)

    def _fits(self, series: _Series, fault: str | None) -> bool:
        if fault is None:
            return True
        if fault not in _RELEASE_FAULTS:
            return False
        material = self.world.materials[self._po_line(series.order.po, series.line_no)["material_id"]]
        if fault.startswith(("coa_", "silent_coa")) and not material.requires_coa:
            return False
        if fault == "silent_unit_label" and self._po_line(series.order.po, series.line_no)["unit"] not in ("KG", "LB"):
            return False
        if fault == "quantity_short":
            if series.planned:
                return False
            pl = self._po_line(series.order.po, series.line_no)
            before = cumulative(series.order.earlier.get(series.line_no, []), 0.0, pl["unit"], pl["unit"])
            tol = tolerance(self.specs[pl["material_id"]])
            return pl["quantity"] - before > 3.5 * tol * pl["quantity"]
        return fault != "quantity_over" or not series.planned

    @staticmethod
    def _po_line(po: Record, line_no: int) -> Record:
        return next(pl for pl in po["lines"] if pl["line_no"] == line_no)

    # --- lots ---------------------------------------------------------------------------
    def _lots(self, vendor: Vendor, lines: list[Record], progress: float) -> dict[str, Lot]:
        drifting = self._behaves(vendor, "coa_drift")
        jumped = progress >= vendor.jump_at and self._behaves(vendor, "variance_jump")
        new_method = progress >= vendor.change_at and self._behaves(vendor, "test_method_change")
        comoving = progress >= self.comove_start and self._rate(vendor, "coa_comovement") > 0
        lots: dict[str, Lot] = {}
        for line in lines:
            material = self.world.materials.get(line["material_id"])
            if material is None or not material.requires_coa:
                continue
            supply = self.world.supply(vendor.vendor_id, material.material_id)
            drift_z = supply.drift_z(progress) if drifting else 0.0
            changed = new_method and bool(supply.method_prop)
            values, baseline = {}, {}
            for prop in material.properties:
                profile = baseline[prop.name] = supply.baseline(prop.name, changed)
                mean = profile.mean + (drift_z * profile.std if prop.name == supply.drift_prop else 0.0)
                std = profile.std * (JUMP_FACTOR if jumped else 1.0)
                values[prop.name] = sample_value(self.rng, prop, mean, std)
            lot = Lot(line["vendor_lot"], material, values, baseline, drift_z=drift_z, post_jump=jumped,
                      method_changed=changed)
            if comoving and supply.comove_sign and self._behaves(vendor, "coa_comovement"):
                self._comove(lot, supply)
            lots[line["vendor_lot"]] = lot
        return lots

    def _comove(self, lot: Lot, supply: Supply) -> None:
        """Place every value of ``lot`` U``COMOVE_Z`` baseline std from its mean, all on the
        supply's side (the world leaves room for that inside the spec), at the 4 decimals of
        a clean value, redrawn until the rounded value is still within ``COMOVE_Z``."""
        sign = supply.comove_sign
        for prop in lot.material.properties:
            profile = lot.baseline[prop.name]
            for _ in range(50):
                value = round(profile.mean + sign * self.rng.uniform(*COMOVE_Z) * profile.std, 4)
                if COMOVE_Z[0] <= sign * (value - profile.mean) / profile.std <= COMOVE_Z[1]:
                    break
            else:  # a std far below the rounding step (never seen): keep the exact value
                value = profile.mean + sign * sum(COMOVE_Z) / 2 * profile.std
            lot.values[prop.name] = min(max(value, prop.min), prop.max)
        lot.comoved = True

    def _lot_silent(self, vendor: Vendor, lot: Lot) -> set[str]:
        codes: set[str] = set()
        for prop in lot.material.properties:
            value = lot.values[prop.name]
            if not prop.min <= value <= prop.max:
                continue  # out of spec: a rule sees it
            profile = lot.profile(self.world, vendor.vendor_id, prop.name)
            z = abs(value - profile.mean) / profile.std
            if prop.name in lot.shifted_z and z > SILENT_K:
                codes.add("SILENT_COA_DRIFT")
            elif lot.post_jump and z > SILENT_K:
                codes.add("SILENT_VARIANCE_JUMP")
        if abs(lot.drift_z) > SILENT_K:
            codes.add("SILENT_VENDOR_DRIFT")
        if lot.comoved:
            codes.add("SILENT_COA_COMOVEMENT")
        return codes

    def _certificates(self, vendor: Vendor, po_number: str, lot: Lot) -> list[tuple[Record, int]]:
        """The lot's certificates in publish order, each with its issued_at lag (ms)."""
        rng = self.rng
        props = [p.name for p in lot.material.properties]

        def cert(names: list[str], values: dict[str, float] | None = None) -> Record:
            printed = []
            for name in names:
                number, unit = lot.printed(name, (values or {}).get(name))
                printed.append({"property": name, "value": number, "unit": unit})
            return coa_record(self.ids, vendor, po_number, lot.vendor_lot, lot.material.material_id, printed)

        if lot.plan == "split":
            rng.shuffle(props)
            k = rng.randint(1, len(props) - 1)
            return [(cert(props[:k]), rng.randint(HOUR_MS, 2 * DAY_MS)),
                    (cert(props[k:]), rng.randint(HOUR_MS, 2 * DAY_MS))]
        if lot.plan == "reissued":
            first = (cert(props, lot.wrong), rng.randint(3 * DAY_MS, 5 * DAY_MS))
            second = (cert(props), rng.randint(HOUR_MS, DAY_MS))
            return [second, first] if rng.random() < REISSUE_FIRST_SHARE else [first, second]
        return [(cert(props), rng.randint(HOUR_MS, 2 * DAY_MS))]

    def _reissue(self, lot: Lot) -> None:
        """The first certificate carries one wrong value (out of spec, or a decimal slip)."""
        prop = self.rng.choice(lot.material.properties)
        value = lot.values[prop.name]
        if self.rng.random() < 0.5 and value * 10.0 > prop.max:
            wrong = value * 10.0
        else:
            wrong = prop.max + self.rng.uniform(0.05, 0.3) * prop.span
        lot.wrong = {prop.name: round(wrong, 4)}
        lot.plan = "reissued"

    # --- deliveries ---------------------------------------------------------------------
    def _line_unit(self, vendor: Vendor, po_line: Record, other_unit: bool) -> str:
        unit = str(po_line["unit"])
        return ALTERNATE_UNIT[unit] if other_unit and unit in ALTERNATE_UNIT else unit

    def _finish(self, d: Delivery, order: _Order, fault: str | None, benign: str, progress: float,
                other_unit: bool, *, pos: list[Record], revised: bool = False, late_ok: bool = True,
                single: bool = False) -> Iterator[SimEvent]:
        """Perturb, judge and place one delivery (``pos``: PO records to publish with it)."""
        rng, vendor = self.rng, d.vendor
        d.agreed_over = self._agreement(vendor)
        injected = ""
        if fault in INJECTORS:
            if INJECTORS[fault](rng, self.world, d):
                injected = fault
            else:
                fault = None
        elif fault is not None:
            injected = fault
        shaped = fault in ("quantity_short", "quantity_over", "unit_mismatch", "silent_unit_label")
        over = not shaped and self._behaves(vendor, "over_ship") and over_ship(rng, self.world, d)
        if not shaped and d.agreed_over:
            agreed_over_ship(rng, self.world, d, self._rate(vendor, "agreed_over_ship"))
        lots = list(d.lots.values())
        if benign == "coa_split":
            candidates = [lot for lot in lots if len(lot.material.properties) >= 2]
            if candidates:
                rng.choice(candidates).plan = "split"
            else:
                benign = ""
        elif benign == "coa_reissued" and lots:
            self._reissue(rng.choice(lots))
        elif benign == "coa_converted_unit":
            if not (lots and convert_lot_units(rng.choice(lots))):
                benign = ""
        elif benign == "converted_unit":
            if not self._convert_a_line(d):
                benign = ""
        elif benign in ("coa_reissued",):
            benign = ""
        if other_unit:
            for lot in lots:
                convert_lot_units(lot)

        certs = {lot.vendor_lot: self._certificates(vendor, d.po["po_number"], lot)
                 for lot in lots if lot.published}
        lot_values: dict[str, Any] = {}
        for line in d.receipt["lines"]:
            found = certs.get(line["vendor_lot"])
            lot_values[line["vendor_lot"]] = (
                None if found is None else merge_certificates([{**c, "issued_at": -lag} for c, lag in found]))
        facts = set(d.facts)
        for lot in lots:
            facts |= self._lot_silent(vendor, lot)
        if fault == "po_revised_below_received":
            facts.add("PO_REVISED_BELOW_RECEIVED")
        codes = judge_receipt(d.receipt, d.po if d.publish_po else None, d.earlier, self.specs, lot_values, facts,
                              agreed_over=d.agreed_over)
        label = self._learning_label(d, lots) or _WITHIN.get(injected, "") or benign
        if not label:
            label = self._behaviour_label(vendor, lots, over, other_unit)
        truth = truth_record(d.receipt["receipt_id"], d.po["po_number"], vendor.vendor_id, codes, label)

        # placement: POs, CoAs, receipt
        after = self.emitted + 1
        po_late = late_ok and not revised and d.publish_po and rng.random() < self.late
        if d.publish_po:
            for po in pos:
                pending = self._po_pending(po)
                if po_late:
                    self._defer(pending, after + rng.randint(0, LATE_PO_MAX))
                else:
                    yield self._emit(pending)
        for lot in lots:
            if not lot.published:
                continue
            late = late_ok and lot.plan != "reissued" and rng.random() < self.late
            due = after + rng.randint(0, LATE_COA_MAX)
            for coa, lag in certs[lot.vendor_lot]:
                pending = _Pending(CERTIFICATES, coa["po_number"], coa, lags={"issued_at": lag})
                if late:
                    self._defer(pending, due)
                else:
                    yield self._emit(pending)
        yield self._emit(self._receipt_pending(d.receipt, truth, injected))
        for line in d.receipt["lines"]:
            order.earlier.setdefault(line["po_line"], []).append((line["quantity"], line["unit"]))
        if single and not codes and not revised and fault is None:
            self.clean_pool[vendor.vendor_id].append(
                {**d.receipt, "lines": [dict(line) for line in d.receipt["lines"]]})

    def _learning_label(self, d: Delivery, lots: list[Lot]) -> str:
        """The benign labels that take precedence (a clean record only keeps its label)."""
        if d.agreed_over and self._beyond_tolerance(d):
            return "AGREED_OVER_SHIP"
        if any(lot.method_changed for lot in lots):
            return "TEST_METHOD_CHANGE"
        return ""

    def _beyond_tolerance(self, d: Delivery) -> bool:
        """Some line's cumulative delivery is over its material's tolerance."""
        po_lines = {pl["line_no"]: pl for pl in d.po["lines"]}
        for line in d.receipt["lines"]:
            pl, spec = po_lines.get(line["po_line"]), self.specs.get(line["material_id"])
            if pl is None or spec is None or pl["quantity"] == 0 or pl["material_id"] != line["material_id"]:
                continue
            cum = cumulative(d.earlier.get(line["po_line"], []), line["quantity"], line["unit"], pl["unit"])
            if quantity_deviation(cum, pl["quantity"]) > tolerance(spec):
                return True
        return False

    def _behaviour_label(self, vendor: Vendor, lots: list[Lot], over: bool, other_unit: bool) -> str:
        if over:
            return "OVER_SHIP_WITHIN_TOLERANCE"
        if other_unit:
            return "CONVERTED_UNIT"
        if any(lot.drift_z for lot in lots):
            return "VENDOR_DRIFT_WITHIN_K"
        if any(lot.post_jump for lot in lots):
            return "VARIANCE_JUMP_WITHIN_K"
        if self._rate(vendor, "trend_clean") > 0:
            return "TREND_CLEAN"
        if any(self.world.supply(vendor.vendor_id, lot.material.material_id).near_limit for lot in lots):
            return "NEAR_LIMIT"
        return ""

    def _convert_a_line(self, d: Delivery) -> bool:
        """Benign: one line printed in the other unit, quantity and price converted."""
        lines = [ln for ln in d.receipt["lines"] if ln["unit"] == d.po_line(ln)["unit"]
                 and ln["unit"] in ALTERNATE_UNIT]
        if not lines:
            return False
        line = self.rng.choice(lines)
        pl = d.po_line(line)
        unit = ALTERNATE_UNIT[pl["unit"]]
        k = factor(pl["unit"], unit)
        line["unit"] = unit
        line["quantity"] = round(line["quantity"] * k, 2)
        if line["unit_price"] is not None:
            line["unit_price"] = round(pl["unit_price"] / k, 4)
        return True

    def _first(self, vendor: Vendor, kind: str | None) -> str | None:
        need = _NEEDS.get(kind or "")
        if need is None:
            return None
        ids = self.needs[(vendor.vendor_id, need)]
        return self.rng.choice(ids) if ids else None

    def _single(self, vendor: Vendor, fault: str | None, benign: str, progress: float) -> Iterator[SimEvent]:
        """A fresh PO delivered in one receipt (possibly revised first)."""
        rng = self.rng
        first = self._first(vendor, fault or benign)
        if first is None and benign in _NEEDS:
            benign = ""
        cancel = benign == "cancelled_line" or fault == "po_line_cancelled"
        po = new_po(rng, self.ids, self.world, vendor, first=first, min_lines=2 if cancel else 1)
        pos = [po]
        cancelled: int | None = None
        if cancel and len(po["lines"]) >= 2:
            cancelled = rng.choice(po["lines"])["line_no"]
            pos.append(revise(po, cancelled, quantity=0.0))
        elif cancel:
            fault, benign = None, ""
        elif benign == "po_revision":
            pos.append(self._revision(po, po["lines"][0]["line_no"], 0.0, []))
        in_force = pos[-1]
        order = _Order(in_force, vendor)
        other_unit = self._behaves(vendor, "other_unit")
        lines = []
        for pl in in_force["lines"]:
            if pl["quantity"] == 0:
                if fault == "po_line_cancelled":  # delivered as originally ordered
                    original = self._po_line(po, pl["line_no"])
                    lines.append(render_line(rng, self.ids, vendor, {**pl, "quantity": original["quantity"]},
                                             original["quantity"] * factor(original["unit"], pl["unit"])))
                continue
            tol = self.world.materials[pl["material_id"]].quantity_tolerance_pct
            qty = clean_quantity(rng, pl["quantity"], pl["unit"], tol)
            lines.append(render_line(rng, self.ids, vendor, pl, qty, self._line_unit(vendor, pl, other_unit)))
        receipt = new_receipt(rng, self.ids, vendor, po["po_number"], lines)
        d = Delivery(vendor, in_force, receipt, self._lots(vendor, lines, progress), order.earlier)
        if rng.random() < REVERSED_REVISION_SHARE and len(pos) > 1:
            pos = [pos[1], pos[0]]
        yield from self._finish(d, order, fault, benign, progress, other_unit, pos=pos,
                                revised=len(pos) > 1 or fault == "po_revised_below_received",
                                late_ok=fault != "po_revised_below_received", single=True)
        if fault == "po_revised_below_received":
            self._revise_below_received(order)

    def _revise_below_received(self, order: _Order) -> None:
        """A revision after the receipt cut the first line below what was received."""
        pl = order.po["lines"][0]
        received = cumulative(order.earlier.get(pl["line_no"], []), 0.0, pl["unit"], pl["unit"])
        tol = tolerance(self.specs[pl["material_id"]])
        quantity = round_quantity(received / (1.0 + tol) / self.rng.uniform(1.1, 1.6), pl["unit"])
        revision = revise(order.po, pl["line_no"], quantity=max(quantity, 1.0))
        order.po = revision
        self._defer(self._po_pending(revision), self.emitted + self.rng.randint(6, 12))

    def _revision(self, po: Record, line_no: int, before: float, planned: list[float]) -> Record:
        """Next revision of ``po``: line ``line_no`` up, down (never below what is committed:
        ``before`` received + ``planned`` releases) or KG<->LB; ``planned`` is rescaled in place."""
        rng = self.rng
        pl = self._po_line(po, line_no)
        roll = rng.random()
        if roll < 0.3 and pl["unit"] in ("KG", "LB"):
            unit = ALTERNATE_UNIT[pl["unit"]]
            k = factor(pl["unit"], unit)
            planned[:] = [round_quantity(q * k, unit) for q in planned]
            return revise(po, line_no, unit=unit)
        rest = pl["quantity"] - before - sum(planned)
        low = 0.5 + 0.5 * before / (pl["quantity"] - sum(planned)) if pl["quantity"] > sum(planned) else 1.0
        s = rng.uniform(max(low, 0.6), 0.95) if roll < 0.65 and low < 0.9 else rng.uniform(1.05, 1.4)
        quantity = round_quantity(pl["quantity"] * s, pl["unit"])
        planned[:] = [round_quantity(q * s, pl["unit"]) for q in planned]
        if quantity - before - sum(planned) <= 0.25 * max(rest, 0.0):
            quantity = pl["quantity"]  # rounding left no room: keep the quantity, still a new revision
        return revise(po, line_no, quantity=quantity)

    # --- open orders --------------------------------------------------------------------
    def _start_series(self, vendor: Vendor, kind: str, progress: float) -> Iterator[SimEvent]:
        rng = self.rng
        blanket = kind == "blanket_po"
        po = new_po(rng, self.ids, self.world, vendor, max_lines=1 if blanket else 3, bulk=blanket)
        order = _Order(po, vendor)
        pl = rng.choice(po["lines"])
        n = rng.randint(*RELEASES[kind])
        weights = [rng.uniform(0.6, 1.4) for _ in range(n)]
        total = sum(weights)
        planned = [round_quantity(pl["quantity"] * w / total, pl["unit"]) for w in weights[:-1]]
        planned = [q if q > 0 else 1.0 for q in planned]
        other_unit = self._behaves(vendor, "other_unit")
        lines = []
        for line in po["lines"]:
            unit = self._line_unit(vendor, line, other_unit)
            if line["line_no"] == pl["line_no"]:
                rendered = render_line(rng, self.ids, vendor, line, planned.pop(0), unit)
                rendered["partial"] = True
            else:
                tol = self.world.materials[line["material_id"]].quantity_tolerance_pct
                rendered = render_line(rng, self.ids, vendor, line,
                                       clean_quantity(rng, line["quantity"], line["unit"], tol), unit)
            lines.append(rendered)
        receipt = new_receipt(rng, self.ids, vendor, po["po_number"], lines)
        d = Delivery(vendor, po, receipt, self._lots(vendor, lines, progress), order.earlier)
        yield from self._finish(d, order, None, kind, progress, other_unit, pos=[po])
        self._schedule(_Series(order, pl["line_no"], kind, planned, 0, 0))

    def _schedule(self, series: _Series) -> None:
        rng = self.rng
        series.due = self.emitted + rng.randint(*RELEASE_GAP[series.kind])
        self.seq += 1
        series.seq = self.seq
        series.revised = False
        if rng.random() < self.revision_p:
            order = series.order
            pl = self._po_line(order.po, series.line_no)
            before = cumulative(order.earlier.get(series.line_no, []), 0.0, pl["unit"], pl["unit"])
            order.po = self._revision(order.po, series.line_no, before, series.planned)
            self._defer(self._po_pending(order.po), self.emitted + REVISION_DUE)
            series.revised = True
        if series not in self.series:
            self.series.append(series)

    def _release(self, series: _Series, fault: str | None, progress: float) -> Iterator[SimEvent]:
        rng, order = self.rng, series.order
        vendor = order.vendor
        pl = self._po_line(order.po, series.line_no)
        final = not series.planned
        if final:
            earlier = order.earlier.get(series.line_no, [])
            before = cumulative(earlier, 0.0, pl["unit"], pl["unit"])
            tol = self.world.materials[pl["material_id"]].quantity_tolerance_pct
            target = clean_quantity(rng, pl["quantity"], pl["unit"], tol)
            qty = round_quantity(target - before, pl["unit"])
            if qty <= 0:
                qty = round_quantity(max(0.01 * pl["quantity"], 1.0), pl["unit"])
        else:
            qty = series.planned.pop(0)
        other_unit = self._behaves(vendor, "other_unit")
        line = render_line(rng, self.ids, vendor, pl, qty, self._line_unit(vendor, pl, other_unit))
        line["partial"] = not final
        receipt = new_receipt(rng, self.ids, vendor, order.po["po_number"], [line])
        d = Delivery(vendor, order.po, receipt, self._lots(vendor, [line], progress), order.earlier)
        label = "po_revision" if series.revised else series.kind
        yield from self._finish(d, order, fault, label, progress, other_unit, pos=[])
        if final:
            self.series.remove(series)
        else:
            self._schedule(series)

    # --- special deliveries -----------------------------------------------------------
    def _duplicate(self, vendor: Vendor) -> _Pending | None:
        """An earlier clean single-delivery receipt of ``vendor`` booked again under a new id."""
        pool = self.clean_pool[vendor.vendor_id]
        if not pool:
            return None
        original = pool[self.rng.randrange(len(pool))]
        pool.remove(original)
        receipt = {
            **original,
            "receipt_id": self.ids.next_receipt(),
            "lines": [dict(line) for line in original["lines"]],
        }
        truth = truth_record(receipt["receipt_id"], receipt["po_number"], vendor.vendor_id,
                             order_codes(["DUPLICATE_RECEIPT"]))
        return self._receipt_pending(receipt, truth, "duplicate_receipt")

    def _malformed(self, vendor: Vendor, fault: str) -> Iterator[SimEvent]:
        """A bad receipt-topic record; its PO and CoAs are never published."""
        rng = self.rng
        po = new_po(rng, self.ids, self.world, vendor)
        lines = [render_line(rng, self.ids, vendor, pl, pl["quantity"]) for pl in po["lines"]]
        receipt = new_receipt(rng, self.ids, vendor, po["po_number"], lines)
        key = po["po_number"]
        lags = {"received_at": rng.randint(5 * 60_000, 4 * HOUR_MS)}
        value: Record | bytes = receipt
        truncate = False
        if fault == "malformed_bytes":
            subject = self.ids.next_malformed()
            key = rng.choice((key, ""))
            value = garbage_bytes(rng, receipt)
        elif fault == "malformed_missing_fields":
            subject, truncate = self.ids.next_malformed(), True
        else:
            subject = receipt["receipt_id"]
            _, lag = make_impossible(rng, receipt)
            lags = {} if lag is None else {"received_at": lag}
        truth = truth_record(subject, key, vendor.vendor_id, fault)
        yield self._emit(_Pending(RECEIPTS, key, value, truth, lags, truncate, fault))


def generate(seed: int, count: int, mix: FaultMix, start_ms: int | None = None, *,
             gap_ms: float = 1000.0) -> Iterator[SimEvent]:
    """The events of simulation run ``seed`` in publish order.

    ``count`` receipt-topic records (receipts, releases, duplicates and malformed ones) are
    generated, each with ground truth; specs, POs and CoAs come on top. Receipt event times
    advance ~``gap_ms`` per receipt-topic record from ``start_ms`` (default: now, the only
    wall-clock input). Deterministic for equal arguments. ``mix`` also carries the run
    parameters (``faults.PARAMETERS``: ``mix.param("coa_comovement_start")``, set in a fault
    spec as ``coa_comovement_start=0.6``).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if gap_ms < 0:
        raise ValueError(f"gap_ms must be >= 0, got {gap_ms}")
    start = int(time.time() * 1000) if start_ms is None else int(start_ms)
    return _Run(seed, count, mix, start, gap_ms).events()
