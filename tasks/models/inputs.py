"""What a classifier is fed: rows of the index, metadata encoding, processed images and tf.data datasets.

Shared by the train and evaluate stages, the model bundle (tasks/models/bundle.py) and the CycleGAN stages, so
no stage imports another. File-name constants of the model folder live here too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.errors import InputError, RunError
from tasks.core.io import KEY

# The stage whose index train and evaluate read: the last data stage before train. `upsample` passes every
# augment row through (offline copies flagged `augmented_from`) and adds synthetic malignant train images
# flagged `synthetic`. Were that stage dropped from dvc.yaml, this one name becomes "augment" again.
INPUT_STAGE = "upsample"
MODEL_FILE = "classifier.keras"
CONFIG_FILE = "classifier.json"
CONFIG_FORMAT = 1
REQUIRED_COLUMNS = ("source", "isic_id", "processed_path", "split", "target")
SEXES = ("male", "female")


# --------------------------------------------------------------------------- rows
def check_columns(df: pd.DataFrame, source: str, columns: Sequence[str] = REQUIRED_COLUMNS) -> None:
    """Fail early, naming the index file and the missing column(s)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{source}: column(s) {missing} missing; rerun the earlier stages (`dvc repro`)")


def _flag(df: pd.DataFrame, column: str) -> pd.Series:
    """A boolean per row: True where `column` is set (non-null, and truthy for bool columns)."""
    if column not in df.columns:
        return pd.Series(False, index=df.index)
    col = df[column]
    if col.dtype == bool or str(col.dtype) == "boolean":
        return col.fillna(False).astype(bool)
    return col.notna()


def select_rows(index: pd.DataFrame, split: str, *, include_offline_copies: bool = True,
                include_synthetic: bool = True) -> pd.DataFrame:
    """Labelled rows of one split, sorted by key so every run sees them in the same order.

    Offline augmented copies (`augmented_from`) and synthetic images (`synthetic`) only ever count for train:
    val and test are always real, original images.
    """
    rows = index[index["split"] == split]
    rows = rows[rows["target"].notna()]
    derived = _flag(rows, "augmented_from")
    synthetic = _flag(rows, "synthetic")
    if split != "train":
        rows = rows[~derived & ~synthetic]
    else:
        keep = pd.Series(True, index=rows.index)
        if not include_offline_copies:
            keep &= ~derived
        if not include_synthetic:
            keep &= ~synthetic
        rows = rows[keep]
    rows = rows.copy()
    rows["target"] = rows["target"].astype(int)
    return rows.sort_values(["source", "isic_id"], kind="stable").reset_index(drop=True)


def test_rows(index: pd.DataFrame) -> pd.DataFrame:
    """The frozen test split: labelled, original (no offline copies, no synthetic images)."""
    return select_rows(index, "test")


test_rows.__test__ = False  # a library function, not a pytest test


def train_domains(index: pd.DataFrame, source: str = "index") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(benign, malignant) rows of the train split, real images only, sorted by key so file order never matters."""
    missing = [c for c in (*KEY, "split", "target", "processed_path") if c not in index.columns]
    if missing:
        raise InputError(f"{source}: column(s) {missing} missing; rerun `lesionflow stage preprocess`")
    real = index["split"].eq("train")
    if "synthetic" in index.columns:  # never learn from our own output
        real &= ~index["synthetic"].fillna(False).astype(bool)
    if "augmented_from" in index.columns:  # offline copies would overweight some images
        real &= index["augmented_from"].isna()
    train = index.loc[real].sort_values(KEY, kind="mergesort")
    target = pd.to_numeric(train["target"], errors="coerce")
    return train.loc[target.eq(0)].reset_index(drop=True), train.loc[target.eq(1)].reset_index(drop=True)


# --------------------------------------------------------------------------- metadata (dual-input members)
def site_of(df: pd.DataFrame) -> pd.Series:
    """Anatomical site: the current `anatom_site_1`, else the legacy `anatom_site_general`; lower-case."""
    site = pd.Series(pd.NA, index=df.index, dtype="object")
    for col in ("anatom_site_1", "anatom_site_general"):
        if col in df.columns:
            site = site.where(site.notna(), df[col])
    text = site.astype("string").str.strip().str.lower()
    return text.where(text.notna() & (text != "") & (text != "unknown"), "unknown").astype(str)


def metadata_spec(train_df: pd.DataFrame, site_min_count: int = 5) -> dict[str, Any]:
    """The encoding learned from train only: age standardisation and the site vocabulary."""
    age = pd.to_numeric(train_df.get("age_approx", pd.Series(dtype=float)), errors="coerce")
    counts = site_of(train_df).value_counts()
    sites = sorted(s for s, c in counts.items() if c >= site_min_count and s != "unknown")
    return {
        "age_mean": float(age.mean()) if age.notna().any() else 50.0,
        "age_std": float(age.std()) if age.notna().sum() > 1 and age.std() > 0 else 20.0,
        "sexes": list(SEXES),
        "sites": sites,
    }


def metadata_dim(spec: dict[str, Any] | None) -> int:
    return 0 if spec is None else 2 + len(spec["sexes"]) + 1 + len(spec["sites"]) + 2


def encode_metadata(df: pd.DataFrame, spec: dict[str, Any]) -> np.ndarray:
    """float32 (n, d): [age z-score, age missing, sex one-hot + unknown, site one-hot + other + unknown]."""
    n = len(df)
    age = pd.to_numeric(df["age_approx"], errors="coerce").to_numpy(dtype=float) if "age_approx" in df else \
        np.full(n, np.nan)
    age_missing = np.isnan(age)
    age_z = np.where(age_missing, 0.0, (age - spec["age_mean"]) / spec["age_std"])
    sex = df["sex"].astype("string").str.strip().str.lower().fillna("") if "sex" in df else pd.Series([""] * n)
    sex_cols = [(sex == s).to_numpy() for s in spec["sexes"]]
    sex_unknown = ~np.any(sex_cols, axis=0) if sex_cols else np.ones(n, bool)
    site = site_of(df) if n else pd.Series([], dtype=str)
    site_cols = [(site == s).to_numpy() for s in spec["sites"]]
    site_unknown = (site == "unknown").to_numpy()
    site_other = ~site_unknown & ~(np.any(site_cols, axis=0) if site_cols else np.zeros(n, bool))
    cols = [age_z, age_missing, *sex_cols, sex_unknown, *site_cols, site_other, site_unknown]
    return np.stack([np.asarray(c, dtype=np.float32) for c in cols], axis=1).reshape(n, metadata_dim(spec))


# --------------------------------------------------------------------------- processed images
def read_image(path: Path | str, size: int) -> np.ndarray:
    """A processed image as uint8 RGB size x size (resized only if the file is not already that size)."""
    import cv2

    from tasks.core.images import decode

    img = decode(Path(path).read_bytes())
    if img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img


def load_images(files: Sequence[str | Path], size: int) -> np.ndarray:
    """Processed images stacked (n, size, size, 3) uint8."""
    return np.stack([read_image(f, size) for f in files]) if len(files) else np.zeros((0, size, size, 3), np.uint8)


load_val_images = load_images  # the name train and older tests use


def load_config(models_dir: Path | str) -> dict[str, Any]:
    """models/classifier.json, with a clear error when train has not run."""
    path = Path(models_dir) / CONFIG_FILE
    if not path.exists():
        raise RunError(f"{path} not found: run `lesionflow stage train` first")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- tf.data
def make_dataset(files: Sequence[str], targets: np.ndarray, metadata: np.ndarray | None, *, size: int,
                 batch_size: int, training: bool, seed: int = 0,
                 augment: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 cache: str | Path | None = "memory") -> Any:
    """tf.data: parallel PNG decode -> cache (decoded, before augmentation) -> [seeded shuffle, repeat,
    albumentations in tf.numpy_function] -> batch -> prefetch. Yields ({"image"[, "metadata"]}, target)."""
    import tensorflow as tf

    from tasks.models.classifier import IMAGE_INPUT, METADATA_INPUT

    autotune = tf.data.AUTOTUNE
    n = len(files)
    meta = np.zeros((n, 0), np.float32) if metadata is None else np.asarray(metadata, np.float32)
    ds = tf.data.Dataset.from_tensor_slices((list(map(str, files)), np.asarray(targets, np.float32).reshape(-1, 1),
                                             meta))

    def decode(path: Any, y: Any, m: Any) -> tuple[Any, Any, Any]:
        img = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        same = tf.reduce_all(tf.equal(tf.shape(img)[:2], [size, size]))
        img = tf.cond(same, lambda: img,
                      lambda: tf.cast(tf.round(tf.image.resize(img, [size, size], antialias=True)), tf.uint8))
        return tf.ensure_shape(img, [size, size, 3]), y, m

    ds = ds.map(decode, num_parallel_calls=autotune, deterministic=True)
    if cache == "memory":
        ds = ds.cache()
    elif cache:
        ds = ds.cache(str(cache))
    if training:
        ds = ds.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True).repeat()
        if augment is not None:
            def aug(k: Any, elem: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
                img, y, m = elem
                out = tf.numpy_function(augment, [k, img], tf.uint8, stateful=False)
                return tf.ensure_shape(out, [size, size, 3]), y, m

            # enumerate after repeat: k counts every draw of the whole run, so epochs differ but reruns match.
            ds = ds.enumerate().map(aug, num_parallel_calls=autotune, deterministic=True)

    with_meta = metadata is not None

    def to_inputs(img: Any, y: Any, m: Any) -> tuple[dict[str, Any], Any]:
        feeds = {IMAGE_INPUT: tf.cast(img, tf.float32)}
        if with_meta:
            feeds[METADATA_INPUT] = m
        return feeds, y

    ds = ds.map(to_inputs, num_parallel_calls=autotune, deterministic=True)
    return ds.batch(batch_size).prefetch(autotune)
