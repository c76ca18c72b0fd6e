"""The S3 blob store (db/blobs_s3.py) against a real local S3 server (moto_server in its
own process): same keys and guarantees as the local store, clear errors."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from db.blobs import blob_key, blob_store_for, open_blob_store, sha256_bytes
from db.blobs_s3 import S3BlobStore
from imgpipe.errors import ConfigError, TransientError
from imgpipe.settings import Settings
from tests.support.s3server import SECRET_ACCESS_KEY, S3Server


def _store(server: S3Server, prefix: str = "prod/blobs") -> S3BlobStore:
    store = open_blob_store(
        f"s3://{server.new_bucket()}/{prefix}", s3_endpoint_url=server.endpoint_url
    )
    assert isinstance(store, S3BlobStore)
    return store


def test_put_get_exists_delete_under_the_prefix_with_the_local_stores_keys(
    s3_server: S3Server,
) -> None:
    store = _store(s3_server)
    data = b"\xff\xd8 not really a jpeg " * 100
    key = store.put(data, "image/jpeg")
    assert key == blob_key(sha256_bytes(data), "image/jpeg")
    assert store.get(key) == data
    assert store.exists(key)
    assert store.size(key) == len(data)
    listed = s3_server.client().list_objects_v2(Bucket=store.bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"prod/blobs/{key}"]
    head = s3_server.client().head_object(Bucket=store.bucket, Key=f"prod/blobs/{key}")
    assert head["ContentType"] == "image/jpeg"
    assert store.delete(key) == len(data)
    assert not store.exists(key)
    assert store.size(key) == 0
    assert store.delete(key) == 0


def test_writing_the_same_content_twice_writes_one_object_version(s3_server: S3Server) -> None:
    store = _store(s3_server, prefix="")
    s3_server.client().put_bucket_versioning(
        Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    data = b"same bytes"
    first = store.put(data, "image/png")
    assert store.put(data, "image/png") == first
    assert store.put_many([(data, "image/png"), (data, "image/png")]) == [first, first]
    versions = s3_server.client().list_object_versions(Bucket=store.bucket)["Versions"]
    assert [v["Key"] for v in versions] == [first], "a repeated put must not add a version"


def test_put_many_and_start_put_many_store_every_blob_before_wait_returns(
    s3_server: S3Server,
) -> None:
    store = _store(s3_server)
    items = [(bytes([i]) * 500, "image/png") for i in range(40)]
    keys = store.put_many(items)
    assert keys == [blob_key(sha256_bytes(d), m) for d, m in items]
    assert all(store.get(k) == d for k, (d, _m) in zip(keys, items, strict=True))
    more = [(bytes([i]) * 300, "image/webp") for i in range(10)]
    pending = store.start_put_many(more)
    assert pending.keys == [blob_key(sha256_bytes(d), m) for d, m in more]
    pending.wait()
    assert all(store.exists(k) for k in pending.keys)


def test_a_missing_or_altered_object_is_a_transient_error_that_says_what_to_check(
    s3_server: S3Server,
) -> None:
    store = _store(s3_server)
    absent = blob_key(sha256_bytes(b"never stored"), "image/png")
    with pytest.raises(TransientError, match=r"missing from s3://.*IMGPIPE_BLOB_URL"):
        store.get(absent)
    key = store.put(b"original content", "image/png")
    s3_server.client().put_object(Bucket=store.bucket, Key=f"prod/blobs/{key}", Body=b"other")
    with pytest.raises(TransientError, match="does not hash to its key"):
        store.get(key)


def test_a_bucket_that_does_not_exist_is_named_in_the_error(s3_server: S3Server) -> None:
    store = open_blob_store("s3://no-such-bucket-here/x", s3_endpoint_url=s3_server.endpoint_url)
    with pytest.raises(TransientError, match="bucket does not exist: create it"):
        store.put(b"data", "image/png")
    with pytest.raises(ValueError, match="malformed blob key"):
        store.get("sha256/../../etc/passwd")


def test_credentials_never_come_from_the_url_and_are_never_echoed() -> None:
    with pytest.raises(ConfigError, match="must not carry credentials") as info:
        open_blob_store(f"s3://AKIAXXXX:{SECRET_ACCESS_KEY}@bucket/prefix")
    assert SECRET_ACCESS_KEY not in str(info.value)
    with pytest.raises(ConfigError, match="bucket name 'Bad_Bucket' is not valid"):
        open_blob_store("s3://Bad_Bucket/prefix")
    with pytest.raises(ConfigError, match=r"file:///abs/path .* or s3://bucket/prefix"):
        open_blob_store("gs://bucket/prefix")


def test_no_credentials_at_all_is_a_config_error_naming_the_variables(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.path.join(tmp_path, "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", os.path.join(tmp_path, "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup
    store = open_blob_store("s3://some-bucket/p", s3_endpoint_url=s3_server.endpoint_url)
    with pytest.raises(ConfigError, match=r"no AWS credentials .* AWS_SHARED_CREDENTIALS_FILE"):
        store.put(b"data", "image/png")


def test_a_credentials_file_is_enough(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    """AWS_SHARED_CREDENTIALS_FILE is how compose passes a docker secret."""
    bucket = s3_server.new_bucket()
    creds = os.path.join(tmp_path, "aws_credentials")
    env = s3_server.env()
    with open(creds, "w") as f:
        f.write(
            "[default]\n"
            f"aws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
        )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", creds)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = blob_store_for(
        Settings(blob_url=f"s3://{bucket}/k", s3_endpoint_url=s3_server.endpoint_url)
    )
    key = store.put(b"via a credentials file", "image/png")
    assert store.get(key) == b"via a credentials file"


def _child_roundtrip(store: S3BlobStore, key: str, queue: multiprocessing.Queue[str]) -> None:
    try:
        assert store.get(key) == b"from the parent"
        queue.put(store.put(b"from the child", "image/png"))
    except BaseException as exc:
        queue.put(f"error: {exc!r}")


def test_a_forked_child_makes_its_own_client(s3_server: S3Server) -> None:
    """Worker pools fork: a client (and its sockets) inherited from the parent is not
    used by the child."""
    store = _store(s3_server)
    key = store.put(b"from the parent", "image/png")
    parent_client = store.client()
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[str] = ctx.Queue()
    child = ctx.Process(target=_child_roundtrip, args=(store, key, queue))
    child.start()
    answer = queue.get(timeout=60)
    child.join(60)
    assert answer == blob_key(sha256_bytes(b"from the child"), "image/png"), answer
    assert store.get(answer) == b"from the child"
    assert store.client() is parent_client
