"""Content-addressed blob store.

Keys are ``sha256/<hex>`` of the content (plus a fixed suffix naming the media type);
they are never derived from user-supplied names. Writes are atomic: a temp file in the
same directory, fsync, then ``os.replace``. Writing the same content twice is a no-op,
which makes every stage's blob write idempotent.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from imgpipe.errors import ConfigError, TransientError

__all__ = ["BlobStore", "LocalBlobStore", "open_blob_store", "sha256_bytes"]

_SUFFIXES = {
    "application/octet-stream": "",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "application/x-npy": ".npy",
}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """Interface: ``put`` returns the key, ``get`` returns the bytes."""

    def put(self, data: bytes, media_type: str = "application/octet-stream") -> str:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> int:
        """Remove ``key``; returns the bytes freed (0 if it was not there)."""
        raise NotImplementedError


def blob_key(digest: str, media_type: str) -> str:
    try:
        suffix = _SUFFIXES[media_type]
    except KeyError:
        raise ValueError(f"unknown blob media type {media_type!r}") from None
    return f"sha256/{digest[:2]}/{digest}{suffix}"


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "sha256" or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"malformed blob key {key!r}")
        return self.root.joinpath(*parts)

    def put(self, data: bytes, media_type: str = "application/octet-stream") -> str:
        key = blob_key(sha256_bytes(data), media_type)
        path = self.path_for(key)
        if path.exists():
            return key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp_name, path)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise TransientError(f"could not write blob {key} under {self.root}: {exc}") from exc
        return key

    def get(self, key: str) -> bytes:
        path = self.path_for(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise TransientError(
                f"blob {key} is missing from {self.root}; is IMGPIPE_BLOB_URL the same on "
                "every worker?"
            ) from None
        except OSError as exc:
            raise TransientError(f"could not read blob {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self.path_for(key).exists()

    def delete(self, key: str) -> int:
        path = self.path_for(key)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise TransientError(f"could not delete blob {key}: {exc}") from exc
        return size


def open_blob_store(url: str) -> BlobStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalBlobStore(Path(unquote(parsed.path)))
    if parsed.scheme == "" and url:
        return LocalBlobStore(Path(url).expanduser().resolve())
    raise ConfigError(
        f"blob URL {url!r} has scheme {parsed.scheme!r}; this version supports file:///abs/path "
        "(a directory shared by every worker)"
    )
