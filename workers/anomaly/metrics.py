"""Detection metrics for anomaly scores (higher score = more anomalous)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Confusion", "auroc", "confusion_at"]


def auroc(good: Sequence[float], bad: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a bad image > score of a good one), ties count 1/2.

    Computed exactly from ranks (Mann-Whitney U), O((n + m) log(n + m)).
    """
    if not good or not bad:
        raise ValueError("AUROC needs at least one good and one bad score")
    scores = np.concatenate([np.asarray(good, np.float64), np.asarray(bad, np.float64)])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    n_good, n_bad = len(good), len(bad)
    u_bad = ranks[n_good:].sum() - n_bad * (n_bad + 1) / 2.0
    return float(u_bad / (n_good * n_bad))


@dataclass(frozen=True)
class Confusion:
    """Counts at one threshold; ``anomalous`` means score > threshold, bad = positive."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def false_positive_rate(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0


def confusion_at(good: Sequence[float], bad: Sequence[float], threshold: float) -> Confusion:
    g = np.asarray(good, np.float64)
    b = np.asarray(bad, np.float64)
    return Confusion(
        tp=int((b > threshold).sum()),
        fp=int((g > threshold).sum()),
        tn=int((g <= threshold).sum()),
        fn=int((b <= threshold).sum()),
    )
