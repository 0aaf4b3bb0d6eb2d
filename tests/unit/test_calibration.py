"""Calibration against scikit-learn's isotonic regression; ECE and the Wilson interval by hand."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from lotflow.scorers.calibration import IsotonicCalibrator, expected_calibration_error, reliability, wilson


def _labelled(rng: random.Random, n: int) -> tuple[list[float], list[bool]]:
    """An over-confident model: the true rate of good is score ** 3."""
    scores = [rng.random() for _ in range(n)]
    return scores, [rng.random() < s ** 3 for s in scores]


def test_isotonic_calibration_matches_scikit_learn() -> None:
    sklearn_isotonic = pytest.importorskip("sklearn.isotonic")
    rng = random.Random(1)
    scores, outcomes = _labelled(rng, 800)
    ours = IsotonicCalibrator()
    for s, good in zip(scores, outcomes, strict=True):
        ours.learn_one(s, good)
    reference = sklearn_isotonic.IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
    reference.fit(scores, [1.0 if g else 0.0 for g in outcomes])
    probes = [i / 200 for i in range(201)] + [-0.5, 1.5] + scores[:50]
    for probe in probes:
        assert ours.predict(probe) == pytest.approx(float(reference.predict([probe])[0]), abs=1e-9)


def test_weighted_isotonic_calibration_matches_scikit_learn_with_sample_weights() -> None:
    """Spot checks stand for several receipts: the weighted fit is scikit-learn's with sample_weight."""
    sklearn_isotonic = pytest.importorskip("sklearn.isotonic")
    rng = random.Random(3)
    scores, outcomes = _labelled(rng, 600)
    weights = [10.0 if rng.random() < 0.1 else 1.0 for _ in scores]
    _assert_weighted_fit_matches(sklearn_isotonic, scores, outcomes, weights,
                                 [i / 100 for i in range(101)] + scores[:40])


def _assert_weighted_fit_matches(sklearn_isotonic: Any, scores: list[float], outcomes: list[bool],
                                 weights: list[float], probes: list[float]) -> IsotonicCalibrator:
    ours = IsotonicCalibrator()
    for s, good, w in zip(scores, outcomes, weights, strict=True):
        ours.learn_one(s, good, w)
    reference = sklearn_isotonic.IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
    reference.fit(scores, [1.0 if g else 0.0 for g in outcomes], sample_weight=weights)
    for probe in probes:
        assert ours.predict(probe) == pytest.approx(float(reference.predict([probe])[0]), abs=1e-9)
    return ours


def test_tied_scores_are_pooled_as_scikit_learn_pools_them() -> None:
    """Receipts with the same features between two labels share a score; the fit must pool them
    (it kept each good one as its own block and showed 1.0 where 90 % were good)."""
    sklearn_isotonic = pytest.importorskip("sklearn.isotonic")
    rng = random.Random(4)
    scores = [rng.choice((0.2, 0.5, 0.5, 0.88, 0.88, 0.88)) for _ in range(900)]
    outcomes = [rng.random() < {0.2: 0.3, 0.5: 0.7, 0.88: 0.9}[s] for s in scores]
    weights = [10.0 if rng.random() < 0.1 else 1.0 for _ in scores]
    probes = [0.0, 0.2, 0.3, 0.5, 0.7, 0.88, 1.0]
    ours = _assert_weighted_fit_matches(sklearn_isotonic, scores, outcomes, weights, probes)
    assert ours.predict(0.88) == pytest.approx(0.9, abs=0.05)
    # a tie group whose first point is bad must not be merged point by point into the one below
    small = IsotonicCalibrator()
    for score, good in ((0.1, True), (0.1, False), (0.5, False), (0.5, True), (0.5, True), (0.5, True)):
        small.learn_one(score, good)
    assert small.predict(0.1) == pytest.approx(0.5) and small.predict(0.5) == pytest.approx(0.75)


def test_calibration_lowers_the_error_of_an_overconfident_model() -> None:
    rng = random.Random(2)
    train_scores, train_outcomes = _labelled(rng, 3000)
    calibrator = IsotonicCalibrator()
    for s, good in zip(train_scores, train_outcomes, strict=True):
        calibrator.learn_one(s, good)
    scores, outcomes = _labelled(rng, 3000)
    before = expected_calibration_error(scores, outcomes)
    after = expected_calibration_error([calibrator.predict(s) for s in scores], outcomes)
    assert before > 0.15 and after < 0.03


def test_reliability_bins_and_ece_by_hand() -> None:
    bins = reliability([0.05, 0.15, 0.15, 0.95, 1.0], [False, True, False, True, True])
    assert [b.count for b in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[1].observed_rate == 0.5 and bins[9].mean_confidence == pytest.approx(0.975)
    # |0 - .05| * 1/5 + |.5 - .15| * 2/5 + |1 - .975| * 2/5
    assert expected_calibration_error([0.05, 0.15, 0.15, 0.95, 1.0], [False, True, False, True, True]) == \
        pytest.approx(0.05 / 5 + 0.35 * 2 / 5 + 0.025 * 2 / 5)
    assert expected_calibration_error([], []) == 0.0


def test_wilson_interval_matches_the_published_example() -> None:
    # Wilson (1927) via Newcombe (1998), example: 81 of 263 -> 0.2553 to 0.3662
    low, high = wilson(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(500, 500)
    assert high == 1.0 and low == pytest.approx(1 / (1 + 1.959963984540054 ** 2 / 500), rel=1e-9)
    assert not math.isnan(wilson(0, 10)[0])


def test_no_labels_leave_the_score_as_it_is_and_non_finite_scores_are_ignored() -> None:
    calibrator = IsotonicCalibrator()
    assert calibrator.predict(0.42) == 0.42
    calibrator.learn_one(float("nan"), True)
    assert len(calibrator) == 0
