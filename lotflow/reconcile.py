"""Reconciliation and accuracy: join the pipeline's decisions with the simulator's ground truth.

Pure functions over plain records, shared by the demo and the integration tests. A decision
and its ground truth meet on the input record they are about (topic, partition, offset).

A receipt may be decided more than once: re-processing after a crash repeats a decision
(``duplicates``), and a later document can reopen a verified receipt (a PO revision cutting
its line below what was received: the ground truth ``PO_REVISED_BELOW_RECEIVED``); such a
decision's first input is the revision, so a decision counts for the first of its input
references that is a ground-truth record. The
decision that counts is the latest by ``decision_time_ms`` (the last seen on a tie); a
receipt first verified and later raised as an exception counts as ``reopened``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lotflow.verification.node import SPOT_CHECK

__all__ = ["WAIT_REASONS", "Decision", "Scoreboard", "decision_from_output", "is_spot_check", "score"]

Ref = tuple[str, int, int]
WAIT_REASONS = frozenset({"UNKNOWN_PO", "MISSING_COA", "UNKNOWN_MATERIAL"})


@dataclass(frozen=True, slots=True)
class Decision:
    ref: Ref
    outcome: str  # VERIFIED | EXCEPTION | DEAD_LETTER
    reasons: tuple[str, ...] = ()
    blocked: bool = False
    decision_time_ms: int = 0
    input_refs: tuple[Ref, ...] = ()


def is_spot_check(kind: str, record: Mapping[str, Any]) -> bool:
    """A spot check's exception: the receipt was verified (its verified record is its decision); a
    person is only asked to look at it as well."""
    return kind == "EXCEPTION" and any(r["code"] == SPOT_CHECK for r in record.get("reasons", ()))


def decision_from_output(kind: str, record: Mapping[str, Any]) -> Decision | None:
    """Turn a verified / exception / dead-letter record into a Decision (None: a spot check)."""
    if is_spot_check(kind, record):
        return None
    if kind == "DEAD_LETTER":
        ref = (record["source_topic"], record["source_partition"], record["source_offset"])
        return Decision(ref, kind)
    refs = tuple((r["topic"], r["partition"], r["offset"]) for r in record["input_refs"])
    reasons = tuple(r["code"] for r in record["reasons"])
    blocked = any(r["severity"] == "BLOCK" for r in record["reasons"])
    decided = record["decision_time"]
    decided_ms = decided if isinstance(decided, int) else int(decided.timestamp() * 1000)
    return Decision(refs[0], record["decision"], reasons, blocked, decided_ms, refs)


@dataclass
class Scoreboard:
    records_in: int = 0
    verified: int = 0
    exceptions: int = 0
    dead_letters: int = 0
    undecided: int = 0
    duplicates: int = 0
    precision_verified: float = 0.0
    recall_faults: float = 0.0
    false_alarm_rate: float = 0.0
    faults: int = 0
    caught_by_model_only: int = 0
    recall_by_fault: dict[str, float] = field(default_factory=dict)
    exceptions_by_reason: dict[str, int] = field(default_factory=dict)
    missed: dict[str, int] = field(default_factory=dict)
    reopened: int = 0  # verified first, an exception later (the later outcome counts)
    silent_faults: int = 0
    recall_silent: float = 0.0
    false_alarms_by_benign: dict[str, int] = field(default_factory=dict)  # "" -> "CLEAN"


def score(truths: Iterable[Mapping[str, Any]], decisions: Iterable[Decision]) -> Scoreboard:
    """Precision of verified, recall of faults (exception or dead letter), per fault kind."""
    truths = list(truths)
    truth_refs = {(t["source_topic"], t["source_partition"], t["source_offset"]) for t in truths}
    seen: dict[Ref, list[Decision]] = {}
    for d in decisions:
        # A decision is about its first input; a reopening names the document that caused it
        # first and the receipt after it: it counts for the receipt-topic record it names.
        ref = d.ref if d.ref in truth_refs else next((r for r in d.input_refs if r in truth_refs), d.ref)
        seen.setdefault(ref, []).append(d)
    by_ref: dict[Ref, Decision] = {}
    duplicates = reopened = 0
    for ref, all_of_ref in seen.items():
        # the latest decision counts; on equal times the index makes the last one seen win
        _, _, last = max((d.decision_time_ms, n, d) for n, d in enumerate(all_of_ref))
        by_ref[ref] = last
        reopen = last.outcome == "EXCEPTION" and any(d.outcome == "VERIFIED" for d in all_of_ref)
        reopened += reopen
        duplicates += len(all_of_ref) - 1 - reopen  # the same input decided again: re-processing
    board = Scoreboard(duplicates=duplicates, reopened=reopened)
    fault_total: Counter[str] = Counter()
    fault_caught: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    benign_flagged: Counter[str] = Counter()
    verified_good = clean = clean_flagged = silent = silent_caught = 0
    for t in truths:
        board.records_in += 1
        found = by_ref.get((t["source_topic"], t["source_partition"], t["source_offset"]))
        if found is None:
            board.undecided += 1
            continue
        d = found
        if d.outcome == "VERIFIED":
            board.verified += 1
            verified_good += not t["is_fault"]
        elif d.outcome == "EXCEPTION":
            board.exceptions += 1
            reasons.update(d.reasons)
        else:
            board.dead_letters += 1
        if t["is_fault"]:
            fault_total[t["fault"]] += 1
            silent += bool(t.get("silent"))
            if d.outcome != "VERIFIED":
                fault_caught[t["fault"]] += 1
                silent_caught += bool(t.get("silent"))
                if d.outcome == "EXCEPTION" and not d.blocked:
                    board.caught_by_model_only += 1
            else:
                missed[t["fault"]] += 1
        else:
            clean += 1
            if d.outcome != "VERIFIED":
                clean_flagged += 1
                benign_flagged[t.get("benign") or "CLEAN"] += 1
    board.faults = sum(fault_total.values())
    board.precision_verified = verified_good / board.verified if board.verified else 1.0
    board.recall_faults = sum(fault_caught.values()) / board.faults if board.faults else 1.0
    board.false_alarm_rate = clean_flagged / clean if clean else 0.0
    board.recall_by_fault = {f: fault_caught[f] / n for f, n in sorted(fault_total.items())}
    board.exceptions_by_reason = dict(reasons.most_common())
    board.missed = dict(missed.most_common())
    board.silent_faults = silent
    board.recall_silent = silent_caught / silent if silent else 1.0
    board.false_alarms_by_benign = dict(benign_flagged.most_common())
    return board
