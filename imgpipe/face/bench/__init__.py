"""``imgpipe bench``: throughput and latency of a pipeline through the real stack, with
the baselines it is judged against measured in the same run (docs/benchmarks.md,
"imgpipe bench: what each figure means").

The face of the benchmark: it imports every layer, lazily, like the CLI.
"""

from __future__ import annotations

from imgpipe.face.bench.run import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
