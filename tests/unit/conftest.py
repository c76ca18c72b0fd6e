"""Unit-test fixtures: the sample photographs in samples/ and their degradations."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")

LoadSample = Callable[[str], NDArray[np.uint8]]


@pytest.fixture(params=PHOTOS)
def photo_name(request: pytest.FixtureRequest) -> str:
    """Each clean sample photograph in turn."""
    return str(request.param)


@pytest.fixture(scope="session")
def load_sample(samples_dir: Path) -> LoadSample:
    """``load_sample("rocket")`` or ``load_sample("degraded/rocket_dark")``: the JPEG decoded
    the way the service decodes uploads (Pillow, converted to RGB)."""

    def load(name: str) -> NDArray[np.uint8]:
        with Image.open(samples_dir / f"{name}.jpg") as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)

    return load


@pytest.fixture(scope="session")
def degrade(samples_dir: Path) -> ModuleType:
    """samples/make_degraded.py, whose blur/darken/add_noise/reduce_contrast made the files."""
    spec = importlib.util.spec_from_file_location("make_degraded", samples_dir / "make_degraded.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
