"""Decision bands and routing of the one verification-node mechanism."""

from __future__ import annotations

import pytest

from lotflow.verification.node import Reason, Severity, decide
from lotflow.verification.receiving import LOW_CONFIDENCE, node_config

CONFIG = node_config(0.90, 0.75)


@pytest.mark.parametrize(
    ("confidence", "decision", "priority"),
    [(0.99, "VERIFIED", "NORMAL"), (0.90, "VERIFIED", "NORMAL"), (0.8999, "EXCEPTION", "NORMAL"),
     (0.75, "EXCEPTION", "NORMAL"), (0.7499, "EXCEPTION", "HIGH"), (0.0, "EXCEPTION", "HIGH")],
)
def test_receiving_bands(confidence: float, decision: str, priority: str) -> None:
    verdict = decide(CONFIG, confidence, [])
    assert (verdict.decision, verdict.priority) == (decision, priority)


def test_a_blocking_reason_is_an_exception_whatever_the_confidence() -> None:
    reason = Reason("PRICE_ANOMALY", "x", Severity.BLOCK)
    verdict = decide(CONFIG, 0.999, [reason])
    assert verdict.decision == "EXCEPTION"
    assert verdict.route is not None and verdict.route.queue == "operations_analyst"


def test_route_follows_the_most_severe_reason() -> None:
    reasons = [Reason("PROBABLE_UNIT_MISLABEL", "x", Severity.WARN), Reason("COA_OUT_OF_SPEC", "x", Severity.BLOCK)]
    assert CONFIG.route_for(reasons).queue == "supplier_quality"
    assert CONFIG.route_for([Reason("COA_ATYPICAL", "x", Severity.INFO)]) == LOW_CONFIDENCE
