"""The one albumentations pipeline from params, shared by the augment stage (offline copies) and train (online).

`build_augmenter(cfg, size)` builds a seeded Compose; `augment_copy(aug, image, seed)` draws one augmentation
with its own seed; `copy_seed` makes that seed a function of (seed, source, isic_id, k) only; `augment_fn`
wraps the augmenter as a plain numpy -> numpy function (e.g. for tf.numpy_function).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from tasks.core.config import Augment
from tasks.core.errors import InputError


def _albumentations() -> Any:
    # The package does a blocking HTTPS update check at import unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    return A


def reseed(aug: Any, seed: int) -> Any:
    """Seed a Compose so that every transform draws from its own stream (returns `aug`).

    albumentations 2.0.8 `Compose(seed=s)` gives every child the *same* seed s, so two transforms with the
    same p fire together (hflip and vflip at p=0.5 flip both or neither, never one); children get
    independent seeds spawned from `seed` instead.
    """
    aug.set_random_seed(seed)
    children = np.random.SeedSequence(seed).spawn(len(aug.transforms))
    for t, ss in zip(aug.transforms, children, strict=True):
        t.set_random_seed(int(ss.generate_state(1)[0]))
    return aug


def build_augmenter(cfg: Augment, size: int) -> Any:
    """albumentations.Compose from params, output size x size uint8 RGB, seeded from cfg.seed."""
    if size < 8:
        raise InputError(f"augment output size must be >= 8 px, got {size} (params preprocess.size)")
    import cv2

    A = _albumentations()
    reflect = cv2.BORDER_REFLECT_101  # mirrored skin at the corners, not black wedges the model could learn
    transforms = [
        A.Rotate(limit=(-cfg.rotate_limit, cfg.rotate_limit), border_mode=reflect, p=cfg.rotate_p),
        A.Affine(scale=(1 - cfg.affine_scale, 1 + cfg.affine_scale),
                 translate_percent=(-cfg.affine_translate, cfg.affine_translate),
                 shear=(-cfg.affine_shear, cfg.affine_shear), border_mode=reflect, p=cfg.affine_p),
        A.RandomResizedCrop(size=(size, size), scale=(cfg.crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3), p=1.0),
        A.HorizontalFlip(p=cfg.hflip),
        A.VerticalFlip(p=cfg.vflip),
        A.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue,
                      p=cfg.color_jitter_p),
        # A tuple: a scalar clip_limit is sampled from (1, clip) in albumentations.
        A.CLAHE(clip_limit=(cfg.clahe_clip_limit, cfg.clahe_clip_limit),
                tile_grid_size=(cfg.clahe_tile_grid, cfg.clahe_tile_grid), p=cfg.clahe_p),
        A.CoarseDropout(num_holes_range=(1, cfg.dropout_max_holes),
                        hole_height_range=(cfg.dropout_max_size / 2, cfg.dropout_max_size),
                        hole_width_range=(cfg.dropout_max_size / 2, cfg.dropout_max_size), fill=0,
                        p=cfg.coarse_dropout_p),
    ]
    return reseed(A.Compose(transforms, seed=cfg.seed), cfg.seed)


def augment_fn(cfg: Augment, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """A plain `uint8 RGB -> uint8 RGB (size x size)` function for online use, e.g. in tf.numpy_function."""
    aug = build_augmenter(cfg, size)

    def apply(image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(aug(image=np.ascontiguousarray(image, dtype=np.uint8))["image"])

    return apply


def copy_seed(seed: int, source: str, isic_id: str, k: int) -> int:
    """Seed of one offline copy: a function of (seed, key, k) only, so adding or dropping other images, or the
    worker count, never changes an existing copy."""
    digest = hashlib.sha256(f"{seed}|{source}|{isic_id}|{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def augment_copy(aug: Any, image: np.ndarray, seed: int) -> np.ndarray:
    """One augmentation of `image` drawn with `seed` (re-seeds the augmenter)."""
    return reseed(aug, seed)(image=image)["image"]
