"""Why confidence is what it is: signed logit contributions, in words, largest pull first.

A scorer reports each feature's signed share of its logit (``Scorer.contributions``); the
pattern's describer turns a feature and its share into a sentence a reviewer can check against
the evidence ("CoA viscosity 4.8 sigma from this vendor's last 60 lots: -2.3 logit"). Only the
features that pulled confidence down are listed: those are the ones a person has to weigh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["MAX_CONTRIBUTIONS", "Contribution", "Describe", "explain", "logit_text", "signed"]

Context = TypeVar("Context")
MAX_CONTRIBUTIONS = 6
MIN_LOGIT = 0.05  # smaller pulls are rounding noise next to the others


@dataclass(frozen=True, slots=True)
class Contribution:
    feature: str
    logit: float  # signed: negative pulled confidence down
    text: str

    def to_record(self) -> dict[str, object]:
        return {"feature": self.feature, "logit": self.logit, "text": self.text}


def signed(value: float) -> str:
    """``+4.8`` or ``-2.3`` with a real minus sign, as a reviewer reads it."""
    return f"{value:+.1f}".replace("-", "\u2212")


def logit_text(logit: float) -> str:
    return f"{signed(logit)} logit"


class Describe(Generic[Context]):
    """Per-feature sentence makers of one pattern; a feature without one gets ``name = value``."""

    def __init__(self, describers: Mapping[str, Callable[[Context, Sequence[Any], float], str]]) -> None:
        self._describers = dict(describers)

    def __call__(self, context: Context, reasons: Sequence[Any], feature: str, value: float) -> str:
        describer = self._describers.get(feature)
        if describer is None:
            return f"{feature.replace('_', ' ')} = {value:.3g}"
        return describer(context, reasons, value)


def explain(context: Context, reasons: Sequence[Any], features: Mapping[str, float],
            contributions: Mapping[str, float], describe: Describe[Context],
            limit: int = MAX_CONTRIBUTIONS) -> list[Contribution]:
    """The features that pulled the logit down, most first, each with its sentence."""
    pulls = sorted((logit, feature) for feature, logit in contributions.items() if logit <= -MIN_LOGIT)
    return [Contribution(feature, round(logit, 3),
                         f"{describe(context, reasons, feature, features.get(feature, 0.0))}: {logit_text(logit)}")
            for logit, feature in pulls[:limit]]
