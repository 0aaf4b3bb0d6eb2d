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
    point_limit: float = 3.0  # Nelson rule 1: one value beyond this many sigma (Shewhart's 3 by default)


@dataclass(frozen=True, slots=True)
class Signal:
    chart: str  # CUSUM_MEAN | EWMA | CUSUM_VARIANCE | NELSON_1 | NELSON_2 | NELSON_3 | NELSON_5 | NELSON_6
    message: str
    evidence: dict[str, str]


def empty_chart() -> Chart:
    return {"ref": [0, 0.0, 0.0], "frozen": False, "cp": 0.0, "cm": 0.0, "ew": 0.0, "i": 0, "var": 0.0,
            "z": [], "since": 0, "pos": 0, "neg": 0, "up": 0, "down": 0}


def rebaseline(chart: Chart) -> None:
    """A person accepted a new level (new test method, new source): learn a new reference window."""
    chart.clear()
    chart.update(empty_chart())


def _reset(chart: Chart) -> None:
    chart.update(cp=0.0, cm=0.0, ew=0.0, i=0, var=0.0, z=[], since=0, pos=0, neg=0, up=0, down=0)


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
    sigma = _sigma(n, mean, m2)
    z = (value - mean) / sigma
    fired = _run(chart, [z], config)
    if not fired:
        return []
    signals = _describe(chart, fired, value, z, n, mean, sigma, config)
    _reset(chart)
    return signals


def _sigma(n: float, mean: float, m2: float) -> float:
    sigma = math.sqrt(m2 / (n - 1)) if n > 1 else 0.0
    return max(sigma, 1e-9 * max(1.0, abs(mean)))


def _run(chart: Chart, zs: list[float], config: ChartConfig) -> list[str]:
    """Move every chart over the standardized values ``zs``; the charts of ``config.charts`` that
    the last one signals. A value that signals resets the charts before the next one (as a
    person's look at that lot would).

    Numbers only, in local variables: the evidence text is written by ``_describe`` for a value
    that signals. A worker runs this over ~20 values per property per lot; formatting evidence for
    every value cost 40 % of the processor's time, and dict-held chart state another ~2x of this
    loop (measured with py-spy)."""
    enabled = config.charts
    k, h, clip, lam, var_k, var_h = config.k, config.h, config.clip_z, config.ewma_lambda, config.variance_k, \
        config.variance_h
    want_ewma, want_1, want_2, want_3 = ("EWMA" in enabled, "NELSON_1" in enabled, "NELSON_2" in enabled,
                                         "NELSON_3" in enabled)
    want_5, want_6 = "NELSON_5" in enabled, "NELSON_6" in enabled
    run_length, trend_length, point_limit = config.run_length, config.trend_length, config.point_limit
    clip_square = clip * clip
    since, cp, cm, ew, i, var = chart["since"], chart["cp"], chart["cm"], chart["ew"], chart["i"], chart["var"]
    # (a chart dict from before the run lengths were kept starts them at 0)
    pos, neg, up, down = chart.get("pos", 0), chart.get("neg", 0), chart.get("up", 0), chart.get("down", 0)
    recent = list(chart["z"])
    fired: list[str] = []
    for z in zs:
        if fired:  # the previous value signalled: the charts start again from this one
            since = i = pos = neg = up = down = 0
            cp = cm = ew = var = 0.0
            recent = []
            fired = []
        since += 1
        clipped = -clip if z < -clip else clip if z > clip else z  # robust (Huber): one outlier is no shift
        cp = clipped - k + cp
        cp = cp if cp > 0.0 else 0.0
        cm = -clipped - k + cm
        cm = cm if cm > 0.0 else 0.0
        if cp > h or cm > h:
            fired.append("CUSUM_MEAN")
        i += 1
        ew = lam * z + (1 - lam) * ew
        if want_ewma and abs(ew) > ewma_limit(lam, config.ewma_l, i):
            fired.append("EWMA")
        square = z * z
        var = (square if square < clip_square else clip_square) - var_k + var
        var = var if var > 0.0 else 0.0
        if var > var_h:
            fired.append("CUSUM_VARIANCE")
        # Nelson 2 and 3 as run lengths (same side of the mean; rising or falling steps), in O(1)
        pos = pos + 1 if z > 0 else 0
        neg = neg + 1 if z < 0 else 0
        if recent:
            previous = recent[-1]
            up = up + 1 if z > previous else 0
            down = down + 1 if z < previous else 0
        else:
            up = down = 0
        recent.append(z)
        if len(recent) > 5:  # what Nelson 5 and 6 look at
            del recent[0]
        if want_1 and abs(z) > point_limit:
            fired.append("NELSON_1")
        if want_2 and (pos >= run_length or neg >= run_length):
            fired.append("NELSON_2")
        if want_3 and (up >= trend_length or down >= trend_length):
            fired.append("NELSON_3")
        if want_5 and _beyond(recent[-3:], 2.0, 2):
            fired.append("NELSON_5")
        if want_6 and _beyond(recent, 1.0, 4):
            fired.append("NELSON_6")
        if fired and ("CUSUM_MEAN" not in enabled or "CUSUM_VARIANCE" not in enabled):
            fired = [name for name in fired if name in enabled]
    chart.update(since=since, cp=cp, cm=cm, ew=ew, i=i, var=var, pos=pos, neg=neg, up=up, down=down, z=recent)
    return fired


def _beyond(values: list[float], limit: float, needed: int) -> bool:
    """At least ``needed`` of ``values`` beyond ``limit`` sigma on one side (Nelson 5: 2 of 3 beyond
    2; Nelson 6: 4 of 5 beyond 1), once there are enough values to judge."""
    full = 3 if needed == 2 else 5
    if len(values) < full:
        return False
    return sum(v > limit for v in values) >= needed or sum(v < -limit for v in values) >= needed


def _describe(chart: Chart, fired: list[str], value: float, z: float, n: float, mean: float, sigma: float,
              config: ChartConfig) -> list[Signal]:
    """The signals ``fired`` by the newest value, each with the evidence a reviewer needs."""
    base = {"reference_mean": _fmt(mean), "reference_sigma": _fmt(sigma), "reference_n": str(int(n)),
            "value": _fmt(value), "z": _fmt(z), "lots_since_reset": str(chart["since"])}
    signals: list[Signal] = []
    for name in fired:
        if name == "CUSUM_MEAN":
            for side, key in (("up", "cp"), ("down", "cm")):
                if chart[key] > config.h:
                    signals.append(Signal(name, f"CUSUM above h = {config.h:g} sigma for the last "
                                          f"{chart['since']} lots: the mean moved {side} from the reference window of "
                                          f"{int(n)} lots", {**base, "cusum": _fmt(chart[key]), "h": _fmt(config.h)}))
        elif name == "EWMA":
            limit = ewma_limit(config.ewma_lambda, config.ewma_l, chart["i"])
            signals.append(Signal(name, f"EWMA {chart['ew']:+.2f} sigma beyond its limit {limit:.2f}: the mean "
                                  f"moved {chart['ew'] * sigma:+.3g} from the reference",
                                  {**base, "ewma": _fmt(chart["ew"]), "limit": _fmt(limit)}))
        elif name == "CUSUM_VARIANCE":
            signals.append(Signal(name, f"the spread grew: variance CUSUM {chart['var']:.1f} above "
                                  f"{config.variance_h:g}", {**base, "cusum": _fmt(chart["var"])}))
        else:
            signals.append(Signal(name, _RULE_TEXT[name](config, z), base))
    return signals


_RULE_TEXT = {
    "NELSON_1": lambda config, z: f"a value {z:+.1f} sigma from the reference mean",
    "NELSON_2": lambda config, z: f"{config.run_length} lots in a row on one side of the reference mean",
    "NELSON_3": lambda config, z: f"{config.trend_length} lots steadily rising or falling",
    "NELSON_5": lambda config, z: "2 of the last 3 lots beyond 2 sigma on one side",
    "NELSON_6": lambda config, z: "4 of the last 5 lots beyond 1 sigma on one side",
}


def scan(reference: list[float], values: list[float], config: ChartConfig = ChartConfig()) -> list[Signal]:
    """The signals of the newest of ``values`` (oldest first) on charts against a frozen reference.

    A worker pools a vendor's lots from every partition, so the charts are run again over the
    recent values rather than kept as running sums; a signal resets them exactly as ``observe``
    does, so the newest value signals only on evidence gathered since the last signal.
    """
    if not values or not math.isfinite(values[-1]):
        return []
    n, mean, m2 = reference
    sigma = _sigma(n, mean, m2)
    chart = empty_chart()
    zs = [(v - mean) / sigma for v in values if math.isfinite(v)]
    fired = _run(chart, zs, config)
    if not fired:
        return []
    return _describe(chart, fired, values[-1], zs[-1], n, mean, sigma, config)
