"""A job end to end with IMGPIPE_BLOB_URL on S3 (moto_server): the stack passes the
blob URL and IMGPIPE_S3_ENDPOINT_URL to its worker processes through their environment,
the AWS credentials come from the inherited AWS_* variables."""

from __future__ import annotations

import pytest

from db.engine import session_scope
from db.migrate import upgrade
from db.models import Image, Job
from imgpipe.broker import EmbeddedRedis
from imgpipe.face.stack import Stack
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.integration.conftest import make_settings
from tests.support.jobs import wait_jobs
from tests.support.s3server import S3Server
from tests.support.services import own_database

pytestmark = pytest.mark.one_backend("sqlite")


def test_a_basic_job_reads_and_writes_its_blobs_on_s3(
    own_broker: EmbeddedRedis, database_url: str, s3_server: S3Server, samples_dir: object
) -> None:
    bucket = s3_server.new_bucket()
    with own_database(database_url) as db_url:
        upgrade(db_url)
        settings = make_settings(
            own_broker, db_url, blob_url=f"s3://{bucket}/jobs",
            s3_endpoint_url=s3_server.endpoint_url,
        )  # fmt: skip
        data = (samples_dir / "coffee.jpg").read_bytes()  # type: ignore[operator]
        with Stack(settings, workers=("orchestrator", "cpu"), stop_timeout_s=30) as stack:
            stack.wait_ready(120)
            ctx = OrchestratorContext(settings)
            job_id = submit(ctx, SubmitRequest(data=data, pipeline="basic", source="test")).job_id
            assert wait_jobs(db_url, [job_id], 300) == {job_id: "succeeded"}
        with session_scope(db_url) as session:
            job = session.get(Job, job_id)
            assert job is not None and job.image_sha256 is not None
            image = session.get(Image, job.image_sha256)
            assert image is not None
            named = {image.blob_key} | {r.output_blob_key for r in job.stage_runs}
        keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
        assert {f"jobs/{k}" for k in named if k} <= keys, (named, keys)
        assert not (settings.resolved_data_dir / "blobs").exists(), "nothing stored locally"
