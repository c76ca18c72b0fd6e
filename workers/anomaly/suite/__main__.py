"""Run the anomaly benchmark: fit a profile per family, score its test crops, print a table.

    python -m workers.anomaly.suite                       # all families, seed 0
    python -m workers.anomaly.suite --families woven,pile --seeds 0,1 --json out.json
    python -m workers.anomaly.suite --families terrazzo --export /tmp/suite   # files only

Per family: image AUROC (each defective crop against the good ones), pixel AUROC (the
heat map, enlarged to the crop, against the defect masks over all test crops), the
confusion at the profile's calibrated threshold, and timings. Needs scikit-image (a
test extra) for the photographed families. ``--export DIR`` writes each family and seed's
crops and masks as PNG files instead (``DIR/<family>-<seed>/``, see :mod:`.export`) and
prints the ``imgpipe anomaly fit`` / ``eval`` commands that score them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.anomaly.fit import DEFAULT_CORESET_FRACTION, fit_profile
from workers.anomaly.metrics import auroc
from workers.anomaly.patchcore import FeatureConfig
from workers.anomaly.profile import evaluate_profile
from workers.anomaly.suite.camera import Nuisance
from workers.anomaly.suite.dataset import FAMILIES, FamilySplit, family_split
from workers.anomaly.suite.export import eval_commands, export_split


def evaluate(split: FamilySplit, path: Path, device: str) -> dict[str, Any]:
    report = evaluate_profile(path, split.good, split.bad, device=device, bad_masks=split.masks)
    kinds = np.array(split.kinds)
    bad = np.array(report.bad_scores)
    return {
        "auroc": round(report.auroc, 3),
        "pixel_auroc": round(report.pixel_auroc or 0.0, 3),
        "threshold": round(report.threshold, 3),
        "tp": report.tp,
        "fp": report.fp,
        "tn": report.tn,
        "fn": report.fn,
        "per_kind": {
            k: round(auroc(report.good_scores, bad[kinds == k].tolist()), 3)
            for k in dict.fromkeys(split.kinds)
        },
        "score_ms": round(report.score_ms_per_image, 1),
    }


def _cached_split(family: str, seed: int, args: argparse.Namespace) -> FamilySplit:
    """The family's split, read from ``args.cache`` when a run with equal settings saved it."""
    nuisance = Nuisance(max_rotation_deg=args.rotation)
    if args.cache is None:
        return family_split(family, seed=seed, n_fit=args.n_fit, nuisance=nuisance)
    path = args.cache / f"{family}-{seed}-{args.n_fit}-{args.rotation:g}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            return FamilySplit(
                family, list(data["fit"]), list(data["good"]), list(data["bad"]),
                list(data["masks"]), data["kinds"].tolist(), data["areas"].tolist(),
            )  # fmt: skip
    split = family_split(family, seed=seed, n_fit=args.n_fit, nuisance=nuisance)
    args.cache.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, list[Any]] = {
        "fit": split.fit,
        "good": split.good,
        "bad": split.bad,
        "masks": split.masks,
    }
    stacked: dict[str, Any] = {k: np.stack(v) for k, v in arrays.items()}
    np.savez(path, kinds=np.array(split.kinds), areas=np.array(split.areas), **stacked)
    return split


def run_family(
    family: str, seed: int, config: FeatureConfig, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    split = _cached_split(family, seed, args)
    path = tmp / f"{family}-{seed}.npz"
    info = fit_profile(
        split.fit,
        path,
        name=family,
        device=args.device,
        seed=seed,
        config=config,
        coreset_fraction=args.coreset,
    )
    row = {"family": family, "seed": seed, **evaluate(split, path, args.device)}
    row["fit_s"] = round(info.fit_s, 1)
    row["bank"] = info.memory_bank_size
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| family | seed | AUROC | pixel AUROC | threshold | TP | FP | TN | FN | fit s | ms/crop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['seed']} | {r['auroc']:.3f} | {r['pixel_auroc']:.3f} | "
            f"{r['threshold']:.2f} | {r['tp']} | {r['fp']} | {r['tn']} | {r['fn']} | "
            f"{r['fit_s']:.1f} | {r['score_ms']:.1f} |"
        )
    worst = min(r["auroc"] for r in rows)
    mean = statistics.mean(r["auroc"] for r in rows)
    lines.append(f"\nworst image AUROC {worst:.3f}, mean {mean:.3f}")
    return "\n".join(lines)


def _export(args: argparse.Namespace) -> None:
    for family in args.families.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            out = args.export / f"{family}-{seed}"
            export_split(_cached_split(family, seed, args), out)
            print("\n".join(eval_commands(out, family)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-fit", type=int, default=50)
    parser.add_argument("--rotation", type=float, default=Nuisance().max_rotation_deg,
                        help="largest shot rotation, degrees")  # fmt: skip
    parser.add_argument("--coreset", type=float, default=DEFAULT_CORESET_FRACTION)
    parser.add_argument("--config", default="{}", help="FeatureConfig overrides as JSON")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--cache", type=Path, help="keep generated crops here between runs")
    parser.add_argument("--export", type=Path, help="write the crops as PNG files here, no scoring")
    args = parser.parse_args()
    if args.export is not None:
        _export(args)
        return
    try:
        config = FeatureConfig.from_overrides(args.config)
    except ValueError as exc:
        parser.error(f"--config: {exc}")
    header = {"config": asdict(config), "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine()}  # fmt: skip
    print(json.dumps(header), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                row = run_family(family, seed, config, args, Path(tmp))
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps({**header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
