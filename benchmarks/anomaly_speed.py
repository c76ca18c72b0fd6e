"""Anomaly stage speed: fitting 50 crops, and scoring throughput per batch size.

    PYTHONPATH=. .venv/bin/python -m benchmarks.anomaly_speed                 # CPU
    PYTHONPATH=. .venv/bin/python -m benchmarks.anomaly_speed --device cuda:0 \\
        --batch-sizes 1,64,256,1024 --json out.json

Fits a profile with the default recipe on ``--n-fit`` 256 px crops of one suite family
(``--family``, default ``woven``), timing the fit, then scores 256 px crops through
``score_images`` (resize, normalisation, backbone, patch features, nearest-neighbour
search and score fusion, all on ``--device``; the device is synchronised) at each batch
size: median of ``--repeat`` timed calls after one warm-up. Also times the
nearest-neighbour search alone. Prints a Markdown table; ``--json`` adds machine, date
and command.

``--vs-config JSON`` fits a second profile with those overrides (the baseline) and times
its scoring in the same loop, call for call alternating with the first, so a machine whose
speed drifts slows both alike; the table then adds the baseline's ms/crop and the median
of the paired ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from workers.anomaly.fit import fit_profile
from workers.anomaly.patchcore import FeatureConfig, nearest_distances
from workers.anomaly.profile import load_profile
from workers.anomaly.scoring import backbone_for, score_images
from workers.anomaly.suite.dataset import family_split


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--family", default="woven")
    parser.add_argument("--n-fit", type=int, default=50)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--config", default="{}", help="FeatureConfig overrides as JSON")
    parser.add_argument("--vs-config", help="baseline FeatureConfig overrides, timed alongside")
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    try:
        config = FeatureConfig.from_overrides(args.config)
        baseline = None if args.vs_config is None else FeatureConfig.from_overrides(args.vs_config)
    except ValueError as exc:
        parser.error(f"--config / --vs-config: {exc}")
    split = family_split(args.family, n_fit=args.n_fit, n_good=max(sizes), n_bad=0)
    crops = split.good
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speed.npz"
        backbone_for(args.device)  # load the weights outside the fit timing
        started = time.perf_counter()
        info = fit_profile(split.fit, path, name="speed", device=args.device, config=config)
        fit_s = time.perf_counter() - started
        profile = load_profile(path)
        profiles = [profile]
        base_fit_s = None
        if baseline is not None:
            base_path = Path(tmp) / "baseline.npz"
            started = time.perf_counter()
            fit_profile(split.fit, base_path, name="base", device=args.device, config=baseline)
            base_fit_s = round(time.perf_counter() - started, 2)
            profiles.append(load_profile(base_path))
    backbone = backbone_for(args.device)
    for size in sizes:
        batch = crops[:size]
        times: list[list[float]] = [[] for _ in profiles]
        for p in profiles:
            score_images(p, batch, backbone)
        for _ in range(args.repeat):
            for p, timed in zip(profiles, times, strict=True):
                _sync(args.device)
                t0 = time.perf_counter()
                score_images(p, batch, backbone)
                _sync(args.device)
                timed.append(time.perf_counter() - t0)
        ms = statistics.median(times[0]) * 1000
        row: dict[str, Any] = {
            "batch": size,
            "ms_per_batch": round(ms, 2),
            "ms_per_crop": round(ms / size, 2),
            "crops_per_s": round(size * 1000 / ms, 1),
        }
        if baseline is not None:
            row["baseline_ms_per_crop"] = round(statistics.median(times[1]) * 1000 / size, 2)
            ratios = [a / b for a, b in zip(times[0], times[1], strict=True)]
            row["ratio"] = round(statistics.median(ratios), 3)
        rows.append(row)
    bank, search = profile.bank_on(backbone.device)
    grid = profile.config.grid_size
    queries = bank[torch.randint(len(bank), (grid * grid,))] + 0.01
    nn = []
    for _ in range(args.repeat):
        _sync(args.device)
        t0 = time.perf_counter()
        nearest_distances(queries, bank, search, profile.config.knn)
        _sync(args.device)
        nn.append(time.perf_counter() - t0)
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else args.device
    result = {
        "machine": platform.processor() or platform.machine(),
        "device": device_name,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": json.loads(args.config),
        "vs_config": None if args.vs_config is None else json.loads(args.vs_config),
        "fit_images": args.n_fit,
        "fit_s": round(fit_s, 2),
        "baseline_fit_s": base_fit_s,
        "memory_bank": info.memory_bank_size,
        "nn_ms_per_crop": round(statistics.median(nn) * 1000, 2),
        "rows": rows,
    }
    print(f"fit {args.n_fit} crops: {fit_s:.1f} s (bank {info.memory_bank_size} patches); "
          f"nearest-neighbour search {result['nn_ms_per_crop']} ms/crop"
          + (f"; baseline fit {base_fit_s} s" if base_fit_s is not None else ""))  # fmt: skip
    extra = " baseline ms/crop | ratio |" if baseline is not None else ""
    print(f"| batch | ms/batch | ms/crop | crops/s |{extra}")
    print("|---|---|---|---|" + ("---|---|" if baseline is not None else ""))
    for r in rows:
        line = f"| {r['batch']} | {r['ms_per_batch']} | {r['ms_per_crop']} | {r['crops_per_s']} |"
        if baseline is not None:
            line += f" {r['baseline_ms_per_crop']} | {r['ratio']} |"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
