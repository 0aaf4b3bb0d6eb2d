"""``lotflow report``: the figures from rows, the curves, the text and the plots (no ClickHouse)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lotflow.cli import build_parser
from lotflow.report import (
    LabelRow,
    aggregate,
    label_curve,
    parse_since,
    plot_learning,
    plot_reliability,
    report_lines,
    review_curve,
)
from lotflow.scorers.calibration import expected_calibration_error, wilson

DECIDED = [("receiving", "V-1", 100), ("receiving", "V-2", 50)]
EXCEPTIONS = [("receiving", "V-1", 20, 4), ("receiving", "V-2", 5, 0)]
LABELS = [
    # V-1: 16 raised exceptions decided (10 accepted = false alarms), 4 spot checks (3 good)
    *(LabelRow("receiving", "V-1", i < 10, False, 0.5) for i in range(16)),
    *(LabelRow("receiving", "V-1", i < 3, True, 0.95) for i in range(4)),
    # V-2: 2 labels, both rejected
    LabelRow("receiving", "V-2", False, False, 0.2), LabelRow("receiving", "V-2", False, False, 0.3),
]


def test_per_vendor_figures() -> None:
    [report] = aggregate(DECIDED, EXCEPTIONS, LABELS).values()
    v1, v2 = report.vendors
    assert (v1.vendor_id, v1.decided, v1.exceptions, v1.spot_checks, v1.labels) == ("V-1", 100, 20, 4, 20)
    assert v1.review_rate == pytest.approx(0.20)
    assert v1.accepted == 10 and v1.false_alarm_rate == pytest.approx(0.10)
    assert (v1.spot_labels, v1.spot_good, v1.spot_precision) == (4, 3, 0.75)
    assert v1.spot_interval == wilson(3, 4)
    confidences = [r.confidence for r in LABELS[:20]]
    assert v1.ece_all == pytest.approx(expected_calibration_error(confidences, [r.good for r in LABELS[:20]]))
    assert v1.ece_spot == pytest.approx(abs(0.95 - 0.75))
    assert v2.review_rate == pytest.approx(0.10) and v2.false_alarm_rate == 0.0
    assert v2.spot_precision is None and v2.ece_spot is None and v2.spot_interval == (0.0, 1.0)
    assert v2.ece_all == pytest.approx(0.25)  # both in their own bins: |0 - 0.2| and |0 - 0.3|


def test_node_totals_add_up_the_vendors() -> None:
    [report] = aggregate(DECIDED, EXCEPTIONS, LABELS).values()
    t = report.total
    assert (t.vendor_id, t.decided, t.exceptions, t.spot_checks, t.labels, t.accepted) == ("*", 150, 25, 4, 22, 10)
    assert t.review_rate == pytest.approx(25 / 150) and t.false_alarm_rate == pytest.approx(10 / 150)
    assert sum(b.count for b in report.bins) == 22 and sum(b.count for b in report.spot_bins) == 4


def test_vendors_seen_in_one_table_only_are_reported() -> None:
    reports = aggregate([("receiving", "V-1", 10)], [], [LabelRow("receiving", "V-9", True, False, 0.4)])
    vendors = {v.vendor_id: v for v in reports["receiving"].vendors}
    assert vendors["V-1"].review_rate == 0.0 and vendors["V-1"].labels == 0
    assert vendors["V-9"].decided == 0 and vendors["V-9"].review_rate is None and vendors["V-9"].labels == 1


def test_nodes_are_kept_apart() -> None:
    reports = aggregate([("receiving", "V-1", 10), ("qc", "V-1", 4)], [("qc", "V-1", 2, 0)], [])
    assert reports["receiving"].total.exceptions == 0 and reports["qc"].total.review_rate == 0.5


def test_empty_tables_give_zeros_and_say_so() -> None:
    reports = aggregate([], [], [], nodes=["receiving"])
    report = reports["receiving"]
    assert report.vendors == [] and report.total.decided == 0 and report.total.review_rate is None
    text = "\n".join(report_lines(report))
    assert "no decided receipts yet" in text and "no labels yet" in text and "drift events: 0" in text


def test_report_lines_show_the_figures() -> None:
    [report] = aggregate(DECIDED, EXCEPTIONS, LABELS).values()
    report.drift_events = None
    text = "\n".join(report_lines(report))
    assert "review rate 16.7%" in text and "false-alarm rate 6.7%" in text
    assert "spot-check precision 75.0% (3/4" in text and "drift events: unknown" in text
    assert any(line.strip().startswith("V-1") and "20.0%" in line for line in text.splitlines())


def test_the_label_curve_rolls_over_the_last_labels() -> None:
    rows = [LabelRow("n", "V", i >= 100, False, 0.5) for i in range(300)]  # accepted only from label 100 on
    curve = label_curve(rows, window=100, points=300)
    assert len(curve) == 300 and curve[-1]["labels"] == 300
    by_n = {p["labels"]: p for p in curve}
    assert by_n[100]["false_alarm_share"] == 0.0 and by_n[200]["false_alarm_share"] == 1.0
    assert by_n[150]["false_alarm_share"] == pytest.approx(0.5)
    assert by_n[100]["ece"] == pytest.approx(0.5)
    assert label_curve([]) == []
    spot_only = label_curve([LabelRow("n", "V", True, True, 0.9)])
    assert spot_only == [{"labels": 1, "false_alarm_share": None, "ece": pytest.approx(0.1)}]


def test_the_review_curve_carries_the_label_count_forward() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    curve = review_curve([(t0 + timedelta(minutes=2), 10, 1, 0), (t0, 20, 5, 40), (t0 + timedelta(minutes=1), 0, 0, 0)])
    assert [p["time"] for p in curve] == [t0, t0 + timedelta(minutes=1), t0 + timedelta(minutes=2)]
    assert [p["review_rate"] for p in curve] == [0.25, None, 0.1]
    assert [p["model_labels"] for p in curve] == [40, 40, 40]


def test_since_takes_dates_times_and_spans() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("2026-02-01", now) == datetime(2026, 2, 1, tzinfo=UTC)
    assert parse_since("2026-02-01T10:00:00+01:00", now) == datetime(2026, 2, 1, 9, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since"):
        parse_since("last week", now)


def test_the_plots_are_written(tmp_path: Path) -> None:
    reports = aggregate(DECIDED, EXCEPTIONS, LABELS)
    assert plot_reliability(reports, tmp_path / "r.png")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    reviews = {"receiving": review_curve([(t0 + timedelta(minutes=i), 10, 10 - i, 3 * i) for i in range(10)])}
    assert plot_learning({"receiving": label_curve(LABELS)}, reviews, tmp_path / "l.png")
    for name in ("r.png", "l.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = aggregate([], [], [], nodes=["receiving"])
    assert not plot_reliability(empty, tmp_path / "none.png") and not plot_learning({}, {}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_report_options_parse() -> None:
    args = build_parser().parse_args(["report", "--node", "receiving", "--since", "7d", "--json"])
    assert (args.node, args.since, args.json, args.no_checkpoint) == ("receiving", "7d", True, False)
