"""train stage: ensemble of Keras classifiers on the processed images, stacked on val, with an operating point.

Pure helpers first (row selection, metadata encoding, class weights, stacking), then the tf.data input
pipeline and the runtime setup (determinism on CPU; mixed precision / MirroredStrategy on GPU;
MultiWorkerMirroredStrategy when TF_CONFIG describes a cluster of training processes, docs/distributed.md), then
the per-member two-phase fit, and last the thin `run()` that writes (on a cluster: only the chief writes)

- models/classifier.keras   one Keras model: members -> logistic-regression stacker -> probability
- models/classifier.json    everything needed to use it: preprocessing config, image size, metadata
                            encoding, TTA, operating point (threshold for the target sensitivity on val)
- reports/train/history.csv per-epoch loss/AUC of every member and phase (DVC plots)
- reports/train/metrics.json val metrics (deterministic: a rerun on CPU gives the same bytes)
- reports/train/run_stats.json wall-clock numbers (not a DVC metric: they never repeat)

Row selection, metadata encoding, image reading and tf.data live in tasks/models/inputs.py, scoring in
tasks/models/bundle.py, metrics in tasks/core/metrics.py; models/classifier.keras is written deterministically
(tasks/models/saving.py): identical weights give identical bytes.

TensorFlow is imported only inside functions: TF_ENABLE_ONEDNN_OPTS=0 must be in the environment before the
first import for bit-identical CPU reruns, and `run()` sets it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.config import Member, Train
from tasks.core.errors import InputError
from tasks.core.io import Paths, read_index, write_json, write_run_stats, write_table
from tasks.core.metrics import binary_metrics, round_floats, sklearn_auc, threshold_for_sensitivity
from tasks.models.bundle import predict_proba
from tasks.models.inputs import (
    CONFIG_FILE,
    CONFIG_FORMAT,
    INPUT_STAGE,
    MODEL_FILE,
    check_columns,
    encode_metadata,
    load_val_images,
    make_dataset,
    metadata_dim,
    metadata_spec,
    select_rows,
)
from tasks.models.saving import save_keras

STAGE = "train"
EPS = 1e-7

_log = logging.getLogger(__name__)


def log(msg: str) -> None:
    """Progress lines go to the log (stderr): stdout carries the stage's JSON summary."""
    _log.info("[train] %s", msg)


# --------------------------------------------------------------------------- rows
def cap_stratified(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most n rows, class shares kept, at least one row per class (seeded)."""
    if len(df) <= n:
        return df
    rng = np.random.default_rng(seed)
    parts = []
    for _target, group in df.groupby("target", sort=True):
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
        raise InputError(f"{index_path}: split {split!r} needs benign and malignant images, has {counts or 'none'} "
                         f"(more data, or other split fractions)")


# --------------------------------------------------------------------------- stacking and operating point
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


# --------------------------------------------------------------------------- tf.data
def _aug_seed(base: int, k: int) -> int:
    return int(np.random.SeedSequence([base, k]).generate_state(1)[0])


def make_augment(augment_cfg: Any, size: int, base_seed: int,
                 factory: Callable[[Any, int], Any] | None = None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """numpy fn (k, image) -> augmented image; the draw depends only on (base_seed, k), never on which
    tf.data thread runs it or in what order, so parallel augmentation stays deterministic."""
    from tasks.core.augmentation import augment_copy, build_augmenter

    factory = factory or build_augmenter
    local = threading.local()  # one augmenter per tf.data thread: albumentations objects hold RNG state

    def apply(k: np.ndarray, image: np.ndarray) -> np.ndarray:
        aug = getattr(local, "aug", None)
        if aug is None:
            aug = local.aug = factory(augment_cfg, size)
        out = augment_copy(aug, np.ascontiguousarray(image), _aug_seed(base_seed, int(k)))
        return np.ascontiguousarray(out, dtype=np.uint8)

    return apply


# --------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    strategy: Any
    gpus: int
    mixed_precision: bool
    deterministic: bool
    workers: int = 1  # training processes in the TF_CONFIG cluster (1: the single-process default)
    chief: bool = True  # this process writes the outputs (on a cluster only the chief does)
    task: str = ""  # "chief:0", "worker:1", ... on a cluster


@dataclass(frozen=True)
class ClusterTask:
    """This process's place in a multi-worker TF_CONFIG cluster."""

    workers: int
    chief: bool
    task: str


def cluster_task(env: Any = None) -> ClusterTask | None:
    """Parse TF_CONFIG (the standard tf.distribute cluster spec); None when unset or when it lists one process.

    Chief = the `chief` task, or `worker` 0 when the cluster has no chief (TensorFlow's convention)."""
    raw = (os.environ if env is None else env).get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"TF_CONFIG is not valid JSON ({exc}); expected "
                         '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}') from exc
    cluster = conf.get("cluster") if isinstance(conf, dict) else None
    task = conf.get("task") if isinstance(conf, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise InputError('TF_CONFIG needs a "cluster" mapping and a "task" mapping (type, index)')
    unsupported = sorted(set(cluster) - {"chief", "worker"})
    if unsupported:
        raise InputError(f"TF_CONFIG cluster has {unsupported}: train runs MultiWorkerMirroredStrategy, which takes "
                         "only `chief` and `worker` tasks (no parameter servers or evaluators)")
    sizes = {k: v for k, v in cluster.items() if isinstance(v, list) and all(isinstance(a, str) for a in v)}
    if len(sizes) != len(cluster) or len(cluster.get("chief", [])) > 1:
        raise InputError("TF_CONFIG cluster: each task type needs a list of 'host:port' strings, and at most one chief")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise InputError(f"TF_CONFIG task {task} is not in its cluster {sorted(cluster)}")
    n = sum(len(v) for v in cluster.values())
    if n <= 1:
        return None
    chief = kind == "chief" or (kind == "worker" and index == 0 and not cluster.get("chief"))
    return ClusterTask(workers=n, chief=chief, task=f"{kind}:{index}")


def configure_runtime(cfg: Train) -> Runtime:
    """Determinism on CPU; on GPU mixed precision, and MirroredStrategy when there are several GPUs;
    MultiWorkerMirroredStrategy (NCCL between GPUs, ring on CPUs) when TF_CONFIG lists several processes."""
    cluster = cluster_task()
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
    if cluster is not None:
        comm = tf.distribute.experimental.CommunicationImplementation
        options = tf.distribute.experimental.CommunicationOptions(implementation=comm.NCCL if gpus else comm.RING)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        _mean_scalars_across_workers()
        log(f"multi-worker: {cluster.task} of {cluster.workers} processes, "
            f"{strategy.num_replicas_in_sync} replicas in sync{' (chief)' if cluster.chief else ''}")
        return Runtime(strategy=strategy, gpus=len(gpus), mixed_precision=bool(gpus),
                       deterministic=cfg.deterministic, workers=cluster.workers, chief=cluster.chief,
                       task=cluster.task)
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    return Runtime(strategy=strategy, gpus=len(gpus), mixed_precision=bool(gpus), deterministic=cfg.deterministic)


def _sync_batch_norm(model: Any, on: bool) -> None:
    """Batch statistics over the global batch (all replicas), as one process would compute them; switched off
    again before the model leaves training, so the saved config is the single-process one."""
    import keras

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = on


def _build_from_spec(model: Any, element_spec: Any) -> None:
    """Keras 3 (3.15 too) builds a model under a tf.distribute strategy from its first batch, which it gets with
    strategy.reduce(MEAN) over the whole (inputs, target) nest; MultiWorkerMirroredStrategy cannot reduce a nest
    ("Attempt to convert a value ({'image': PerReplica...}) ... to a Tensor"; keras-team/keras#20329, #20585).
    The build only needs shapes: it gets a zero batch of the dataset's element spec instead, and no batch is
    drawn (drawing one would start an extra iterator, i.e. an extra reshuffle, and change the data order)."""
    import tensorflow as tf

    build = model._maybe_symbolic_build

    def from_spec(iterator: Any = None, data_batch: Any = None) -> Any:
        if iterator is not None:
            x, y = element_spec[0], element_spec[1]
            data_batch = tf.nest.map_structure(
                lambda s: tf.zeros([1 if d is None else d for d in s.shape], s.dtype), (x, y))
        return build(data_batch=data_batch)

    model._maybe_symbolic_build = from_spec


def _mean_scalars_across_workers() -> None:
    """Keras 3 (3.15 too) averages each step's logs over MultiWorkerMirroredStrategy workers with
    strategy.reduce(MEAN, axis=0), which fails on the scalar loss/metric values ("Invalid reduction dimension 0 for
    input with 0 dimensions"); scalars are averaged with axis=None instead. Epoch logs (history, checkpoint and
    early-stopping decisions) are unaffected: Keras reads them from the metrics' all-reduced state. Applied only
    in a multi-worker process, once."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "lesionflow_patched", False):
        return

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction not in ("auto", "mean") or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return original(values, strategy, reduction)

        def mean(v: Any) -> Any:
            local = strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v
            return strategy.reduce("MEAN", v, axis=0 if local.shape.rank else None)

        return tf.nest.map_structure(mean, values)

    reduce_per_replica.lesionflow_patched = True  # type: ignore[attr-defined]
    tf_trainer.reduce_per_replica = reduce_per_replica


def _local_copy(model: Any) -> Any:
    """The trained model outside the multi-worker strategy: same config and weights, plain variables, so
    prediction, stacking and saving run locally (no collective ops) on every process."""
    import keras

    _sync_batch_norm(model, False)
    local = keras.models.clone_model(model)
    local.set_weights(model.get_weights())
    return local


def _per_worker(ds: Any, strategy: Any, global_batch: int, cw: dict[int, float] | None) -> Any:
    """The single-process batches, split across the workers: every worker runs the same seeded pipeline (same
    shuffle, same augmentation draws) of global batches and keeps its own slice of each, so one step sees
    exactly the images one process would see in that step. Class weights become sample weights first (Keras
    cannot map them over a distributed dataset)."""
    import tensorflow as tf
    from keras.src.trainers.data_adapters.tf_dataset_adapter import make_class_weight_map_fn

    if cw:
        ds = ds.map(make_class_weight_map_fn(cw))

    def for_worker(ctx: Any) -> Any:
        share = global_batch // ctx.num_input_pipelines
        lo = ctx.input_pipeline_id * share
        part = ds.map(lambda *elem: tf.nest.map_structure(lambda t: t[lo:lo + share], elem))
        per_replica = ctx.get_per_replica_batch_size(global_batch)
        if per_replica != share:  # several GPUs on this worker: consecutive batches go to its replicas
            part = part.rebatch(per_replica)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return part.with_options(options)

    return strategy.distribute_datasets_from_function(for_worker)


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
        if runtime.workers > 1:
            _sync_batch_norm(model, True)
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
        if runtime.workers > 1:
            _build_from_spec(model, val_ds.element_spec)
            return (_per_worker(train_ds, runtime.strategy, batch, cw),
                    _per_worker(val_ds, runtime.strategy, batch, None))
        return train_ds, val_ds

    weights_file = data.cache_dir / f"{spec.name}.best.weights.h5"
    cw = class_weights(data.train_y) if cfg.class_weight else None
    fit_cw = None if runtime.workers > 1 else cw  # multi-worker: sample weights inside the dataset
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
                      validation_data=val_ds, class_weight=fit_cw, callbacks=callbacks, shuffle=False, verbose=0)
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
    if runtime.workers > 1:
        model = _local_copy(model)
    return model, history


# --------------------------------------------------------------------------- config stored with the model
def model_config(params: Any, *, meta_spec: dict[str, Any] | None, threshold: float, coef: list[float],
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
        # The whole [train] section: evaluate logs the model's training params from here (it reads no params.train).
        "train": cfg.model_dump(mode="json"),
    }


def save_model(model: Any, config: dict[str, Any], models_dir: Path) -> Path:
    """models/classifier.keras (deterministic bytes) + classifier.json, each written atomically."""
    models_dir.mkdir(parents=True, exist_ok=True)
    final = save_keras(model, models_dir / MODEL_FILE)
    write_json(models_dir / CONFIG_FILE, config)
    return final


# --------------------------------------------------------------------------- the stage
def run(params: Any, paths: Paths, *, augmenter_factory: Callable[[Any, int], Any] | None = None) -> dict:
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
        if not runtime.chief:  # the fits were the collective part; the chief alone stacks and writes
            log(f"{runtime.task}: trained {len(members)} member(s) in sync with the chief; it writes the outputs")
            return {"role": runtime.task, "workers": runtime.workers, "members": len(members),
                    "seconds": round(time.perf_counter() - t0, 2)}
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
    (report_dir / "timing.json").unlink(missing_ok=True)  # the old name of run_stats.json
    write_run_stats(paths, STAGE, {"seconds": total, "members": timing, "gpus": runtime.gpus,
                                   "mixed_precision": runtime.mixed_precision,
                                   **({"workers": runtime.workers} if runtime.workers > 1 else {})})
    return {"val_auc": metrics["val_auc"], "threshold": threshold, "n_train": metrics["n_train"],
            "members": len(members), "seconds": total, "model": paths.rel(paths.models / MODEL_FILE)}


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    return sklearn_auc(y, p)
