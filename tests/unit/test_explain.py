"""Exceptions worth a person's minutes: contributions in words, the historical pattern, routing."""

from __future__ import annotations

import math

import pytest

from lotflow.scorers import history
from lotflow.scorers.model import OnlineConfidence
from lotflow.scorers.prior import CheckPrior
from lotflow.verification import receiving as rv
from lotflow.verification.explain import Describe, explain, logit_text
from lotflow.verification.node import Reason, Severity, decide
from lotflow.verification.queues import QUEUE_OF_CLASS, Queue, ReasonClass

from .receiving_fixtures import po, receipt
from .test_receiving_checks import context, state

MINUS = "\u2212"


def test_prior_contributions_are_the_logit_terms_signed() -> None:
    prior = CheckPrior()
    x = {"n_block": 1.0, "n_warn": 0.0, "coa_max_abs_z": 4.8, "vendor_exception_rate": 0.2, "n_lines": 3.0}
    shares = prior.contributions(x)
    assert shares == pytest.approx({"n_block": -6.0, "coa_max_abs_z": -2.3, "vendor_exception_rate": -1.2})
    assert prior.base_logit + sum(shares.values()) == pytest.approx(prior.logit(x))
    p = prior.predict_proba_one(x)[True]
    assert p == pytest.approx(1 / (1 + math.exp(-(prior.base_logit + sum(shares.values())))))
    assert prior.contributions({}) == {}  # a clean receipt: nothing pulled it down


def test_learnt_contributions_start_as_the_prior_and_add_the_corrections() -> None:
    model = OnlineConfidence()
    x = {"n_block": 1.0, "coa_max_abs_z": 4.0}
    assert model.contributions(x) == pytest.approx(model.prior.contributions(x))
    for i in range(10):
        model.learn_one({"n_block": float(i % 2), "coa_max_abs_z": float(i)}, i % 2 == 0)
    learnt = model.contributions(x)
    # the prior's shares scaled by its learnt weight, the corrections added
    assert set(learnt) >= set(model.prior.contributions(x))
    assert learnt["n_block"] != pytest.approx(model.prior.contributions(x)["n_block"])


def test_explain_lists_only_what_pulled_down_largest_first_in_words() -> None:
    describe: Describe[None] = Describe({"a": lambda ctx, reasons, v: f"a is {v:g}"})
    out = explain(None, [], {"a": 2.0, "b": 0.5, "c": 1.0}, {"a": -0.5, "b": -2.25, "c": 0.7, "d": -0.01},
                  describe)
    assert [c.feature for c in out] == ["b", "a"]  # c pushed up, d is noise
    assert out[0].logit == -2.25 and out[0].text == f"b = 0.5: {MINUS}2.2 logit"
    assert out[1].text == f"a is 2: {MINUS}0.5 logit"
    assert explain(None, [], {}, {f"f{i}": -float(i + 1) for i in range(10)}, describe, limit=3)[0].feature == "f9"
    assert logit_text(1.25) == "+1.2 logit"


def _atypical_context() -> rv.ReceivingContext:
    profile = history.empty_profile()
    for value in (99.0, 99.1, 98.9, 99.05, 98.95, 99.0):
        profile["stats"]["MAT-1|purity"] = history.observe_value(profile["stats"].get("MAT-1|purity"), value)
    return context(receipt(), state(po(), {"L-1": {"values": {"purity": 99.9}}}), profile)


def test_receiving_contributions_name_the_property_lot_distance_and_history() -> None:
    ctx = _atypical_context()
    reasons = rv.check_certificates(ctx)
    x = rv.features(ctx, reasons)
    out = explain(ctx, reasons, x, CheckPrior().contributions(x), rv.DESCRIBE)
    assert out[0].feature == "coa_max_abs_z"
    z = x["coa_max_abs_z"]
    assert out[0].text.startswith(f"CoA purity of lot L-1 +{z:.1f} \u03c3 from this vendor's last 6 lots of MAT-1: ")
    assert out[0].text.endswith(f"{MINUS}{z - 2.5:.1f} logit")


def test_blocking_reasons_are_named_in_their_contribution() -> None:
    ctx = context(receipt(quantity=1200.0), state(coas={"L-1": {"values": {"purity": 97.0}}}))
    reasons = [r for check in rv.CHECKS for r in check(ctx)]
    x = rv.features(ctx, reasons)
    out = explain(ctx, reasons, x, CheckPrior().contributions(x), rv.DESCRIBE)
    assert out[0].feature == "n_block"
    assert out[0].text == f"2 rules failed (COA_OUT_OF_SPEC, QUANTITY_OVER): {MINUS}12.0 logit"


def test_historical_pattern_counts_receipts_reasons_and_person_decisions() -> None:
    profile = history.empty_profile()
    for i in range(50):
        history.observe_reasons(profile, ["MAT-1"], ["COA_OUT_OF_SPEC"] if i % 10 == 0 else [])
    for resolution in ("ACCEPT", "ACCEPT", "CONDITIONAL_ACCEPT", "REJECT"):
        history.observe_person_decision(profile, "MAT-1", "COA_OUT_OF_SPEC", resolution)
    ctx = context(receipt(), state(coas={"L-1": {"values": {"purity": 97.0}}}), profile)
    reasons = rv.check_certificates(ctx)
    verdict = decide(rv.node_config(0.9, 0.75), 0.01, reasons)
    pattern = rv.pattern_of(ctx, verdict.reason)
    assert pattern.to_record() == {"material_id": "MAT-1", "reason_code": "COA_OUT_OF_SPEC", "prior_receipts": 50,
                                   "with_reason": 5, "decided_by_person": 4, "accepted_by_person": 3}
    assert rv.pattern_text(ctx, pattern) == ("Vendor V-1, material MAT-1: 50 prior receipts; COA_OUT_OF_SPEC in "
                                             "10 % of them (5); accepted by a person in 75 % of those (3 of 4 "
                                             "decided)")
    assert rv.recommendation(pattern, verdict).startswith("Accept: people accepted 2 of 4 similar exceptions "
                                                          "(50 %). Otherwise: Quarantine the lot")


def test_without_person_decisions_the_route_default_step_is_recommended() -> None:
    ctx = context(receipt(), state(coas={"L-1": {"values": {"purity": 97.0}}}))
    verdict = decide(rv.node_config(0.9, 0.75), 0.01, rv.check_certificates(ctx))
    pattern = rv.pattern_of(ctx, verdict.reason)
    assert rv.pattern_text(ctx, pattern) == ("Vendor V-1, material MAT-1: 0 prior receipts; "
                                             "no person has decided one yet")
    assert verdict.route is not None and rv.recommendation(pattern, verdict) == verdict.route.action


def test_pooled_history_adds_the_reason_counts_of_every_partition() -> None:
    a, b = history.empty_profile(), history.empty_profile()
    history.observe_reasons(a, ["M"], ["X"])
    history.observe_reasons(b, ["M", "M"], ["X", "Y"])  # one receipt, two lines of M
    history.observe_person_decision(b, "M", "X", "REJECT")
    view = history.pooled([a, b], [], ["M"])
    counts = history.pattern_counts(view, "M", "X")
    assert (counts.prior_receipts, counts.with_reason, counts.decided, counts.rejected) == (2, 2, 1, 1)
    assert history.pattern_counts(view, "other", "X").prior_receipts == 0


@pytest.mark.parametrize(("code", "queue"), [
    ("MISSING_COA", Queue.RECEIVING), ("UNKNOWN_PO", Queue.RECEIVING), ("QUANTITY_OVER", Queue.RECEIVING),
    ("COA_OUT_OF_SPEC", Queue.SUPPLIER_QUALITY), ("MATERIAL_MISMATCH", Queue.SUPPLIER_QUALITY),
    ("UNIT_MISMATCH", Queue.QC_TECHNICIAN), ("COA_ATYPICAL", Queue.QC_TECHNICIAN),
    ("PRICE_ANOMALY", Queue.OPERATIONS_ANALYST),
])
def test_routes_follow_the_reason_class(code: str, queue: Queue) -> None:
    reasons = [Reason("PARTIAL_DELIVERY", "", Severity.INFO), Reason(code, "", Severity.BLOCK)]
    verdict = decide(rv.node_config(0.9, 0.75), 0.5, reasons)
    assert verdict.route is not None and verdict.route.queue == queue.value
    assert verdict.reason is not None and verdict.reason.code == code


def test_every_reason_class_has_a_queue_and_every_queue_a_title() -> None:
    assert set(QUEUE_OF_CLASS) == set(ReasonClass)
    assert QUEUE_OF_CLASS[ReasonClass.PROCESS] is Queue.MANUFACTURING_ENGINEERING
    assert {q.title for q in Queue} == {"Receiving", "Supplier Quality", "QC technician", "Operations analyst",
                                        "Manufacturing Engineering"}
    assert all(route.queue in {q.value for q in Queue} for route in rv.ROUTES.values())


def test_low_confidence_without_a_rule_goes_to_supplier_quality_with_its_own_pattern_key() -> None:
    verdict = decide(rv.node_config(0.9, 0.75), 0.5, [])
    assert verdict.reason is None and verdict.route is rv.LOW_CONFIDENCE
    ctx = context(receipt(), state())
    assert rv.pattern_of(ctx, None).reason_code == "LOW_CONFIDENCE"


def test_the_pattern_of_a_quantity_reason_is_about_the_lines_material() -> None:
    ctx = context(receipt(quantity=1200.0), state())
    verdict = decide(rv.node_config(0.9, 0.75), 0.01, rv.check_lines(ctx))
    assert verdict.reason is not None and verdict.reason.code == "QUANTITY_OVER"
    assert rv.pattern_of(ctx, verdict.reason).material_id == "MAT-1"  # not the received quantity
