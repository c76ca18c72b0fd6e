"""The report's pure parts: durations, escaping of database strings, the boxes' frame and
the moderation scores shown."""

from __future__ import annotations

from datetime import timedelta

import pytest

from imgpipe.face.report import parse_duration, render_page
from imgpipe.face.report.outputs import MAX_SCORES_SHOWN, _scores
from imgpipe.face.report.views import Box, JobView, Picture, StageNote, Timing
from imgpipe.stageoutputs import ModerateOutput
from tests.support.htmlscan import scan_html

TINY_JPEG_URI = "data:image/jpeg;base64,AAAA"
EVIL = '"><img src=https://evil.example/x.png onerror=alert(1)>'


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90s", timedelta(seconds=90)), ("15m", timedelta(minutes=15)), (" 2h", timedelta(hours=2)),
     ("1.5d", timedelta(hours=36))],
)  # fmt: skip
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "soon", "5", "5w", "-1h"])
def test_parse_duration_refuses_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 30m"):
        parse_duration(text)


def test_every_database_string_is_escaped() -> None:
    view = JobView(
        job_id=EVIL, title=EVIL, pipeline=EVIL, status="failed", verdict=EVIL, reasons=[EVIL],
        error=EVIL, width_px=100, height_px=50, original=Picture(TINY_JPEG_URI),
        heatmap=Picture(missing=EVIL), enhance_ops=[EVIL], quality_score=1.0,
        quality_flags=[EVIL], boxes=[Box(EVIL, 0.5, 1, 2, 30, 40)],
        timings=[Timing(EVIL, EVIL, 0.0, 1.0, 2.0, 3.0)], notes=[StageNote(EVIL, EVIL, EVIL)],
    )  # fmt: skip
    page = render_page([view], [EVIL])
    assert "<img src=https" not in page and "evil.example" in page
    elements = scan_html(page)
    assert [e.attrs["src"] for e in elements if e.tag == "img"] == [TINY_JPEG_URI]
    (svg,) = [e for e in elements if e.tag == "svg" and "boxes" in e.classes]
    assert svg.attrs["viewbox"] == "0 0 100 50"
    (box,) = [e for e in elements if "box" in e.classes]
    assert box.attrs["data-label"] == EVIL  # escaped in the file, the same once parsed


def test_deciding_scores_first_then_the_highest_others() -> None:
    scores = {f"C{i}": i / 100 for i in range(20)}
    scores["HIT"] = 0.01
    output: ModerateOutput = {
        "scores": scores,
        "verdict": "review",
        "reasons": [],
        "thresholds": {
            "HIT": {"review": 0.01, "block": None},
            "C19": {"review": 0.9, "block": None},
        },
    }
    shown = _scores(output)
    assert [s.category for s in shown] == ["HIT", "C19", "C18", "C17", "C16", "C15"]
    assert len(shown) == MAX_SCORES_SHOWN and [s.deciding for s in shown].count(True) == 1
