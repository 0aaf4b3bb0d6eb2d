"""Receiving worker logic: the join state, the document wait and the hand-off to the node.

One processor per worker process. ``handle`` takes the raw Kafka records of the
co-partitioned inputs (POs, receipts, CoAs, all keyed by PO number); ``sweep`` runs on a
timer and decides receipts whose documents arrived late (specs) or never (the wait
expired). The wait deadline is stored with the receipt in the table, so it survives a
restart. Nothing here knows about Faust: state, producer and specs are passed in.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lotflow.metrics import WorkerMetrics
from lotflow.schemas.serde import AvroCodec, DecodeError, SchemaSource
from lotflow.scorers import history
from lotflow.scorers.model import OnlineConfidence
from lotflow.settings import Settings
from lotflow.streams import topics
from lotflow.streams.producer import OutputProducer
from lotflow.streams.state import KeyedState
from lotflow.verification import receiving as rules
from lotflow.verification.node import Severity, VerificationNode
from lotflow.verification.outputs import InputRef, Subject, dead_letter, outputs_for

__all__ = ["InputEvent", "ReceivingProcessor", "build_node"]

NODE = "receiving"
Record = dict[str, Any]


@dataclass(frozen=True, slots=True)
class InputEvent:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


def _ms(value: datetime | int) -> int:
    return value if isinstance(value, int) else int(value.timestamp() * 1000)


def build_node(settings: Settings) -> VerificationNode[rules.ReceivingContext]:
    return VerificationNode(
        config=rules.node_config(settings.receiving_verify_threshold, settings.receiving_high_priority_threshold),
        checks=rules.CHECKS,
        features=rules.features,
        scorer=OnlineConfidence(min_labels=settings.min_labels_for_model),
    )


class ReceivingProcessor:
    def __init__(
        self,
        settings: Settings,
        source: SchemaSource,
        po_state: KeyedState,
        vendor_state: KeyedState,
        specs: Mapping[str, Record],
        producer: OutputProducer,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.time,
        documents_settled: Callable[[int, int], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.node = build_node(settings)
        self.rules = rules.ReceivingRules(settings.quantity_tolerance_pct, settings.price_tolerance_pct)
        self.po_state = po_state
        self.vendor_state = vendor_state
        self.specs = specs
        self.producer = producer
        self.metrics = metrics
        self.clock = clock
        # (partition, until_ms) -> True when every document published before until_ms on this
        # partition has been read: absence is judged on what was published, not on a backlog.
        self.documents_settled = documents_settled or (lambda partition, until_ms: True)
        self.wait_ms = int(settings.document_wait_s * 1000)
        self.retention_ms = int(settings.po_state_retention_s * 1000)
        names = {spec.full_name(settings): spec for spec in (topics.PURCHASE_ORDERS, topics.RECEIPTS,
                                                              topics.CERTIFICATES)}
        self._receipts_topic = topics.RECEIPTS.full_name(settings)
        self._codecs = {name: AvroCodec(source, f"{name}-value", spec.schema) for name, spec in names.items()}
        self._handlers: dict[str, Callable[[InputEvent, Record, int], None]] = {
            topics.PURCHASE_ORDERS.full_name(settings): self._on_purchase_order,
            topics.RECEIPTS.full_name(settings): self._on_receipt,
            topics.CERTIFICATES.full_name(settings): self._on_certificate,
        }
        # Counted locally and published once per batch: a prometheus inc takes a lock.
        self._in: collections.Counter[str] = collections.Counter()
        self._out: collections.Counter[tuple[str, str]] = collections.Counter()
        self._latency = metrics.processing_latency.labels(NODE)
        self._confidence = {d: metrics.confidence.labels(NODE, d) for d in ("VERIFIED", "EXCEPTION")}

    # --- input ------------------------------------------------------------------
    def handle(self, event: InputEvent) -> None:
        """Decode, validate and route one input record; bad input goes to the dead letters."""
        self._in[event.topic] += 1
        now_ms = int(self.clock() * 1000)
        try:
            record = self._codecs[event.topic].decode(event.value)
            if event.topic == self._receipts_topic:
                record = self._normalize_receipt(record)
                rules.validate_receipt(record, now_ms)
        except DecodeError as exc:
            self.dead_letter(event, exc.error_class, str(exc), now_ms)
            return
        except rules.InvalidRecord as exc:
            self.dead_letter(event, "INVALID_VALUE", str(exc), now_ms)
            return
        self._handlers[event.topic](event, record, now_ms)

    def dead_letter(self, event: InputEvent, error_class: str, reason: str, now_ms: int) -> None:
        ref = InputRef(event.topic, event.partition, event.offset)
        spec, key, record = dead_letter(NODE, ref, event.key, event.value, error_class, reason, now_ms)
        self.producer.send(spec, key, record)
        self.metrics.dead_letters.labels(event.topic, error_class).inc()

    @staticmethod
    def _normalize_receipt(r: Record) -> Record:
        return {
            "receipt_id": r["receipt_id"], "po_number": r["po_number"], "vendor_id": r["vendor_id"],
            "received_at": _ms(r["received_at"]), "event_time": _ms(r["event_time"]),
            "lines": [{"po_line": ln["po_line"], "material_id": ln["material_id"], "quantity": ln["quantity"],
                       "unit": ln["unit"], "vendor_lot": ln["vendor_lot"], "unit_price": ln["unit_price"],
                       "partial": ln["partial"]} for ln in r["lines"]],
        }

    def _state(self, key: str) -> Record:
        state = self.po_state.get(key)
        if state is None:
            state = {"po": None, "coas": {}, "receipts": {}, "pending": {}}
        state["touched"] = int(self.clock() * 1000)
        return state

    def _on_purchase_order(self, event: InputEvent, po: Record, now_ms: int) -> None:
        key = po["po_number"]
        state = self._state(key)
        current = state["po"]
        if current is not None and current["revision"] > po["revision"]:
            return  # an older revision arriving late changes nothing
        state["po"] = {
            "po_number": key, "revision": po["revision"], "vendor_id": po["vendor_id"],
            "lines": [{"line_no": ln["line_no"], "material_id": ln["material_id"], "quantity": ln["quantity"],
                       "unit": ln["unit"], "unit_price": ln["unit_price"]} for ln in po["lines"]],
        }
        state["po_ref"] = [event.topic, event.partition, event.offset]
        self._decide_ready(key, event.partition, state, now_ms, expired=False)
        self.po_state.put(event.partition, key, state)

    def _on_certificate(self, event: InputEvent, coa: Record, now_ms: int) -> None:
        key = coa["po_number"]
        state = self._state(key)
        state["coas"][coa["vendor_lot"]] = {
            "values": {v["property"]: v["value"] for v in coa["values"]},
            "ref": [event.topic, event.partition, event.offset],
        }
        self._decide_ready(key, event.partition, state, now_ms, expired=False)
        self.po_state.put(event.partition, key, state)

    def _on_receipt(self, event: InputEvent, receipt: Record, now_ms: int) -> None:
        key = receipt["po_number"]
        state = self._state(key)
        rid = receipt["receipt_id"]
        applied = state["receipts"].get(rid)
        if applied is not None and applied["offset"] == event.offset:
            # Re-delivered after a crash. State is written only after the outputs were acknowledged,
            # so its decision is already on the broker: deciding again could only differ.
            return
        # setdefault: a receipt re-delivered while it waits keeps its original deadline
        state["pending"].setdefault(f"{rid}@{event.offset}", {
            "receipt": receipt, "ref": [event.topic, event.partition, event.offset],
            "ts": event.timestamp_ms, "deadline": now_ms + self.wait_ms,
        })
        self._decide_ready(key, event.partition, state, now_ms, expired=False)
        self.po_state.put(event.partition, key, state)

    # --- deciding ---------------------------------------------------------------
    def _decide_ready(self, key: str, partition: int, state: Record, now_ms: int, expired: bool) -> bool:
        """Decide every pending receipt that has all its documents (or whose wait expired)."""
        changed = False
        for pending_key, p in list(state["pending"].items()):
            receipt = p["receipt"]
            late = expired and p["deadline"] <= now_ms and self.documents_settled(partition, p["ts"] + self.wait_ms)
            if not late and rules.missing_documents(receipt, state["po"], self.specs, state["coas"]):
                continue
            del state["pending"][pending_key]
            self._decide(key, partition, state, receipt, p["ref"], p["ts"], now_ms)
            changed = True
        return changed

    def _decide(self, key: str, partition: int, state: Record, receipt: Record, ref: list[Any],
                input_ts_ms: int, now_ms: int) -> None:
        vendor_key = f"{receipt['vendor_id']}@{partition}"
        profile = self.vendor_state.get(vendor_key) or history.empty_profile()
        # Each partition writes its own slice of a vendor's history; decisions read all the
        # slices this worker holds, so history is not thinned by the partition count.
        slices = [profile] + [p for q in range(self.settings.partitions) if q != partition
                              and (p := self.vendor_state.get(f"{receipt['vendor_id']}@{q}")) is not None]
        keys = [k for ln in receipt["lines"] for k in self._history_keys(ln["material_id"])]
        view = history.pooled(slices, keys)
        ctx = rules.derive(receipt, state, self.specs, view, self.rules, ref[2])
        evaluation = self.node.evaluate(ctx)
        verdict = evaluation.verdict
        refs = [InputRef(*ref)]
        if state.get("po_ref"):
            refs.append(InputRef(*state["po_ref"]))
        for f in ctx.lines:
            if f.coa is not None:
                refs.append(InputRef(*f.coa["ref"]))
        subject = Subject(
            node=NODE, key=key, subject_id=receipt["receipt_id"], refs=refs,
            event_time_ms=receipt["event_time"], vendor_id=receipt["vendor_id"],
            lot_ids=[ln["vendor_lot"] for ln in receipt["lines"]],
            lot_attributes=[{"vendor_id": receipt["vendor_id"], "material_id": ln["material_id"],
                             "quantity": f"{ln['quantity']:g}", "unit": ln["unit"], "po_number": key,
                             "receipt_id": receipt["receipt_id"]} for ln in receipt["lines"]],
            verified_lines=[{"po_line": f.line["po_line"], "material_id": f.line["material_id"],
                             "quantity": f.qty_in_po_unit or 0.0,
                             "unit": f.po_line["unit"] if f.po_line else f.line["unit"],
                             "vendor_lot": f.line["vendor_lot"]} for f in ctx.lines],
            historical_pattern=_historical_pattern(ctx),
        )
        for spec, out_key, record in outputs_for(subject, evaluation, now_ms):
            self.producer.send(spec, out_key, record)
            self._out[(spec.name, verdict.decision)] += 1
        self._latency.observe(max(0.0, (now_ms - input_ts_ms) / 1000.0))
        self._confidence[verdict.decision].observe(verdict.confidence)
        state["receipts"][receipt["receipt_id"]] = {
            "offset": ref[2],
            "qty": {str(f.line["po_line"]): f.qty_in_po_unit or 0.0 for f in ctx.lines},
            "lots": [[str(f.line["po_line"]), f.line["vendor_lot"]] for f in ctx.lines],
        }
        # The vendor's error rate counts rule failures only: counting every exception would
        # feed the confidence penalty back into itself.
        self._learn_history(profile, ctx, any(r.severity is Severity.BLOCK for r in evaluation.reasons))
        self.vendor_state.put(partition, vendor_key, profile)

    def _history_keys(self, material_id: str) -> list[str]:
        spec = self.specs.get(material_id)
        return [f"{material_id}|{p['name']}" for p in spec["properties"]] if spec else []

    @staticmethod
    def _learn_history(profile: history.Profile, ctx: rules.ReceivingContext, failed: bool) -> None:
        history.observe_decision(profile, failed)
        if failed:
            return  # only lots that passed the rules shape what "normal" looks like for this vendor
        stats = profile["stats"]
        for f in ctx.lines:
            for c in f.coa_facts:
                if c.value is not None:
                    name = f"{f.line['material_id']}|{c.prop}"
                    stats[name] = history.observe_value(stats.get(name), c.value)

    # --- timer ------------------------------------------------------------------
    def sweep(self) -> int:
        """Decide receipts whose documents arrived out of band (specs) or whose wait expired."""
        now_ms = int(self.clock() * 1000)
        decided = 0
        waiting = 0
        for key, state in self.po_state.items():
            if not state:
                continue
            if not state["pending"]:
                if now_ms - state.get("touched", now_ms) > self.retention_ms:
                    # Idle past retention: forget it (a tombstone), or state grows with every PO.
                    self.po_state.put(self.po_state.partition_of(key), key, None)
                continue
            partition = self.po_state.partition_of(key)
            before = len(state["pending"])
            if self._decide_ready(key, partition, state, now_ms, expired=True):
                self.po_state.put(partition, key, state)
            decided += before - len(state["pending"])
            waiting += len(state["pending"])
        self.metrics.pending.labels(NODE).set(waiting)
        return decided

    def publish_metrics(self) -> None:
        """Move the counts of the last batch into the Prometheus counters."""
        for topic, n in self._in.items():
            self.metrics.records_in.labels(topic).inc(n)
        for (topic, decision), n in self._out.items():
            self.metrics.records_out.labels(topic, decision).inc(n)
        self._in.clear()
        self._out.clear()


def _historical_pattern(ctx: rules.ReceivingContext) -> str:
    profile = ctx.vendor_profile
    parts = [f"vendor {ctx.receipt['vendor_id']}: {profile['n']} earlier receipts, "
             f"{100 * history.exception_rate(profile):.0f}% recent exceptions"]
    for f in ctx.lines:
        for c in f.coa_facts:
            n, mean, std = c.history
            if n and c.z is not None and abs(c.z) >= rules.ATYPICAL_Z:
                parts.append(f"{c.prop} of {f.line['material_id']}: {mean:.4g} +/- {std:.2g} over {n} lots, "
                             f"this lot {c.value:.4g}")
    return "; ".join(parts)
