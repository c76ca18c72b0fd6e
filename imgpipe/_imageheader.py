"""Byte-level header reading for :mod:`imgpipe.decode`, done before Pillow parses anything.

Format sniffing from magic bytes, the width and height a PNG/GIF/WebP/JPEG header
declares, and a PNG's eXIf chunk. The walks over JPEG markers and PNG chunks are
bounded, and a header built to be slow to parse is rejected. Also holds what
``imgpipe.decode`` and ``imgpipe._convert`` share: :class:`RejectCode`, :func:`reject`
and :data:`DECODER_FAILURES`.
"""

from __future__ import annotations

import struct
import zlib
from enum import StrEnum
from typing import Final

from PIL import Image, TiffImagePlugin

from imgpipe.errors import ImageRejectedError

__all__ = [
    "DECODER_FAILURES",
    "RejectCode",
    "declared_size",
    "pillow_format_name",
    "png_exif_chunk",
    "reject",
    "sniff",
]


class RejectCode(StrEnum):
    """``ImageRejectedError.code`` values produced by ``imgpipe.decode``."""

    EMPTY = "empty"
    TOO_MANY_BYTES = "too_many_bytes"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TOO_MANY_PIXELS = "too_many_pixels"
    DECOMPRESSION_BOMB = "decompression_bomb"
    CORRUPT = "corrupt"
    ANIMATED = "animated"
    BAD_DIMENSIONS = "bad_dimensions"


# Everything Pillow (and zlib/struct under it) raises on hostile data. Deliberately not
# ``Exception``: control-flow exceptions such as Celery's SoftTimeLimitExceeded must pass,
# and MemoryError is re-raised (the limits fit in memory by construction, so running out
# is a worker problem, not a property of the image).
DECODER_FAILURES: Final = (
    OSError,  # includes UnidentifiedImageError, "image file is truncated"
    SyntaxError,  # Pillow's "not a PNG file", "broken PNG file"
    ValueError,
    EOFError,
    LookupError,
    TypeError,
    ArithmeticError,
    AssertionError,
    AttributeError,
    RuntimeError,
    BufferError,
    SystemError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Warning,  # only raised when the process turns warnings into errors
)

_WEBP_CHUNKS: Final = (b"VP8 ", b"VP8L", b"VP8X")
_JPEG_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_PROGRESSIVE_SOF: Final = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Pillow walks JPEG markers and PNG chunks in Python, byte by byte for JPEG fill bytes:
# 50 MB of them is tens of seconds of CPU. Real files need a few dozen steps.
_MAX_JPEG_HEADER_STEPS: Final = 4096  # markers, fill and stray bytes before the first scan
_MAX_JPEG_SCANS: Final = 500  # progressive JPEGs have ~10; each scan costs a pass
_MAX_PNG_CHUNKS: Final = 100_000


def reject(code: RejectCode, message: str) -> ImageRejectedError:
    return ImageRejectedError(code.value, message)


def sniff(prefix: bytes) -> str | None:
    """Format from magic bytes, for the formats ``imgpipe.decode`` can decode."""
    if prefix.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if prefix.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP" and prefix[12:16] in _WEBP_CHUNKS:
        return "WEBP"
    if prefix[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if prefix[:4] in TiffImagePlugin.PREFIXES:
        return "TIFF"
    return None


def pillow_format_name(prefix: bytes) -> str | None:
    """Name another Pillow format by its magic-byte check only (its parser never runs)."""
    Image.init()
    for name, (_factory, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix) is True:
                return name
        except DECODER_FAILURES:
            continue
    return None


def declared_size(fmt: str, data: bytes) -> tuple[int, int] | None:
    """Width and height as the header declares them, read without Pillow."""
    if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if fmt == "GIF" and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return int(width), int(height)
    if fmt == "WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", data[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8X":
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(
                data[27:30], "little"
            ) + 1
        if chunk == b"VP8L" and data[20] == 0x2F:
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if fmt == "JPEG":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the markers up to the first scan; the SOFn frame size, if one came first."""
    pos, size, progressive = 2, None, False
    for _ in range(_MAX_JPEG_HEADER_STEPS):
        if pos + 4 > len(data):
            return size
        marker = data[pos + 1]
        if data[pos] != 0xFF or marker == 0xFF:  # stray byte, or fill byte before a marker
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        elif marker == 0xD9:  # end of image
            return size
        elif marker == 0xDA:  # first scan
            if progressive and _jpeg_scan_count(data, pos) > _MAX_JPEG_SCANS:
                raise _slow_header("JPEG", f"more than {_MAX_JPEG_SCANS} scans")
            return size
        else:
            if marker in _JPEG_SOF and size is None and pos + 9 <= len(data):
                height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
                size = int(width), int(height)
                progressive = marker in _JPEG_PROGRESSIVE_SOF
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    raise _slow_header("JPEG", f"more than {_MAX_JPEG_HEADER_STEPS} markers or padding bytes")


def _jpeg_scan_count(data: bytes, first_scan: int) -> int:
    """SOS markers from the first scan to the end of this image (0xFF is byte-stuffed in
    scan data). Bytes after the EOI, such as a motion photo's video, are not counted."""
    count = data.count(b"\xff\xda", first_scan)
    if count > _MAX_JPEG_SCANS:  # rare: only then pay for finding the end of the image
        end = data.find(b"\xff\xd9", first_scan)
        count = data.count(b"\xff\xda", first_scan, end if end >= 0 else len(data))
    return count


def png_exif_chunk(data: bytes) -> bytes | None:
    """Payload of the first eXIf chunk, wherever it is, by walking chunk headers only."""
    pos, found = 8, None
    for _ in range(_MAX_PNG_CHUNKS):
        if pos + 8 > len(data):
            return found
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"eXIf" and found is None:
            found = data[pos + 8 : pos + 8 + length]
        if kind == b"IEND":
            return found
        pos += 12 + length
    raise _slow_header("PNG", f"more than {_MAX_PNG_CHUNKS} chunks")


def _slow_header(fmt: str, what: str) -> ImageRejectedError:
    return reject(
        RejectCode.DECOMPRESSION_BOMB,
        f"The {fmt} file has {what}, far more than any real image; it would take very "
        "long to parse. Re-save the image with an ordinary encoder and submit again.",
    )
