"""workers.stages.enhance on the degraded copies of real photographs (samples/degraded/)."""

from __future__ import annotations

import dataclasses
import json
from types import ModuleType

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from imgpipe.errors import PermanentError
from tests.unit.conftest import LoadSample
from workers.stages.enhance import EnhanceParams, EnhanceResult, enhance_image
from workers.stages.quality import QualityResult, assess_quality

DEGRADATIONS = ("blur", "dark", "noise", "lowcontrast")
# What each degraded copy should trigger, in order.
EXPECTED_OPS = {
    "blur": ["unsharp"],
    "dark": ["gamma"],  # the gain restores contrast too, so stretch/CLAHE are skipped
    "noise": ["denoise"],
    "lowcontrast": ["stretch", "clahe"],
}
EVERY_FLAG_FIXED_BY_AN_OP = ("blurry", "dark", "low_contrast", "noisy")


def enhance(image: NDArray[np.uint8], **params: float) -> tuple[QualityResult, EnhanceResult]:
    quality = assess_quality(image)
    return quality, enhance_image(image, quality, EnhanceParams(**params))  # type: ignore[arg-type]


def forced(quality: QualityResult, flags: tuple[str, ...]) -> QualityResult:
    return dataclasses.replace(quality, flags=flags)


@pytest.mark.parametrize("degradation", DEGRADATIONS)
def test_enhancement_raises_the_quality_score_of_each_degraded_copy(
    photo_name: str, degradation: str, load_sample: LoadSample
) -> None:
    before, result = enhance(load_sample(f"degraded/{photo_name}_{degradation}"))

    after = assess_quality(result.image)

    assert result.applied, "a degraded copy must trigger at least one operation"
    assert after.score > before.score + 5.0, (before.score, after.score)


@pytest.mark.parametrize("degradation", DEGRADATIONS)
def test_enhancement_moves_each_degraded_copy_closer_to_the_original(
    photo_name: str, degradation: str, load_sample: LoadSample
) -> None:
    original = load_sample(photo_name)
    degraded = load_sample(f"degraded/{photo_name}_{degradation}")

    _, result = enhance(degraded)

    assert cv2.PSNR(original, result.image) > cv2.PSNR(original, degraded)


@pytest.mark.parametrize("degradation", DEGRADATIONS)
def test_each_degradation_gets_the_operations_its_flags_call_for(
    photo_name: str, degradation: str, load_sample: LoadSample
) -> None:
    _, result = enhance(load_sample(f"degraded/{photo_name}_{degradation}"))

    assert [op.op for op in result.applied] == EXPECTED_OPS[degradation]
    assert all(op.reason and op.params for op in result.applied)


@pytest.mark.parametrize("degradation", ["dark", "noise", "lowcontrast"])
def test_enhancement_clears_the_flag_of_dark_noisy_and_low_contrast_copies(
    photo_name: str, degradation: str, load_sample: LoadSample
) -> None:
    _, result = enhance(load_sample(f"degraded/{photo_name}_{degradation}"))

    assert assess_quality(result.image).flags == ()


def test_clean_photo_without_flags_is_returned_untouched(
    photo_name: str, load_sample: LoadSample
) -> None:
    image = load_sample(photo_name)

    quality, result = enhance(image)

    assert quality.flags == ()
    assert result.applied == ()
    assert np.array_equal(result.image, image)


def test_unusable_image_is_returned_untouched() -> None:
    grey = np.full((120, 160, 3), 128, dtype=np.uint8)

    quality, result = enhance(grey)

    assert not quality.usable
    assert result.applied == ()
    assert np.array_equal(result.image, grey)


def test_every_operation_keeps_size_dtype_and_layout_on_an_odd_sized_crop(
    load_sample: LoadSample,
) -> None:
    image = np.ascontiguousarray(load_sample("coffee")[3:304, 7:464])  # 301 x 457
    quality = forced(assess_quality(image), EVERY_FLAG_FIXED_BY_AN_OP)

    result = enhance_image(image, quality, EnhanceParams(contrast_rms_target=1.0))

    assert [op.op for op in result.applied] == ["denoise", "gamma", "stretch", "clahe", "unsharp"]
    assert result.image.shape == image.shape
    assert result.image.dtype == np.uint8
    assert result.image.flags["C_CONTIGUOUS"]


def test_overexposed_photo_is_darkened_with_a_gamma_above_one(
    load_sample: LoadSample, degrade: ModuleType
) -> None:
    bright = degrade.darken(load_sample("chelsea"), 2.2)  # a factor > 1 over-exposes

    quality, result = enhance(bright)

    assert "overexposed" in quality.flags
    (gamma,) = [op for op in result.applied if op.op == "gamma"]
    assert gamma.params["gamma"] > 1.0
    assert result.image.mean() < bright.mean()
    assert assess_quality(result.image).score > quality.score


def test_enhancement_leaves_the_input_untouched(load_sample: LoadSample) -> None:
    image = load_sample("degraded/coffee_noise")
    before = image.copy()

    enhance(image)

    assert np.array_equal(image, before)


def test_result_json_names_each_op_and_carries_no_pixels(load_sample: LoadSample) -> None:
    _, result = enhance(load_sample("degraded/rocket_lowcontrast"))

    wire = json.loads(json.dumps(result.to_json()))

    assert [op["op"] for op in wire["applied"]] == ["stretch", "clahe"]
    assert wire["applied"][1]["params"]["clip_limit"] == 2.0
    assert wire["duration_ms"] >= 0.0
    assert "image" not in wire


def test_params_from_json_rejects_an_unknown_key_and_names_it() -> None:
    with pytest.raises(PermanentError, match="'clahe_clip'") as excinfo:
        EnhanceParams.from_json({"clahe_clip": 3.0})

    assert "clahe_clip_limit" in str(excinfo.value)


def test_params_from_json_rejects_a_wrong_type_and_names_the_key() -> None:
    with pytest.raises(PermanentError, match="'denoise_diameter_px' must be a finite int"):
        EnhanceParams.from_json({"denoise_diameter_px": "7"})


def test_params_from_json_round_trips_and_validates_ranges() -> None:
    params = EnhanceParams.from_json({"clahe_clip_limit": 3, "denoise_diameter_px": 7})

    assert params.clahe_clip_limit == 3.0
    assert EnhanceParams.from_json(params.to_json()) == params
    with pytest.raises(PermanentError, match="denoise_diameter_px"):
        EnhanceParams.from_json({"denoise_diameter_px": 4})


def test_params_set_the_strength_of_the_operations(load_sample: LoadSample) -> None:
    dark = load_sample("degraded/coffee_dark")
    noisy = load_sample("degraded/coffee_noise")

    _, dim = enhance(dark, dark_target_luma_levels=90.0)
    _, bright = enhance(dark, dark_target_luma_levels=130.0)
    _, light = enhance(noisy, denoise_strength=1.0)
    _, heavy = enhance(noisy, denoise_strength=3.0)

    assert bright.image.mean() > dim.image.mean()
    residual = [assess_quality(r.image).metrics["noise_sigma"] for r in (light, heavy)]
    assert residual[1] < residual[0]


def test_every_flag_with_an_operation_gets_it_on_a_1080p_photo(load_sample: LoadSample) -> None:
    # Speed is measured by benchmarks/quality_enhance.py (docs/benchmarks.md), not here.
    image = load_sample("photo_1080p")
    quality = forced(assess_quality(image), EVERY_FLAG_FIXED_BY_AN_OP)
    result = enhance_image(image, quality, EnhanceParams(contrast_rms_target=1.0))
    assert len(result.applied) == 5
    assert result.image.shape == image.shape
