"""train stage: ensemble of Keras classifiers on the processed images, stacked on val, with an operating point.

Pure helpers first (row selection, metadata encoding, class weights, stacking), then the tf.data input
pipeline and the runtime setup (determinism on CPU; mixed precision / MirroredStrategy on GPU), then the
per-member two-phase fit, and last the thin `run()` that writes

- models/classifier.keras   one Keras model: members -> logistic-regression stacker -> probability
- models/classifier.json    everything needed to use it: preprocessing config, image size, metadata
                            encoding, TTA, operating point (threshold for the target sensitivity on val)
- reports/train/history.csv per-epoch loss/AUC of every member and phase (DVC plots)
- reports/train/metrics.json val metrics (deterministic: a rerun on CPU gives the same bytes)
- reports/train/timing.json  wall-clock numbers (kept out of metrics.json because they never repeat)

TensorFlow is imported only inside functions: TF_ENABLE_ONEDNN_OPTS=0 must be in the environment before the
first import for bit-identical CPU reruns, and `run()` sets it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from tasks.core.config import Member, Params, Train
from tasks.core.io import Paths, atomic_path, read_index, write_json, write_table

STAGE = "train"
# The stage whose index train (and evaluate) read: the last data stage before train. `upsample` passes every
# augment row through (offline copies flagged `augmented_from`) and adds synthetic malignant train images
# flagged `synthetic`. Were that stage dropped from dvc.yaml, this one name becomes "augment" again.
INPUT_STAGE = "upsample"
MODEL_FILE = "classifier.keras"
CONFIG_FILE = "classifier.json"
CONFIG_FORMAT = 1
REQUIRED_COLUMNS = ("source", "isic_id", "processed_path", "split", "target")
SEXES = ("male", "female")
EPS = 1e-7


def log(msg: str) -> None:
    """Progress lines go to stderr: stdout carries the stage's JSON summary."""
    print(f"[train] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- rows
def check_columns(df: pd.DataFrame, source: str, columns: Sequence[str] = REQUIRED_COLUMNS) -> None:
    """Fail early, naming the index file and the missing column(s)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: column(s) {missing} missing; rerun the earlier stages (`dvc repro`)")


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


def cap_stratified(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most n rows, class shares kept, at least one row per class (seeded)."""
    if len(df) <= n:
        return df
    rng = np.random.default_rng(seed)
    parts = []
    for target, group in df.groupby("target", sort=True):
        k = max(1, round(n * len(group) / len(df)))
        parts.append(group.iloc[np.sort(rng.choice(len(group), size=min(k, len(group)), replace=False))])
    return pd.concat(parts).sort_values(["source", "isic_id"], kind="stable").reset_index(drop=True)


def class_weights(targets: np.ndarray) -> dict[int, float]:
    """Balanced weights n / (2 n_c): each class contributes equally to the loss."""
    targets = np.asarray(targets).astype(int)
    n = len(targets)
    counts = np.bincount(targets, minlength=2)
    return {c: float(n / (2 * counts[c])) if counts[c] else 1.0 for c in (0, 1)}


def require_both_classes(df: pd.DataFrame, split: str, index_path: Path) -> None:
    counts = df["target"].value_counts().to_dict()
    if len(df) == 0 or counts.get(0, 0) == 0 or counts.get(1, 0) == 0:
        raise ValueError(f"{index_path}: split {split!r} needs benign and malignant images, has {counts or 'none'} "
                         f"(more data, or other split fractions)")


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


# --------------------------------------------------------------------------- stacking and operating point
def as_arrays(probabilities: Sequence[float], targets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (float64) and 0/1 targets as flat arrays of equal length, no NaN."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    y = np.asarray(targets).astype(int).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{len(p)} probabilities for {len(y)} targets")
    if np.isnan(p).any():
        raise ValueError("probabilities contain NaN (drop the rows that failed to load first)")
    return p, y


def threshold_for_sensitivity(probabilities: Sequence[float], targets: Sequence[int], target: float = 0.90) -> float:
    """The largest threshold t such that predicting malignant for p >= t reaches `target` sensitivity."""
    p, y = as_arrays(probabilities, targets)
    pos = np.sort(p[y == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no malignant cases: the operating point needs at least one")
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    return float(pos[k - 1])


def binary_metrics(probabilities: Sequence[float], targets: Sequence[int], threshold: float) -> dict[str, Any]:
    """Confusion counts and rates when `p >= threshold` means malignant (None where undefined)."""
    p, y = as_arrays(probabilities, targets)
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    sens, spec, prec = ratio(tp, tp + fn), ratio(tn, tn + fp), ratio(tp, tp + fp)
    f1 = 2 * prec * sens / (prec + sens) if prec and sens else (0.0 if prec is not None and sens is not None else None)
    bal = (sens + spec) / 2 if sens is not None and spec is not None else None
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "sensitivity": sens,
            "specificity": spec, "precision": prec, "f1": f1, "balanced_accuracy": bal}


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def fit_stacker(member_logits: np.ndarray, targets: np.ndarray, mode: str = "stack") -> tuple[list[float], float]:
    """Weights and bias of the linear stacker on member logits: a logistic regression fitted on val ("stack";
    with one member this is Platt calibration), or the plain mean of logits ("mean")."""
    member_logits = np.asarray(member_logits, dtype=np.float64)
    k = member_logits.shape[1]
    if mode == "mean":
        return [1.0 / k] * k, 0.0
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0, max_iter=1000)
    lr.fit(member_logits, np.asarray(targets).astype(int))
    return [float(c) for c in lr.coef_[0]], float(lr.intercept_[0])


def round_floats(obj: Any, digits: int = 6) -> Any:
    """Floats in nested dicts/lists rounded, so reports read well and diff cleanly."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [round_floats(v, digits) for v in obj]
    return obj


# --------------------------------------------------------------------------- images
def read_image(path: Path | str, size: int) -> np.ndarray:
    """A processed image as uint8 RGB size x size (resized only if the file is not already that size)."""
    import cv2

    from tasks.core.images import decode

    img = decode(Path(path).read_bytes())
    if img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img


def flips(images: np.ndarray, tta: int) -> list[np.ndarray]:
    """The TTA views: identity, then horizontal, vertical and both flips (first max(1, tta))."""
    views = [images, images[:, :, ::-1], images[:, ::-1, :], images[:, ::-1, ::-1]]
    return views[: max(1, tta)]


def predict_proba(model: Any, images: np.ndarray, metadata: np.ndarray | None = None, *, tta: int = 0,
                  batch_size: int = 64) -> np.ndarray:
    """Malignant probability per image (float64), averaged over the TTA flips."""
    from tasks.models.classifier import IMAGE_INPUT, METADATA_INPUT, input_names

    if len(images) == 0:
        return np.zeros(0)
    names = input_names(model)
    if METADATA_INPUT in names and metadata is None:
        raise ValueError("this model takes metadata (age, sex, site); none given")
    n = len(images)
    out = np.zeros(n)
    views = flips(images, tta)
    for view in views:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            # Every batch padded to batch_size: one input shape, so the predict function is traced once.
            feeds = {IMAGE_INPUT: _pad(np.asarray(view[start:stop], dtype=np.float32), batch_size)}
            if METADATA_INPUT in names:
                feeds[METADATA_INPUT] = _pad(np.asarray(metadata[start:stop], dtype=np.float32), batch_size)
            out[start:stop] += np.asarray(model.predict_on_batch(feeds)).reshape(-1)[: stop - start]
    return out / len(views)


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) == n:
        return np.ascontiguousarray(x)
    return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)])


# --------------------------------------------------------------------------- tf.data
def _aug_seed(base: int, k: int) -> int:
    return int(np.random.SeedSequence([base, k]).generate_state(1)[0])


def make_augment(augment_cfg: Any, size: int, base_seed: int,
                 factory: Callable[[Any, int], Any] | None = None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """numpy fn (k, image) -> augmented image; the draw depends only on (base_seed, k), never on which
    tf.data thread runs it or in what order, so parallel augmentation stays deterministic."""
    from tasks.augment import augment_copy, build_augmenter

    factory = factory or build_augmenter
    local = threading.local()  # one augmenter per tf.data thread: albumentations objects hold RNG state

    def apply(k: np.ndarray, image: np.ndarray) -> np.ndarray:
        aug = getattr(local, "aug", None)
        if aug is None:
            aug = local.aug = factory(augment_cfg, size)
        out = augment_copy(aug, np.ascontiguousarray(image), _aug_seed(base_seed, int(k)))
        return np.ascontiguousarray(out, dtype=np.uint8)

    return apply


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


# --------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    strategy: Any
    gpus: int
    mixed_precision: bool
    deterministic: bool


def configure_runtime(cfg: Train) -> Runtime:
    """Determinism on CPU; on GPU mixed precision, and MirroredStrategy when there are several GPUs."""
    if cfg.deterministic:
        if "tensorflow" in sys.modules and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0":
            log("warning: TensorFlow was imported before TF_ENABLE_ONEDNN_OPTS=0 was set; oneDNN may make "
                "CPU reruns differ in the last bits (run through `lesionflow stage train`)")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if cfg.threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(cfg.threads)
            tf.config.threading.set_inter_op_parallelism_threads(cfg.threads)
        except RuntimeError:
            log("note: TF already initialised in this process; train.threads not applied")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy("mixed_float16" if gpus else "float32")  # fp16 is 2.4x slower on CPU
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    return Runtime(strategy=strategy, gpus=len(gpus), mixed_precision=bool(gpus), deterministic=cfg.deterministic)


# --------------------------------------------------------------------------- one member
@dataclass
class Data:
    """Everything a member fit needs, built once per run."""

    train_files: list[str]
    train_y: np.ndarray
    train_meta: np.ndarray | None
    val_files: list[str]
    val_y: np.ndarray
    val_meta: np.ndarray | None
    val_images: np.ndarray
    size: int
    cache_dir: Path


def _compile(model: Any, cfg: Train, lr: float) -> None:
    import keras

    if cfg.loss == "focal":
        loss = keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=cfg.focal_alpha,
                                                    gamma=cfg.focal_gamma, label_smoothing=cfg.label_smoothing)
    else:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing)
    opt = (keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay) if cfg.weight_decay
           else keras.optimizers.Adam(lr))
    model.compile(optimizer=opt, loss=loss, metrics=[keras.metrics.AUC(name="auc")])


class _EpochLog:
    """Factory of a Keras callback that logs one line per epoch to stderr."""

    @staticmethod
    def make(member: str, phase: int) -> Any:
        import keras

        def on_epoch_end(epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            log(f"{member} phase {phase} epoch {epoch + 1}: " + " ".join(
                f"{k}={float(v):.4f}" for k, v in sorted(logs.items())))

        return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def train_member(spec: Member, cfg: Train, data: Data, *, augment_cfg: Any, meta_dim: int, runtime: Runtime,
                 augmenter_factory: Callable[[Any, int], Any] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """Build and fit one member: phase 1 (backbone frozen; small_cnn trains whole), phase 2 (top layers of the
    backbone at the fine-tune rate). Keeps the best val-AUC weights over both phases."""
    import keras

    from tasks.models.classifier import build_member, freeze_backbone

    seed = cfg.seed + spec.seed
    keras.utils.set_random_seed(seed)
    with runtime.strategy.scope():
        model = build_member(spec.arch, data.size, input_size=spec.input_size, weights=spec.weights,
                             alpha=spec.alpha, dropout=cfg.dropout, metadata_dim=meta_dim if spec.metadata else 0,
                             name=spec.name, seed=seed, download=cfg.download_weights)
    transfer = spec.arch != "small_cnn"
    batch = cfg.batch_size * runtime.strategy.num_replicas_in_sync
    steps = max(1, math.ceil(len(data.train_files) / batch))
    augment = (make_augment(augment_cfg, data.size, seed, augmenter_factory) if cfg.online_augment else None)

    def datasets(phase: int) -> tuple[Any, Any]:
        def cache(part: str) -> str | Path | None:
            if cfg.cache == "disk":  # a file per dataset and phase, in the run's scratch dir
                return data.cache_dir / f"{spec.name}-p{phase}-{part}"
            return "memory" if cfg.cache == "memory" else None

        train_ds = make_dataset(data.train_files, data.train_y, data.train_meta if spec.metadata else None,
                                size=data.size, batch_size=batch, training=True, seed=seed * 10 + phase,
                                augment=augment, cache=cache("train"))
        val_ds = make_dataset(data.val_files, data.val_y, data.val_meta if spec.metadata else None,
                              size=data.size, batch_size=batch, training=False, cache=cache("val"))
        return train_ds, val_ds

    weights_file = data.cache_dir / f"{spec.name}.best.weights.h5"
    cw = class_weights(data.train_y) if cfg.class_weight else None
    history: list[dict[str, Any]] = []
    best = -np.inf
    epoch0 = 0
    phases = [(1, spec.epochs if spec.epochs is not None else cfg.epochs, spec.lr or cfg.lr, None if transfer else 0)]
    if transfer:
        ft = spec.fine_tune_epochs if spec.fine_tune_epochs is not None else cfg.fine_tune_epochs
        phases.append((2, ft, cfg.fine_tune_lr, cfg.fine_tune_layers))
    for phase, epochs, lr, trainable_top in phases:
        if epochs <= 0:
            continue
        with runtime.strategy.scope():
            if transfer:
                n_trainable = freeze_backbone(model, trainable_top)
                log(f"{spec.name} phase {phase}: {n_trainable} backbone layers trainable, lr={lr:g}")
            _compile(model, cfg, lr)
        train_ds, val_ds = datasets(phase)
        callbacks = [
            keras.callbacks.ModelCheckpoint(str(weights_file), monitor="val_auc", mode="max", save_best_only=True,
                                            save_weights_only=True, initial_value_threshold=best if best > -np.inf
                                            else None),
            keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=cfg.early_stopping_patience),
            keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=cfg.reduce_lr_factor,
                                              patience=cfg.reduce_lr_patience, min_lr=cfg.min_lr),
            _EpochLog.make(spec.name, phase),
        ]
        h = model.fit(train_ds, epochs=epoch0 + epochs, initial_epoch=epoch0, steps_per_epoch=steps,
                      validation_data=val_ds, class_weight=cw, callbacks=callbacks, shuffle=False, verbose=0)
        for i, ep in enumerate(h.epoch):
            row = {"member": spec.name, "phase": phase, "epoch": ep + 1}
            row.update({k: float(v[i]) for k, v in sorted(h.history.items())})
            history.append(row)
        epoch0 += len(h.epoch)
        if h.history.get("val_auc"):
            best = max(best, float(np.max(h.history["val_auc"])))
        if weights_file.exists():
            with warnings.catch_warnings():  # the checkpoint's optimizer slots are of the previous compile
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(str(weights_file))  # best so far: phase 2 starts from the best phase-1 state
    return model, history


# --------------------------------------------------------------------------- config stored with the model
def model_config(params: Params, *, meta_spec: dict[str, Any] | None, threshold: float, coef: list[float],
                 intercept: float, val: dict[str, Any]) -> dict[str, Any]:
    """What predict/evaluate/serve need besides the weights: exactly how training images were made."""
    cfg = params.train
    return {
        "format": CONFIG_FORMAT,
        "image_size": params.preprocess.size,
        "preprocess": params.preprocess.model_dump(mode="json"),
        "metadata": meta_spec,
        "tta": cfg.tta,
        "threshold": threshold,
        "target_sensitivity": cfg.target_sensitivity,
        "val_at_threshold": val,
        "members": [m.model_dump(mode="json") for m in cfg.members],
        "stacker": {"kind": cfg.ensemble, "coef": coef, "intercept": intercept},
        "input_stage": INPUT_STAGE,
        "classes": ["benign", "malignant"],
    }


def save_model(model: Any, config: dict[str, Any], models_dir: Path) -> Path:
    """models/classifier.keras + classifier.json, each written atomically."""
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / MODEL_FILE
    with atomic_path(final) as tmp:
        keras_tmp = tmp.with_name(tmp.name + ".keras")  # Keras insists on the .keras suffix (trap 13)
        try:
            model.save(keras_tmp)
            os.replace(keras_tmp, tmp)
        finally:
            keras_tmp.unlink(missing_ok=True)
    write_json(models_dir / CONFIG_FILE, config)
    return final


def load_val_images(files: Sequence[str], size: int) -> np.ndarray:
    return np.stack([read_image(f, size) for f in files]) if len(files) else np.zeros((0, size, size, 3), np.uint8)


# --------------------------------------------------------------------------- the stage
def run(params: Params, paths: Paths, *, augmenter_factory: Callable[[Any, int], Any] | None = None) -> dict:
    """Train every member, stack them on val, choose the operating point, write model + reports."""
    cfg = params.train
    t0 = time.perf_counter()
    index_path = paths.index(INPUT_STAGE)
    index = read_index(paths, INPUT_STAGE)
    check_columns(index, str(index_path))
    train_df = select_rows(index, "train", include_offline_copies=cfg.include_offline_copies,
                           include_synthetic=cfg.include_synthetic)
    if cfg.max_images:
        train_df = cap_stratified(train_df, cfg.max_images, cfg.seed)
    val_df = select_rows(index, "val")
    require_both_classes(train_df, "train", index_path)
    require_both_classes(val_df, "val", index_path)
    size = params.preprocess.size
    meta_spec = metadata_spec(train_df, cfg.site_min_count) if any(m.metadata for m in cfg.members) else None
    meta_dim = metadata_dim(meta_spec)

    runtime = configure_runtime(cfg)
    import keras

    log(f"{len(train_df)} train / {len(val_df)} val images at {size} px; {len(cfg.members)} member(s); "
        f"{runtime.gpus} GPU(s), mixed precision {runtime.mixed_precision}")
    paths.cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="train-", dir=paths.cache))
    try:
        data = Data(
            train_files=[str(paths.abs(p)) for p in train_df["processed_path"]],
            train_y=train_df["target"].to_numpy(np.float32),
            train_meta=encode_metadata(train_df, meta_spec) if meta_spec else None,
            val_files=[str(paths.abs(p)) for p in val_df["processed_path"]],
            val_y=val_df["target"].to_numpy(np.float32),
            val_meta=encode_metadata(val_df, meta_spec) if meta_spec else None,
            val_images=load_val_images([str(paths.abs(p)) for p in val_df["processed_path"]], size),
            size=size,
            cache_dir=scratch,
        )
        members, history, member_metrics, timing = [], [], {}, {}
        for spec in cfg.members:
            t = time.perf_counter()
            model, hist = train_member(spec, cfg, data, augment_cfg=params.augment, meta_dim=meta_dim,
                                       runtime=runtime, augmenter_factory=augmenter_factory)
            timing[spec.name] = round(time.perf_counter() - t, 2)
            p = predict_proba(model, data.val_images, data.val_meta, tta=cfg.tta)
            members.append((model, p))
            history += hist
            member_metrics[spec.name] = {
                "val_auc": _auc(data.val_y, p),
                "epochs": len(hist),
                "params": int(model.count_params()),
            }
            log(f"{spec.name}: val AUC {member_metrics[spec.name]['val_auc']:.4f} ({timing[spec.name]} s)")
        coef, intercept = fit_stacker(np.stack([logit(p) for _, p in members], axis=1), data.val_y, cfg.ensemble)
        keras.utils.set_random_seed(cfg.seed)
        from tasks.models.classifier import build_ensemble

        ensemble = build_ensemble([m for m, _ in members], coef, intercept, image_size=size, metadata_dim=meta_dim)
        val_p = predict_proba(ensemble, data.val_images, data.val_meta, tta=cfg.tta)
        threshold = threshold_for_sensitivity(val_p, data.val_y, cfg.target_sensitivity)
        at_op = binary_metrics(val_p, data.val_y, threshold)
        config = model_config(params, meta_spec=meta_spec, threshold=threshold, coef=coef, intercept=intercept,
                              val=at_op)
        save_model(ensemble, config, paths.models)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    report_dir = paths.reports / STAGE
    write_table(pd.DataFrame(history), report_dir / "history.csv")
    metrics = {
        "n_train": int(len(train_df)),
        "n_train_malignant": int(train_df["target"].sum()),
        "n_val": int(len(val_df)),
        "n_val_malignant": int(val_df["target"].sum()),
        "val_auc": _auc(data.val_y, val_p),
        "threshold": threshold,
        "val_at_threshold": at_op,
        "members": member_metrics,
        "stacker": {"coef": coef, "intercept": intercept},
    }
    write_json(report_dir / "metrics.json", round_floats(metrics))
    total = round(time.perf_counter() - t0, 2)
    write_json(report_dir / "timing.json", {"seconds": total, "members": timing, "gpus": runtime.gpus,
                                            "mixed_precision": runtime.mixed_precision})
    return {"val_auc": metrics["val_auc"], "threshold": threshold, "n_train": metrics["n_train"],
            "members": len(members), "seconds": total, "model": paths.rel(paths.models / MODEL_FILE)}


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(set(np.asarray(y).tolist())) == 2 else None


def load_config(models_dir: Path) -> dict[str, Any]:
    """models/classifier.json, with a clear error when train has not run."""
    path = models_dir / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `lesionflow stage train` first")
    return json.loads(path.read_text())
