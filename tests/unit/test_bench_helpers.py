"""Pure helpers of `imgpipe bench`: percentiles, ratios and the canvas backend URL."""

from __future__ import annotations

import pytest

from imgpipe.face.bench.canvas import redis_py_url, result_url
from imgpipe.face.bench.stats import ratio, summary


def test_summary_uses_nearest_rank_and_ignores_missing_values() -> None:
    values: list[float | None] = [float(v) for v in range(1, 101)]
    values.append(None)
    assert summary(values) == {"n": 100, "p50": 51.0, "p95": 95.0, "p99": 99.0}
    assert summary([], (0.5,)) == {"n": 0, "p50": None}


def test_ratio_is_none_without_a_baseline() -> None:
    assert ratio(30.0, 10.0) == 3.0
    assert ratio(1.0, None) is None
    assert ratio(None, 2.0) is None
    assert ratio(1.0, 0.0) is None


def test_canvas_results_go_to_another_database_of_the_same_redis() -> None:
    embedded = "redis+socket:///tmp/ipbench-x/redis.sock"
    assert result_url(embedded) == embedded + "?virtual_host=1"
    assert redis_py_url(result_url(embedded)) == "unix:///tmp/ipbench-x/redis.sock?db=1"
    assert result_url("redis://:pw@host:6379/0") == "redis://:pw@host:6379/1"
    assert result_url("redis://host:6379") == "redis://host:6379/1"
    assert result_url("rediss://host:6380/15") == "rediss://host:6380/0"
    with pytest.raises(ValueError, match="needs a Redis broker"):
        result_url("amqp://guest@host//")
