"""Stage `cyclegan`: train a benign->malignant CycleGAN on the TRAIN split of data/preprocess (GPU-tagged).

Writes models/cyclegan/{generator_b2m.keras, config.json, ckpt/}, reports/cyclegan/{losses.csv, samples.png,
metrics.json, run_stats.json}; logs to MLflow and registers G(benign->malignant) as `lesionflow-cyclegan`
(tasks.tracking.log_stage_run). Resumes from the last checkpoint when the architecture, optimiser, seed and
training data are unchanged. The generator file is written deterministically (same weights, same bytes);
timings and resume counters go to run_stats.json, not to the DVC metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.config import Cyclegan
from tasks.core.errors import InputError, RunError
from tasks.core.images import dihedral, titled_grid
from tasks.core.io import KEY, Paths, read_index, write_bytes, write_json, write_run_stats, write_table
from tasks.models.gan import GENERATOR_FILE
from tasks.models.inputs import train_domains
from tasks.models.saving import save_keras

log = logging.getLogger(__name__)

STAGE = "cyclegan"
INPUT_STAGE = "preprocess"
# Knobs that do not change what a given training step computes: a checkpoint stays valid across them.
_NOT_FINGERPRINTED = {"epochs", "decay_epochs", "log_every", "keep_checkpoints", "resume", "samples", "mlflow",
                      "register_model", "experiment", "model_name"}


# --------------------------------------------------------------------------- pure helpers
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
        raise InputError(f"cyclegan: need benign and malignant train images, got {len(images_a)} benign and "
                         f"{len(images_b)} malignant (check split/target of data/{INPUT_STAGE}/index.parquet)")
    for name, imgs in (("benign", images_a), ("malignant", images_b)):
        if imgs.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise InputError(f"cyclegan: {name} images have shape {imgs.shape[1:]}, expected "
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
            raise RunError(f"cyclegan: non-finite loss at step {step}: {losses} (lower lr?)")
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


def cycle_error(gan: Any, images: np.ndarray, direction: str, batch_size: int = 32) -> float:
    """Mean absolute reconstruction error of x -> G(x) -> F(G(x)) in [0, 1] pixel units (inference mode)."""
    from tasks.models.gan import to_unit

    if len(images) == 0:
        return float("nan")
    x = to_unit(images)
    back = "ba" if direction == "ab" else "ab"
    rec = gan.translate(gan.translate(x, direction, batch_size), back, batch_size)
    return float(np.mean(np.abs(rec - x)) / 2.0)


# --------------------------------------------------------------------------- the stage
def run(params: Any, paths: Paths) -> dict:
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
    metrics: dict[str, Any] = {  # results only: the same inputs give the same file
        "train_benign": len(images_a), "train_malignant": len(images_b), "skipped_images": len(skipped),
        "image_size": cfg.image_size, "steps": result.end_step,
        "generator_params": int(gan.g_ab.count_params()), "discriminator_params": int(gan.d_b.count_params()),
        "cycle_l1_benign": round(cycle_error(gan, images_a, "ab"), 5),
        "cycle_l1_malignant": round(cycle_error(gan, images_b, "ba"), 5),
    }
    metrics.update({f"last_epoch_{k}": round(float(last[k].mean()), 5) for k in
                    ("g_total", "d_a", "d_b", "cycle_a", "cycle_b") if k in last})
    write_json(report_dir / "metrics.json", metrics)
    stats = {"resumed_from_step": result.start_step, "steps_this_run": steps_run,
             "train_seconds": round(result.seconds, 2),
             "steps_per_second": round(steps_run / result.seconds, 3) if steps_run and result.seconds else None,
             "device": "GPU" if import_tf(False).config.list_physical_devices("GPU") else "CPU",
             "seconds": round(time.perf_counter() - t0, 2)}
    write_run_stats(paths, STAGE, stats)
    tracked: dict[str, Any] = {"mlflow": "off"}
    if cfg.mlflow:
        from tasks import tracking
        from tasks.core.lineage import dvc_hash
        from tasks.models.gan import custom_objects

        digest, _ = dvc_hash(paths.root, f"data/{INPUT_STAGE}")
        tracked = tracking.log_stage_run(
            STAGE, {STAGE: cfg}, paths, metrics={**metrics, **stats}, experiment=cfg.experiment,
            artifacts=[report_dir / f for f in ("metrics.json", "losses.csv", "samples.png")],
            steps=[(int(r["step"]), {f"loss.{k}": v for k, v in r.items() if k not in ("step", "epoch")})
                   for r in result.history.to_dict("records")],
            keras_model=gan.g_ab, register_as=cfg.model_name if cfg.register_model else None,
            model_artifact="generator_b2m", custom_objects=custom_objects(),
            tags={"direction": "benign->malignant", "data_fingerprint": result.fingerprint,
                  "data_hash": str(digest), "image_size": str(cfg.image_size)})
    write_json(report_dir / "mlflow.json", tracked)  # run ids change every run: kept out of the DVC metrics
    summary = {**{k: metrics[k] for k in ("train_benign", "train_malignant", "steps", "cycle_l1_benign")},
               "resumed_from_step": result.start_step, "train_seconds": stats["train_seconds"]}
    return {**summary, **tracked, "generator": paths.rel(gen_path)}
