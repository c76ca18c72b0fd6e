"""The detect stage with NudeNet's YOLOv8n run natively in torch.

ONNX Runtime (a test dependency) serves only as the reference the native module and the
whole detection path are compared with, on real photographs shipped with scikit-image.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# The `test` extra installs all three; a missing one must fail loudly, not skip.
import onnxruntime as ort
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image

from imgpipe.errors import PermanentError, WeightsMismatchError
from workers.models.base import sha256_file
from workers.models.detection import DetectRequest
from workers.models.nudenet_detector import (
    NUDENET_LABELS,
    NudeNetDetector,
    default_weights_path,
    labels_from_metadata,
    letterbox_batch,
    to_network_input,
)
from workers.models.yolov8 import YOLOv8, load_onnx_initializers, read_onnx_weights
from workers.stagecontract import StageInput, StageOutput
from workers.stages import detect
from workers.stages.detect import DetectParams

assert importlib.util.find_spec("nudenet") is not None, "install imgpipe[nudenet,test]"
_SKIMAGE = importlib.util.find_spec("skimage")
assert _SKIMAGE is not None and _SKIMAGE.submodule_search_locations, "install imgpipe[test]"
SKIMAGE_DATA = Path(next(iter(_SKIMAGE.submodule_search_locations))) / "data"

Image8 = NDArray[np.uint8]


def photo(name: str) -> Image8:
    with Image.open(SKIMAGE_DATA / name) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """These inputs are tiny: one intra-op thread is faster than two and does not collapse
    when the CI machine is oversubscribed (OpenMP spin-waits); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photos() -> dict[str, Image8]:
    astronaut = photo("astronaut.png")
    return {
        "astronaut": astronaut,
        "camera": photo("camera.png"),  # greyscale cameraman, as RGB
        "astronaut_wide": np.ascontiguousarray(astronaut[40:400, :]),  # 512x360: letterboxed
        "chelsea": photo("chelsea.png"),  # a cat: no people
    }


@pytest.fixture(scope="module")
def weights_path() -> Path:
    return default_weights_path()


@pytest.fixture(scope="module")
def session(weights_path: Path) -> Any:
    return ort.InferenceSession(str(weights_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def native(weights_path: Path) -> YOLOv8:
    weights = read_onnx_weights(weights_path)
    module = YOLOv8(weights.num_classes)
    load_onnx_initializers(module, weights.tensors)
    return module.eval()


@pytest.fixture(scope="module")
def detector(weights_path: Path) -> NudeNetDetector:
    return NudeNetDetector(weights_path)


# -- reference: ONNX Runtime + OpenCV + NumPy, written independently of the code ---------


def reference_input(
    image: Image8, bgr: bool = False
) -> tuple[NDArray[np.float32], float, int, int]:
    h, w = image.shape[:2]
    scale = 320 / max(h, w)
    nw, nh = round(w * scale), round(h * scale)
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    left, top = (320 - nw) // 2, (320 - nh) // 2
    boxed = cv2.copyMakeBorder(
        resized, top, 320 - nh - top, left, 320 - nw - left, cv2.BORDER_CONSTANT, value=(114,) * 3
    )
    if bgr:
        boxed = cv2.cvtColor(boxed, cv2.COLOR_RGB2BGR)
    blob = boxed.astype(np.float32).transpose(2, 0, 1)[None] / 255.0
    return blob, scale, left, top


def reference_detect(
    session: Any, image: Image8, score: float = 0.25, iou: float = 0.45
) -> list[tuple[str, float, list[float]]]:
    blob, scale, left, top = reference_input(image)
    out = session.run(None, {"images": blob})[0][0].T  # [A, 4 + C]
    cls_scores = out[:, 4:]
    best, conf = cls_scores.argmax(1), cls_scores.max(1)
    keep = conf >= score
    cx, cy, bw, bh = out[keep, :4].T
    rects = np.stack([cx - bw / 2, cy - bh / 2, bw, bh], 1)
    picked = cv2.dnn.NMSBoxesBatched(
        rects.tolist(), conf[keep].tolist(), best[keep].tolist(), score, iou
    )
    h, w = image.shape[:2]
    found = []
    for i in np.asarray(picked, dtype=int).reshape(-1):
        x, y, rw, rh = rects[i]
        box = [
            (x - left) / scale,
            (y - top) / scale,
            (x + rw - left) / scale,
            (y + rh - top) / scale,
        ]
        box = [min(max(v, 0.0), lim) for v, lim in zip(box, (w, h, w, h), strict=True)]
        found.append((NUDENET_LABELS[best[keep][i]], float(conf[keep][i]), box))
    return sorted(found, key=lambda d: -d[1])


def stage_input(image: Image8, params: dict[str, Any] | None = None, **kw: Any) -> StageInput:
    h, w = image.shape[:2]
    return StageInput(image, kw.pop("original_size", (w, h)), params or {}, {}, **kw)


def output_of(result: object) -> StageOutput:
    assert isinstance(result, StageOutput)
    return result


# -- the network -------------------------------------------------------------------------


def test_native_network_matches_onnxruntime_on_photographs(
    native: YOLOv8, session: Any, photos: dict[str, Image8]
) -> None:
    pixels, _ = letterbox_batch(list(photos.values()))
    batch = to_network_input(pixels, torch.device("cpu"))
    with torch.inference_mode():
        ours = native(batch).numpy()
    theirs = session.run(None, {"images": batch.numpy()})[0]
    assert ours.shape == theirs.shape == (4, 4 + 18, 2100)
    assert np.abs(ours - theirs).max() < 1e-3


def test_every_onnx_parameter_is_loaded_and_a_gap_is_refused(weights_path: Path) -> None:
    weights = read_onnx_weights(weights_path)
    module = YOLOv8(weights.num_classes)
    assert set(module.state_dict()) == set(weights.tensors)
    partial = dict(weights.tensors)
    partial.pop("model.22.dfl.conv.weight")
    with pytest.raises(ValueError, match=r"missing \['model.22.dfl.conv.weight'\]"):
        load_onnx_initializers(YOLOv8(weights.num_classes), partial)
    wrong = dict(weights.tensors)
    wrong["model.0.conv.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="wrong shape"):
        load_onnx_initializers(YOLOv8(weights.num_classes), wrong)


def test_class_names_come_from_the_onnx_metadata(weights_path: Path) -> None:
    weights = read_onnx_weights(weights_path)
    assert labels_from_metadata(weights.metadata, weights.num_classes) == NUDENET_LABELS
    assert labels_from_metadata({}, 3) == ("class_0", "class_1", "class_2")
    assert "AGPL-3.0" in NudeNetDetector.license


def test_network_is_fed_rgb_as_measured_in_the_docs(
    detector: NudeNetDetector, session: Any, photos: dict[str, Image8]
) -> None:
    assert NudeNetDetector.channel_order == "RGB"
    image = photos["astronaut"]
    tensor = to_network_input(letterbox_batch([image])[0], torch.device("cpu"))
    red = cv2.resize(image, (320, 320), interpolation=cv2.INTER_LINEAR)[..., 0]
    assert np.allclose(tensor[0, 0].numpy(), red / 255.0, atol=1e-6)

    scores = detector.predict([DetectRequest(image)])[0].class_scores
    face_male = NUDENET_LABELS.index("FACE_MALE")
    rgb = session.run(None, {"images": reference_input(image)[0]})[0][0, 4:].max(1)
    bgr = session.run(None, {"images": reference_input(image, bgr=True)[0]})[0][0, 4:].max(1)
    assert abs(scores["FACE_MALE"] - rgb[face_male]) < 1e-3
    assert abs(scores["FACE_MALE"] - bgr[face_male]) > 0.1  # 0.17 (RGB) vs 0.49 (BGR)


# -- detections ----------------------------------------------------------------------------


def test_detections_match_the_onnxruntime_reference(
    detector: NudeNetDetector, session: Any, photos: dict[str, Image8]
) -> None:
    names = list(photos)
    results = detector.predict(
        [DetectRequest(photos[n], score_threshold=0.2, iou_threshold=0.45) for n in names]
    )
    total = 0
    for name, result in zip(names, results, strict=True):
        expected = reference_detect(session, photos[name], score=0.2, iou=0.45)
        got = [(d.label, d.score, [d.x1, d.y1, d.x2, d.y2]) for d in result.detections]
        assert [g[0] for g in got] == [e[0] for e in expected], name
        for (_, g_score, g_box), (_, e_score, e_box) in zip(got, expected, strict=True):
            assert abs(g_score - e_score) < 0.01, name
            assert np.abs(np.subtract(g_box, e_box)).max() < 2.0, name
        total += len(got)
    assert total >= 3  # the comparison is not vacuous


def test_faces_are_found_on_the_astronaut_and_the_cameraman(
    detector: NudeNetDetector, photos: dict[str, Image8]
) -> None:
    astronaut, camera = detector.predict(
        [DetectRequest(photos["astronaut"]), DetectRequest(photos["camera"])]
    )
    face = next(d for d in astronaut.detections if d.label == "FACE_FEMALE")
    assert face.score > 0.7
    assert 150 < (face.x1 + face.x2) / 2 < 300 and 60 < (face.y1 + face.y2) / 2 < 200
    assert any(d.label == "FACE_MALE" and d.score > 0.5 for d in camera.detections)
    (mirrored,) = detector.predict([DetectRequest(photos["astronaut"][:, ::-1])])  # a view
    assert mirrored.detections[0].label == "FACE_FEMALE"


def test_boxes_are_reported_in_original_coordinates_when_the_input_was_resized(
    photos: dict[str, Image8],
) -> None:
    full = photos["astronaut"]
    half = np.asarray(cv2.resize(full, (256, 256), interpolation=cv2.INTER_AREA), np.uint8)
    squeezed = np.asarray(cv2.resize(full, (384, 512), interpolation=cv2.INTER_AREA), np.uint8)
    direct, from_half, from_squeezed = detect.run_stage_batch(
        [
            stage_input(full),
            stage_input(half, original_size=(512, 512)),
            stage_input(squeezed, original_size=(512, 512)),
        ]
    )
    want = output_of(direct).output["detections"][0]
    for result in (from_half, from_squeezed):
        out = output_of(result)
        assert out.output["image_size"] == [512, 512]
        got = out.output["detections"][0]
        assert got["label"] == want["label"] == "FACE_FEMALE"
        assert np.abs(np.subtract(got["box"], want["box"])).max() < 8.0
        row = out.detections[0]
        assert [row.x1, row.y1, row.x2, row.y2] == got["box"]

    rows = detect.to_original(
        output_of(from_half).detections, read_size=(512, 512), original_size=(1024, 256)
    )
    box = output_of(from_half).detections[0]
    assert (rows[0].x1, rows[0].y1) == pytest.approx((box.x1 * 2, box.y1 / 2), abs=0.01)


def test_a_batch_of_four_equals_four_singles_in_one_forward_pass(
    photos: dict[str, Image8],
) -> None:
    inputs = [stage_input(image, {"score_threshold": 0.2}) for image in photos.values()]
    singles = [output_of(detect.run_stage_batch([item])[0]) for item in inputs]
    model = detect.detector_model("nudenet-yolov8n", None, None, "cpu")
    module = model.ensure_loaded()
    calls: list[int] = []
    hook = module.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    try:
        batched = [output_of(r) for r in detect.run_stage_batch(inputs)]
    finally:
        hook.remove()
    assert calls == [4]
    for one, many in zip(singles, batched, strict=True):
        assert [d["label"] for d in one.output["detections"]] == [
            d["label"] for d in many.output["detections"]
        ]
        for a, b in zip(one.output["detections"], many.output["detections"], strict=True):
            assert abs(a["score"] - b["score"]) < 1e-3
            assert np.abs(np.subtract(a["box"], b["box"])).max() < 0.05
    assert batched[0].model is not None
    assert batched[0].model["name"] == "nudenet-yolov8n"
    assert batched[0].model["weights_sha256"] == sha256_file(default_weights_path())


def test_thresholds_and_max_detections_come_from_params(photos: dict[str, Image8]) -> None:
    image = photos["astronaut"]
    loose, strict, capped = detect.run_stage_batch(
        [
            stage_input(image, {"score_threshold": 0.01, "iou_threshold": 0.7}),
            stage_input(image, {"score_threshold": 0.9}),
            stage_input(image, {"score_threshold": 0.01, "max_detections": 2}),
        ]
    )
    assert output_of(loose).output["count"] > 2
    assert output_of(strict).output["count"] == 0
    assert output_of(capped).output["count"] == 2
    scores = [d["score"] for d in output_of(loose).output["detections"]]
    assert scores == sorted(scores, reverse=True)


# -- configuration errors ------------------------------------------------------------------


def test_a_pinned_sha256_that_differs_raises_weights_mismatch(photos: dict[str, Image8]) -> None:
    with pytest.raises(WeightsMismatchError, match="pins 0000"):
        detect.run_stage_batch([stage_input(photos["camera"], {"weights_sha256": "0" * 64})])
    actual = sha256_file(default_weights_path())
    (ok,) = detect.run_stage_batch(
        [stage_input(photos["camera"], {"weights_sha256": actual.upper()})]
    )
    assert output_of(ok).model is not None


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"treshold": 0.3}, "unknown parameter.*'treshold'"),
        ({"model": "yolov99"}, "unknown model 'yolov99'"),
        ({"score_threshold": "high"}, "score_threshold must be a number"),
        ({"iou_threshold": 1.5}, "iou_threshold must be a number in"),
        ({"max_detections": 0}, "max_detections must be an integer"),
        ({"max_detections": True}, "max_detections must be an integer"),
        ({"weights_sha256": "abc"}, "64 hex digits"),
        ({"weights_path": ""}, "weights_path must be a non-empty string"),
    ],
)
def test_bad_params_are_permanent_errors_naming_the_key(
    params: dict[str, Any], message: str
) -> None:
    with pytest.raises(PermanentError, match=message):
        DetectParams.from_json(params)


def test_a_missing_weights_file_is_a_permanent_error(
    tmp_path: Path, photos: dict[str, Image8]
) -> None:
    with pytest.raises(PermanentError, match="not found"):
        detect.run_stage_batch(
            [stage_input(photos["camera"], {"weights_path": str(tmp_path / "x.onnx")})]
        )


@pytest.fixture
def nudenet_uninstalled(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "nudenet" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    yield


@pytest.mark.usefixtures("nudenet_uninstalled")
def test_without_the_nudenet_extra_the_error_says_what_to_install(
    photos: dict[str, Image8],
) -> None:
    with pytest.raises(
        PermanentError, match=r"pip install 'imgpipe\[nudenet\]'.*torchvision detector"
    ):
        detect.run_stage_batch([stage_input(photos["camera"])])


def test_importing_the_stage_does_not_import_torch() -> None:
    code = "import sys, workers.stages.detect; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
