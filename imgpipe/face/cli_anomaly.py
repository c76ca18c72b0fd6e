"""The ``imgpipe anomaly fit|eval`` commands (imported lazily by imgpipe/face/cli_ops.py:
they load torch through workers/anomaly)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from workers.anomaly.fit import DEFAULT_CORESET_FRACTION, fit_profile
from workers.anomaly.metrics import auroc
from workers.anomaly.patchcore import FeatureConfig
from workers.anomaly.profile import EvalReport, evaluate_profile
from workers.models.registry import configure_models_from

__all__ = ["eval_command", "fit_command", "load_image_files", "load_images", "load_masks"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
PROFILE_LICENSE = "derived from the operator's own images"
MASK_ENDING = "_mask"
"""MVTec AD names the mask of ``000.png`` ``000_mask.png``."""
_MASK_RAW_MODES = frozenset({"1", "L", "P", "I", "F", "RGB"})


def image_files(paths: list[Path], exclude: Sequence[Path] = ()) -> list[Path]:
    """Files given directly, plus the images anywhere under given directories (sorted by
    path; hidden files and folders, and folders in ``exclude``, are left out), so an
    MVTec-style tree (``test/scratch/000.png``) can be passed as its top folder."""
    skipped = {path.resolve() for path in exclude}
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(_images_under(path, skipped))
        elif path.is_file():
            files.append(path)
        else:
            raise PermanentError(f"{path} is neither an image file nor a directory")
    return files


def _images_under(folder: Path, skipped: set[Path]) -> list[Path]:
    found: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if path.resolve() not in skipped:
                found.extend(_images_under(path, skipped))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
    return found


def image_key(path: Path, root: Path) -> str:
    """How a bad image and its mask are matched: the path below its folder without the
    suffix (``bad/scratch/000.png`` -> ``scratch/000``)."""
    return path.relative_to(root).with_suffix("").as_posix()


def progress_bar(console: Console) -> Progress:
    """A bar with images done, elapsed time and the estimated time left."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
    )  # fmt: skip


def load_image_files(
    paths: list[Path],
    console: Console,
    bar: Progress | None = None,
    exclude: Sequence[Path] = (),
) -> list[tuple[Path, NDArray[np.uint8]]]:
    """(file, pixels) of each image decoded with the same limits as submissions, in
    ``image_files`` order; unreadable files are reported on ``console`` and skipped."""
    limits = DecodeLimits.from_settings(Settings())
    images = []
    files = image_files(paths, exclude)
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
    path below its folder without the suffix (:func:`image_key`): ``bad/abc.jpg`` <->
    ``mask_dir/abc.png``, ``bad/scratch/000.png`` <-> ``mask_dir/scratch/000.png``; a mask
    may also carry MVTec's ``_mask`` ending (``mask_dir/scratch/000_mask.png``). A mask
    whose bad image was skipped as unreadable is ignored; one with no bad image at all, or
    a bad image without a mask, fails the command naming the file."""
    if not mask_dir.is_dir():
        raise fail(f"--masks {mask_dir} is not a directory; give the directory of defect masks")
    by_key: dict[str, Path] = {}
    for path in image_files([mask_dir]):
        key = image_key(path, mask_dir)
        if key in by_key:
            raise fail(f"defect masks {by_key[key]} and {path} are for one image; keep one")
        by_key[key] = path
    bad_keys = {image_key(path, bad) for path in image_files([bad], [mask_dir])}
    chosen = {key: _mask_for(key, by_key) for key in bad_keys}
    used = {path for path in chosen.values() if path is not None}
    orphans = [path for path in by_key.values() if path not in used]
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        wanted = image_key(orphans[0], mask_dir).removesuffix(MASK_ENDING)
        raise fail(
            f"defect mask {orphans[0]} has no bad image named {bad / wanted}.*{more}; "
            f"remove the mask or add its image"
        )
    unmasked = [path for path, _ in kept if chosen.get(image_key(path, bad)) is None]
    if unmasked:
        more = f" (and {len(unmasked) - 1} more)" if len(unmasked) > 1 else ""
        stem = mask_dir / image_key(unmasked[0], bad)
        raise fail(
            f"bad image {unmasked[0]} has no defect mask {stem}.png or {stem}{MASK_ENDING}.png "
            f"(any image suffix){more}; add one (nonzero pixels mark the defect) or move the "
            f"image out of {bad}"
        )
    masks = []
    for path, pixels in kept:
        mask_path = chosen[image_key(path, bad)]
        assert mask_path is not None  # every kept image has one, checked above
        masks.append(read_mask(mask_path, (pixels.shape[1], pixels.shape[0])))
    return masks


def _mask_for(key: str, by_key: dict[str, Path]) -> Path | None:
    """The mask named like the image, else the one with MVTec's ``_mask`` ending."""
    return by_key.get(key) or by_key.get(key + MASK_ENDING)


def defect_kinds(files: Sequence[Path], bad: Path) -> list[str | None]:
    """Each bad image's defect kind: the first folder below ``bad`` (MVTec's
    ``test/<kind>/000.png``); None for an image directly in ``bad``."""
    relative = [path.relative_to(bad) for path in files]
    return [rel.parts[0] if len(rel.parts) > 1 else None for rel in relative]


def per_kind(report: EvalReport, kinds: Sequence[str | None]) -> dict[str, dict[str, Any]]:
    """Per defect kind (see :func:`defect_kinds`): its image count, the AUROC of its bad
    images against every good one, and how many of them the threshold flags."""
    rows: dict[str, dict[str, Any]] = {}
    for kind in sorted({k for k in kinds if k is not None}):
        scores = [s for s, k in zip(report.bad_scores, kinds, strict=True) if k == kind]
        rows[kind] = {
            "n": len(scores),
            "auroc": auroc(report.good_scores, scores),
            "flagged": sum(1 for s in scores if s > report.threshold),
        }
    return rows


def fit_command(
    profile: Path,
    inputs: list[Path],
    name: str,
    device: str,
    console: Console,
    overrides: str | None = None,
    coreset_fraction: float | None = None,
) -> None:
    try:
        config = FeatureConfig.from_overrides(overrides) if overrides else FeatureConfig()
    except ValueError as exc:
        raise fail(f"--config: {exc}") from exc
    configure_models_from(Settings())  # as a model worker: the CLI scores as the stage does
    if coreset_fraction is not None and not 0.0 < coreset_fraction <= 1.0:
        raise fail(
            f"--coreset must be a fraction in (0, 1] of the fit patches to keep, got "
            f"{coreset_fraction}; {DEFAULT_CORESET_FRACTION} is the default"
        )

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
            coreset_fraction=coreset_fraction or DEFAULT_CORESET_FRACTION,
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
    configure_models_from(Settings())  # as a model worker: the CLI scores as the stage does
    with progress_bar(console) as bar:
        # --bad may be the folder above --good and --masks (MVTec's test/): not bad images
        good_images = load_images([good], console, bar)
        bad_files = load_image_files([bad], console, bar, [good, *([masks] if masks else [])])
        bad_masks = load_masks(masks, bad, bad_files) if masks is not None else None
        bad_images = [pixels for _, pixels in bad_files]
        task = bar.add_task("scoring", total=len(good_images) + len(bad_images))
        report = evaluate_profile(
            profile, good_images, bad_images, device=device,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            bad_masks=bad_masks,
        )  # fmt: skip
    kinds = per_kind(report, defect_kinds([path for path, _ in bad_files], bad))
    if json_out:
        typer.echo(json.dumps({**report.to_json(), "per_kind": kinds}, indent=2))
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
    if kinds:
        by_kind = Table("defect kind", "images", "AUROC", "flagged")
        for kind, row in kinds.items():
            by_kind.add_row(escape(kind), str(row["n"]), f"{row['auroc']:.3f}", str(row["flagged"]))
        Console().print(by_kind)
