"""Decoding with limits: header sizes without decoding, the pixel cap before any pixel, damaged JPEGs refused
(libjpeg only warns on stderr), valid images decoded exactly as plain OpenCV does."""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.core import images as I
from tasks.core.config import Preprocess
from tasks.core.errors import InputError
from tests.tasks.core.image_fixtures import (
    BOMB_SIDE,
    BOMB_SIZE,
    bomb_jpeg,
    garbage_scan_jpeg,
    photo,
    truncated_jpeg,
    valid_jpeg,
    valid_png,
)


def plain_opencv(data: bytes) -> np.ndarray:
    """What decode() returned before the checks existed."""
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(I.cv2, "imdecode", refuse)


# --------------------------------------------------------------------------- header sizes
@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".tiff", ".webp"])
def test_probe_size_reads_the_header(ext: str, no_pixel_decoding: None) -> None:
    ok, buf = cv2.imencode(ext, photo(97, 61))
    assert ok
    assert I.probe_size(buf.tobytes()) == (97, 61)


def test_probe_size_of_progressive_jpeg_with_exif_before_the_frame() -> None:
    ok, buf = cv2.imencode(".jpg", photo(50, 40), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    data = buf.tobytes()
    app1 = b"\xff\xe1" + (2 + 30).to_bytes(2, "big") + b"Exif\x00\x00" + b"\x00" * 24
    assert I.probe_size(data[:2] + app1 + data[2:]) == (50, 40)


@pytest.mark.parametrize("data", [b"", b"hello world", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
                                  valid_jpeg()[:60], b"\x89PNG\r\n\x1a\n\x00"])
def test_probe_size_is_none_for_unknown_or_cut_headers(data: bytes) -> None:
    assert I.probe_size(data) is None


# --------------------------------------------------------------------------- rejections
def test_bomb_jpeg_is_too_large_without_decoding(no_pixel_decoding: None) -> None:
    data = bomb_jpeg()
    assert len(data) == BOMB_SIZE and I.probe_size(data) == (BOMB_SIDE, BOMB_SIDE)
    with pytest.raises(I.ImageRejected) as err:
        I.decode(data)
    assert err.value.reason == "too_large" and "20000x20000" in str(err.value)
    with pytest.raises(I.ImageRejected, match="too_large|over the cap"):
        I.process_image(data, Preprocess())


def test_png_header_over_the_cap_is_too_large_without_decoding(no_pixel_decoding: None) -> None:
    data = bytearray(valid_png(8, 8))
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width, height (the CRC no longer matches)
    with pytest.raises(I.ImageRejected) as err:
        I.decode(bytes(data))
    assert err.value.reason == "too_large"


def test_the_cap_is_a_parameter() -> None:
    data = valid_jpeg(100, 50)
    assert I.decode(data, max_pixels=5000).shape == (50, 100, 3)
    with pytest.raises(I.ImageRejected) as err:
        I.decode(data, max_pixels=4999)
    assert err.value.reason == "too_large"


def test_garbage_in_scan_data_is_corrupt_although_opencv_decodes_it() -> None:
    data = garbage_scan_jpeg()
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None  # what used to pass
    with pytest.raises(I.ImageRejected) as err:
        I.decode(data)
    assert err.value.reason == "corrupt" and "Corrupt JPEG data" in str(err.value)


def test_truncated_jpeg_and_png_are_corrupt() -> None:
    for data in (truncated_jpeg(), valid_png()[:-12]):
        with pytest.raises(I.ImageRejected) as err:
            I.decode(data)
        assert err.value.reason == "corrupt" and "truncated" in str(err.value)


def test_unreadable_and_too_small() -> None:
    for data in (b"", b"not an image", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4):
        with pytest.raises(I.ImageRejected) as err:
            I.decode(data)
        assert err.value.reason == "unreadable" and "cannot decode" in str(err.value)
    with pytest.raises(I.ImageRejected) as err:
        I.decode(valid_jpeg(40, 20), min_side=32)
    assert err.value.reason == "too_small"


def test_rejection_is_an_input_error_and_a_value_error_and_pickles() -> None:
    exc = I.ImageRejected("corrupt", "x.jpg: damaged")
    assert isinstance(exc, InputError) and isinstance(exc, ValueError)
    back = pickle.loads(pickle.dumps(exc))
    assert back.reason == "corrupt" and str(back) == "x.jpg: damaged"
    with pytest.raises(ValueError):
        I.ImageRejected("bad-reason", "x")


def test_decode_file_not_a_file(tmp_path: Path) -> None:
    for p in (tmp_path, tmp_path / "missing.jpg"):
        with pytest.raises(I.ImageRejected) as err:
            I.decode_file(p)
        assert err.value.reason == "not_a_file" and str(p) in str(err.value)
    (tmp_path / "bomb.jpg").write_bytes(bomb_jpeg())
    with pytest.raises(I.ImageRejected, match="bomb.jpg"):
        I.decode_file(tmp_path / "bomb.jpg")


# --------------------------------------------------------------------------- valid images: exactly as before
@pytest.mark.parametrize("data", [valid_jpeg(), valid_jpeg(33, 80, seed=2, quality=40), valid_png(),
                                  valid_jpeg() + b"\x00" * 16 + b"trailer"])
def test_valid_images_decode_exactly_as_plain_opencv(data: bytes) -> None:
    out = I.decode(data)
    assert out.dtype == np.uint8 and np.array_equal(out, plain_opencv(data))
    cfg = Preprocess(size=32, hair_removal=True, color_constancy=True)
    assert np.array_equal(I.process_image(data, cfg), I.process_image(plain_opencv(data), cfg))


def test_stderr_is_restored_and_other_output_passes_through(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(I.ImageRejected):
        I.decode(garbage_scan_jpeg())
    I.decode(valid_jpeg())
    os.write(2, b"still stderr\n")
    err = capfd.readouterr().err
    assert "still stderr" in err and "Corrupt JPEG data" not in err


def test_threads_get_their_own_verdicts() -> None:
    """fd 2 is per process: concurrent decodes must not see each other's warnings."""
    good, bad = valid_jpeg(160, 120), garbage_scan_jpeg()

    def verdict(data: bytes) -> str:
        try:
            I.decode(data)
            return "ok"
        except I.ImageRejected as exc:
            return exc.reason

    jobs = [good, bad] * 40
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(verdict, jobs))
    assert got == ["ok", "corrupt"] * 40
