"""Data drift between a reference set (what a model was trained on) and new data (pure; numpy/scipy/sklearn).

Three kinds of evidence, each with a test and an effect size, because at ISIC scale (10^4-10^5 images) any
difference is "significant" and only the effect size says whether it matters:
- metadata: chi-square test of homogeneity for categoricals (sex, site, source, source dataset, class balance)
  with Cramér's V as the effect; two-sample Kolmogorov-Smirnov for age with the KS statistic D as the effect;
- image statistics (brightness, contrast, mean R/G/B, width, height) per image: KS test per statistic, and the
  standardised mean difference (SMD, in pooled standard deviations) as the effect;
- embedding shift: a classifier two-sample test (logistic regression told to separate new from reference
  features, cross-validated ROC AUC; 0.5 = indistinguishable) with a normal-approximation p-value, plus the
  RBF-kernel MMD² with a permutation p-value.
A check drifts when its p-value is below `alpha` AND its effect reaches the check's threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

CATEGORICAL = ("sex", "site", "source", "dataset", "target")
NUMERIC = ("age_approx",)
IMAGE_STATS = ("brightness", "contrast", "red", "green", "blue", "width", "height")
SITE_COLUMNS = ("anatom_site_general", "anatom_site_1")


@dataclass(frozen=True)
class Thresholds:
    """When a check counts as drift (p < alpha and effect >= the check's threshold)."""

    alpha: float = 0.01
    categorical_effect: float = 0.1  # Cramér's V
    numeric_effect: float = 0.1  # KS statistic D (max CDF distance)
    image_effect: float = 0.5  # |standardised mean difference|
    embedding_auc: float = 0.7  # two-sample classifier AUC
    min_new: int = 20  # fewer new rows: report the numbers but call nothing drift

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- metadata columns
def metadata_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Normalised drift columns of an index: sex, site, source, dataset (source_dataset), target, age_approx;
    missing values become 'unknown' (categoricals) / NaN (age)."""
    def text(col: pd.Series) -> pd.Series:
        s = col.astype("string").str.strip().str.lower()
        return s.mask(s.isin(["", "nan", "none", "null"])).fillna("unknown").astype(str)

    missing = pd.Series(pd.NA, index=df.index, dtype="string")
    site = missing
    for col in SITE_COLUMNS:
        if col in df:
            site = site.fillna(df[col].astype("string"))
    sex = text(df["sex"]) if "sex" in df else text(missing)
    out = pd.DataFrame({
        "sex": sex.where(sex.isin(["male", "female", "unknown"]), "unknown"),
        "site": text(site),
        "source": text(df["source"]) if "source" in df else text(missing),
        "dataset": (df["source_dataset"].astype("string").fillna("unknown").astype(str) if "source_dataset" in df
                    else text(missing)),
        "target": (pd.to_numeric(df["target"], errors="coerce").map({0: "benign", 1: "malignant"})
                   .fillna("unknown").astype(str) if "target" in df else text(missing)),
        "age_approx": pd.to_numeric(df["age_approx"], errors="coerce") if "age_approx" in df else np.nan,
    }, index=df.index)
    return out


# --------------------------------------------------------------------------- tests
def categorical_test(reference: Sequence[Any], new: Sequence[Any]) -> dict[str, Any]:
    """Chi-square test of homogeneity (2 x K table) and Cramér's V; the share of each category per side."""
    from scipy.stats import chi2_contingency

    ref = pd.Series(list(reference), dtype=object).astype(str)
    cur = pd.Series(list(new), dtype=object).astype(str)
    cats = sorted(set(ref) | set(cur))
    table = np.array([[int((ref == c).sum()) for c in cats], [int((cur == c).sum()) for c in cats]])
    shares = {"reference": _shares(table[0], cats), "new": _shares(table[1], cats)}
    out: dict[str, Any] = {"test": "chi-square", "n_reference": int(len(ref)), "n_new": int(len(cur)),
                           "categories": cats, **shares}
    if len(ref) == 0 or len(cur) == 0:
        return {**out, "statistic": None, "p_value": None, "effect": None}
    keep = table.sum(0) > 0
    table = table[:, keep]
    if table.shape[1] < 2:  # one category on both sides: identical distributions
        return {**out, "statistic": 0.0, "p_value": 1.0, "effect": 0.0}
    stat, p, _, _ = chi2_contingency(table, correction=False)
    n = table.sum()
    v = math.sqrt(stat / (n * (min(table.shape) - 1)))
    return {**out, "statistic": float(stat), "p_value": float(p), "effect": float(v), "effect_name": "cramers_v"}


def _shares(counts: np.ndarray, cats: Sequence[str]) -> dict[str, float]:
    total = counts.sum()
    return {c: (float(k / total) if total else 0.0) for c, k in zip(cats, counts)}


def numeric_test(reference: Sequence[float], new: Sequence[float]) -> dict[str, Any]:
    """Two-sample Kolmogorov-Smirnov test (missing values dropped; their share reported)."""
    from scipy.stats import ks_2samp

    ref = np.asarray(reference, float)
    cur = np.asarray(new, float)
    r, c = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
    out: dict[str, Any] = {"test": "ks", "n_reference": int(len(r)), "n_new": int(len(c)),
                           "missing_reference": float(1 - len(r) / len(ref)) if len(ref) else None,
                           "missing_new": float(1 - len(c) / len(cur)) if len(cur) else None,
                           "mean_reference": float(r.mean()) if len(r) else None,
                           "mean_new": float(c.mean()) if len(c) else None,
                           "median_reference": float(np.median(r)) if len(r) else None,
                           "median_new": float(np.median(c)) if len(c) else None}
    if len(r) < 2 or len(c) < 2:
        return {**out, "statistic": None, "p_value": None, "effect": None}
    res = ks_2samp(r, c)
    return {**out, "statistic": float(res.statistic), "p_value": float(res.pvalue), "effect": float(res.statistic),
            "effect_name": "ks_d"}


def smd(reference: np.ndarray, new: np.ndarray) -> float | None:
    """Standardised mean difference (new - reference) / pooled SD; 0 when both sides are constant and equal."""
    r, c = np.asarray(reference, float), np.asarray(new, float)
    if len(r) < 2 or len(c) < 2:
        return None
    pooled = math.sqrt((r.var(ddof=1) + c.var(ddof=1)) / 2)
    diff = float(c.mean() - r.mean())
    if pooled == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / pooled


# --------------------------------------------------------------------------- images
def image_stats(image: np.ndarray) -> dict[str, float]:
    """Brightness (mean luma, 0-255), contrast (luma SD), mean R/G/B, width and height of one RGB uint8 image."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    rgb = img[..., :3].astype(np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    means = rgb.reshape(-1, 3).mean(0)
    return {"brightness": float(luma.mean()), "contrast": float(luma.std()), "red": float(means[0]),
            "green": float(means[1]), "blue": float(means[2]), "width": float(img.shape[1]),
            "height": float(img.shape[0])}


def image_shift(reference: pd.DataFrame, new: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per image statistic: KS test and SMD (the effect)."""
    out = {}
    for col in IMAGE_STATS:
        if col not in reference or col not in new:
            continue
        t = numeric_test(reference[col], new[col])
        d = smd(reference[col].dropna().to_numpy(), new[col].dropna().to_numpy())
        out[col] = {**{k: t[k] for k in ("test", "n_reference", "n_new", "mean_reference", "mean_new", "statistic",
                                         "p_value")},
                    "effect": None if d is None else (float(d) if math.isfinite(d) else d), "effect_name": "smd"}
    return out


# --------------------------------------------------------------------------- embeddings
def classifier_auc(reference: np.ndarray, new: np.ndarray, *, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Classifier two-sample test: cross-validated ROC AUC of a logistic regression separating new from reference
    rows (standardised features). p-value: one-sided, normal approximation of the Mann-Whitney null."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([np.asarray(reference, float), np.asarray(new, float)])
    y = np.r_[np.zeros(len(reference), int), np.ones(len(new), int)]
    n0, n1 = len(reference), len(new)
    k = min(folds, n0, n1)
    if k < 2:
        return {"test": "classifier-auc", "n_reference": n0, "n_new": n1, "auc": None, "p_value": None,
                "effect": None}
    scores = np.zeros(len(y))
    for train, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"))
        clf.fit(x[train], y[train])
        scores[test] = clf.decision_function(x[test])
    auc = float(roc_auc_score(y, scores))
    sd = math.sqrt((n0 + n1 + 1) / (12 * n0 * n1))
    from scipy.stats import norm

    p = float(norm.sf((auc - 0.5) / sd))
    return {"test": "classifier-auc", "n_reference": n0, "n_new": n1, "auc": auc, "p_value": p, "effect": auc,
            "effect_name": "auc", "folds": k, "dim": int(x.shape[1])}


def mmd_rbf(reference: np.ndarray, new: np.ndarray, *, permutations: int = 200, max_n: int = 500,
            seed: int = 0) -> dict[str, Any]:
    """Unbiased MMD² with an RBF kernel (median-distance bandwidth) and a permutation p-value; each side is
    subsampled to `max_n` rows (the kernel matrix is quadratic)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(reference, float), np.asarray(new, float)
    if len(a) > max_n:
        a = a[rng.choice(len(a), max_n, replace=False)]
    if len(b) > max_n:
        b = b[rng.choice(len(b), max_n, replace=False)]
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        return {"test": "mmd", "mmd2": None, "p_value": None, "n_reference": n, "n_new": m}
    z = np.concatenate([a, b])
    mu, sd = z.mean(0), z.std(0)
    z = (z - mu) / np.where(sd > 0, sd, 1)
    sq = np.maximum(np.sum(z ** 2, 1)[:, None] + np.sum(z ** 2, 1)[None, :] - 2 * z @ z.T, 0)
    med = np.median(sq[np.triu_indices(len(z), 1)])
    kernel = np.exp(-sq / (med if med > 0 else 1.0))
    np.fill_diagonal(kernel, 0.0)

    def stat(idx_a: np.ndarray, idx_b: np.ndarray) -> float:
        kaa = kernel[np.ix_(idx_a, idx_a)].sum() / (n * (n - 1))
        kbb = kernel[np.ix_(idx_b, idx_b)].sum() / (m * (m - 1))
        kab = kernel[np.ix_(idx_a, idx_b)].mean()
        return float(kaa + kbb - 2 * kab)

    idx = np.arange(n + m)
    observed = stat(idx[:n], idx[n:])
    exceed = 0
    for _ in range(permutations):
        perm = rng.permutation(n + m)
        exceed += stat(perm[:n], perm[n:]) >= observed
    return {"test": "mmd", "mmd2": observed, "p_value": float((exceed + 1) / (permutations + 1)),
            "n_reference": n, "n_new": m, "permutations": permutations}


# --------------------------------------------------------------------------- the report
def _verdict(check: Mapping[str, Any], effect_threshold: float, alpha: float, absolute: bool = False) -> bool:
    p, e = check.get("p_value"), check.get("effect")
    if p is None or e is None:
        return False
    e = abs(e) if absolute else e
    return bool(p < alpha and e >= effect_threshold)


def drift_report(reference: pd.DataFrame, new: pd.DataFrame, *, thresholds: Thresholds = Thresholds(),
                 reference_images: pd.DataFrame | None = None, new_images: pd.DataFrame | None = None,
                 reference_features: np.ndarray | None = None, new_features: np.ndarray | None = None,
                 seed: int = 0, mmd_permutations: int = 200) -> dict[str, Any]:
    """All checks between two index tables (and their image statistics / embeddings when given).

    Returns {status, drifted, reasons, n_reference, n_new, thresholds, metadata, images, embedding}; status is
    `drift`, `ok`, `too-few` (fewer than thresholds.min_new new rows: nothing is called drift) or `no-new-data`.
    """
    t = thresholds
    ref, cur = metadata_frame(reference), metadata_frame(new)
    report: dict[str, Any] = {"n_reference": int(len(ref)), "n_new": int(len(cur)), "thresholds": t.as_dict(),
                              "metadata": {}, "images": {}, "embedding": {}}
    reasons: list[str] = []
    for col in CATEGORICAL:
        if (ref[col] == "unknown").all() and (cur[col] == "unknown").all():
            continue  # column absent on both sides
        c = categorical_test(ref[col], cur[col])
        c["drift"] = _verdict(c, t.categorical_effect, t.alpha)
        report["metadata"][col] = c
        if c["drift"]:
            top = max(c["categories"], key=lambda k: abs(c["new"][k] - c["reference"][k]))
            reasons.append(f"{col}: chi-square p={c['p_value']:.2g}, Cramér's V {c['effect']:.2f} "
                           f"({top}: {c['reference'][top]:.0%} -> {c['new'][top]:.0%})")
    for col in NUMERIC:
        c = numeric_test(ref[col], cur[col])
        c["drift"] = _verdict(c, t.numeric_effect, t.alpha)
        report["metadata"][col] = c
        if c["drift"]:
            reasons.append(f"{col}: KS p={c['p_value']:.2g}, D {c['effect']:.2f} "
                           f"(median {c['median_reference']:g} -> {c['median_new']:g})")
    if reference_images is not None and new_images is not None and len(reference_images) and len(new_images):
        for col, c in image_shift(reference_images, new_images).items():
            c["drift"] = _verdict(c, t.image_effect, t.alpha, absolute=True)
            report["images"][col] = c
            if c["drift"]:
                reasons.append(f"image {col}: KS p={c['p_value']:.2g}, SMD {c['effect']:+.2f} "
                               f"(mean {c['mean_reference']:.1f} -> {c['mean_new']:.1f})")
    if reference_features is not None and new_features is not None and len(reference_features) \
            and len(new_features):
        c = classifier_auc(reference_features, new_features, seed=seed)
        c["drift"] = _verdict(c, t.embedding_auc, t.alpha)
        report["embedding"]["classifier"] = c
        if mmd_permutations:
            report["embedding"]["mmd"] = mmd_rbf(reference_features, new_features, permutations=mmd_permutations,
                                                 seed=seed)
        if c["drift"]:
            reasons.append(f"embedding: a classifier tells new from reference with AUC {c['auc']:.2f} "
                           f"(p={c['p_value']:.2g})")
    if len(cur) == 0:
        status = "no-new-data"
    elif len(cur) < t.min_new:
        status = "too-few"
    else:
        status = "drift" if reasons else "ok"
    report.update(status=status, drifted=status == "drift", reasons=reasons if status == "drift" else [])
    if status == "too-few":
        report["note"] = f"{len(cur)} new rows < min_new {t.min_new}: numbers reported, nothing called drift"
    return report


def summary_line(report: Mapping[str, Any]) -> str:
    """One line for logs: status, counts and the reasons."""
    head = f"drift {report['status']}: {report['n_new']} new vs {report['n_reference']} reference rows"
    return head + ("; " + "; ".join(report["reasons"]) if report.get("reasons") else "")
