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
