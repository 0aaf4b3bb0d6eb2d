"""The verification node: one mechanism, configured per pattern.

``join -> checks -> score -> decide -> emit``. A pattern supplies its checks (pure functions
returning reasons), its feature function, its table of soft reasons and a routing table; the
node's ``Learner`` scores; this module turns them into a verdict.

Rules stay authoritative for safety: a *hard* reason (any WARN or BLOCK reason the pattern's
soft table does not list, or one outside its documented envelope) always raises an exception.
A *soft* reason may be verified only once people have accepted its vendor x material x
reason pattern consistently, the vendor is not tightened by drift and the calibrated
confidence passes the threshold; and the model may send a hand-off no rule stops to review
when it resembles rejected ones (low confidence). A share of what would be verified is drawn
as a spot check: verified all the same, and sent to a person for an unbiased label.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from lotflow.scorers.learner import GRADE, HARD_REASON_FEATURES, SOFT_REASON_FEATURE, Learner, PatternKey, largest_sizes
from lotflow.verification.explain import Contribution, Describe, explain

__all__ = [
    "Evaluation",
    "NodeConfig",
    "Reason",
    "Route",
    "Scorer",
    "Severity",
    "SoftEnvelope",
    "Verdict",
    "VerificationNode",
    "decide",
    "graded",
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


MAX_GRADE = 99.0  # the largest size a graded pattern carries: this many units and beyond


def graded(code: str, size: float, *, signed: bool = False) -> str:
    """The pattern of a reason of this size (``QUANTITY_OVER~3.40``), bounded (a reference of
    identical values puts z near 1e9: one pattern for all of them, not one per distance).
    ``signed``: each direction is a pattern of its own (``PRICE_ANOMALY-~20.00``: an accepted
    discount says nothing about an overcharge). Not a number: the bare code."""
    if math.isnan(size):
        return code
    direction = ("-" if size < 0 else "+") if signed else ""
    return f"{code}{direction}{GRADE}{min(abs(size), MAX_GRADE):.2f}"


@dataclass(frozen=True, slots=True)
class SoftEnvelope:
    """Where a reason is soft: always (``evidence`` empty), or while ``|evidence value| <= limit``."""

    meaning: str
    evidence: str = ""
    limit: float = 0.0
    # People's decisions are kept with the size of ``|evidence[graded_by]|`` (empty: one pattern):
    # a vendor allowed 4 % over is accepted at 3 % and rejected at 4.5 % (``Learner`` graded patterns);
    # ``signed``: each sign of the value its own pattern.
    graded_by: str = ""
    signed: bool = False

    def holds(self, reason: Reason) -> bool:
        if not self.evidence:
            return True
        try:
            return abs(float(reason.evidence[self.evidence])) <= self.limit
        except (KeyError, ValueError):
            return False  # no evidence to judge by: hard

    def pattern(self, reason: Reason) -> str:
        """The pattern people's decisions on this reason are counted by: its code, with its size
        where it is graded."""
        if not self.graded_by:
            return reason.code
        try:
            size = float(reason.evidence[self.graded_by])
        except (KeyError, ValueError):
            return reason.code
        return graded(reason.code, size, signed=self.signed) if math.isfinite(size) else reason.code


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
    soft: Mapping[str, SoftEnvelope] = field(default_factory=dict)

    def is_soft(self, reason: Reason) -> bool:
        envelope = self.soft.get(reason.code)
        return envelope is not None and envelope.holds(reason)

    def split(self, reasons: Sequence[Reason]) -> tuple[list[Reason], list[Reason]]:
        """(hard, soft) among the reasons that count (INFO reasons only explain)."""
        hard: list[Reason] = []
        soft: list[Reason] = []
        for r in reasons:
            if r.severity is not Severity.INFO:
                (soft if self.is_soft(r) else hard).append(r)
        return hard, soft

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


def decide(config: NodeConfig, confidence: float, reasons: Sequence[Reason], *, soft_cleared: bool = False) -> Verdict:
    """Verified at or above the node threshold unless a hard reason stands, or a soft one that
    people have not cleared (``soft_cleared``); HIGH below the priority band.

    >>> cfg = NodeConfig("n", 0.9, 0.75, {}, Route("q", "look"))
    >>> decide(cfg, 0.95, []).decision
    'VERIFIED'
    >>> decide(cfg, 0.80, []).priority
    'NORMAL'
    >>> decide(cfg, 0.5, []).priority
    'HIGH'
    """
    hard, soft = config.split(reasons)
    blocked = bool(hard) or (bool(soft) and not soft_cleared)
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
    prior_decision: str = ""  # what the documented prior alone, without learning, would have decided
    spot_check: bool = False  # verified, and drawn for a person's unbiased label
    soft_codes: tuple[str, ...] = ()  # "<material>|<pattern>" of each soft reason: what a label on it teaches
    by_rule: bool = False  # held by a rule whatever the confidence (hard, or soft and not cleared)


DRIFT_DETECTED = "DRIFT_DETECTED"
SPOT_CHECK = "SPOT_CHECK"
LOGIT_LIMIT = 30.0  # the prior's logit as a feature, bounded (a dozen failed rules say nothing more)


@dataclass
class VerificationNode(Generic[Context]):
    """checks -> features -> score -> decide, for one pattern's context type.

    ``identity`` names the subject and its vendor; ``pattern_keys`` the vendor x material x
    reason patterns a soft reason belongs to (what people's decisions on it are counted by; a
    control-chart signal: one per CoA property of the receipt that stands out).
    """

    config: NodeConfig
    checks: Sequence[Callable[[Context], list[Reason]]]
    features: Callable[[Context, Sequence[Reason]], Features]
    learner: Learner
    identity: Callable[[Context], tuple[str, str]]
    pattern_keys: Callable[[Context, Reason], Sequence[PatternKey]]
    describe: Describe[Context] = field(default_factory=lambda: Describe({}))

    def evaluate(self, context: Context) -> Evaluation:
        reasons: list[Reason] = []
        for check in self.checks:
            reasons.extend(check(context))
        learner = self.learner
        subject, vendor = self.identity(context)
        # a non-finite feature (an overflowing price) would be stored as null and fail the label
        x = {k: v for k, v in self.features(context, reasons).items() if math.isfinite(v)}
        hard, soft = self.config.split(reasons)
        # the rule counts as the prior weighs them: hard ones, and soft ones with what people decided
        block = float(sum(r.severity is Severity.BLOCK for r in hard))
        x.update(zip(HARD_REASON_FEATURES, (block, float(len(hard)) - block), strict=True))
        if soft:
            x[SOFT_REASON_FEATURE] = float(len(soft))
        keys = largest_sizes(key for r in soft for key in self.pattern_keys(context, r))
        x.update(learner.pattern_features(keys))
        prior_logit = max(-LOGIT_LIMIT, min(LOGIT_LIMIT, learner.scorer.prior.logit(x)))
        x["prior_logit"] = prior_logit
        cleared = all(learner.accepted(key) for key in keys)
        drift = learner.drift_of(vendor)
        if drift is not None and soft:
            cleared = False
            reasons.append(Reason(DRIFT_DETECTED, drift.describe(vendor, learner.config.relax_after), Severity.INFO,
                                  {"vendor_id": vendor, "error_before": f"{drift.error_before:.4g}",
                                   "error_after": f"{drift.error_after:.4g}",
                                   "detected_at_label": str(drift.detected_at_label)}))
        # held by a soft reason people had not cleared: whatever the score, and calibrated as such
        confidence = learner.confidence(x, held_open=bool(soft) and not cleared and not hard)
        verdict = decide(self.config, confidence, reasons, soft_cleared=cleared)
        prior = decide(self.config, 1.0 / (1.0 + math.exp(-prior_logit)), reasons)
        evaluation = Evaluation(tuple(reasons), x, verdict, learner.version, prior_decision=prior.decision,
                                soft_codes=tuple(f"{key[1]}|{key[2]}" for key in keys),
                                by_rule=bool(hard) or (bool(soft) and not cleared))
        if verdict.decision == "EXCEPTION":  # explained where a person will read it
            evaluation.contributions = explain(context, reasons, x, learner.contributions(x), self.describe)
        elif learner.is_spot_check(subject):
            evaluation.spot_check = True
        return evaluation
