"""Rebuild every file under samples/ from the photographs shipped in scikit-image.

    .venv/bin/python samples/make_degraded.py

1. Writes the clean photographs (``astronaut``, ``chelsea``, ``coffee``, ``rocket``) as
   JPEG quality 90, and ``photo_1080p.jpg``: ``rocket`` resized (Lanczos) to 1920 px wide
   and centre-cropped to 1920x1080, for benchmarks.
2. Reads those JPEGs back (exactly what the tests load) and writes one degraded copy per
   photograph and degradation into ``degraded/``: ``<name>_blur.jpg``, ``<name>_dark.jpg``,
   ``<name>_noise.jpg``, ``<name>_lowcontrast.jpg``.

Everything is deterministic (fixed seeds, fixed JPEG settings). The degradation
functions are imported by the unit tests, so the tests degrade photographs exactly the
way these files were made. Needs numpy, OpenCV, Pillow and scikit-image (the ``test``
extra); sources and licenses are in LICENSE.md.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

SAMPLES_DIR = Path(__file__).resolve().parent
DEGRADED_DIR = SAMPLES_DIR / "degraded"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
BENCH_PHOTO = "rocket"
BENCH_SIZE = (1920, 1080)
JPEG_QUALITY = 90
NOISE_SEED = 20240601

# One level per degradation for the files in degraded/ (the tests sweep more levels).
BLUR_SIGMA_PX = 2.5
DARKEN_FACTOR = 0.3
NOISE_SIGMA = 15.0
CONTRAST_FACTOR = 0.25


def blur(image: NDArray[np.uint8], sigma_px: float) -> NDArray[np.uint8]:
    """Gaussian blur (out of focus), ``sigma_px`` in pixels."""
    return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma_px), dtype=np.uint8)


def darken(image: NDArray[np.uint8], factor: float) -> NDArray[np.uint8]:
    """Under-exposure: every sRGB value multiplied by ``factor`` (< 1)."""
    return np.clip(np.rint(image.astype(np.float32) * factor), 0, 255).astype(np.uint8)


def add_noise(image: NDArray[np.uint8], sigma: float, seed: int = NOISE_SEED) -> NDArray[np.uint8]:
    """Additive white Gaussian noise, independent per channel, ``sigma`` in grey levels."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image.astype(np.float32) + noise), 0, 255).astype(np.uint8)


def reduce_contrast(image: NDArray[np.uint8], factor: float) -> NDArray[np.uint8]:
    """Haze/flat light: values pulled towards the image mean, spread times ``factor``."""
    pixels = image.astype(np.float32)
    mean = float(pixels.mean())
    return np.clip(np.rint(mean + (pixels - mean) * factor), 0, 255).astype(np.uint8)


DEGRADATIONS = {
    "blur": lambda img: blur(img, BLUR_SIGMA_PX),
    "dark": lambda img: darken(img, DARKEN_FACTOR),
    "noise": lambda img: add_noise(img, NOISE_SIGMA),
    "lowcontrast": lambda img: reduce_contrast(img, CONTRAST_FACTOR),
}


def load_rgb(path: Path) -> NDArray[np.uint8]:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def save_jpeg(image: NDArray[np.uint8], path: Path) -> None:
    Image.fromarray(image, mode="RGB").save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)


def export_photographs() -> None:
    from skimage import data

    for name in PHOTOS:
        save_jpeg(
            np.ascontiguousarray(getattr(data, name)(), dtype=np.uint8), SAMPLES_DIR / f"{name}.jpg"
        )

    bench = Image.fromarray(np.ascontiguousarray(getattr(data, BENCH_PHOTO)(), dtype=np.uint8))
    width, height = BENCH_SIZE
    scaled_h = round(bench.height * width / bench.width)
    bench = bench.resize((width, scaled_h), Image.Resampling.LANCZOS)
    top = (scaled_h - height) // 2
    bench = bench.crop((0, top, width, top + height))
    save_jpeg(np.asarray(bench, dtype=np.uint8), SAMPLES_DIR / "photo_1080p.jpg")


def write_degraded() -> None:
    DEGRADED_DIR.mkdir(exist_ok=True)
    for name in PHOTOS:
        clean = load_rgb(SAMPLES_DIR / f"{name}.jpg")
        for kind, degrade in DEGRADATIONS.items():
            save_jpeg(degrade(clean), DEGRADED_DIR / f"{name}_{kind}.jpg")


def main() -> None:
    export_photographs()
    write_degraded()


if __name__ == "__main__":
    main()
