"""The report's inline SVG: detection boxes over a picture and the stage-timing waterfall.

Every string drawn comes from the database and is escaped with ``html.escape``.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from imgpipe.face.report.views import Box, Timing

__all__ = ["WATERFALL_WIDTH_PX", "boxes_svg", "waterfall_svg"]

WATERFALL_WIDTH_PX = 560
_ROW_PX = 18
_LABEL_PX = 90
_SEGMENTS = (("queue", "#b0bec5"), ("load", "#ffb74d"), ("compute", "#1e88e5"))


def boxes_svg(boxes: Sequence[Box], width_px: int, height_px: int) -> str:
    """An SVG sized like the picture it lies on; its viewBox is the original upload's
    pixel grid, so the stored box coordinates are drawn as they are at any scale."""
    if not boxes or width_px <= 0 or height_px <= 0:
        return ""
    stroke = max(width_px, height_px) / 200
    font = max(width_px, height_px) / 28
    parts = [f'<svg class="boxes" viewBox="0 0 {width_px} {height_px}" preserveAspectRatio="none">']
    for box in boxes:
        label = escape(box.label)
        parts.append(
            f'<g class="box" data-label="{label}" data-score="{box.score:.3f}" '
            f'data-x1="{box.x1:.1f}" data-y1="{box.y1:.1f}" data-x2="{box.x2:.1f}" '
            f'data-y2="{box.y2:.1f}">'
            f'<rect x="{box.x1:.1f}" y="{box.y1:.1f}" width="{box.x2 - box.x1:.1f}" '
            f'height="{box.y2 - box.y1:.1f}" fill="none" stroke="#00e676" '
            f'stroke-width="{stroke:.1f}"/>'
            f'<text x="{box.x1:.1f}" y="{max(box.y1 - stroke, font):.1f}" '
            f'font-size="{font:.1f}" fill="#00e676" stroke="#000" '
            f'stroke-width="{stroke / 3:.1f}" paint-order="stroke">'
            f"{label} {box.score:.2f}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def waterfall_svg(timings: Sequence[Timing]) -> str:
    """One row per stage that ran: queue wait, load and compute on a shared time axis
    (milliseconds since the job was created)."""
    if not timings:
        return '<p class="muted">no stage has run</p>'
    span_ms = max(t.end_ms for t in timings) or 1.0
    scale = (WATERFALL_WIDTH_PX - _LABEL_PX - 60) / span_ms
    height = _ROW_PX * len(timings) + 22
    parts = [
        f'<svg class="waterfall" width="{WATERFALL_WIDTH_PX}" height="{height}" '
        f'viewBox="0 0 {WATERFALL_WIDTH_PX} {height}">'
    ]
    for row, t in enumerate(timings):
        y = row * _ROW_PX + 2
        stage = escape(t.stage)
        parts.append(
            f'<g class="timing" data-stage="{stage}" data-status="{escape(t.status)}" '
            f'data-start-ms="{t.start_ms:.1f}" data-queue-wait-ms="{t.queue_wait_ms:.1f}" '
            f'data-load-ms="{t.load_ms:.1f}" data-compute-ms="{t.compute_ms:.1f}">'
            f'<text x="0" y="{y + 12}" font-size="11">{stage}</text>'
        )
        x = _LABEL_PX + t.start_ms * scale
        for (name, colour), ms in zip(
            _SEGMENTS, (t.queue_wait_ms, t.load_ms, t.compute_ms), strict=True
        ):
            width = max(ms * scale, 1.0)
            parts.append(
                f'<rect class="{name}" x="{x:.1f}" y="{y}" width="{width:.1f}" '
                f'height="{_ROW_PX - 5}" fill="{colour}"><title>{stage} {name} '
                f"{ms:.1f} ms</title></rect>"
            )
            x += width
        parts.append(
            f'<text x="{x + 4:.1f}" y="{y + 12}" font-size="10">{t.end_ms - t.start_ms:.0f} ms'
            "</text></g>"
        )
    axis_y = _ROW_PX * len(timings) + 16
    parts.append(
        f'<text x="{_LABEL_PX}" y="{axis_y}" font-size="10">0 ms</text>'
        f'<text x="{WATERFALL_WIDTH_PX - 60}" y="{axis_y}" font-size="10" text-anchor="end">'
        f"{span_ms:.0f} ms since submit</text></svg>"
    )
    return "".join(parts)
