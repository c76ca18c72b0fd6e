"""The Python API keeps one orchestrator context per configuration, not one per call."""

from __future__ import annotations

from imgpipe.face.api import _context, _contexts
from imgpipe.settings import Settings


def test_calls_without_settings_share_one_context() -> None:
    first = _context(None)
    for _ in range(5):
        assert _context(None) is first
    assert _context(Settings()) is first
    before = len(_contexts)
    other = _context(Settings(default_pipeline="basic"))
    assert other is not first and len(_contexts) == before + 1
    assert _context(Settings(default_pipeline="basic")) is other
