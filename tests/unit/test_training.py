"""``lotflow train``: the sample file, history files, training from rows and labels, the held-out figures."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lotflow.cli import build_parser, main
from lotflow.scorers.learner import Label, Learner, LearnerConfig
from lotflow.settings import Settings
from lotflow.streams.receiving import learner_config
from lotflow.training import (
    HistoryRow,
    make_sample,
    read_history,
    row_from_record,
    train_on_labels,
    train_on_rows,
    write_history,
)

SAMPLE_COUNT = 1500


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "history.csv"
    summary = make_sample(Settings(), path, SAMPLE_COUNT, seed=7, faults="default")
    assert summary.receipts == SAMPLE_COUNT
    assert summary.rows + summary.dead_letters + summary.undecided == SAMPLE_COUNT
    assert summary.undecided == 0  # the final sweep decides every receipt still waiting
    return path


def test_the_sample_has_one_row_per_decided_receipt_with_its_features_and_truth(sample: Path) -> None:
    with sample.open() as f:
        records = list(csv.DictReader(f))
    rows = read_history(sample)
    assert len(rows) == len(records) > 0.95 * SAMPLE_COUNT  # dead-lettered (malformed) receipts are left out
    assert len({r.subject_id for r in rows}) == len(rows)
    assert {rec["decision"] for rec in records} == {"VERIFIED", "EXCEPTION"}
    goods = [r.good for r in rows]
    assert 0.05 < 1 - sum(goods) / len(goods) < 0.3  # faults and clean receipts both present
    faults = {rec["fault"] for rec in records if rec["good"] == "0"}
    assert "NONE" not in faults and {rec["fault"] for rec in records if rec["good"] == "1"} == {"NONE"}
    assert all("prior_logit" in r.features and "n_block" in r.features for r in rows)
    assert all(r.confidence is not None and 0.0 <= r.confidence <= 1.0 for r in rows)
    # features only where the receipt had them: an absent reason is an empty cell, not a 0
    with_reason = [r for r in rows if any(k.startswith("reason_") for k in r.features)]
    assert 0 < len(with_reason) < len(rows)
    assert any(r.soft_codes for r in rows)
    # held by a soft reason people had not cleared (no hard one): their own calibration map
    assert any(r.by_rule and r.features.get("n_block", 0) + r.features.get("n_warn", 0) == 0 for r in rows)


def test_training_on_the_sample_is_calibrated_on_held_out_receipts(sample: Path) -> None:
    rows = read_history(sample)
    result = train_on_rows(rows, learner_config(Settings()), holdout=0.2)
    assert result.held_out == round(0.2 * len(rows)) and result.trained + result.held_out == len(rows)
    assert result.ece is not None and result.brier is not None
    assert result.ece <= 0.05, f"held-out ECE {result.ece:.4f}"
    assert result.brier < 0.1
    assert sum(b.count for b in result.bins) == result.held_out
    learner = result.learner
    assert learner.n_labels == result.trained
    assert learner.labels_offset == -1  # history from outside: workers replay the whole labels topic on top
    restored = Learner.from_bytes(learner.to_bytes())
    assert restored.fingerprint() == learner.fingerprint()
    assert restored.n_labels == learner.n_labels and restored.labels_offset == -1
    some = rows[-1].features
    assert restored.confidence(some) == learner.confidence(some)


def test_the_train_command_prints_the_held_out_ece_and_writes_the_learner(
        sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.bin"
    assert main(["train", "--from-file", str(sample), "--dry-run", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "previous receipts; held-out ECE" in text and "--dry-run: no checkpoint written" in text
    ece = float(text.split("held-out ECE ")[1].split()[0])
    assert ece <= 0.05
    assert Learner.from_bytes(out.read_bytes()).labels_offset == -1
    assert main(["train", "--from-file", str(sample), "--dry-run", "--output", str(out)]) == 2  # no --force
    assert "exists" in capsys.readouterr().err


def test_parquet_history_round_trips(tmp_path: Path) -> None:
    records = [{"subject_id": "R-1", "vendor_id": "V-1", "material_id": "M-1", "soft_codes": ["A", "B"], "good": True,
                "confidence": 0.9, "spot_check": False, "by_rule": True, "n_block": 0.0, "reason_a": 1.0},
               {"subject_id": "R-2", "vendor_id": "V-2", "material_id": "M-2", "soft_codes": "", "good": False,
                "n_block": 2.0}]
    for name in ("h.parquet", "h.csv"):
        write_history(tmp_path / name, records)
        rows = read_history(tmp_path / name)
        assert rows[0] == HistoryRow("V-1", "M-1", ("A", "B"), {"n_block": 0.0, "reason_a": 1.0}, True, 0.9, False,
                                     "R-1", by_rule=True)  # not a feature
        assert rows[1] == HistoryRow("V-2", "M-2", (), {"n_block": 2.0}, False, None, False, "R-2")


@pytest.mark.parametrize("record, message", [
    ({"vendor_id": "V", "material_id": "M"}, "no good"),
    ({"vendor_id": "V", "material_id": "M", "good": "maybe"}, "expected 0/1 or true/false"),
    ({"vendor_id": "V", "material_id": "M", "good": "1", "n_block": "two"}, "not a number"),
    ({"vendor_id": "", "material_id": "M", "good": "1"}, "no vendor_id"),
])
def test_bad_history_rows_are_clear_errors(record: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        row_from_record(record, "f.csv line 2")


def test_history_values_parse() -> None:
    row = row_from_record({"vendor_id": "V", "material_id": "M", "good": "true", "soft_codes": "A; B;",
                           "spot_check": "1", "confidence": "", "x": "1.5", "y": "", "fault": "NONE"}, "here")
    assert row == HistoryRow("V", "M", ("A", "B"), {"x": 1.5}, True, None, True)


def test_unknown_file_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown file type"):
        read_history(tmp_path / "history.xlsx")


def _labels(n: int) -> list[tuple[int, Label]]:
    return [(10 + 2 * i, Label(f"d{i}", "V-1", "M-1", ("QUANTITY_SHORT",), {"n_warn": 1.0, "x": float(i % 3)},
                               i % 3 != 0, 0.6)) for i in range(n)]


def test_training_on_labels_ends_at_the_last_offset_used() -> None:
    labels = _labels(200)
    everything = train_on_labels(labels, LearnerConfig(), holdout=0.0)
    assert everything.learner.labels_offset == labels[-1][0] and everything.learner.n_labels == 200
    assert everything.held_out == 0 and everything.ece is None
    held = train_on_labels(labels, LearnerConfig(), holdout=0.25)
    assert held.trained == 150 and held.held_out == 50
    assert held.learner.labels_offset == labels[149][0]  # workers replay the held-out labels after it
    assert held.ece is not None and held.given_ece is not None


def test_rows_without_confidence_or_prior_logit_get_the_priors() -> None:
    rows = [HistoryRow("V", "M", (), {"n_block": float(i % 2)}, i % 2 == 0) for i in range(10)]
    result = train_on_rows(rows, LearnerConfig(), holdout=0.0)
    assert result.learner.n_labels == 10 and result.learner.labels_offset == -1
    confidences = [c for c, _, _ in result.learner.recent]
    assert confidences[0] > confidences[1]  # the prior: a blocking reason lowers the confidence


def test_the_holdout_must_leave_something(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holdout"):
        train_on_rows([HistoryRow("V", "M", (), {}, True)], LearnerConfig(), holdout=1.0)


def test_train_options_parse() -> None:
    args = build_parser().parse_args(["train", "--make-sample", "s.parquet", "--count", "100", "--faults", "learning"])
    assert (args.make_sample, args.count, args.seed, args.faults) == (Path("s.parquet"), 100, 7, "learning")
    args = build_parser().parse_args(["train", "--from-file", "h.csv", "--holdout", "0.3", "--dry-run"])
    assert (args.from_file, args.holdout, args.dry_run, args.node) == (Path("h.csv"), 0.3, True, "receiving")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--from-file", "h.csv", "--from-clickhouse"])


def test_spot_check_labels_train_where_spot_checks_are_off() -> None:
    config = LearnerConfig(spot_check_share=0.0)  # Learner.learn alone would divide by it
    labels = [(i, Label(f"d{i}", "V", "M", (), {"x": 1.0}, True, 0.9, spot_check=i % 2 == 0)) for i in range(10)]
    result = train_on_labels(labels, config)
    assert result.learner.n_labels == 10 and result.learner.spot == [5, 5]
    assert result.learner.config == config  # the configured settings, back after learning
