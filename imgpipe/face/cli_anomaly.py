"""The ``imgpipe anomaly fit|eval`` commands (imported lazily by imgpipe/face/cli_ops.py:
they load torch through workers/anomaly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from db.engine import session_scope
from db.migrate import upgrade
from db.repo import record_model
from imgpipe.decode import DecodeLimits, decode_image
from imgpipe.errors import ImageRejectedError, PermanentError
from imgpipe.settings import Settings
from workers.anomaly.fit import fit_profile
from workers.anomaly.profile import evaluate_profile

__all__ = ["eval_command", "fit_command", "load_images"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
PROFILE_LICENSE = "derived from the operator's own images"


def image_files(paths: list[Path]) -> list[Path]:
    """Files given directly, plus the images inside given directories (sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise PermanentError(f"{path} is neither an image file nor a directory")
    return files


def progress_bar(console: Console) -> Progress:
    """A bar with images done, elapsed time and the estimated time left."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
    )  # fmt: skip


def load_images(
    paths: list[Path], console: Console, bar: Progress | None = None
) -> list[NDArray[np.uint8]]:
    """Decode with the same limits as submissions; unreadable files are reported and skipped."""
    limits = DecodeLimits.from_settings(Settings())
    images = []
    files = image_files(paths)
    task = bar.add_task(f"decoding {len(files)} files", total=len(files)) if bar else None
    for path in files:
        try:
            images.append(decode_image(path.read_bytes(), limits).pixels)
        except ImageRejectedError as exc:
            console.print(f"[yellow]skipped {path}: {exc}[/]")
        if bar is not None and task is not None:
            bar.advance(task)
    return images


def fit_command(
    profile: Path, inputs: list[Path], name: str, device: str, console: Console
) -> None:
    with progress_bar(console) as bar:
        images = load_images(inputs, console, bar)
        if len(images) < 4:
            raise PermanentError(
                f"fitting needs at least 4 good images (got {len(images)}); pass more files or "
                "a directory of them"
            )
        profile.parent.mkdir(parents=True, exist_ok=True)
        task = bar.add_task(f"fitting {name!r}", total=len(images))
        info = fit_profile(
            images, profile, name=name, device=device,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    settings = Settings()
    upgrade(settings.effective_database_url)
    with session_scope(settings.effective_database_url) as session:
        record_model(
            session,
            name=f"anomaly-profile:{info.name}",
            version=info.version,
            weights_sha256=info.sha256,
            source=str(profile.resolve()),
            license=PROFILE_LICENSE,
        )
    table = Table("profile", "version", "sha256", "images (bank/holdout)", "threshold", "fit s")
    table.add_row(
        str(profile),
        info.version,
        info.sha256[:16],
        f"{info.bank_images}/{info.holdout_images}",
        f"{info.threshold:.3f}",
        f"{info.fit_s:.1f}",
    )
    Console().print(table)
    console.print(f"use it with IMGPIPE_ANOMALY_PROFILE={profile.resolve()}")


def eval_command(profile: Path, good: Path, bad: Path, device: str, console: Console) -> None:
    with progress_bar(console) as bar:
        good_images = load_images([good], console, bar)
        bad_images = load_images([bad], console, bar)
        task = bar.add_task("scoring", total=len(good_images) + len(bad_images))
        report = evaluate_profile(
            profile, good_images, bad_images, device=device,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    table = Table("AUROC", "threshold", "TP", "FP", "TN", "FN", "ms/image")
    table.add_row(
        f"{report.auroc:.3f}",
        f"{report.threshold:.3f}",
        str(report.tp),
        str(report.fp),
        str(report.tn),
        str(report.fn),
        f"{report.score_ms_per_image:.1f}",
    )
    Console().print(table)
