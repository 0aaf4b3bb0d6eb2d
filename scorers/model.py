"""The online confidence model: the documented prior, corrected by what people decide.

A River logistic regression whose weight on the prior's logit starts at 1 and every other
weight at 0, so before any label it *is* the prior, and each label moves it by one SGD step:
the model learns corrections to the documented formula (a vendor's accepted over-deliveries,
values that move together, a penalty people keep overruling) rather than starting from
nothing. Two choices against the biased sample people label (mostly exceptions):

* the intercept does not learn (``intercept_lr=0``): most labels are exceptions, and a learnt
  intercept would move every receipt's confidence by how often people accept *exceptions*;
* the prior's logit is an *offset*: its weight is held at 1 (reset after every step), so the
  regression learns corrections through the other features only. A learnt weight shrank to
  0.6-0.75 within 1,500 labels — people overrule the prior on exceptions, in both directions —
  and that shrink lowered every clean receipt's confidence: more clean receipts went to people
  than with the prior alone (measured on the learning simulator, 6,000 receipts);
* features are clipped to +-``FEATURE_LIMIT`` and the step is small, so one label cannot swing
  the model (a spot check, which stands for 1 / share receipts, comes with a larger weight).

Besides the node's features, the regression sees each of the prior's terms in logit units
(``prior_term_<name>``): a learnt weight w turns that term into (1 + w) x term, so a penalty
people keep overruling (a trend vendor's clean receipts) is undone in tens of labels rather than
thousands (measured on 12,000 simulated receipts: the trend penalty's clean receipts held for a
person fell from 162 to 26 in the second half).

No feature scaling: the features are counts, shares, logs and sigma distances of similar size,
and an online scaler would change the meaning of the prior's weight as it learns.
"""

from __future__ import annotations

import math

from river import linear_model, optim

from lotflow.scorers.prior import CheckPrior

__all__ = ["FEATURE_LIMIT", "OnlineConfidence"]

Features = dict[str, float]
FEATURE_LIMIT = 10.0
PRIOR = "prior_logit"  # the node's feature: the prior's logit
PRIOR_OFFSET = "prior_offset"  # what the regression sees of it: weight held at 1
TERM = "prior_term_"  # one of the prior's terms, in logit units
OFFSET_LIMIT = 30.0


def _clipped(x: Features) -> Features:
    return {k: max(-FEATURE_LIMIT, min(FEATURE_LIMIT, v)) for k, v in x.items() if math.isfinite(v)}


class OnlineConfidence:
    def __init__(self, learning_rate: float = 0.01) -> None:
        self.learning_rate = learning_rate
        self.prior = CheckPrior()
        self.model = linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate), intercept_lr=0.0)
        self._hold_offset()
        self.n_labels = 0

    def _hold_offset(self) -> None:
        # River has no fixed weights or offsets: the prior's weight is set back to 1 after each step
        self.model._weights[PRIOR_OFFSET] = 1.0

    @property
    def version(self) -> str:
        return self.prior.version

    def _with_prior(self, x: Features) -> Features:
        out = _clipped({k: v for k, v in x.items() if k != PRIOR})
        offset = x[PRIOR] if PRIOR in x else self.prior.logit(x)
        # bounded as the node bounds it; a hostile label (1e308 - 1e308) must not make the weights NaN
        out[PRIOR_OFFSET] = max(-OFFSET_LIMIT, min(OFFSET_LIMIT, offset)) if math.isfinite(offset) else 0.0
        # each of the prior's terms in logit units: a learnt weight w scales that term by (1 + w)
        for name, term in self.prior.contributions(x).items():
            if math.isfinite(term):
                out[f"{TERM}{name}"] = max(-FEATURE_LIMIT, min(FEATURE_LIMIT, term))
        return out

    def predict_proba_one(self, x: Features) -> dict[bool, float]:
        p = self.model.predict_proba_one(self._with_prior(x)).get(True, 0.5)
        return {True: p, False: 1.0 - p}

    def contributions(self, x: Features) -> dict[str, float]:
        """Signed logit shares: the prior's own terms, then each learnt correction (weight times value)."""
        weights = self.model.weights
        shares = dict(self.prior.contributions(x))
        for name, value in self._with_prior(x).items():
            if name == PRIOR_OFFSET:
                continue
            name = name.removeprefix(TERM)  # a correction of a prior term is that term's share
            share = weights.get(name, 0.0) * value
            if share:
                shares[name] = shares.get(name, 0.0) + share
        return shares

    def learn_one(self, x: Features, y: bool, w: float = 1.0) -> None:
        """One label; ``w`` > 1 for a label that stands for several (a spot check)."""
        self.model.learn_one(self._with_prior(x), y, w=w)
        self._hold_offset()
        self.n_labels += 1
