"""The documented prior: confidence before any human label exists.

A logistic score built from check outcomes and the vendor's history, so every weight can be
read and argued about:

    logit = 4.2                                   # a clean receipt: ~0.985
          - 6.0 * (hard BLOCK reasons)            # a rule failed: far below every band
          - 2.5 * (hard WARN reasons)
          - 3.0 * (soft reasons) * (1 - pattern_accept_share)   # a deviation people may accept
          - 1.0 * max(0, coa_max_abs_z - 2.5)       # CoA value far from this vendor's history
          - 10  * max(0, vendor_exception_rate - 0.08)   # a vendor whose rule failures rise
          - 0.8 * coa_history_missing             # no history yet to compare CoA values with
    confidence = 1 / (1 + exp(-logit))

With the receiving thresholds (verified >= 0.90, HIGH < 0.75) a CoA value about 4.5 standard
deviations from the vendor's mean, or a vendor whose recent exception rate passes ~30 %,
becomes an exception although no single rule fails. ``pattern_accept_share`` is the smoothed
share of people's accepts of the receipt's vendor x material x soft reason, (a + 1) / (n + 2):
0.5 before anyone decided (-1.5), 0.8 after three accepts (-0.6), 0.2 after three rejects
(-2.4). A soft reason is verified only once the node's gate also passes (people accepted the
pattern consistently), so this term orders, it does not release.
"""

from __future__ import annotations

import math

__all__ = ["CheckPrior"]

Features = dict[str, float]


class CheckPrior:
    """River-style scorer; it does not learn (``learn_one`` is a no-op by design)."""

    version = "prior-1"

    def __init__(
        self,
        base_logit: float = 4.2,
        block_weight: float = 6.0,
        warn_weight: float = 2.5,
        z_weight: float = 1.0,
        z_free: float = 2.5,
        vendor_weight: float = 10.0,
        vendor_free: float = 0.08,
        no_history_weight: float = 0.8,
        soft_weight: float = 3.0,
    ) -> None:
        self.base_logit = base_logit
        self.block_weight = block_weight
        self.warn_weight = warn_weight
        self.z_weight = z_weight
        self.z_free = z_free
        self.vendor_weight = vendor_weight
        self.vendor_free = vendor_free
        self.no_history_weight = no_history_weight
        self.soft_weight = soft_weight

    def contributions(self, x: Features) -> dict[str, float]:
        """Each feature's signed share of the logit (the base logit is not one); zero terms left out."""
        terms = {
            "n_block": -self.block_weight * x.get("n_block", 0.0),
            "n_warn": -self.warn_weight * x.get("n_warn", 0.0),
            "coa_max_abs_z": -self.z_weight * max(0.0, x.get("coa_max_abs_z", 0.0) - self.z_free),
            "vendor_exception_rate": -self.vendor_weight * max(0.0, x.get("vendor_exception_rate", 0.0)
                                                               - self.vendor_free),
            "coa_history_missing": -self.no_history_weight * x.get("coa_history_missing", 0.0),
            "n_soft": -self.soft_weight * x.get("n_soft", 0.0) * (1.0 - x.get("pattern_accept_share", 0.5)),
        }
        return {name: value for name, value in terms.items() if value}

    def logit(self, x: Features) -> float:
        return self.base_logit + sum(self.contributions(x).values())

    def predict_proba_one(self, x: Features) -> dict[bool, float]:
        p = 1.0 / (1.0 + math.exp(-self.logit(x)))
        return {True: p, False: 1.0 - p}

    def learn_one(self, x: Features, y: bool) -> None:
        return None
