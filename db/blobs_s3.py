"""The blob store on S3-compatible storage: ``IMGPIPE_BLOB_URL=s3://bucket/prefix``.

Same keys as the local store (``sha256/ab/<hex>.jpg``), under ``prefix/`` in ``bucket``,
through boto3 (the ``s3`` extra; docs/operations.md says why boto3). What the local
store guarantees holds here too:

- **durable before ``put`` returns**: S3 answers a PUT only once the object is stored;
- **writing the same content twice is a no-op**: the PUT is conditional
  (``If-None-Match: *``), so an existing object is neither rewritten nor, in a versioned
  bucket, given a new version; a store that does not implement the condition (HTTP 501)
  gets plain PUTs from then on, which is harmless since the content is the same;
- **content addressed**: ``get`` checks that the bytes hash to the key's sha256, so a
  truncated or swapped object is an error, never wrong pixels.

Endpoint and region come from settings (``IMGPIPE_S3_ENDPOINT_URL``, ``IMGPIPE_S3_REGION``);
credentials only through boto3's own chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_SHARED_CREDENTIALS_FILE`` for a docker
secret, instance or container roles), never from the URL, so no secret is on a command
line or in a printed URL. Each process makes its own client on first use (a client
inherited through ``fork`` would share its parent's sockets).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from db.blobs import BlobStore, PendingPuts, blob_key, sha256_bytes
from imgpipe.errors import ConfigError, TransientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["S3_WRITE_THREADS", "S3BlobStore"]

S3_WRITE_THREADS = 16
"""Concurrent PUTs of one ``put_many`` batch (and the client's connection pool size)."""
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_KEY_RE = re.compile(r"^sha256/([0-9a-f]{2})/(\1[0-9a-f]{62})(\.[a-z]+)?$")
_MISSING = {"404", "NoSuchKey", "NotFound"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3BlobStore(BlobStore):
    """Blobs as objects ``prefix/sha256/ab/<hex><suffix>`` in ``bucket``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        if not _BUCKET_RE.match(bucket):
            raise ConfigError(
                f"S3 bucket name {bucket!r} is not valid (3-63 characters: lower-case letters, "
                "digits, '.' and '-'); set IMGPIPE_BLOB_URL=s3://BUCKET/PREFIX"
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self._lock = threading.Lock()
        self._pid = 0
        self._client: S3Client | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._conditional_put = True

    @property
    def where(self) -> str:
        """``s3://bucket/prefix`` (and the endpoint), for messages: holds no secret."""
        at = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{at}"

    def object_key(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise ValueError(f"malformed blob key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- per-process client and pool ------------------------------------------------

    def client(self) -> S3Client:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = self._make_client()
                self._executor = ThreadPoolExecutor(S3_WRITE_THREADS, thread_name_prefix="s3")
                self._pid = os.getpid()
            return self._client

    def _pool(self) -> ThreadPoolExecutor:
        self.client()
        assert self._executor is not None
        return self._executor

    def _make_client(self) -> S3Client:
        session = boto3.session.Session(region_name=self.region)
        if session.get_credentials() is None:
            raise ConfigError(
                f"no AWS credentials for the blob store {self.where}: set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or AWS_SHARED_CREDENTIALS_FILE (a "
                "credentials file, e.g. a docker secret) in the environment of every imgpipe "
                "process"
            )
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"max_attempts": 4, "mode": "standard"},
            max_pool_connections=S3_WRITE_THREADS,
            # S3-compatible stores (MinIO, Ceph, ...) often reject the checksum headers
            # botocore adds by default since 1.36; ``get`` verifies the sha256 instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
        )
        return session.client("s3", endpoint_url=self.endpoint_url, config=config)

    # -- the BlobStore interface ----------------------------------------------------

    def put(self, data: bytes, media_type: str = "application/octet-stream") -> str:
        key = blob_key(sha256_bytes(data), media_type)
        self._put_object(key, data, media_type)
        return key

    def put_many(self, items: Sequence[tuple[bytes, str]]) -> list[str]:
        pending = self.start_put_many(items)
        pending.wait()
        return pending.keys

    def start_put_many(self, items: Sequence[tuple[bytes, str]]) -> PendingPuts:
        keys = [blob_key(sha256_bytes(data), media_type) for data, media_type in items]
        todo: dict[str, tuple[bytes, str]] = {}
        for key, item in zip(keys, items, strict=True):
            todo.setdefault(key, item)
        pool = self._pool() if todo else None
        futures = (
            [pool.submit(self._put_object, key, data, mt) for key, (data, mt) in todo.items()]
            if pool
            else []
        )
        return PendingPuts(keys, futures, self.where)

    def _put_object(self, key: str, data: bytes, media_type: str) -> None:
        client = self.client()
        name = self.object_key(key)
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        try:
            if self._conditional_put:
                try:
                    client.put_object(
                        Bucket=self.bucket, Key=name, Body=data, ContentType=media_type,
                        ContentMD5=md5, IfNoneMatch="*",
                    )  # fmt: skip
                    return
                except ClientError as exc:
                    code = _code(exc)
                    if code in ("PreconditionFailed", "412"):
                        return  # the same content is already there
                    if code in ("NotImplemented", "501"):
                        self._conditional_put = False
                    elif code not in ("ConditionalRequestConflict", "409"):
                        raise
                    # a concurrent write of the same key, or no conditional writes here:
                    # write it plainly (same bytes, so harmless)
            client.put_object(
                Bucket=self.bucket, Key=name, Body=data, ContentType=media_type, ContentMD5=md5
            )
        except (ClientError, BotoCoreError) as exc:
            raise TransientError(self._explain("write", key, exc)) from exc

    def get(self, key: str) -> bytes:
        name = self.object_key(key)
        try:
            data = self.client().get_object(Bucket=self.bucket, Key=name)["Body"].read()
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise TransientError(
                    f"blob {key} is missing from {self.where}; is IMGPIPE_BLOB_URL (and "
                    "IMGPIPE_S3_ENDPOINT_URL) the same on every worker?"
                ) from None
            raise TransientError(self._explain("read", key, exc)) from exc
        except BotoCoreError as exc:
            raise TransientError(self._explain("read", key, exc)) from exc
        digest = key.split("/")[2].split(".")[0]
        if sha256_bytes(data) != digest:
            raise TransientError(
                f"blob {key} in {self.where} does not hash to its key ({len(data)} bytes read): "
                "the object was truncated or replaced; delete it and resubmit the image"
            )
        return data

    def _head_size(self, key: str) -> int | None:
        """The object's size, or None if it does not exist."""
        try:
            head = self.client().head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise TransientError(self._explain("look up", key, exc)) from exc
        except BotoCoreError as exc:
            raise TransientError(self._explain("look up", key, exc)) from exc
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        return self._head_size(key) is not None

    def size(self, key: str) -> int:
        """Bytes ``key`` holds (0 if it is not there); main's BlobStore has it too."""
        return self._head_size(key) or 0

    def delete(self, key: str) -> int:
        size = self._head_size(key)
        if size is None:
            return 0
        try:
            self.client().delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except (ClientError, BotoCoreError) as exc:
            raise TransientError(self._explain("delete", key, exc)) from exc
        return size

    def _explain(self, verb: str, key: str, exc: Exception) -> str:
        hint = "check that the store is reachable"
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code == "NoSuchBucket":
                hint = "the bucket does not exist: create it (imgpipe does not create buckets)"
            elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                hint = (
                    "the credentials were refused: check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY (or the credentials file) and the bucket policy"
                )
        return f"could not {verb} blob {key} in {self.where}: {exc} ({hint})"
