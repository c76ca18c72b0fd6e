"""Helpers of `imgpipe bench`: percentiles, ratios, the canvas backend URL, the default
images and the in-process baseline."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgpipe.face.bench.baselines import sequential_baseline
from imgpipe.face.bench.canvas import redis_py_url, result_url
from imgpipe.face.bench.run import SAMPLES_DIR, default_images
from imgpipe.face.bench.stats import ratio, summary
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.pipelines import load_pipeline
from orchestrator.submit import resolve_spec
from tests.support.images import noise_png


def test_summary_uses_nearest_rank_and_ignores_missing_values() -> None:
    values: list[float | None] = [float(v) for v in range(1, 101)]
    values.append(None)
    assert summary(values) == {"n": 100, "p50": 51.0, "p95": 95.0, "p99": 99.0}
    assert summary([], (0.5,)) == {"n": 0, "p50": None}


def test_ratio_is_none_without_a_baseline() -> None:
    assert ratio(30.0, 10.0) == 3.0
    assert ratio(1.0, None) is None
    assert ratio(None, 2.0) is None
    assert ratio(1.0, 0.0) is None


def test_canvas_results_go_to_another_database_of_the_same_redis() -> None:
    embedded = "redis+socket:///tmp/ipbench-x/redis.sock"
    assert result_url(embedded) == embedded + "?virtual_host=1"
    assert redis_py_url(result_url(embedded)) == "unix:///tmp/ipbench-x/redis.sock?db=1"
    assert result_url("redis://:pw@host:6379/0") == "redis://:pw@host:6379/1"
    assert result_url("redis://host:6379") == "redis://host:6379/1"
    assert result_url("rediss://host:6380/15") == "rediss://host:6380/0"
    with pytest.raises(ValueError, match="needs a Redis broker"):
        result_url("amqp://guest@host//")


def test_the_default_images_are_the_repository_samples() -> None:
    """`imgpipe bench --pipeline ...` without --image reads samples/ (README command)."""
    images = default_images()
    assert images[0][0] == str(SAMPLES_DIR / "photo_1080p.jpg")
    assert len(images) == len(
        list(SAMPLES_DIR.glob("*.jpg")) + list(SAMPLES_DIR.glob("degraded/*.jpg"))
    )


def test_the_in_process_baseline_gives_each_stage_its_upstream_kinds(tmp_path: Path) -> None:
    """enhance reads the quality result by its kind: the baseline must pass the kinds,
    as the worker's claim does, or `imgpipe bench --pipeline basic` fails on enhance."""
    settings = Settings(data_dir=tmp_path)
    resolved = resolve_spec(OrchestratorContext(settings), load_pipeline("basic"), None)
    figures, inputs = sequential_baseline([noise_png(3, side_px=96)], resolved, "cpu", 2)
    assert figures["images"] == 2
    needs = resolved["stages"]["enhance"]["needs"]
    assert needs and dict(inputs["enhance"][0].upstream_kinds) == dict.fromkeys(needs, "quality")
