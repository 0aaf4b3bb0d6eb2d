"""Vendor receipt history: running statistics kept as plain JSON-able values.

State lives in a Faust table (its changelog must serialise it), so profiles are dicts and
lists rather than objects; these functions are the only code that reads or changes them.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHART_WINDOW",
    "EXCEPTION_RATE_ALPHA",
    "PRIOR_EXCEPTION_RATE",
    "RESOLUTIONS",
    "ChartSlice",
    "ChartView",
    "PatternCounts",
    "advance_view",
    "chart_key",
    "chart_view",
    "empty_profile",
    "exception_rate",
    "legacy_charts",
    "merge_stats",
    "observe_chart",
    "observe_decision",
    "observe_person_decision",
    "observe_reasons",
    "observe_value",
    "pattern_counts",
    "pooled",
    "rebaseline_chart",
    "stat_summary",
    "zscore",
]

Profile = dict[str, Any]
Stat = list[float]  # [count, mean, M2] (Welford)
# Per material (key "m"): {"n": receipts decided, "r": {reason code: receipts with it},
# "p": {reason code: [decided by a person, accepted, conditionally accepted, rejected]}}
MaterialHistory = dict[str, Any]
RESOLUTIONS = ("ACCEPT", "CONDITIONAL_ACCEPT", "REJECT")

PRIOR_EXCEPTION_RATE = 0.05
EXCEPTION_RATE_ALPHA = 0.02  # EWMA weight: about the last 50 receipts of a vendor count
MIN_HISTORY = 5


def empty_profile() -> Profile:
    return {"n": 0, "exc": PRIOR_EXCEPTION_RATE, "stats": {}}


def observe_value(stat: Stat | None, value: float) -> Stat:
    """Welford's online mean/variance update; returns a new list.

    >>> s = None
    >>> for v in (1.0, 2.0, 3.0):
    ...     s = observe_value(s, v)
    >>> s
    [3.0, 2.0, 2.0]
    """
    if stat is None:
        return [1.0, value, 0.0]
    n, mean, m2 = stat
    n += 1
    delta = value - mean
    mean += delta / n
    return [n, mean, m2 + delta * (value - mean)]


def zscore(stat: Stat | None, value: float, min_history: int = MIN_HISTORY) -> float | None:
    """How many standard deviations ``value`` is from the history, or None without enough of it."""
    if stat is None or stat[0] < min_history:
        return None
    n, mean, m2 = stat
    std = math.sqrt(m2 / (n - 1))
    # A floor so a perfectly constant history does not turn rounding noise into huge z.
    std = max(std, 1e-6 * max(1.0, abs(mean)))
    return (value - mean) / std


def merge_stats(stats: list[Stat]) -> Stat | None:
    """Combine Welford statistics of disjoint samples (Chan et al.).

    >>> merge_stats([[2.0, 1.5, 0.5], [1.0, 3.0, 0.0]])
    [3.0, 2.0, 2.0]
    """
    merged: Stat | None = None
    for n, mean, m2 in stats:
        if merged is None:
            merged = [n, mean, m2]
            continue
        n0, mean0, m20 = merged
        total = n0 + n
        delta = mean - mean0
        merged = [total, mean0 + delta * n / total, m20 + m2 + delta * delta * n0 * n / total]
    return merged


def pooled(profiles: list[Profile], keys: list[str], materials: Sequence[str] = ()) -> Profile:
    """One read-only view of a vendor's history kept in several partitions' profiles (the CoA
    statistics ``keys`` and the reason counts of ``materials``)."""
    if len(profiles) == 1:
        return profiles[0]
    n = sum(p["n"] for p in profiles)
    exc = sum(p["exc"] * p["n"] for p in profiles) / n if n else PRIOR_EXCEPTION_RATE
    stats: dict[str, Stat] = {}
    for key in keys:
        found = [p["stats"][key] for p in profiles if key in p["stats"]]
        merged = merge_stats(found)
        if merged is not None:
            stats[key] = merged
    by_material: dict[str, MaterialHistory] = {}
    for material in materials:
        parts = [p["m"][material] for p in profiles if material in p.get("m", {})]
        if parts:
            by_material[material] = _merge_material(parts)
    return {"n": n, "exc": exc, "stats": stats, "m": by_material}


def _merge_material(parts: list[MaterialHistory]) -> MaterialHistory:
    reasons: dict[str, int] = {}
    people: dict[str, list[int]] = {}
    for part in parts:
        for code, count in part["r"].items():
            reasons[code] = reasons.get(code, 0) + count
        for code, counts in part["p"].items():
            total = people.setdefault(code, [0] * (1 + len(RESOLUTIONS)))
            for i, count in enumerate(counts):
                total[i] += count
    return {"n": sum(part["n"] for part in parts), "r": reasons, "p": people}


def _material(profile: Profile, material: str) -> MaterialHistory:
    return profile.setdefault("m", {}).setdefault(material, {"n": 0, "r": {}, "p": {}})


def observe_reasons(profile: Profile, materials: list[str], codes: list[str]) -> None:
    """One decided receipt of these materials, with these (non-INFO) reason codes."""
    for material in dict.fromkeys(materials):
        history = _material(profile, material)
        history["n"] += 1
        for code in dict.fromkeys(codes):
            history["r"][code] = history["r"].get(code, 0) + 1


def observe_person_decision(profile: Profile, material: str, code: str, resolution: str) -> None:
    """A person resolved an exception with this reason (``resolution`` one of ``RESOLUTIONS``)."""
    counts = _material(profile, material)["p"].setdefault(code, [0] * (1 + len(RESOLUTIONS)))
    counts[0] += 1
    counts[1 + RESOLUTIONS.index(resolution)] += 1


@dataclass(frozen=True, slots=True)
class PatternCounts:
    """Vendor V, material M: ``prior_receipts`` earlier receipts, ``with_reason`` of them with the
    reason; people decided ``decided`` such exceptions: ``accepted`` / ``conditional`` / ``rejected``."""

    material_id: str
    reason_code: str
    prior_receipts: int
    with_reason: int
    decided: int
    accepted: int
    conditional: int
    rejected: int


    def to_record(self) -> dict[str, Any]:
        """The ``HistoricalPattern`` record of an exception."""
        return {"material_id": self.material_id, "reason_code": self.reason_code,
                "prior_receipts": self.prior_receipts, "with_reason": self.with_reason,
                "decided_by_person": self.decided, "accepted_by_person": self.accepted + self.conditional}


def pattern_counts(profile: Profile, material: str, code: str) -> PatternCounts:
    history = profile.get("m", {}).get(material)
    if history is None:
        return PatternCounts(material, code, 0, 0, 0, 0, 0, 0)
    decided, accepted, conditional, rejected = history["p"].get(code, (0, 0, 0, 0))
    return PatternCounts(material, code, history["n"], history["r"].get(code, 0), decided, accepted,
                         conditional, rejected)


def stat_summary(stat: Stat | None) -> tuple[int, float, float]:
    """(count, mean, std) of a statistic."""
    if stat is None or stat[0] == 0:
        return 0, 0.0, 0.0
    n, mean, m2 = stat
    return int(n), mean, math.sqrt(m2 / (n - 1)) if n > 1 else 0.0


def observe_decision(profile: Profile, was_exception: bool) -> None:
    profile["n"] += 1
    profile["exc"] += EXCEPTION_RATE_ALPHA * (float(was_exception) - profile["exc"])


def exception_rate(profile: Profile) -> float:
    return float(profile["exc"])


# --- control-chart slices -------------------------------------------------------------------
# One slice per chart and partition, its own key in the vendor table (``chart_key``): {"e":
# baseline epoch (ms), "ref": Stat of the reference window, "v": [[time ms, value], ...] the
# newest CHART_WINDOW values of lots that passed the rules after the reference froze, "r": time of
# the last signal (ms), "h": the same for lots a rule held}. The charts run over the pooled "v"
# of every partition's slice; the process level over "v" and "h" together. Held lots count for
# the level because a drifting vendor's held lots are its drift: a level of passed lots alone is
# censored to the lots that looked ordinary (learning run 23: the drifting vendor's lots right
# after a signal were verified with a level that its held lots, 4-6 sigma out, never reached).
# Their own keys, not a part of the vendor profile: a lot reads and writes the slices of its own
# properties only (inside the profile, every receipt copied and serialised ~8 KB of every chart of
# the vendor: a tenth of the processor's time, measured).
CHART_WINDOW = 20
ChartSlice = dict[str, Any]


def chart_key(vendor: str, partition: int, chart: str) -> str:
    """The vendor-table key of ``partition``'s slice of ``vendor``'s chart ``chart`` ("<material>|<property>")."""
    return f"{vendor}@{partition}#{chart}"


@dataclass(frozen=True, slots=True)
class ChartView:
    """One vendor x material x property chart, pooled over every partition's slice."""

    epoch: int  # the baseline in force: lots before it do not count
    reference: Stat | None  # the reference window's statistics (of this epoch)
    values: list[float]  # since the last signal and the baseline, oldest first, at most CHART_WINDOW
    # the newest CHART_WINDOW values of every lot, passed or held, signals or not (the process level)
    recent: list[float] = field(default_factory=list)
    # the latest of its newest point, its baseline and its last signal (ms): a lot after it only
    # appends to the view (``advance_view``)
    newest_ms: int = 0

    def frozen(self, reference_n: int) -> bool:
        return self.reference is not None and self.reference[0] >= reference_n


def chart_view(slices: Sequence[ChartSlice]) -> ChartView:
    """The chart pooled from its slices (one per partition that has seen a lot)."""
    if not slices:
        return ChartView(0, None, [], [])
    epoch = max(s["e"] for s in slices)
    current = [s for s in slices if s["e"] == epoch]
    reference = merge_stats([s["ref"] for s in current if s["ref"][0] > 0])
    since = max([epoch, *(s.get("r", 0) for s in current)])
    points = _by_time(list(itertools.chain.from_iterable(part["v"] for part in current)))
    held = list(itertools.chain.from_iterable(part.get("h", ()) for part in current))
    every = _by_time([*points[-CHART_WINDOW:], *held]) if held else points
    recent = [value for _, value in every[-CHART_WINDOW:]]
    newest = max(int(every[-1][0]) if every else 0, since)
    points = points[bisect.bisect_right(points, since, key=_TIME):]
    return ChartView(epoch, reference, [value for _, value in points[-CHART_WINDOW:]], recent, newest)


def _by_time(points: list[list[float]]) -> list[list[float]]:
    """``points`` sorted in place as sorting by (time, value) would: by time alone (a C key on an
    int: ~3x a sort comparing the lists), and by both only where equal times are at the newest
    CHART_WINDOW's edge (what a window takes must not depend on the partitions' order)."""
    points.sort(key=_TIME)
    if any(a[0] == b[0] for a, b in itertools.pairwise(points[-CHART_WINDOW - 1:])):
        points.sort()
    return points


def advance_view(view: ChartView, before: ChartSlice | None, after: ChartSlice, value: float,
                 now_ms: int) -> ChartView | None:
    """The pooled view once one partition's slice went from ``before`` to ``after`` by
    ``observe_chart`` of ``value`` at ``now_ms``, without pooling the slices again: equal to
    ``chart_view`` of the new slices when the lot only appended a point newer than every other
    (a frozen reference, the same epoch, no signal) to its passed or its held points; None where
    the view must be pooled again. Each lot of a vendor changes its own slice, so a view cached by
    the slices' identity was pooled again for nearly every lot (a tenth of the processor, py-spy)."""
    if (before is None or before["e"] != view.epoch or after["e"] != view.epoch or after["ref"] is not before["ref"]
            or after.get("r", 0) != before.get("r", 0) or now_ms <= view.newest_ms):
        return None
    held = after["v"] is before["v"]
    if after.get("h") is not before.get("h") and not held:
        return None  # both lists changed: not one lot's point
    name = "h" if held else "v"
    points, previous = after.get(name, []), before.get(name, [])
    if not points or points[-1][0] != now_ms or points[-1][1] != value:
        return None
    if len(points) > 1 and (not previous or points[-2] is not previous[-1]):
        return None  # not the slice before with one point appended
    if len(previous) >= len(points) and not all(previous[0][0] < t for t, _ in previous[1:]):
        # the slice dropped its oldest point, which may still be in the view (a tie in time, ordered
        # by value, or a clock that stepped back): only pooling again says what replaces it
        return None
    values = view.values if held else [*view.values[-(CHART_WINDOW - 1):], value]
    return ChartView(view.epoch, view.reference, values, [*view.recent[-(CHART_WINDOW - 1):], value], now_ms)


_TIME = operator.itemgetter(0)


def observe_chart(part: ChartSlice | None, view: ChartView, value: float, now_ms: int, *, signalled: bool,
                  reference_n: int, held: bool = False) -> ChartSlice:
    """One lot's value, after its decision: into the reference window while it fills, then onto the
    chart; a lot a rule ``held`` only onto its held points (the process level's, once the reference
    froze). ``part``: this partition's slice or None. Returns a new slice; ``part`` is left as it
    was (slices are read without a copy and cached by identity: a changed slice is a new object)."""
    if part is None or part["e"] < view.epoch:
        epoch, reference, values, signal_ms, held_values = view.epoch, [0.0, 0.0, 0.0], [], 0, []
    else:
        epoch, reference, values, signal_ms = part["e"], part["ref"], part["v"], part.get("r", 0)
        held_values = part.get("h", [])
    if held:
        if view.frozen(reference_n):
            held_values = [*held_values[-(CHART_WINDOW - 1):], [now_ms, value]]
    elif not view.frozen(reference_n):
        reference = observe_value(reference if reference[0] > 0 else None, value)
    else:
        values = [*values[-(CHART_WINDOW - 1):], [now_ms, value]]
    if signalled and not held:
        signal_ms = now_ms
    return {"e": epoch, "ref": reference, "v": values, "r": signal_ms, "h": held_values}


def rebaseline_chart(now_ms: int) -> ChartSlice:
    """A person accepted a new level (new test method): the reference window is learnt again."""
    return {"e": now_ms, "ref": [0.0, 0.0, 0.0], "v": [], "r": now_ms, "h": []}


def legacy_charts(profile: Profile) -> dict[str, ChartSlice]:
    """Chart slices a profile written before charts had their own keys still carries (removed from it)."""
    return profile.pop("spc", None) or {}
