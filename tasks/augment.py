"""augment stage: one seeded albumentations pipeline from params, used online (train) and offline (K copies).

Online: `augment_fn(cfg, size)` is a plain numpy -> numpy function for `tf.numpy_function`.
Offline: `run()` writes `offline_copies` augmented copies of every TRAIN image (never val/test) and an index
that passes every input row through plus one row per copy (source "<source>+aug<k>", same isic_id,
`augmented_from` = the original source, `aug_copy` = k).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from tasks.core.config import Augment, Params
from tasks.core.images import decode, encode_png, sample_grid
from tasks.core.io import (
    KEY,
    Paths,
    image_relpath,
    prune_outputs,
    read_index,
    write_bytes,
    write_file_atomic,
    write_index,
    write_json,
    write_table,
)
from tasks.core.parallel import parallel_map

STAGE = "augment"
SAMPLE_AUGMENTATIONS = 8


def _albumentations() -> Any:
    # The package does a blocking HTTPS update check at import unless told not to (ENV-NOTES trap 9).
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
    for t, ss in zip(aug.transforms, children):
        t.set_random_seed(int(ss.generate_state(1)[0]))
    return aug


def build_augmenter(cfg: Augment, size: int) -> Any:
    """albumentations.Compose from params, output size x size uint8 RGB, seeded from cfg.seed."""
    if size < 8:
        raise ValueError(f"augment output size must be >= 8 px, got {size}")
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
        # A tuple: a scalar clip_limit is sampled from (1, clip) in albumentations (ENV-NOTES trap 8).
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


def aug_source(source: str, k: int) -> str:
    """The source name of the k-th offline copy; (aug_source, isic_id) is its unique key."""
    return f"{source}+aug{k}"


# --------------------------------------------------------------------------- one image, as a worker runs it


def _setup(cfg: Augment, size: int) -> Any:
    return build_augmenter(cfg, size)


def _copies_one(aug: Any, job: tuple[str, list[tuple[int, int, str]], int]) -> list[tuple[int, str | None]]:
    """Write every copy of one image; [(bytes, error or None)] per copy, never raises."""
    src, copies, compression = job
    try:
        image = decode(Path(src).read_bytes())
    except Exception as exc:  # noqa: BLE001 - reported in failed.csv
        return [(0, f"{type(exc).__name__}: {exc}")] * len(copies)
    out = []
    for _k, seed, dst in copies:
        try:
            png = encode_png(augment_copy(aug, image, seed), compression)
            write_file_atomic(dst, png)
            out.append((len(png), None))
        except Exception as exc:  # noqa: BLE001
            out.append((0, f"{type(exc).__name__}: {exc}"))
    return out


# --------------------------------------------------------------------------- the stage


def run(params: Params, paths: Paths) -> dict:
    """Index pass-through + K augmented copies of each train image; always a sample grid and metrics."""
    cfg, size = params.augment, params.preprocess.size
    t0 = time.perf_counter()
    df = read_index(paths, "preprocess")
    for col in (*KEY, "processed_path", "split"):
        if col not in df.columns:
            raise ValueError(f"{paths.index('preprocess')}: column {col!r} missing; rerun the earlier stages")

    out_dir = paths.stage(STAGE)
    train = df[df["split"] == "train"]
    n_k = cfg.offline_copies
    # Copy rows repeat their train row (dtypes kept), then get their own key, image path and provenance.
    copies_df = train.loc[train.index.repeat(n_k)].reset_index(drop=True)
    ks = np.tile(np.arange(n_k), len(train))
    copies_df["augmented_from"] = copies_df["source"].astype("string")
    copies_df["aug_copy"] = pd.array(ks, dtype="Int64")
    copies_df["source"] = [aug_source(s, int(k)) for s, k in zip(copies_df["augmented_from"], ks)]
    keys = list(zip(copies_df["augmented_from"], copies_df["isic_id"], ks))
    copies_df["processed_path"] = [image_relpath(STAGE, aug_source(s, int(k)), i) for s, i, k in keys]
    seeds = [copy_seed(cfg.seed, s, i, int(k)) for s, i, k in keys]
    dsts = [str(paths.abs(p)) for p in copies_df["processed_path"]]
    for folder in {os.path.dirname(d) for d in dsts}:
        os.makedirs(folder, exist_ok=True)
    jobs = [
        (str(paths.abs(src)), [(k, seeds[j * n_k + k], dsts[j * n_k + k]) for k in range(n_k)],
         params.preprocess.png_compression)
        for j, src in enumerate(train["processed_path"])
    ] if n_k else []

    results = parallel_map(_copies_one, jobs, cfg.workers, setup=_setup, setup_args=(cfg, size), desc=STAGE)
    errors = [e for per_image in results for _, e in per_image]
    ok = np.array([e is None for e in errors], dtype=bool)

    failed = copies_df.loc[~ok, [*KEY, "augmented_from", "processed_path"]].assign(
        error=[e for e in errors if e is not None])
    write_table(failed, out_dir / "failed.csv")
    originals = df.assign(augmented_from=pd.Series(pd.NA, index=df.index, dtype="string"),
                          aug_copy=pd.Series(pd.NA, index=df.index, dtype="Int64"))
    kept = copies_df.loc[ok]
    index = pd.concat([originals, kept], ignore_index=True) if len(kept) else originals
    prune_outputs(out_dir / "images", {str(paths.abs(p)) for p in kept["processed_path"]})
    write_index(index, paths, STAGE)

    report_dir = paths.reports / STAGE
    grid = _samples(df, paths, cfg, size)
    if grid is not None:
        write_bytes(report_dir / "samples.png", encode_png(grid))
    seconds = time.perf_counter() - t0
    metrics = {
        "rows_in": int(len(df)),
        "train_images": int(len(train)),
        "offline_copies": cfg.offline_copies,
        "copies_written": int(ok.sum()),
        "failed": int((~ok).sum()),
        "rows_out": int(len(index)),
        "seconds": round(seconds, 3),
        "config": cfg.model_dump(mode="json"),
    }
    write_json(report_dir / "metrics.json", metrics)
    return {k: metrics[k] for k in ("rows_in", "train_images", "copies_written", "failed", "rows_out", "seconds")}


def _samples(df: pd.DataFrame, paths: Paths, cfg: Augment, size: int) -> np.ndarray | None:
    """The first readable train image (else any) and SAMPLE_AUGMENTATIONS seeded augmentations of it."""
    ordered = df.sort_values("split", key=lambda s: s != "train", kind="stable")
    aug = build_augmenter(cfg, size)
    for rel in ordered["processed_path"].head(20):
        try:
            image = decode(paths.abs(rel).read_bytes())
        except (OSError, ValueError):
            continue
        tiles = [image] + [augment_copy(aug, image, cfg.seed + i) for i in range(SAMPLE_AUGMENTATIONS)]
        # 3x3: the input top-left, then the 8 augmentations.
        return sample_grid([tiles[c::3] for c in range(3)], size, labels=["input"])
    return None
