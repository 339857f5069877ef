"""Binary-classifier metrics on plain arrays: the one implementation train, evaluate and the promotion gate share.

Operating point (`threshold_for_sensitivity`, `binary_metrics`), ranking metrics (`roc_auc` by ranks with ties
averaged, percentile-bootstrap `auc_ci`), calibration (`calibration_table`, `expected_calibration_error`), the
headline `score`, curves for DVC plots (`roc_points`, `pr_points`, `threshold_sweep`) and subgroup tables.
Pure numpy/pandas (scipy/sklearn imported inside functions); no TensorFlow, no MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

# dataset: `source_dataset`, resolution: the raw image's size band; each only when the index has the columns.
SUBGROUPS = ("source", "dataset", "resolution", "sex", "age_band", "site")
# Shorter side of the raw image, in pixels: the bands' lower edges (HAM10000's 600x450, ISIC 2020's 1024+ and
# UDA-1's 2000+ px originals land in different bands, so a model keyed on resolution shows it).
RESOLUTION_EDGES = (256, 512, 1024, 2048)
# Raw-size columns, most trusted first: the archive's declared size, a local metadata's original size
# ('WxH' text; isic-real's `orig_size`: its stored copies are downscaled), clean's decoded size of the file.
SIZE_COLUMNS = (("pixels_x", "pixels_y"), ("orig_size",), ("image_width", "image_height"))


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


def round_floats(obj: Any, digits: int = 6) -> Any:
    """Floats in nested dicts/lists rounded, so reports read well and diff cleanly."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [round_floats(v, digits) for v in obj]
    return obj


def sklearn_auc(targets: Sequence[int], probabilities: Sequence[float]) -> float | None:
    """sklearn's ROC AUC (None with a single class); train's reports use it."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(targets)
    return float(roc_auc_score(y, probabilities)) if len(set(y.tolist())) == 2 else None


# --------------------------------------------------------------------------- ranking
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


# --------------------------------------------------------------------------- calibration
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


# --------------------------------------------------------------------------- headline score
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


def has_raw_size(df: pd.DataFrame) -> bool:
    """Whether the index has any raw-size column (`SIZE_COLUMNS`)."""
    return any(all(c in df for c in cols) for cols in SIZE_COLUMNS)


def raw_size(df: pd.DataFrame) -> pd.DataFrame:
    """width, height (float, NaN when unknown) of each row's raw image: per row the first `SIZE_COLUMNS` source
    that has a positive size."""
    width = pd.Series(np.nan, index=df.index, dtype="float64")
    height = pd.Series(np.nan, index=df.index, dtype="float64")
    for cols in SIZE_COLUMNS:
        if not all(c in df for c in cols):
            continue
        if len(cols) == 1:  # 'WxH' text
            parts = df[cols[0]].astype("string").str.strip().str.lower().str.extract(r"^(\d+)\s*x\s*(\d+)$")
            w, h = (pd.to_numeric(parts[i], errors="coerce").astype("float64") for i in (0, 1))
        else:
            w, h = (pd.to_numeric(df[c], errors="coerce").astype("float64") for c in cols)
        fill = width.isna() & (w > 0) & (h > 0)
        width, height = width.mask(fill, w), height.mask(fill, h)
    return pd.DataFrame({"width": width, "height": height}, index=df.index)


def resolution_band(width: pd.Series, height: pd.Series, edges: Sequence[int] = RESOLUTION_EDGES) -> pd.Series:
    """Band of the shorter side ('0-255', '256-511', ..., '2048-up', 'unknown'), as an ordered categorical so
    tables list the bands small to large."""
    labels = [f"{a}-{b - 1}" for a, b in zip([0, *edges], edges)] + [f"{edges[-1]}-up"]  # MLflow-safe names
    short = np.minimum(pd.to_numeric(width, errors="coerce"), pd.to_numeric(height, errors="coerce"))  # NaN stays
    bands = pd.cut(short, bins=[0, *edges, np.inf], right=False, labels=labels).astype("string").fillna("unknown")
    return pd.Series(pd.Categorical(bands.astype(str), categories=[*labels, "unknown"], ordered=True),
                     index=width.index, name="resolution")


def subgroup_table(groups: pd.DataFrame, probabilities: Sequence[float], targets: Sequence[int],
                   threshold: float) -> pd.DataFrame:
    """One row per (kind, group): the headline metrics without bootstrap (n is reported: small groups are noisy).
    Groups are sorted by name, or in category order for a categorical column (resolution bands)."""
    p, y = as_arrays(probabilities, targets)
    rows = []
    for kind in SUBGROUPS:
        if kind not in groups:
            continue
        column = groups[kind]
        values = column.astype(str).to_numpy()
        present = set(values.tolist())
        order = ([str(c) for c in column.cat.categories if str(c) in present]
                 if isinstance(column.dtype, pd.CategoricalDtype) else sorted(present))
        for g in order:
            m = values == g
            s = score(p[m], y[m], threshold=threshold, n_bootstrap=0)
            op, half = s["at_operating_point"], s["at_0.5"]
            rows.append({"kind": kind, "group": g, "n": s["n"], "n_malignant": s["n_malignant"], "auc": s["auc"],
                         "average_precision": s["average_precision"], "brier": s["brier"], "ece": s["ece"],
                         **{f"{k}_at_0.5": half[k] for k in ("sensitivity", "specificity", "fn", "fp")},
                         **{f"{k}_at_op": op[k] for k in ("sensitivity", "specificity", "precision", "f1",
                                                         "balanced_accuracy", "fn", "fp")}})
    return pd.DataFrame(rows)


def subgroup_summary(table: pd.DataFrame, kind: str) -> dict[str, dict[str, Any]]:
    """{group: n, auc, sensitivity/specificity at the operating point} of one kind (metrics.json `by_<kind>`)."""
    if table.empty:
        return {}
    return {str(r["group"]): {"n": r["n"], "auc": r["auc"], "sensitivity_at_op": r["sensitivity_at_op"],
                              "specificity_at_op": r["specificity_at_op"]}
            for r in table[table["kind"] == kind].to_dict("records")}


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
