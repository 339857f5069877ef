"""A tiny data/preprocess output (PNGs + index.parquet) for the cyclegan and upsample tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from tasks.core.io import Paths, write_index


def lesion(size: int, malignant: bool, rng: np.random.Generator) -> np.ndarray:
    """A skin-coloured square with a brown blob: round and light for benign, ragged and dark for malignant."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = rng.integers(170, 220), rng.integers(120, 160), rng.integers(100, 130)
    c = size // 2 + rng.integers(-2, 3, size=2)
    r = size // 4 + rng.integers(0, 3)
    colour = (60, 30, 20) if malignant else (140, 90, 60)
    if malignant:
        angles = np.linspace(0, 2 * np.pi, 9)[:-1]
        radii = r * rng.uniform(0.5, 1.5, size=8)
        pts = np.stack([c[0] + radii * np.cos(angles), c[1] + radii * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(img, [pts], colour)
    else:
        cv2.circle(img, (int(c[0]), int(c[1])), int(r), colour, -1)
    noise = rng.integers(-6, 7, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


# (split, target) -> count: enough train images of each class for a step, plus val/test rows that must not leak.
LAYOUT = {("train", 0): 6, ("train", 1): 2, ("val", 0): 2, ("val", 1): 1, ("test", 0): 2, ("test", 1): 1}


def make_preprocess(root: Path, size: int = 24, seed: int = 0, layout: dict | None = None) -> pd.DataFrame:
    """Write root/data/preprocess/{images/*.png, index.parquet} and data/augment/index.parquet; return the latter."""
    from tasks.core.images import encode_png

    paths = Paths(root)
    rng = np.random.default_rng(seed)
    rows = []
    n = 0
    for (split, target), count in (layout or LAYOUT).items():
        for _ in range(count):
            isic_id = f"ISIC_{n:07d}"
            rel = f"data/preprocess/images/fx/{isic_id}.png"
            out = root / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(encode_png(lesion(size, bool(target), rng)))
            rows.append({
                "source": "fx", "isic_id": isic_id, "path": f"raw/{isic_id}.jpg", "processed_path": rel,
                "split": split, "target": target, "label": "malignant" if target else "benign",
                "benign_malignant": "malignant" if target else "benign", "diagnosis_1": None,
                # two images per group: grouping must survive upsampling
                "group_id": f"g{n // 2}", "patient_id": f"p{n // 2}", "age_approx": 40 + n, "sex": "female",
                "anatom_site_general": "back", "sha256": f"{n:064x}",
            })
            n += 1
    df = pd.DataFrame(rows)
    write_index(df, paths, "preprocess")
    # augment's output: the same rows plus offline copies of two train images (never GAN sources or domains)
    copies = df.loc[df["split"].eq("train")].iloc[[0, -1]].copy()
    copies["augmented_from"] = copies["source"]
    copies["source"] = "fx~aug1"
    augmented = pd.concat([df.assign(augmented_from=None), copies], ignore_index=True)
    augmented["augmented_from"] = augmented["augmented_from"].astype("string")
    write_index(augmented, paths, "augment")
    return augmented
