"""PatchCore-style anomaly scoring against a fitted profile of good images.

Public surface used by the anomaly stage and the ``imgpipe anomaly fit|eval`` CLI.
Importing this package imports torch.
"""

from workers.anomaly.fit import fit_profile
from workers.anomaly.metrics import Confusion, auroc, confusion_at
from workers.anomaly.patchcore import FeatureConfig
from workers.anomaly.profile import (
    EvalReport,
    Profile,
    ProfileInfo,
    evaluate_profile,
    load_profile,
)
from workers.anomaly.scoring import ImageScore, backbone_for, score_images

__all__ = [
    "Confusion",
    "EvalReport",
    "FeatureConfig",
    "ImageScore",
    "Profile",
    "ProfileInfo",
    "auroc",
    "backbone_for",
    "confusion_at",
    "evaluate_profile",
    "fit_profile",
    "load_profile",
    "score_images",
]
