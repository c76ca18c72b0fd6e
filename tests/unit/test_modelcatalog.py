"""Model versions and weights identity are in ``pipeline_hash`` (imgpipe/modelcatalog.py),
and the catalogue agrees with the model classes that run."""

from __future__ import annotations

import dataclasses

import pytest

from imgpipe import modelcatalog
from imgpipe.modelcatalog import ANOMALY_BACKBONE, MODELS, NUDENET_MODEL, stage_models
from orchestrator.pipelines import load_pipeline, pipeline_hash
from workers.models.efficientnet_lite0 import EfficientNetLite0Features
from workers.models.nudenet_detector import NudeNetDetector
from workers.models.torchvision_detectors import TORCHVISION_DETECTORS


def test_catalogue_matches_the_model_classes() -> None:
    assert MODELS[NUDENET_MODEL].version == NudeNetDetector.version
    assert MODELS[ANOMALY_BACKBONE].version == EfficientNetLite0Features.version
    for name, cls in TORCHVISION_DETECTORS.items():
        assert MODELS[name].version == cls.version
    assert set(modelcatalog.TORCHVISION_DETECTORS) == set(TORCHVISION_DETECTORS)


def test_weights_identity_prefers_a_pinned_sha256() -> None:
    (shipped,) = stage_models("detect", {})
    assert shipped["name"] == NUDENET_MODEL and str(shipped["weights"]).startswith("nudenet==")
    (pinned,) = stage_models("detect", {"weights_path": "/w.onnx", "weights_sha256": "ab" * 32})
    assert pinned["weights_sha256"] == "ab" * 32 and "weights" not in pinned
    assert stage_models("quality", {}) == []


def test_a_model_version_bump_changes_the_pipeline_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    spec, basic = load_pipeline("full").to_json(), load_pipeline("basic").to_json()
    before, basic_before = pipeline_hash(spec), pipeline_hash(basic)
    bumped = dataclasses.replace(MODELS[NUDENET_MODEL], version="next")
    monkeypatch.setitem(MODELS, NUDENET_MODEL, bumped)
    assert pipeline_hash(spec) != before
    assert pipeline_hash(basic) == basic_before  # no model stage: unaffected
