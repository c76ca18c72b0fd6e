"""db.gc: working copies no unfinished job needs are deleted; originals and results stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from db import gc_orphans
from db.blobs import LocalBlobStore
from db.engine import session_scope
from db.gc import collect_working_copies
from db.gc_orphans import TRASH_DIR, collect_orphans
from db.migrate import upgrade
from db.models import Image, Job, StageRun
from imgpipe.contracts import JobStatus, StageStatus
from workers.pixels import encode_npy


@pytest.fixture
def url(tmp_path: Path) -> str:
    database_url = f"sqlite:///{tmp_path / 'gc.sqlite'}"
    upgrade(database_url)
    return database_url


def _image(store: LocalBlobStore, seed: int, *, legacy: bool) -> Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    original = store.put(bytes([seed]) * 100, "image/jpeg")
    working = store.put(encode_npy(pixels), "application/x-npy") if legacy else original
    return Image(
        sha256=f"{seed:064x}", blob_key=original, working_blob_key=working,
        size_bytes=100, format="JPEG", width=60, height=40,
    )  # fmt: skip


def _job(image: Image, status: JobStatus, enhanced: tuple[str, str] | None = None) -> Job:
    job = Job(
        input_sha256=image.sha256, image_sha256=image.sha256, pipeline="qc",
        pipeline_hash="h", status=status,
    )  # fmt: skip
    if enhanced is not None:
        working, viewable = enhanced
        job.stage_runs.append(
            StageRun(
                stage="enhance",
                kind="enhance",
                task_name="t",
                queue="q",
                status=StageStatus.SUCCEEDED,
                output={"working_blob_key": working, "gain": 1},
                output_blob_key=viewable,
            )
        )
    return job


def test_gc_deletes_working_copies_only_finished_jobs_needed(url: str, tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    done = _image(store, 1, legacy=True)
    busy = _image(store, 2, legacy=True)
    modern = _image(store, 3, legacy=False)  # the upload is its own working copy
    enhanced_npy = store.put(encode_npy(np.zeros((40, 60, 3), np.uint8)), "application/x-npy")
    viewable = store.put(b"jpeg of the enhanced pixels", "image/jpeg")
    busy_enhanced = store.put(encode_npy(np.ones((40, 60, 3), np.uint8)), "application/x-npy")
    with session_scope(url) as session:
        session.add_all([done, busy, modern])
        session.flush()
        session.add_all(
            [
                _job(done, JobStatus.SUCCEEDED, (enhanced_npy, viewable)),
                _job(busy, JobStatus.RUNNING, (busy_enhanced, viewable)),
                _job(busy, JobStatus.FAILED),
                _job(modern, JobStatus.SUCCEEDED),
            ]
        )
    keys = {
        "done": done.working_blob_key, "busy": busy.working_blob_key,
        "originals": [done.blob_key, busy.blob_key, modern.blob_key],
    }  # fmt: skip

    dry = collect_working_copies(url, store, dry_run=True)
    assert sorted(dry.keys) == sorted([keys["done"], enhanced_npy])
    assert store.exists(keys["done"])  # a dry run changes nothing

    report = collect_working_copies(url, store)
    assert (report.images, report.stage_outputs, report.blobs_deleted) == (1, 1, 2)
    assert report.bytes_freed > 2 * 40 * 60 * 3
    assert not store.exists(keys["done"]) and not store.exists(enhanced_npy)
    assert store.exists(keys["busy"]) and store.exists(busy_enhanced)  # a job still runs
    assert all(store.exists(k) for k in keys["originals"]) and store.exists(viewable)
    with session_scope(url) as session:
        assert session.get(Image, done.sha256).working_blob_key is None  # type: ignore[union-attr]
        assert session.get(Image, busy.sha256).working_blob_key == keys["busy"]  # type: ignore[union-attr]
        assert session.get(Image, modern.sha256).working_blob_key == modern.blob_key  # type: ignore[union-attr]
        outputs = {r.output["working_blob_key"] for r in session.query(StageRun).all() if r.output}
        assert outputs == {viewable, busy_enhanced}

    again = collect_working_copies(url, store)
    assert (again.images, again.stage_outputs, again.blobs_deleted) == (0, 0, 0)


def test_gc_keeps_a_blob_another_image_still_names(url: str, tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    finished, running = _image(store, 5, legacy=True), _image(store, 6, legacy=False)
    running.working_blob_key = finished.working_blob_key  # same pixels, content-addressed
    with session_scope(url) as session:
        session.add_all([finished, running])
        session.flush()
        session.add_all([_job(finished, JobStatus.SUCCEEDED), _job(running, JobStatus.QUEUED)])
    report = collect_working_copies(url, store)
    assert (report.images, report.blobs_deleted, report.kept_shared) == (1, 0, 1)
    assert store.exists(finished.working_blob_key or "")


def test_next_submit_of_a_collected_image_gets_a_working_copy_again(
    url: str, tmp_path: Path, samples_dir: Path
) -> None:
    from imgpipe.decode import DecodeLimits, decode_image
    from orchestrator.submit_rows import store_image

    store = LocalBlobStore(tmp_path / "blobs")
    data = (samples_dir / "coffee.jpg").read_bytes()
    image = _image(store, 7, legacy=True)
    image.blob_key = store.put(data, "image/jpeg")
    with session_scope(url) as session:
        session.add(image)
        session.flush()
        session.add(_job(image, JobStatus.SUCCEEDED))
    assert collect_working_copies(url, store).images == 1
    with session_scope(url) as session:
        decoded = decode_image(data, DecodeLimits())
        store_image(store, session, data, image.sha256, decoded)
    with session_scope(url) as session:
        row = session.get(Image, image.sha256)
        assert row is not None and row.working_blob_key == row.blob_key


# -- imgpipe gc: blobs no row names, past the retention period ------------------------------

DAY_S = 24 * 3600


def _age(store: LocalBlobStore, key: str, age_s: float) -> None:
    when = time.time() - age_s
    os.utime(store.path_for(key), (when, when))


def test_gc_deletes_only_old_blobs_no_row_or_dead_letter_names(url: str, tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    named = _image(store, 11, legacy=False)
    result = store.put(b"a heat map no one collects", "image/png")
    orphan = store.put(b"x" * 5000, "image/jpeg")  # its transaction rolled back
    parked = store.put(b"dead letter upload", "application/octet-stream")
    young = store.put(b"written a minute ago", "image/jpeg")
    with session_scope(url) as session:
        session.add(named)
        session.flush()
        job = _job(named, JobStatus.SUCCEEDED)
        job.stage_runs.append(
            StageRun(stage="anomaly", kind="anomaly", task_name="t", queue="q",
                     status=StageStatus.SUCCEEDED, output={"heatmap": {"blob_key": result}})
        )  # fmt: skip
        session.add(job)
    for key in (named.blob_key, result, orphan, parked):
        _age(store, key, 8 * DAY_S)
    _age(store, young, 60)

    dry = collect_orphans(url, store, 7 * DAY_S, also_referenced={parked})
    assert (dry.deleted, dry.bytes, dry.keys) == (1, 5000, [orphan])
    assert (dry.referenced, dry.young) == (3, 1)
    assert store.exists(orphan), "dry run is the default and deletes nothing"

    applied = collect_orphans(url, store, 7 * DAY_S, dry_run=False, also_referenced={parked})
    assert (applied.deleted, applied.bytes) == (1, 5000)
    assert not store.exists(orphan)
    assert all(store.exists(k) for k in (named.blob_key, result, parked, young))
    assert not any((store.root / TRASH_DIR).iterdir())


def test_gc_keeps_a_blob_a_concurrent_submission_names_while_it_deletes(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the two-phase delete closes: between gc's scan and its delete, a
    submission of the same bytes re-puts the blob and commits a row naming it."""
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"same bytes submitted again" * 10
    key = store.put(data, "image/jpeg")
    _age(store, key, 8 * DAY_S)
    real = gc_orphans.referenced_keys
    calls = []

    def submit_meanwhile(database_url: str) -> set[str]:
        calls.append(1)
        if len(calls) == 2:  # after the candidates moved to the trash, before the re-check
            assert store.put(data, "image/jpeg") == key
            with session_scope(database_url) as session:
                row = Image(sha256="f" * 64, blob_key=key, working_blob_key=key,
                            size_bytes=len(data), format="JPEG", width=1, height=1)  # fmt: skip
                session.add(row)
        return real(database_url)

    monkeypatch.setattr(gc_orphans, "referenced_keys", submit_meanwhile)
    report = collect_orphans(url, store, 7 * DAY_S, dry_run=False)
    assert (report.deleted, report.restored) == (0, 1)
    assert store.get(key) == data
