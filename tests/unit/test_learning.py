"""What the node learns from people: the soft/hard table, labels, spot checks, the gate, drift,
identical replicas and checkpoints, and the processor acting on what was learnt."""

from __future__ import annotations

import collections
import itertools
import math
import pickle
import random
import statistics
from typing import Any

import pytest

from lotflow.scorers import spc
from lotflow.scorers.history import ChartView, empty_profile
from lotflow.scorers.learner import Label, Learner, LearnerConfig, largest_sizes, split_grade, spot_check_draw
from lotflow.settings import Settings
from lotflow.streams import topics
from lotflow.streams.learning import Checkpoint
from lotflow.streams.receiving import learner_config
from lotflow.verification import receiving as rules
from lotflow.verification.node import Reason, Severity, graded

from .receiving_fixtures import coa, po, receipt
from .test_receiving_processor import DECISION, Run, event


def _reason(code: str, severity: Severity = Severity.BLOCK, **evidence: str) -> Reason:
    return Reason(code, code, severity, evidence)


@pytest.mark.parametrize(("reason", "soft"), [
    (_reason("QUANTITY_OVER", deviation_pct="3.5"), True),
    (_reason("QUANTITY_OVER", deviation_pct="5"), True),
    (_reason("QUANTITY_OVER", deviation_pct="5.01"), False),  # beyond the envelope: hard
    (_reason("QUANTITY_OVER"), False),  # no evidence to judge by: hard
    (_reason("PRICE_ANOMALY", deviation_pct="-24"), True),
    (_reason("PRICE_ANOMALY", deviation_pct="26"), False),
    (_reason("SPC_SIGNAL", Severity.WARN), True),
    (_reason("COA_OUT_OF_SPEC"), False),
    (_reason("UNKNOWN_PO"), False),
    (_reason("PO_LINE_CANCELLED"), False),
    (_reason("UNIT_MISMATCH"), False),
    (_reason("DUPLICATE_RECEIPT"), False),
    (_reason("PROBABLE_UNIT_MISLABEL", Severity.WARN), False),
    (_reason("QUANTITY_SHORT", deviation_pct="-3"), False),
])
def test_the_soft_table_decides_what_the_model_may_learn(reason: Reason, soft: bool) -> None:
    config = rules.node_config(0.9, 0.75)
    hard_ones, soft_ones = config.split([reason])
    assert (soft_ones == [reason], hard_ones == [reason]) == (soft, not soft)


def test_info_reasons_never_count_as_hard_or_soft() -> None:
    config = rules.node_config(0.9, 0.75)
    assert config.split([_reason("COA_ATYPICAL", Severity.INFO), _reason("UNIT_CONVERTED", Severity.INFO)]) == ([], [])


def test_spot_checks_are_fixed_per_receipt_and_unbiased() -> None:
    ids = [f"R-{i}" for i in range(100_000)]
    draws = [spot_check_draw(i) for i in ids]
    assert draws == [spot_check_draw(i) for i in ids]  # the same receipt is always drawn alike
    share = sum(d < 0.02 for d in draws) / len(draws)
    assert 0.019 < share < 0.021
    # unbiased: the draw does not depend on anything but the id (odd/even ids alike)
    odd = sum(d < 0.02 for d in draws[1::2]) / len(draws[1::2])
    even = sum(d < 0.02 for d in draws[0::2]) / len(draws[0::2])
    assert abs(odd - even) < 0.003


def _label(i: int, good: bool, vendor: str = "V1", code: str = "QUANTITY_OVER", confidence: float = 0.5,
           spot: bool = False, **features: float) -> Label:
    return Label(f"D-{i}", vendor, "M1", (code,) if code else (), {"n_soft": 1.0, **features}, good, confidence,
                 spot)


def test_a_pattern_is_cleared_by_consistent_accepts_and_closed_by_a_reject() -> None:
    learner = Learner(LearnerConfig(accepts_needed=3))
    key = ("V1", "M1", "QUANTITY_OVER")
    for i in range(2):
        learner.learn(_label(i, True), i)
    assert not learner.accepted(key)
    learner.learn(_label(2, True), 2)
    assert learner.accepted(key)
    assert not learner.accepted(("V2", "M1", "QUANTITY_OVER"))  # per vendor
    learner.learn(_label(3, False), 3)
    assert learner.accepted(key)  # one reject among the last 10: a slip, or another fault of that receipt
    learner.learn(_label(4, False), 4)
    assert not learner.accepted(key)
    features = learner.pattern_features([key])
    assert features["pattern_accept_share"] == pytest.approx((3 + 1) / (5 + 2))


def _line(facts: list[rules.CoaFact], lot: str = "L-1", po_line: int = 1, material: str = "M1") -> rules.LineFact:
    return rules.LineFact(line={"vendor_lot": lot, "po_line": po_line, "material_id": material}, po_line=None,
                          spec=None, coa_facts=facts)


def _context(lines: list[rules.LineFact]) -> rules.ReceivingContext:
    """A receipt's context with only what grading and the certificate checks read (real types:
    the compiled core checks them)."""
    return rules.ReceivingContext(receipt={"vendor_id": "V1"}, po=None, lines=lines, totals=[], missing=[],
                                  duplicate_receipt_of="", vendor_profile=empty_profile(),
                                  rules=rules.ReceivingRules())


def test_a_control_chart_signal_is_graded_per_property_of_the_lot() -> None:
    signalled = [spc.Signal("NELSON_1", "far", {})]

    def fact(prop: str, ref_z: float | None, *, signal: bool = False, level: float | None = None,
             epoch: int = 0) -> rules.CoaFact:
        chart = ChartView(epoch, [60, 99.0, 0.01], [])
        return rules.CoaFact(prop, 99.0, 98.0, 100.0, None, (60, 99.0, 0.1), chart=chart, ref_z=ref_z,
                             signals=signalled if signal else [], level=level)

    def keys(*facts: rules.CoaFact, material: str = "M1", more: tuple[rules.CoaFact, ...] = ()) -> list[Any]:
        lines = [_line(list(facts), material=material)]
        if more:
            lines.append(_line(list(more), "L-2", 2, material))
        ctx = _context(lines)
        return rules.pattern_keys(ctx, _reason("SPC_SIGNAL", Severity.WARN, vendor_lot="L-1", z="2.4"))

    # the signalled value, and only those others that stand out (beyond SPC_FREE_Z)
    assert keys(fact("purity", 2.6, signal=True), fact("water", -1.0)) == [("V1", "M1", "SPC_SIGNAL:purity~2.60")]
    assert keys(fact("purity", 0.4, signal=True), fact("water", -3.1)) == [
        ("V1", "M1", "SPC_SIGNAL:purity~0.40"), ("V1", "M1", "SPC_SIGNAL:water~3.10")]
    # a moved process level is a pattern of its own
    assert keys(fact("purity", 1.2, signal=True, level=-2.4)) == [
        ("V1", "M1", "SPC_SIGNAL:purity~1.20"), ("V1", "M1", "SPC_LEVEL:purity~2.40")]
    # two lots of one material: the farther value; a re-baselined chart: a pattern of its own
    assert keys(fact("purity", 2.6, signal=True), more=(fact("purity", 4.0),)) == [
        ("V1", "M1", "SPC_SIGNAL:purity~4.00")]
    assert keys(fact("purity", 2.6, signal=True, epoch=1234)) == [("V1", "M1", "SPC_SIGNAL:purity/1234~2.60")]
    # bounded (a reference of identical values puts z near 1e9); separators in a name made harmless
    assert keys(fact("a|b~c", 3e9, signal=True)) == [("V1", "M1", "SPC_SIGNAL:a_b_c~99.00")]
    # no value to grade by: the reason's own pattern; out of spec is a rule's (a waiver clears no distance)
    assert keys(fact("purity", None), fact("water", math.nan)) == [("V1", "M1", "SPC_SIGNAL")]
    off_spec = fact("purity", 12.0, signal=True)
    off_spec.value = 101.0
    assert keys(off_spec, fact("water", 2.6, signal=True)) == [("V1", "M1", "SPC_SIGNAL:water~2.60")]
    # an over-delivery is graded by its own size only
    over = _reason("QUANTITY_OVER", deviation_pct="3.5", vendor_lot="L-1")
    ctx = _context([_line([fact("purity", 9.0)])])
    assert rules.pattern_keys(ctx, over) == [("V1", "M1", "QUANTITY_OVER~3.50")]
    assert rules.pattern_keys(ctx, _reason("QUANTITY_OVER", deviation_pct="nan")) == [("V1", "M1", "QUANTITY_OVER")]


def _chart_reasons(ref_z: float, **signal: Any) -> tuple[Any, list[Reason]]:
    """A lot whose purity is ``ref_z`` reference sigma out with ``signal`` (a level or a spread), and
    whose water is ordinary: the receipt's context and its certificate reasons."""
    chart = ChartView(0, [60, 99.0, 0.01], [])
    far = rules.CoaFact("purity", 99.0, 98.0, 100.0, None, (60, 99.0, 0.1), chart=chart, ref_z=ref_z, **signal)
    plain = rules.CoaFact("water", 99.0, 98.0, 100.0, None, (60, 99.0, 0.1), chart=chart, ref_z=1.1)
    ctx = _context([_line([far, plain])])
    return ctx, rules.check_certificates(ctx)


def test_a_moved_process_level_is_a_chart_signal_even_where_the_lot_itself_signals_nothing() -> None:
    """Runs 18 and 21: lots of the drifting vendor right after a signal (the CUSUMs start again from
    zero) had no reason at all and were verified at 0.98."""
    ctx, reasons = _chart_reasons(1.1, level=2.4)
    assert [(r.code, r.severity, r.evidence["property"], r.evidence["charts"]) for r in reasons] == [
        ("SPC_SIGNAL", Severity.WARN, "purity", rules.PROCESS_LEVEL)]
    assert reasons[0].evidence["process_level"] == "2.4" and "average +2.4 sigma" in reasons[0].message
    assert rules.pattern_keys(ctx, reasons[0]) == [("V1", "M1", "SPC_LEVEL:purity~2.40")]


def test_a_wider_spread_is_a_chart_signal_for_a_far_lot_the_charts_passed() -> None:
    """Run 28: lots of the variance-jump vendor beyond 4 true sigma, inside 4 reference sigma (a
    reference sigma 1.16 x too wide), between its variance CUSUM's signals: no reason at all."""
    ctx, reasons = _chart_reasons(-3.4, spread=5)
    assert [(r.code, r.severity, r.evidence["property"], r.evidence["charts"]) for r in reasons] == [
        ("SPC_SIGNAL", Severity.WARN, "purity", rules.PROCESS_SPREAD)]
    assert reasons[0].evidence["wide_lots"] == "5" and "a wider spread" in reasons[0].message
    # graded by the lot's own distance, like any far value on a signal
    assert rules.pattern_keys(ctx, reasons[0]) == [("V1", "M1", "SPC_SIGNAL:purity~3.40")]


def test_a_lots_facts_carry_the_spread_of_its_charts_recent_lots() -> None:
    """Through the facts a receipt is checked on: the chart's recent lots (held ones too) decide."""
    spec = {"properties": [{"name": "purity", "min": 98.0, "max": 100.0, "unit": "%"}]}
    line = {"material_id": "M1", "vendor_lot": "L-1"}

    def facts(recent: list[float]) -> rules.CoaFact:
        chart = ChartView(0, [60, 99.0, 0.59], [99.0] * 5, recent)  # reference mean 99.0, sigma 0.1
        [fact] = rules._coa_facts(line, spec, {"purity": [99.3, "%"]}, {}, {"M1|purity": chart})  # type: ignore[arg-type]
        return fact

    wide = facts([99.0, 99.25, 99.0, 98.75, 99.0, 99.22])  # 3 beyond 2 sigma, and this lot at 3.0
    assert wide.ref_z == pytest.approx(3.0) and wide.spread == 4 and not wide.signals and wide.level is None
    assert facts([99.0, 99.25, 99.0, 98.85, 99.0, 99.22]).spread is None  # 2 beyond: ordinary scatter


def test_the_process_spread_counts_far_lots_around_a_far_lot() -> None:
    assert rules.process_spread([2.6, -0.3, -2.4, 0.8, 3.1], -2.9) == 4
    assert rules.process_spread([2.6, -0.3, -2.4, 0.8, 3.1], -2.4) is None  # this lot is ordinary scatter
    assert rules.process_spread([2.6, -2.4, 3.1], -2.9) is None  # too few lots to say
    assert rules.process_spread([2.6, math.nan, -2.4, math.inf, 3.1, 0.0], 2.9) == 5  # inf is far, NaN is not
    rng = random.Random(5)

    def fired(scale: float) -> float:
        values = [scale * rng.gauss(0.0, 1.0) for _ in range(20_000)]
        hits = [rules.process_spread(values[i:i + 9], values[i + 9]) for i in range(len(values) - 9)]
        return sum(hit is not None for hit in hits) / len(hits)

    assert fired(1.0) < 0.001  # in control (normal: fewer than 1 in 1,000 values)
    assert fired(3.0) > 0.2  # a tripled spread: a fifth of its values and more


def test_a_graded_pattern_clears_the_sizes_people_accepted_larger_and_never_rejected_smaller() -> None:
    """One accept clears the sizes below it where nobody rejected one between; else graded_accepts."""
    learner = Learner(LearnerConfig(graded_accepts=2, max_rejects=1, graded_window=8))

    def teach(n: int, size: float, good: bool) -> None:
        learner.learn(Label(f"d{n}", "V1", "M1", (f"M1|QUANTITY_OVER~{size:.2f}",), {"n_soft": 1.0}, good, 0.5), n)

    def cleared(size: float) -> bool:
        return learner.accepted(("V1", "M1", f"QUANTITY_OVER~{size:.2f}"))

    teach(0, 3.8, True)
    assert not cleared(3.0)  # the pattern's only accept: a reviewer's slip would clear everything below it
    teach(1, 2.0, True)  # uncontested, and accepted twice: one accept speaks for every smaller size
    assert cleared(3.0) and cleared(3.8) and not cleared(3.85)
    assert not learner.accepted(("V1", "M1", "PRICE_ANOMALY~3.00"))  # another reason: another pattern
    teach(2, 3.6, False)  # a reject between: now graded_accepts are needed
    assert not cleared(3.0) and not cleared(3.7) and cleared(2.0)  # (3.7: one more accept per reject below)
    teach(3, 3.9, True)
    assert cleared(3.0) and cleared(3.7) and not cleared(3.95)
    teach(4, 4.5, False)  # a reject larger than every accept says nothing about the sizes below
    assert cleared(3.7)
    teach(5, 2.5, False)  # a reject as small asks one more accept; two rejects close it
    assert not cleared(3.0) and cleared(2.4)
    teach(6, 2.0, False)
    assert not cleared(3.0) and cleared(1.9)
    assert learner.pattern_features([("V1", "M1", "QUANTITY_OVER~3.00")])["pattern_accept_share"] == \
        pytest.approx((2 + 1) / (2 + 2 + 2))
    for n in range(7, 10):  # the window is the last graded_window decisions: old accepts age out
        teach(n, 1.0, True)
    assert not cleared(1.9) and cleared(1.0)
    restored = Learner.from_bytes(learner.to_bytes())
    assert restored.fingerprint() == learner.fingerprint() and restored.accepted(("V1", "M1", "QUANTITY_OVER~1.00"))


def test_clearing_a_graded_size_is_monotone_with_ties_and_random_windows() -> None:
    """A receipt is gated at its largest size: clearing a size must clear every smaller one. A reject
    at the size itself is one at most as large, not also one between (a review found 2.0 held while
    3.0 was cleared by accepts at 3.0 and 5.0 over a reject at 2.0)."""
    learner = Learner(LearnerConfig(graded_accepts=2, graded_window=30))
    name = ("V1", "M1", "Q")
    learner.graded[name] = collections.deque([(2.0, False), (3.0, True), (5.0, True)])
    assert learner.accepted((*name[:2], "Q~2.00")) and learner.accepted((*name[:2], "Q~3.00"))
    rng = random.Random(11)
    sizes = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    for _ in range(3000):
        learner.graded[name] = collections.deque(
            (rng.choice(sizes), rng.choice((True, False, None))) for _ in range(rng.randint(0, 8)))
        cleared = [learner.accepted((*name[:2], f"Q~{size:.2f}")) for size in sizes]
        assert all(not later or earlier for earlier, later in itertools.pairwise(cleared)), list(learner.graded[name])


def test_the_uncontested_accepts_are_at_most_the_graded_accepts_and_reach_the_worker() -> None:
    with pytest.raises(ValueError, match="graded_uncontested_accepts"):
        LearnerConfig(graded_accepts=2, graded_uncontested_accepts=3)
    with pytest.raises(ValueError, match="LOTFLOW_SOFT_GRADED_UNCONTESTED_ACCEPTS"):
        Settings(soft_graded_accepts=2, soft_graded_uncontested_accepts=3)
    config = learner_config(Settings(soft_graded_accepts=3, soft_graded_uncontested_accepts=2))
    assert (config.graded_accepts, config.graded_uncontested_accepts) == (3, 2)
    # replicas told another rule hold another model: the fingerprint says so
    assert Learner(LearnerConfig(graded_uncontested_accepts=1)).fingerprint() != \
        Learner(LearnerConfig(graded_uncontested_accepts=2)).fingerprint()


def test_a_reject_is_charged_to_the_lots_values_beyond_what_people_accepted() -> None:
    learner = Learner(LearnerConfig(graded_accepts=3))  # no size below is cleared by the accepts here
    near, far = "M1|SPC_SIGNAL:purity~2.70", "M1|SPC_SIGNAL:water~5.00"
    learner.learn(Label("d0", "V1", "M1", (near,), {"n_soft": 1.0}, True, 0.5), 0)  # purity 2.7 accepted once
    learner.learn(Label("d1", "V1", "M1", (near, far), {"n_soft": 1.0}, False, 0.5), 1)
    # purity's window moves (the decision is one of its receipt's) without a point that counts
    assert learner.graded[("V1", "M1", "SPC_SIGNAL:purity")] == collections.deque([(2.7, True), (2.7, None)])
    assert learner.graded[("V1", "M1", "SPC_SIGNAL:water")] == collections.deque([(5.0, False)])
    assert learner._graded_counts(("V1", "M1", "SPC_SIGNAL:purity"), 2.7) == (1, 0)
    # neither open value beyond what people accepted: both charged
    learner.learn(Label("d2", "V1", "M1", ("M1|SPC_SIGNAL:purity~2.60", "M1|SPC_SIGNAL:water~1.00"),
                        {"n_soft": 1.0}, True, 0.5), 2)
    learner.learn(Label("d3", "V1", "M1", ("M1|SPC_SIGNAL:purity~2.65", "M1|SPC_SIGNAL:water~0.50"),
                        {"n_soft": 1.0}, False, 0.5), 3)
    assert (2.65, False) in learner.graded[("V1", "M1", "SPC_SIGNAL:purity")]
    assert (0.5, False) in learner.graded[("V1", "M1", "SPC_SIGNAL:water")]


@pytest.mark.parametrize(("code", "name", "size"), [
    ("QUANTITY_OVER~3.40", "QUANTITY_OVER", 3.4),
    ("SPC_SIGNAL:purity/12~0.00", "SPC_SIGNAL:purity/12", 0.0),
    ("QUANTITY_OVER@3", "QUANTITY_OVER@3", None),  # a band of an older release: a pattern of its own
    ("QUANTITY_OVER~nan", "QUANTITY_OVER~nan", None),
    ("QUANTITY_OVER~inf", "QUANTITY_OVER~inf", None),
    ("QUANTITY_OVER~x", "QUANTITY_OVER~x", None),
    ("~", "~", None),
])
def test_split_grade(code: str, name: str, size: float | None) -> None:
    assert split_grade(("V", "M", code)) == (("V", "M", name), size)


def test_one_decision_is_one_point_of_a_graded_pattern_at_its_largest_size() -> None:
    # two lines of one material over-delivered 3.5 % and 4.2 %: one accept, not two
    assert largest_sizes([("V", "M", "Q~3.50"), ("V", "M", "X"), ("V", "M", "Q~4.20"), ("V", "M", "Q~1.00")]) == [
        ("V", "M", "Q~4.20"), ("V", "M", "X")]
    # a bare code (no size to read) and a graded pattern of the same reason are two patterns
    assert largest_sizes([("V", "M", "Q"), ("V", "M", "Q~3.00"), ("V", "M", "Q")]) == [
        ("V", "M", "Q"), ("V", "M", "Q~3.00")]
    learner = Learner(LearnerConfig(graded_accepts=2))
    learner.learn(Label("d0", "V1", "M1", ("M1|QUANTITY_OVER~3.50", "M1|QUANTITY_OVER~4.20"), {"n_soft": 1.0},
                        True, 0.5), 0)
    assert list(learner.graded[("V1", "M1", "QUANTITY_OVER")]) == [(4.2, True)]
    assert learner._graded_counts(("V1", "M1", "QUANTITY_OVER"), 3.5) == (1, 0)  # one accept, not two
    assert not learner.accepted(("V1", "M1", "QUANTITY_OVER~3.50"))  # (and one accept alone clears nothing)


def test_a_price_deviation_is_graded_per_direction_and_an_unreadable_size_is_the_bare_code() -> None:
    price = rules.SOFT_REASONS["PRICE_ANOMALY"]
    assert price.pattern(_reason("PRICE_ANOMALY", deviation_pct="-20")) == "PRICE_ANOMALY-~20.00"
    assert price.pattern(_reason("PRICE_ANOMALY", deviation_pct="20")) == "PRICE_ANOMALY+~20.00"
    assert rules.SOFT_REASONS["QUANTITY_OVER"].pattern(_reason("QUANTITY_OVER", deviation_pct="3.4")) == \
        "QUANTITY_OVER~3.40"
    assert graded("QUANTITY_OVER", math.nan) == "QUANTITY_OVER"
    assert graded("QUANTITY_OVER", math.inf) == "QUANTITY_OVER~99.00"


def test_a_checkpoint_of_format_2_loads_without_graded_patterns_or_the_third_map() -> None:
    learner = Learner()
    learner.learn(Label("d0", "V1", "M1", ("M1|QUANTITY_OVER@3",), {"n_soft": 1.0}, True, 0.5), 0)
    state = learner._state()
    state["format"] = 2
    del state["graded"], state["open_calibrator"]
    old = Learner.from_bytes(pickle.dumps(state))
    assert old.graded == {} and len(old.open_calibrator) == 0
    assert old.patterns == learner.patterns  # a band of that release stays a pattern of its own
    assert old.fingerprint() == Learner.from_bytes(learner.to_bytes()).fingerprint()


def test_the_process_level_is_a_moved_mean_not_a_wider_spread() -> None:
    drift = [2.1, 2.4, 1.9, 2.6, 2.0, 2.3, 2.2, 2.5, 1.8]
    assert rules.process_level(drift, 2.2) == pytest.approx(statistics.fmean([*drift, 2.2]))
    assert rules.process_level([-v for v in drift], -2.2) == pytest.approx(-statistics.fmean([*drift, 2.2]))
    rng = random.Random(3)
    jumped = [rng.gauss(0.0, 3.0) for _ in range(2000)]  # a variance jump: wide, centred
    levels = [rules.process_level(jumped[i:i + 9], jumped[i + 9]) for i in range(0, 1990)]
    assert sum(level is not None for level in levels) / len(levels) < 0.02
    assert rules.process_level([0.1, -0.2, 0.3, 0.0, 0.2], 0.1) is None  # in control
    assert rules.process_level([3.0, 0.2, 3.1, 0.1], 2.9) is None  # 1.9 out, within 3 standard errors
    assert rules.process_level([1e300, 1e300, -1e300, 1e300, 1e300, 1e300, 1e300], 1e300) is not None  # no overflow
    assert rules.process_level([2.0, 2.0, 2.0], 2.0) is None  # too few values to say
    assert rules.process_level([2.0, math.nan, 2.0, math.inf, 2.0, 2.0], 2.0) == 2.0  # unreadable ones skipped


def test_a_reject_a_hard_reason_explains_does_not_close_the_soft_pattern() -> None:
    learner = Learner(LearnerConfig(accepts_needed=3))
    key = ("V1", "M1", "QUANTITY_OVER")
    for i in range(3):
        learner.learn(_label(i, True), i)
    missing_coa = {"n_block": 1.0, "reason_missing_coa": 1.0}  # over-delivered, and its CoA is missing
    for i in range(3, 8):
        learner.learn(Label(f"d{i}", "V1", "M1", ("QUANTITY_OVER",), missing_coa, False, 0.2), i)
    assert learner.accepted(key)  # five rejects, each explained by the missing CoA
    assert learner.pattern_features([key])["pattern_accept_share"] == pytest.approx((3 + 1) / (3 + 2))
    assert learner.n_labels == 8  # the model itself learnt from them
    learner.learn(Label("d8", "V1", "M1", ("QUANTITY_OVER",), missing_coa, True, 0.2), 8)
    assert learner.pattern_totals[key] == [4, 0]  # an accept despite a hard reason counts for the pattern
    for i in (9, 10):  # rejects of the over-delivery alone
        learner.learn(Label(f"d{i}", "V1", "M1", ("QUANTITY_OVER",), {"n_block": 0.0}, False, 0.6), i)
    assert not learner.accepted(key)


def test_a_reject_is_charged_to_the_soft_patterns_people_had_not_cleared() -> None:
    learner = Learner(LearnerConfig(accepts_needed=3))
    over, chart = ("V1", "M1", "QUANTITY_OVER@2"), ("V1", "M1", "SPC_SIGNAL@5")
    for i in range(3):
        learner.learn(Label(f"d{i}", "V1", "M1", ("M1|QUANTITY_OVER@2",), {"n_soft": 1.0}, True, 0.9), i)
    both = ("M1|QUANTITY_OVER@2", "M1|SPC_SIGNAL@5")
    for i in (3, 4):  # the agreed over-delivery again, with a far CoA value: the value explains the rejects
        learner.learn(Label(f"d{i}", "V1", "M1", both, {"n_soft": 2.0}, False, 0.1), i)
    assert learner.accepted(over) and learner.pattern_totals[over] == [3, 0]
    assert learner.pattern_totals[chart] == [0, 2]
    for i in range(5, 14):  # people accept the far values from now on: a reject leaves its last 10
        learner.learn(Label(f"d{i}", "V1", "M1", ("M1|SPC_SIGNAL@5",), {"n_soft": 1.0}, True, 0.5), i)
    assert learner.accepted(chart)
    # both cleared, and still rejected: a surprise, counted against both
    learner.learn(Label("d14", "V1", "M1", both, {"n_soft": 2.0}, False, 0.9), 14)
    assert learner.pattern_totals[over] == [3, 1] and learner.pattern_totals[chart] == [9, 3]


def test_replicas_applying_the_same_labels_hold_the_same_model() -> None:
    rng = random.Random(3)
    labels = [_label(i, rng.random() < 0.7, vendor=f"V{i % 3}", confidence=rng.random(), spot=rng.random() < 0.1,
                     coa_max_abs_z=rng.random() * 5, prior_logit=rng.uniform(-5, 5)) for i in range(400)]
    a, b = Learner(), Learner()
    for offset, label in enumerate(labels):
        a.learn(label, offset)
        b.learn(label, offset)
    assert a.fingerprint() == b.fingerprint()
    # a checkpoint after 250 labels, then a replay of every label (older ones are skipped)
    c = Learner()
    for offset, label in enumerate(labels[:250]):
        c.learn(label, offset)
    restored = Learner.from_bytes(c.to_bytes())
    assert restored.version.endswith("/L250/C250")
    for offset, label in enumerate(labels):
        restored.learn(label, offset)
    assert restored.fingerprint() == a.fingerprint() and restored.n_labels == 400
    for x in ({"n_soft": 1.0, "prior_logit": 1.0}, {"prior_logit": 1.0}):
        assert restored.confidence(x) == a.confidence(x)
    with pytest.raises(ValueError, match="checkpoint"):
        Learner.from_bytes(b"\x80\x05K\x01.")  # a pickle of 1, not a learner


def test_drift_tightens_a_vendor_and_agreement_relaxes_it() -> None:
    learner = Learner(LearnerConfig(relax_after=20))
    offset = 0
    for _ in range(300):  # the model is right about V1
        learner.learn(_label(offset, True, code="", confidence=0.97), offset)
        offset += 1
    assert learner.drift_of("V1") is None
    for _ in range(60):  # then V1 changes: what the model trusts people reject
        learner.learn(_label(offset, False, code="", confidence=0.97), offset)
        offset += 1
        if learner.drift_of("V1") is not None:
            break
    drift = learner.drift_of("V1")
    assert drift is not None and drift.error_after > drift.error_before
    assert learner.drift_events and learner.drift_events[0]["vendor_id"] == "V1"
    assert "ADWIN" in drift.describe("V1", 20)
    for _ in range(19):
        learner.learn(_label(offset, False, code="", confidence=0.05), offset)  # agreeing again
        offset += 1
    assert learner.drift_of("V1") is not None
    learner.learn(_label(offset, False, code="", confidence=0.05), offset)
    assert learner.drift_of("V1") is None


def test_quality_uses_spot_checks_for_the_unbiased_figures() -> None:
    learner = Learner()
    for i in range(50):
        learner.learn(_label(i, i % 10 != 0, code="", confidence=0.9, spot=True), i)
    for i in range(50, 100):
        learner.learn(_label(i, False, code="", confidence=0.2), i)
    quality = learner.quality()
    assert quality.spot_checks == 50 and quality.spot_good == 45
    low, high = quality.spot_interval
    assert low < 0.9 < high
    assert quality.ece_spot == pytest.approx(0.0, abs=1e-9)  # confidence 0.9, 90 % good
    assert quality.ece_all == pytest.approx((50 * 0.0 + 50 * 0.2) / 100)


# --- the processor: labels from decisions, and decisions that change the next ones ---------------
def _over_receipt(run: Run, n: int, quantity: float = 1030.0) -> dict[str, Any]:
    """Receipt n of vendor V-1, 3 % over its PO line of 1000 KG: QUANTITY_OVER inside the soft envelope."""
    number, lot = f"PO-{n}", f"L-{n}"
    run.handle(event(topics.PURCHASE_ORDERS, po(number=number), 10 * n),
               event(topics.CERTIFICATES, coa(number=number, lot=lot), 10 * n + 1),
               event(topics.RECEIPTS, receipt(rid=f"R-{n}", number=number, lot=lot, quantity=quantity), 10 * n + 2))
    [decision] = [r for name, _, r in run.sent if name in ("lotflow.exceptions", "lotflow.verified")
                  and r["subject_id"] == f"R-{n}" and not r["id"].endswith(":spot")]
    return decision


def _labels(run: Run) -> list[dict[str, Any]]:
    return [r for name, _, r in run.sent if name == "lotflow.labels"]


def test_accepted_soft_deviations_are_then_verified_and_a_reject_sends_them_back() -> None:
    run = Run(settings=Settings(document_wait_s=10, spot_check_share=0.0, soft_graded_accepts=3,
                                soft_graded_uncontested_accepts=3))
    learner = run.proc.node.learner
    for n in range(3):
        exception = _over_receipt(run, n, quantity=1035.0)
        assert exception["decision"] == "EXCEPTION" and exception["prior_decision"] == "EXCEPTION"
        assert [r["code"] for r in exception["reasons"]] == ["QUANTITY_OVER"]
        run.handle(DECISION(100 + n, exception["id"], role="receiving", po=f"PO-{n}"))
        [label] = _labels(run)[-1:]
        assert label["good"] and label["soft_codes"] == ["MAT-1|QUANTITY_OVER~3.50"] and label["vendor_id"] == "V-1"
        assert label["features"] == exception["features"]  # learnt on what it was scored with
        learner.learn(Label.from_record(label), n)  # what the worker's label feed does
    verified = _over_receipt(run, 3, quantity=1035.0)
    assert verified["decision"] == "VERIFIED" and verified["prior_decision"] == "EXCEPTION"
    assert verified["model_version"].endswith("/L3/C0")
    assert _over_receipt(run, 4, quantity=1030.0)["decision"] == "VERIFIED"  # less over than people accepted
    assert _over_receipt(run, 5, quantity=1040.0)["decision"] == "EXCEPTION"  # more: not what they accepted
    # beyond the envelope it is hard: never verified, whatever people accepted
    assert _over_receipt(run, 6, quantity=1070.0)["decision"] == "EXCEPTION"
    # people reject 3 % over twice (one reject in the window is tolerated): 3 % goes to people again
    for offset in (10, 11):
        learner.learn(Label(f"D-{offset}", "V-1", "MAT-1", ("QUANTITY_OVER~3.00",), {"n_soft": 1.0}, False, 0.95),
                      offset)
    assert _over_receipt(run, 7, quantity=1030.0)["decision"] == "EXCEPTION"


def test_a_reassignment_teaches_nothing_and_a_spot_check_proceeds() -> None:
    settings = Settings(document_wait_s=10, spot_check_share=1.0)  # every verified receipt is spot-checked
    run = Run(settings=settings)
    verified = _over_receipt(run, 0, quantity=1000.0)
    assert verified["decision"] == "VERIFIED"
    [spot] = [r for name, _, r in run.sent if name == "lotflow.exceptions"]
    assert spot["id"] == verified["id"] + ":spot" and spot["priority"] == "NORMAL"
    assert "SPOT_CHECK" in [r["code"] for r in spot["reasons"]] and spot["route_to"] == "receiving"
    assert [e["event_type"] for name, _, e in run.sent if name == "lotflow.lot-events"] == ["RECEIVED"]
    run.sent.clear()
    run.handle(DECISION(100, spot["id"], "REASSIGN", reassign_to="qc_technician", role="receiving", po="PO-0"))
    assert not _labels(run)
    run.handle(DECISION(101, spot["id"], "REJECT", role="qc_technician", po="PO-0"))
    [label] = _labels(run)
    assert label["spot_check"] and not label["good"]
    assert [e["event_type"] for name, _, e in run.sent if name == "lotflow.lot-events"] == ["REJECTED"]
    assert not [r for name, _, r in run.sent if name == "lotflow.verified"]  # it was verified already


def test_a_mean_shift_inside_the_limits_raises_a_control_chart_signal_and_a_rebaseline_ends_it() -> None:
    run = Run()
    rng = random.Random(5)
    in_control = [_purity_receipt(run, n, 99.0 + rng.gauss(0, 0.1)) for n in range(60)]  # reference: 50 lots
    assert not [r for d in in_control for r in d["reasons"] if r["code"] == "SPC_SIGNAL"]
    decisions = [_purity_receipt(run, n, 99.25 + rng.gauss(0, 0.1)) for n in range(60, 75)]  # +2.5 sigma, in spec
    flagged = [d for d in decisions if d["decision"] == "EXCEPTION"]
    assert flagged, "a sustained 2.5 sigma shift must signal within 15 lots"
    reason = next(r for r in flagged[0]["reasons"] if r["code"] == "SPC_SIGNAL")
    assert "CUSUM" in reason["message"] and reason["evidence"]["property"] == "purity"
    assert reason["evidence"]["reference_n"] == "50" and flagged[0]["route_to"] == "supplier_quality"
    # "new test method, accept": the chart learns a new reference from the next lots
    run.handle(DECISION(900, flagged[0]["id"], po=flagged[0]["subject_key"], rebaseline=True))
    later = [_purity_receipt(run, n, 99.25 + rng.gauss(0, 0.1)) for n in range(75, 135)]
    assert not [r for d in later for r in d["reasons"] if r["code"] == "SPC_SIGNAL"]


def _purity_receipt(run: Run, n: int, purity: float) -> dict[str, Any]:
    number, lot = f"PO-{n}", f"L-{n}"
    run.handle(event(topics.PURCHASE_ORDERS, po(number=number), 10 * n),
               event(topics.CERTIFICATES, coa(number=number, lot=lot, purity=round(purity, 4)), 10 * n + 1),
               event(topics.RECEIPTS, receipt(rid=f"R-{n}", number=number, lot=lot), 10 * n + 2))
    [decision] = [r for name, _, r in run.sent if name in ("lotflow.exceptions", "lotflow.verified")
                  and r["subject_id"] == f"R-{n}" and not r["id"].endswith(":spot")]
    return decision


def test_exceptions_a_soft_rule_held_teach_the_model_and_a_calibration_map_of_their_own() -> None:
    learner = Learner(LearnerConfig(learning_rate=0.0, min_calibration_labels=10, min_group_points=40))  # fixed scores
    held = {"n_soft": 1.0, "prior_logit": 4.2}
    for i in range(40):  # faulty over-deliveries at a high score: a rule held them, whatever the score
        learner.learn(Label(f"D-{i}", "V1", "M1", ("QUANTITY_OVER",), held, i % 4 == 0, 0.95, by_rule=True), i)
    assert len(learner.calibrator) == len(learner.soft_calibrator) == 0 and learner.n_labels == 40
    assert len(learner.open_calibrator) == 40
    for i in range(40, 60):  # where the confidence decided: spot checks, all good
        learner.learn(Label(f"D-{i}", "V2", "M1", (), {"prior_logit": 4.2}, True, 0.97, spot_check=True), i)
    assert len(learner.calibrator) == 20
    assert learner.calibrate(learner.raw_score({"prior_logit": 4.2})) == pytest.approx(1.0)
    # the same score on a receipt such a rule holds: what people decided on those (1 in 4 good)
    assert learner.confidence(held, held_open=True) == pytest.approx(0.25)
    assert Learner.from_bytes(learner.to_bytes()).confidence(held, held_open=True) == pytest.approx(0.25)
    # receipts a hard reason held, at low scores: mostly bad, and points of the calibration
    hard = {"n_block": 1.0, "prior_logit": -1.0}
    for i in range(60, 80):
        learner.learn(Label(f"D-{i}", "V1", "M1", (), hard, i % 10 == 0, 0.3, by_rule=True), i)
    assert len(learner.calibrator) == 40
    assert learner.calibrate(learner.raw_score(hard)) < 0.2  # was 1.0 with the spot checks alone
    # but they do not start the calibration: that waits for points where the confidence decided
    early = Learner(LearnerConfig(min_calibration_labels=10))
    for i in range(30):
        early.learn(Label(f"D-{i}", "V1", "M1", (), hard, False, 0.3, by_rule=True), i)
    assert len(early.calibrator) == 30 and early.calibrate(0.9) == 0.9  # not calibrated yet
    for i in range(30, 40):
        early.learn(Label(f"D-{i}", "V2", "M1", (), {"prior_logit": 4.2}, True, 0.97, spot_check=True), i)
    assert early.calibrate(0.9) != 0.9
    restored = Learner.from_bytes(early.to_bytes())
    assert restored.fingerprint() == early.fingerprint()


def test_the_calibration_corrects_for_reviewers_who_err_either_way() -> None:
    """Receipts at two scores, 99.5 % and 60 % good; reviewers flip 5 % of answers either way. The
    labels then say about 95 % and 62 %; the corrected map says what the receipts are."""
    rng = random.Random(3)
    truth = {2.0: 0.995, -0.5: 0.60}
    # (a regression that does not move: two scores, the calibration alone under test)
    noisy = Learner(LearnerConfig(learning_rate=0.0, min_calibration_labels=10, label_error_rate=0.05))
    naive = Learner(LearnerConfig(learning_rate=0.0, min_calibration_labels=10))
    for i in range(8000):
        logit = 2.0 if i % 2 else -0.5
        good = rng.random() < truth[logit]
        said = good != (rng.random() < 0.05)
        for learner in (noisy, naive):
            learner.learn(Label(f"D-{i}", "V1", "M1", (), {"prior_logit": logit}, said, 0.5), i)
    for logit, rate in truth.items():
        assert noisy.confidence({"prior_logit": logit}) == pytest.approx(rate, abs=0.02)
        assert naive.confidence({"prior_logit": logit}) == pytest.approx(rate * 0.9 + 0.05, abs=0.02)  # the labels
    # labels that say all good (all bad) where the rate says some are wrong: clipped to exactly 1 (0)
    clipped = Learner(LearnerConfig(learning_rate=0.0, min_calibration_labels=10, label_error_rate=0.05))
    for i in range(40):
        clipped.learn(Label(f"D-{i}", "V1", "M1", (), {"prior_logit": 4.0 if i % 2 else -3.0}, bool(i % 2), 0.5), i)
    assert clipped.confidence({"prior_logit": 4.0}) == 1.0 and clipped.confidence({"prior_logit": -3.0}) == 0.0
    # the settings of the process win over those a checkpoint was saved with, and show in the fingerprint
    saved = Checkpoint("receiving", naive.labels_offset, naive.n_labels, naive.fingerprint(), "test", 0,
                       naive.to_bytes(), 0)
    told = saved.learner(LearnerConfig(learning_rate=0.0, min_calibration_labels=10, label_error_rate=0.05))
    assert told.confidence({"prior_logit": 2.0}) == pytest.approx(noisy.confidence({"prior_logit": 2.0}))
    assert told.fingerprint() != naive.fingerprint()
    for wrong in (-0.1, 0.5, 0.9, math.nan):
        with pytest.raises(ValueError, match="label_error_rate"):
            LearnerConfig(label_error_rate=wrong)


def test_receipts_with_a_cleared_soft_reason_have_a_calibration_map_of_their_own() -> None:
    """Clean-by-every-rule receipts and receipts with a cleared soft reason at the same raw score:
    all of the first are good, 80 % of the second. One map says 0.9 for both; two say each."""
    rng = random.Random(5)
    learner = Learner(LearnerConfig(learning_rate=0.0, min_calibration_labels=10, min_group_points=20))
    plain, soft = {"prior_logit": 3.0}, {"prior_logit": 3.0, "n_soft": 1.0}
    assert learner.raw_score(plain) == learner.raw_score(soft)  # the prior does not tell them apart here
    for i in range(400):
        x = soft if i % 2 else plain
        good = not i % 2 or rng.random() < 0.8
        learner.learn(Label(f"D-{i}", "V1", "M1", ("M1|QUANTITY_OVER@1",) if i % 2 else (), x, good, 0.5), i)
    assert len(learner.calibrator) == len(learner.soft_calibrator) == 200
    assert learner.confidence(plain) == pytest.approx(1.0)
    assert learner.confidence(soft) == pytest.approx(0.8, abs=0.06)
    assert learner.predict_proba_one(soft)[True] == learner.confidence(soft)
    restored = Learner.from_bytes(learner.to_bytes())
    assert restored.fingerprint() == learner.fingerprint() and restored.confidence(soft) == learner.confidence(soft)
    # a checkpoint from before the split (one map): loads, and the soft receipts use the one map
    state = learner._state()
    del state["soft_calibrator"]
    old = Learner.from_bytes(pickle.dumps(state))
    assert len(old.soft_calibrator) == 0 and old.confidence(soft) == old.confidence(plain)


def test_a_spot_check_is_one_label_in_the_fit_unless_a_weight_is_configured() -> None:
    """Runs 17 and 19: a reviewer's slip on a spot check at weight 10 pulled a plateau of good
    receipts below the threshold."""
    plain = {"prior_logit": 3.0}

    def fitted(cap: float) -> Learner:
        learner = Learner(LearnerConfig(learning_rate=0.0, min_calibration_labels=10, spot_check_share=0.02,
                                        spot_weight_cap=cap))
        for i in range(30):
            learner.learn(Label(f"D-{i}", "V1", "M1", (), plain, True, 0.5), i)
        learner.learn(Label("D-30", "V1", "M1", (), plain, False, 0.95, spot_check=True), 30)
        return learner

    default, weighted = fitted(LearnerConfig().spot_weight_cap), fitted(10.0)
    assert default.calibrator._weights[-1] == 1.0 and weighted.calibrator._weights[-1] == 10.0
    assert default.confidence(plain) == pytest.approx(30 / 31)
    assert weighted.confidence(plain) == pytest.approx(30 / 40)


def test_hostile_labels_do_not_poison_the_learner() -> None:
    learner = Learner()
    nan = float("nan")
    learner.learn(Label("D-0", "V1", "M1", ("QUANTITY_OVER@3",), {"n_soft": nan, "x": float("inf"), "y": 1e308},
                        True, nan), 0)
    learner.learn(Label("D-1", "V1", "M1", (), {"n_block": 1e308, "n_warn": -1e308}, False, -5.0), 1)
    learner.learn(Label("D-1", "V1", "M1", (), {"n_block": 1.0}, False, 0.5), 1)  # the same offset again: skipped
    learner.learn(Label("D-2", "V1", "M1", (), {}, False, 0.5), 2)  # no features (before this release): skipped
    assert learner.n_labels == 2 and learner.labels_offset == 2
    assert all(math.isfinite(w) for w in learner.scorer.model.weights.values())
    p = learner.predict_proba_one({"n_soft": 1.0, "y": 1e308})[True]
    assert 0.0 <= p <= 1.0
    quality = learner.quality()
    assert quality.labels == 2 and quality.ece_all == quality.ece_all  # not NaN
    assert Learner.from_bytes(learner.to_bytes()).fingerprint() == learner.fingerprint()


def test_a_label_counts_each_soft_reason_for_its_own_material() -> None:
    learner = Learner(LearnerConfig(accepts_needed=1))
    learner.learn(Label("D-0", "V1", "MAT-1", ("MAT-2|QUANTITY_OVER@3",), {"n_soft": 1.0}, True, 0.5), 0)
    assert learner.accepted(("V1", "MAT-2", "QUANTITY_OVER@3"))
    assert not learner.accepted(("V1", "MAT-1", "QUANTITY_OVER@3"))
    ctx_reason = Reason("QUANTITY_OVER", "", Severity.BLOCK, {"po_line": "2", "deviation_pct": "3.5"})
    assert rules.SOFT_REASONS["QUANTITY_OVER"].pattern(ctx_reason) == "QUANTITY_OVER~3.50"


def test_accepts_age_out_of_a_graded_window_that_rejects_charged_elsewhere_move_too() -> None:
    """Learning run 25: the variance-jump vendor's density accepts from before its spread tripled
    (4.38 and 4.81 sigma) still cleared lots 4.2-4.3 sigma out after it, because every reject since
    was charged to a farther value of the same lot and left density's window unmoved."""
    learner = Learner(LearnerConfig(graded_accepts=2, max_rejects=1, graded_window=5))
    density, water = "M1|SPC_SIGNAL:density", "M1|SPC_SIGNAL:water"
    for n, size in enumerate((4.81, 4.38)):
        learner.learn(Label(f"a{n}", "V1", "M1", (f"{density}~{size:.2f}",), {"n_soft": 1.0}, True, 0.5), n)
    assert learner.accepted(("V1", "M1", "SPC_SIGNAL:density~4.21"))
    for n in range(2, 7):  # rejects charged to the farther water value: not against density's 3.5
        learner.learn(Label(f"r{n}", "V1", "M1", (f"{density}~3.50", f"{water}~{6.0 + n:.2f}"), {"n_soft": 1.0},
                            False, 0.5), n)
        assert learner._graded_counts(("V1", "M1", "SPC_SIGNAL:density"), 3.6) == (max(0, min(2, 6 - n)), 0)
        if n == 5:  # the oldest accept left the window; one is not enough once it holds no other
            assert not learner.accepted(("V1", "M1", "SPC_SIGNAL:density~4.21"))
    assert not learner.accepted(("V1", "M1", "SPC_SIGNAL:density~4.21"))  # both accepts left the window
    restored = Learner.from_bytes(learner.to_bytes())
    name = ("V1", "M1", "SPC_SIGNAL:density")
    assert restored.fingerprint() == learner.fingerprint() and list(restored.graded[name]) == list(learner.graded[name])
