"""The learning run's scoring: windows, false alarms, spot checks, ECE, labels, labels-to-catch."""

from __future__ import annotations

from typing import Any

import pytest

from lotflow.learning_metrics import (
    NEW_PATTERN,
    Outcome,
    breakdown,
    final_figures,
    is_person_output,
    is_spot_check,
    join_outcomes,
    labels_to_catch,
    parse_labels,
    target_report,
    window_metrics,
    windows,
)

RECEIPTS = "plant.receipts"


def truth(offset: int, *, fault: str = "NONE", benign: str = "", partition: int = 0) -> dict[str, Any]:
    return {"subject_id": f"R{offset}", "subject_key": "PO1", "vendor_id": "V1", "fault": fault,
            "is_fault": fault != "NONE", "silent": False, "benign": benign, "source_topic": RECEIPTS,
            "source_partition": partition, "source_offset": offset, "event_time": 1_000 + offset}


def output(offset: int, *, confidence: float = 0.95, model_version: str = "prior-1", when: int | None = None,
           reasons: tuple[str, ...] = (), refs: tuple[tuple[str, int, int], ...] = (), **extra: Any) -> dict[str, Any]:
    return {"id": f"receiving:{RECEIPTS}:0:{offset}", "subject_id": f"R{offset}", "confidence": confidence,
            "model_version": model_version, "decision_time": when if when is not None else 10_000 + offset,
            "input_refs": [{"topic": t, "partition": p, "offset": o} for t, p, o in refs or ((RECEIPTS, 0, offset),)],
            "reasons": [{"code": c, "message": "", "severity": "WARN"} for c in reasons], **extra}


def clean(**kw: Any) -> Outcome:
    return Outcome("R", is_fault=False, **kw)


def fault(**kw: Any) -> Outcome:
    return Outcome("R", is_fault=True, fault=kw.pop("fault", "COA_OUT_OF_SPEC"), **kw)


# --- labels ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("version", "labels"), [
    ("prior-1+lr/L1234/C1200", 1234), ("prior-1/L0", 0), ("prior-1", None), ("prior-1+river-lr-40", None),
    ("", None), (None, None), ("x/L7", 7),
])
def test_labels_are_parsed_from_the_model_version(version: str | None, labels: int | None) -> None:
    assert parse_labels(version) == labels


def test_labels_fall_back_to_the_reviewers_decisions_posted_before_the_output() -> None:
    truths = [truth(0), truth(1), truth(2)]
    verified = [output(0, when=100), output(1, when=250, model_version="prior-1+lr/L9/C5"), output(2, when=300)]
    got = join_outcomes(truths, verified, [], [], reviewer_posted_ms=[50, 200, 300, 400])
    assert [o.labels for o in got] == [1, 9, 2]  # strictly before: the decision at 300 is not counted yet
    assert [o.labels_from_model for o in got] == [False, True, False]


# --- join ----------------------------------------------------------------------------------------

def test_join_orders_by_publish_order_and_classifies_outcomes() -> None:
    truths = [truth(3, fault="MALFORMED_BYTES"), truth(1), truth(2, fault="QUANTITY_OVER"), truth(0)]
    got = join_outcomes(truths, [output(1)], [output(2, confidence=0.2, reasons=("QUANTITY_OVER",))],
                        [{"source_topic": RECEIPTS, "source_partition": 0, "source_offset": 3, "failed_at": 5}])
    assert [o.subject_id for o in got] == ["R0", "R1", "R2", "R3"]
    r0, r1, r2, r3 = got
    assert not r0.decided
    assert r1.verified and not r1.exception and r1.confidence == 0.95
    assert r2.held and r2.exception and not r2.spot_check and r2.confidence == 0.2
    assert r3.held and r3.dead_letter and r3.confidence is None and not r3.exception


def test_the_misses_are_broken_down_by_reason_and_fault_kind() -> None:
    truths = [truth(0), truth(1), truth(2, fault="SILENT_COA_DRIFT"), truth(3), truth(4)]
    trend = output(5, reasons=("VENDOR_TREND",))
    trend["reasons"][0]["severity"] = "INFO"  # held by the confidence alone
    exceptions = [output(0, reasons=("QUANTITY_OVER", "SPC_SIGNAL")), output(1, reasons=("SPC_SIGNAL",)),
                  output(4, reasons=("SPOT_CHECK",)), trend]
    got = join_outcomes([*truths, truth(5)], [output(2), output(3), output(4)], exceptions,
                        [{"source_topic": RECEIPTS, "source_partition": 0, "source_offset": 3, "failed_at": 5,
                          "error_class": "SchemaError"}])
    assert got[0].codes == ("QUANTITY_OVER", "SPC_SIGNAL") and got[4].codes == ()  # a spot check holds nothing
    assert got[5].codes == ("VENDOR_TREND", "(low confidence)")
    assert breakdown(got) == {
        "false_alarm_reasons": {"SPC_SIGNAL": 2, "QUANTITY_OVER": 1, "DEAD_LETTER:SchemaError": 1,
                                "VENDOR_TREND": 1, "(low confidence)": 1},
        "missed_fault_kinds": {"SILENT_COA_DRIFT": 1}}
    assert final_figures(got, labels_needed=0)["missed_fault_kinds"] == {"SILENT_COA_DRIFT": 1}


def test_a_persons_release_is_not_the_machines_decision() -> None:
    truths = [truth(0)]
    exception = output(0, confidence=0.5, reasons=("PRICE_ANOMALY",), when=100)
    released = output(0, confidence=0.5, when=200, model_version="person:learner", decision_source="HUMAN",
                      exception_id=exception["id"], refs=(("lotflow.decisions", 0, 7), (RECEIPTS, 0, 0)))
    assert is_person_output(released) and not is_person_output(exception)
    (o,) = join_outcomes(truths, [released], [exception], [])
    assert o.held and not o.verified


def test_spot_checks_are_sent_to_a_person_but_verified() -> None:
    record = output(0, reasons=("SPOT_CHECK",))
    assert is_spot_check(record)
    assert is_spot_check({"reasons": [], "route_to": "spot_check"})
    assert not is_spot_check(output(0, reasons=("PRICE_ANOMALY",)))
    # alone, or next to the verified record of the same receipt
    for verified in ([], [output(0)]):
        (o,) = join_outcomes([truth(0)], verified, [record], [])
        assert o.spot_check and o.exception and not o.held and o.verified


def test_a_decision_counts_for_the_first_input_that_is_a_receipt() -> None:
    reopened = output(0, reasons=("PO_REVISED_BELOW_RECEIVED",), when=500,
                      refs=(("erp.purchase-orders", 0, 4), (RECEIPTS, 0, 0)))
    (o,) = join_outcomes([truth(0, fault="PO_REVISED_BELOW_RECEIVED")], [output(0, when=100)], [reopened], [])
    assert o.held and o.decision_time_ms == 100 and o.confidence == 0.95  # the first output is the decision


def test_prior_decision_is_read_when_present() -> None:
    (o,) = join_outcomes([truth(0)], [output(0, prior_decision="EXCEPTION")], [], [])
    assert o.prior_decision == "EXCEPTION"
    (o,) = join_outcomes([truth(0)], [output(0)], [], [])
    assert o.prior_decision is None


# --- window metrics ------------------------------------------------------------------------------

def test_false_alarm_rate_is_clean_receipts_held_over_all_receipts() -> None:
    w = window_metrics([clean(held=True, exception=True), clean(), clean(), fault(held=True, exception=True)])
    assert w["false_alarm_rate"] == pytest.approx(1 / 4)
    assert w["false_alarms"] == 1
    assert w["review_rate"] == pytest.approx(2 / 4)
    assert w["recall_faults"] == 1.0
    assert w["precision_verified"] == 1.0


def test_spot_checks_count_toward_review_rate_not_false_alarms() -> None:
    w = window_metrics([clean(exception=True, spot_check=True), clean(), clean(), clean()])
    assert w["false_alarm_rate"] == 0.0
    assert w["review_rate"] == pytest.approx(1 / 4)
    assert w["spot_checks"] == 1
    assert w["verified"] == 4


def test_a_fault_found_only_by_a_spot_check_is_a_miss_of_the_machine() -> None:
    w = window_metrics([fault(exception=True, spot_check=True), fault(held=True, exception=True), clean()])
    assert w["recall_faults"] == pytest.approx(1 / 2)
    assert w["spot_check_faults"] == 1
    assert w["precision_verified"] == pytest.approx(1 / 2)


def test_dead_lettered_faults_are_caught_and_undecided_receipts_not_scored() -> None:
    w = window_metrics([fault(fault="MALFORMED_BYTES", held=True, dead_letter=True), clean(),
                        Outcome("R", is_fault=True, decided=False)])
    assert w["recall_faults"] == 1.0
    assert w["decided"] == 2 and w["undecided"] == 1
    assert w["review_rate"] == 0.0  # a dead letter goes to operators, not the review queue


def test_prior_false_alarm_rate_needs_prior_decisions() -> None:
    assert window_metrics([clean(), clean(held=True)])["prior_false_alarm_rate"] is None
    w = window_metrics([clean(prior_decision="EXCEPTION"), clean(prior_decision="VERIFIED"),
                        fault(prior_decision="EXCEPTION", held=True), clean(prior_decision="VERIFIED")])
    assert w["prior_false_alarm_rate"] == pytest.approx(1 / 4)


def test_ece_over_ten_bins() -> None:
    # bin [0.9, 1.0): 10 receipts at 0.95, 9 clean -> |0.9 - 0.95|; bin [0.1, 0.2): 10 at 0.15, all faults
    outcomes = [clean(confidence=0.95) for _ in range(9)] + [fault(confidence=0.95, held=True)]
    outcomes += [fault(confidence=0.15, held=True) for _ in range(10)]
    w = window_metrics(outcomes)
    assert w["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.15)
    assert window_metrics([fault(fault="MALFORMED_BYTES", held=True, dead_letter=True)])["ece"] is None


def test_windows_split_in_publish_order() -> None:
    outcomes = [clean(labels=i) for i in range(2500)]
    ws = windows(outcomes, 1000)
    assert [w["receipts"] for w in ws] == [1000, 1000, 500]
    assert [w["first_receipt"] for w in ws] == [0, 1000, 2000]
    assert [(w["labels_min"], w["labels"]) for w in ws] == [(0, 999), (1000, 1999), (2000, 2499)]
    with pytest.raises(ValueError):
        windows(outcomes, 0)


# --- the new pattern and the final figures -------------------------------------------------------

def pattern(held: bool, labels: int) -> Outcome:
    return fault(fault=NEW_PATTERN, held=held, exception=held, labels=labels)


def test_labels_to_catch_the_new_pattern() -> None:
    missed = [pattern(False, 100 + i) for i in range(10)]
    caught = [pattern(True, 110 + i) for i in range(30)]
    others = [clean(labels=0)]
    # from 100 at its first receipt to 108: from there 18 of the next 20 (90 %) were held
    assert labels_to_catch(others + missed + caught) == 8
    # the run of 20 from the first receipt has 3 misses; from the second, 2 (90 %)
    mixed = [pattern(False, 50)] + [pattern(i not in (3, 11), 60 + i) for i in range(25)]
    assert labels_to_catch(mixed) == 10
    assert labels_to_catch([pattern(False, i) for i in range(30)]) is None
    assert labels_to_catch(others) is None


def test_labels_to_catch_uses_all_remaining_when_fewer_than_twenty() -> None:
    assert labels_to_catch([pattern(False, 0), pattern(False, 5), pattern(True, 40), pattern(True, 41)]) == 40


def test_final_figures_after_the_label_count_is_reached() -> None:
    outcomes = [clean(labels=i, held=i < 1000) for i in range(3000)]
    f = final_figures(outcomes, labels_needed=2000)
    assert f["reached_labels"] and f["receipts"] == 1000 and f["false_alarm_rate"] == 0.0
    g = final_figures(outcomes, labels_needed=5000)
    assert not g["reached_labels"] and g["receipts"] == 750 and "last quarter" in g["basis"]


def test_target_report_marks_each_target_honestly() -> None:
    final = {"precision_verified": 0.999, "recall_faults": 0.95, "false_alarm_rate": 0.01,
             "prior_false_alarm_rate": None, "ece": 0.03}
    rows = {r["name"]: r["status"] for r in target_report(final, None, new_pattern_seen=True)}
    assert rows == {"precision_verified": "met", "recall_faults": "missed", "false_alarm_rate": "met",
                    "false_alarm_vs_prior": "n/a", "ece": "missed", "new_pattern_labels_to_catch": "missed"}
    rows = {r["name"]: r["status"] for r in target_report({**final, "prior_false_alarm_rate": 0.03}, 150, True)}
    assert rows["false_alarm_vs_prior"] == "met" and rows["new_pattern_labels_to_catch"] == "met"
    rows = {r["name"]: r["status"] for r in target_report({**final, "prior_false_alarm_rate": 0.015}, None, False)}
    assert rows["false_alarm_vs_prior"] == "missed" and rows["new_pattern_labels_to_catch"] == "n/a"


# --- the simulated reviewer's answers ------------------------------------------------------------

def test_the_reviewer_answers_from_the_truth_and_flips_deterministically() -> None:
    from lotflow.learning_run import reviewer_decision

    row = {"id": "receiving:plant.receipts:0:1", "confidence": 0.42, "reason_codes": ["PRICE_ANOMALY"]}
    body, flipped = reviewer_decision(row, truth(1), seed=7, error_rate=0.0, certainty=0.9)
    assert (body["resolution"], flipped, body["certainty"], body["confidence_shown"]) == ("ACCEPT", False, 0.9, 0.42)
    assert "rebaseline" not in body and body["reasoning"].strip()
    body, _ = reviewer_decision(row, truth(1, fault="PRICE_ANOMALY"), seed=7, error_rate=0.0, certainty=0.9)
    assert body["resolution"] == "REJECT"
    body, _ = reviewer_decision(row, truth(1, benign="TEST_METHOD_CHANGE"), seed=7, error_rate=0.0, certainty=0.9)
    assert body["resolution"] == "ACCEPT" and body["rebaseline"] is True
    body, flipped = reviewer_decision(row, truth(1), seed=7, error_rate=1.0, certainty=0.9)
    assert body["resolution"] == "REJECT" and flipped
    # about error_rate of the answers are wrong, the same ones every run
    rows = [{"id": f"x{i}", "confidence": 0.5} for i in range(5000)]
    flips = [reviewer_decision(r, truth(0), seed=3, error_rate=0.02, certainty=0.9)[1] for r in rows]
    assert 0.01 < sum(flips) / len(flips) < 0.03
    assert flips == [reviewer_decision(r, truth(0), seed=3, error_rate=0.02, certainty=0.9)[1] for r in rows]
