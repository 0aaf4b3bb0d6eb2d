"""What a verification node has learnt from people: one object, fed by one ordered stream of labels.

Labels are people's decisions (accept / conditional accept = the hand-off was good, reject =
bad; a reassignment is no label), each on the features the exception was scored with. They
reach every worker replica through a single-partition topic, in the same order, and this
object is a pure function of that sequence: every replica holds the same model (its
``fingerprint`` proves it), a checkpoint is ``to_bytes()`` plus the offset of the last label it
contains, and a restarted worker replays the labels after it.

Design (argued):

* **The prior stays the anchor.** A River logistic regression starts as the documented prior
  (weight 1 on the prior's logit, 0 elsewhere, no learnt intercept) and each label moves it one
  small SGD step (``OnlineConfidence``): it learns *corrections* to the documented formula
  rather than starting from nothing, and no early label can swing it.
* **Per vendor x material patterns through features, not grouped models.** A model per pair
  would see a handful of labels each; instead the scorer is given, per soft reason of a
  receipt, what people decided on that vendor x material x reason (``pattern_accept_share``,
  ``pattern_labels_log``). One model learns how much a consistent acceptance is worth, and the
  counts themselves decide the gate below.
* **The gate.** A soft reason (``lotflow.verification.receiving.SOFT_REASONS``) may be verified
  only once people have cleared that vendor x material x reason — one without a size: accepted
  ``accepts_needed`` times with at most ``max_rejects`` reject among its last ``pattern_window``
  decisions; a graded one: below — *and* the calibrated
  confidence passes the node's threshold, *and* the vendor is not tightened by drift. An accept
  counts for every soft pattern of the receipt; a reject is explained away where it can be
  (``_taught``): by a hard reason (a receipt rejected for its missing CoA teaches nothing about
  its over-delivery), else by the soft patterns not yet cleared.
* **Graded patterns.** Where a reason has a size (an over-delivery of 3.4 %, a CoA value 3.7
  sigma from its chart's reference) the pattern carries it, ``QUANTITY_OVER~3.40``, and people's
  decisions are kept with their sizes: the last ``graded_window`` decisions of receipts with the
  pattern, of which those charged to it count (a reject charged to the lot's farther value still
  moves the window: else accepts from before a vendor's spread tripled cleared its lots after it,
  learning run 25). A size is cleared when people
  accepted ``graded_accepts`` at least as large, one more per reject at most as large, and those
  rejects are at most ``max_rejects``: what a correct reviewer decides grows worse with the size
  (an agreement allows up to 4 % over; a lot 4 sigma out is a fault), so an accept at 3.8 %
  speaks for 3.1 %, and a reject at 2.5 % against 3.1 %. Where nobody rejected anything between the
  size and the largest accept at least as large, and the window holds ``graded_accepts`` accepts of
  any size, ``graded_uncontested_accepts`` (one) do (plus one per reject at most as large): the
  second accept guards against a reviewer's slip, which among a pattern's faults sits among their
  rejects; the window's accepts keep a pattern's only accept from being a slip that clears
  everything below it (learning run 31: one slip accepting a 4.9 % over-delivery cleared a 4.4 %
  one), not a slip among routine accepts of small sizes. Otherwise the second accept only held the
  largest clean sizes of a pattern (an agreed over-delivery of 3.7 %, a heavy-tailed value) until
  it came. Replayed on the labels of
  learning runs 29 and 30, that cleared 30 and 35 of the ~110 clean receipts held in the final
  window, and one fault each. Bands (3-4 % over, 4-5 %) made each
  band wait for its own three accepts, and a band pooled over a lot's properties mixed good and
  bad lots wherever the properties' reference sigmas erred differently (learning runs 10-13). A
  reject of a lot with several open sizes is charged to those beyond every size people accepted
  lately, where there are any.
* **Calibration.** The model's score is mapped through an isotonic fit of labelled outcomes
  (used once ``min_calibration_labels`` of its points are receipts the confidence decided,
  refitted with every label after) of the
  hand-offs the confidence decided and of those a hard reason held. Exceptions held by a soft
  reason people had not cleared have a map of their own (``open_calibrator``): in the same map,
  their outcomes at a high score (faulty over-deliveries) pulled clean receipts of the same score
  below the threshold; left out of every map, they showed ~0.997 where 59 % were good, 0.011 of
  the ECE (learning run 14). Every one of them is labelled, so their map is unbiased. A spot
  check is a label like any other in the fit (``spot_weight_cap`` = 1). Weighted by the receipts
  it stands for (1 / share), it let a reviewer's slip move a map's step: slips are 2 % of labels,
  faults 0.2-0.4 % of what is verified, so most rejected spot checks are slips, and they sit at
  the threshold, where a map pools them with the held receipts below. At weight 10, two slips put
  the cleared-soft map of run 17 at 0.72 over scores where 41 of 41 receipts were good, and two
  more the first map of run 19 at 0.87 over clean receipts of the trend vendor (replays of their
  labels: 33 and 37 clean receipts held, 11 and 1 at weight 1). Above the threshold spot checks
  are a map's only labels, so there the weight changes nothing; the unbiased figures
  (``quality``) are computed from spot checks alone.
* **Drift.** ``river.drift.ADWIN`` watches each vendor's stream of model errors
  (|outcome - confidence|); when the error rises the vendor is tightened (its soft reasons
  go to people, with a ``DRIFT_DETECTED`` reason) until ``relax_after`` labels in a row agree
  with the model.
"""

from __future__ import annotations

import collections
import hashlib
import math
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from river import drift

from lotflow.scorers.calibration import (
    Bin,
    IsotonicCalibrator,
    expected_calibration_error,
    reliability,
    wilson,
)
from lotflow.scorers.model import OnlineConfidence

__all__ = ["GRADE", "HARD_REASON_FEATURES", "SOFT_REASON_FEATURE", "DriftState", "Label", "Learner", "LearnerConfig",
           "PatternKey", "Quality", "hard_reasons", "is_soft", "largest_sizes", "split_grade", "spot_check_draw"]

Features = dict[str, float]
PatternKey = tuple[str, str, str]  # vendor, material, reason code (graded: "<code>~<size>")
FORMAT = 4  # bumped when the pickled layout changes: an older release refuses a newer checkpoint
# 1: before the soft map (its soft points are in the one map until they age out); 2: before graded patterns;
# 3: before graded points of decisions not charged to the pattern ((size, None): read as a reject before)
READABLE_FORMATS = (1, 2, 3, 4)
GRADE = "~"  # separates a graded pattern's code from its size
CALIBRATION_LABELS = 10_000  # the newest kept for the fit: a checkpoint stays well under 1 MB


# Every node's features count its hard reasons under these names (``VerificationNode.evaluate``).
HARD_REASON_FEATURES = ("n_block", "n_warn")
SOFT_REASON_FEATURE = "n_soft"


def hard_reasons(features: Mapping[str, float]) -> float:
    """How many hard reasons held the exception these features were scored with."""
    return sum(features.get(name, 0.0) for name in HARD_REASON_FEATURES)


def is_soft(features: Mapping[str, float]) -> bool:
    """Whether these features were scored with a soft reason (``SOFT_REASON_FEATURE`` > 0)."""
    return features.get(SOFT_REASON_FEATURE, 0.0) > 0.0


@dataclass(frozen=True)
class LearnerConfig:
    learning_rate: float = 0.01
    min_calibration_labels: int = 100
    min_group_points: int = 50  # points before the map of receipts with a soft reason is their own
    accepts_needed: int = 3
    pattern_window: int = 10
    # rejects tolerated among the pattern's last ``pattern_window`` decisions: a reviewer's slip, or a
    # receipt rejected for another of its faults, does not close a pattern people keep accepting
    max_rejects: int = 1
    graded_window: int = 30  # the last decisions kept per graded pattern (those charged to it count)
    # a graded size is cleared by this many accepts at least as large, plus one per reject at most as large
    graded_accepts: int = 2
    # ... or by this many (at most graded_accepts) where no reject lies above the size up to the largest
    # of them and the pattern's window holds graded_accepts accepts of any size (module doc)
    graded_uncontested_accepts: int = 1
    relax_after: int = 20
    adwin_delta: float = 0.002
    spot_check_share: float = 0.02
    spot_weight_cap: float = 1.0  # a spot check's weight in the calibration fit (module doc)
    quality_window: int = 5_000  # labels kept for the reliability bins and ECE
    # the share of people's decisions that are wrong (from an attribute agreement study of the
    # reviewers); the calibration map, fitted on their labels, is corrected for it (``calibrate``)
    label_error_rate: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_error_rate < 0.5:  # at 0.5 labels say nothing; beyond, the opposite
            raise ValueError(f"label_error_rate must be in [0, 0.5): {self.label_error_rate!r}")
        if not 1 <= self.graded_uncontested_accepts <= self.graded_accepts:
            # more would make a reject between clear what its absence did not
            raise ValueError(f"graded_uncontested_accepts must be in [1, graded_accepts = {self.graded_accepts}]: "
                             f"{self.graded_uncontested_accepts!r}")


@dataclass(frozen=True, slots=True)
class Label:
    """One person's decision, as the model learns it."""

    label_id: str  # the decision id
    vendor_id: str
    material_id: str
    soft_codes: tuple[str, ...]  # "<material>|<pattern>" of the exception's soft reasons (what it teaches)
    features: Mapping[str, float]
    good: bool
    confidence: float  # what the model said when the exception was raised
    spot_check: bool = False
    by_rule: bool = False  # a rule held it whatever the confidence: not a calibration point

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Label:
        return cls(record["label_id"], record["vendor_id"], record["material_id"], tuple(record["soft_codes"]),
                   dict(record["features"]), bool(record["good"]), float(record["confidence"]),
                   bool(record["spot_check"]), bool(record.get("by_rule", False)))


@dataclass(slots=True)
class DriftState:
    """A vendor whose model errors rose: its soft reasons go to people until it agrees again."""

    detected_at_label: int
    error_before: float
    error_after: float
    agreeing: int = 0  # labels in a row the model got right since

    def describe(self, vendor: str, relax_after: int) -> str:
        return (f"the model's error on vendor {vendor} rose from {self.error_before:.2f} to {self.error_after:.2f} "
                f"(ADWIN, at label {self.detected_at_label}); its soft reasons go to people until {relax_after} "
                f"labels in a row agree with the model ({self.agreeing} so far)")


@dataclass(frozen=True, slots=True)
class Quality:
    """How good the confidence is, from labels: all of them, and the unbiased spot checks."""

    labels: int
    ece_all: float
    ece_spot: float
    bins: list[Bin]
    spot_checks: int
    spot_good: int
    spot_precision: float
    spot_interval: tuple[float, float]
    tightened_vendors: int
    drift_events: int


def split_grade(key: PatternKey) -> tuple[PatternKey, float | None]:
    """A graded pattern's key without its size, and the size (``None``: not graded).

    >>> split_grade(("V1", "M1", "QUANTITY_OVER~3.4"))
    (('V1', 'M1', 'QUANTITY_OVER'), 3.4)
    >>> split_grade(("V1", "M1", "MISSING_COA"))
    (('V1', 'M1', 'MISSING_COA'), None)
    """
    code, sep, size = key[2].rpartition(GRADE)
    if not sep:
        return key, None
    try:
        value = float(size)
    except ValueError:
        return key, None
    if not math.isfinite(value):
        return key, None
    return (key[0], key[1], code), value


def largest_sizes(keys: Iterable[PatternKey]) -> list[PatternKey]:
    """The keys with each graded pattern once, at its largest size (first-seen order).

    Clearing is monotone (a cleared size clears every smaller one), so the gate is the same; and
    one decision is one point of the pattern, however many lines of the receipt carried it.

    >>> largest_sizes([("V", "M", "Q~3.50"), ("V", "M", "X"), ("V", "M", "Q~4.20"), ("V", "M", "Q~1.00")])
    [('V', 'M', 'Q~4.20'), ('V', 'M', 'X')]
    """
    best: dict[tuple[bool, PatternKey], tuple[float, PatternKey]] = {}  # (graded?, name): (size, key)
    for key in keys:
        name, size = split_grade(key)
        if size is None:
            best.setdefault((False, key), (math.inf, key))
        elif (True, name) not in best or size > best[(True, name)][0]:
            best[(True, name)] = (size, key)
    return [key for _, key in best.values()]


def spot_check_draw(subject_id: str) -> float:
    """A uniform number in [0, 1) fixed by the subject id: the same receipt is always drawn alike."""
    digest = hashlib.blake2b(subject_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class Learner:
    config: LearnerConfig = field(default_factory=LearnerConfig)
    checkpoint_labels: int = 0  # labels in the checkpoint this learner was restored from
    labels_offset: int = -1  # offset of the last label applied (labels topic, partition 0)
    n_labels: int = 0

    def __post_init__(self) -> None:
        self.format = FORMAT
        self.scorer = OnlineConfidence(self.config.learning_rate)
        self.calibrator = IsotonicCalibrator(max_labels=CALIBRATION_LABELS)  # receipts without a soft reason
        self.soft_calibrator = IsotonicCalibrator(max_labels=CALIBRATION_LABELS)  # and with one
        self.open_calibrator = IsotonicCalibrator(max_labels=CALIBRATION_LABELS)  # held by one not cleared
        self.patterns: dict[PatternKey, collections.deque[bool]] = {}
        self.pattern_totals: dict[PatternKey, list[int]] = {}  # [accepted, rejected] over all time
        # (size, good), newest last; good None: a reject charged to other patterns of its receipt, or
        # explained by a hard reason (it moves the window, it does not count)
        self.graded: dict[PatternKey, collections.deque[tuple[float, bool | None]]] = {}
        self.errors: dict[str, drift.ADWIN] = {}
        self.tightened: dict[str, DriftState] = {}
        self.drift_events: list[dict[str, Any]] = []
        self.recent: collections.deque[tuple[float, bool, bool]] = collections.deque(
            maxlen=self.config.quality_window)  # (confidence shown, good, spot check)
        self.spot = [0, 0]  # spot checks [decided, good]
        self._calibrated = False
        self._decided_points = 0  # calibration points where the confidence decided (not a rule)

    # --- scoring ---------------------------------------------------------------
    @property
    def version(self) -> str:
        """``<scorer>/L<labels>/C<labels in the checkpoint restored>``."""
        return f"{self.scorer.version}+lr/L{self.n_labels}/C{self.checkpoint_labels}"

    def pattern_features(self, keys: Sequence[PatternKey]) -> Features:
        """What people decided on these vendor x material x reason patterns (none: no features)."""
        if not keys:
            return {}
        shares, counts = [], []
        for key in keys:
            name, size = split_grade(key)
            accepted, rejected = self._graded_counts(name, size) if size is not None else \
                self.pattern_totals.get(key, (0, 0))
            shares.append((accepted + 1) / (accepted + rejected + 2))  # Laplace: 0.5 with no decision
            counts.append(accepted + rejected)
        return {"pattern_accept_share": min(shares), "pattern_labels_log": math.log1p(min(counts))}

    def raw_score(self, x: Features) -> float:
        return self.scorer.predict_proba_one(x)[True]

    def confidence(self, x: Features, held_open: bool = False) -> float:
        """The calibrated confidence of a receipt scored with features ``x`` (``held_open``: held by
        a soft reason people had not cleared, and by no hard one)."""
        return self.calibrate(self.raw_score(x), soft=is_soft(x), held_open=held_open)

    def calibrate(self, raw: float, soft: bool = False, held_open: bool = False) -> float:
        """The calibrated confidence of a raw score (the raw score until the calibration starts).

        Three maps (a Mondrian split, ``_map_of``): receipts scored with no soft reason; with one
        people had cleared or a hard reason held as well (in one map with the first their raw scores
        interleave at the top, and it showed 0.96-0.97 for both while all of the clean-by-every-rule
        receipts and 89-94 % of the cleared ones were good, learning run 8); and held by a soft
        reason people had not cleared (``held_open``, see the module doc). The second and third
        maps are each used once they have ``min_group_points`` points.

        The map is fitted on people's labels, and a share ``label_error_rate`` of them is wrong
        either way: where a fraction p of receipts is good, a fraction p (1 - 2e) + e of labels
        says so. So the labels of clean receipts top out at 1 - e, and a map that believed them
        showed 0.966 on average in its top bin, where 99.7 % were good (learning run 7, 2 % reviewer
        errors). Inverting the flip (Natarajan et al., *Learning with noisy labels*, 2013) gives the
        rate of good receipts rather than of "good" answers."""
        if not self._calibrated:
            return raw
        enough = self.config.min_group_points
        if held_open and len(self.open_calibrator) >= enough:
            own = self.open_calibrator
        elif soft and len(self.soft_calibrator) >= enough:
            own = self.soft_calibrator
        else:
            own = self.calibrator
        p = own.predict(raw)
        e = self.config.label_error_rate
        if e > 0.0:
            p = min(1.0, max(0.0, (p - e) / (1.0 - 2.0 * e)))
        return p

    def prior_score(self, x: Features) -> float:
        return self.scorer.prior.predict_proba_one(x)[True]

    def contributions(self, x: Features) -> dict[str, float]:
        return self.scorer.contributions(x)

    # River's scorer contract (``lotflow.verification.node.Scorer``): the calibrated confidence
    def predict_proba_one(self, x: Features) -> dict[bool, float]:
        p = self.confidence(x)
        return {True: p, False: 1.0 - p}

    def learn_one(self, x: Features, y: bool) -> None:
        """A label without its context (no vendor, pattern or spot check): the next offset."""
        self.learn(Label(f"L{self.labels_offset + 1}", "", "", (), x, y, self.confidence(x)),
                   self.labels_offset + 1)

    def accepted(self, key: PatternKey) -> bool:
        """People cleared this pattern: one without a size, enough accepts and at most ``max_rejects``
        among its recent decisions; a graded size, ``_graded_cleared``."""
        name, size = split_grade(key)
        if size is not None:
            return self._graded_cleared(name, size)
        recent = self.patterns.get(key)
        return (recent is not None and sum(recent) >= self.config.accepts_needed
                and len(recent) - sum(recent) <= self.config.max_rejects)

    def _graded_counts(self, name: PatternKey, size: float) -> tuple[int, int]:
        """(accepts at least as large as ``size``, rejects at most as large) of a graded pattern."""
        points = self.graded.get(name, ())
        return (sum(1 for s, good in points if good is True and s >= size),
                sum(1 for s, good in points if good is False and s <= size))

    def _graded_cleared(self, name: PatternKey, size: float) -> bool:
        """Among the pattern's last ``graded_window`` decisions: ``graded_accepts`` accepts at least as
        large as ``size`` — ``graded_uncontested_accepts`` where no reject lies above ``size`` up to the
        largest of them and the window holds ``graded_accepts`` accepts of any size — plus one per
        reject at most as large, and at most ``max_rejects`` of those (module doc). A reject at the
        size itself counts once (as one at most as large): counted as between too, ties made a size
        harder to clear than a larger one, and a receipt is gated at its largest size."""
        points = self.graded.get(name, ())
        accepted = [s for s, good in points if good is True and s >= size]
        rejected = sum(1 for s, good in points if good is False and s <= size)
        if not accepted or rejected > self.config.max_rejects:
            return False
        top = max(accepted)
        uncontested = (not any(good is False and size < s <= top for s, good in points)
                       and sum(1 for _, good in points if good is True) >= self.config.graded_accepts)
        needed = self.config.graded_uncontested_accepts if uncontested else self.config.graded_accepts
        return len(accepted) >= needed + rejected

    def drift_of(self, vendor: str) -> DriftState | None:
        return self.tightened.get(vendor)

    def is_spot_check(self, subject_id: str) -> bool:
        return spot_check_draw(subject_id) < self.config.spot_check_share

    # --- learning --------------------------------------------------------------
    def learn(self, label: Label, offset: int) -> None:
        """Apply one label (``offset``: its position on the labels topic; older ones are skipped)."""
        if offset <= self.labels_offset:
            return
        self.labels_offset = offset
        if not label.features:
            # an exception raised before this release: it was not scored with today's features, and its
            # empty vector would read as a clean receipt's (skipped alike on every replica)
            return
        share = self.config.spot_check_share
        weight = min(1.0 / share if share > 0 else math.inf, self.config.spot_weight_cap) if label.spot_check else 1.0
        x = {k: float(v) for k, v in label.features.items() if math.isfinite(v)}
        raw = self.raw_score(x)  # before learning: what the model would have said
        # A spot check's weight in the calibration is ``spot_weight_cap`` at most (1: module doc); the
        # regression takes it as one step, like any label (an SGD step of weight 10 on a prior logit
        # of ~4 moved the prior's weight 0.4 per rejected spot check).
        self.scorer.learn_one(x, label.good)
        self._map_of(label, x).learn_one(raw, label.good, weight)
        self._decided_points += not label.by_rule
        self.n_labels += 1
        # Used once the confidence itself decided enough receipts (points a hard reason held come
        # early and in numbers, all at low scores: a first fit on them overshot, measured on the
        # short learning run); from then on refitted with every new label, at the next score.
        if not self._calibrated and self._decided_points >= self.config.min_calibration_labels:
            self.fit_calibration()
            self._calibrated = True
        taught = self._taught(label)
        for key in self._label_keys(label):
            name, size = split_grade(key)
            if size is not None:
                # every decision of a receipt with the pattern moves its window; only those charged
                # to it count. Uncounted, a reject charged to the lot's farther value left the window
                # to the pattern's own rare decisions: accepts from before a vendor's spread tripled
                # cleared its lots 4.2-4.3 sigma out after it (learning run 25, three faults verified).
                points = self.graded.get(name)
                if points is None:
                    points = self.graded[name] = collections.deque(maxlen=self.config.graded_window)
                points.append((size, label.good if key in taught else None))
                continue
            if key not in taught:
                continue
            recent = self.patterns.get(key)
            if recent is None:
                recent = self.patterns[key] = collections.deque(maxlen=self.config.pattern_window)
            recent.append(label.good)
            totals = self.pattern_totals.setdefault(key, [0, 0])
            totals[0 if label.good else 1] += 1
        if 0.0 <= label.confidence <= 1.0:
            self.recent.append((label.confidence, label.good, label.spot_check))
        if label.spot_check:
            self.spot[0] += 1
            self.spot[1] += int(label.good)
        self._watch(label)

    def fit_calibration(self) -> None:
        """Fit every map on every point learnt now (else each refits lazily at its next score)."""
        self.calibrator.fit()
        self.soft_calibrator.fit()
        self.open_calibrator.fit()

    def _map_of(self, label: Label, x: Features) -> IsotonicCalibrator:
        """The calibration map a label is a point of: where the confidence decided (by soft reason or
        none), where a hard reason held the receipt (low scores, mostly bad: without them the map,
        fitted on the few low-scored receipts people accepted, showed 0.55 on receipts 90 % of which
        were bad), and where a soft reason people had not cleared held it: its own map."""
        if label.by_rule and hard_reasons(label.features) == 0:
            return self.open_calibrator
        return self.soft_calibrator if is_soft(x) else self.calibrator

    def _taught(self, label: Label) -> list[PatternKey]:
        """The soft patterns a label counts for. An accept counts for every soft pattern of the
        receipt. A reject is explained first by a hard reason (the missing CoA, the out-of-spec value),
        and then counts against no soft pattern; else by the soft patterns people had not cleared
        yet, and only if all were cleared (a surprise) against every one. Counted against all of them,
        a vendor's unrelated faults closed its agreed over-deliveries again and again."""
        keys = self._label_keys(label)
        if label.good or not keys:
            return keys
        if hard_reasons(label.features) > 0:
            return []
        open_keys = [key for key in keys if not self.accepted(key)]
        # of a lot's graded values, those beyond all people accepted explain the reject: one value 5
        # sigma out charged with it, not its neighbour at 2.7 that people accept every day
        beyond = [key for key in open_keys if self._beyond_accepted(key)]
        return beyond or open_keys or keys

    @staticmethod
    def _label_keys(label: Label) -> list[PatternKey]:
        """The soft patterns of a label's receipt, each graded one once at its largest size."""
        keys = []
        for entry in label.soft_codes:  # "<material>|<pattern>" (a bare pattern: the label's material)
            material, _, code = entry.rpartition("|")
            keys.append((label.vendor_id, material or label.material_id, code))
        return largest_sizes(keys)  # one point per pattern and decision

    def _beyond_accepted(self, key: PatternKey) -> bool:
        """Not graded, or larger than every accepted size of its pattern people decided lately."""
        name, size = split_grade(key)
        if size is None:
            return True
        return all(s < size for s, good in self.graded.get(name, ()) if good is True)

    def _watch(self, label: Label) -> None:
        """ADWIN on the vendor's model errors: tighten when the error rises, relax after agreement."""
        confidence = label.confidence if 0.0 <= label.confidence <= 1.0 else 0.5  # NaN or out of range: no opinion
        error = abs(float(label.good) - confidence)
        detector = self.errors.get(label.vendor_id)
        if detector is None:
            detector = self.errors[label.vendor_id] = drift.ADWIN(delta=self.config.adwin_delta)
        before = detector.estimation
        detector.update(error)
        state = self.tightened.get(label.vendor_id)
        if detector.drift_detected and detector.estimation > before:
            self.tightened[label.vendor_id] = DriftState(self.n_labels, before, detector.estimation)
            self.drift_events.append({"vendor_id": label.vendor_id, "label": self.n_labels,
                                      "error_before": round(before, 4), "error_after": round(detector.estimation, 4)})
        elif state is not None:
            state.agreeing = state.agreeing + 1 if error < 0.5 else 0
            if state.agreeing >= self.config.relax_after:
                del self.tightened[label.vendor_id]

    def rebaseline_patterns(self, vendor: str, material: str, codes: Iterable[str]) -> None:
        """Forget what people decided on these patterns (a person re-baselined them)."""
        for code in codes:
            self.patterns.pop((vendor, material, code), None)
            self.graded.pop(split_grade((vendor, material, code))[0], None)

    # --- quality ---------------------------------------------------------------
    def quality(self) -> Quality:
        confidences = [c for c, _, _ in self.recent]
        outcomes = [g for _, g, _ in self.recent]
        spot = [(c, g) for c, g, s in self.recent if s]
        decided, good = self.spot
        return Quality(
            labels=self.n_labels,
            ece_all=expected_calibration_error(confidences, outcomes),
            ece_spot=expected_calibration_error([c for c, _ in spot], [g for _, g in spot]),
            bins=reliability(confidences, outcomes),
            spot_checks=decided,
            spot_good=good,
            spot_precision=good / decided if decided else 0.0,
            spot_interval=wilson(good, decided),
            tightened_vendors=len(self.tightened),
            drift_events=len(self.drift_events),
        )

    # --- checkpoints -----------------------------------------------------------
    def fingerprint(self) -> str:
        """The same labels in the same order give the same fingerprint on every replica."""
        return hashlib.sha256(repr(self._canonical()).encode()).hexdigest()[:16]

    def _canonical(self) -> tuple[Any, ...]:
        """The learnt numbers in a fixed order (a pickle's bytes also depend on object sharing)."""
        regression = self.scorer.model
        # (with the settings that change what the same labels give: a replica told another error rate
        # or group size shows another fingerprint)
        return (self.config.label_error_rate, self.config.min_group_points, self.config.graded_window,
                self.config.graded_accepts, self.config.accepts_needed, self.config.max_rejects,
                self.config.pattern_window, self.config.graded_uncontested_accepts,
                self.labels_offset, self.n_labels, self.scorer.n_labels,
                sorted(regression.weights.items()), regression.intercept,
                self.calibrator._scores, self.calibrator._outcomes, self.calibrator._weights, self._calibrated,
                self.soft_calibrator._scores, self.soft_calibrator._outcomes, self.soft_calibrator._weights,
                self.open_calibrator._scores, self.open_calibrator._outcomes, self.open_calibrator._weights,
                self._decided_points,
                sorted((k, list(v)) for k, v in self.patterns.items()), sorted(self.pattern_totals.items()),
                sorted((k, list(v)) for k, v in self.graded.items()),
                sorted((v, d.estimation, d.width) for v, d in self.errors.items()),
                sorted((v, repr(d)) for v, d in self.tightened.items()), list(self.recent), self.spot)

    def _state(self) -> dict[str, Any]:
        return {"format": self.format, "config": self.config, "offset": self.labels_offset,
                "n": self.n_labels, "scorer": self.scorer, "calibrator": self.calibrator,
                "soft_calibrator": self.soft_calibrator, "open_calibrator": self.open_calibrator,
                "calibrated": self._calibrated, "decided_points": self._decided_points,
                "patterns": sorted((k, list(v)) for k, v in self.patterns.items()),
                "totals": sorted(self.pattern_totals.items()),
                "graded": sorted((k, list(v)) for k, v in self.graded.items()), "errors": sorted(self.errors.items()),
                "tightened": sorted(self.tightened.items()), "drift_events": self.drift_events,
                "recent": list(self.recent), "spot": self.spot}

    def to_bytes(self) -> bytes:
        """A checkpoint. Pickled River objects: load only checkpoints from a topic you trust."""
        return pickle.dumps(self._state(), protocol=5)

    @classmethod
    def from_bytes(cls, data: bytes) -> Learner:
        state = pickle.loads(data)  # our own checkpoint topic: see to_bytes
        if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
            raise ValueError(f"not a lotflow model checkpoint of format {READABLE_FORMATS}")
        learner = cls(state["config"], checkpoint_labels=state["n"], labels_offset=state["offset"],
                      n_labels=state["n"])
        learner.scorer = state["scorer"]
        learner.calibrator = state["calibrator"]
        # a checkpoint from before the split: one map for all, the soft one starts empty
        soft = state.get("soft_calibrator")
        learner.soft_calibrator = soft if soft is not None else IsotonicCalibrator(max_labels=CALIBRATION_LABELS)
        held = state.get("open_calibrator")  # format 3 on: before it, those points were in no map
        learner.open_calibrator = held if held is not None else IsotonicCalibrator(max_labels=CALIBRATION_LABELS)
        learner._calibrated = state["calibrated"]
        # a checkpoint from before hard-reason points: every point was one the confidence decided
        learner._decided_points = state.get("decided_points", len(learner.calibrator))
        learner.patterns = {k: collections.deque(v, maxlen=learner.config.pattern_window)
                            for k, v in state["patterns"]}
        learner.pattern_totals = {k: list(v) for k, v in state["totals"]}
        learner.graded = {k: collections.deque((tuple(p) for p in v), maxlen=learner.config.graded_window)
                          for k, v in state.get("graded", ())}
        learner.errors = dict(state["errors"])
        learner.tightened = dict(state["tightened"])
        learner.drift_events = list(state["drift_events"])
        learner.recent.extend(state["recent"])
        learner.spot = list(state["spot"])
        return learner
