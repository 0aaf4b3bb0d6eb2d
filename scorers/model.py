"""The online confidence model: the documented prior, then River once humans have labelled.

Labels come only from human decisions. Until ``min_labels`` have arrived the prior alone
scores; after that a River logistic regression (standardised features) learns online and its
probability is blended in with weight n / (n + min_labels), so one early label cannot swing
every decision.
"""

from __future__ import annotations

from river import compose, linear_model, optim, preprocessing

from lotflow.scorers.prior import CheckPrior

__all__ = ["OnlineConfidence"]

Features = dict[str, float]


class OnlineConfidence:
    def __init__(self, min_labels: int = 50, learning_rate: float = 0.05) -> None:
        self.min_labels = min_labels
        self.learning_rate = learning_rate
        self.prior = CheckPrior()
        self.model = compose.Pipeline(
            preprocessing.StandardScaler(),
            linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate)),
        )
        self.n_labels = 0

    @property
    def version(self) -> str:
        if self.n_labels == 0:
            return self.prior.version
        return f"{self.prior.version}+river-lr-{self.n_labels}"

    def _weight(self) -> float:
        return self.n_labels / (self.n_labels + self.min_labels) if self.n_labels >= self.min_labels else 0.0

    def predict_proba_one(self, x: Features) -> dict[bool, float]:
        p = self.prior.predict_proba_one(x)[True]
        w = self._weight()
        if w > 0.0:
            p = (1.0 - w) * p + w * self.model.predict_proba_one(x).get(True, 0.5)
        return {True: p, False: 1.0 - p}

    def contributions(self, x: Features) -> dict[str, float]:
        """Signed logit shares: the prior's, blended with the learnt model's (weight times standardised
        value) in the same proportion as the probabilities. The blend is of probabilities, so these
        shares explain the direction and relative size of each pull, not the exact logit."""
        shares = self.prior.contributions(x)
        w = self._weight()
        if w <= 0.0:
            return shares
        scaled = self.model["StandardScaler"].transform_one(x)
        weights = self.model["LogisticRegression"].weights
        blended = {name: (1.0 - w) * value for name, value in shares.items()}
        for name, value in scaled.items():
            share = w * weights.get(name, 0.0) * value
            if share:
                blended[name] = blended.get(name, 0.0) + share
        return blended

    def learn_one(self, x: Features, y: bool, w: float = 1.0) -> None:
        """One label; ``w`` > 1 for a label that stands for several (a spot check)."""
        self.model["StandardScaler"].learn_one(x)
        self.model["LogisticRegression"].learn_one(self.model["StandardScaler"].transform_one(x), y, w=w)
        self.n_labels += 1
