"""Anomaly stage: score each image against a fitted profile of good images.

Parameters (``StageInput.params``):

* ``profile``: path to a profile written by ``imgpipe anomaly fit``. Absent or null: the
  stage is skipped with reason ``no_profile`` (there is no score without a profile).
* ``profile_sha256``: optional pin; a profile file with another sha256 fails the stage.
* ``threshold``: optional override of the profile's calibrated threshold (> 0).

Output JSON: ``score``, ``threshold``, ``anomalous`` (score > threshold), ``profile``
(name, version, sha256) and ``heatmap`` (size, max, media type) describing the PNG blob:
a grey-scale map where ``pixel = round(255 * clip(score / (2 * threshold), 0, 1))`` for
each location's fused score, so mid-grey (128) is the threshold, white is twice it and
black is "no worse than a typical good image". Inputs sharing a profile and a device are
scored in one forward pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from imgpipe.errors import PermanentError, WeightsMismatchError
from imgpipe.stageoutputs import AnomalyOutput
from workers.anomaly.profile import Profile, load_profile
from workers.anomaly.scoring import ImageScore, backbone_for, score_images
from workers.stagecontract import StageInput, StageOutput, StageSkip

__all__ = ["HEATMAP_MAX_SIDE_PX", "AnomalyParams", "heatmap_png", "run_stage_batch"]

HEATMAP_MAX_SIDE_PX = 1024
"""The heat map has the original upload's aspect and size, shrunk to at most this many
pixels a side (the stage may read a reduced copy: the map does not depend on it)."""
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class AnomalyParams:
    profile: str | None = None
    profile_sha256: str | None = None
    threshold: float | None = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> AnomalyParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PermanentError(
                f"unknown anomaly parameter(s) {unknown}; the stage accepts {sorted(known)}"
            )
        profile = raw.get("profile")
        pin = raw.get("profile_sha256")
        threshold = raw.get("threshold")
        if profile is not None and (not isinstance(profile, str) or not profile.strip()):
            raise PermanentError(
                f"anomaly parameter `profile` must be a path string, got {profile!r}"
            )
        if pin is not None and (not isinstance(pin, str) or not _SHA256_RE.match(pin)):
            raise PermanentError(
                f"anomaly parameter `profile_sha256` must be 64 hex digits, got {pin!r}"
            )
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise PermanentError(
                    f"anomaly parameter `threshold` must be a number, got {threshold!r}"
                )
            if not math.isfinite(threshold) or threshold <= 0:
                raise PermanentError(
                    f"anomaly parameter `threshold` must be finite and > 0, got {threshold!r}"
                )
        return cls(
            profile=profile,
            profile_sha256=pin.lower() if pin is not None else None,
            threshold=float(threshold) if threshold is not None else None,
        )


def heatmap_png(
    fused: NDArray[np.float32], threshold: float, size: tuple[int, int]
) -> tuple[bytes, tuple[int, int]]:
    """Fused G x G score map -> (PNG bytes, (width, height)) by the module's pixel rule."""
    width, height = size
    shrink = min(1.0, HEATMAP_MAX_SIDE_PX / max(width, height))
    out_size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
    scaled = np.clip(fused / (2.0 * threshold), 0.0, 1.0)
    resized = cv2.resize(scaled.astype(np.float32), out_size, interpolation=cv2.INTER_LINEAR)
    pixels = np.rint(resized * 255.0).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise PermanentError("could not encode the anomaly heat map as PNG")
    return encoded.tobytes(), out_size


def _check_pin(profile: Profile, pin: str | None) -> None:
    if pin is not None and pin != profile.sha256:
        raise WeightsMismatchError(
            f"anomaly profile {profile.path} has sha256 {profile.sha256} but the stage pins "
            f"profile_sha256={pin}; point `profile` at the pinned file or update the pin"
        )


def run_stage_batch(inputs: Sequence[StageInput]) -> list[StageOutput | StageSkip]:
    """Score ``inputs``; one backbone call per (profile, device) group.

    A malformed parameter, a missing/unreadable profile or a failed ``profile_sha256`` pin
    raises ``PermanentError`` for the whole batch (the BatchRunner contract has no
    per-item error).
    """
    params = [AnomalyParams.from_json(inp.params) for inp in inputs]
    results: list[StageOutput | StageSkip | None] = [None] * len(inputs)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (inp, p) in enumerate(zip(inputs, params, strict=True)):
        if p.profile is None:
            results[i] = StageSkip(
                reason="no_profile",
                detail="the anomaly stage has no `profile` parameter; fit one with "
                "`imgpipe anomaly fit PROFILE IMAGES...` and set `profile` in the pipeline",
            )
        else:
            groups.setdefault((p.profile, inp.device), []).append(i)

    for (path, device), members in groups.items():
        profile = load_profile(path)
        for i in members:
            _check_pin(profile, params[i].profile_sha256)
        backbone = backbone_for(device)
        try:
            scores = score_images(profile, [inputs[i].image for i in members], backbone)
        except ValueError as exc:
            raise PermanentError(f"anomaly stage cannot score this input: {exc}") from exc
        model = backbone.info().to_json()
        for i, scored in zip(members, scores, strict=True):
            threshold = params[i].threshold or profile.threshold
            results[i] = _stage_output(scored, threshold, profile, inputs[i].original_size, model)
    return [r for r in results if r is not None]


def _stage_output(
    scored: ImageScore,
    threshold: float,
    profile: Profile,
    original_size: tuple[int, int],
    model: Mapping[str, str],
) -> StageOutput:
    # In the upload's frame, whatever size the stage was given to read.
    png, (width, height) = heatmap_png(scored.heatmap, threshold, original_size)
    output: AnomalyOutput = {
        "score": scored.score,
        "threshold": threshold,
        "anomalous": scored.score > threshold,
        "profile": profile.record(),
        "heatmap": {
            "width": width,
            "height": height,
            "max": float(scored.heatmap.max()),
            "media_type": "image/png",
            "pixel_rule": "round(255 * clip(score / (2 * threshold), 0, 1))",
        },
    }
    return StageOutput(output=output, blob=png, blob_media_type="image/png", model=model)
