"""Dermoscopy-like synthetic photos and the copies a duplicate detector must catch (shared by the neardup and
dedupe tests)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def lesion_image(seed: int, size: tuple[int, int] = (200, 150), texture_seed: int | None = None) -> np.ndarray:
    """A dermoscopy-like BGR image: skin with blotchy texture, a dark vignette, a textured lesion, hairs.

    `texture_seed` varies only the fine texture, so two images with the same `seed` and different
    texture seeds are look-alikes: same composition and vignette, different photo."""
    w, h = size
    rng = np.random.default_rng(seed)
    trng = np.random.default_rng(seed * 7919 + 1 if texture_seed is None else texture_seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    skin = np.array([150, 170, 225], np.float32) + rng.uniform(-20, 20, 3)
    img = np.ones((h, w, 3), np.float32) * skin
    img += (xx / w - 0.5)[..., None] * rng.uniform(-30, 30)  # illumination gradient
    tex = cv2.GaussianBlur(trng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 3.0)
    img += (tex / (tex.std() + 1e-6) * 10)[..., None]
    cx, cy = w / 2 + rng.uniform(-15, 15), h / 2 + rng.uniform(-10, 10)
    ax, ay, ang = rng.uniform(25, 45), rng.uniform(18, 35), rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)) / ax
    v = (-(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)) / ay
    inside = np.clip(1.2 - np.sqrt(u * u + v * v), 0, 1)[..., None]
    ltex = cv2.GaussianBlur(trng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 2.5)
    lesion = np.array([40, 60, 110], np.float32) + (ltex / (ltex.std() + 1e-6) * 25)[..., None]
    img = img * (1 - inside) + lesion * inside
    r = np.sqrt((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.62 * np.hypot(w, h) / 2)
    img *= np.clip(1.6 - r, 0, 1)[..., None]  # dark dermatoscope vignette in the corners
    out = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(3):
        p = trng.integers(0, [w, h], size=(2, 2))
        cv2.line(out, tuple(int(c) for c in p[0]), tuple(int(c) for c in p[1]), (20, 20, 30), 1)
    return out


def recolour(img: np.ndarray) -> np.ndarray:
    x = img.astype(np.float32) / 255
    x = (x ** 0.8) * np.array([0.9, 1.05, 1.12], np.float32) + np.array([0.03, -0.02, 0.0], np.float32)
    return np.clip(x * 255, 0, 255).astype(np.uint8)


def crop(img: np.ndarray, f: float = 0.02) -> np.ndarray:
    h, w = img.shape[:2]
    return img[int(h * f):h - int(h * f / 2), int(w * f / 2):w - int(w * f)]


def write(path: Path, img: np.ndarray, quality: int = 95) -> Path:
    ok, buf = cv2.imencode(path.suffix, img, [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix == ".jpg" else [])
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def blob_images(n: int, size: int = 32) -> list[np.ndarray]:
    """`n` small RGB skin patches with a dark disc, slightly shifted and noisy (augmentation inputs)."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        img = np.full((size, size, 3), (200, 150, 130), np.uint8)
        cv2.circle(img, (size // 2 + i % 5, size // 2), size // 4, (90, 50, 40), -1)
        out.append(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))
    return out
