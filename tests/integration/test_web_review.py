"""The review queue over HTTP on the real stack: leases (two reviewers never hold the same
job), decisions stored once with the reviewer and the time, skip, expiry, order by score,
what a reviewer sees, and the history."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select, update

from db.engine import session_scope
from db.models import Job, Review, ReviewLease
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.support.jobs import wait_jobs
from tests.support.webfixtures import noise_png, review_pipeline
from tests.support.webserver import ApiServer

pytestmark = pytest.mark.timeout(240)

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
TIMEOUT_S = 30


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def queued_for_review(ctx: OrchestratorContext, pipeline: str, images: list[bytes]) -> list[str]:
    ids = [
        submit(ctx, SubmitRequest(data=data, pipeline=pipeline, force=True)).job_id
        for data in images
    ]
    wait_jobs(ctx.database_url, ids, 120)
    return ids


def take(server: ApiServer, token: str, pipeline: str, **body: Any) -> dict[str, Any] | None:
    response = requests.post(
        server.url("/v1/review/next"),
        headers=auth(token),
        json={"pipeline": pipeline, **body},
        timeout=TIMEOUT_S,
    )
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else None


def decide(server: ApiServer, token: str, job_id: str, decision: str) -> requests.Response:
    return requests.post(
        server.url(f"/v1/review/items/{job_id}/decision"),
        headers=auth(token),
        json={"decision": decision, "note": "web test"},
        timeout=TIMEOUT_S,
    )


@pytest.fixture
def web_ctx(web_settings: Settings, ctx: OrchestratorContext) -> OrchestratorContext:
    """Submits with the web settings' pipelines dir, to the running stack."""
    return OrchestratorContext(web_settings)


def test_two_reviewers_clear_a_queue_every_decision_stored_once(
    web_server: ApiServer, web_keys: dict[str, str], web_ctx: OrchestratorContext
) -> None:
    pipeline = review_pipeline(web_ctx.settings)
    jobs = queued_for_review(web_ctx, pipeline, [noise_png() for _ in range(20)])
    seen: dict[str, list[str]] = {"alice": [], "bob": []}
    errors: list[str] = []

    def work(name: str) -> None:
        while (item := take(web_server, web_keys[name], pipeline)) is not None:
            seen[name].append(item["job_id"])
            assert item["lease"]["reviewer"] == name
            answer = decide(web_server, web_keys[name], item["job_id"], "allow")
            if answer.status_code != 200:
                errors.append(f"{name}: {answer.status_code} {answer.text}")

    threads = [threading.Thread(target=work, args=(n,)) for n in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not set(seen["alice"]) & set(seen["bob"]), "no job was given to both"
    assert sorted(seen["alice"] + seen["bob"]) == sorted(jobs)
    with session_scope(web_ctx.database_url) as session:
        reviews = session.execute(
            select(Review.job_id, Review.reviewer, Review.at).where(Review.job_id.in_(jobs))
        ).all()
        verdicts = set(session.execute(select(Job.verdict).where(Job.id.in_(jobs))).scalars())
        leases = session.execute(
            select(func.count()).select_from(ReviewLease).where(ReviewLease.job_id.in_(jobs))
        ).scalar_one()
    assert len(reviews) == 20 and len({r.job_id for r in reviews}) == 20, "each stored once"
    assert {r.job_id: r.reviewer for r in reviews} == {
        j: n for n, ids in seen.items() for j in ids
    }, "the reviewer is the key's name"
    assert all(datetime.now(UTC) - r.at < timedelta(minutes=10) for r in reviews)
    assert verdicts == {"allow"} and leases == 0


def test_a_second_decision_and_a_decision_without_the_lease_are_refused(
    web_server: ApiServer, web_keys: dict[str, str], web_ctx: OrchestratorContext
) -> None:
    pipeline = review_pipeline(web_ctx.settings, vocabulary="qc")
    (job_id,) = queued_for_review(web_ctx, pipeline, [noise_png()])
    item = take(web_server, web_keys["alice"], pipeline)
    assert item is not None and item["job_id"] == job_id
    assert item["choices"] == ["pass", "fail"]
    assert take(web_server, web_keys["bob"], pipeline) is None, "alice holds the only item"
    stolen = decide(web_server, web_keys["bob"], job_id, "fail")
    assert stolen.status_code == 409 and stolen.json()["error"] == "lease_lost"
    assert "alice holds it" in stolen.json()["message"]
    wrong = decide(web_server, web_keys["alice"], job_id, "block")
    assert wrong.status_code == 400 and "pass, fail" in wrong.json()["message"]
    assert decide(web_server, web_keys["alice"], job_id, "fail").status_code == 200
    again = decide(web_server, web_keys["alice"], job_id, "pass")
    assert again.status_code == 409
    with session_scope(web_ctx.database_url) as session:
        reviews = session.execute(select(Review).where(Review.job_id == job_id)).scalars().all()
        assert [(r.decision, r.reviewer) for r in reviews] == [("fail", "alice")]


def test_an_expired_lease_goes_to_the_next_reviewer(
    web_server: ApiServer, web_keys: dict[str, str], web_ctx: OrchestratorContext
) -> None:
    pipeline = review_pipeline(web_ctx.settings)
    (job_id,) = queued_for_review(web_ctx, pipeline, [noise_png()])
    assert take(web_server, web_keys["alice"], pipeline)["job_id"] == job_id  # type: ignore[index]
    renewed = requests.post(
        web_server.url(f"/v1/review/items/{job_id}/lease"), headers=auth(web_keys["alice"])
    )
    assert renewed.status_code == 200
    with session_scope(web_ctx.database_url) as session:  # alice's browser went away
        session.execute(
            update(ReviewLease)
            .where(ReviewLease.job_id == job_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    item = take(web_server, web_keys["bob"], pipeline)
    assert item is not None and item["job_id"] == job_id and item["lease"]["reviewer"] == "bob"
    late = decide(web_server, web_keys["alice"], job_id, "block")
    assert late.status_code == 409 and "bob holds it" in late.json()["message"]
    lost = requests.post(
        web_server.url(f"/v1/review/items/{job_id}/lease"), headers=auth(web_keys["alice"])
    )
    assert lost.status_code == 409
    assert decide(web_server, web_keys["bob"], job_id, "block").status_code == 200


def test_skip_gives_the_item_to_the_others_and_not_back_to_the_skipper(
    web_server: ApiServer, web_keys: dict[str, str], web_ctx: OrchestratorContext
) -> None:
    pipeline = review_pipeline(web_ctx.settings)
    first, second = queued_for_review(web_ctx, pipeline, [noise_png(), noise_png()])
    item = take(web_server, web_keys["alice"], pipeline)
    assert item is not None
    skipped = item["job_id"]
    released = requests.delete(
        web_server.url(f"/v1/review/items/{skipped}/lease"), headers=auth(web_keys["alice"])
    )
    assert released.status_code == 204
    nxt = take(web_server, web_keys["alice"], pipeline, exclude=[skipped])
    assert nxt is not None and nxt["job_id"] == ({first, second} - {skipped}).pop()
    other = take(web_server, web_keys["bob"], pipeline)
    assert other is not None and other["job_id"] == skipped
    assert take(web_server, web_keys["alice"], pipeline, exclude=[skipped]) is not None, (
        "alice keeps her current item (taking again re-leases it)"
    )


def test_by_score_and_what_a_reviewer_sees(
    web_server: ApiServer, web_keys: dict[str, str], web_ctx: OrchestratorContext
) -> None:
    pipeline = review_pipeline(web_ctx.settings, detect=True)
    images = [(SAMPLES / n).read_bytes() for n in ("astronaut.jpg", "chelsea.jpg", "rocket.jpg")]
    jobs = queued_for_review(web_ctx, pipeline, images)
    shown = [
        requests.get(
            web_server.url(f"/v1/review/items/{j}"), headers=auth(web_keys["alice"])
        ).json()
        for j in jobs
    ]
    astronaut = shown[0]
    assert astronaut["boxes"], "the detector found something in the astronaut photo"
    assert astronaut["width"] == 512 and astronaut["height"] == 512
    assert astronaut["score"] == max(b["score"] for b in astronaut["boxes"])
    (rule,) = astronaut["rules"]
    assert rule["stage"] == "quality" and rule["op"] == ">=" and rule["value"] == 0
    assert rule["matched"] is True and isinstance(rule["actual"], float)
    # Highest score first; jobs without a score last; ties oldest (finished) first, then by
    # job id (jobs finished by one batch's transaction share their finished_at).
    ranked = sorted(
        shown,
        key=lambda s: (s["score"] is None, -(s["score"] or 0.0), s["finished_at"], s["job_id"]),
    )
    expected = [s["job_id"] for s in ranked]
    order = []
    while (item := take(web_server, web_keys["alice"], pipeline, order="score")) is not None:
        order.append(item["job_id"])
        assert decide(web_server, web_keys["alice"], item["job_id"], "allow").status_code == 200
    assert order == expected


def test_history_filters_by_reviewer_decision_pipeline_and_time(
    web_server: ApiServer, web_keys: dict[str, str], web_ctx: OrchestratorContext
) -> None:
    pipeline = review_pipeline(web_ctx.settings)
    jobs = queued_for_review(web_ctx, pipeline, [noise_png() for _ in range(3)])
    before = datetime.now(UTC) - timedelta(seconds=1)
    for name, decision in (("alice", "allow"), ("bob", "block"), ("alice", "block")):
        item = take(web_server, web_keys[name], pipeline)
        assert item is not None
        assert decide(web_server, web_keys[name], item["job_id"], decision).status_code == 200

    def history(**params: str) -> dict[str, Any]:
        response = requests.get(
            web_server.url("/v1/review/history"),
            headers=auth(web_keys["bob"]),
            params={"pipeline": pipeline, **params},
        )
        assert response.status_code == 200, response.text
        return response.json()

    everything = history()
    assert everything["total"] == 3
    assert {i["job_id"] for i in everything["items"]} == set(jobs)
    ats = [i["at"] for i in everything["items"]]
    assert ats == sorted(ats, reverse=True), "newest first"
    assert history(reviewer="alice")["total"] == 2
    assert history(reviewer="alice", decision="block")["total"] == 1
    assert history(since=before.isoformat())["total"] == 3
    assert history(until=before.isoformat())["total"] == 0
    page = history(limit="2", offset="2")
    assert page["total"] == 3 and len(page["items"]) == 1
