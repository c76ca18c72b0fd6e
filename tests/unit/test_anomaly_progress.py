"""``imgpipe anomaly fit|eval`` progress: every image is reported, ending at the total."""

from __future__ import annotations

from pathlib import Path

import pytest
import skimage.data as skimage_data

from workers.anomaly import evaluate_profile, fit_profile
from workers.anomaly.profile import load_profile
from workers.anomaly.scoring import backbone_for, score_images
from workers.anomaly.synthetic import texture_split


def test_fit_and_eval_report_progress_up_to_every_image(tmp_path: Path) -> None:
    split = texture_split(
        skimage_data.brick(), n_fit=8, n_holdout=3, n_good=3, n_bad_per_kind=1, seed=2
    )
    fit_calls: list[tuple[int, int]] = []
    fit_profile(
        split.fit, tmp_path / "p.npz", name="p", holdout_images=split.holdout,
        progress=lambda done, total: fit_calls.append((done, total)),
    )  # fmt: skip
    total = len(split.fit) + len(split.holdout)
    assert fit_calls[-1] == (total, total)
    assert [d for d, _ in fit_calls] == sorted(d for d, _ in fit_calls)
    eval_calls: list[tuple[int, int]] = []
    report = evaluate_profile(
        tmp_path / "p.npz", split.good, split.bad,
        progress=lambda done, total: eval_calls.append((done, total)),
    )  # fmt: skip
    scored = len(split.good) + len(split.bad)
    assert eval_calls[-1] == (scored, scored) and len(eval_calls) >= 2
    # the untimed warm-up call is neither reported nor counted, and changes no score
    assert eval_calls[0][0] > 0
    assert len(report.good_scores) == len(split.good) and report.score_ms_per_image > 0
    backbone = backbone_for("cpu")
    direct = score_images(load_profile(tmp_path / "p.npz"), split.good, backbone)
    assert [s.score for s in direct] == pytest.approx(report.good_scores, abs=1e-6)
