"""Write a family's split as image files, so the suite can be run the way a user runs
their own data: ``imgpipe anomaly fit`` on ``train/good``, then ``imgpipe anomaly eval``.

Layout (MVTec AD's, with the defective crops under ``test/bad`` so that ``--bad`` is one
folder)::

    DIR/train/good/000.png ...            the fit crops
    DIR/test/good/000.png ...             good test crops
    DIR/test/bad/<kind>/000.png ...       defective test crops, by defect kind
    DIR/ground_truth/<kind>/000_mask.png  their masks (255 = defect)
"""

from __future__ import annotations

import shlex
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from workers.anomaly.suite.dataset import FamilySplit

__all__ = ["eval_commands", "export_split"]


def _write_png(path: Path, pixels: NDArray[np.uint8]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = pixels[..., ::-1] if pixels.ndim == 3 else pixels
    if not cv2.imwrite(str(path), np.ascontiguousarray(bgr)):
        raise OSError(f"could not write {path}; check that the folder is writable")


def export_split(split: FamilySplit, out_dir: Path) -> None:
    """Write ``split``'s crops and masks below ``out_dir`` (see the module's layout)."""
    for i, image in enumerate(split.fit):
        _write_png(out_dir / "train" / "good" / f"{i:03d}.png", image)
    for i, image in enumerate(split.good):
        _write_png(out_dir / "test" / "good" / f"{i:03d}.png", image)
    for i, (image, mask, kind) in enumerate(zip(split.bad, split.masks, split.kinds, strict=True)):
        _write_png(out_dir / "test" / "bad" / kind / f"{i:03d}.png", image)
        _write_png(
            out_dir / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255
        )


def eval_commands(out_dir: Path, name: str) -> list[str]:
    """The two commands that fit and evaluate a profile on an exported split."""
    d = shlex.quote(str(out_dir))
    profile = shlex.quote(str(out_dir / "profile.npz"))
    return [
        f"imgpipe anomaly fit {profile} {d}/train/good --name {shlex.quote(name)}",
        f"imgpipe anomaly eval {profile} --good {d}/test/good --bad {d}/test/bad "
        f"--masks {d}/ground_truth --json",
    ]
