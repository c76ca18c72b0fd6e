"""workers.stages.quality on real photographs (samples/) and their degraded copies."""

from __future__ import annotations

import io
import itertools
import json
from types import ModuleType

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from imgpipe.errors import PermanentError
from tests.unit.conftest import LoadSample
from workers.stages.quality import FLAGS, QualityParams, QualityResult, assess_quality

DEGRADATION_FLAG = {
    "blur": "blurry",
    "dark": "dark",
    "noise": "noisy",
    "lowcontrast": "low_contrast",
}


def scores(images: list[NDArray[np.uint8]]) -> list[float]:
    return [assess_quality(image).score for image in images]


def assert_strictly_falling(values: list[float]) -> None:
    assert all(a > b for a, b in itertools.pairwise(values)), values


def test_clean_photographs_have_no_flags_and_a_good_score(
    photo_name: str, load_sample: LoadSample
) -> None:
    result = assess_quality(load_sample(photo_name))

    assert result.usable and result.unusable_reason is None
    assert result.flags == ()
    assert 70.0 <= result.score <= 100.0


def test_score_falls_monotonically_as_blur_rises(
    photo_name: str, load_sample: LoadSample, degrade: ModuleType
) -> None:
    clean = load_sample(photo_name)
    blurred = [degrade.blur(clean, sigma_px) for sigma_px in (0.8, 1.5, 2.5)]

    assert_strictly_falling(scores([clean, *blurred]))


def test_score_falls_monotonically_as_noise_rises(
    photo_name: str, load_sample: LoadSample, degrade: ModuleType
) -> None:
    clean = load_sample(photo_name)
    noisy = [degrade.add_noise(clean, sigma) for sigma in (4.0, 8.0, 16.0, 30.0)]

    assert_strictly_falling(scores([clean, *noisy]))


def test_score_falls_monotonically_as_darkening_rises(
    photo_name: str, load_sample: LoadSample, degrade: ModuleType
) -> None:
    clean = load_sample(photo_name)
    darker = [degrade.darken(clean, factor) for factor in (0.6, 0.4, 0.25, 0.15)]

    assert_strictly_falling(scores([clean, *darker]))


@pytest.mark.parametrize("degradation", sorted(DEGRADATION_FLAG))
def test_each_degraded_copy_raises_its_flag_and_scores_below_the_original(
    photo_name: str, degradation: str, load_sample: LoadSample
) -> None:
    clean = assess_quality(load_sample(photo_name))
    degraded = assess_quality(load_sample(f"degraded/{photo_name}_{degradation}"))

    assert DEGRADATION_FLAG[degradation] in degraded.flags
    assert degraded.usable
    assert degraded.score < clean.score


def test_heavy_jpeg_compression_is_flagged_blocky_even_when_cropped_off_grid(
    load_sample: LoadSample,
) -> None:
    buffer = io.BytesIO()
    Image.fromarray(load_sample("astronaut")).save(buffer, "JPEG", quality=10)
    with Image.open(buffer) as img:
        compressed = np.asarray(img.convert("RGB"), dtype=np.uint8)

    aligned = assess_quality(compressed)
    shifted = assess_quality(np.ascontiguousarray(compressed[3:, 5:]))

    assert "blocky" in aligned.flags and "blocky" in shifted.flags
    assert (
        aligned.metrics["blockiness"]
        > assess_quality(load_sample("astronaut")).metrics["blockiness"]
    )


def test_brightened_photo_is_flagged_overexposed(
    load_sample: LoadSample, degrade: ModuleType
) -> None:
    bright = degrade.darken(load_sample("coffee"), 2.2)  # a factor > 1 over-exposes

    result = assess_quality(bright)

    assert "overexposed" in result.flags
    assert result.score < assess_quality(load_sample("coffee")).score


def test_small_photo_is_flagged_low_res_but_stays_usable(load_sample: LoadSample) -> None:
    small = np.ascontiguousarray(load_sample("coffee")[:200, :300])

    result = assess_quality(small)

    assert result.usable
    assert "low_res" in result.flags


@pytest.mark.parametrize("level", [0, 128, 255])
def test_uniform_image_is_unusable_with_a_reason(level: int) -> None:
    result = assess_quality(np.full((480, 640, 3), level, dtype=np.uint8))

    assert not result.usable
    assert result.score == 0.0
    assert result.unusable_reason is not None and "uniform" in result.unusable_reason


def test_16x16_image_is_unusable_as_too_small(load_sample: LoadSample) -> None:
    tiny = np.ascontiguousarray(load_sample("astronaut")[100:116, 100:116])

    result = assess_quality(tiny)

    assert not result.usable
    assert result.flags == ("low_res",)
    assert result.unusable_reason is not None and "16x16" in result.unusable_reason


def test_metrics_are_reported_with_units_and_sub_scores(load_sample: LoadSample) -> None:
    result = assess_quality(load_sample("photo_1080p"))
    metrics = result.metrics

    for name in (
        "sharpness",
        "brightness",
        "contrast_rms",
        "noise_sigma",
        "blockiness",
        "megapixels",
        "highlights_clipped_frac",
        "shadows_clipped_frac",
    ):
        assert name in metrics
    assert metrics["width_px"] == 1920 and metrics["height_px"] == 1080
    assert metrics["megapixels"] == pytest.approx(2.0736)
    assert metrics["analysis_scale"] == pytest.approx(1024 / 1920, abs=1e-4)
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k.startswith("score_"))
    assert set(result.flags) <= set(FLAGS)


def test_assessment_is_deterministic_and_leaves_the_input_untouched(
    load_sample: LoadSample,
) -> None:
    image = load_sample("chelsea")
    before = image.copy()

    assert assess_quality(image) == assess_quality(image)
    assert np.array_equal(image, before)


def test_assessment_accepts_a_non_contiguous_view(load_sample: LoadSample) -> None:
    image = load_sample("coffee")

    assert assess_quality(image[::2, ::2]).usable


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((64, 64), dtype=np.uint8),
        np.zeros((64, 64, 4), dtype=np.uint8),
        np.zeros((64, 64, 3), dtype=np.float32),
    ],
    ids=["grey", "rgba", "float"],
)
def test_assessment_refuses_anything_but_rgb_uint8(bad: NDArray[np.uint8]) -> None:
    with pytest.raises(PermanentError, match="RGB"):
        assess_quality(bad)


def test_result_round_trips_through_json(load_sample: LoadSample) -> None:
    result = assess_quality(load_sample("degraded/rocket_noise"))

    wire = json.loads(json.dumps(result.to_json()))

    assert QualityResult.from_json(wire) == result


def test_result_from_json_rejects_an_unknown_flag(load_sample: LoadSample) -> None:
    wire = assess_quality(load_sample("rocket")).to_json()
    wire["flags"] = ["fuzzy"]

    with pytest.raises(PermanentError, match="flags"):
        QualityResult.from_json(wire)


def test_params_from_json_rejects_an_unknown_key_and_names_it() -> None:
    with pytest.raises(PermanentError, match="'min_side'") as excinfo:
        QualityParams.from_json({"min_side": 100})

    assert "min_side_px" in str(excinfo.value)  # the message lists what is expected


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("min_side_px", "big", "int"), ("min_side_px", 2.5, "int"), ("min_side_px", True, "int")],
)
def test_params_from_json_rejects_a_wrong_type_and_names_key_and_type(
    key: str, value: object, expected: str
) -> None:
    with pytest.raises(PermanentError, match=f"'{key}' must be a finite {expected}"):
        QualityParams.from_json({key: value})


def test_params_from_json_accepts_an_int_for_a_float_and_keeps_defaults() -> None:
    params = QualityParams.from_json({"noisy_above_sigma_levels": 6, "min_side_px": 128})

    assert params.noisy_above_sigma_levels == 6.0
    assert params.min_side_px == 128
    assert params.dark_below_luma_levels == QualityParams().dark_below_luma_levels
    assert QualityParams.from_json(QualityParams().to_json()) == QualityParams()


def test_params_refuse_inconsistent_limits() -> None:
    with pytest.raises(PermanentError, match="min_side_px"):
        QualityParams.from_json({"min_side_px": 16, "unusable_below_side_px": 32})


def test_thresholds_in_params_change_the_flags(load_sample: LoadSample) -> None:
    image = load_sample("rocket")  # a dim night launch: mean luma about 61

    assert "dark" not in assess_quality(image).flags
    assert "dark" in assess_quality(image, QualityParams(dark_below_luma_levels=70.0)).flags
