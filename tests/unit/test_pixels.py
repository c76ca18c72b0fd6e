"""Working copies (workers/pixels.py) and reduced-size decoding (imgpipe/decode.py):
real files in a real LocalBlobStore, real Pillow."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from sqlalchemy.orm import Session

from db.blobs import LocalBlobStore
from imgpipe.decode import DecodeLimits, decode_image, reduction_factor
from imgpipe.errors import ImageRejectedError, PermanentError
from imgpipe.stagekinds import STAGE_KINDS
from workers.pixels import (
    WORKING_COPY_MEDIA_TYPE,
    PixelCache,
    decode_working_copy,
    encode_npy,
    encode_working_copy,
)

LIMITS = DecodeLimits()


def encode(pixels: NDArray[np.uint8], fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **params)
    return buffer.getvalue()


def psnr(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / mse) if mse else float("inf")


@pytest.fixture(scope="module")
def photo(samples_dir: Path) -> bytes:
    return (samples_dir / "photo_1080p.jpg").read_bytes()


@pytest.fixture(scope="module")
def pixels(photo: bytes) -> NDArray[np.uint8]:
    return decode_image(photo, LIMITS).pixels


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


# -- reduced-size decoding ----------------------------------------------------------------


def test_reduction_is_the_largest_whole_factor_keeping_the_longer_side() -> None:
    assert reduction_factor((1920, 1080), None) == 1
    assert reduction_factor((1920, 1080), 640) == 3
    assert reduction_factor((1920, 1080), 1920) == 1
    assert reduction_factor((500, 300), 640) == 1
    assert reduction_factor((9408, 5292), 640) == 14


def test_jpeg_is_draft_decoded_to_between_max_side_and_twice_it(photo: bytes) -> None:
    for side, expected in ((640, (540, 960)), (320, (270, 480)), (100, (68, 120))):
        out = decode_image(photo, LIMITS, max_side_px=side)
        assert out.pixels.shape[:2] == expected
        assert (out.header.width, out.header.height) == (expected[1], expected[0])
        assert side <= max(out.pixels.shape[:2]) < 2 * side


def test_reduced_jpeg_matches_a_downscale_of_the_full_decode(
    photo: bytes, pixels: NDArray[np.uint8]
) -> None:
    reduced = decode_image(photo, LIMITS, max_side_px=640).pixels
    reference = np.asarray(Image.fromarray(pixels).reduce(2))
    assert psnr(reduced, reference) > 35


def test_png_and_webp_are_reduced_by_whole_factors(pixels: NDArray[np.uint8]) -> None:
    for fmt, options in (("PNG", {}), ("WEBP", {"lossless": True})):
        out = decode_image(encode(pixels, fmt, **options), LIMITS, max_side_px=640).pixels
        assert out.shape == (360, 640, 3)
        assert psnr(out, np.asarray(Image.fromarray(pixels).reduce(3))) > 45


def test_exif_rotated_jpeg_is_upright_at_reduced_size(pixels: NDArray[np.uint8]) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = encode(pixels, "JPEG", quality=90, exif=exif.tobytes())
    full = decode_image(data, LIMITS).pixels
    reduced = decode_image(data, LIMITS, max_side_px=640).pixels
    assert full.shape == (1920, 1080, 3)
    assert reduced.shape == (960, 540, 3)
    assert psnr(reduced, np.asarray(Image.fromarray(full).reduce(2))) > 30


def test_max_side_does_not_bypass_the_pixel_budget() -> None:
    """A header declaring too many pixels is refused before any draft decode."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    with pytest.raises(ImageRejectedError) as caught:
        decode_working_copy(bomb, 64, LIMITS)
    assert caught.value.code == "too_many_pixels"
    small = np.zeros((64, 64, 3), np.uint8)
    big_jpeg = encode(np.zeros((1000, 1000, 3), np.uint8), "JPEG")
    with pytest.raises(ImageRejectedError):
        decode_working_copy(big_jpeg, 64, DecodeLimits(max_pixels=500_000))
    assert decode_working_copy(encode(small, "PNG"), 64, LIMITS).shape == (64, 64, 3)


def test_hostile_working_copy_is_rejected_by_the_cache(store: LocalBlobStore) -> None:
    key = store.put(b"\xff\xd8\xff\xe0" + b"\x00" * 64, "image/jpeg")  # truncated JPEG
    with pytest.raises(PermanentError):
        PixelCache(store, 1 << 20).get(key, 320)
    text = store.put(b"%PDF-1.7 not an image", "application/octet-stream")
    with pytest.raises(ImageRejectedError):
        PixelCache(store, 1 << 20).get(text)


# -- encodings ----------------------------------------------------------------------------


def test_derived_images_are_stored_as_jpeg_q95_the_same_bytes_as_the_viewable_copy(
    pixels: NDArray[np.uint8],
) -> None:
    data, media_type = encode_working_copy(pixels)
    assert media_type == WORKING_COPY_MEDIA_TYPE == "image/jpeg"
    assert data == encode(pixels, "JPEG", quality=95)  # the enhance artifact's settings
    assert len(data) < pixels.nbytes / 15
    assert psnr(decode_working_copy(data), pixels) > 42


def test_encode_working_copy_refuses_non_rgb_arrays() -> None:
    with pytest.raises(PermanentError, match="HxWx3"):
        encode_working_copy(np.zeros((4, 4), np.uint8))


def test_legacy_npy_blobs_still_decode_full_and_reduced(pixels: NDArray[np.uint8]) -> None:
    data = encode_npy(pixels)
    assert np.array_equal(decode_working_copy(data), pixels)
    reduced = decode_working_copy(data, 640)
    assert reduced.shape == (360, 640, 3) and not reduced.flags.writeable


# -- the cache ----------------------------------------------------------------------------


def test_cache_is_keyed_by_key_and_side_and_returns_read_only_arrays(
    store: LocalBlobStore, photo: bytes
) -> None:
    key = store.put(photo, "image/jpeg")
    cache = PixelCache(store, 64 << 20)
    full = cache.get(key)
    small = cache.get(key, 640)
    assert full.shape == (1080, 1920, 3) and small.shape == (360, 640, 3)
    assert cache.get(key) is full and cache.get(key, 640) is small
    assert (cache.hits, cache.misses) == (2, 2)
    assert not full.flags.writeable and not small.flags.writeable
    assert cache.cached_bytes == full.nbytes + small.nbytes


def test_reduced_request_without_full_entry_decodes_at_reduced_size(
    store: LocalBlobStore, photo: bytes
) -> None:
    key = store.put(photo, "image/jpeg")
    assert PixelCache(store, 64 << 20).get(key, 640).shape == (540, 960, 3)  # draft


def test_cache_is_bounded_by_bytes_and_evicts_least_recently_used(
    store: LocalBlobStore, pixels: NDArray[np.uint8]
) -> None:
    keys = [
        store.put(encode(np.ascontiguousarray(pixels[:, i:]), "PNG"), "image/png")
        for i in (0, 1, 2)
    ]
    one = pixels.shape[0] * (pixels.shape[1] - 1) * 3
    cache = PixelCache(store, 2 * one + one // 2)
    first = cache.get(keys[0])
    cache.get(keys[1])
    assert cache.get(keys[0]) is first  # refreshes keys[0]
    cache.get(keys[2])  # evicts keys[1], the least recently used
    assert cache.cached_bytes <= cache.max_bytes
    hits = cache.hits
    cache.get(keys[0])
    assert cache.hits == hits + 1
    cache.get(keys[1])
    assert cache.hits == hits + 1  # it was decoded again


def test_an_array_larger_than_the_budget_is_returned_not_kept(
    store: LocalBlobStore, photo: bytes
) -> None:
    key = store.put(photo, "image/jpeg")
    cache = PixelCache(store, 1 << 20)
    assert cache.get(key).shape == (1080, 1920, 3)
    assert cache.cached_bytes == 0
    assert cache.get(key, 320).shape == (270, 480, 3)
    assert cache.cached_bytes == 270 * 480 * 3


# -- stage kinds --------------------------------------------------------------------------


def test_model_stages_ask_for_640_px_and_the_rest_for_full_resolution() -> None:
    assert STAGE_KINDS["quality"].input_side_px({}) is None
    assert STAGE_KINDS["enhance"].input_side_px({}) is None
    assert STAGE_KINDS["detect"].input_side_px({}) == 640
    assert STAGE_KINDS["detect"].input_side_px({"model": "nudenet-yolov8n"}) == 640
    # torchvision detectors resize to 800 px themselves: full resolution
    assert STAGE_KINDS["detect"].input_side_px({"model": "retinanet_resnet50_fpn_v2"}) is None
    assert STAGE_KINDS["moderate"].input_side_px({}) == 640
    assert STAGE_KINDS["anomaly"].input_side_px({"profile": "p.npz"}) == 640


# -- submit -------------------------------------------------------------------------------


def _stored_image(tmp_path: Path, data: bytes) -> tuple[Any, LocalBlobStore]:
    from db.migrate import upgrade
    from db.models import Image as ImageRow
    from orchestrator.submit_rows import store_image

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    from db.engine import session_scope

    store = LocalBlobStore(tmp_path / "blobs")
    decoded = decode_image(data, DecodeLimits(allowed_formats=("JPEG", "PNG", "WEBP", "TIFF")))
    with session_scope(url) as session:
        store_image(store, session, data, "a" * 64, decoded)
    with session_scope(url) as session:
        row = session.get(ImageRow, "a" * 64)
        assert isinstance(session, Session) and row is not None
        session.expunge(row)
    return row, store


def test_submit_reuses_a_jpeg_upload_as_its_working_copy(tmp_path: Path, photo: bytes) -> None:
    row, _ = _stored_image(tmp_path, photo)
    assert row.working_blob_key == row.blob_key
    assert len(list((tmp_path / "blobs").rglob("*.*"))) == 1  # no second blob


def test_submit_stores_a_lossless_png_for_a_tiff_upload(
    tmp_path: Path, pixels: NDArray[np.uint8]
) -> None:
    small = np.ascontiguousarray(pixels[:200, :300])
    row, store = _stored_image(tmp_path, encode(small, "TIFF"))
    assert row.working_blob_key != row.blob_key and row.working_blob_key.endswith(".png")
    assert np.array_equal(decode_working_copy(store.get(row.working_blob_key)), small)
