"""Anomaly benchmark: fit and evaluate a profile per texture, time scoring.

Run from the repository root (needs scikit-image, a test extra, for the textures)::

    python -m workers.anomaly.bench --textures brick,grass,gravel --seeds 0,1,2
    python -m workers.anomaly.bench --baseline   # plain PatchCore, for comparison

Crops, defects and the fit/eval split are those of :mod:`workers.anomaly.synthetic`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.anomaly.fit import fit_profile
from workers.anomaly.metrics import auroc
from workers.anomaly.patchcore import FeatureConfig, nearest_distances
from workers.anomaly.profile import evaluate_profile, load_profile
from workers.anomaly.scoring import backbone_for, score_images
from workers.anomaly.synthetic import DEFECT_KINDS, texture_split


def _time_scoring(profile_path: Path, images: list[Any], device: str, batch: int) -> float:
    """Median ms per image over repeated batches (after one warm-up batch)."""
    profile = load_profile(profile_path)
    backbone = backbone_for(device)
    chunk = images[:batch]
    score_images(profile, chunk, backbone)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        score_images(profile, chunk, backbone)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000 / len(chunk))
    return statistics.median(times)


def _time_nn(profile_path: Path, device: str) -> float:
    """Median ms of the nearest-neighbour search alone for one image's patches."""
    profile = load_profile(profile_path)
    bank, search = profile.bank_on(torch.device(device))
    grid = profile.config.grid_size
    queries = bank[torch.randint(len(bank), (grid * grid,), generator=torch.Generator())]
    queries = queries + 0.01 * torch.randn_like(queries)
    times = []
    for _ in range(7):
        started = time.perf_counter()
        nearest_distances(queries, bank, search)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run(
    textures: list[str], seeds: list[int], device: str, n_fit: int, config: FeatureConfig
) -> dict[str, Any]:
    from skimage import data

    results: dict[str, Any] = {"machine": platform.processor() or platform.machine()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for texture in textures:
            for seed in seeds:
                split = texture_split(getattr(data, texture)(), n_fit=n_fit, seed=seed)
                path = Path(tmp) / f"{texture}-{seed}.npz"
                info = fit_profile(
                    split.fit,
                    path,
                    name=texture,
                    device=device,
                    seed=seed,
                    holdout_images=split.holdout,
                    config=config,
                )
                report = evaluate_profile(path, split.good, split.bad, device=device)
                kinds = np.array(split.bad_kinds)
                bad = np.array(report.bad_scores)
                row: dict[str, Any] = {
                    "texture": texture,
                    "seed": seed,
                    "auroc": round(report.auroc, 3),
                    **{
                        k: round(auroc(report.good_scores, bad[kinds == k].tolist()), 3)
                        for k in DEFECT_KINDS
                    },
                    "threshold": round(report.threshold, 2),
                    "tp": report.tp,
                    "fp": report.fp,
                    "tn": report.tn,
                    "fn": report.fn,
                    "fit_s": round(info.fit_s, 1),
                    "bank": info.memory_bank_size,
                    "ms_b1": round(_time_scoring(path, split.good, device, 1), 1),
                    "ms_b8": round(_time_scoring(path, split.good, device, 8), 1),
                    "nn_ms": round(_time_nn(path, device), 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    results["rows"] = rows
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--textures", default="brick,grass,gravel")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-fit", type=int, default=32)
    default = FeatureConfig()
    parser.add_argument("--blocks", default=",".join(map(str, default.blocks)))
    parser.add_argument("--scales", default=",".join(map(str, default.score_scales)))
    parser.add_argument("--no-standardize", action="store_true")
    parser.add_argument("--projection-dim", type=int, default=default.projection_dim)
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="plain PatchCore: blocks 2,4, no standardisation, max patch distance only",
    )
    args = parser.parse_args()
    config = FeatureConfig(
        blocks=tuple(int(b) for b in args.blocks.split(",")),
        standardize=not args.no_standardize,
        projection_dim=args.projection_dim,
        score_scales=tuple(int(k) for k in args.scales.split(",")),
    )
    if args.baseline:
        config = FeatureConfig(blocks=(2, 4), standardize=False, score_scales=(1,))
    print(json.dumps({"config": asdict(config), "threads": torch.get_num_threads()}))
    run(
        args.textures.split(","),
        [int(s) for s in args.seeds.split(",")],
        args.device,
        args.n_fit,
        config,
    )


if __name__ == "__main__":
    main()
