"""Measure working-copy encodings: stored bytes, encode and decode time, fidelity.

    PYTHONPATH=. .venv/bin/python -m benchmarks.working_copy [--repeat N] [--no-50mp]

For a 1920x1080 JPEG upload (samples/photo_1080p.jpg) and a 50 MP image (the same
photograph upscaled to 9408x5292 with a little sensor-like noise, uploaded as JPEG q90 and
as PNG), prints a Markdown table: each candidate working copy's bytes, encode time (0 when
the upload itself is reused), decode time at full size and at a longer side of 640 and
320 px through ``workers.pixels.decode_working_copy`` (the path workers use, limits
included), and PSNR against the decoded upload. Times are medians of ``--repeat`` runs
(one run at 50 MP). docs/pixels.md quotes the output.
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import PIL
from numpy.typing import NDArray
from PIL import Image

from imgpipe.decode import DecodeLimits, decode_image
from workers.pixels import decode_working_copy, encode_npy

PHOTO = Path(__file__).resolve().parent.parent / "samples" / "photo_1080p.jpg"
SIZE_50MP = (9408, 5292)
LIMITS = DecodeLimits()
Image8 = NDArray[np.uint8]


@dataclass(frozen=True)
class Row:
    image: str
    copy: str
    size_bytes: int
    encode_ms: float
    decode_ms: dict[int | None, float]
    psnr_db: float


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def psnr(a: Image8, b: Image8) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def pil_bytes(pixels: Image8, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


ENCODINGS: dict[str, Callable[[Image8], bytes]] = {
    "raw .npy (before)": encode_npy,
    "PNG level 1": lambda p: pil_bytes(p, "PNG", compress_level=1),
    "PNG level 6": lambda p: pil_bytes(p, "PNG", compress_level=6),
    "WebP lossless m0": lambda p: pil_bytes(p, "WEBP", lossless=True, method=0, quality=0),
    "JPEG q95 4:2:0": lambda p: pil_bytes(p, "JPEG", quality=95),
    "JPEG q95 4:4:4": lambda p: pil_bytes(p, "JPEG", quality=95, subsampling=0),
}


def measure(
    image: str, copy: str, data: bytes, reference: Image8, encode_ms: float, repeat: int
) -> Row:
    decode_ms: dict[int | None, float] = {}
    for side in (None, 640, 320):
        decode_ms[side] = median_ms(partial(decode_working_copy, data, side, LIMITS), repeat)
    fidelity = psnr(decode_working_copy(data, None, LIMITS), reference)
    return Row(image, copy, len(data), encode_ms, decode_ms, fidelity)


def run_image(name: str, upload: bytes, repeat: int, encodings: list[str]) -> list[Row]:
    pixels = decode_image(upload, LIMITS).pixels
    rows = [measure(name, "the upload itself", upload, pixels, 0.0, repeat)]
    for label in encodings:
        encode = ENCODINGS[label]
        encode_ms = median_ms(partial(encode, pixels), repeat)
        rows.append(measure(name, label, encode(pixels), pixels, encode_ms, repeat))
        print(f"  measured {name} / {label}: {rows[-1]}", flush=True)
    return rows


def fifty_megapixels(photo: Image8, noise_sigma: float) -> Image8:
    big = np.asarray(cv2.resize(photo, SIZE_50MP, interpolation=cv2.INTER_CUBIC), np.uint8)
    if noise_sigma == 0:
        return big
    noise = np.random.default_rng(0).normal(0.0, noise_sigma, big.shape)
    noisy: Image8 = np.clip(big + noise, 0, 255).astype(np.uint8)
    return noisy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-50mp", action="store_true", help="only the 1080p JPEG")
    args = parser.parse_args()
    upload = PHOTO.read_bytes()
    rows = run_image("1080p JPEG upload", upload, args.repeat, list(ENCODINGS))
    if not args.no_50mp:
        photo = decode_image(upload, LIMITS).pixels
        big = fifty_megapixels(photo, 2.0)
        mp = f"{big.shape[1] * big.shape[0] / 1e6:.1f} MP"
        cheap = ["raw .npy (before)", "PNG level 1", "JPEG q95 4:2:0"]
        rows += run_image(f"{mp} JPEG q90 upload", pil_bytes(big, "JPEG", quality=90), 1, cheap)
        # With that noise a 50 MP PNG is ~69 MB, over the 50 MB upload limit: the PNG
        # upload is the smooth upscale (a screenshot-like PNG).
        smooth = pil_bytes(fifty_megapixels(photo, 0.0), "PNG")
        rows += run_image(f"{mp} PNG upload (smooth)", smooth, 1, ["JPEG q95 4:2:0"])
    print(
        f"\n{platform.node()} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} CPUs · Python {platform.python_version()} · "
        f"Pillow {PIL.__version__} · {datetime.date.today().isoformat()}\n"
    )
    print(
        "| image | working copy | stored bytes | encode ms | decode ms full | "
        "decode ms 640 px | decode ms 320 px | PSNR dB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        decode = " | ".join(f"{r.decode_ms[s]:.1f}" for s in (None, 640, 320))
        fidelity = "lossless" if math.isinf(r.psnr_db) else f"{r.psnr_db:.1f}"
        print(
            f"| {r.image} | {r.copy} | {r.size_bytes:,} | {r.encode_ms:.1f} | {decode} | "
            f"{fidelity} |"
        )


if __name__ == "__main__":
    main()
