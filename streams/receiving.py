"""Receiving worker logic: the join state, the document wait and the hand-off to the node.

One processor per worker process. ``handle`` takes the raw Kafka records of the
co-partitioned inputs (POs, receipts, CoAs, all keyed by PO number) and appends the encoded
outputs to ``outbox``; ``sweep`` runs on a timer and decides receipts whose wait expired.
Nothing here knows about Faust: state, specs and the vendor history of other workers are
passed in.

Every record is handled in its own unit of work (``StateUnit``): the outputs are encoded and
the new state serialised before anything is applied, and any exception sends the record to
the dead letters with the state untouched. State, all in the PO's partition:

* ``P|<po>``          the PO revision in force, received totals per line (in the PO's unit)
                      and the last receipt per line;
* ``W|<po>|<rid>@<offset>``  a receipt waiting for its documents (with its deadline);
* ``C|<po>|<lot>``    the merged certificates of a lot not yet received;
* ``R|<po>|<rid>``    a decided receipt id (duplicates, re-delivery after a crash);
* ``L|<po>|<line>|<lot>``  which receipt delivered a lot on a PO line;
* ``O|<topic>|<partition>``  the last input offset handled, committed with its effects.

So no value grows with the number of receipts of a blanket PO. Keys idle for
``po_state_retention_s`` are forgotten (a retention index, not a scan).
"""

from __future__ import annotations

import base64
import collections
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from lotflow.metrics import WorkerMetrics, observe_all
from lotflow.schemas.serde import AvroCodec, DecodeError, SchemaSource
from lotflow.scorers import history
from lotflow.scorers.learner import Learner, LearnerConfig
from lotflow.settings import Settings
from lotflow.streams import topics
from lotflow.streams.producer import Encoder, Message, MessageTooLarge
from lotflow.streams.state import ChangelogTable, StateTooLarge, StateUnit, encode_value
from lotflow.streams.timers import DueIndex
from lotflow.verification import chain
from lotflow.verification import receiving as rules
from lotflow.verification.node import SPOT_CHECK, Evaluation, Reason, Severity, Verdict, VerificationNode, decide
from lotflow.verification.outputs import (
    InputRef,
    Output,
    OutputKind,
    PersonDecision,
    Subject,
    dead_letter,
    outputs_for,
    person_outputs,
)
from lotflow.verification.queues import Queue
from lotflow.verification.validation import InvalidRecord, normalize_coa, normalize_po, normalize_receipt

__all__ = ["InputEvent", "ReceivingProcessor", "build_node", "learner_config"]

NODE = "receiving"
NO_CHART = history.ChartView(0, None, [])
ALL_READ = 2**63 - 1  # documents_read_until when every document published has been read
Record = dict[str, Any]


@dataclass(slots=True)  # not frozen: built per event, and a frozen one costs 3x to build
class InputEvent:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


def learner_config(settings: Settings) -> LearnerConfig:
    return LearnerConfig(accepts_needed=settings.soft_accepts_needed, graded_accepts=settings.soft_graded_accepts,
                         graded_uncontested_accepts=settings.soft_graded_uncontested_accepts,
                         spot_check_share=settings.spot_check_share, label_error_rate=settings.label_error_rate)


def build_node(settings: Settings, learner: Learner | None = None) -> VerificationNode[rules.ReceivingContext]:
    return VerificationNode(
        config=rules.node_config(settings.receiving_verify_threshold, settings.receiving_high_priority_threshold),
        checks=rules.CHECKS,
        features=rules.features,
        learner=learner or Learner(learner_config(settings)),
        identity=rules.identity,
        pattern_keys=rules.pattern_keys,
        describe=rules.DESCRIBE,
    )


QUEUES = frozenset(q.value for q in Queue)


def _core_key(po: str) -> str:
    return f"P|{po}"


def _new_core() -> Record:
    return {"po": None, "po_ref": None, "received": {}, "last": {}, "t": 0}


class RejectedDecision(ValueError):
    """A person's decision the worker does not apply (unknown exception, second decision, malformed)."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


def error_class(exc: BaseException) -> str:
    if isinstance(exc, DecodeError | RejectedDecision):
        return exc.error_class
    if isinstance(exc, InvalidRecord):
        return "INVALID_VALUE"
    if isinstance(exc, MessageTooLarge):
        return "OUTPUT_TOO_LARGE"
    if isinstance(exc, StateTooLarge):
        return "STATE_TOO_LARGE"
    return type(exc).__name__


class ReceivingProcessor:
    def __init__(
        self,
        settings: Settings,
        source: SchemaSource,
        po_state: ChangelogTable,
        vendor_state: ChangelogTable,
        specs: Mapping[str, Record],
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.time,
        documents_read_until: Callable[[int], int] | None = None,
        remote_history: Mapping[str, Any] | None = None,
        emit: Callable[[Message], None] | None = None,
    ) -> None:
        self.settings = settings
        self.node = build_node(settings)
        self.rules = rules.ReceivingRules(settings.quantity_tolerance_pct, settings.price_tolerance_pct)
        self.po_state = po_state
        self.vendor_state = vendor_state
        self.specs = specs
        self.metrics = metrics
        self.clock = clock
        # partition -> the publish time (ms) up to which every PO and CoA of that partition has
        # been read: absence is judged on what was published, not on a backlog.
        self.documents_read_until = documents_read_until or (lambda partition: ALL_READ)
        # Vendor-history slices of partitions other workers own (read from the changelog).
        self.remote_history: Mapping[str, Any] = remote_history if remote_history is not None else {}
        self.encoder = Encoder(settings, source)
        # Where encoded outputs go as soon as their record's unit commits: the worker produces
        # them into the open transaction at once, so the broker takes them while the rest of the
        # batch is computed. Without ``emit`` they wait in ``outbox`` for ``end_batch``.
        self.outbox: list[Message] = []
        self._emit = emit
        self.wait_ms = int(settings.document_wait_s * 1000)
        self.retention_ms = int(settings.po_state_retention_s * 1000)
        self._max_state_bytes = self.encoder.max_bytes
        self._codecs = {spec.full_name(settings): AvroCodec(source, f"{spec.full_name(settings)}-value", spec.schema,
                                                             epoch_millis=True)
                        for spec in (topics.PURCHASE_ORDERS, topics.RECEIPTS, topics.CERTIFICATES, topics.DECISIONS)}
        self._po_topic = topics.PURCHASE_ORDERS.full_name(settings)
        self._audit_topic = topics.AUDIT.full_name(settings)
        self._handlers: dict[str, Callable[[InputEvent, Record, int], None]] = {
            self._po_topic: self._on_purchase_order,
            topics.RECEIPTS.full_name(settings): self._on_receipt,
            topics.CERTIFICATES.full_name(settings): self._on_certificate,
            topics.DECISIONS.full_name(settings): self._on_decision,
        }
        # per partition: (PO key, pending key) by document-wait deadline
        self._deadlines: collections.defaultdict[int, DueIndex] = collections.defaultdict(DueIndex)
        self._expiry = DueIndex()  # state keys by last touch + retention
        # PO key -> its receipts waiting for documents -> what each lacked when it began to wait
        self._waiting: dict[str, dict[str, _Needs | None]] = {}
        self._read_to: dict[tuple[str, int], int] = {}  # input offsets handled in this batch
        self._history_key_cache: dict[str, tuple[Record, list[str]]] = {}
        # (vendor, chart) -> the slices a pooled chart view was computed from, their partitions, and the view
        self._chart_views: dict[tuple[str, str],
                                tuple[list[history.ChartSlice], list[int], history.ChartView]] = {}
        self._marks: dict[tuple[str, int], int] = {}  # the O| marks as committed, read once per partition
        self.replayed = 0
        self.more_due = False  # the last sweep stopped at its limit
        # Counted locally and published once per batch: a prometheus inc takes a lock.
        self._in: collections.Counter[str] = collections.Counter()
        self._out: collections.Counter[tuple[str, str]] = collections.Counter()
        self._dead: collections.Counter[tuple[str, str]] = collections.Counter()
        self._latency = metrics.processing_latency.labels(NODE)
        self._confidence = {d: metrics.confidence.labels(NODE, d) for d in ("VERIFIED", "EXCEPTION")}
        self._state_keys = {table: metrics.state_keys.labels(NODE, table) for table in ("po", "vendor")}
        self._latencies: list[float] = []
        self._confidences: dict[str, list[float]] = {d: [] for d in self._confidence}

    # --- input ------------------------------------------------------------------
    def handle(self, event: InputEvent) -> None:
        """Handle one input record; whatever goes wrong sends it to the dead letters."""
        self._in[event.topic] += 1
        if event.offset <= self._mark(event.topic, event.partition):
            # Re-delivered after a crash: this input's outputs and state were committed in one
            # transaction with this mark, so it was handled; handling it again could only differ.
            self.replayed += 1
            return
        self._read_to[(event.topic, event.partition)] = event.offset
        now_ms = int(self.clock() * 1000)
        try:
            if event.value is None and event.topic == self._po_topic:
                self._on_po_tombstone(event, now_ms)
                return
            record = self._codecs[event.topic].decode(event.value)
            self._handlers[event.topic](event, record, now_ms)
        except Exception as exc:  # every failure of one record is that record's dead letter
            self.dead_letter(event, error_class(exc), _describe(exc), now_ms)

    def _mark(self, topic: str, partition: int) -> int:
        """The last input offset of this partition whose effects are committed (-1: none)."""
        mark = self._marks.get((topic, partition))
        if mark is None:
            value = self.po_state.get(f"O|{topic}|{partition}")
            mark = self._marks[(topic, partition)] = value["o"] if value is not None else -1
        return mark

    def dead_letter(self, event: InputEvent, error_class: str, reason: str, now_ms: int) -> None:
        self._emit_dead_letter(InputRef(event.topic, event.partition, event.offset), event.key, event.value,
                               error_class, reason, now_ms)

    def _emit_dead_letter(self, ref: InputRef, key: bytes | None, value: bytes | None, error_class: str,
                          reason: str, now_ms: int) -> None:
        kind, out_key, record = dead_letter(NODE, ref, key, value, error_class, reason, now_ms)
        self._send([self.encoder.encode(kind, out_key, record)])
        self._dead[(ref.topic, error_class)] += 1

    def _commit(self, unit: StateUnit, outputs: list[Output], partition: int | None = None) -> None:
        """Encode outputs and state first; apply both only if everything fits. Audit records are
        linked into ``partition``'s hash chain and written to that partition of the audit topic."""
        audit = [record for kind, _, record in outputs if kind is OutputKind.AUDIT]
        if audit:
            if partition is None:
                raise ValueError("audit records need the partition of their chain")
            head_key = f"A|{partition}"
            head = unit.get(self.po_state, head_key)
            prev = head["h"] if head else ""
            for record in audit:
                record["prev_hash"] = prev
                record["hash"] = prev = chain.link(prev, record)
            unit.put(self.po_state, partition, head_key, {"h": prev})
        messages = self.encoder.encode_all(outputs)
        if audit:
            for message in messages:
                if message.topic == self._audit_topic:
                    message.partition = partition
        staged = unit.encode()
        now_ms = int(self.clock() * 1000)
        for table, _, key, value, _ in staged:
            # waiting receipts leave by their deadline; input marks and chain heads never
            if value is not None and table is self.po_state and key[0] not in "WOA" and key not in table:
                self._expiry.push(now_ms + self.retention_ms, key)
        unit.apply(staged)
        self._send(messages)
        for kind, _, record in outputs:
            self._out[(kind.value, record.get("decision", ""))] += 1

    def _send(self, messages: list[Message]) -> None:
        if self._emit is None:
            self.outbox.extend(messages)
        else:
            for m in messages:
                self._emit(m)

    def _unit(self) -> StateUnit:
        return StateUnit(self._max_state_bytes)

    def _on_po_tombstone(self, event: InputEvent, now_ms: int) -> None:
        """The ERP deleted the PO: forget its document; waiting receipts wait for a new one."""
        key = _core_key((event.key or b"").decode())
        unit = self._unit()
        core = unit.get(self.po_state, key)
        if core is None or core["po"] is None:
            return
        core["po"], core["po_ref"], core["t"] = None, None, now_ms
        unit.put(self.po_state, event.partition, key, core)
        self._commit(unit, [])

    def _on_purchase_order(self, event: InputEvent, raw: Record, now_ms: int) -> None:
        po = normalize_po(raw, event.key, now_ms)
        key = _core_key(po["po_number"])
        unit = self._unit()
        core = unit.get(self.po_state, key) or _new_core()
        current = core["po"]
        if current is not None and current["revision"] >= po["revision"]:
            return  # an older revision arriving late, or the same one re-delivered, changes nothing
        ref = [event.topic, event.partition, event.offset]
        received, over = rules.revise_po(core["received"], current, po, self.specs, self.rules)
        outputs: list[Output] = []
        for line in over:
            last = core["last"].get(str(line.line_no))
            if last is not None and last["verified"]:
                revised, evaluation = self._revised_below_received(po, ref, line, last, now_ms)
                outputs.extend(revised)
                self._keep_open(unit, event.partition, revised, po["po_number"], last["rid"], evaluation, lines=[],
                                material=next((str(ln["material_id"]) for ln in po["lines"]
                                               if ln["line_no"] == line.line_no), ""),
                                code="PO_REVISED_BELOW_RECEIVED",
                                event_time=po["event_time"])
                last["verified"] = False
        core.update(po=po, po_ref=ref, received=received, t=now_ms)
        unit.put(self.po_state, event.partition, key, core)
        self._commit(unit, outputs, event.partition)
        self._decide_ready(key, event.partition, now_ms)

    def _revised_below_received(self, po: Record, ref: list[Any], line: rules.OverReceived, last: Record,
                                now_ms: int) -> tuple[list[Output], Evaluation]:
        """A revision leaves an already verified receipt over-delivered: an exception for that receipt."""
        reason = Reason("PO_REVISED_BELOW_RECEIVED",
                        f"revision {po['revision']} orders {line.ordered:g} {line.unit} on line {line.line_no}; "
                        f"{line.received:.6g} {line.unit} were already received", Severity.BLOCK,
                        {"po_line": str(line.line_no), "revision": str(po["revision"]),
                         "received": f"{line.received:.6g}", "ordered": f"{line.ordered:.6g}",
                         "tolerance_pct": f"{line.tolerance_pct:g}", "receipt_id": last["rid"]})
        x = {"n_block": 1.0, "reason_po_revised_below_received": 1.0}
        learner = self.node.learner
        confidence = learner.confidence(x)
        evaluation = Evaluation((reason,), x, decide(self.node.config, confidence, [reason]), learner.version,
                                prior_decision="EXCEPTION")
        subject = Subject(
            node=NODE, key=po["po_number"], subject_id=last["rid"], refs=[InputRef(*ref), InputRef(*last["ref"])],
            event_time_ms=po["event_time"], vendor_id=last["vendor"], lot_ids=last["lots"],
            lot_attributes=[{"vendor_id": last["vendor"], "po_number": po["po_number"], "receipt_id": last["rid"],
                             "po_revision": str(po["revision"])} for _ in last["lots"]],
            id_suffix=f":line-{line.line_no}",
        )
        return outputs_for(subject, evaluation, now_ms), evaluation

    def _on_certificate(self, event: InputEvent, raw: Record, now_ms: int) -> None:
        coa = normalize_coa(raw, event.key, now_ms)
        po = coa["po_number"]
        key = f"C|{po}|{coa['vendor_lot']}"
        unit = self._unit()
        lot = unit.get(self.po_state, key)
        merged = rules.merge_coa(lot["v"] if lot else None, coa, [event.topic, event.partition, event.offset])
        unit.put(self.po_state, event.partition, key, {"v": merged, "t": now_ms})
        self._commit(unit, [])
        self._decide_ready(_core_key(po), event.partition, now_ms, lot=coa["vendor_lot"])

    def _on_receipt(self, event: InputEvent, raw: Record, now_ms: int) -> None:
        receipt = normalize_receipt(raw, event.key, now_ms)
        po, rid = receipt["po_number"], receipt["receipt_id"]
        seen = self.po_state.get(f"R|{po}|{rid}")
        if seen is not None and seen["o"] == event.offset:
            # Re-delivered after a crash: its decision was committed in the same transaction as
            # this state, so it is on the broker already; deciding again could only differ.
            return
        key = _core_key(po)
        pending_key = f"{rid}@{event.offset}"
        wait_key = f"W|{po}|{pending_key}"
        if wait_key in self.po_state:
            return  # re-delivered while it waits: it keeps its original deadline
        pending: Record = {"receipt": receipt, "ref": [event.topic, event.partition, event.offset],
                   "ts": event.timestamp_ms, "deadline": now_ms + self.wait_ms, "t": now_ms}
        unit = self._unit()
        core = unit.get(self.po_state, key)
        joined = self._join(core["po"] if core else None, receipt)
        if joined.missing:
            # the original bytes wait with it: a failure when it is decided dead-letters them
            pending["raw"] = base64.b64encode(event.value or b"").decode()
            unit.put(self.po_state, event.partition, wait_key, pending)
            self._commit(unit, [])
            self._deadlines[event.partition].push(pending["deadline"], (key, pending_key))
            self._waiting.setdefault(key, {})[pending_key] = _Needs.of(receipt, joined.missing)
            return
        self._commit(unit, self._decide(unit, key, core or _new_core(), pending, event.partition, joined, now_ms),
                     event.partition)

    # --- deciding ---------------------------------------------------------------
    def _join(self, po_doc: Record | None, receipt: Record) -> _Joined:
        """What the receipt joins with, read from the live state (derive only reads it)."""
        po = receipt["po_number"]
        coas: dict[str, rules.CoaLot] = {}
        owners: dict[tuple[str, str], str] = {}
        for line in receipt["lines"]:
            lot = line["vendor_lot"]
            if lot not in coas:
                doc = self.po_state.get(f"C|{po}|{lot}")
                if doc is not None:
                    coas[lot] = doc["v"]
            owner = self.po_state.get(f"L|{po}|{line['po_line']}|{lot}")
            if owner is not None:
                owners[(str(line["po_line"]), lot)] = owner["r"]
        received_lots = {lot for _, lot in owners}
        missing = rules.missing_documents(receipt, po_doc, self.specs, coas, received_lots)
        return _Joined(coas, owners, missing)

    def _decide_ready(self, key: str, partition: int, now_ms: int, lot: str | None = None,
                      everything: bool = False) -> None:
        """Decide the waiting receipts of this PO that have their documents now; with ``lot``,
        only those that wait for that lot's certificate. A receipt still lacking a document it
        lacked when it began to wait (no certificate yet for a lot, no PO yet) is passed over
        without reading its state: under a backlog most arrivals complete none of them.
        ``everything``: try each one (the specs changed, so what a receipt needs may have too)."""
        waiting = self._waiting.get(key)
        if not waiting:
            return
        po = key[2:]
        # in arrival order: of two bookings of one receipt id, the later one is the duplicate
        for pending_key in sorted(waiting, key=_arrival):
            if pending_key not in waiting:
                continue  # decided (or dropped) by an earlier one of this loop
            needs = waiting[pending_key]
            if needs is not None and not everything:
                if lot is not None and lot not in needs.lot_names:
                    continue
                if not needs.may_be_complete(self.po_state, key, po):
                    continue
            elif lot is not None:
                pending = self.po_state.get(f"W|{po}|{pending_key}")
                if pending is None or all(ln["vendor_lot"] != lot for ln in pending["receipt"]["lines"]):
                    continue
            self._decide_pending(key, pending_key, partition, now_ms)

    def _decide_pending(self, key: str, pending_key: str, partition: int, now_ms: int,
                        read_until: int | None = None) -> bool:
        """Decide one waiting receipt if it can be; False if it must wait on. ``read_until``
        (from the sweep): the documents' publish time read so far, to judge an expired wait."""
        wait_key = f"W|{key[2:]}|{pending_key}"
        pending = self.po_state.get(wait_key)
        if pending is None:
            self._forget_waiting(key, pending_key)
            return True
        try:
            # An expired wait is judged only once its documents' partitions were read past its
            # deadline (checked first: it is cheap, and under a backlog most are not yet).
            expired = read_until is not None
            late = expired and pending["deadline"] <= now_ms and pending["ts"] + self.wait_ms <= read_until
            if expired and not late:
                return False
            unit = self._unit()
            core = unit.get(self.po_state, key)
            joined = self._join(core["po"] if core else None, pending["receipt"])
            if joined.missing and not late:
                waiting = self._waiting.get(key)
                if waiting is not None and pending_key in waiting:  # what it lacks now (specs change)
                    waiting[pending_key] = _Needs.of(pending["receipt"], joined.missing)
                return False
            unit.delete(self.po_state, partition, wait_key)
            self._commit(unit, self._decide(unit, key, core or _new_core(), pending, partition, joined, now_ms),
                         partition)
        except Exception as exc:
            # The receipt goes to the dead letters (with its original bytes) and stops waiting.
            drop = self._unit()
            drop.delete(self.po_state, partition, wait_key)
            ref = pending["ref"]
            kind, out_key, record = dead_letter(NODE, InputRef(*ref), key[2:].encode(),
                                                base64.b64decode(pending["raw"]), error_class(exc),
                                                _describe(exc), now_ms)
            self._commit(drop, [(kind, out_key, record)])
            self._dead[(ref[0], error_class(exc))] += 1
        self._forget_waiting(key, pending_key)
        return True

    def _forget_waiting(self, key: str, pending_key: str) -> None:
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.pop(pending_key, None)
            if not waiting:
                del self._waiting[key]

    def _decide(self, unit: StateUnit, key: str, core: Record, pending: Record, partition: int,
                joined: _Joined, now_ms: int) -> list[Output]:
        """Evaluate one receipt; stage its state changes in ``unit``; return its outputs."""
        receipt, ref = pending["receipt"], pending["ref"]
        po, rid, vendor = receipt["po_number"], receipt["receipt_id"], receipt["vendor_id"]
        profile = self._profile(unit, vendor, partition)
        keys = [k for ln in receipt["lines"] for k in self._history_keys(ln["material_id"])]
        materials = [ln["material_id"] for ln in receipt["lines"]]
        view = history.pooled([profile, *self._other_slices(vendor, partition)], keys, materials)
        own_charts = {k: unit.peek(self.vendor_state, history.chart_key(vendor, partition, k)) for k in keys}
        charts = {k: self._chart_view(vendor, partition, k, own) for k, own in own_charts.items()}
        seen = self.po_state.get(f"R|{po}|{rid}")
        duplicate = seen is not None and seen["o"] != ref[2]
        ctx = rules.derive(receipt, core["po"], core["received"], joined.coas, self.specs, view, self.rules,
                           duplicate_receipt=duplicate, lot_owners=joined.owners, missing=joined.missing,
                           charts=charts)
        evaluation = self.node.evaluate(ctx)
        verdict = evaluation.verdict
        verified = verdict.decision == "VERIFIED"
        refs = [InputRef(*ref)]
        if core.get("po_ref"):
            refs.append(InputRef(*core["po_ref"]))
        for coa in {id(f.coa): f.coa for f in ctx.lines if f.coa is not None}.values():
            # every certificate that went into the decision (split and reissued ones too)
            certs = {tuple(entry[4]) for entry in coa.values()}
            refs.extend(InputRef(*c) for c in sorted(certs))
        # in the PO's unit: what a verified record (or a person's release) carries
        lines = [{"po_line": f.line["po_line"], "material_id": f.line["material_id"],
                  "quantity": f.qty_in_po_unit or 0.0, "unit": f.po_line["unit"] if f.po_line else f.line["unit"],
                  "vendor_lot": f.line["vendor_lot"]} for f in ctx.lines]
        subject = Subject(
            node=NODE, key=po, subject_id=rid, refs=refs, event_time_ms=receipt["event_time"], vendor_id=vendor,
            lot_ids=[ln["vendor_lot"] for ln in receipt["lines"]],
            lot_attributes=[{"vendor_id": vendor, "material_id": ln["material_id"],
                             "quantity": f"{ln['quantity']:g}", "unit": ln["unit"], "po_number": po,
                             "receipt_id": rid} for ln in receipt["lines"]],
            # each only on the record that carries it: lines on verified, the pattern on exceptions
            verified_lines=lines if verified else [],
        )
        if not verified:
            pattern = rules.pattern_of(ctx, verdict.reason)
            subject.pattern = pattern.to_record()
            subject.historical_pattern = rules.pattern_text(ctx, pattern)
            subject.recommended_action = rules.recommendation(pattern, verdict)
        outputs = outputs_for(subject, evaluation, now_ms)
        if not verified:
            assert subject.pattern is not None
            self._keep_open(unit, partition, outputs, po, rid, evaluation, lines=lines,
                            material=subject.pattern["material_id"], code=subject.pattern["reason_code"],
                            event_time=receipt["event_time"])
        elif evaluation.spot_check:
            outputs.extend(self._spot_check(unit, partition, ctx, subject, evaluation, lines, now_ms))
        self._latencies.append(max(0.0, (now_ms - pending["ts"]) / 1000.0))
        self._confidences[verdict.decision].append(verdict.confidence)
        # --- state: this receipt is decided ---
        unit.put(self.po_state, partition, f"R|{po}|{rid}", {"o": ref[2], "t": now_ms})
        lots_by_line: dict[str, list[str]] = {}
        for f in ctx.lines:
            line_no = str(f.line["po_line"])
            lot = f.line["vendor_lot"]
            lots_by_line.setdefault(line_no, []).append(lot)
            if f.coa is not None:
                unit.delete(self.po_state, partition, f"C|{po}|{lot}")
            if f.duplicate_lot_of or duplicate:
                continue  # a double booking adds nothing to what was received
            unit.put(self.po_state, partition, f"L|{po}|{line_no}|{lot}", {"r": rid, "t": now_ms})
            if f.qty_in_po_unit is not None:
                core["received"][line_no] = core["received"].get(line_no, 0.0) + f.qty_in_po_unit
        for line_no, lots in lots_by_line.items():
            core["last"][line_no] = {"rid": rid, "ref": ref, "vendor": vendor, "lots": lots,
                                     "verified": verified}
        core["t"] = now_ms
        unit.put(self.po_state, partition, key, core)
        # The vendor's error rate counts rule failures only: counting every exception would
        # feed the confidence penalty back into itself.
        for chart, part in self._learn_history(vendor, partition, profile, ctx, evaluation, own_charts,
                                               now_ms).items():
            unit.put(self.vendor_state, partition, history.chart_key(vendor, partition, chart), part)
        unit.put(self.vendor_state, partition, f"{vendor}@{partition}", profile)
        return outputs

    def _profile(self, unit: StateUnit, vendor: str, partition: int) -> history.Profile:
        """This partition's slice of the vendor's history, a private copy; chart slices a profile from
        before charts had their own keys still carries move to their keys in ``unit``."""
        profile = unit.get(self.vendor_state, f"{vendor}@{partition}")
        if profile is None:
            return history.empty_profile()
        for chart, part in history.legacy_charts(profile).items():
            key = history.chart_key(vendor, partition, chart)
            if key not in self.vendor_state:  # never over a slice written since (a rolling upgrade)
                unit.put(self.vendor_state, partition, key, part)
        return profile

    def _spot_check(self, unit: StateUnit, partition: int, ctx: rules.ReceivingContext, subject: Subject,
                    evaluation: Evaluation, lines: list[Record], now_ms: int) -> list[Output]:
        """A verified receipt drawn for a person's unbiased label: an exception record for the review
        queue (NORMAL priority; no lot is held, the material has proceeded) and its audit record."""
        spot = rules.ROUTES[SPOT_CHECK]
        reason = Reason(SPOT_CHECK, f"spot check: {100 * self.node.learner.config.spot_check_share:g} % of "
                        "automatically verified receipts go to a person", Severity.INFO, {})
        verdict = Verdict("EXCEPTION", evaluation.verdict.confidence, "NORMAL", spot, reason)
        review = Evaluation((*evaluation.reasons, reason), evaluation.features, verdict, evaluation.model_version,
                            prior_decision=evaluation.prior_decision, soft_codes=evaluation.soft_codes)  # not by rule
        pattern = rules.pattern_of(ctx, reason)
        spot_subject = Subject(node=NODE, key=subject.key, subject_id=subject.subject_id, refs=subject.refs,
                               event_time_ms=subject.event_time_ms, vendor_id=subject.vendor_id,
                               historical_pattern=rules.pattern_text(ctx, pattern), pattern=pattern.to_record(),
                               recommended_action=spot.action, id_suffix=":spot")
        outputs = outputs_for(spot_subject, review, now_ms)
        self._keep_open(unit, partition, outputs, subject.key, subject.subject_id, review, lines=lines,
                        material=pattern.material_id, code=SPOT_CHECK, event_time=subject.event_time_ms,
                        lots=list(subject.lot_ids), attrs=list(subject.lot_attributes), spot=True)
        return outputs

    def _keep_open(self, unit: StateUnit, partition: int, outputs: list[Output], po: str, rid: str,
                   evaluation: Evaluation, *, lines: list[Record], material: str, code: str, event_time: int,
                   lots: list[str] | None = None, attrs: list[Record] | None = None, spot: bool = False) -> None:
        """What a person's decision on this exception needs (``X|<exception id>``), kept while it is
        open: its lots are held until then (a spot check's are not: they proceeded). The features it
        was scored with are kept for the label the decision becomes."""
        exception = next(record for kind, _, record in outputs if kind is OutputKind.EXCEPTIONS)
        if attrs is None:
            attrs = [record["attributes"] for kind, _, record in outputs if kind is OutputKind.LOT_EVENTS]
        material_of_lot = {ln["vendor_lot"]: ln["material_id"] for ln in lines}
        # the control charts a re-baselining accept resets
        charts = sorted({f"{material_of_lot.get(r.evidence.get('vendor_lot', ''), material)}|{r.evidence['property']}"
                         for r in evaluation.reasons if r.code == "SPC_SIGNAL"})
        unit.put(self.po_state, partition, f"X|{exception['id']}", {
            "open": True, "id": exception["id"], "node": exception["node"], "po": po, "rid": rid,
            "vendor": exception["vendor_id"], "lots": list(exception["lot_ids"]) if lots is None else lots,
            "attrs": attrs, "lines": lines, "queue": exception["route_to"], "material": material, "code": code,
            "confidence": exception["confidence"],
            "refs": [[r["topic"], r["partition"], r["offset"]] for r in exception["input_refs"]],
            "event_time": event_time, "t": int(self.clock() * 1000),
            "features": evaluation.features, "soft": list(evaluation.soft_codes),
            "codes": [r.code for r in evaluation.reasons], "spot": spot, "rule": evaluation.by_rule,
            "charts": charts})

    def _on_decision(self, event: InputEvent, raw: Record, now_ms: int) -> None:
        """A person's decision: applied once, to an exception this worker raised and keeps open."""
        resolution = raw["resolution"]
        if resolution not in ("ACCEPT", "CONDITIONAL_ACCEPT", "REJECT", "REASSIGN"):
            raise RejectedDecision("UNSUPPORTED_RESOLUTION", f"resolution {resolution} is not applied by the worker")
        if resolution == "CONDITIONAL_ACCEPT" and not raw.get("condition", "").strip():
            raise RejectedDecision("INVALID_DECISION", "a conditional accept without its condition")
        if resolution == "REASSIGN" and raw.get("reassign_to", "") not in QUEUES:
            raise RejectedDecision("INVALID_DECISION", f"reassign_to {raw.get('reassign_to')!r} is not a queue")
        if not raw["decided_by"] or not 0.0 <= raw["certainty"] <= 1.0:
            raise RejectedDecision("INVALID_DECISION", "a decision needs who decided and a certainty in 0..1")
        key = f"X|{raw['exception_id']}"
        unit = self._unit()
        exception = unit.get(self.po_state, key)
        if exception is None:
            raise RejectedDecision("UNKNOWN_EXCEPTION", f"no open exception {raw['exception_id']} on this partition")
        if not exception["open"]:
            raise RejectedDecision("ALREADY_DECIDED", f"exception {raw['exception_id']} was decided by "
                                   f"{exception['decided_by']} ({exception['decision_id']})")
        role = raw.get("role", "")
        if role not in ("admin", exception["queue"]):
            raise RejectedDecision("WRONG_QUEUE", f"a decision in role {role!r} on an exception in the "
                                   f"{exception['queue']} queue")
        if exception["po"] != raw["subject_key"]:
            raise RejectedDecision("INVALID_DECISION", f"subject {raw['subject_key']!r} is not the exception's "
                                   f"{exception['po']!r}")
        decision = PersonDecision(raw["decision_id"], resolution, raw["decided_by"], raw.get("role", ""),
                                  raw["decided_at"], raw.get("reasoning", ""), raw["certainty"],
                                  raw.get("condition", ""), raw.get("reassign_to", ""),
                                  InputRef(event.topic, event.partition, event.offset))
        outputs = person_outputs(exception, decision, now_ms)
        if resolution == "REASSIGN":
            exception["queue"] = decision.reassign_to
        else:
            exception.update(open=False, decision_id=decision.decision_id, decided_by=decision.decided_by,
                             resolution=resolution)
            vendor = exception["vendor"]
            profile = self._profile(unit, vendor, event.partition)
            history.observe_person_decision(profile, exception["material"], exception["code"], resolution)
            if raw.get("rebaseline") and resolution != "REJECT":
                # "new test method, accept": the charts learn a new reference from the next lots
                for chart in exception.get("charts", ()):
                    unit.put(self.vendor_state, event.partition, history.chart_key(vendor, event.partition, chart),
                             history.rebaseline_chart(now_ms))
            unit.put(self.vendor_state, event.partition, f"{vendor}@{event.partition}", profile)
        exception["t"] = now_ms
        unit.put(self.po_state, event.partition, key, exception)
        self._commit(unit, outputs, event.partition)

    def _other_slices(self, vendor: str, partition: int) -> list[history.Profile]:
        """This vendor's history from every other partition: own ones from the table, the rest as read."""
        out = []
        for q in range(self.settings.partitions):
            if q == partition:
                continue
            key = f"{vendor}@{q}"
            profile = self.vendor_state.get(key)
            if profile is None:
                profile = self.remote_history.get(key)
            if profile is not None:
                out.append(profile)
        return out

    def _chart_view(self, vendor: str, partition: int, chart: str, own: history.ChartSlice | None) -> history.ChartView:
        """The vendor's chart pooled over every partition's slice; pooled again only when a slice
        changed other than by a lot this worker advanced it with (``_advance_view``). Slices are
        replaced, never changed in place (``observe_chart``), and the cache holds the ones it was
        computed from, so identity is their version."""
        slices, parts = self._chart_slices(vendor, partition, chart, own)
        cached = self._chart_views.get((vendor, chart))
        if cached is not None and len(cached[0]) == len(slices) and all(
                a is b for a, b in zip(cached[0], slices, strict=True)):
            return cached[2]
        view = history.chart_view(slices)
        self._chart_views[(vendor, chart)] = (slices, parts, view)
        return view

    def _advance_view(self, vendor: str, partition: int, chart: str, before: history.ChartSlice | None,
                      after: history.ChartSlice, value: float, now_ms: int) -> None:
        """A lot moved this partition's slice from ``before`` to ``after``: the cached pooled view
        follows it without pooling again where it can (``history.advance_view``). Should the lot's
        state not commit, the table keeps ``before`` and the cache, keyed by identity, misses."""
        cached = self._chart_views.get((vendor, chart))
        if cached is None or partition not in cached[1]:
            return
        slices, parts, view = cached
        i = parts.index(partition)
        if slices[i] is not before:
            return
        advanced = history.advance_view(view, before, after, value, now_ms)
        if advanced is not None:
            self._chart_views[(vendor, chart)] = ([*slices[:i], after, *slices[i + 1:]], parts, advanced)

    def _chart_slices(self, vendor: str, partition: int, chart: str,
                      own: history.ChartSlice | None) -> tuple[list[history.ChartSlice], list[int]]:
        """Every partition's slice of one chart, in partition order (the pooled view is the same
        whichever partition asks), and their partitions: ``own`` (this partition's), the rest from
        the table or as read."""
        out = []
        parts = []
        for q in range(self.settings.partitions):
            if q == partition:
                part = own
            else:
                key = history.chart_key(vendor, q, chart)
                part = self.vendor_state.get(key)
                if part is None:
                    part = self.remote_history.get(key)
                if part is None:  # a partition whose profile still carries its slices (written before the split)
                    profile = self.vendor_state.get(f"{vendor}@{q}") or self.remote_history.get(f"{vendor}@{q}")
                    part = profile.get("spc", {}).get(chart) if profile else None
            if part is not None:
                out.append(part)
                parts.append(q)
        return out, parts

    def _history_keys(self, material_id: str) -> list[str]:
        spec = self.specs.get(material_id)
        if spec is None:
            return []
        cached = self._history_key_cache.get(material_id)
        if cached is None or cached[0] is not spec:  # a new spec revision replaces the record
            cached = self._history_key_cache[material_id] = (
                spec, [f"{material_id}|{p['name']}" for p in spec["properties"]])
        return cached[1]

    def _learn_history(self, vendor: str, partition: int, profile: history.Profile, ctx: rules.ReceivingContext,
                       evaluation: Evaluation, own_charts: Mapping[str, history.ChartSlice | None],
                       now_ms: int) -> dict[str, history.ChartSlice]:
        """Update ``profile`` with this decision; returns the chart slices it changed."""
        reasons = evaluation.reasons
        # A rule failure: a hard reason, or a soft one people have not cleared for this vendor (an
        # over-delivery its agreement covers, once people accepted that pattern, is no failure of the
        # vendor's, whatever the confidence: counting it kept the vendor's penalty up and its
        # cleared over-deliveries below the threshold).
        failed = evaluation.by_rule
        history.observe_decision(profile, failed)
        codes = [r.code for r in reasons if r.severity is not Severity.INFO]
        if evaluation.verdict.decision == "EXCEPTION" and evaluation.verdict.reason is None:
            codes.append(rules.LOW_CONFIDENCE_CODE)  # the pattern key of an exception no rule raised
        history.observe_reasons(profile, [f.line["material_id"] for f in ctx.lines], codes)
        changed: dict[str, history.ChartSlice] = {}
        # Only lots that passed the rules shape what "normal" looks like for this vendor (its
        # statistics, the reference windows, the charts' values); a held lot's in-spec values still
        # measure its process, so they count for the process level (``history.observe_chart``). A
        # duplicate receipt's lots, and a lot booked again, were measured once already.
        if failed and ctx.duplicate_receipt_of:
            return changed
        stats = profile["stats"]
        for f in ctx.lines:
            if failed and f.duplicate_lot_of:
                continue  # a lot booked again: its value counted with its first booking
            for c in f.coa_facts:
                if c.value is None or not math.isfinite(c.value):
                    continue
                if failed and (c.chart is None or c.ref_z is None or not c.low <= c.value <= c.high):
                    continue  # a held value counts on a frozen chart, in spec (out of spec is the rule's)
                name = f"{f.line['material_id']}|{c.prop}"
                if not failed:
                    stats[name] = history.observe_value(stats.get(name), c.value)
                before = changed.get(name, own_charts.get(name))
                after = changed[name] = history.observe_chart(
                    before, c.chart or NO_CHART, c.value, now_ms, signalled=bool(c.signals),
                    reference_n=rules.CHART.reference_n, held=failed)
                self._advance_view(vendor, partition, name, before, after, c.value, now_ms)
        return changed

    # --- timers -----------------------------------------------------------------
    def rebuild_indexes(self) -> None:
        """Rebuild the deadline and retention indexes from the table (after recovery or a rebalance)."""
        self._deadlines.clear()
        self._expiry.clear()
        self._waiting.clear()
        self._marks.clear()
        for key, value in self.po_state.items():
            if not value or key[0] in "OA":  # input marks and audit chain heads are never forgotten
                continue
            if key.startswith("W|"):
                _, po, pending_key = key.split("|", 2)
                # what it lacks is learnt again at its first attempt (None: always tried)
                self._waiting.setdefault(_core_key(po), {})[pending_key] = None
                self._deadlines[self.po_state.partition_of(key)].push(value["deadline"], (_core_key(po), pending_key))
                continue
            self._expiry.push(value.get("t", 0) + self.retention_ms, key)

    def recheck_waiting(self) -> None:
        """Documents arrived out of band (a new spec): try every waiting receipt once."""
        now_ms = int(self.clock() * 1000)
        for key, waiting in list(self._waiting.items()):
            some = next(iter(waiting), None)
            if some is not None:
                wait_key = f"W|{key[2:]}|{some}"
                if wait_key in self.po_state:
                    self._decide_ready(key, self.po_state.partition_of(wait_key), now_ms, everything=True)

    def sweep(self, limit: int = 100_000) -> int:
        """Decide receipts whose wait expired; forget state idle past retention. Touches only what is due.

        At most ``limit`` receipts are decided and ``limit`` keys forgotten per call, so one
        transaction stays the size of a batch (a backlog can leave tens of thousands due at
        once); returns how many were decided. ``more_due`` says whether a call should follow."""
        now_ms = int(self.clock() * 1000)
        decided = 0
        self.more_due = False
        for partition, deadlines in self._deadlines.items():
            read_until: int | None = None  # asked once per partition and sweep, only if something is due
            while (item := deadlines.first_due(now_ms)) is not None:
                if decided >= limit:
                    self.more_due = True
                    break
                key, pending_key = cast(tuple[str, str], item)
                wait_key = f"W|{key[2:]}|{pending_key}"
                if pending_key in self._waiting.get(key, ()) and wait_key in self.po_state:
                    if read_until is None:
                        read_until = self.documents_read_until(partition)
                    if not self._decide_pending(key, pending_key, partition, now_ms, read_until):
                        # The documents published before its deadline are not all read yet (a
                        # backlog): it stays first, and the later deadlines of this partition wait.
                        break
                    decided += 1
                else:
                    self._forget_waiting(key, pending_key)
                deadlines.drop_first()
        self._expire(now_ms, limit)
        self.metrics.pending.labels(NODE).set(sum(len(w) for w in self._waiting.values()))
        return decided

    def expire(self, limit: int) -> None:
        """Forget up to ``limit`` keys idle past retention. The worker calls it with every batch,
        inside the batch's transaction: state is forgotten at the pace it is created. (From the
        document-wait timer alone, whose parts wait for the lock between the agent's batches,
        expiry fell behind under a backlog: 110k -> 210k keys within one run at a 20 s retention.)"""
        self._expire(int(self.clock() * 1000), limit)

    def _expire(self, now_ms: int, limit: int) -> None:
        forget = self._unit()
        due = self._expiry.pop_due(now_ms, limit)
        for item in due:
            key = str(item)
            value = self.po_state.get(key)
            if value is None or key[0] in "OA":
                continue
            if key[0] == "X" and value["open"]:
                # an open exception is kept until a person decides it (its lots are held): looked at
                # again a retention later, not every second
                self._expiry.push(now_ms + self.retention_ms, key)
                continue
            touched = value.get("t", 0)
            if touched + self.retention_ms > now_ms or key in self._waiting:
                self._expiry.push(max(touched + self.retention_ms, now_ms + 1000), key)
                continue
            forget.delete(self.po_state, self.po_state.partition_of(key), key)
            if len(due) == limit:
                self.more_due = True  # the part was full and forgot something: more may be due
        self._commit(forget, [])

    def end_batch(self) -> list[Message]:
        """The batch's outputs not emitted yet; stages how far each input partition was handled (``O|`` marks),
        so the marks are committed in the same transaction as the outputs and state they caused."""
        now_ms = int(self.clock() * 1000)
        for (topic, partition), offset in self._read_to.items():
            value = {"o": offset, "t": now_ms}
            self.po_state.apply(partition, f"O|{topic}|{partition}", value, encode_value(value))
            self._marks[(topic, partition)] = offset
        self._read_to.clear()
        out, self.outbox = self.outbox, []
        return out

    def publish_metrics(self) -> None:
        """Move the counts of the last batch into the Prometheus counters."""
        for topic, n in self._in.items():
            self.metrics.records_in.labels(topic).inc(n)
        for (topic, decision), n in self._out.items():
            self.metrics.records_out.labels(topic, decision).inc(n)
        for (topic, error), n in self._dead.items():
            self.metrics.dead_letters.labels(topic, error).inc(n)
        observe_all(self._latency, self._latencies)
        self._latencies.clear()
        for decision, values in self._confidences.items():
            observe_all(self._confidence[decision], values)
            values.clear()
        self._in.clear()
        self._out.clear()
        self._dead.clear()
        self._state_keys["po"].set(len(self.po_state))
        self._state_keys["vendor"].set(len(self.vendor_state))


@dataclass(slots=True)  # not frozen: built per event, and a frozen one costs 3x to build
class _Joined:
    coas: dict[str, rules.CoaLot]
    owners: dict[tuple[str, str], str]
    missing: list[str]


@dataclass(frozen=True, slots=True)
class _Needs:
    """What a waiting receipt lacked at its last full attempt: the PO, and certificates of lots
    (each with the receipt's PO lines that carry it). While one of them is still absent it cannot
    be complete; when all are present it may be (a split certificate may still lack a property:
    the full join decides, and records what it still lacks). Held in memory only: after a
    recovery every waiting receipt is tried in full once."""

    po: bool
    lots: tuple[tuple[str, tuple[str, ...]], ...]  # (vendor lot, its PO lines on this receipt)
    lot_names: frozenset[str]

    @classmethod
    def of(cls, receipt: Record, missing: list[str]) -> _Needs:
        needed = {m[4:] for m in missing if m.startswith("COA:")}
        lines: dict[str, list[str]] = {}
        for line in receipt["lines"]:
            if line["vendor_lot"] in needed:
                lines.setdefault(line["vendor_lot"], []).append(str(line["po_line"]))
        return cls("PO" in missing, tuple((lot, tuple(ls)) for lot, ls in lines.items()), frozenset(lines))

    def may_be_complete(self, state: ChangelogTable, key: str, po: str) -> bool:
        if self.po and key not in state:
            return False
        # a lot needs its certificate unless this PO already received it on one of the receipt's
        # lines (the receipt is then a duplicate, decided without one)
        return all(f"C|{po}|{lot}" in state or any(f"L|{po}|{line}|{lot}" in state for line in lines)
                   for lot, lines in self.lots)


def _arrival(pending_key: str) -> int:
    return int(pending_key.rpartition("@")[2])


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DecodeError | InvalidRecord) else f"{type(exc).__name__}: {exc}"
