"""Statistical process control for CoA (and later QC) values: the charts quality engineers read.

One chart state per vendor x material x property, a JSON-able dict (it lives in a worker table):

* a **reference window**: the first ``reference_n`` values of accepted lots give the baseline
  mean and standard deviation, then the baseline is frozen. A slow drift cannot drag it along
  (the running vendor history does exactly that); only a person's decision re-baselines it
  (``rebaseline``), e.g. "new test method, accept".
* a **tabular CUSUM** for a mean shift (Montgomery, *Introduction to Statistical Quality
  Control*, 9.1): on z = (x - mu0) / sigma0, C+ = max(0, z - k + C+), C- = max(0, -z - k + C-),
  a signal when either passes h (k = 0.5, h = 5: in-control ARL ~465, a 1-sigma shift ~10.4);
* an **EWMA** of z with its exact time-varying limits (+-L sqrt(lambda / (2 - lambda)
  (1 - (1 - lambda)^(2i)))), lambda = 0.2, L = 3;
* a **CUSUM for a variance increase** on y = z^2 (chi-square with one degree of freedom in
  control): S = max(0, y - kv + S), a signal above hv (kv = 1.8, hv = 10, measured by simulation:
  in-control ARL ~500, sigma x 1.5 ~17, sigma x 2 ~6.7);
* **run rules** (Nelson 1, 2, 3, 5, 6) on the standardized values.

``observe`` returns the signals of one new value, each with the evidence a reviewer needs;
charts reset after a signal (a person looks at the lot; the next signal needs new evidence).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ALL_CHARTS", "ChartConfig", "Signal", "cusum_step", "empty_chart", "ewma_limit", "observe", "rebaseline",
           "scan"]

Chart = dict[str, Any]


ALL_CHARTS = frozenset({"CUSUM_MEAN", "EWMA", "CUSUM_VARIANCE", "NELSON_1", "NELSON_2", "NELSON_3", "NELSON_5",
                        "NELSON_6"})


@dataclass(frozen=True, slots=True)
class ChartConfig:
    reference_n: int = 30
    k: float = 0.5
    h: float = 5.0
    ewma_lambda: float = 0.2
    ewma_l: float = 3.0
    variance_k: float = 1.8
    variance_h: float = 10.0
    run_length: int = 9  # Nelson rule 2: this many in a row on one side of the mean
    trend_length: int = 6  # Nelson rule 3: this many steadily rising or falling
    charts: frozenset[str] = ALL_CHARTS  # the signals that count (the others are computed, not raised)
    clip_z: float = math.inf  # the CUSUMs see z clipped to +-clip_z: heavy-tailed data, one far lot is no shift


@dataclass(frozen=True, slots=True)
class Signal:
    chart: str  # CUSUM_MEAN | EWMA | CUSUM_VARIANCE | NELSON_1 | NELSON_2 | NELSON_3 | NELSON_5 | NELSON_6
    message: str
    evidence: dict[str, str]


def empty_chart() -> Chart:
    return {"ref": [0, 0.0, 0.0], "frozen": False, "cp": 0.0, "cm": 0.0, "ew": 0.0, "i": 0, "var": 0.0,
            "z": [], "since": 0}


def rebaseline(chart: Chart) -> None:
    """A person accepted a new level (new test method, new source): learn a new reference window."""
    chart.clear()
    chart.update(empty_chart())


def _reset(chart: Chart) -> None:
    chart.update(cp=0.0, cm=0.0, ew=0.0, i=0, var=0.0, z=[], since=0)


def cusum_step(high: float, low: float, z: float, k: float) -> tuple[float, float]:
    """One step of the two-sided tabular CUSUM on a standardized value."""
    return max(0.0, z - k + high), max(0.0, -z - k + low)


def ewma_limit(lam: float, width: float, i: int) -> float:
    """The EWMA's exact control limit (in sigma of the observations) after ``i`` values."""
    return width * math.sqrt(lam / (2 - lam) * (1 - (1 - lam) ** (2 * i)))


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def observe(chart: Chart, value: float, config: ChartConfig = ChartConfig()) -> list[Signal]:
    """Add one value of an accepted-so-far lot; the signals it raises (none while the reference fills)."""
    if not math.isfinite(value):
        return []
    n, mean, m2 = chart["ref"]
    if not chart["frozen"]:
        n += 1
        delta = value - mean
        mean += delta / n
        m2 += delta * (value - mean)
        chart["ref"] = [n, mean, m2]
        if n >= config.reference_n:
            chart["frozen"] = True
        return []
    sigma = math.sqrt(m2 / (n - 1)) if n > 1 else 0.0
    sigma = max(sigma, 1e-9 * max(1.0, abs(mean)))
    z = (value - mean) / sigma
    chart["since"] += 1
    signals: list[Signal] = []
    base = {"reference_mean": _fmt(mean), "reference_sigma": _fmt(sigma), "reference_n": str(int(n)),
            "value": _fmt(value), "z": _fmt(z), "lots_since_reset": str(chart["since"])}

    clipped = max(-config.clip_z, min(config.clip_z, z))  # a robust (Huber) CUSUM: one outlier is no shift
    chart["cp"], chart["cm"] = cusum_step(chart["cp"], chart["cm"], clipped, config.k)
    for side, key in (("up", "cp"), ("down", "cm")):
        if chart[key] > config.h:
            signals.append(Signal("CUSUM_MEAN", f"CUSUM above h = {config.h:g} sigma for the last "
                                  f"{chart['since']} lots: the mean moved {side} from the reference window of "
                                  f"{int(n)} lots", {**base, "cusum": _fmt(chart[key]), "h": _fmt(config.h)}))

    lam = config.ewma_lambda
    chart["i"] += 1
    chart["ew"] = lam * z + (1 - lam) * chart["ew"]
    limit = ewma_limit(lam, config.ewma_l, chart["i"])
    if abs(chart["ew"]) > limit:
        signals.append(Signal("EWMA", f"EWMA {chart['ew']:+.2f} sigma beyond its limit {limit:.2f}: the mean moved "
                              f"{chart['ew'] * sigma:+.3g} from the reference", {**base, "ewma": _fmt(chart["ew"]),
                                                                                 "limit": _fmt(limit)}))

    chart["var"] = max(0.0, min(z * z, config.clip_z ** 2) - config.variance_k + chart["var"])
    if chart["var"] > config.variance_h:
        signals.append(Signal("CUSUM_VARIANCE", f"the spread grew: variance CUSUM {chart['var']:.1f} above "
                              f"{config.variance_h:g}", {**base, "cusum": _fmt(chart["var"])}))

    recent = (chart["z"] + [z])[-max(config.run_length, config.trend_length + 1, 5):]
    chart["z"] = recent
    signals.extend(_run_rules(recent, z, config, base))
    if len(config.charts) < len(ALL_CHARTS):
        signals = [s for s in signals if s.chart in config.charts]
    if signals:
        _reset(chart)
    return signals


def _run_rules(recent: list[float], z: float, config: ChartConfig, base: dict[str, str]) -> list[Signal]:
    out = []
    if abs(z) > 3:
        out.append(Signal("NELSON_1", f"a value {z:+.1f} sigma from the reference mean", base))
    run = recent[-config.run_length:]
    if len(run) == config.run_length and (all(v > 0 for v in run) or all(v < 0 for v in run)):
        out.append(Signal("NELSON_2", f"{config.run_length} lots in a row on one side of the reference mean", base))
    trend = recent[-(config.trend_length + 1):]
    if len(trend) == config.trend_length + 1:
        steps = [b - a for a, b in itertools.pairwise(trend)]
        if all(s > 0 for s in steps) or all(s < 0 for s in steps):
            out.append(Signal("NELSON_3", f"{config.trend_length} lots steadily rising or falling", base))
    last3, last5 = recent[-3:], recent[-5:]
    for sign in (1, -1):
        if len(last3) == 3 and sum(1 for v in last3 if sign * v > 2) >= 2:
            out.append(Signal("NELSON_5", "2 of the last 3 lots beyond 2 sigma on one side", base))
        if len(last5) == 5 and sum(1 for v in last5 if sign * v > 1) >= 4:
            out.append(Signal("NELSON_6", "4 of the last 5 lots beyond 1 sigma on one side", base))
    return out


def scan(reference: list[float], values: list[float], config: ChartConfig = ChartConfig()) -> list[Signal]:
    """The signals of the newest of ``values`` (oldest first) on charts against a frozen reference.

    A worker pools a vendor's lots from every partition, so the charts are run again over the
    recent values rather than kept as running sums; a signal resets them exactly as ``observe``
    does, so the newest value signals only on evidence gathered since the last signal.
    """
    chart = empty_chart()
    chart["ref"] = list(reference)
    chart["frozen"] = True
    signals: list[Signal] = []
    for value in values:
        signals = observe(chart, value, config)
    return signals
