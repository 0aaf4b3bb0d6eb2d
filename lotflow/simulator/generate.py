"""The simulated event stream: pure, deterministic, in publish order.

``generate(seed, count, mix)`` yields first every material spec, then deliveries: a PO,
its receipt(s) and certificates of analysis, interleaved the way real systems publish
them (~30% of receipts arrive before their PO, CoAs before or after their receipt, the
second half of a partial delivery later). ``count`` is the number of receipt-topic
records; every one of them carries its ground truth. No Kafka, no global state: the same
arguments give the same sequence.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from lotflow.simulator.documents import (
    Draft,
    Ids,
    build_draft,
    coas_for,
    new_receipt,
    receipt_line,
)
from lotflow.simulator.faults import FAULTS, FaultKind, FaultMix, fault_info
from lotflow.simulator.inject import INJECTORS, NEEDS, drift_candidates, inject_drift
from lotflow.simulator.malformed import garbage_bytes, make_impossible, truncated_receipt
from lotflow.simulator.units import convertible
from lotflow.simulator.world import Vendor, World, build_world
from lotflow.streams.topics import CERTIFICATES, MATERIAL_SPECS, PURCHASE_ORDERS, RECEIPTS, TopicSpec

__all__ = ["HISTORY_SHARE", "SimEvent", "generate", "truth_record"]

Record = dict[str, Any]

HISTORY_SHARE = 0.10  # the first receipts carry no fault, so vendor profiles exist
DRIFT_MIN_HISTORY = 20  # earlier receipts of a vendor-material pair before it can drift
RECEIPT_FIRST_SHARE = 0.30  # receipts published before their PO
COA_FIRST_SHARE = 0.50  # CoAs published before their receipt
DUPLICATE_POOL = 16  # recent clean receipts per vendor a duplicate may repeat
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True, slots=True)
class SimEvent:
    """One record to publish: ``value`` is a schema dict, or raw bytes for malformed ones.

    ``truth`` (GroundTruth fields without the source_* ones) is set for every record on the
    receipts topic and ``None`` otherwise.
    """

    topic: TopicSpec
    key: str
    value: Record | bytes
    truth: Record | None = None


@dataclass(slots=True)
class _Pending:
    topic: TopicSpec
    key: str
    value: Record | bytes
    truth: Record | None = None
    lags: dict[str, int] = field(default_factory=dict)  # field -> ms before event_time
    truncate: bool = False  # encode as a truncated receipt (malformed_missing_fields)


def truth_record(subject_id: str, subject_key: str, vendor_id: str, fault: str | None,
                 benign: str = "") -> Record:
    """GroundTruth fields of one receipt-topic record (event_time is stamped on emission)."""
    info = fault_info(fault) if fault else None
    return {
        "subject_id": subject_id,
        "subject_key": subject_key,
        "vendor_id": vendor_id,
        "fault": info.code if info else "NONE",
        "is_fault": info is not None,
        "silent": info is not None and info.kind is FaultKind.SILENT,
        "benign": benign.upper(),
        "event_time": 0,
    }


class _Run:
    """State of one generation run; ``events()`` yields the stream."""

    def __init__(self, seed: int, count: int, mix: FaultMix, start_ms: int, gap_ms: float) -> None:
        self.rng = random.Random(seed)
        self.world: World = build_world(seed, mix.rate("near_limit"))
        self.ids = Ids(seed)
        self.count = count
        self.history = int(count * HISTORY_SHARE)
        self.clock = float(start_ms)
        self.gap_ms = gap_ms
        self.emitted = 0  # receipt-topic records yielded
        self.reserved = 0  # receipt-topic records yielded or scheduled
        self.heap: list[tuple[int, int, _Pending]] = []
        self.seq = 0
        self.pair_receipts: Counter[tuple[str, str]] = Counter()
        self.clean_pool: dict[str, deque[Record]] = {
            v.vendor_id: deque(maxlen=DUPLICATE_POOL) for v in self.world.vendors
        }
        self.vendors = self.world.vendors
        self.cum_volume = list(accumulate(v.volume for v in self.vendors))
        self._vendor_materials()
        self._probabilities(mix)

    # --- setup ------------------------------------------------------------------------
    def _vendor_materials(self) -> None:
        mats = self.world.materials
        self.kg: dict[str, list[str]] = {}
        self.convertible: dict[str, list[str]] = {}
        self.coa: dict[str, list[str]] = {}
        self.driftable: dict[str, list[str]] = {}
        for v in self.vendors:
            ids = v.materials
            self.kg[v.vendor_id] = [m for m in ids if mats[m].base_unit == "KG"]
            self.convertible[v.vendor_id] = [m for m in ids if convertible(mats[m].base_unit)]
            self.coa[v.vendor_id] = [m for m in ids if mats[m].requires_coa]
            self.driftable[v.vendor_id] = [
                m for m in ids
                if mats[m].requires_coa and drift_candidates(mats[m], self.world.supply(v.vendor_id, m))
            ]

    def _probabilities(self, mix: FaultMix) -> None:
        # Rates are per receipt-topic record over the whole run. Draws happen once per new
        # delivery (a partial delivery draws once for two records) and only after history.
        partial = mix.rate("partial_delivery")
        per_draw = partial / (2.0 - partial) if partial < 1.0 else 1.0
        records_per_draw = 1.0 + per_draw
        after_history = (self.count - self.history) / self.count if self.count else 1.0
        scale = records_per_draw / after_history if after_history > 0 else 0.0
        self.fault_p = [
            (name, mix.rate(name) * scale, fault_info(name).kind is FaultKind.MALFORMED)
            for name in FAULTS if mix.rate(name) > 0
        ]
        no_fault = max(1.0 - mix.total_fault_rate * records_per_draw, 1e-9)
        self.partial_p = min(per_draw / no_fault, 1.0)
        self.converted_p = min(mix.rate("converted_unit") * records_per_draw / no_fault, 1.0)

    # --- stream -------------------------------------------------------------------------
    def events(self) -> Iterator[SimEvent]:
        for material in self.world.materials.values():
            yield self._emit(_Pending(MATERIAL_SPECS, material.material_id, material.spec_record(0)))
        while self.emitted < self.count:
            yield from self._flush_due()
            if self.emitted >= self.count:
                break
            if self.reserved < self.count:
                yield from self._delivery()
            else:  # only deferred receipts remain to be placed
                yield self._emit(heapq.heappop(self.heap)[2])
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
        return SimEvent(p.topic, p.key, value, p.truth)

    def _receipt_pending(self, receipt: Record, truth: Record) -> _Pending:
        self.reserved += 1
        lag = self.rng.randint(5 * 60_000, 4 * HOUR_MS)
        return _Pending(RECEIPTS, receipt["po_number"], receipt, truth, {"received_at": lag})

    # --- one delivery -------------------------------------------------------------------
    def _vendor(self) -> Vendor:
        return self.rng.choices(self.vendors, cum_weights=self.cum_volume)[0]

    def _draw_fault(self, vendor: Vendor, progress: float) -> str | None:
        m = vendor.multiplier(progress)
        probs = [(name, p if malformed else p * m) for name, p, malformed in self.fault_p]
        total = sum(p for _, p in probs)
        u = self.rng.random() * max(total, 1.0)
        for name, p in probs:
            if u < p:
                return name
            u -= p
        return None

    def _delivery(self) -> Iterator[SimEvent]:
        index = self.emitted
        vendor = self._vendor()
        fault = self._draw_fault(vendor, index / self.count) if index >= self.history else None
        if fault is not None and fault_info(fault).kind is FaultKind.MALFORMED:
            yield from self._malformed(vendor, fault)
            return
        if fault == "duplicate_receipt":
            duplicate = self._duplicate(vendor)
            if duplicate is not None:
                yield self._emit(duplicate)
                return
            fault = None
        drift_material = None
        if fault == "silent_coa_drift":
            drift_material = self._drift_material(vendor)
            if drift_material is None:
                fault = None
        benign = ""
        if fault is None:
            u = self.rng.random()
            if u < self.partial_p and self.reserved + 2 <= self.count:
                benign = "partial_delivery"
            elif u < self.partial_p + self.converted_p:
                benign = "converted_unit"
        draft = self._draft(vendor, fault or benign, drift_material)
        if fault == "silent_coa_drift" and drift_material is not None:
            applied = inject_drift(self.rng, self.world, draft, drift_material)
        elif (fault or benign) in INJECTORS:
            applied = INJECTORS[fault or benign](self.rng, self.world, draft)
        else:
            applied = True
        if not applied:  # cannot happen with a draft shaped by _draft; stay honest anyway
            fault, benign = None, ""
        if benign == "partial_delivery":
            yield from self._partial(draft)
            return
        if not fault and not benign and any(
            self.world.supply(vendor.vendor_id, c["material_id"]).near_limit for c in draft.coas
        ):
            benign = "near_limit"
        self._count_pairs(draft.receipt)
        if fault is None and benign in ("", "near_limit"):
            self.clean_pool[vendor.vendor_id].append(
                {**draft.receipt, "lines": [dict(line) for line in draft.receipt["lines"]]}
            )
        truth = truth_record(draft.receipt["receipt_id"], draft.po_number, vendor.vendor_id, fault, benign)
        yield from self._place(draft, self._receipt_pending(draft.receipt, truth))

    def _draft(self, vendor: Vendor, kind: str, drift_material: str | None) -> Draft:
        need = NEEDS.get(kind)
        first, force_kg = drift_material, False
        if need == "kg":
            first, force_kg = self.rng.choice(self.kg[vendor.vendor_id]), True
        elif need == "convertible":
            first = self.rng.choice(self.convertible[vendor.vendor_id])
        elif need == "coa":
            first = self.rng.choice(self.coa[vendor.vendor_id])
        return build_draft(self.rng, self.ids, self.world, vendor, first=first, force_kg=force_kg)

    def _place(self, draft: Draft, receipt: _Pending) -> Iterator[SimEvent]:
        """Emit a delivery around its receipt: PO and CoAs before it, or deferred after it."""
        after = self.emitted + 1  # due index: right after this receipt
        rng = self.rng
        if draft.publish_po:
            po = _Pending(PURCHASE_ORDERS, draft.po_number, draft.po,
                          lags={"order_date": rng.randint(1 * DAY_MS, 30 * DAY_MS)})
            if rng.random() < RECEIPT_FIRST_SHARE:
                self._defer(po, after + rng.randint(0, 4))
            else:
                yield self._emit(po)
        for coa in draft.coas:
            pending = self._coa_pending(coa)
            if rng.random() < COA_FIRST_SHARE:
                yield self._emit(pending)
            else:
                self._defer(pending, after + rng.randint(0, 3))
        yield self._emit(receipt)

    def _coa_pending(self, coa: Record) -> _Pending:
        lag = self.rng.randint(1 * HOUR_MS, 5 * DAY_MS)
        return _Pending(CERTIFICATES, coa["po_number"], coa, lags={"issued_at": lag})

    def _count_pairs(self, receipt: Record) -> None:
        vendor_id = receipt["vendor_id"]
        for line in receipt["lines"]:
            self.pair_receipts[(vendor_id, line["material_id"])] += 1

    # --- special deliveries -----------------------------------------------------------
    def _partial(self, draft: Draft) -> Iterator[SimEvent]:
        """One PO line delivered in two receipts, both marked partial, summing to the order."""
        rng, vendor = self.rng, draft.vendor
        lines: list[Record] = draft.receipt["lines"]
        line = lines[rng.randrange(len(lines))]
        po_line = draft.po_line(line["po_line"])
        first = float(round(po_line["quantity"] * rng.uniform(0.3, 0.7)))
        line.update(quantity=first, unit=po_line["unit"], partial=True)
        material = self.world.materials[po_line["material_id"]]
        rest = receipt_line(rng, self.ids, vendor, po_line, material, po_line["quantity"] - first)
        rest["partial"] = True
        second = new_receipt(rng, self.ids, vendor, draft.po_number, [rest])
        second_coas = coas_for(rng, self.ids, self.world, vendor, draft.po_number, [rest])
        for receipt in (draft.receipt, second):
            self._count_pairs(receipt)

        truth = truth_record(draft.receipt["receipt_id"], draft.po_number, vendor.vendor_id, None,
                             "partial_delivery")
        yield from self._place(draft, self._receipt_pending(draft.receipt, truth))

        due = self.emitted + rng.randint(2, 30)
        coa_first = [(coa, rng.random() < COA_FIRST_SHARE) for coa in second_coas]
        for coa, first_ in coa_first:
            if first_:
                self._defer(self._coa_pending(coa), due)
        truth2 = truth_record(second["receipt_id"], draft.po_number, vendor.vendor_id, None,
                              "partial_delivery")
        self._defer(self._receipt_pending(second, truth2), due)
        for coa, first_ in coa_first:
            if not first_:
                self._defer(self._coa_pending(coa), due + 1 + rng.randint(0, 3))

    def _duplicate(self, vendor: Vendor) -> _Pending | None:
        """An earlier clean receipt of ``vendor`` booked again under a new receipt id."""
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
                             "duplicate_receipt")
        return self._receipt_pending(receipt, truth)

    def _drift_material(self, vendor: Vendor) -> str | None:
        ready = [
            m for m in self.driftable[vendor.vendor_id]
            if self.pair_receipts[(vendor.vendor_id, m)] >= DRIFT_MIN_HISTORY
        ]
        return self.rng.choice(ready) if ready else None

    def _malformed(self, vendor: Vendor, fault: str) -> Iterator[SimEvent]:
        """A bad receipt-topic record; its PO and CoAs are never published."""
        draft = build_draft(self.rng, self.ids, self.world, vendor)
        receipt, key = draft.receipt, draft.po_number
        lags = {"received_at": self.rng.randint(5 * 60_000, 4 * HOUR_MS)}
        value: Record | bytes = receipt
        truncate = False
        if fault == "malformed_bytes":
            subject = self.ids.next_malformed()
            key = self.rng.choice((key, ""))
            value = garbage_bytes(self.rng, receipt)
        elif fault == "malformed_missing_fields":
            subject, truncate = self.ids.next_malformed(), True
        else:
            subject = receipt["receipt_id"]
            _, lag = make_impossible(self.rng, receipt)
            lags = {} if lag is None else {"received_at": lag}
        truth = truth_record(subject, key, vendor.vendor_id, fault)
        self.reserved += 1
        yield self._emit(_Pending(RECEIPTS, key, value, truth, lags, truncate))


def generate(seed: int, count: int, mix: FaultMix, start_ms: int | None = None, *,
             gap_ms: float = 1000.0) -> Iterator[SimEvent]:
    """The events of simulation run ``seed`` in publish order.

    ``count`` receipt-topic records (receipts, duplicates, partial halves and malformed
    ones) are generated, each with ground truth; specs, POs and CoAs come on top. Receipt
    event times advance ~``gap_ms`` per receipt-topic record from ``start_ms`` (default:
    now, the only wall-clock input). Deterministic for equal arguments.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if gap_ms < 0:
        raise ValueError(f"gap_ms must be >= 0, got {gap_ms}")
    start = int(time.time() * 1000) if start_ms is None else int(start_ms)
    return _Run(seed, count, mix, start, gap_ms).events()
