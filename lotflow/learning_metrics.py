"""How the learning run is scored: pure functions over the pipeline's outputs and the simulator's truth.

The learning run (``lotflow learning-demo``, ``lotflow/learning_run.py``) publishes simulated
receipts while a simulated reviewer decides the review queue from the ground truth; these
functions turn what came out into per-window learning curves and final figures.

Definitions (one receipt = one ground-truth record; windows are in publish order, i.e. the
truths sorted by event time):

* the **machine's outputs** of a receipt are its verified and exception records written by the
  node (a person's release, ``decision_source`` HUMAN / ``model_version`` ``person:...``, is not
  the machine's) and its dead letters. A decision counts for the first of its input references
  that is a ground-truth record (as in ``lotflow.reconcile``: a PO revision reopening a receipt
  names the revision first);
* a **spot check** is an exception whose reason (or route) is ``SPOT_CHECK``: a random sample of
  receipts that would have been verified, sent to a person while the material proceeds. It counts
  toward the review rate, never as a false alarm, and its material counts as verified (so a fault
  found only by a spot check is a miss of the machine, shown separately as ``spot_check_faults``);
* **held**: any other exception, or a dead letter. **sent to a person**: any exception;
* **review rate** = sent to a person / decided receipts; **false-alarm rate** = clean receipts held
  / decided receipts; **precision of verified** = clean / verified (not held, spot checks included);
  **recall of faults** = faults held / faults (dead-lettered malformed ones are caught);
* **ECE**: 10 equal-width bins of the first output's ``confidence`` against the outcome "clean",
  over the window's receipts that have a confidence (not dead letters);
* **labels** at a receipt: the worker's label count when it decided, ``/L<n>`` in the output's
  ``model_version`` (e.g. ``prior-1+lr/L1234/C1200``), else the number of decisions the reviewer had
  posted before the output's decision time;
* the **prior's false-alarm rate**: from each output's ``prior_decision`` (what the fixed prior
  alone would have decided), over the receipts that carry it (dead letters count as held); None
  when no output carries it.
"""

from __future__ import annotations

import bisect
import collections
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lotflow.scorers.calibration import expected_calibration_error

__all__ = [
    "NEW_PATTERN",
    "SPOT_CHECK",
    "TARGETS",
    "Outcome",
    "final_figures",
    "is_person_output",
    "is_spot_check",
    "join_outcomes",
    "labels_to_catch",
    "parse_labels",
    "target_report",
    "window_metrics",
    "windows",
]

Record = Mapping[str, Any]
Ref = tuple[str, int, int]

SPOT_CHECK = "SPOT_CHECK"
NEW_PATTERN = "SILENT_COA_COMOVEMENT"
LOW_CONFIDENCE = "(low confidence)"  # a held receipt whose reasons are all INFO notes
LABELS_NEEDED = 2000
ECE_BINS = 10
_LABELS = re.compile(r"/L(\d+)")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one receipt, joined with its ground truth."""

    subject_id: str
    is_fault: bool
    fault: str = "NONE"
    benign: str = ""
    decided: bool = True
    held: bool = False  # a (non spot-check) exception or a dead letter
    exception: bool = False  # any exception, spot checks included: sent to a person
    spot_check: bool = False
    dead_letter: bool = False
    confidence: float | None = None
    labels: int | None = None
    labels_from_model: bool = False  # the count came from model_version (not the reviewer's fallback)
    prior_decision: str | None = None  # VERIFIED | EXCEPTION, what the prior alone would have decided
    decision_time_ms: int | None = None
    codes: tuple[str, ...] = ()  # why it was held: the exception's reason codes, or the dead letter's class

    @property
    def verified(self) -> bool:
        """The material proceeds (a spot-checked receipt's too)."""
        return self.decided and not self.held


def parse_labels(model_version: str | None) -> int | None:
    """The label count in a model version (``.../L1234/...``), None if it has none."""
    if not model_version:
        return None
    found = _LABELS.search(model_version)
    return int(found.group(1)) if found else None


def is_person_output(record: Record) -> bool:
    """A verified record a person's decision released (or any output a person authored)."""
    return (record.get("decision_source") == "HUMAN" or bool(record.get("exception_id"))
            or str(record.get("model_version") or "").startswith("person:"))


def is_spot_check(record: Record) -> bool:
    codes = {str(r.get("code", "")).upper() for r in record.get("reasons") or ()}
    return SPOT_CHECK in codes or SPOT_CHECK in str(record.get("route_to") or "").upper()


def _truth_ref(t: Record) -> Ref:
    return (t["source_topic"], int(t["source_partition"]), int(t["source_offset"]))


def _millis(value: Any) -> int:
    return value if isinstance(value, int) else int(value.timestamp() * 1000)


def join_outcomes(truths: Iterable[Record], verified: Iterable[Record], exceptions: Iterable[Record],
                  dead_letters: Iterable[Record], reviewer_posted_ms: Sequence[int] = ()) -> list[Outcome]:
    """One ``Outcome`` per ground-truth record, in publish order (event time, then partition/offset).

    ``reviewer_posted_ms``: when the reviewer posted each decision (epoch ms), the fallback label
    count for outputs whose model_version carries none.
    """
    ordered = sorted(truths, key=lambda t: (_millis(t["event_time"]), t["source_partition"], t["source_offset"]))
    refs = {_truth_ref(t) for t in ordered}
    posted = sorted(reviewer_posted_ms)
    machine: dict[Ref, list[tuple[int, str, Record]]] = {}
    for kind, records in (("VERIFIED", verified), ("EXCEPTION", exceptions)):
        for r in records:
            if is_person_output(r):
                continue
            inputs = [(i["topic"], int(i["partition"]), int(i["offset"])) for i in r.get("input_refs") or ()]
            ref = next((i for i in inputs if i in refs), None)
            if ref is not None:
                machine.setdefault(ref, []).append((_millis(r["decision_time"]), kind, r))
    for r in dead_letters:
        ref = (r["source_topic"], int(r["source_partition"]), int(r["source_offset"]))
        if ref in refs:
            machine.setdefault(ref, []).append((_millis(r["failed_at"]), "DEAD_LETTER", r))
    out = []
    for t in ordered:
        base = Outcome(str(t.get("subject_id", "")), bool(t["is_fault"]), str(t.get("fault") or "NONE"),
                       str(t.get("benign") or ""))
        found = sorted(machine.get(_truth_ref(t), ()), key=lambda x: x[0])
        if not found:
            out.append(replace(base, decided=False))
            continue
        dead = any(kind == "DEAD_LETTER" for _, kind, _ in found)
        spot = any(kind == "EXCEPTION" and is_spot_check(r) for _, kind, r in found)
        held_exception = any(kind == "EXCEPTION" and not is_spot_check(r) for _, kind, r in found)
        scored = [(when, r) for when, kind, r in found if kind != "DEAD_LETTER"]
        first_when, first = scored[0] if scored else (found[0][0], None)
        labels = parse_labels(first.get("model_version")) if first is not None else None
        from_model = labels is not None
        if labels is None:
            labels = bisect.bisect_left(posted, first_when)  # decisions posted strictly before it
        prior = first.get("prior_decision") if first is not None else None
        holding = [r for _, kind, r in found if kind == "EXCEPTION" and not is_spot_check(r)]
        reasons = [reason for r in holding for reason in r.get("reasons") or ()]
        codes = sorted({str(reason.get("code", "")) for reason in reasons})
        if holding and all(str(reason.get("severity", "")) == "INFO" for reason in reasons):
            codes.append(LOW_CONFIDENCE)  # no rule held it: the confidence did (its INFO notes explain)
        codes += sorted({f"DEAD_LETTER:{r.get('error_class', '')}" for _, kind, r in found if kind == "DEAD_LETTER"})
        out.append(replace(
            base, held=dead or held_exception, exception=spot or held_exception, spot_check=spot,
            dead_letter=dead, confidence=float(first["confidence"]) if first is not None else None,
            labels=labels, labels_from_model=from_model, prior_decision=str(prior) if prior else None,
            decision_time_ms=first_when, codes=tuple(codes)))
    return out


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def window_metrics(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The figures of one window of receipts (undecided ones are counted, not scored)."""
    decided = [o for o in outcomes if o.decided]
    n = len(decided)
    clean = [o for o in decided if not o.is_fault]
    faults = [o for o in decided if o.is_fault]
    verified = [o for o in decided if o.verified]
    scored = [o for o in decided if o.confidence is not None]
    with_prior = [o for o in decided if o.prior_decision is not None or o.dead_letter]
    prior_known = any(o.prior_decision is not None for o in decided)
    prior_alarms = sum(1 for o in with_prior if not o.is_fault and (o.dead_letter or o.prior_decision == "EXCEPTION"))
    labels = [o.labels for o in decided if o.labels is not None]
    pattern = [o for o in decided if o.fault == NEW_PATTERN]
    ece = (expected_calibration_error([float(o.confidence) for o in scored if o.confidence is not None],
                                      [not o.is_fault for o in scored], ECE_BINS) if scored else None)
    return {
        "receipts": len(outcomes),
        "decided": n,
        "undecided": len(outcomes) - n,
        "labels_min": min(labels) if labels else None,
        "labels": max(labels) if labels else None,
        "labels_from_model": any(o.labels_from_model for o in decided),
        "faults": len(faults),
        "clean": len(clean),
        "sent_to_person": sum(o.exception for o in decided),
        "spot_checks": sum(o.spot_check for o in decided),
        "held": sum(o.held for o in decided),
        "dead_letters": sum(o.dead_letter for o in decided),
        "verified": len(verified),
        "false_alarms": sum(o.held for o in clean),
        "missed_faults": sum(not o.held for o in faults),
        "spot_check_faults": sum(o.spot_check and not o.held for o in faults),
        "review_rate": _rate(sum(o.exception for o in decided), n),
        "false_alarm_rate": _rate(sum(o.held for o in clean), n),
        "prior_false_alarm_rate": _rate(prior_alarms, len(with_prior)) if prior_known else None,
        "precision_verified": _rate(sum(not o.is_fault for o in verified), len(verified)),
        "recall_faults": _rate(sum(o.held for o in faults), len(faults)),
        "ece": ece,
        "new_pattern_receipts": len(pattern),
        "new_pattern_caught": sum(o.held for o in pattern),
    }


def breakdown(outcomes: Sequence[Outcome]) -> dict[str, dict[str, int]]:
    """What the misses were: the reason codes of false alarms (clean receipts held; one receipt can
    count under several codes) and the ground-truth kinds of missed faults, most frequent first."""
    alarms = collections.Counter(code for o in outcomes if o.decided and o.held and not o.is_fault
                                 for code in o.codes or (LOW_CONFIDENCE,))
    missed = collections.Counter(o.fault for o in outcomes if o.decided and o.is_fault and not o.held)
    return {"false_alarm_reasons": dict(alarms.most_common()), "missed_fault_kinds": dict(missed.most_common())}


def windows(outcomes: Sequence[Outcome], size: int = 1000) -> list[dict[str, Any]]:
    """``window_metrics`` of consecutive slices of ``size`` receipts (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    out = []
    for index, start in enumerate(range(0, len(outcomes), size)):
        chunk = outcomes[start:start + size]
        out.append({"window": index, "first_receipt": start, **window_metrics(chunk)})
    return out


def labels_to_catch(outcomes: Sequence[Outcome], fault: str = NEW_PATTERN, span: int = 20,
                    share: float = 0.9) -> int | None:
    """Labels from the pattern's first receipt to the first of its receipts from which at least
    ``share`` of the next ``span`` (all remaining if fewer) were held for a person; None if never
    (or if the pattern never occurred)."""
    pattern = [o for o in outcomes if o.decided and o.fault == fault]
    if not pattern:
        return None
    start = pattern[0].labels or 0
    for i, o in enumerate(pattern):
        ahead = pattern[i:i + span]
        if sum(x.held for x in ahead) >= share * len(ahead):
            return max(0, (o.labels or 0) - start)
    return None


def final_figures(outcomes: Sequence[Outcome], labels_needed: int = LABELS_NEEDED) -> dict[str, Any]:
    """The figures over the receipts decided once the label count reached ``labels_needed``; if it
    never did, over the last quarter of the receipts (``basis`` says which)."""
    after = [o for o in outcomes if o.decided and o.labels is not None and o.labels >= labels_needed]
    if after:
        basis = f"receipts decided with >= {labels_needed} labels"
        chosen: Sequence[Outcome] = after
    else:
        chosen = outcomes[len(outcomes) - len(outcomes) // 4:] if len(outcomes) >= 4 else outcomes
        basis = f"last quarter of the receipts (the label count never reached {labels_needed})"
    m = window_metrics(chosen)
    return {"basis": basis, "reached_labels": bool(after), "receipts": m["receipts"], "decided": m["decided"],
            "precision_verified": m["precision_verified"], "recall_faults": m["recall_faults"],
            "false_alarm_rate": m["false_alarm_rate"], "prior_false_alarm_rate": m["prior_false_alarm_rate"],
            "review_rate": m["review_rate"], "ece": m["ece"], "spot_checks": m["spot_checks"],
            "spot_check_faults": m["spot_check_faults"], **breakdown(chosen)}


# (name, what, target) — the targets after 2,000 labels
TARGETS: tuple[tuple[str, str, str], ...] = (
    ("precision_verified", "precision of verified", ">= 99.5 %"),
    ("recall_faults", "recall of faults", ">= 99 %"),
    ("false_alarm_rate", "false-alarm rate", "<= 2 %"),
    ("false_alarm_vs_prior", "false-alarm rate vs the prior's", "<= half the prior's"),
    ("ece", "ECE (10 bins)", "<= 0.02"),
    ("new_pattern_labels_to_catch", "new pattern caught within", "<= 200 labels"),
)


def target_report(final: Mapping[str, Any], new_pattern_labels: int | None,
                  new_pattern_seen: bool) -> list[dict[str, Any]]:
    """Each target with its value and ``met`` / ``missed`` / ``n/a`` (no value to judge)."""

    def judge(value: float | None, ok: bool) -> str:
        return "n/a" if value is None else ("met" if ok else "missed")

    precision, recall = final.get("precision_verified"), final.get("recall_faults")
    far, prior, ece = final.get("false_alarm_rate"), final.get("prior_false_alarm_rate"), final.get("ece")
    rows = [
        ("precision_verified", precision, judge(precision, precision is not None and precision >= 0.995)),
        ("recall_faults", recall, judge(recall, recall is not None and recall >= 0.99)),
        ("false_alarm_rate", far, judge(far, far is not None and far <= 0.02)),
        ("false_alarm_vs_prior", prior,
         judge(None if far is None or prior is None else prior, far is not None and prior is not None
               and far <= 0.5 * prior)),
        ("ece", ece, judge(ece, ece is not None and ece <= 0.02)),
    ]
    if not new_pattern_seen:
        rows.append(("new_pattern_labels_to_catch", None, "n/a"))
    else:  # seen but never caught is a miss, not a missing value
        rows.append(("new_pattern_labels_to_catch", new_pattern_labels,
                     "met" if new_pattern_labels is not None and new_pattern_labels <= 200 else "missed"))
    what = {name: (label, target) for name, label, target in TARGETS}
    return [{"name": name, "what": what[name][0], "target": what[name][1], "value": value, "status": status}
            for name, value, status in rows]
