"""Writing blobs in batches (db/blobs.py): same keys as one by one, durable on return,
and a failed write reported by ``wait``, never lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.blobs import LocalBlobStore, blob_key, sha256_bytes
from imgpipe.errors import TransientError


def test_put_many_stores_each_blob_once_under_its_content_key(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    items = [(bytes([i]) * 100, "image/png") for i in range(40)] + [(b"\x00" * 100, "image/png")]
    keys = store.put_many(items)
    assert keys == [blob_key(sha256_bytes(data), media) for data, media in items]
    assert keys[0] == keys[-1], "same content, same key"
    assert all(store.get(key) == data for key, (data, _media) in zip(keys, items, strict=True))
    assert not list((tmp_path / "blobs").rglob(".tmp-*")), "no temp file left behind"
    assert store.put(b"\x01" * 100, "image/png") == keys[1]


def test_start_put_many_gives_keys_at_once_and_wait_reports_a_failed_write(
    tmp_path: Path,
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"blob that cannot be written"
    key = blob_key(sha256_bytes(data), "image/png")
    (tmp_path / "blobs" / "sha256").write_bytes(b"a file where the directory should be")
    pending = store.start_put_many([(data, "image/png")])
    assert pending.keys == [key]
    with pytest.raises(TransientError, match="could not write 1 blob"):
        pending.wait()
