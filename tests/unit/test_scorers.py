"""One contract suite for every scorer (River's style), plus the prior's documented behaviour."""

from __future__ import annotations

import copy
import pickle
import random
from collections.abc import Callable
from typing import Any

import pytest

from lotflow.scorers import history
from lotflow.scorers.learner import Learner, LearnerConfig
from lotflow.scorers.model import OnlineConfidence
from lotflow.scorers.prior import CheckPrior

# the prior, the River model on it, and the calibrated learner (calibrating after 20 labels here)
SCORERS: list[Callable[[], Any]] = [CheckPrior, OnlineConfidence,
                                    lambda: Learner(LearnerConfig(min_calibration_labels=20))]


def samples(seed: int, n: int = 200) -> list[tuple[dict[str, float], bool]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        bad = rng.random() < 0.3
        x = {
            "n_block": float(bad),
            "coa_max_abs_z": rng.uniform(5, 9) if bad else rng.uniform(0, 2),
            "vendor_exception_rate": rng.uniform(0, 0.1),
        }
        if rng.random() < 0.5:
            x["price_max_abs_dev"] = rng.uniform(0, 0.05)  # features may appear or vanish
        out.append((x, not bad))
    return out


@pytest.mark.parametrize("make", SCORERS)
def test_probabilities_are_valid(make: Callable[[], Any]) -> None:
    scorer = make()
    for x, y in samples(1):
        p = scorer.predict_proba_one(x)
        assert 0.0 <= p[True] <= 1.0 and p[True] + p[False] == pytest.approx(1.0)
        scorer.learn_one(x, y)


@pytest.mark.parametrize("make", SCORERS)
def test_same_data_same_result_and_prediction_does_not_learn(make: Callable[[], Any]) -> None:
    a, b = make(), make()
    data = samples(2)
    for x, y in data:
        a.learn_one(x, y)
        b.predict_proba_one(x)
        b.learn_one(x, y)
    probe = {"n_block": 0.0, "coa_max_abs_z": 3.0}
    assert a.predict_proba_one(probe) == b.predict_proba_one(probe)
    before = a.predict_proba_one(probe)
    for x, _ in data[:20]:
        a.predict_proba_one(x)
    assert a.predict_proba_one(probe) == before


@pytest.mark.parametrize("make", SCORERS)
def test_scorers_pickle(make: Callable[[], Any]) -> None:
    scorer = make()
    for x, y in samples(3, 50):
        scorer.learn_one(x, y)
    clone = pickle.loads(pickle.dumps(scorer))
    x = {"n_block": 0.0, "coa_max_abs_z": 1.0}
    assert clone.predict_proba_one(x) == scorer.predict_proba_one(x)
    assert clone.version == scorer.version


@pytest.mark.parametrize("make", SCORERS)
def test_empty_features_are_accepted(make: Callable[[], Any]) -> None:
    assert 0.0 <= make().predict_proba_one({})[True] <= 1.0


def test_prior_bands() -> None:
    prior = CheckPrior()
    clean = prior.predict_proba_one({"n_block": 0.0})[True]
    assert clean > 0.98
    assert prior.predict_proba_one({"n_block": 1.0})[True] < 0.75
    assert prior.predict_proba_one({"coa_max_abs_z": 4.0})[True] >= 0.90
    assert prior.predict_proba_one({"coa_max_abs_z": 5.0})[True] < 0.90
    assert prior.predict_proba_one({"vendor_exception_rate": 0.35})[True] < 0.90


def test_online_model_starts_as_the_prior_then_learns_from_labels() -> None:
    model = OnlineConfidence()
    x_good, x_bad = {"coa_max_abs_z": 1.0, "n_block": 0.0}, {"coa_max_abs_z": 3.5, "n_block": 0.0}
    assert model.predict_proba_one(x_bad)[True] == pytest.approx(CheckPrior().predict_proba_one(x_bad)[True])
    assert model.version == "prior-1"
    before = model.predict_proba_one(x_bad)[True]
    for _ in range(200):  # humans keep rejecting lots at z = 3.5 from this kind of vendor
        model.learn_one(copy.copy(x_bad), False)
        model.learn_one(copy.copy(x_good), True)
    assert model.predict_proba_one(x_bad)[True] < before
    assert model.n_labels == 400


def test_welford_history_and_zscore() -> None:
    stat = None
    for v in (10.0, 12.0, 11.0, 9.0, 13.0, 10.0, 11.0, 12.0, 9.0, 13.0):
        stat = history.observe_value(stat, v)
    n, mean, std = history.stat_summary(stat)
    assert (n, mean) == (10, 11.0) and std == pytest.approx(1.4907, rel=1e-3)
    z = history.zscore(stat, 14.0)
    assert z is not None and z == pytest.approx(3 / std)
    assert history.zscore(stat, 14.0, min_history=11) is None


def test_history_slices_pool_to_the_statistics_of_all_values() -> None:
    values = [9.0, 10.0, 11.0, 10.5, 9.5, 10.2, 9.8]
    whole = None
    for v in values:
        whole = history.observe_value(whole, v)
    a = b = None
    for v in values[:3]:
        a = history.observe_value(a, v)
    for v in values[3:]:
        b = history.observe_value(b, v)
    assert a is not None and b is not None and whole is not None
    merged = history.merge_stats([a, b])
    assert merged is not None and merged == pytest.approx(whole)
    view = history.pooled(
        [{"n": 3, "exc": 0.1, "stats": {"m|p": a}}, {"n": 1, "exc": 0.5, "stats": {"m|p": b}}], ["m|p"]
    )
    assert view["n"] == 4 and view["exc"] == pytest.approx(0.2) and view["stats"]["m|p"] == pytest.approx(whole)
