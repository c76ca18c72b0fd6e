"""The ``imgpipe anomaly fit|eval`` commands (imported lazily by imgpipe/face/cli_ops.py:
they load torch through workers/anomaly)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from numpy.typing import NDArray
from PIL import Image, ImageOps
from rich.console import Console
from rich.markup import escape
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
from imgpipe.face.cli_console import fail
from imgpipe.settings import Settings
from workers.anomaly.fit import fit_profile
from workers.anomaly.patchcore import FeatureConfig
from workers.anomaly.profile import evaluate_profile

__all__ = ["eval_command", "fit_command", "load_image_files", "load_images", "load_masks"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
PROFILE_LICENSE = "derived from the operator's own images"
_MASK_RAW_MODES = frozenset({"1", "L", "P", "I", "F", "RGB"})


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


def load_image_files(
    paths: list[Path], console: Console, bar: Progress | None = None
) -> list[tuple[Path, NDArray[np.uint8]]]:
    """(file, pixels) of each image decoded with the same limits as submissions, in
    ``image_files`` order; unreadable files are reported on ``console`` and skipped."""
    limits = DecodeLimits.from_settings(Settings())
    images = []
    files = image_files(paths)
    task = bar.add_task(f"decoding {len(files)} files", total=len(files)) if bar else None
    for path in files:
        try:
            images.append((path, decode_image(path.read_bytes(), limits).pixels))
        except ImageRejectedError as exc:
            console.print(f"[yellow]skipped {escape(str(path))}: {escape(str(exc))}[/]")
        if bar is not None and task is not None:
            bar.advance(task)
    return images


def load_images(
    paths: list[Path], console: Console, bar: Progress | None = None
) -> list[NDArray[np.uint8]]:
    """The pixels of ``load_image_files``."""
    return [pixels for _, pixels in load_image_files(paths, console, bar)]


def read_mask(path: Path, size: tuple[int, int]) -> NDArray[np.bool_]:
    """The defect pixels of mask file ``path`` at ``size`` (width, height): nonzero in any
    colour channel (alpha ignored; palette images by index), turned upright by the EXIF
    orientation like the images, resized with nearest neighbour when its size differs."""
    try:
        with Image.open(path) as opened:
            im = ImageOps.exif_transpose(opened)
            if im.mode in ("LA", "PA"):
                im = im.getchannel(0)
            elif im.mode not in _MASK_RAW_MODES and not im.mode.startswith("I;16"):
                im = im.convert("RGB")  # RGBA, RGBX: the fourth channel is dropped
            if im.size != size:
                im = im.resize(size, Image.Resampling.NEAREST)
            pixels = np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise fail(f"cannot read defect mask {path} ({exc}); replace it with a PNG") from None
    defect = pixels.any(axis=2) if pixels.ndim == 3 else pixels != 0
    return np.asarray(defect, bool)


def load_masks(
    mask_dir: Path, bad: Path, kept: list[tuple[Path, NDArray[np.uint8]]]
) -> list[NDArray[np.bool_]]:
    """One defect mask per image of ``kept`` (the bad images that decoded), matched by
    file stem: ``bad/abc.jpg`` <-> ``mask_dir/abc.png`` (any image suffix). A mask whose
    bad image was skipped as unreadable is ignored; one with no bad image at all, or a
    bad image without a mask, fails the command naming the file."""
    if not mask_dir.is_dir():
        raise fail(f"--masks {mask_dir} is not a directory; give the directory of defect masks")
    by_stem: dict[str, Path] = {}
    for path in image_files([mask_dir]):
        if path.stem in by_stem:
            raise fail(f"defect masks {by_stem[path.stem]} and {path} are for one image; keep one")
        by_stem[path.stem] = path
    bad_stems = {path.stem for path in image_files([bad])}
    orphans = [path for stem, path in by_stem.items() if stem not in bad_stems]
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise fail(
            f"defect mask {orphans[0]} has no bad image named {orphans[0].stem}.* in {bad}"
            f"{more}; remove the mask or add its image"
        )
    unmasked = [path for path, _ in kept if path.stem not in by_stem]
    if unmasked:
        more = f" (and {len(unmasked) - 1} more)" if len(unmasked) > 1 else ""
        raise fail(
            f"bad image {unmasked[0]} has no defect mask {mask_dir / unmasked[0].stem}.png "
            f"(any image suffix){more}; add one (nonzero pixels mark the defect) or move the "
            f"image out of {bad}"
        )
    return [
        read_mask(by_stem[path.stem], (pixels.shape[1], pixels.shape[0])) for path, pixels in kept
    ]


def fit_command(
    profile: Path,
    inputs: list[Path],
    name: str,
    device: str,
    console: Console,
    overrides: str | None = None,
) -> None:
    try:
        config = FeatureConfig.from_overrides(overrides) if overrides else FeatureConfig()
    except ValueError as exc:
        raise fail(f"--config: {exc}") from exc
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
            images, profile, name=name, device=device, config=config,
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


def eval_command(
    profile: Path,
    good: Path,
    bad: Path,
    device: str,
    console: Console,
    *,
    masks: Path | None = None,
    json_out: bool = False,
) -> None:
    """Print the evaluation as a table, or with ``json_out`` as one JSON object (stdout
    then holds nothing else: progress and skipped files go to ``console``, stderr)."""
    with progress_bar(console) as bar:
        good_images = load_images([good], console, bar)
        bad_files = load_image_files([bad], console, bar)
        bad_masks = load_masks(masks, bad, bad_files) if masks is not None else None
        bad_images = [pixels for _, pixels in bad_files]
        task = bar.add_task("scoring", total=len(good_images) + len(bad_images))
        report = evaluate_profile(
            profile, good_images, bad_images, device=device,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            bad_masks=bad_masks,
        )  # fmt: skip
    if json_out:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    table = Table("AUROC", "pixel AUROC", "threshold", "TP", "FP", "TN", "FN", "ms/image")
    table.add_row(
        f"{report.auroc:.3f}",
        "-" if report.pixel_auroc is None else f"{report.pixel_auroc:.3f}",
        f"{report.threshold:.3f}",
        str(report.tp),
        str(report.fp),
        str(report.tn),
        str(report.fn),
        f"{report.score_ms_per_image:.1f}",
    )
    Console().print(table)
