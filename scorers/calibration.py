"""Is a confidence of 0.87 right 87 % of the time? Calibration, its error, and spot-check precision.

* ``IsotonicCalibrator``: a monotone map from the model's score to the observed rate of good
  hand-offs, fitted by pool-adjacent-violators on the labelled outcomes (the same fit as
  scikit-learn's ``IsotonicRegression(out_of_bounds="clip")``, checked in the tests), refitted
  as labels arrive; predictions interpolate linearly between the fitted points and clip at the
  ends. Labels are few (people's decisions), so a refit over all of them stays cheap.
* ``reliability``: 10 equal-width bins of (mean confidence, observed rate, count) and the
  expected calibration error, sum over bins of count / n x |rate - confidence|.
* ``wilson``: the Wilson score interval of a proportion, for the precision of auto-verification
  estimated from spot checks (unbiased: they are drawn from what would have been verified).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Bin", "IsotonicCalibrator", "expected_calibration_error", "reliability", "wilson"]


class IsotonicCalibrator:
    """Score -> calibrated probability, from (score, outcome) pairs."""

    def __init__(self, max_labels: int = 20_000) -> None:
        self.max_labels = max_labels  # the newest labels kept: the map follows the process as it changes
        self._scores: list[float] = []
        self._outcomes: list[float] = []
        self._weights: list[float] = []
        self._x: list[float] = []  # fitted points: increasing scores
        self._y: list[float] = []  # and their non-decreasing calibrated values

    def __len__(self) -> int:
        return len(self._scores)

    def learn_one(self, score: float, good: bool, weight: float = 1.0) -> None:
        """One labelled outcome; ``weight`` > 1 for a label that stands for several."""
        if not math.isfinite(score) or not weight > 0:
            return
        self._scores.append(score)
        self._outcomes.append(weight if good else 0.0)
        self._weights.append(weight)
        if len(self._scores) > self.max_labels:
            drop = len(self._scores) - self.max_labels
            del self._scores[:drop], self._outcomes[:drop], self._weights[:drop]
        self._x, self._y = [], []  # refitted on the next prediction

    def fit(self) -> None:
        order = sorted(range(len(self._scores)), key=lambda i: self._scores[i])
        # blocks of (sum of outcomes, weight, first score, last score), merged while they violate
        blocks: list[list[float]] = []
        for score, tied in itertools.groupby(order, key=lambda i: self._scores[i]):
            # tied scores are one point, pooled before any merge (as scikit-learn pools them)
            members = list(tied)
            blocks.append([sum(self._outcomes[i] for i in members), sum(self._weights[i] for i in members),
                           score, score])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
                total, weight, _, last = blocks.pop()
                blocks[-1][0] += total
                blocks[-1][1] += weight
                blocks[-1][3] = last
        x: list[float] = []
        y: list[float] = []
        for total, weight, first, last in blocks:
            value = total / weight
            for score in (first, last) if last > first else (first,):
                x.append(score)
                y.append(value)
        self._x, self._y = x, y

    def predict(self, score: float) -> float:
        """The calibrated probability; the score itself while nothing is labelled."""
        if not math.isfinite(score):
            return 0.0  # no score is no confidence
        if not self._scores:
            return score
        if not self._x:
            self.fit()
        x, y = self._x, self._y
        if score <= x[0]:
            return y[0]
        if score >= x[-1]:
            return y[-1]
        i = bisect.bisect_right(x, score)
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        return y0 if x1 == x0 else y0 + (y1 - y0) * (score - x0) / (x1 - x0)


@dataclass(frozen=True, slots=True)
class Bin:
    low: float
    high: float
    count: int
    mean_confidence: float
    observed_rate: float


def reliability(confidences: Sequence[float], outcomes: Sequence[bool], bins: int = 10) -> list[Bin]:
    """Equal-width bins over [0, 1] (a confidence of exactly 1 falls in the last)."""
    sums = [[0, 0.0, 0.0] for _ in range(bins)]
    for confidence, good in zip(confidences, outcomes, strict=True):
        b = min(bins - 1, max(0, int(confidence * bins)))
        sums[b][0] += 1
        sums[b][1] += confidence
        sums[b][2] += 1.0 if good else 0.0
    return [Bin(i / bins, (i + 1) / bins, int(n), c / n if n else 0.0, g / n if n else 0.0)
            for i, (n, c, g) in enumerate(sums)]


def expected_calibration_error(confidences: Sequence[float], outcomes: Sequence[bool], bins: int = 10) -> float:
    total = len(confidences)
    if not total:
        return 0.0
    return sum(b.count / total * abs(b.observed_rate - b.mean_confidence)
               for b in reliability(confidences, outcomes, bins) if b.count)


def wilson(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of successes / trials; (0, 1) without trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
