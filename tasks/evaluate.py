"""evaluate stage: score the trained classifier on the frozen test split, plot, and track it in MLflow.

Pure scoring on arrays first (`score`: ROC AUC with a bootstrap CI, AP, Brier, ECE and the confusion-based
metrics at 0.5 and at the operating point stored with the model), then subgroup tables and plots, then
`score_model` (any model path / runs:/ / models:/ URI on a test index, applying the model's own stored
preprocessing to the raw images so a champion and a challenger are compared on equal terms), and last the
thin `run()`.

Outputs: reports/evaluate/metrics.json (DVC metrics), subgroups.csv, predictions.csv, roc.csv, pr.csv,
calibration.csv, thresholds.csv, confusion.csv (DVC plots) and PNGs (roc, pr, confusion, calibration,
thresholds, mistakes, gradcam); reports/evaluate/mlflow.json names the MLflow run and registered version.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from tasks.core.config import Evaluate, Params
from tasks.core.io import Paths, read_index, write_json, write_table

# The operating-point helpers live with train (which picks the threshold) so train's code deps stay small.
from tasks.train import as_arrays, binary_metrics, round_floats

STAGE = "evaluate"
SUBGROUPS = ("source", "dataset", "sex", "age_band", "site")  # dataset: `source_dataset` when the metadata has it


def log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pure scoring
def roc_auc(probabilities: Sequence[float], targets: Sequence[int]) -> float | None:
    """ROC AUC by ranks (ties averaged; None with a single class)."""
    p, y = as_arrays(probabilities, targets)
    return _auc_rows(p[None, :], y[None, :])[0]


def _auc_rows(p: np.ndarray, y: np.ndarray) -> list[float | None]:
    """Row-wise Mann-Whitney AUC of 2-D arrays (one bootstrap resample per row)."""
    from scipy.stats import rankdata

    ranks = rankdata(p, axis=1)
    n1 = y.sum(axis=1)
    n0 = y.shape[1] - n1
    s1 = (ranks * y).sum(axis=1)
    out: list[float | None] = []
    for a, b, s in zip(n1, n0, s1):
        out.append(float((s - a * (a + 1) / 2) / (a * b)) if a and b else None)
    return out


def auc_ci(probabilities: Sequence[float], targets: Sequence[int], n_bootstrap: int = 1000, ci: float = 0.95,
           seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of the ROC AUC (resamples with one class only are skipped)."""
    p, y = as_arrays(probabilities, targets)
    if n_bootstrap <= 0 or len(set(y.tolist())) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    for start in range(0, n_bootstrap, 200):  # chunks bound the memory of the (B, n) index array
        idx = rng.integers(0, len(p), size=(min(200, n_bootstrap - start), len(p)))
        aucs += [a for a in _auc_rows(p[idx], y[idx]) if a is not None]
    if not aucs:
        return None, None
    lo, hi = np.quantile(aucs, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(lo), float(hi)


def calibration_table(probabilities: Sequence[float], targets: Sequence[int], bins: int = 10) -> pd.DataFrame:
    """Equal-width probability bins: count, mean predicted, observed malignant fraction."""
    p, y = as_arrays(probabilities, targets)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    rows = []
    for b in range(bins):
        m = which == b
        rows.append({"bin": b, "lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(m.sum()),
                     "mean_predicted": float(p[m].mean()) if m.any() else None,
                     "fraction_malignant": float(y[m].mean()) if m.any() else None})
    return pd.DataFrame(rows)


def expected_calibration_error(probabilities: Sequence[float], targets: Sequence[int], bins: int = 10) -> float:
    """ECE: bin-weighted |observed - predicted| over equal-width bins."""
    table = calibration_table(probabilities, targets, bins)
    filled = table[table["count"] > 0]
    n = filled["count"].sum()
    return float((filled["count"] * (filled["fraction_malignant"] - filled["mean_predicted"]).abs()).sum() / n) \
        if n else 0.0


def score(probabilities: Sequence[float], targets: Sequence[int], *, threshold: float | None = None,
          n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0, bins: int = 10) -> dict[str, Any]:
    """All headline metrics of one set of predictions; `threshold` is the model's stored operating point."""
    from sklearn.metrics import average_precision_score

    p, y = as_arrays(probabilities, targets)
    both = len(set(y.tolist())) == 2
    lo, hi = auc_ci(p, y, n_bootstrap, ci, seed)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "n_malignant": int(y.sum()),
        "auc": roc_auc(p, y) if len(y) else None,
        "auc_ci_low": lo,
        "auc_ci_high": hi,
        "average_precision": float(average_precision_score(y, p)) if both else None,
        "brier": float(np.mean((p - y) ** 2)) if len(y) else None,
        "ece": expected_calibration_error(p, y, bins) if len(y) else None,
        "at_0.5": binary_metrics(p, y, 0.5),
    }
    if threshold is not None:
        out["at_operating_point"] = binary_metrics(p, y, threshold)
    return out


# --------------------------------------------------------------------------- subgroups
def age_band(age: pd.Series, edges: Sequence[float]) -> pd.Series:
    """'45-60' style bands (left-closed); 'unknown' where age is missing or outside the edges."""
    labels = [f"{edges[i]:g}-{edges[i + 1]:g}" for i in range(len(edges) - 1)]
    bands = pd.cut(pd.to_numeric(age, errors="coerce"), bins=list(edges), right=False, labels=labels)
    return bands.astype("string").fillna("unknown").astype(str)


def subgroup_frame(df: pd.DataFrame, edges: Sequence[float]) -> pd.DataFrame:
    """source, [dataset], sex, age_band and site per row (normalised text, 'unknown' when missing)."""
    from tasks.train import site_of

    sex = df["sex"].astype("string").str.strip().str.lower() if "sex" in df else pd.Series(pd.NA, index=df.index)
    groups = pd.DataFrame({
        "source": df["source"].astype(str),
        "sex": sex.where(sex.isin(["male", "female"]), "unknown").fillna("unknown").astype(str),
        "age_band": age_band(df["age_approx"] if "age_approx" in df else pd.Series(np.nan, index=df.index), edges),
        "site": site_of(df),
    }, index=df.index)
    if "source_dataset" in df:  # e.g. HAM10000 vs ISIC 2017 inside one ingest source: where does the model fail?
        groups.insert(1, "dataset", df["source_dataset"].astype("string").fillna("unknown").astype(str))
    return groups


def subgroup_table(groups: pd.DataFrame, probabilities: Sequence[float], targets: Sequence[int],
                   threshold: float) -> pd.DataFrame:
    """One row per (kind, group): the headline metrics without bootstrap (n is reported: small groups are noisy)."""
    p, y = as_arrays(probabilities, targets)
    rows = []
    for kind in SUBGROUPS:
        if kind not in groups:
            continue
        values = groups[kind].to_numpy()
        for g in sorted(set(values.tolist())):
            m = values == g
            s = score(p[m], y[m], threshold=threshold, n_bootstrap=0)
            op, half = s["at_operating_point"], s["at_0.5"]
            rows.append({"kind": kind, "group": g, "n": s["n"], "n_malignant": s["n_malignant"], "auc": s["auc"],
                         "average_precision": s["average_precision"], "brier": s["brier"], "ece": s["ece"],
                         **{f"{k}_at_0.5": half[k] for k in ("sensitivity", "specificity", "fn", "fp")},
                         **{f"{k}_at_op": op[k] for k in ("sensitivity", "specificity", "precision", "f1",
                                                         "balanced_accuracy", "fn", "fp")}})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- curves (CSV for dvc plots)
def roc_points(probabilities: Sequence[float], targets: Sequence[int]) -> pd.DataFrame:
    from sklearn.metrics import roc_curve

    p, y = as_arrays(probabilities, targets)
    fpr, tpr, thr = roc_curve(y, p)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)})


def pr_points(probabilities: Sequence[float], targets: Sequence[int]) -> pd.DataFrame:
    from sklearn.metrics import precision_recall_curve

    p, y = as_arrays(probabilities, targets)
    precision, recall, _ = precision_recall_curve(y, p)
    return pd.DataFrame({"recall": recall, "precision": precision})


def threshold_sweep(probabilities: Sequence[float], targets: Sequence[int], steps: int = 101) -> pd.DataFrame:
    """Metric-vs-threshold curves: sensitivity, specificity, precision, F1, balanced accuracy."""
    p, y = as_arrays(probabilities, targets)
    rows = []
    for t in np.linspace(0, 1, steps):
        m = binary_metrics(p, y, float(t))
        rows.append({k: m[k] for k in ("threshold", "sensitivity", "specificity", "precision", "f1",
                                       "balanced_accuracy")})
    return pd.DataFrame(rows)


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


# --------------------------------------------------------------------------- models on index tables
def test_rows(index: pd.DataFrame) -> pd.DataFrame:
    """The frozen test split: labelled, original (no offline copies, no synthetic images)."""
    from tasks.train import select_rows

    return select_rows(index, "test")


def score_model(model_uri_or_path: str | Path, index_or_params: pd.DataFrame | Params, paths: Paths, *,
                n_bootstrap: int | None = None, seed: int = 0, with_predictions: bool = False) -> dict[str, Any]:
    """Score any model (folder/.keras path, runs:/ or models:/ URI) on the frozen test split.

    `index_or_params`: an index table (its test rows are used), or Params (then the index train reads,
    data/<INPUT_STAGE>/index.parquet under paths, and evaluate's bootstrap count). Each model applies its own
    stored preprocessing to the raw images (`path`), exactly as `predict` does, so a champion trained at
    another size or with other preprocessing is scored on the same test images. Top-level `auc`,
    `false_negatives`, `false_positives`, `sensitivity`, `specificity` are at the model's own operating point.
    """
    from tasks.predict import load_bundle
    from tasks.train import INPUT_STAGE

    if isinstance(index_or_params, Params):
        index_df = read_index(paths, INPUT_STAGE)
        n_boot = index_or_params.evaluate.bootstrap if n_bootstrap is None else n_bootstrap
        seed = index_or_params.evaluate.seed
    else:
        index_df, n_boot = index_or_params, 1000 if n_bootstrap is None else n_bootstrap
    rows = test_rows(index_df)
    if rows.empty:
        raise ValueError("no labelled test rows in the index")
    if "path" not in rows:
        raise ValueError("index has no `path` column (raw image path); pass an index from ingest or later")
    bundle = load_bundle(model_uri_or_path, paths.root)
    meta_cols = [c for c in ("age_approx", "sex", "anatom_site_1", "anatom_site_general") if c in rows]
    preds = bundle.predict_frame(pd.DataFrame({"path": [str(paths.abs(p)) for p in rows["path"]],
                                               **{c: rows[c].to_numpy() for c in meta_cols}}))
    ok = preds["error"].isna().to_numpy()
    out = score(preds.loc[ok, "probability_malignant"], rows.loc[ok, "target"], threshold=bundle.threshold,
                n_bootstrap=n_boot, seed=seed)
    op = out["at_operating_point"]
    out.update({"false_negatives": op["fn"], "false_positives": op["fp"], "sensitivity": op["sensitivity"],
                "specificity": op["specificity"], "n_errors": int((~ok).sum()), "model": str(model_uri_or_path)})
    if with_predictions:
        out["predictions"] = pd.DataFrame({"source": rows["source"], "isic_id": rows["isic_id"],
                                           "target": rows["target"],
                                           "probability_malignant": preds["probability_malignant"],
                                           "error": preds["error"]}).to_dict("records")
    return out


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


def run(params: Params, paths: Paths) -> dict:
    """Score models/classifier.keras on the test split, write reports and plots, log + register in MLflow."""
    from tasks.models.classifier import load_keras
    from tasks.train import (
        INPUT_STAGE,
        MODEL_FILE,
        check_columns,
        encode_metadata,
        load_config,
        load_val_images,
        predict_proba,
    )

    cfg: Evaluate = params.evaluate
    t0 = time.perf_counter()
    index = read_index(paths, INPUT_STAGE)
    check_columns(index, str(paths.index(INPUT_STAGE)))
    rows = test_rows(index)
    if rows.empty:
        raise ValueError(f"{paths.index(INPUT_STAGE)}: no labelled test rows to evaluate")
    config = load_config(paths.models)
    model = load_keras(paths.models / MODEL_FILE)
    size = int(config["image_size"])
    images = load_val_images([str(paths.abs(p)) for p in rows["processed_path"]], size)
    meta = encode_metadata(rows, config["metadata"]) if config.get("metadata") else None
    p = predict_proba(model, images, meta, tta=int(config.get("tta", 0)))
    y = rows["target"].to_numpy()
    threshold = float(config["threshold"])

    metrics = score(p, y, threshold=threshold, n_bootstrap=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed,
                    bins=cfg.calibration_bins)
    groups = subgroup_frame(rows, cfg.age_bands)
    table = subgroup_table(groups, p, y, threshold)
    metrics["by_source"] = {
        r["group"]: {"n": r["n"], "auc": r["auc"], "sensitivity_at_op": r["sensitivity_at_op"],
                     "specificity_at_op": r["specificity_at_op"]}
        for r in table[table["kind"] == "source"].to_dict("records")}
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

        info = tracking.log_evaluation(params, paths, metrics=metrics, reports=[paths.reports / "train", out],
                                       test_index=rows, model_dir=paths.models,
                                       register_model=cfg.register_model)
        write_json(out / "mlflow.json", info)
        summary["mlflow"] = info
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary
