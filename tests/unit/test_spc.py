"""Control charts against their textbook run lengths (Montgomery, Introduction to Statistical
Quality Control, tables 9.3 and 9.11), and the chart state's behaviour on a drifting vendor."""

from __future__ import annotations

import random

import pytest

from lotflow.scorers.spc import ChartConfig, Signal, cusum_step, empty_chart, ewma_limit, observe, rebaseline, scan


def _cusum_run_length(rng: random.Random, shift: float, k: float = 0.5, h: float = 5.0) -> int:
    high = low = 0.0
    n = 0
    while True:
        n += 1
        high, low = cusum_step(high, low, rng.gauss(shift, 1.0), k)
        if high > h or low > h:
            return n


def _ewma_run_length(rng: random.Random, shift: float, lam: float, width: float) -> int:
    ewma, n = 0.0, 0
    while True:
        n += 1
        ewma = lam * rng.gauss(shift, 1.0) + (1 - lam) * ewma
        if abs(ewma) > ewma_limit(lam, width, 10_000):  # the asymptotic limit, as the tables use
            return n


@pytest.mark.parametrize(("shift", "arl", "runs", "tolerance"), [(0.0, 465.0, 1500, 0.08), (1.0, 10.4, 4000, 0.05),
                                                                 (2.0, 4.01, 4000, 0.05)])
def test_tabular_cusum_has_the_textbook_average_run_lengths(shift: float, arl: float, runs: int,
                                                             tolerance: float) -> None:
    rng = random.Random(7)
    measured = sum(_cusum_run_length(rng, shift) for _ in range(runs)) / runs
    assert measured == pytest.approx(arl, rel=tolerance)


@pytest.mark.parametrize(("shift", "arl", "runs", "tolerance"), [(0.0, 500.0, 1500, 0.08), (1.0, 10.2, 4000, 0.06)])
def test_ewma_has_the_textbook_average_run_lengths(shift: float, arl: float, runs: int, tolerance: float) -> None:
    rng = random.Random(11)
    measured = sum(_ewma_run_length(rng, shift, 0.2, 2.962) for _ in range(runs)) / runs
    assert measured == pytest.approx(arl, rel=tolerance)


def test_a_drift_cannot_drag_the_frozen_reference_along() -> None:
    rng = random.Random(3)
    config = ChartConfig(reference_n=30)
    chart = empty_chart()
    for _ in range(30):
        assert observe(chart, rng.gauss(50.0, 1.0), config) == []  # the reference fills
    assert chart["frozen"]
    reference = list(chart["ref"])
    signals = []
    lots = 0
    while not signals and lots < 200:  # a slow drift: +0.05 sigma a lot, always inside any spec
        lots += 1
        signals = observe(chart, rng.gauss(50.0 + 0.05 * lots, 1.0), config)
    assert signals and lots < 60
    assert chart["ref"] == reference  # the baseline did not move with the drift
    first = signals[0]
    assert first.evidence["reference_n"] == "30" and float(first.evidence["reference_mean"]) == pytest.approx(50, abs=1)
    rebaseline(chart)  # a person accepts the new level: a new reference window
    assert not chart["frozen"] and chart["ref"] == [0, 0.0, 0.0]


def test_a_doubled_spread_is_seen_by_the_variance_chart() -> None:
    rng = random.Random(5)
    config = ChartConfig(reference_n=30)
    chart = empty_chart()
    for _ in range(30):
        observe(chart, rng.gauss(0.0, 1.0), config)
    hits: list[str] = []
    lots = 0
    while "CUSUM_VARIANCE" not in hits and lots < 300:
        lots += 1
        hits = [s.chart for s in observe(chart, rng.gauss(0.0, 2.0), config)]
    assert "CUSUM_VARIANCE" in hits and lots < 40


def test_nelson_rule_1_fires_beyond_its_point_limit() -> None:
    reference = [50.0, 10.0, 49.0]  # n, mean, m2: sigma 1
    shewhart = ChartConfig(charts=frozenset({"NELSON_1"}))
    wide = ChartConfig(charts=frozenset({"NELSON_1"}), point_limit=4.0)
    assert [s.chart for s in scan(reference, [10.0, 13.5], shewhart)] == ["NELSON_1"]
    assert scan(reference, [10.0, 13.5], wide) == []
    [signal] = scan(reference, [10.0, 5.5], wide)
    assert signal.chart == "NELSON_1" and signal.evidence["z"] == "-4.5"
    assert "-4.5 sigma from the reference mean" in signal.message


def test_run_rules_and_the_message_a_reviewer_reads() -> None:
    config = ChartConfig(reference_n=4)
    chart = empty_chart()
    for value in (9.0, 11.0, 9.0, 11.0):  # mean 10, sigma ~1.15
        observe(chart, value, config)
    signals = observe(chart, 15.0, config)
    assert {s.chart for s in signals} >= {"NELSON_1"}
    chart2 = empty_chart()
    for value in (9.0, 11.0, 9.0, 11.0):
        observe(chart2, value, config)
    seen: set[str] = set()
    for value in (10.2, 10.3, 10.4, 10.5, 10.6, 10.7, 10.8):  # steadily rising, small steps
        seen |= {s.chart for s in observe(chart2, value, config)}
    assert "NELSON_3" in seen
    assert observe(empty_chart(), float("nan")) == []


@pytest.mark.parametrize(("scale", "arl", "runs"), [(1.0, 500.0, 1500), (2.0, 6.7, 4000)])
def test_the_variance_cusum_has_the_run_lengths_its_docstring_gives(scale: float, arl: float, runs: int) -> None:
    rng = random.Random(13)
    config = ChartConfig()

    def run_length() -> int:
        s, n = 0.0, 0
        while True:
            n += 1
            z = rng.gauss(0.0, scale)
            s = max(0.0, z * z - config.variance_k + s)
            if s > config.variance_h:
                return n

    assert sum(run_length() for _ in range(runs)) / runs == pytest.approx(arl, rel=0.1)


def _scan_by_observe(reference: list[float], values: list[float], config: ChartConfig) -> list[Signal]:
    chart = empty_chart()
    chart["ref"], chart["frozen"] = list(reference), True
    signals: list[Signal] = []
    for value in values:
        signals = observe(chart, value, config)
    return signals


@pytest.mark.parametrize("config", [ChartConfig(), ChartConfig(h=7.0, variance_h=14.0, clip_z=3.0,
                                                                charts=frozenset({"CUSUM_MEAN", "CUSUM_VARIANCE",
                                                                                  "NELSON_3"}))])
def test_scan_over_pooled_values_signals_exactly_as_the_running_chart(config: ChartConfig) -> None:
    # scan (the worker's path: charts run again over a window of recent values, numbers only
    # until the newest value) must give the very signals, with their evidence, of observe
    rng = random.Random(5)
    reference = [50.0, 10.0, 49.0 * 4.0]  # n, mean, m2: sigma 2
    compared = signalled = 0
    for _ in range(3000):
        shift, spread = rng.choice([0.0, 0.0, 1.0, 2.5, -3.0]), rng.choice([1.0, 1.0, 2.0])
        values = [rng.gauss(10.0 + shift * 2.0 * i / 20, 2.0 * spread) for i in range(rng.randint(1, 20))]
        if rng.random() < 0.05:
            values[rng.randrange(len(values))] = float("nan")
        expected = _scan_by_observe(reference, values, config)
        assert scan(reference, values, config) == expected
        compared += 1
        signalled += bool(expected)
    assert signalled > 100 and compared - signalled > 100  # both outcomes were exercised


def test_a_pooled_chart_takes_the_newest_values_of_every_partition_in_time_order() -> None:
    from lotflow.scorers.history import CHART_WINDOW, chart_key, chart_view, observe_chart, rebaseline_chart

    assert chart_key("V-1", 3, "M-1|purity") == "V-1@3#M-1|purity"
    # two partitions' slices, interleaved in time; one point of each at the same millisecond at
    # the window's edge: ordered by value there, as a sort of (time, value) would
    left = {"e": 0, "ref": [25.0, 10.0, 24.0], "v": [[t, float(t)] for t in range(0, 40, 2)], "r": 0}
    right = {"e": 0, "ref": [25.0, 12.0, 24.0], "v": [[t, float(t) + 0.5] for t in range(1, 40, 2)], "r": 0}
    right["v"][9] = [left["v"][10][0], -1.0]  # time 20 in both, the lower value from the right slice
    view = chart_view([left, right])
    points = sorted([*left["v"], *right["v"]])
    assert view.values == [value for _, value in points[-CHART_WINDOW:]]
    assert view.reference == [50.0, 11.0, 24.0 + 24.0 + 4.0 * 25 * 25 / 50]
    # a signal at time 30 hides everything up to it; a newer baseline hides the old epoch
    right["r"] = 30
    assert chart_view([left, right]).values == [value for t, value in points if t > 30]
    # (the process level looks past signals: the newest values whatever they signalled)
    assert chart_view([left, right]).recent == [value for _, value in points[-CHART_WINDOW:]]
    # a held lot's value counts for the level only; a held point newer than the rest is the newest
    left["h"] = [[33, 9.0], [41, 8.0]]
    view = chart_view([left, right])
    assert view.values == [value for t, value in points if t > 30] and view.newest_ms == 41
    assert view.recent == [value for _, value in sorted([*points, *left["h"]])[-CHART_WINDOW:]]
    assert view.recent[-2:] == [points[-1][1], 8.0] and 9.0 in view.recent
    held = observe_chart(left, view, 7.0, 50, signalled=True, reference_n=2, held=True)
    assert held["v"] is left["v"] and held["r"] == left["r"] and held["h"] == [[33, 9.0], [41, 8.0], [50, 7.0]]
    rebased = rebaseline_chart(35)
    assert chart_view([left, right, rebased]).reference is None
    # one lot's value goes into the reference window until it is frozen, then onto the chart
    part = observe_chart(None, chart_view([]), 10.0, 1, signalled=False, reference_n=2)
    assert part["ref"] == [1.0, 10.0, 0.0] and part["v"] == []


def test_a_pooled_view_advanced_by_one_lot_equals_the_view_pooled_again() -> None:
    """``advance_view`` (the cache's shortcut) against ``chart_view`` on the new slices, on random
    slices: equal wherever it answers, and it answers for the common lot (frozen, newest, no signal)."""
    import random

    from lotflow.scorers.history import ChartView, advance_view, chart_view, observe_chart

    rng = random.Random(3)
    answered = declined = answered_held = 0
    for _ in range(3000):
        epoch = rng.choice([0, 5])
        slices = []
        for _ in range(rng.randint(1, 4)):
            times = sorted(rng.choices(range(10, 400), k=rng.randint(0, 20)))  # ties in time too
            if rng.random() < 0.1:
                rng.shuffle(times)  # a clock that stepped back
            held = sorted(rng.choices(range(10, 400), k=rng.choice([0, 0, rng.randint(0, 20)])))
            slices.append({"e": rng.choice([epoch, epoch, 0]), "ref": [float(rng.choice([3, 60])), 1.0, 2.0],
                           "v": [[t, round(rng.gauss(0, 1), 1)] for t in times], "r": rng.choice([0, 0, 50, 200]),
                           **({"h": [[t, round(rng.gauss(3, 1), 1)] for t in held]} if rng.random() < 0.8 else {})})
        view = chart_view(slices)
        i = rng.randrange(len(slices))
        value = round(rng.gauss(0, 1), 1)
        now = rng.choice([view.newest_ms, view.newest_ms + rng.randint(1, 50), rng.randint(0, 400)])
        held = rng.random() < 0.3
        after = observe_chart(slices[i], view, value, now, signalled=rng.random() < 0.1, reference_n=50, held=held)
        advanced = advance_view(view, slices[i], after, value, now)
        if advanced is None:
            declined += 1
            continue
        answered += 1
        answered_held += held
        assert advanced == chart_view([*slices[:i], after, *slices[i + 1:]])
    assert answered > 400 and declined > 500 and answered_held > 100, (answered, declined, answered_held)
    assert advance_view(ChartView(0, None, [], []), None, {"e": 0, "ref": [0.0] * 3, "v": [[1, 1.0]]}, 1.0, 1) is None
