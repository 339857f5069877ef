"""Fixtures for the train/evaluate/predict/tracking tests: a tiny project whose label is learnable.

Benign lesions are small dark discs, malignant ones large irregular two-tone blobs; raw images are written
under data/ingest, processed ones (tasks.preprocess.process_image, params/tiny.yaml: 32 px) under
data/<INPUT_STAGE>/ with the index train reads. Nothing here trains unless a test asks for `lf_trained`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.core.config import Params, load_params

# Keras reads KERAS_HOME once, at import: weight files seeded by tests land in a temp dir, not ~/.keras.
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="lf-keras-"))

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "params" / "tiny.yaml"
SPLITS = {"train": 48, "val": 24, "test": 24}


def make_lesion(rng: np.random.Generator, malignant: bool, h: int = 48, w: int = 64) -> np.ndarray:
    """uint8 RGB skin with one lesion: small and dark (benign) or large, two-tone and eccentric (malignant)."""
    yy, xx = np.mgrid[:h, :w]
    skin = np.array([205, 160, 140]) + rng.normal(0, 6, 3)
    img = np.ones((h, w, 3)) * skin + rng.normal(0, 4, (h, w, 3))
    cy, cx = h / 2 + rng.uniform(-4, 4), w / 2 + rng.uniform(-4, 4)
    r = rng.uniform(12, 17) if malignant else rng.uniform(5, 8)
    ecc = rng.uniform(1.2, 1.6) if malignant else 1.0
    d = ((yy - cy) / r) ** 2 + ((xx - cx) / (r * ecc)) ** 2
    colour = np.array([60, 30, 25]) if not malignant else np.array([40, 20, 60])
    img[d < 1] = colour + rng.normal(0, 5, 3)
    if malignant:
        img[(d < 0.4) & (xx > cx)] = np.array([150, 40, 40])
    return np.clip(img, 0, 255).astype(np.uint8)


def build_tiny_project(root: Path, params: Params, seed: int = 0, splits: dict[str, int] = SPLITS) -> Path:
    """Raw + processed images and data/augment/index.parquet under `root`; returns root."""
    import cv2

    from tasks.core.images import encode_png, process_image
    from tasks.core.io import Paths, write_index
    from tasks.models.inputs import INPUT_STAGE

    paths = Paths(root)
    rng = np.random.default_rng(seed)
    rows = []
    sites = ["back", "leg", "arm", None]
    i = 0
    for split, n in splits.items():
        for j in range(n):
            target = int(j % 5 in (0, 2))  # 40 % malignant in every split
            isic_id = f"ISIC_{i:07d}"
            raw = make_lesion(rng, bool(target))
            raw_rel = f"data/ingest/images/{isic_id}.png"
            (root / raw_rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / raw_rel), cv2.cvtColor(raw, cv2.COLOR_RGB2BGR))
            proc_rel = f"data/{INPUT_STAGE}/images/{isic_id}.png"
            (root / proc_rel).parent.mkdir(parents=True, exist_ok=True)
            (root / proc_rel).write_bytes(encode_png(process_image(raw, params.preprocess)))
            rows.append({"source": "synthetic" if j % 3 else "other", "isic_id": isic_id, "path": raw_rel,
                         "processed_path": proc_rel, "split": split, "target": target,
                         "label": "malignant" if target else "benign",
                         "age_approx": float(30 + 5 * (j % 9)) if j % 7 else np.nan,
                         "sex": ["male", "female", None][j % 3], "anatom_site_1": sites[j % 4],
                         "augmented_from": None, "synthetic": False})
            i += 1
    df = pd.DataFrame(rows)
    df["augmented_from"] = df["augmented_from"].astype("string")
    write_index(df, paths, INPUT_STAGE)
    return root


@pytest.fixture(scope="session")
def lf_tiny_params() -> Params:
    return load_params(TINY)


@pytest.fixture
def lf_tiny_project(tmp_path: Path, lf_tiny_params: Params, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh tiny project (data only); MLflow confined to it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return build_tiny_project(tmp_path / "proj", lf_tiny_params)


@pytest.fixture(scope="session")
def lf_trained(tmp_path_factory: pytest.TempPathFactory, lf_tiny_params: Params) -> Path:
    """A tiny project with models/classifier.keras trained once per session (params/tiny.yaml)."""
    from tasks import train
    from tasks.core.io import Paths

    root = build_tiny_project(tmp_path_factory.mktemp("trained") / "proj", lf_tiny_params)
    train.run(lf_tiny_params, Paths(root))
    return root
