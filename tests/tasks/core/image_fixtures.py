"""Image files a decoder must refuse, and valid ones it must decode exactly as before (shared by the images,
neardup, clean and preprocess tests). All deterministic, all tiny."""

from __future__ import annotations

import cv2
import numpy as np

BOMB_SIZE = 633  # bytes on disk
BOMB_SIDE = 20_000  # what its header claims: 400 MP, 1.2 GB as RGB


def photo(w: int = 96, h: int = 72, seed: int = 0) -> np.ndarray:
    """A smooth uint8 BGR image (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2.0)


def valid_jpeg(w: int = 96, h: int = 72, seed: int = 0, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", photo(w, h, seed), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def valid_png(w: int = 96, h: int = 72, seed: int = 0) -> bytes:
    ok, buf = cv2.imencode(".png", photo(w, h, seed))
    assert ok
    return buf.tobytes()


def scan_start(data: bytes) -> int:
    """Offset of the first entropy-coded byte (after the SOS segment)."""
    sos = data.find(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")


def _sof(data: bytes) -> int:
    for m in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        i = data.find(m)
        if i >= 0:
            return i
    raise AssertionError("no SOF marker")


def bomb_jpeg() -> bytes:
    """A 633-byte JPEG whose frame header says 20000x20000: decoding it would allocate ~1.2 GB."""
    ok, buf = cv2.imencode(".jpg", photo(16, 16)[:, :, 0], [cv2.IMWRITE_JPEG_QUALITY, 50])  # greyscale: small
    assert ok
    data = bytearray(buf.tobytes())
    sof = _sof(bytes(data))
    data[sof + 5:sof + 7] = BOMB_SIDE.to_bytes(2, "big")  # height
    data[sof + 7:sof + 9] = BOMB_SIDE.to_bytes(2, "big")  # width
    pad = BOMB_SIZE - len(data) - 4  # a COM segment after SOI brings it to exactly BOMB_SIZE bytes
    assert pad >= 0, len(data)
    com = b"\xff\xfe" + (pad + 2).to_bytes(2, "big") + b"x" * pad
    out = bytes(data[:2]) + com + bytes(data[2:])
    assert len(out) == BOMB_SIZE
    return out


def garbage_scan_jpeg() -> bytes:
    """A valid JPEG with 300 bytes of its scan data overwritten by noise (no 0xFF, so no fake markers) and its
    EOI intact: OpenCV decodes it (garbled) and libjpeg only warns 'Corrupt JPEG data' on stderr."""
    data = bytearray(valid_jpeg(160, 120, seed=3))
    start = scan_start(bytes(data)) + 40
    noise = np.random.default_rng(1).integers(0, 255, 300, dtype=np.uint8).tobytes()  # 0..254
    data[start:start + 300] = noise
    assert data.endswith(b"\xff\xd9")
    return bytes(data)


def truncated_jpeg() -> bytes:
    """A valid JPEG cut in the middle of its scan data (no EOI)."""
    data = valid_jpeg(160, 120, seed=4)
    return data[: (scan_start(data) + len(data)) // 2]
