"""InferenceModel: lazy load once under a lock, sha pin, bounded load attempts, idle unload."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from imgpipe.errors import PermanentError, WeightsMismatchError
from workers.models.base import InferenceModel, ModelInfo, add_load_listener, sha256_file
from workers.models.registry import cached_model, unload_idle_models


class Doubler(InferenceModel[float, float]):
    name = "test-doubler"
    version = "1"
    license = "test"
    loads = 0
    fail_loads = False

    def _load(self, weights_path: Path, device: torch.device) -> torch.nn.Module:
        type(self).loads += 1
        if self.fail_loads:
            raise RuntimeError("corrupt weights")
        module = torch.nn.Linear(1, 1, bias=False)
        module.load_state_dict(torch.load(weights_path, weights_only=True))
        return module.to(device)

    def _predict(self, module: torch.nn.Module, batch: Sequence[float]) -> list[float]:
        assert torch.is_inference_mode_enabled()
        out = module(torch.tensor([[x] for x in batch]))
        return [float(v) for v in out[:, 0]]


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "doubler.pt"
    torch.save({"weight": torch.tensor([[2.0]])}, path)
    Doubler.loads = 0
    Doubler.fail_loads = False
    return path


def test_loads_once_across_threads_and_predicts_a_batch(weights: Path) -> None:
    model = Doubler(weights)
    results: list[list[float]] = []
    threads = [
        threading.Thread(target=lambda: results.append(model.predict([1.0, 2.0]))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Doubler.loads == 1
    assert results == [[2.0, 4.0]] * 8
    assert model.predict([]) == []


def test_first_load_is_announced_once_with_the_weights_sha(weights: Path) -> None:
    seen: list[ModelInfo] = []
    add_load_listener(seen.append)
    model = Doubler(weights)
    model.predict([1.0])
    model.predict([1.0])
    mine = [i for i in seen if i.source == str(weights)]
    assert len(mine) == 1
    assert mine[0].weights_sha256 == sha256_file(weights)


def test_pinned_sha_mismatch_is_refused_before_loading(weights: Path) -> None:
    model = Doubler(weights, expected_sha256="ab" * 32)
    with pytest.raises(WeightsMismatchError, match="pins abab"):
        model.predict([1.0])
    assert Doubler.loads == 0


def test_load_attempts_are_bounded(weights: Path) -> None:
    Doubler.fail_loads = True
    model = Doubler(weights, max_load_attempts=2)
    for _ in range(2):
        with pytest.raises(PermanentError, match="could not load"):
            model.predict([1.0])
    with pytest.raises(PermanentError, match="failed to load 2 times"):
        model.predict([1.0])
    assert Doubler.loads == 2


def test_idle_model_is_unloaded_and_reloads_on_next_use(weights: Path) -> None:
    model = Doubler(weights, idle_unload_s=0.0)
    cached = cached_model(f"doubler:{weights}", lambda: model)
    assert cached is model
    model.predict([1.0])
    assert model.loaded
    assert unload_idle_models() >= 1
    assert not model.loaded
    assert model.predict([3.0]) == [6.0]
    assert Doubler.loads == 2
