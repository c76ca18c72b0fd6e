"""Detection metrics for anomaly scores (higher score = more anomalous)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["MAX_PIXEL_NEGATIVES", "Confusion", "auroc", "confusion_at", "pixel_auroc"]

MAX_PIXEL_NEGATIVES = 400_000
"""``pixel_auroc`` keeps every defect pixel and at most about this many others."""

Scores = Sequence[float] | NDArray[np.floating[Any]]


def auroc(good: Scores, bad: Scores) -> float:
    """Area under the ROC curve: P(score of a bad image > score of a good one), ties count 1/2.

    Computed exactly from ranks (Mann-Whitney U), O((n + m) log(n + m)).
    """
    n_good, n_bad = len(good), len(bad)
    if n_good == 0 or n_bad == 0:
        raise ValueError("AUROC needs at least one good and one bad score")
    scores = np.concatenate([np.asarray(good, np.float64), np.asarray(bad, np.float64)])
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # average (1-based) ranks over ties: a run of equal scores at sorted positions
    # start..end-1 all get rank (start + end + 1) / 2
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u_bad = ranks[n_good:].sum() - n_bad * (n_bad + 1) / 2.0
    return float(u_bad / (n_good * n_bad))


def pixel_auroc(
    heatmaps: Sequence[NDArray[np.floating[Any]]],
    masks: Sequence[NDArray[np.bool_]],
    *,
    max_negatives: int = MAX_PIXEL_NEGATIVES,
) -> float:
    """AUROC of heat-map values against defect masks, over the pixels of all images.

    ``masks[i]`` is image i's H x W defect mask (True = defect; all False for a good
    image). ``heatmaps[i]`` is its heat map at any resolution (a profile's G x G grid),
    enlarged to H x W with bilinear interpolation (``cv2.resize``, ``INTER_LINEAR``)
    when the sizes differ. Every defect pixel counts. Non-defect pixels are taken, in
    image order and row-major within an image, with one fixed stride chosen so that at
    most ``max_negatives`` remain: the result is deterministic.
    """
    if len(heatmaps) != len(masks):
        raise ValueError(f"{len(heatmaps)} heat maps but {len(masks)} masks")
    if max_negatives < 1:
        raise ValueError("max_negatives must be at least 1")
    for i, (heat, mask) in enumerate(zip(heatmaps, masks, strict=True)):
        if heat.ndim != 2 or mask.ndim != 2:
            raise ValueError(f"heat map and mask {i} must be 2-D (got {heat.shape}, {mask.shape})")
    negatives_total = sum(int(m.size - np.count_nonzero(m)) for m in masks)
    stride = max(1, -(-negatives_total // max_negatives))
    positives: list[NDArray[np.float32]] = []
    negatives: list[NDArray[np.float32]] = []
    seen = 0  # negatives before the current image, for one stride across all images
    for heat, mask in zip(heatmaps, masks, strict=True):
        values = np.asarray(heat, np.float32)
        if values.shape != mask.shape:
            height, width = mask.shape
            values = np.asarray(
                cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR), np.float32
            )
        defect = np.asarray(mask, bool)
        positives.append(values[defect])
        clean = values[~defect]
        negatives.append(clean[(-seen) % stride :: stride])
        seen += clean.size
    if not any(p.size for p in positives):
        raise ValueError("pixel AUROC needs at least one defect pixel in the masks")
    if not any(n.size for n in negatives):
        raise ValueError("pixel AUROC needs at least one pixel outside the defect masks")
    return auroc(np.concatenate(negatives), np.concatenate(positives))


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
