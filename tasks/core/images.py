"""Pure image functions: decode (with limits), resize/letterbox, CLAHE on L of LAB, hair removal, colour
constancy, PNG encoding and sample grids. Every stage and app that touches pixels goes through here."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal, Sequence

import cv2
import numpy as np

from tasks.core.config import Preprocess


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



def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 RGB; ValueError if OpenCV cannot decode them."""
    buf = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None:
        raise ValueError(f"cannot decode image ({len(data)} bytes; not an image OpenCV reads, or corrupt)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)



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
    img = decode(image) if isinstance(image, (bytes, bytearray, memoryview)) else as_rgb(np.asarray(image))
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

