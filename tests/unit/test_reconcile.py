"""Accuracy against ground truth: precision of verified, recall of faults."""

from lotflow.reconcile import Decision, score


def truth(offset: int, fault: str = "NONE") -> dict[str, object]:
    return {"source_topic": "r", "source_partition": 0, "source_offset": offset, "fault": fault,
            "is_fault": fault != "NONE"}


def test_precision_recall_and_false_alarms() -> None:
    truths = [truth(0), truth(1), truth(2, "UNIT_MISMATCH"), truth(3, "SILENT_COA_DRIFT"), truth(4, "MALFORMED_BYTES"),
              truth(5)]
    decisions = [
        Decision(("r", 0, 0), "VERIFIED"),
        Decision(("r", 0, 1), "EXCEPTION", ("COA_ATYPICAL",), blocked=False),  # a false alarm
        Decision(("r", 0, 2), "EXCEPTION", ("UNIT_MISMATCH",), blocked=True),
        Decision(("r", 0, 3), "VERIFIED"),  # a missed silent fault
        Decision(("r", 0, 4), "DEAD_LETTER"),
    ]
    board = score(truths, decisions)
    assert (board.records_in, board.verified, board.exceptions, board.dead_letters, board.undecided) == (6, 2, 2, 1, 1)
    assert board.precision_verified == 0.5
    assert board.recall_faults == 2 / 3
    assert board.false_alarm_rate == 1 / 2  # of the two clean receipts that were decided
    assert board.missed == {"SILENT_COA_DRIFT": 1}
    assert board.recall_by_fault["UNIT_MISMATCH"] == 1.0


def test_a_decision_seen_twice_counts_once() -> None:
    board = score([truth(0)], [Decision(("r", 0, 0), "VERIFIED"), Decision(("r", 0, 0), "VERIFIED")])
    assert (board.verified, board.duplicates) == (1, 1)


def test_faults_caught_by_confidence_alone_are_counted() -> None:
    board = score([truth(0, "SILENT_COA_DRIFT")], [Decision(("r", 0, 0), "EXCEPTION", ("COA_ATYPICAL",))])
    assert board.caught_by_model_only == 1 and board.recall_faults == 1.0


def test_a_later_outcome_reopens_a_verified_receipt() -> None:
    # a PO revision after the receipt was verified cuts its line below what was received
    truths = [truth(0, "PO_REVISED_BELOW_RECEIVED"), truth(1)]
    decisions = [
        Decision(("r", 0, 0), "VERIFIED", decision_time_ms=100),
        Decision(("r", 0, 1), "VERIFIED", decision_time_ms=100),
        # the reopening's first input is the PO revision, the receipt comes second
        Decision(("po", 0, 9), "EXCEPTION", ("PO_REVISED_BELOW_RECEIVED",), blocked=True, decision_time_ms=200,
                 input_refs=(("po", 0, 9), ("r", 0, 0))),
    ]
    board = score(truths, decisions)
    assert (board.verified, board.exceptions, board.reopened, board.duplicates) == (1, 1, 1, 0)
    assert board.recall_faults == 1.0 and board.precision_verified == 1.0
    # the latest decision counts whatever the order the outputs are read in
    assert score(truths, list(reversed(decisions))).reopened == 1


def test_silent_recall_and_false_alarms_by_benign_label() -> None:
    truths = [
        {**truth(0, "SILENT_VENDOR_DRIFT"), "silent": True},
        {**truth(1, "SILENT_COA_DRIFT"), "silent": True},
        {**truth(2), "benign": "COA_REISSUED"},
        {**truth(3), "benign": "COA_REISSUED"},
        truth(4),
    ]
    decisions = [
        Decision(("r", 0, 0), "EXCEPTION", ("COA_ATYPICAL",)),
        Decision(("r", 0, 1), "VERIFIED"),
        Decision(("r", 0, 2), "EXCEPTION", ("COA_OUT_OF_SPEC",), blocked=True),
        Decision(("r", 0, 3), "VERIFIED"),
        Decision(("r", 0, 4), "EXCEPTION", ("VENDOR_TREND",)),
    ]
    board = score(truths, decisions)
    assert (board.silent_faults, board.recall_silent) == (2, 0.5)
    assert board.false_alarms_by_benign == {"COA_REISSUED": 1, "CLEAN": 1}


def test_a_spot_check_is_not_the_receipts_decision() -> None:
    from lotflow.reconcile import decision_from_output, is_spot_check

    spot = {"reasons": [{"code": "SPOT_CHECK", "severity": "INFO"}], "input_refs": [], "decision": "EXCEPTION"}
    assert is_spot_check("EXCEPTION", spot) and decision_from_output("EXCEPTION", spot) is None
    assert not is_spot_check("VERIFIED", spot)
