"""``JobView``s -> one self-contained HTML page (inline CSS and SVG, images as data: URIs,
no script, nothing fetched). Every string from the database goes through ``html.escape``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from imgpipe.face.report.svg import boxes_svg, waterfall_svg
from imgpipe.face.report.views import JobView, Picture, Score

__all__ = ["render_page"]

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;background:#fafafa;color:#212121}
.job{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin:0 0 16px}
.job h2{font-size:16px;margin:0 0 8px}
.pics{display:flex;gap:12px;flex-wrap:wrap}
figure{margin:0}
.frame{position:relative;display:inline-block;line-height:0;background:#eee}
.frame img.thumb{display:block;max-width:360px;max-height:360px}
.heat-alone{background:#000}
.frame .heatmap,.frame svg.boxes{position:absolute;left:0;top:0;width:100%;height:100%}
.heat-toggle:not(:checked)~.pics .heatmap{display:none}
.missing{display:inline-block;width:240px;padding:20px;background:#eee;color:#757575}
.facts{border-collapse:collapse;margin-top:8px}
.facts th{text-align:left;padding:2px 12px 2px 0;vertical-align:top;color:#616161}
.verdict{font-weight:bold;padding:1px 8px;border-radius:4px;background:#e0e0e0}
.verdict-allow,.verdict-pass{background:#c8e6c9}.verdict-review{background:#fff3c4}
.verdict-block,.verdict-fail{background:#ffcdd2}
.deciding{font-weight:bold;color:#c62828}.muted{color:#757575}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
"""


def _picture(pic: Picture, css_class: str, overlay: str) -> str:
    if pic.data_uri is None:
        return f'<span class="missing {css_class}">{escape(pic.missing or "not available")}</span>'
    return (
        f'<div class="frame"><img class="thumb {css_class}" alt="{css_class}" '
        f'src="{pic.data_uri}">{overlay}</div>'
    )


def _pictures(view: JobView, index: int) -> str:
    boxes = boxes_svg(view.boxes, view.width_px, view.height_px)
    heat = ""
    toggle = ""
    if view.heatmap.data_uri is not None:
        heat = f'<img class="heatmap" alt="anomaly heat map" src="{view.heatmap.data_uri}">'
        toggle = (
            f'<input type="checkbox" class="heat-toggle" id="heat-{index}" checked>'
            f'<label for="heat-{index}"> anomaly heat map over the original</label>'
        )
    elif view.heatmap.missing is not None:
        toggle = f'<p class="muted">heat map: {escape(view.heatmap.missing)}</p>'
    original = _picture(view.original, "original", heat + boxes)
    enhanced = _picture(view.enhanced, "enhanced", boxes)
    ops = escape(", ".join(view.enhance_ops) or "nothing applied")
    alone = ""
    if view.heatmap.data_uri is not None:
        alone = (
            f'<figure><div class="frame heat-alone"><img class="thumb heatmap-alone" '
            f'alt="anomaly heat map" src="{view.heatmap.data_uri}"></div><figcaption>anomaly '
            "heat map (black: like the good images; red: twice the threshold)</figcaption></figure>"
        )
    return (
        f'{toggle}<div class="pics"><figure>{original}<figcaption>original '
        f"{view.width_px}x{view.height_px} px</figcaption></figure>"
        f"<figure>{enhanced}<figcaption>enhanced: {ops}</figcaption></figure>{alone}</div>"
    )


def _score_cell(score: Score) -> str:
    limits = ", ".join(
        f"{name} {value:g}"
        for name, value in (("review", score.review), ("block", score.block))
        if value is not None
    )
    cls = ' class="score deciding"' if score.deciding else ' class="score"'
    return (
        f'<li{cls} data-category="{escape(score.category)}" data-score="{score.score:.4f}">'
        f"{escape(score.category)} {score.score:.3f}"
        f"{f' (thresholds: {limits})' if limits else ''}</li>"
    )


def _verdict(verdict: str | None) -> str:
    if verdict is None:
        return '<span class="verdict" data-verdict="">none</span>'
    v = escape(verdict)
    return f'<span class="verdict verdict-{v}" data-verdict="{v}">{v}</span>'


def _facts(view: JobView) -> str:
    rows: list[tuple[str, str]] = [("job", f"{escape(view.job_id)} ({escape(view.pipeline)}, "
                                   f"{escape(view.status)})")]  # fmt: skip
    rows.append(("verdict", _verdict(view.verdict)
                 + "".join(f"<div>{escape(r)}</div>" for r in view.reasons)))  # fmt: skip
    if view.quality_score is not None:
        flags = ", ".join(view.quality_flags) or "none"
        rows.append(("quality", f'{view.quality_score:.1f} / 100; flags: <span class="flags">'
                     f"{escape(flags)}</span>"))  # fmt: skip
    if view.moderation_verdict is not None:
        scores = "".join(_score_cell(s) for s in view.scores)
        reasons = "".join(f"<div>{escape(r)}</div>" for r in view.moderation_reasons)
        rows.append(
            ("moderation", f"{_verdict(view.moderation_verdict)}{reasons}<ul>{scores}</ul>")
        )
    if view.anomaly_score is not None and view.anomaly_threshold is not None:
        rows.append(("anomaly", f"score {view.anomaly_score:.3f} (threshold "
                     f"{view.anomaly_threshold:.3f})"))  # fmt: skip
    if view.boxes:
        rows.append(
            ("detections", escape(", ".join(f"{b.label} {b.score:.2f}" for b in view.boxes)))
        )
    for note in view.notes:
        rows.append((f"stage {escape(note.stage)}", f'<span class="note">{escape(note.status)}: '
                     f"{escape(note.reason)}</span>"))  # fmt: skip
    if view.error:
        rows.append(("error", f'<span class="error">{escape(view.error)}</span>'))
    body = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    return f'<table class="facts">{body}</table>'


def _job(view: JobView, index: int) -> str:
    return (
        f'<section class="job" id="job-{index}" data-job-id="{escape(view.job_id)}">'
        f"<h2>{escape(view.title)} {_verdict(view.verdict)}</h2>"
        f"{_pictures(view, index)}{_facts(view)}"
        f"<h3>stage timings</h3>{waterfall_svg(view.timings)}</section>"
    )


def render_page(views: Sequence[JobView], unknown: Sequence[str] = ()) -> str:
    """The whole page; ``unknown`` job ids are listed at the top as not found."""
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    missing = "".join(f"<li>{escape(j)}</li>" for j in unknown)
    header = (
        f'<h1>imgpipe report: {len(views)} job(s)</h1><p class="muted">written {made}. '
        'Boxes: detections in original-image pixels. Waterfall:<span class="legend">'
        '<span style="background:#b0bec5"></span>queue wait<span style="background:#ffb74d">'
        '</span>load<span style="background:#1e88e5"></span>compute</span></p>'
    )
    if missing:
        header += f'<p>not found (no such job):</p><ul class="unknown">{missing}</ul>'
    jobs = "".join(_job(v, i) for i, v in enumerate(views))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>imgpipe report</title><style>{_CSS}</style></head>"
        f"<body>{header}{jobs}</body></html>\n"
    )
