"""The review service's pure parts: evidence side by side, sessions, login limits, decisions."""

from __future__ import annotations

import math

import pytest

from lotflow.review.app import _percent, _safe_next
from lotflow.review.decisions import Decision, Resolution
from lotflow.review.evidence import side_by_side
from lotflow.review.security import LoginLimiter, Sessions, same_token

from .receiving_fixtures import SPECS, coa, po, receipt


def test_evidence_marks_the_cells_the_reasons_point_at() -> None:
    r = receipt(quantity=1200.0, price=2.5)
    reasons = [
        {"code": "QUANTITY_OVER", "severity": "BLOCK", "message": "over", "evidence": {"po_line": "1"}},
        {"code": "COA_OUT_OF_SPEC", "severity": "BLOCK", "message": "purity 97 outside [98, 100]",
         "evidence": {"vendor_lot": "L-1", "property": "purity"}},
        {"code": "UNIT_CONVERTED", "severity": "INFO", "message": "", "evidence": {}},
    ]
    [line] = side_by_side(r, po(), [coa(purity=97.0)], SPECS, reasons)
    assert line.quantity.mismatch and (line.quantity.received, line.quantity.ordered) == ("1200", "1000")
    assert not line.price.mismatch and not line.material.mismatch and not line.unit.mismatch
    [purity] = line.properties
    assert purity.mismatch and purity.value == "97 %" and (purity.low, purity.high) == ("98", "100")
    assert "outside" in purity.note
    assert line.reasons == ["COA_OUT_OF_SPEC", "QUANTITY_OVER"]


def test_evidence_without_po_or_certificate_shows_what_is_missing() -> None:
    [line] = side_by_side(receipt(lot="L-7"), None, [], SPECS,
                          [{"code": "MISSING_COA", "severity": "BLOCK", "message": "",
                            "evidence": {"vendor_lot": "L-7"}},
                           {"code": "COA_INCOMPLETE", "severity": "BLOCK", "message": "no purity",
                            "evidence": {"vendor_lot": "L-8", "property": "purity"}}])
    assert line.po_line.ordered == "(none)" and line.lot.mismatch
    assert line.properties[0].value == "" and not line.properties[0].mismatch  # that reason is about lot L-8


def test_sessions_expire_when_idle_and_end_on_logout() -> None:
    now = [0.0]
    sessions = Sessions(idle_s=60, clock=lambda: now[0])
    token, session = sessions.create("rita")
    assert sessions.get(token) is session and sessions.get("forged") is None and sessions.get(None) is None
    now[0] += 59
    assert sessions.get(token) is session  # activity keeps it alive
    now[0] += 61
    assert sessions.get(token) is None
    token, _ = sessions.create("rita")
    sessions.drop_user("rita")
    assert sessions.get(token) is None


def test_login_limits_per_user_and_per_client_in_a_sliding_window() -> None:
    now = [0.0]
    limiter = LoginLimiter(per_user=3, per_client=5, window_s=100, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("Rita", "10.0.0.1") == 0
        limiter.failed("Rita", "10.0.0.1")
    assert limiter.retry_after("rita", "10.0.0.2") == 100  # names are case-blind
    assert limiter.retry_after("sam", "10.0.0.1") == 0
    limiter.failed("sam", "10.0.0.1")
    limiter.failed("ann", "10.0.0.1")
    assert limiter.retry_after("bob", "10.0.0.1") == 100  # the address is over its limit
    now[0] += 101
    assert limiter.retry_after("rita", "10.0.0.1") == 0


def test_tokens_compare_in_constant_time_and_never_match_empty() -> None:
    assert same_token("abc", "abc") and not same_token("abc", "abd")
    assert not same_token("", "") and not same_token(None, None)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"resolution": Resolution.ACCEPT, "reasoning": "  ", "certainty": 0.5}, "reasoning is required"),
    ({"resolution": Resolution.ACCEPT, "reasoning": "ok", "certainty": 1.5}, "between 0 and 1"),
    ({"resolution": Resolution.ACCEPT, "reasoning": "ok", "certainty": math.nan}, "between 0 and 1"),
    ({"resolution": Resolution.CONDITIONAL_ACCEPT, "reasoning": "ok", "certainty": 1.0}, "needs its condition"),
    ({"resolution": Resolution.REASSIGN, "reasoning": "ok", "certainty": 1.0, "reassign_to": "nowhere"},
     "reassign_to must be one of"),
    ({"resolution": Resolution.ACCEPT, "reasoning": "x" * 5000, "certainty": 1.0}, "at most 4000"),
])
def test_a_decision_is_refused_with_a_clear_message(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Decision(**kwargs)  # type: ignore[arg-type]


def test_certainty_is_typed_in_percent_and_redirects_stay_on_site() -> None:
    assert _percent("90") == 0.9 and _percent("0") == 0.0
    for bad in ("", "abc", "101", "-1", "nan"):
        with pytest.raises(ValueError):
            _percent(bad)
    assert _safe_next("/queue/receiving") == "/queue/receiving"
    for evil in ("https://evil.example", "//evil.example", "/\\evil", "queue"):
        assert _safe_next(evil) == "/"
