"""The verification node: one mechanism, configured per pattern.

``join -> checks -> score -> decide -> emit``. A pattern supplies its checks (pure functions
returning reasons), its feature function, a scorer and a routing table; this module turns
them into a verdict. Rules are authoritative: a BLOCK reason always raises an exception, and
the confidence model can only demote a clean-looking hand-off, never promote a failed one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from lotflow.verification.explain import Contribution, Describe, explain

__all__ = [
    "Evaluation",
    "NodeConfig",
    "Reason",
    "Route",
    "Scorer",
    "Severity",
    "Verdict",
    "VerificationNode",
    "decide",
]

Context = TypeVar("Context")
Features = dict[str, float]


class Severity(StrEnum):
    INFO = "INFO"
    WARN = "WARN"
    BLOCK = "BLOCK"


_SEVERITY_RANK = {Severity.BLOCK: 0, Severity.WARN: 1, Severity.INFO: 2}


@dataclass(slots=True)  # not frozen: built per event, and a frozen one costs 3x to build
class Reason:
    code: str
    message: str
    severity: Severity
    evidence: Mapping[str, str] = field(default_factory=dict)

    def to_record(self) -> dict[str, object]:
        return {
            "code": self.code,
            "message": self.message,
            "severity": self.severity.value,
            "evidence": dict(self.evidence),
        }


@dataclass(frozen=True, slots=True)
class Route:
    """Which specialist queue gets an exception with this reason, and what they should do."""

    queue: str
    action: str


class Scorer(Protocol):
    """River's contract: plain-dict features in, probability out, learning from labels."""

    @property
    def version(self) -> str: ...

    def predict_proba_one(self, x: Features) -> dict[bool, float]: ...

    def learn_one(self, x: Features, y: bool) -> None: ...

    def contributions(self, x: Features) -> dict[str, float]:
        """Each feature's signed share of the score's logit (negative: pulled confidence down)."""
        ...


@dataclass(frozen=True)
class NodeConfig:
    name: str
    verify_threshold: float
    high_priority_threshold: float
    routes: Mapping[str, Route]
    default_route: Route

    def routed_reason(self, reasons: Sequence[Reason]) -> Reason | None:
        """The most severe reason that has a route (ties: first reason wins); None: the default route."""
        for reason in sorted(reasons, key=lambda r: _SEVERITY_RANK[r.severity]):
            if reason.severity is not Severity.INFO and reason.code in self.routes:
                return reason
        return None

    def route_for(self, reasons: Sequence[Reason]) -> Route:
        reason = self.routed_reason(reasons)
        return self.default_route if reason is None else self.routes[reason.code]


@dataclass(slots=True)  # not frozen: built per event, and a frozen one costs 3x to build
class Verdict:
    decision: str  # "VERIFIED" | "EXCEPTION"
    confidence: float
    priority: str  # "HIGH" | "NORMAL"
    route: Route | None
    reason: Reason | None = None  # the reason an exception is routed by (None: no rule, low confidence)


def decide(config: NodeConfig, confidence: float, reasons: Sequence[Reason]) -> Verdict:
    """Verified at or above the node threshold unless a rule blocks; HIGH below the priority band.

    >>> cfg = NodeConfig("n", 0.9, 0.75, {}, Route("q", "look"))
    >>> decide(cfg, 0.95, []).decision
    'VERIFIED'
    >>> decide(cfg, 0.80, []).priority
    'NORMAL'
    >>> decide(cfg, 0.5, []).priority
    'HIGH'
    """
    blocked = any(r.severity is Severity.BLOCK for r in reasons)
    if not blocked and confidence >= config.verify_threshold:
        return Verdict("VERIFIED", confidence, "NORMAL", None)
    priority = "HIGH" if confidence < config.high_priority_threshold else "NORMAL"
    reason = config.routed_reason(reasons)
    route = config.default_route if reason is None else config.routes[reason.code]
    return Verdict("EXCEPTION", confidence, priority, route, reason)


@dataclass(slots=True)  # not frozen: built per event, and a frozen one costs 3x to build
class Evaluation:
    reasons: tuple[Reason, ...]
    features: Features
    verdict: Verdict
    model_version: str
    contributions: list[Contribution] = field(default_factory=list)  # exceptions only: what pulled it down


@dataclass
class VerificationNode(Generic[Context]):
    """checks -> features -> score -> decide, for one pattern's context type."""

    config: NodeConfig
    checks: Sequence[Callable[[Context], list[Reason]]]
    features: Callable[[Context, Sequence[Reason]], Features]
    scorer: Scorer
    describe: Describe[Context] = field(default_factory=lambda: Describe({}))

    def evaluate(self, context: Context) -> Evaluation:
        reasons: list[Reason] = []
        for check in self.checks:
            reasons.extend(check(context))
        x = self.features(context, reasons)
        confidence = self.scorer.predict_proba_one(x).get(True, 0.0)
        verdict = decide(self.config, confidence, reasons)
        evaluation = Evaluation(tuple(reasons), x, verdict, self.scorer.version)
        if verdict.decision == "EXCEPTION":  # explained where a person will read it
            evaluation.contributions = explain(context, reasons, x, self.scorer.contributions(x), self.describe)
        return evaluation

    def learn(self, features: Features, label_good: bool) -> None:
        self.scorer.learn_one(features, label_good)
