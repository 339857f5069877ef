"""Stage `cyclegan`: train a benign->malignant CycleGAN on the TRAIN split of data/preprocess (GPU-tagged).

Writes models/cyclegan/{generator_b2m.keras, config.json, ckpt/}, reports/cyclegan/{losses.csv, samples.png,
metrics.json}; logs to MLflow and registers G(benign->malignant) as `lesionflow-cyclegan` (tasks/tracking.py).
Resumes from the last checkpoint when the architecture, optimiser, seed and training data are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from tasks.core.config import Cyclegan, Params
from tasks.core.io import KEY, Paths, read_index, write_bytes, write_json, write_table

log = logging.getLogger(__name__)

STAGE = "cyclegan"
INPUT_STAGE = "preprocess"
GENERATOR_FILE = "generator_b2m.keras"
# Knobs that do not change what a given training step computes: a checkpoint stays valid across them.
_NOT_FINGERPRINTED = {"epochs", "decay_epochs", "log_every", "keep_checkpoints", "resume", "samples", "mlflow",
                      "register_model", "experiment", "model_name"}


# --------------------------------------------------------------------------- pure helpers
def train_domains(index: pd.DataFrame, source: str = "index") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(benign, malignant) rows of the train split, real images only, sorted by key so file order never matters."""
    missing = [c for c in (*KEY, "split", "target", "processed_path") if c not in index.columns]
    if missing:
        raise ValueError(f"{source}: column(s) {missing} missing; rerun `lesionflow stage preprocess`")
    real = index["split"].eq("train")
    if "synthetic" in index.columns:  # never learn from our own output
        real &= ~index["synthetic"].fillna(False).astype(bool)
    if "augmented_from" in index.columns:  # offline copies would overweight some images
        real &= index["augmented_from"].isna()
    train = index.loc[real].sort_values(KEY, kind="mergesort")
    target = pd.to_numeric(train["target"], errors="coerce")
    return train.loc[target.eq(0)].reset_index(drop=True), train.loc[target.eq(1)].reset_index(drop=True)


def dihedral(images: np.ndarray, k: int | np.ndarray) -> np.ndarray:
    """Apply one of the 8 flips/90-degree turns (k in 0..7) to an HxWxC image, or per image of an NxHxWxC batch."""
    if images.ndim == 3:
        out = np.rot90(images, int(k) % 4, axes=(0, 1))
        return np.ascontiguousarray(out[:, ::-1] if int(k) >= 4 else out)
    ks = np.broadcast_to(np.asarray(k), (len(images),))
    return np.stack([dihedral(img, kk) for img, kk in zip(images, ks)]) if len(images) else images.copy()


def batch_plan(seed: int, step: int, n_a: int, n_b: int, batch: int, pool_size: int, flip: bool) -> dict:
    """Everything random about training step `step`, from (seed, step) alone: a resumed run replays it exactly."""
    from tasks.models.gan import pool_query_plan

    rng = np.random.default_rng([seed, step])
    plan = {
        "idx_a": rng.integers(0, n_a, size=batch),
        "idx_b": rng.integers(0, n_b, size=batch),  # unpaired: A and B drawn independently
        "k_a": rng.integers(0, 8, size=batch) if flip else np.zeros(batch, np.int64),
        "k_b": rng.integers(0, 8, size=batch) if flip else np.zeros(batch, np.int64),
    }
    plan["pool_a"] = pool_query_plan(rng, batch, pool_size)
    plan["pool_b"] = pool_query_plan(rng, batch, pool_size)
    return plan


def config_fingerprint(cfg: Cyclegan, data_hash: str) -> str:
    """Hash of every knob that changes what a training step computes, plus the training data."""
    knobs = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_FINGERPRINTED}
    blob = json.dumps({"knobs": knobs, "data": data_hash}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def data_hash(keys_a: pd.DataFrame, keys_b: pd.DataFrame, images_a: np.ndarray, images_b: np.ndarray) -> str:
    """Content hash of the two training domains (ids + the resized pixels the GAN actually sees)."""
    h = hashlib.sha256()
    for keys, images in ((keys_a, images_a), (keys_b, images_b)):
        h.update(keys[KEY].astype(str).to_csv(index=False).encode())
        h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:16]


def epoch_of(step: int, steps_per_epoch: int) -> int:
    """1-based epoch a 1-based step belongs to."""
    return (step - 1) // steps_per_epoch + 1


# --------------------------------------------------------------------------- image I/O
def load_domain(rows: pd.DataFrame, paths: Paths, size: int) -> tuple[np.ndarray, pd.DataFrame, list[dict]]:
    """Decode and resize (INTER_AREA) each processed image; unreadable ones are skipped with a reason."""
    import cv2

    from tasks.core.images import decode

    images, kept, skipped = [], [], []
    for i, r in enumerate(rows.itertuples(index=False)):
        path = paths.abs(r.processed_path)
        try:
            img = decode(path.read_bytes())
            if img.shape[:2] != (size, size):
                img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        except (OSError, ValueError) as exc:
            skipped.append({"source": r.source, "isic_id": r.isic_id, "path": str(path),
                            "reason": f"{type(exc).__name__}: {exc}"})
            continue
        images.append(img)
        kept.append(i)
    arr = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return arr, rows.iloc[kept].reset_index(drop=True), skipped


# --------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    gan: Any  # tasks.models.gan.CycleGan
    history: pd.DataFrame  # one row per `log_every` steps: step, epoch, lr and the mean of each loss
    start_step: int  # 0 = fresh, else the checkpoint step it resumed from
    end_step: int
    seconds: float  # time spent in this call's steps (tracing included)
    fingerprint: str


def gan_config(cfg: Cyclegan) -> Any:
    """The trainer's record from the params section."""
    from tasks.models.gan import GanConfig

    return GanConfig(image_size=cfg.image_size, base_filters=cfg.base_filters, n_res_blocks=cfg.n_res_blocks,
                     disc_filters=cfg.disc_filters, disc_downsamples=cfg.disc_downsamples, lr=cfg.lr,
                     beta_1=cfg.beta_1, cycle_weight=cfg.cycle_weight, identity_weight=cfg.identity_weight,
                     pool_size=cfg.pool_size, batch_size=cfg.batch_size)


def import_tf(deterministic: bool = True) -> Any:
    """TensorFlow with oneDNN off (bit-exact CPU results; only effective before TF's first import) and seeds set."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if deterministic:
        tf.config.experimental.enable_op_determinism()
    return tf


def _read_history(path: Path, upto: int) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame()
    hist = pd.read_csv(path)
    return hist.loc[hist["step"] <= upto].reset_index(drop=True)


def train(cfg: Cyclegan, images_a: np.ndarray, images_b: np.ndarray, ckpt_dir: Path | None, data_id: str,
          on_row: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or resume) a CycleGAN on uint8 benign (A) / malignant (B) images already at cfg.image_size.

    With `ckpt_dir`, saves a checkpoint plus the loss history after every epoch and resumes from the latest one
    when `cfg.resume` and the fingerprint (architecture, optimiser, seed, data) match; otherwise starts fresh.
    """
    tf = import_tf(cfg.deterministic)  # first: the oneDNN switch only counts before TensorFlow loads
    import keras

    from tasks.models.gan import CycleGan, linear_decay_lr, to_unit

    if len(images_a) == 0 or len(images_b) == 0:
        raise ValueError(f"cyclegan: need benign and malignant train images, got {len(images_a)} benign and "
                         f"{len(images_b)} malignant (check split/target of data/{INPUT_STAGE}/index.parquet)")
    for name, imgs in (("benign", images_a), ("malignant", images_b)):
        if imgs.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"cyclegan: {name} images have shape {imgs.shape[1:]}, expected "
                             f"({cfg.image_size}, {cfg.image_size}, 3)")
    keras.utils.set_random_seed(cfg.seed)  # before building: weight init comes from this seed
    gan = CycleGan(gan_config(cfg))
    fp = config_fingerprint(cfg, data_id)
    total = cfg.epochs * cfg.steps_per_epoch
    decay = cfg.decay_epochs * cfg.steps_per_epoch

    manager = history_path = None
    history = pd.DataFrame()
    start = 0
    if ckpt_dir is not None:
        ckpt_dir = Path(ckpt_dir)
        fp_file, history_path = ckpt_dir / "fingerprint.json", ckpt_dir / "history.csv"
        old_fp = json.loads(fp_file.read_text()).get("fingerprint") if fp_file.exists() else None
        manager = tf.train.CheckpointManager(gan.checkpoint(), str(ckpt_dir), max_to_keep=cfg.keep_checkpoints)
        latest = manager.latest_checkpoint
        latest_step = int(latest.rsplit("-", 1)[-1]) if latest else 0
        if cfg.resume and latest and old_fp == fp and latest_step <= total:
            manager.checkpoint.restore(latest).assert_consumed()
            start = int(gan.step.numpy())
            history = _read_history(history_path, start)
            log.info("cyclegan: resumed from %s (step %d of %d)", latest, start, total)
        else:
            if latest:
                why = ("resume is off" if not cfg.resume else "config or data changed" if old_fp != fp
                       else f"checkpoint step {latest_step} > {total} steps requested")
                log.info("cyclegan: not resuming from %s (%s); training from scratch", latest, why)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            manager = tf.train.CheckpointManager(gan.checkpoint(), str(ckpt_dir), max_to_keep=cfg.keep_checkpoints)
            write_json(fp_file, {"fingerprint": fp, "config": cfg.model_dump(mode="json"), "data": data_id})

    a_unit, b_unit = to_unit(images_a), to_unit(images_b)
    rows = [history] if len(history) else []
    window: list[dict] = []
    t0 = time.perf_counter()
    for step in range(start + 1, total + 1):
        plan = batch_plan(cfg.seed, step, len(a_unit), len(b_unit), cfg.batch_size, cfg.pool_size, cfg.flip)
        lr = linear_decay_lr(step - 1, total, decay, cfg.lr)
        losses = gan.train_step(dihedral(a_unit[plan["idx_a"]], plan["k_a"]),
                                dihedral(b_unit[plan["idx_b"]], plan["k_b"]), lr, plan["pool_a"], plan["pool_b"])
        if not all(np.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"cyclegan: non-finite loss at step {step}: {losses} (lower lr?)")
        window.append(losses)
        if step % cfg.log_every == 0 or step % cfg.steps_per_epoch == 0 or step == total:
            row = {"step": step, "epoch": epoch_of(step, cfg.steps_per_epoch), "lr": lr,
                   **pd.DataFrame(window).mean().to_dict()}
            rows.append(pd.DataFrame([row]))
            window = []
            if on_row is not None:
                on_row(row)
        if manager is not None and (step % cfg.steps_per_epoch == 0 or step == total):
            manager.save(checkpoint_number=step)
            write_table(pd.concat(rows, ignore_index=True), history_path)
    history = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    return TrainResult(gan, history, start, int(gan.step.numpy()), time.perf_counter() - t0, fp)


# --------------------------------------------------------------------------- reports
def pick_samples(n_rows: int, k: int) -> np.ndarray:
    """k evenly spaced row numbers (deterministic; covers the whole sorted domain)."""
    if n_rows == 0 or k == 0:
        return np.zeros(0, int)
    return np.unique(np.linspace(0, n_rows - 1, min(k, n_rows)).round().astype(int))


def sample_grid_image(gan: Any, images_a: np.ndarray, images_b: np.ndarray, k: int, tile: int = 96) -> np.ndarray:
    """Rows: k benign then k malignant images; columns: input, translated, reconstructed (uint8 RGB grid)."""
    import cv2

    from tasks.models.gan import to_uint8, to_unit

    columns: list[list[np.ndarray]] = [[], [], []]
    labels = []
    for name, imgs, there, back in (("benign", images_a, "ab", "ba"), ("malignant", images_b, "ba", "ab")):
        picked = to_unit(imgs[pick_samples(len(imgs), k)])
        translated = gan.translate(picked, there)
        reconstructed = gan.translate(translated, back)
        for col, batch in zip(columns, (picked, translated, reconstructed)):
            # Nearest-neighbour upscaling: shows the GAN's real pixels, not interpolation.
            col.extend(cv2.resize(im, (tile, tile), interpolation=cv2.INTER_NEAREST) for im in to_uint8(batch))
        labels += [f"{name} {i + 1}" for i in range(len(picked))]
    return titled_grid(columns, tile, ("input", "translated", "reconstructed"), labels)


def titled_grid(columns: list[list[np.ndarray]], tile: int, titles: tuple[str, ...], row_labels: list[str]) -> np.ndarray:
    """preprocess.sample_grid plus a header row naming the columns."""
    import cv2

    from tasks.core.images import sample_grid

    grid = sample_grid(columns, tile, labels=row_labels)
    header = np.full((18, grid.shape[1], 3), 255, np.uint8)
    for ci, text in enumerate(titles):
        cv2.putText(header, text, (2 + ci * (tile + 2) + 3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return np.concatenate([header, grid])


def cycle_error(gan: Any, images: np.ndarray, direction: str, batch_size: int = 32) -> float:
    """Mean absolute reconstruction error of x -> G(x) -> F(G(x)) in [0, 1] pixel units (inference mode)."""
    from tasks.models.gan import to_unit

    if len(images) == 0:
        return float("nan")
    x = to_unit(images)
    back = "ba" if direction == "ab" else "ab"
    rec = gan.translate(gan.translate(x, direction, batch_size), back, batch_size)
    return float(np.mean(np.abs(rec - x)) / 2.0)


def save_keras(model: Any, path: Path) -> None:
    """model.save via a temp file in the same folder (Keras needs the .keras suffix), renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- tracking
def track(stage: str, section: Any, paths: Paths, metrics: dict, artifacts: list[Path], *,
          history: pd.DataFrame | None = None, tags: dict[str, str] | None = None, model: Any = None,
          model_file: Path | None = None, register_as: str | None = None) -> dict:
    """Log one stage run through tasks/tracking.py (the only mlflow importer): params, metrics (history per step),
    artifacts, and optionally a Keras model registered as `register_as`. Returns ids for metrics.json."""
    from tasks import tracking

    with tracking.start_run(paths.root, run_name=stage, experiment=section.experiment,
                            tags={"stage": stage, **(tags or {})}) as active:
        run_id = active.info.run_id
        client = tracking.client()
        for key, value in tracking.flatten(section.model_dump(mode="json")).items():
            client.log_param(run_id, key, "null" if value is None else str(value))
        for key, value in tracking.numeric(tracking.flatten(metrics)).items():
            client.log_metric(run_id, key, value)
        if history is not None:
            for rec in history.to_dict("records"):
                for key, value in rec.items():
                    if key not in ("step", "epoch") and np.isfinite(value):
                        client.log_metric(run_id, f"loss.{key}", float(value), step=int(rec["step"]))
        for path in artifacts:
            if Path(path).exists():
                client.log_artifact(run_id, str(path), "reports")
        out: dict[str, Any] = {"mlflow_run_id": run_id}
        if model is not None and register_as:
            log_keras = getattr(tracking, "log_keras_model", None)
            if log_keras is None:
                # tasks/tracking.py offers no Keras-model logger yet: keep the file with the run, do not register
                # a plain artifact (MLflow 3 only registers logged models).
                if model_file is not None:
                    client.log_artifact(run_id, str(model_file), "model_file")
                out["registered_version"] = None
                out["register_skipped"] = "tasks.tracking.log_keras_model missing"
                log.warning("%s: not registered as %s (tasks.tracking.log_keras_model missing)", stage, register_as)
            else:
                from tasks.models.gan import custom_objects

                example = np.zeros((1, *model.input_shape[1:]), np.float32)
                model_uri = log_keras(model, name="generator_b2m", input_example=example,
                                      custom_objects=custom_objects())
                out["model_uri"] = model_uri
                out["registered_version"] = tracking.register(model_uri, register_as,
                                                              {**(tags or {}), "run_id": run_id})
    return out


# --------------------------------------------------------------------------- the stage
def run(params: Params, paths: Paths) -> dict:
    """Train on the train split of data/preprocess; write the generator, checkpoints, losses, samples, metrics."""
    cfg = params.cyclegan
    t0 = time.perf_counter()
    index = read_index(paths, INPUT_STAGE)
    benign, malignant = train_domains(index, str(paths.index(INPUT_STAGE)))
    images_a, benign, skipped_a = load_domain(benign, paths, cfg.image_size)
    images_b, malignant, skipped_b = load_domain(malignant, paths, cfg.image_size)
    skipped = skipped_a + skipped_b

    model_dir, report_dir = paths.models / STAGE, paths.reports / STAGE
    result = train(cfg, images_a, images_b, model_dir / "ckpt", data_hash(benign, malignant, images_a, images_b))
    gan = result.gan

    from tasks.core.images import encode_png

    gen_path = model_dir / GENERATOR_FILE
    save_keras(gan.g_ab, gen_path)
    write_json(model_dir / "config.json", {"image_size": cfg.image_size, "fingerprint": result.fingerprint,
                                           "direction": "benign->malignant", "input_range": [-1, 1],
                                           "params": cfg.model_dump(mode="json")})
    write_table(result.history, report_dir / "losses.csv")
    write_bytes(report_dir / "samples.png", encode_png(sample_grid_image(gan, images_a, images_b, cfg.samples)))
    if skipped:
        write_table(pd.DataFrame(skipped), report_dir / "skipped.csv")

    steps_run = result.end_step - result.start_step
    last = result.history.loc[result.history["epoch"] == result.history["epoch"].max()] if len(result.history) \
        else pd.DataFrame()
    metrics: dict[str, Any] = {
        "train_benign": len(images_a), "train_malignant": len(images_b), "skipped_images": len(skipped),
        "image_size": cfg.image_size, "steps": result.end_step, "resumed_from_step": result.start_step,
        "steps_this_run": steps_run, "train_seconds": round(result.seconds, 2),
        "steps_per_second": round(steps_run / result.seconds, 3) if steps_run and result.seconds else None,
        "generator_params": int(gan.g_ab.count_params()), "discriminator_params": int(gan.d_b.count_params()),
        "cycle_l1_benign": round(cycle_error(gan, images_a, "ab"), 5),
        "cycle_l1_malignant": round(cycle_error(gan, images_b, "ba"), 5),
        "device": "GPU" if import_tf(False).config.list_physical_devices("GPU") else "CPU",
    }
    metrics.update({f"last_epoch_{k}": round(float(last[k].mean()), 5) for k in
                    ("g_total", "d_a", "d_b", "cycle_a", "cycle_b") if k in last})
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(report_dir / "metrics.json", metrics)
    tracked: dict[str, Any] = {"mlflow": "off"}
    if cfg.mlflow:
        from tasks.tracking import dvc_hash

        digest, _ = dvc_hash(paths.root, f"data/{INPUT_STAGE}")
        tracked = track(STAGE, cfg, paths, metrics, [report_dir / f for f in ("metrics.json", "losses.csv",
                                                                                "samples.png")],
                        history=result.history, model=gan.g_ab, model_file=gen_path,
                        register_as=cfg.model_name if cfg.register_model else None,
                        tags={"direction": "benign->malignant", "data_fingerprint": result.fingerprint,
                              "data_hash": str(digest), "image_size": str(cfg.image_size)})
    write_json(report_dir / "mlflow.json", tracked)  # run ids change every run: kept out of the DVC metrics
    return {**{k: metrics[k] for k in ("train_benign", "train_malignant", "steps", "resumed_from_step",
                                       "train_seconds", "cycle_l1_benign")}, **tracked,
            "generator": paths.rel(gen_path)}
