"""Time the quality and enhance stage functions on samples/photo_1080p.jpg.

    .venv/bin/python benchmarks/quality_enhance.py [--repeat N] [--compare-denoise]

Prints the machine, the date and a Markdown table (median / p90 / min in ms) that
docs/quality-enhance.md quotes. Enhance is timed with its flags forced, so every
operation runs on the same 1920x1080 photograph; ``all ops`` is the worst case. The
baseline it replaces, OpenCV's fastNlMeansDenoisingColored at full resolution, is timed
in the same run. ``--compare-denoise`` also times the denoisers that were considered
and measures how much each one brings the noisy copies back towards their originals
(mean PSNR gain over 4 photographs x 3 noise levels).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from imgpipe.face.bench.machine import cpu_model
from workers.stages.enhance import EnhanceParams, enhance_image
from workers.stages.quality import assess_quality

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
PHOTO = SAMPLES / "photo_1080p.jpg"
Image8 = NDArray[np.uint8]


def load(path: Path) -> Image8:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def timings_ms(fn: Callable[[], object], repeat: int) -> list[float]:
    fn()  # warm up: OpenCV allocates and dispatches lazily on the first call
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000.0)
    return out


def row(label: str, values: list[float]) -> str:
    median, p90, low = np.median(values), np.percentile(values, 90), min(values)
    return f"| {label} | {median:.1f} | {p90:.1f} | {low:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--compare-denoise", action="store_true")
    args = parser.parse_args()

    image = load(PHOTO)
    quality = assess_quality(image)
    every = EnhanceParams(contrast_rms_target=1.0)  # never skip stretch/CLAHE here

    def enhance_with(*flags: str) -> Callable[[], object]:
        forced = dataclasses.replace(quality, flags=flags)
        return lambda: enhance_image(image, forced, every)

    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, OpenCV {cv2.__version__}, "
        f"cv2 threads {cv2.getNumThreads()}, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"image: {PHOTO.name} {image.shape[1]}x{image.shape[0]}, repeat {args.repeat}\n")
    print("| step (1920x1080) | median ms | p90 ms | min ms |")
    print("|---|---|---|---|")
    print(row("assess_quality", timings_ms(lambda: assess_quality(image), args.repeat)))
    for label, flags in (
        ("enhance: denoise (noisy)", ("noisy",)),
        ("enhance: gamma (dark)", ("dark",)),
        ("enhance: stretch + clahe (low_contrast)", ("low_contrast",)),
        ("enhance: unsharp (blurry)", ("blurry",)),
        ("enhance: all ops", ("blurry", "dark", "low_contrast", "noisy")),
    ):
        print(row(label, timings_ms(enhance_with(*flags), args.repeat)))
    nlm = timings_ms(lambda: cv2.fastNlMeansDenoisingColored(image, None, 10, 10, 7, 21), 2)
    print(row("baseline: fastNlMeansDenoisingColored, full res", nlm))
    if args.compare_denoise:
        compare_denoise(image)


def _luma_chroma(image: Image8, space: tuple[int, int], luma: Callable[[Image8], Image8]) -> Image8:
    channels = list(cv2.split(cv2.cvtColor(image, space[0])))
    channels[0] = luma(channels[0])
    channels[1:] = [cv2.medianBlur(c, 5) for c in channels[1:]]
    return np.asarray(cv2.cvtColor(cv2.merge(channels), space[1]), dtype=np.uint8)


def compare_denoise(big: Image8) -> None:
    from make_degraded import PHOTOS, add_noise  # samples/ is on sys.path when run as a script

    ycc = (cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB)
    lab = (cv2.COLOR_RGB2LAB, cv2.COLOR_LAB2RGB)

    def bilateral(space: tuple[int, int], d: int, k: float) -> Callable[[Image8, float], Image8]:
        return lambda im, s: _luma_chroma(
            im, space, lambda y: cv2.bilateralFilter(y, d, k * s, d / 2)
        )

    candidates: dict[str, Callable[[Image8, float], Image8]] = {
        "bilateral d5 on Y (YCrCb), range 2 sigma [chosen]": bilateral(ycc, 5, 2.0),
        "bilateral d7 on Y (YCrCb), range 2 sigma": bilateral(ycc, 7, 2.0),
        "bilateral d7 on L (LAB), range 2.5 sigma": bilateral(lab, 7, 2.5),
        "bilateral d7 on RGB, range 3.75 sigma": lambda im, s: cv2.bilateralFilter(
            im, 7, 3.75 * s, 3.5
        ),
        "median 3x3 on RGB": lambda im, s: cv2.medianBlur(im, 3),
        "Gaussian sigma 1 on RGB": lambda im, s: cv2.GaussianBlur(im, (0, 0), 1.0),
        "fastNlMeans on Y, full res, h 1.2 sigma": lambda im, s: _luma_chroma(
            im, ycc, lambda y: cv2.fastNlMeansDenoising(y, None, 1.2 * s, 5, 11)
        ),
    }
    cases = []
    for name in PHOTOS:
        clean = load(SAMPLES / f"{name}.jpg")
        cases.append((clean, load(SAMPLES / "degraded" / f"{name}_noise.jpg")))
        cases.extend((clean, add_noise(clean, sigma)) for sigma in (8.0, 25.0))
    sigmas = [assess_quality(noisy).metrics["noise_sigma"] for _, noisy in cases]
    big_noisy = add_noise(big, 15.0)
    big_sigma = assess_quality(big_noisy).metrics["noise_sigma"]
    print("\n| denoiser | 1080p median ms | mean PSNR gain dB | worst PSNR gain dB |")
    print("|---|---|---|---|")
    for label, fn in candidates.items():
        spent = timings_ms(lambda fn=fn: fn(big_noisy, big_sigma), 3 if "Nl" in label else 10)
        gains = [
            cv2.PSNR(clean, fn(noisy, s)) - cv2.PSNR(clean, noisy)
            for (clean, noisy), s in zip(cases, sigmas, strict=True)
        ]
        print(f"| {label} | {np.median(spent):.1f} | {np.mean(gains):.2f} | {min(gains):.2f} |")


if __name__ == "__main__":
    main()
