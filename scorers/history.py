"""Vendor receipt history: running statistics kept as plain JSON-able values.

State lives in a Faust table (its changelog must serialise it), so profiles are dicts and
lists rather than objects; these functions are the only code that reads or changes them.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "EXCEPTION_RATE_ALPHA",
    "PRIOR_EXCEPTION_RATE",
    "empty_profile",
    "exception_rate",
    "merge_stats",
    "observe_decision",
    "observe_value",
    "pooled",
    "stat_summary",
    "zscore",
]

Profile = dict[str, Any]
Stat = list[float]  # [count, mean, M2] (Welford)

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


def pooled(profiles: list[Profile], keys: list[str]) -> Profile:
    """One read-only view of a vendor's history kept in several partitions' profiles."""
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
    return {"n": n, "exc": exc, "stats": stats}


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
