"""Pure image functions: decode (with limits), resize/letterbox, CLAHE on L of LAB, hair removal, colour
constancy, PNG encoding and sample grids. Every stage and app that touches pixels goes through here."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import cv2
import numpy as np

from tasks.core.config import Preprocess
from tasks.core.errors import InputError


def _interp(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    # INTER_AREA is the alias-free choice when shrinking; it is blocky when enlarging, where cubic is better.
    shrinking = dst_hw[0] * dst_hw[1] < src_hw[0] * src_hw[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC



def fit(img: np.ndarray, size: int, aspect: Literal["pad", "crop"] = "pad") -> np.ndarray:
    """The image content at output scale: long side = size (pad), or the centre square at size x size (crop)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = img.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"empty image of shape {img.shape}")
    if aspect == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = img[top : top + side, left : left + side]
        out_hw = (size, size)
    elif aspect == "pad":
        scale = size / max(h, w)
        out_hw = (max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale))))
    else:
        raise ValueError(f"aspect must be 'pad' or 'crop', got {aspect!r}")
    if img.shape[:2] == out_hw:
        return np.ascontiguousarray(img)
    return cv2.resize(img, (out_hw[1], out_hw[0]), interpolation=_interp(img.shape[:2], out_hw))



def letterbox(img: np.ndarray, size: int, pad_mode: Literal["constant", "edge"] = "constant",
              pad_value: int = 0) -> np.ndarray:
    """Centre `img` (each side <= size) on a size x size canvas filled with a constant or the replicated edge."""
    h, w = img.shape[:2]
    if h > size or w > size:
        raise ValueError(f"image {w}x{h} does not fit a {size}x{size} canvas; call fit() first")
    top, left = (size - h) // 2, (size - w) // 2
    bottom, right = size - h - top, size - w - left
    if not (top or bottom or left or right):
        return img
    if pad_mode == "edge":
        return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_REPLICATE)
    if pad_mode == "constant":
        value = (pad_value,) * (img.shape[2] if img.ndim == 3 else 1)
        return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)
    raise ValueError(f"pad_mode must be 'constant' or 'edge', got {pad_mode!r}")



def resize(img: np.ndarray, size: int, aspect: Literal["pad", "crop"] = "pad",
           pad_mode: Literal["constant", "edge"] = "constant", pad_value: int = 0) -> np.ndarray:
    """Square size x size image: letterboxed (aspect='pad', nothing cut off) or centre-cropped (aspect='crop')."""
    return letterbox(fit(img, size, aspect), size, pad_mode, pad_value)



@lru_cache(maxsize=8)
def _clahe(clip_limit: float, tile_grid: int) -> Any:
    return cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))



def clahe_lab(img: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """CLAHE on the L channel of LAB only, so contrast rises without shifting hue (uint8 RGB in and out)."""
    if clip_limit <= 0 or tile_grid < 1:
        raise ValueError(f"clip_limit must be > 0 and tile_grid >= 1 (got {clip_limit}, {tile_grid})")
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
    l_chan, a_chan, b_chan = cv2.split(lab)
    l_chan = _clahe(float(clip_limit), int(tile_grid)).apply(l_chan)
    return cv2.cvtColor(cv2.merge((l_chan, a_chan, b_chan)), cv2.COLOR_LAB2RGB)



def hair_kernel_for(shape: Sequence[int]) -> int:
    """Auto black-hat kernel: ~1/32 of the long side, odd, >= 3 (hairs are a few px wide at 1024 px)."""
    k = max(3, round(max(shape[:2]) / 32))
    return k if k % 2 else k + 1



def hair_mask(img: np.ndarray, kernel: int = 0, threshold: int = 10) -> np.ndarray:
    """uint8 0/255 mask of thin dark structures (hairs): black-hat of the grey image above a threshold."""
    k = kernel or hair_kernel_for(img.shape)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    # A cross element closes thin lines of any orientation at lower cost than a full square (DullRazor-style).
    blackhat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_CROSS, (k, k)))
    _, mask = cv2.threshold(blackhat, threshold, 255, cv2.THRESH_BINARY)
    # Grow by one px: hair edges are anti-aliased and would otherwise leave a dark halo after inpainting.
    return cv2.dilate(mask, np.ones((3, 3), np.uint8))



def remove_hair(img: np.ndarray, kernel: int = 0, threshold: int = 10, radius: int = 3) -> np.ndarray:
    """Detect hairs (black-hat + threshold) and fill them from their surroundings (cv2.inpaint, Telea)."""
    mask = hair_mask(img, kernel, threshold)
    if not mask.any():
        return img
    return cv2.inpaint(img, mask, radius, cv2.INPAINT_TELEA)



def shades_of_grey(img: np.ndarray, p: float = 6.0) -> np.ndarray:
    """Shades-of-grey colour constancy (Finlayson & Trezzi 2004): equalise the channels' Minkowski p-norms."""
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    x = img.astype(np.float32)
    # Normalise to [0, 1] before the power so p=6 cannot overflow float32 precision on bright pixels.
    illum = np.power(np.mean(np.power(x / 255.0, p), axis=(0, 1)), 1.0 / p)
    illum = illum / max(float(np.linalg.norm(illum)), 1e-12)
    gain = 1.0 / (np.maximum(illum, 1e-6) * np.sqrt(3.0))  # a neutral illuminant (1,1,1)/sqrt(3) gives gain 1
    return np.clip(x * gain.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)



def as_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB from grey, RGB or RGBA uint8 arrays (clear error otherwise)."""
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {img.dtype}")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    if img.ndim == 3 and img.shape[2] == 4:
        return np.ascontiguousarray(img[:, :, :3])
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    raise ValueError(f"expected HxW, HxWx3 or HxWx4, got shape {img.shape}")



# --------------------------------------------------------------------------- decoding, with limits
DEFAULT_MAX_PIXELS = 50_000_000
REJECT_REASONS = ("unreadable", "corrupt", "too_large", "too_small", "not_a_file")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# libjpeg reports damaged scan data only as warnings on stderr and still returns pixels (grey-filled or
# garbled); these message prefixes (jerror.h) mean the pixels are not the photo. Other warnings (an unknown
# JFIF revision, an Adobe transform code) are harmless and passed through to stderr.
_LIBJPEG_CORRUPT = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid SOS parameters",
                    "Inconsistent progression sequence", "Application transferred too many scanlines")
# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG extension) and CC (DAC) share the range but do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}


class ImageRejected(InputError):
    """An image that must not be used; `reason` is one of REJECT_REASONS, the message says why.

    Subclasses InputError and so ValueError: callers that catch ValueError keep working."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; one of {REJECT_REASONS}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across process pools
        return (type(self), (self.reason, str(self)))


def image_format(data: bytes) -> str | None:
    """'jpeg', 'png' or None, from the signature."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG_SIGNATURE:
        return "png"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF segment, walking the marker segments before the first scan."""
    n, p = len(data), 2
    while p + 4 <= n:
        if data[p] != 0xFF:  # extraneous bytes between segments: libjpeg skips them too
            p = data.find(b"\xff", p)
            if p < 0:
                return None
            continue
        marker = data[p + 1]
        if marker == 0xFF:  # fill byte
            p += 1
            continue
        if marker in _JPEG_STANDALONE:
            p += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = int.from_bytes(data[p + 2:p + 4], "big")
        if marker in _JPEG_SOF:
            if p + 9 > n or length < 8:
                return None
            return int.from_bytes(data[p + 7:p + 9], "big"), int.from_bytes(data[p + 5:p + 7], "big")
        if length < 2:
            return None
        p += 2 + length
    return None


def _other_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of BMP, TIFF, WEBP, GIF, ... from Pillow's format plugins, which read only the header.

    This mirrors what `PIL.Image.open` does (try each plugin whose `accept` matches the prefix) without its
    decompression-bomb check, which would raise above ~179 MP before the size could be read; pixels are
    only decoded on `load()`, which is never called here."""
    import io

    from PIL import Image

    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept and not accept(data[:16]):
                continue
            im = factory(io.BytesIO(data), "")
        except Exception:  # noqa: BLE001 - a plugin refusing foreign bytes may raise anything; try the next
            continue
        try:
            w, h = (int(v) for v in im.size)
        finally:
            im.close()
        return w, h
    return None


def probe_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file header, without decoding pixels; None if the format or header is unknown.

    JPEG: the SOF segment; PNG: the IHDR chunk; other formats: Pillow's header parsers (lazy open)."""
    data = bytes(data) if not isinstance(data, bytes) else data
    fmt = image_format(data)
    if fmt == "jpeg":
        return _jpeg_size(data)
    if fmt == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return _other_size(data) if data else None


def truncation(data: bytes) -> str | None:
    """Why `data` is a cut-short JPEG or PNG (None if it is not).

    JPEG: a start-of-scan without an EOI marker after the last one. OpenCV 4.x grey-fills such a file (libjpeg
    only warns), 5.0 returns None, so truncation is detected here, independent of the version. Entropy-coded
    data byte-stuffs 0xFF, so FFD9 cannot occur inside a scan; an EXIF thumbnail's own EOI comes before the
    main SOS; trailing junk after EOI is tolerated. A file with no SOS at all (cut inside the headers) is left
    to the decoder. PNG: no IEND chunk."""
    fmt = image_format(data)
    if fmt == "jpeg":
        # "An SOS after the last EOI" is the same test as "no EOI after the last SOS", but both searches touch
        # only the file's ends (rfind over the whole scan data costs ~2 ns a byte).
        eoi = data.rfind(b"\xff\xd9")
        if data.find(b"\xff\xda", eoi + 2 if eoi >= 0 else 0) >= 0:
            return f"truncated: JPEG without end-of-image marker after its last scan ({len(data)} bytes)"
    elif fmt == "png" and data.rfind(b"IEND") < 0:
        return f"truncated: PNG without IEND chunk ({len(data)} bytes)"
    return None


def check_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header; ImageRejected before any pixel is decoded if the header is unknown
    (unreadable), empty (unreadable) or says more than `max_pixels` (too_large)."""
    size = probe_size(data) if data else None
    if size is None:
        what = "empty file" if not data else f"first bytes {bytes(data[:8]).hex()}"
        raise ImageRejected("unreadable", f"cannot decode image: not a format lesionflow reads (JPEG, PNG, TIFF, "
                                          f"BMP, WEBP, ...) or a damaged header ({what}, {len(data)} bytes)")
    w, h = size
    if w < 1 or h < 1:
        raise ImageRejected("unreadable", f"cannot decode image: its header says {w}x{h} px")
    if w * h > max_pixels:
        raise ImageRejected("too_large", f"image header says {w}x{h} = {w * h:,} px, over the cap of "
                                         f"{max_pixels:,} px (max_pixels); not decoded")
    return w, h


_stderr_lock = threading.Lock()


def _new_stderr_lock() -> None:
    global _stderr_lock
    _stderr_lock = threading.Lock()  # a lock held by another thread at fork time would stay held in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_stderr_lock)


def _imdecode_jpeg(buf: np.ndarray, flags: int) -> tuple[np.ndarray | None, str]:
    """cv2.imdecode with C-level stderr (fd 2) captured, so libjpeg's corruption warnings can be seen.

    fd 2 is per process, hence the lock: threads decoding JPEGs in one process take turns (process pools do
    not contend). Text that is not a libjpeg corruption warning is written back to stderr."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: decode without the check
        return cv2.imdecode(buf, flags), ""
    with _stderr_lock:
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        sink = os.memfd_create("lesionflow-stderr") if hasattr(os, "memfd_create") else None
        tmp = None
        if sink is None:
            tmp = tempfile.TemporaryFile()
            sink = tmp.fileno()
        try:
            os.dup2(sink, 2)
            try:
                img = cv2.imdecode(buf, flags)
            finally:
                os.dup2(saved, 2)
            os.lseek(sink, 0, os.SEEK_SET)
            chunks = []
            while block := os.read(sink, 1 << 16):
                chunks.append(block)
        finally:
            os.close(saved)
            if tmp is not None:
                tmp.close()
            else:
                os.close(sink)
    text = b"".join(chunks).decode("utf-8", "replace")
    corrupt = [ln for ln in text.splitlines() if ln.startswith(_LIBJPEG_CORRUPT)]
    rest = "".join(ln + "\n" for ln in text.splitlines() if ln and not ln.startswith(_LIBJPEG_CORRUPT))
    if rest:
        os.write(2, rest.encode())
    return img, "; ".join(dict.fromkeys(corrupt))


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1,
           apply_orientation: bool = True) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 RGB, checked before and after decoding.

    Raises ImageRejected: a header over `max_pixels` -> too_large (before any pixel is decoded); a truncated
    JPEG/PNG or libjpeg's "Corrupt JPEG data" / "Premature end of JPEG file" -> corrupt; anything OpenCV cannot
    decode -> unreadable; a shorter side below `min_side` -> too_small. Valid images decode exactly as
    `cv2.imdecode(IMREAD_COLOR)` (EXIF orientation applied unless `apply_orientation=False`) converted to RGB.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    w, h = check_size(data, max_pixels)
    cut = truncation(data)
    if cut:
        raise ImageRejected("corrupt", cut)
    buf = np.frombuffer(data, dtype=np.uint8)
    flags = cv2.IMREAD_COLOR if apply_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        if image_format(data) == "jpeg":
            bgr, warnings = _imdecode_jpeg(buf, flags)
        else:
            bgr, warnings = cv2.imdecode(buf, flags), ""
    except cv2.error as exc:  # some damaged headers raise instead of returning None
        raise ImageRejected("unreadable", f"cannot decode image: OpenCV fails on this {w}x{h} image: "
                                          f"{getattr(exc, 'msg', exc)}") from None
    if warnings:
        raise ImageRejected("corrupt", f"damaged JPEG scan data ({warnings})")
    if bgr is None or bgr.size == 0:
        raise ImageRejected("unreadable", f"cannot decode image ({len(data)} bytes, header {w}x{h}): not an "
                                          "image OpenCV reads, or corrupt")
    if min(bgr.shape[:2]) < min_side:
        raise ImageRejected("too_small", f"{bgr.shape[1]}x{bgr.shape[0]} px: shorter side < min_side {min_side}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_file(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_side: int = 1) -> np.ndarray:
    """Read and decode one image file; a missing path or a folder is ImageRejected('not_a_file')."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        what = "a folder" if os.path.isdir(p) else "missing"
        raise ImageRejected("not_a_file", f"{p}: {what}, not an image file")
    try:
        with open(p, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageRejected("unreadable", f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        return decode(data, max_pixels=max_pixels, min_side=min_side)
    except ImageRejected as exc:
        raise ImageRejected(exc.reason, f"{p}: {exc}") from None



def png_params(compression: int = 1) -> list[int]:
    """imencode flags: SUB filter always; RLE strategy at level <= 1 (OpenCV's own fast default: ~1.6x faster
    than zlib's default strategy at level 1, files ~5% bigger); zlib's default strategy above, so a higher
    level really buys smaller files."""
    flags = [cv2.IMWRITE_PNG_COMPRESSION, int(compression), cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
    if compression <= 1:
        flags += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    return flags



def encode_png(img: np.ndarray, compression: int = 1) -> bytes:
    """uint8 RGB -> PNG bytes (lossless; same pixels + same level give the same bytes)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), png_params(compression))
    if not ok:
        raise ValueError(f"PNG encoding failed for an image of shape {img.shape}")
    return buf.tobytes()



def process_image(image: bytes | np.ndarray, cfg: Preprocess) -> np.ndarray:
    """Encoded bytes or an RGB array -> the processed size x size uint8 RGB image.

    Order: fit to size -> colour constancy -> hair removal -> CLAHE -> letterbox. Everything runs at output
    scale so cost per image is bounded whatever the input resolution; the pad comes last so the border never
    enters the colour estimate, the hair detector or the CLAHE histograms.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        img = decode(bytes(image), max_pixels=cfg.max_pixels)
    else:
        img = as_rgb(np.asarray(image))
    img = fit(img, cfg.size, cfg.aspect)
    if cfg.color_constancy:
        img = shades_of_grey(img, cfg.cc_power)
    if cfg.hair_removal:
        img = remove_hair(img, cfg.hair_kernel or hair_kernel_for((cfg.size, cfg.size)), cfg.hair_threshold)
    if cfg.clahe:
        img = clahe_lab(img, cfg.clip_limit, cfg.tile_grid)
    return letterbox(img, cfg.size, cfg.pad_mode, cfg.pad_value)



def sample_grid(columns: Sequence[Sequence[np.ndarray]], size: int, labels: Sequence[str] = ()) -> np.ndarray:
    """Tile rows of equal-size RGB tiles into one image (rows = columns[i][row]); labels on the first column."""
    rows = max(len(c) for c in columns)
    gap = 2
    grid = np.full((rows * (size + gap) + gap, len(columns) * (size + gap) + gap, 3), 255, np.uint8)
    for ci, col in enumerate(columns):
        for ri, tile in enumerate(col):
            y, x = gap + ri * (size + gap), gap + ci * (size + gap)
            grid[y : y + size, x : x + size] = cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA)
    for ri, text in enumerate(labels):
        y = gap + ri * (size + gap) + 14
        cv2.putText(grid, text, (gap + 3, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(grid, text, (gap + 3, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return grid



def dihedral(images: np.ndarray, k: int | np.ndarray) -> np.ndarray:
    """Apply one of the 8 flips/90-degree turns (k in 0..7) to an HxWxC image, or per image of an NxHxWxC batch."""
    if images.ndim == 3:
        out = np.rot90(images, int(k) % 4, axes=(0, 1))
        return np.ascontiguousarray(out[:, ::-1] if int(k) >= 4 else out)
    ks = np.broadcast_to(np.asarray(k), (len(images),))
    return np.stack([dihedral(img, kk) for img, kk in zip(images, ks)]) if len(images) else images.copy()


def titled_grid(columns: list[list[np.ndarray]], tile: int, titles: tuple[str, ...],
                row_labels: list[str]) -> np.ndarray:
    """sample_grid plus a header row naming the columns."""
    grid = sample_grid(columns, tile, labels=row_labels)
    header = np.full((18, grid.shape[1], 3), 255, np.uint8)
    for ci, text in enumerate(titles):
        cv2.putText(header, text, (2 + ci * (tile + 2) + 3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return np.concatenate([header, grid])
