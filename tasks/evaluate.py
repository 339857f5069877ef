"""evaluate stage: score the trained classifier on the frozen test split, plot, and track it in MLflow.

The metrics themselves live in tasks/core/metrics.py (`score`: ROC AUC with a bootstrap CI, AP, Brier, ECE and
the confusion-based metrics at 0.5 and at the operating point stored with the model). Scoring goes through the
model bundle (tasks/models/bundle.py), the same path as the promotion gate (`bundle.score_model`), predict, the
pyfunc and serve. Here: subgroup columns, plots, and the thin `run()`. What the model was trained with comes
from models/classifier.json (this stage reads only its own [evaluate] params).

Outputs: reports/evaluate/metrics.json (DVC metrics), subgroups.csv, predictions.csv, roc.csv, pr.csv,
calibration.csv, thresholds.csv, confusion.csv (DVC plots) and PNGs (roc, pr, confusion, calibration,
thresholds, mistakes, gradcam); reports/evaluate/mlflow.json names the MLflow run and registered version. The
model card (tasks/core/card.py) goes to the MLflow run (model_card.md) and the version's description.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.config import Evaluate
from tasks.core.errors import InputError
from tasks.core.io import Paths, read_index, write_json, write_table
from tasks.core.metrics import (
    age_band,
    calibration_table,
    has_raw_size,
    pr_points,
    raw_size,
    resolution_band,
    roc_points,
    round_floats,
    subgroup_summary,
    subgroup_table,
    threshold_sweep,
)
from tasks.models.bundle import load_bundle, score_predictions
from tasks.models.bundle import score_model as score_model  # old home; the gate imports tasks.models.bundle
from tasks.models.inputs import INPUT_STAGE, check_columns, site_of, test_rows

STAGE = "evaluate"
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- subgroups
def subgroup_frame(df: pd.DataFrame, edges: Sequence[float]) -> pd.DataFrame:
    """source, [dataset], [resolution], sex, age_band and site per row (normalised text, 'unknown' when missing).

    dataset is `source_dataset` and resolution the band of the raw image's shorter side (`raw_size`), each only
    when the index has the columns: the groups where a model that learned "which clinic" or "which camera"
    instead of "which lesion" falls apart."""
    sex = df["sex"].astype("string").str.strip().str.lower() if "sex" in df else pd.Series(pd.NA, index=df.index)
    groups = pd.DataFrame({
        "source": df["source"].astype(str),
        "sex": sex.where(sex.isin(["male", "female"]), "unknown").fillna("unknown").astype(str),
        "age_band": age_band(df["age_approx"] if "age_approx" in df else pd.Series(np.nan, index=df.index), edges),
        "site": site_of(df),
    }, index=df.index)
    if "source_dataset" in df:  # e.g. HAM10000 vs ISIC 2017 inside one ingest source: where does the model fail?
        groups.insert(1, "dataset", df["source_dataset"].astype("string").fillna("unknown").astype(str))
    if has_raw_size(df):
        size = raw_size(df)
        groups.insert(groups.columns.get_loc("sex"), "resolution", resolution_band(size["width"], size["height"]))
    return groups


# --------------------------------------------------------------------------- plots (matplotlib Agg)
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(roc: pd.DataFrame, pr: pd.DataFrame, calib: pd.DataFrame, sweep: pd.DataFrame,
                metrics: dict[str, Any]) -> dict[str, Any]:
    """ROC, PR, calibration, metric-vs-threshold and confusion-matrix figures."""
    plt = _plt()
    figs: dict[str, Any] = {}
    op = metrics.get("at_operating_point") or metrics["at_0.5"]

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(roc["fpr"], roc["tpr"], label=f"AUC {metrics['auc']:.3f}" if metrics["auc"] is not None else "ROC")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    if op["specificity"] is not None and op["sensitivity"] is not None:
        ax.plot(1 - op["specificity"], op["sensitivity"], "ro", label=f"operating point t={op['threshold']:.3f}")
    ax.set(xlabel="false positive rate", ylabel="sensitivity (TPR)", title="ROC (test)")
    ax.legend(loc="lower right", fontsize=8)
    figs["roc"] = fig

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ap = metrics.get("average_precision")
    ax.plot(pr["recall"], pr["precision"], label=f"AP {ap:.3f}" if ap is not None else "PR")
    ax.axhline(metrics["n_malignant"] / max(metrics["n"], 1), color="k", ls=":", lw=0.8, label="prevalence")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall (test)", ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    figs["pr"] = fig

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    c = calib[calib["count"] > 0]
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot(c["mean_predicted"], c["fraction_malignant"], "o-", label=f"ECE {metrics['ece']:.3f}")
    ax.set(xlabel="mean predicted probability", ylabel="observed malignant fraction", title="Calibration (test)",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    figs["calibration"] = fig

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for col in ("sensitivity", "specificity", "precision", "f1", "balanced_accuracy"):
        ax.plot(sweep["threshold"], sweep[col], label=col)
    ax.axvline(op["threshold"], color="k", ls="--", lw=0.8, label="operating point")
    ax.set(xlabel="threshold", ylabel="metric", title="Metrics vs threshold (test)", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    figs["thresholds"] = fig

    fig, ax = plt.subplots(figsize=(4, 3.6))
    cm = np.array([[op["tn"], op["fp"]], [op["fn"], op["tp"]]])
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=12)
    ax.set_xticks([0, 1], ["benign", "malignant"])
    ax.set_yticks([0, 1], ["benign", "malignant"])
    ax.set(xlabel="predicted", ylabel="actual", title=f"Confusion at t={op['threshold']:.3f}")
    figs["confusion"] = fig
    return figs


def plot_gallery(images: Sequence[np.ndarray], titles: Sequence[str], title: str, cols: int = 6,
                 overlays: Sequence[np.ndarray] | None = None) -> Any:
    """A grid of images (optionally with a heatmap overlay each)."""
    plt = _plt()
    n = max(1, len(images))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (img, t) in enumerate(zip(images, titles)):
        ax = axes.ravel()[i]
        ax.imshow(img)
        if overlays is not None:
            ax.imshow(overlays[i], cmap="jet", alpha=0.4, extent=(0, img.shape[1], img.shape[0], 0),
                      interpolation="bilinear")
        ax.set_title(t, fontsize=7)
    if not len(images):
        axes.ravel()[0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def confident_mistakes(pred: pd.DataFrame, threshold: float, k: int) -> pd.DataFrame:
    """The k mistakes the model was surest of (false positives with the highest p, false negatives lowest)."""
    wrong = pred[(pred["probability_malignant"] >= threshold) != (pred["target"] == 1)].copy()
    wrong["confidence"] = np.where(wrong["target"] == 1, 1 - wrong["probability_malignant"],
                                   wrong["probability_malignant"])
    return wrong.sort_values(["confidence", "isic_id"], ascending=[False, True], kind="stable").head(k)


def save_figure(fig: Any, path: Path) -> None:
    from tasks.core.io import atomic_path

    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the stage
def _gradcam_figure(model: Any, images: np.ndarray, meta: np.ndarray | None, titles: list[str]) -> Any:
    from tasks.models.classifier import IMAGE_INPUT, METADATA_INPUT, gradcam, member_models

    member = member_models(model)[0]
    feeds = {IMAGE_INPUT: images.astype(np.float32)}
    if meta is not None:
        feeds[METADATA_INPUT] = meta
    cams = gradcam(member, feeds)
    return plot_gallery(list(images), titles, f"Grad-CAM ({member.name}, last conv layer)", cols=len(images) or 1,
                        overlays=list(cams))


CARD_ROW_COLUMNS = ("source", "isic_id", "split", "target", "age_approx", "sex", "anatom_site_1",
                    "anatom_site_general", "source_dataset", "path", "synthetic", "augmented_from")


def attach_card(cfg: Evaluate, paths: Paths, info: dict[str, Any], *, metrics: dict[str, Any], table: pd.DataFrame,
                calib: pd.DataFrame, config: dict[str, Any], index: pd.DataFrame, p: np.ndarray, y: np.ndarray,
                threshold: float) -> None:
    """The model card of this run (and of the version it registered): built here from what evaluate has,
    logged by tracking (model_card.md, the registry description, and the data rows the drift report compares
    new data with)."""
    from tasks import tracking
    from tasks.core.card import build_card, card_description, card_inputs, operating_point_ci
    from tasks.core.lineage import dvc_hash, git_state

    digest, digest_source = dvc_hash(paths.root, f"data/{INPUT_STAGE}")
    inputs = card_inputs(
        model_name=cfg.model_name, version=info.get("version"), run_id=info["run_id"], metrics=metrics,
        subgroups=table, model_config=config, index=index, calibration=calib,
        op_ci=operating_point_ci(p, y, threshold, n_bootstrap=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed),
        lineage={"data_hash": digest, "data_hash_source": digest_source, "data_out": f"data/{INPUT_STAGE}",
                 **git_state(paths.root)},
        created=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    card = build_card(inputs)
    rows = index[[c for c in CARD_ROW_COLUMNS if c in index]]
    tracking.log_card(info["run_id"], card, paths.root, inputs=inputs, rows=rows,
                      name=info.get("registered_model"), version=info.get("version"),
                      description=card_description(card, info["run_id"]))


def run(params: Any, paths: Paths) -> dict:
    """Score models/classifier.keras on the test split, write reports and plots, log + register in MLflow."""
    from tasks.models.inputs import load_config

    cfg: Evaluate = params.evaluate
    t0 = time.perf_counter()
    index = read_index(paths, INPUT_STAGE)
    check_columns(index, str(paths.index(INPUT_STAGE)))
    rows = test_rows(index)
    if rows.empty:
        raise InputError(f"{paths.index(INPUT_STAGE)}: no labelled test rows to evaluate")
    load_config(paths.models)  # a clear "run train first" when there is no model
    bundle = load_bundle(paths.models, paths.root)
    # The bundle's path for processed images: the preprocess stage already made exactly its model inputs.
    p, images = bundle.predict_processed([paths.abs(f) for f in rows["processed_path"]], rows)
    meta = bundle.metadata(rows)
    model = bundle.model
    y = rows["target"].to_numpy()
    threshold = bundle.threshold
    config = bundle.config

    metrics = score_predictions(p, y, threshold, n_bootstrap=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed,
                                bins=cfg.calibration_bins)
    groups = subgroup_frame(rows, cfg.age_bands)
    table = subgroup_table(groups, p, y, threshold)
    metrics["by_source"] = subgroup_summary(table, "source")
    for kind in ("dataset", "resolution"):  # shortcut subgroups, also as MLflow metrics (test.by_<kind>.<group>.*)
        if kind in groups:
            metrics[f"by_{kind}"] = subgroup_summary(table, kind)
    metrics["model_threshold"] = threshold
    metrics["target_sensitivity"] = config.get("target_sensitivity")

    out = paths.reports / STAGE
    pred = pd.DataFrame({"source": rows["source"], "isic_id": rows["isic_id"], "target": y,
                         "probability_malignant": p, "prediction": (p >= threshold).astype(int), **groups.drop(
                             columns="source")})
    write_table(pred, out / "predictions.csv")
    write_table(table, out / "subgroups.csv")
    roc, pr = roc_points(p, y), pr_points(p, y)
    calib, sweep = calibration_table(p, y, cfg.calibration_bins), threshold_sweep(p, y)
    write_table(roc, out / "roc.csv")
    write_table(pr, out / "pr.csv")
    write_table(calib, out / "calibration.csv")
    write_table(sweep, out / "thresholds.csv")
    labels = np.array(["benign", "malignant"])
    write_table(pd.DataFrame({"actual": labels[y], "predicted": labels[(p >= threshold).astype(int)]}),
                out / "confusion.csv")
    figures = plot_curves(roc, pr, calib, sweep, metrics)

    mistakes = confident_mistakes(pred, threshold, cfg.gallery)
    pos = {k: i for i, k in enumerate(zip(rows["source"], rows["isic_id"]))}
    idx = [pos[k] for k in zip(mistakes["source"], mistakes["isic_id"])]
    figures["mistakes"] = plot_gallery(
        [images[i] for i in idx],
        [f"{rows['isic_id'].iloc[i]}\n{'mal' if y[i] else 'ben'} p={p[i]:.2f}" for i in idx],
        f"Most confident mistakes (threshold {threshold:.3f})")
    if cfg.gradcam:
        # The surest malignant calls and the surest benign ones: what the model looks at either way.
        order = np.argsort(-p, kind="stable")
        pick = sorted(set(order[: (cfg.gradcam + 1) // 2].tolist() + order[::-1][: cfg.gradcam // 2].tolist()))
        figures["gradcam"] = _gradcam_figure(
            model, images[pick], None if meta is None else meta[pick],
            [f"{rows['isic_id'].iloc[i]}\n{'mal' if y[i] else 'ben'} p={p[i]:.2f}" for i in pick])
    for name, fig in figures.items():
        save_figure(fig, out / f"{name}.png")

    write_json(out / "metrics.json", round_floats(metrics))
    summary = {"auc": metrics["auc"], "auc_ci": [metrics["auc_ci_low"], metrics["auc_ci_high"]],
               "sensitivity_at_op": metrics["at_operating_point"]["sensitivity"],
               "specificity_at_op": metrics["at_operating_point"]["specificity"], "n_test": metrics["n"]}
    if cfg.mlflow:
        from tasks import tracking

        info = tracking.log_evaluation(cfg, paths, metrics=metrics, model_config=config,
                                       reports=[paths.reports / "train", out], test_index=rows,
                                       model_dir=paths.models, input_stage=INPUT_STAGE)
        write_json(out / "mlflow.json", info)
        summary["mlflow"] = info
        attach_card(cfg, paths, info, metrics=metrics, table=table, calib=calib, config=config, index=index,
                    p=p, y=y, threshold=threshold)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary
