"""The review console in a real browser: Debian's chromium, headless, driven by Playwright.

Upload through the API, wait for the verdict by reading the job's event stream from the
page, then two reviewers (two browser contexts, two keys) clear a queue of 20 review items
with the keyboard at the same time: every decision is stored once, and no item is on both
screens at once. A screenshot of the console is saved and checked.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from db.engine import session_scope
from db.models import Review
from imgpipe.settings import Settings
from tests.support.jobs import wait_jobs
from tests.support.webfixtures import noise_png, review_pipeline
from tests.support.webserver import ApiServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian's chromium is not installed (apt-get install -y chromium chromium-driver)",
    ),
    pytest.mark.one_backend("sqlite"),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (test extra)"
)

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
VIEWPORT = {"width": 1280, "height": 800}
QUEUE_SIZE = 20
WAIT_MS = 60_000

READ_EVENTS_JS = """async ([jobId, token]) => {
  const response = await fetch(`/v1/jobs/${jobId}/events`,
                               {headers: {Authorization: `Bearer ${token}`}});
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return text;
    text += decoder.decode(value, {stream: true});
  }
}"""
NEXT_STATE_JS = """(previous) => {
  const item = document.getElementById("item");
  const empty = !document.getElementById("empty").hidden;
  return empty || (item.dataset.ready === "true" && item.dataset.jobId !== previous);
}"""


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def sign_in(browser: Any, server: ApiServer, token: str, pipeline: str) -> Any:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(server.url(f"/console?pipeline={pipeline}"))
    page.fill("#api-key", token)
    page.press("#api-key", "Enter")
    page.wait_for_function(NEXT_STATE_JS, arg="", timeout=WAIT_MS)
    return page


def shown_job(page: Any) -> str | None:
    if page.is_visible("#empty"):
        return None
    job_id: str = page.get_attribute("#item", "data-job-id")
    return job_id


def completed_event(stream_text: str) -> dict[str, Any]:
    import json

    blocks = [b for b in stream_text.split("\n\n") if "event: completed" in b]
    assert len(blocks) == 1, stream_text[-2000:]
    data = next(line for line in blocks[0].splitlines() if line.startswith("data: "))
    parsed: dict[str, Any] = json.loads(data.removeprefix("data: "))
    return parsed


def test_two_reviewers_clear_the_queue_with_the_keyboard(
    browser: Any,
    web_server: ApiServer,
    web_keys: dict[str, str],
    web_settings: Settings,
    tmp_path: Path,
) -> None:
    pipeline = review_pipeline(web_settings, detect=True)
    uploader = browser.new_context(
        base_url=web_server.base_url,
        extra_http_headers={"Authorization": f"Bearer {web_keys['all']}"},
    )

    def upload(data: bytes, name: str) -> str:
        response = uploader.request.post("/v1/jobs", multipart={
            "image": {"name": name, "mimeType": "application/octet-stream", "buffer": data},
            "pipeline": pipeline, "force": "1",
        })  # fmt: skip
        assert response.status == 202, response.text()
        job_id: str = response.json()["job_id"]
        return job_id

    astronaut = (SAMPLES / "astronaut.jpg").read_bytes()
    first = upload(astronaut, "astronaut.jpg")
    watcher = uploader.new_page()
    watcher.goto(web_server.url("/console"))
    final = completed_event(watcher.evaluate(READ_EVENTS_JS, [first, web_keys["all"]]))
    assert final["status"] == "succeeded" and final["verdict"] == "review"
    jobs = [first] + [upload(noise_png(), f"noise-{i}.png") for i in range(QUEUE_SIZE - 1)]
    wait_jobs(web_settings.effective_database_url, jobs, 180)

    alice = sign_in(browser, web_server, web_keys["alice"], pipeline)
    assert shown_job(alice) == first, "oldest first: the uploaded photo"
    assert alice.locator("#boxes rect").count() >= 1, "the detector's boxes are drawn"
    assert "signed in as alice" in alice.inner_text("#whoami")
    shot = tmp_path / "console.png"
    alice.screenshot(path=str(shot))
    bob = sign_in(browser, web_server, web_keys["bob"], pipeline)

    pages = {"alice": (alice, "a", "allow"), "bob": (bob, "b", "block")}
    seen: dict[str, list[str]] = {"alice": [], "bob": []}
    current = {name: shown_job(page) for name, (page, _, _) in pages.items()}
    while any(current.values()):
        for name, (page, key, _) in pages.items():
            job = current[name]
            other = current["bob" if name == "alice" else "alice"]
            if job is None:
                continue
            assert job != other, f"{job} is on both screens"
            seen[name].append(job)
            page.keyboard.press(key)
            page.wait_for_function(NEXT_STATE_JS, arg=job, timeout=WAIT_MS)
            current[name] = shown_job(page)
    assert not set(seen["alice"]) & set(seen["bob"])
    assert sorted(seen["alice"] + seen["bob"]) == sorted(jobs)
    assert seen["alice"] and seen["bob"], "both reviewers worked the queue"

    with session_scope(web_settings.effective_database_url) as session:
        reviews = session.execute(
            select(Review.job_id, Review.reviewer, Review.decision).where(Review.job_id.in_(jobs))
        ).all()
    assert len(reviews) == QUEUE_SIZE and len({r.job_id for r in reviews}) == QUEUE_SIZE
    expected = {j: (n, pages[n][2]) for n, ids in seen.items() for j in ids}
    assert {r.job_id: (r.reviewer, r.decision) for r in reviews} == expected

    history = alice  # the key lives in the tab (sessionStorage): follow the link
    history.click("header a[href='/console/history']")
    history.fill("input[name=reviewer]", "bob")
    history.fill("input[name=pipeline]", pipeline)
    history.click("#filters button[type=submit]")
    history.wait_for_function(
        "n => document.querySelectorAll('#history tbody tr').length === n",
        arg=len(seen["bob"]), timeout=WAIT_MS,
    )  # fmt: skip
    assert set(history.locator("#history tbody td:nth-child(2)").all_inner_texts()) == {"block"}

    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with Image.open(shot) as image:
        assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
        extrema = image.convert("L").getextrema()
        assert extrema[0] < extrema[1], "not a blank page"
    keep = Path("/tmp") / f"imgpipe-console-{hashlib.sha256(data).hexdigest()[:8]}.png"
    shutil.copy(shot, keep)
    print(f"console screenshot: {keep}")
