"""The HTML report of a real job (full pipeline with a fitted anomaly profile, through the
session's stack): parsed for boxes, labels, verdict, scores, heat map and timings, checked
for external references, and rendered by headless Chromium to a PNG."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgpipe.contracts import JobStatus
from imgpipe.decode import DecodeLimits, decode_image
from imgpipe.face.cli import app
from imgpipe.face.report import write_report
from imgpipe.face.report.thumbs import THUMB_MAX_SIDE_PX
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.support.htmlscan import Element, scan_html
from tests.support.jobs import wait_jobs

pytestmark = [pytest.mark.timeout(420), pytest.mark.one_backend("sqlite")]

PROFILE_IMAGES = ("chelsea.jpg", "coffee.jpg", "rocket.jpg", "photo_1080p.jpg")
HOSTILE_NAME = '<script>alert("x")</script>astronaut.jpg'
SCREEN_W_PX, SCREEN_H_PX = 1280, 2000


@pytest.fixture(scope="module")
def profiled_pipeline(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in ``full`` pipeline with an anomaly profile fitted on sample photos."""
    from workers.anomaly.fit import fit_profile

    work = tmp_path_factory.mktemp("report-profile")
    limits = DecodeLimits()
    paths = [samples_dir / n for n in PROFILE_IMAGES] + sorted(
        (samples_dir / "degraded").glob("chelsea_*.jpg")
    )
    images = [decode_image(p.read_bytes(), limits, max_side_px=320).pixels for p in paths]
    profile = work / "samples.npz"
    fit_profile([np.array(i) for i in images], profile, name="samples")
    full = Path(__file__).resolve().parents[2] / "orchestrator" / "builtin_pipelines" / "full.toml"
    text = full.read_text(encoding="utf-8").replace('name = "full"', 'name = "full-report"')
    text = text.replace(
        '[stages.anomaly]\nneeds = ["quality"]',
        f'[stages.anomaly]\nneeds = ["quality"]\nparams = {{ profile = "{profile}" }}',
    )
    assert str(profile) in text, "full.toml changed shape: update this fixture's edit"
    pipeline = work / "full-report.toml"
    pipeline.write_text(text, encoding="utf-8")
    return pipeline


@pytest.fixture(scope="module")
def report_job(ctx: OrchestratorContext, samples_dir: Path, profiled_pipeline: Path) -> str:
    data = (samples_dir / "astronaut.jpg").read_bytes()
    request = SubmitRequest(
        data=data, pipeline=str(profiled_pipeline), metadata={"filename": HOSTILE_NAME}, force=True
    )
    job_id = submit(ctx, request).job_id
    assert wait_jobs(ctx.database_url, [job_id], 300)[job_id] == JobStatus.SUCCEEDED
    return job_id


@pytest.fixture(scope="module")
def dark_job(ctx: OrchestratorContext, samples_dir: Path, profiled_pipeline: Path) -> str:
    """A dark photo: the enhance stage brightens it, so the page has an enhanced picture."""
    data = (samples_dir / "degraded" / "astronaut_dark.jpg").read_bytes()
    request = SubmitRequest(data=data, pipeline=str(profiled_pipeline), force=True)
    job_id = submit(ctx, request).job_id
    assert wait_jobs(ctx.database_url, [job_id], 300)[job_id] == JobStatus.SUCCEEDED
    return job_id


@pytest.fixture
def page(
    stack_settings: Settings, report_job: str, dark_job: str, tmp_path: Path
) -> Iterator[tuple[Path, list[Element]]]:
    out = tmp_path / "report.html"
    written = write_report(stack_settings, [report_job, dark_job, "no-such-job"], out)
    assert (written.jobs, written.unknown) == (2, ["no-such-job"])
    yield out, scan_html(out.read_text(encoding="utf-8"))


def _with_class(elements: list[Element], css_class: str) -> list[Element]:
    return [e for e in elements if css_class in e.classes]


def _decoded(uri: str) -> Image.Image:
    assert uri.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_report_shows_boxes_verdict_scores_heatmap_and_timings(
    page: tuple[Path, list[Element]], report_job: str, dark_job: str
) -> None:
    _, page_elements = page
    sections = [i for i, e in enumerate(page_elements) if "job" in e.classes]
    assert [page_elements[i].attrs["data-job-id"] for i in sections] == [report_job, dark_job]
    elements = page_elements[sections[0] : sections[1]]  # the astronaut's section
    dark = page_elements[sections[1] :]
    (enhanced,) = _with_class(dark, "enhanced")
    assert enhanced.tag == "img" and enhanced.attrs["src"].startswith("data:image/jpeg;base64,")
    assert "dark" in "".join(_with_class(dark, "flags")[0].text)
    boxes = _with_class(elements, "box")
    assert "FACE_FEMALE" in {b.attrs["data-label"] for b in boxes}
    face = next(b for b in boxes if b.attrs["data-label"] == "FACE_FEMALE")
    assert 0 <= float(face.attrs["data-x1"]) < float(face.attrs["data-x2"]) <= 512
    assert any("FACE_FEMALE" in "".join(b.text) for b in boxes)  # the label is drawn
    svgs = [e for e in elements if e.tag == "svg" and "boxes" in e.classes]
    assert svgs and all(s.attrs["viewbox"] == "0 0 512 512" for s in svgs)
    verdicts = {v.attrs["data-verdict"] for v in _with_class(elements, "verdict")}
    assert "allow" in verdicts
    scores = _with_class(elements, "score")
    assert scores and all(float(s.attrs["data-score"]) >= 0 for s in scores)
    timings = {t.attrs["data-stage"]: t for t in _with_class(elements, "timing")}
    assert set(timings) == {"quality", "enhance", "detect", "anomaly", "moderate"}
    assert all(float(t.attrs["data-compute-ms"]) > 0 for t in timings.values())
    assert len(_with_class(elements, "compute")) == 5
    pictures = {c: _with_class(elements, c) for c in ("original", "heatmap")}
    assert pictures["original"][0].attrs["src"].startswith("data:image/jpeg;base64,")
    heat = _decoded(pictures["heatmap"][0].attrs["src"])
    assert heat.mode == "RGBA" and max(heat.size) <= THUMB_MAX_SIDE_PX
    assert max(_decoded(pictures["original"][0].attrs["src"]).size) <= THUMB_MAX_SIDE_PX
    assert "no-such-job" in "".join(_with_class(page_elements, "unknown")[0].text)


def test_report_is_self_contained_and_escapes_database_strings(
    page: tuple[Path, list[Element]],
) -> None:
    path, elements = page
    text = path.read_text(encoding="utf-8")
    for element in elements:
        for name in ("src", "href", "xlink:href", "action", "poster"):
            value = element.attrs.get(name)
            assert value is None or value.startswith(("data:", "#")), (element.tag, value[:80])
    without_data_uris = re.sub(r"data:[^\"\s]+", "", text)  # base64 may contain "//"
    assert not re.search(r"(https?:)?//[a-z0-9]", without_data_uris, re.IGNORECASE)
    assert "url(" not in text and "@import" not in text
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;astronaut.jpg" in text


def test_report_renders_in_headless_chromium(
    page: tuple[Path, list[Element]], tmp_path: Path
) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    path, _ = page
    shot = tmp_path / "report.png"
    home = tmp_path / "chromium-home"
    home.mkdir()
    subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         f"--window-size={SCREEN_W_PX},{SCREEN_H_PX}", f"--user-data-dir={home / 'profile'}",
         path.resolve().as_uri()],
        check=True, capture_output=True, timeout=180, env={**os.environ, "HOME": str(home)},
    )  # fmt: skip
    assert shot.is_file(), f"chromium wrote no screenshot to {shot}"
    with Image.open(shot) as im:
        assert im.size == (SCREEN_W_PX, SCREEN_H_PX)
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    top = pixels[:600]  # the thumbnails: many distinct colours, not just text on white
    assert len(np.unique(top.reshape(-1, 3).astype(np.uint8), axis=0)) > 1000


def test_report_command_selects_jobs_by_since(
    stack_settings: Settings, report_job: str, tmp_path: Path
) -> None:
    out = tmp_path / "since.html"
    env = {
        "IMGPIPE_DATA_DIR": str(stack_settings.resolved_data_dir),
        "IMGPIPE_DATABASE_URL": stack_settings.effective_database_url,
        "IMGPIPE_BLOB_URL": stack_settings.effective_blob_url,
    }
    result = CliRunner().invoke(app, ["report", "--since", "1h", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    ids = {e.attrs["data-job-id"] for e in scan_html(out.read_text()) if "job" in e.classes}
    assert report_job in ids
    bad = CliRunner().invoke(app, ["report", "--since", "soon", "--out", str(out)], env=env)
    assert bad.exit_code == 2 and "not a duration" in bad.output
