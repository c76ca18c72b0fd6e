"""workers/models/heap.py: freed model memory stays in the heap, and goes back on unload.

Each check runs in a fresh interpreter: the thresholds are process-wide and set once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc's mallopt: Linux with glibc only",
)

_PROBE = textwrap.dedent(
    """
    import numpy as np
    from workers.models.heap import retain_freed_memory, return_freed_memory

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    retained = retain_freed_memory()
    again = retain_freed_memory()
    before = rss_mib()
    block = np.ones(48 * 2**20 // 8)  # 48 MiB, every page written: like an activation
    del block
    after_free = rss_mib()
    return_freed_memory()
    after_return = rss_mib()
    print(retained, again, round(after_free - before), round(after_return - before))
    """
)


def _probe(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout.split()


def test_freed_memory_stays_in_the_heap_until_it_is_returned() -> None:
    retained, again, kept_mib, left_mib = _probe({})
    assert (retained, again) == ("True", "True")
    assert int(kept_mib) >= 40  # the 48 MiB block was freed into the heap, not unmapped
    assert int(left_mib) <= 8  # malloc_trim handed it back


def test_without_the_thresholds_a_large_block_is_unmapped_on_free() -> None:
    """The behaviour the module changes: glibc's own thresholds (here kept because the
    environment sets a malloc option) give a 48 MiB block back at once."""
    retained, _, kept_mib, _ = _probe({"MALLOC_TOP_PAD_": "131072"})
    assert retained == "False"
    assert int(kept_mib) <= 8


_REGISTRY_PROBE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from workers.models.registry import cached_model, configure_models

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    configure_models(precision="auto", retain_heap=sys.argv[1] == "on")
    cached_model("probe", lambda: object())  # the first model built in this process
    before = rss_mib()
    block = np.ones(48 * 2**20 // 8)
    del block
    print(round(rss_mib() - before))
    """
)


@pytest.mark.parametrize(("setting", "retains"), [("on", True), ("off", False)])
def test_the_first_model_built_sets_the_heap_thresholds_unless_configured_off(
    setting: str, retains: bool
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _REGISTRY_PROBE, setting],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    kept_mib = int(out.stdout.split()[-1])
    assert (kept_mib >= 40) == retains, out.stdout
