"""Percentiles and ratios for benchmark reports (nearest rank; empty input gives None)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["percentile", "ratio", "summary"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0..1, of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(
    values: Iterable[float | None], quantiles: Sequence[float] = (0.5, 0.95, 0.99)
) -> dict[str, float | int | None]:
    """``{"n": count, "p50": .., "p95": .., ...}`` over the values that are not None."""
    present = [v for v in values if v is not None]
    out: dict[str, float | int | None] = {"n": len(present)}
    for q in quantiles:
        out[f"p{round(q * 100)}"] = round(percentile(present, q), 3) if present else None
    return out


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)
