"""Ugly-duckling ranking: how much each lesion differs from the same patient's other lesions.

Score (documented choice): embeddings are the classifier's penultimate layer (`lf_features`, the pooled image
features before the head; members of an ensemble are concatenated), L2-normalised so the score measures
direction (appearance) rather than activation magnitude. Images of one lesion are averaged into a lesion
vector; a lesion's `ud_score` is the Euclidean distance of its vector to the centroid of the patient's OTHER
lesions (leave-one-out), so several photos of one lesion never pull their own centroid. `ud_rank` 1 = most
odd within the patient. Only patients with >= `min_lesions` distinct lesions are scored (with two, both
lesions are equally odd). The score is a triage signal, not a diagnosis.

Stage `ugly_duckling`: cleaned index (patient_id, target) + preprocessed images -> embedding and probability
per image from models/, scores/ranks per patient, t-SNE plot, metrics (within-patient AUC of ud_score for
malignant vs benign, top-1 hit rate; and the same on synthetic patients with one planted odd lesion).
The outlier math is tasks/core/outliers.py; embeddings and probabilities come from the model bundle's `Scorer`
(tasks/models/bundle.py), the same scoring path as evaluate, predict and screen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.errors import InputError
from tasks.core.io import Paths, atomic_path, progress, read_index, write_index, write_json, write_table
from tasks.core.outliers import l2_normalise, loo_centroid_scores, rank_desc
from tasks.models.bundle import Scorer, is_uri, load_bundle
from tasks.models.inputs import read_image

STAGE = "ugly_duckling"
SCORE_COLUMNS = ["ud_score", "ud_rank", "ud_lesions"]


# --------------------------------------------------------------------------- scores (pure)
def score_patients(df: pd.DataFrame, emb: np.ndarray, min_lesions: int = 3, patient_col: str = "patient_id",
                   lesion_col: str | None = "lesion_id") -> pd.DataFrame:
    """ud_score, ud_rank (1 = most odd lesion of the patient; photos of one lesion share it) and ud_lesions
    (distinct lesions of the patient) per row; rows of patients with fewer than `min_lesions` lesions (or no
    patient_id) get NaN / <NA>."""
    if len(df) != len(emb):
        raise ValueError(f"{len(df)} rows but {len(emb)} embeddings")
    if patient_col not in df:
        raise InputError(f"index has no `{patient_col}` column: ugly-duckling ranking needs patients")
    emb = l2_normalise(emb)
    out = df.copy()
    scores = np.full(len(df), np.nan)
    ranks = pd.array([pd.NA] * len(df), dtype="Int64")
    n_les = pd.array([pd.NA] * len(df), dtype="Int64")
    lesion = (df[lesion_col] if lesion_col and lesion_col in df else pd.Series([None] * len(df), index=df.index))
    lesion = lesion.astype(object).where(lesion.notna(), pd.Series([f"__row{i}" for i in range(len(df))],
                                                                    index=df.index))
    pos = np.arange(len(df))
    for _, idx in df.groupby(df[patient_col].where(df[patient_col].notna()), sort=True).indices.items():
        idx = pos[idx]
        groups = lesion.iloc[idx].to_numpy()
        k = len(pd.unique(groups))
        n_les[idx] = k
        if k < min_lesions:
            continue
        s = loo_centroid_scores(emb[idx], groups)
        scores[idx] = s
        # Rank lesions, not photos: every photo of a lesion carries the lesion's rank.
        first = pd.Series(s, index=groups).groupby(level=0, sort=False).first()
        lesion_rank = dict(zip(first.index, rank_desc(first.to_numpy())))
        ranks[idx] = [lesion_rank[g] for g in groups]
    out["ud_score"] = scores
    out["ud_rank"] = ranks
    out["ud_lesions"] = n_les
    return out


def _pair_counts(score: np.ndarray, target: np.ndarray) -> tuple[float, int]:
    """(concordant + ties/2, pairs) over (malignant, benign) pairs."""
    pos, neg = score[target == 1], score[target == 0]
    if not len(pos) or not len(neg):
        return 0.0, 0
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).sum() + 0.5 * (diff == 0).sum()), int(diff.size)


def within_patient_metrics(scored: pd.DataFrame, score_col: str = "ud_score", target_col: str = "target",
                           patient_col: str = "patient_id", lesion_col: str | None = "lesion_id") -> dict[str, Any]:
    """How well `score_col` separates malignant from benign lesions INSIDE each patient.

    auc_pooled: share of within-patient (malignant, benign) lesion pairs the score orders right (0.5 = chance);
    auc_patient_mean: mean of per-patient AUCs; top1_hit_rate: share of patients with a malignant lesion whose
    rank-1 lesion is malignant, beside top1_chance (expected rate when ranking at random).
    """
    d = scored[scored[score_col].notna() & scored[target_col].notna()]
    if lesion_col and lesion_col in d:  # one row per lesion: photos of one lesion are one decision
        key = d[lesion_col].astype(object).where(d[lesion_col].notna(), d.index.to_series().astype(str))
        d = d.assign(_lesion=key.to_numpy()).drop_duplicates([patient_col, "_lesion"])
    conc, pairs, aucs, hits, chance, n_pat = 0.0, 0, [], 0, 0.0, 0
    for _, g in d.groupby(patient_col, sort=True):
        s = g[score_col].to_numpy(np.float64)
        t = g[target_col].to_numpy(np.int64)
        c, p = _pair_counts(s, t)
        conc, pairs = conc + c, pairs + p
        if p:
            aucs.append(c / p)
        if t.sum() > 0:
            n_pat += 1
            hits += int(t[int(np.argmax(s))] == 1)
            chance += t.mean()
    return {
        "patients": int(d[patient_col].nunique()),
        "lesions": int(len(d)),
        "patients_with_both_classes": len(aucs),
        "pairs": pairs,
        "auc_pooled": None if not pairs else round(conc / pairs, 4),
        "auc_patient_mean": None if not aucs else round(float(np.mean(aucs)), 4),
        "patients_with_malignant": n_pat,
        "top1_hit_rate": None if not n_pat else round(hits / n_pat, 4),
        "top1_chance": None if not n_pat else round(chance / n_pat, 4),
    }


# --------------------------------------------------------------------------- synthetic patients
def synthetic_patients(n_patients: int, lesions: int, seed: int,
                       size: int = 128) -> tuple[list[np.ndarray], pd.DataFrame]:
    """Close-up RGB photos of `n_patients` synthetic patients: `lesions - 1` benign lesions sharing the
    patient's signature nevus and one malignant (the planted ugly duckling, target 1)."""
    import cv2

    from tasks.fake.lesions import render_image, sample_lesion, sample_patient_style

    if lesions < 3:
        raise InputError("synthetic patients need >= 3 lesions (one odd + two to compare with)")
    rng = np.random.default_rng(seed)
    images, rows = [], []
    for p in range(n_patients):
        style = sample_patient_style(rng)
        odd = int(rng.integers(0, lesions))
        for i in range(lesions):
            spec = sample_lesion(rng, "malignant" if i == odd else "benign", style)
            images.append(cv2.cvtColor(render_image(spec, style, rng, size, size), cv2.COLOR_BGR2RGB))
            rows.append({"patient_id": f"SP_{p:04d}", "lesion_id": f"SL_{p:04d}_{i}", "target": int(i == odd)})
    return images, pd.DataFrame(rows)


# --------------------------------------------------------------------------- plot
def tsne_embedding(emb: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """2-D t-SNE of L2-normalised embeddings (perplexity capped below n, as sklearn requires)."""
    from sklearn.manifold import TSNE

    x = l2_normalise(emb)
    if len(x) < 3:
        return np.zeros((len(x), 2))
    perp = float(min(perplexity, max(1.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perp, random_state=seed, init="pca").fit_transform(x)


def _empty_plot(out: Path, text: str) -> None:
    """A placeholder figure, so a declared plot exists even when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2))
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.axis("off")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_tsne(xy: np.ndarray, scored: pd.DataFrame, out: Path, label_patients: int = 8) -> Path:
    """Scatter coloured by class; each patient's lesions joined to their centroid, the largest patients
    labelled, rank-1 lesions ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.core.io import atomic_path

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    pats = scored["patient_id"].to_numpy()
    for pid in pd.unique(pats):
        m = pats == pid
        if m.sum() < 2:
            continue
        c = xy[m].mean(axis=0)
        for p in xy[m]:
            ax.plot([c[0], p[0]], [c[1], p[1]], color="0.8", lw=0.5, zorder=1)
    t = scored["target"].to_numpy()
    for val, colour, name in ((0, "tab:blue", "benign"), (1, "tab:red", "malignant")):
        m = t == val
        ax.scatter(xy[m, 0], xy[m, 1], s=14, c=colour, label=name, zorder=2)
    top = (scored["ud_rank"] == 1).fillna(False).to_numpy(bool)
    ax.scatter(xy[top, 0], xy[top, 1], s=70, facecolors="none", edgecolors="k", lw=1.0, label="ud_rank 1", zorder=3)
    sizes = scored.groupby("patient_id").size().sort_values(ascending=False)
    for pid in sizes.index[:label_patients]:
        c = xy[pats == pid].mean(axis=0)
        ax.annotate(str(pid), c, fontsize=7, color="0.25", zorder=4)
    ax.set_title(f"t-SNE of classifier embeddings ({len(xy)} images, {scored['patient_id'].nunique()} patients)")
    ax.legend(loc="best", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- stage
def select_patients(clean: pd.DataFrame, min_lesions: int, max_patients: int | None, seed: int) -> pd.DataFrame:
    """Rows of patients with >= min_lesions distinct lesions (target 0/1 only), optionally a seeded sample of them."""
    for col in ("patient_id", "target", "path"):
        if col not in clean:
            raise InputError(f"data/clean/index.parquet has no `{col}` column; rerun `lesionflow stage clean`")
    d = clean[clean["patient_id"].notna() & clean["target"].notna()].copy()
    lesion = d["lesion_id"].where(d["lesion_id"].notna(), d["isic_id"]) if "lesion_id" in d else d["isic_id"]
    n_les = lesion.groupby(d["patient_id"]).transform("nunique")
    d = d[n_les >= min_lesions]
    if max_patients is not None:
        pats = np.sort(d["patient_id"].unique())
        if len(pats) > max_patients:
            keep = np.random.default_rng(seed).choice(pats, max_patients, replace=False)
            d = d[d["patient_id"].isin(keep)]
    return d.sort_values(["patient_id", "isic_id"]).reset_index(drop=True)


def load_images(rows: pd.DataFrame, paths: Paths, scorer: Scorer) -> tuple[np.ndarray, list[int], list[str]]:
    """Model inputs for rows (processed_path when the preprocess stage made one, else the raw file through the
    bundle's preprocessing); returns (batch, ok row positions, error per failed row as 'pos: reason')."""
    size = scorer.bundle.image_size
    imgs, ok, errors = [], [], []
    for i, row in enumerate(progress(rows.itertuples(index=False), total=len(rows), desc="ugly_duckling")):
        try:
            pp = getattr(row, "processed_path", None)
            if isinstance(pp, str) and pp and paths.abs(pp).exists():
                imgs.append(read_image(paths.abs(pp), size))
            else:
                imgs.append(scorer.bundle.preprocess(paths.abs(row.path).read_bytes()))
            ok.append(i)
        except Exception as exc:  # noqa: BLE001 - one unreadable image is quarantined, not a crashed stage
            errors.append(f"{row.isic_id}: {type(exc).__name__}: {exc}")
    batch = np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8)
    return batch, ok, errors


def evaluate_synthetic(scorer: Scorer, n_patients: int, lesions: int, seed: int) -> dict[str, Any]:
    """Top-1 hit rate of the planted malignant lesion among synthetic patients (0 patients -> empty)."""
    if n_patients == 0:
        return {}
    images, meta = synthetic_patients(n_patients, lesions, seed, size=max(64, scorer.bundle.image_size))
    batch = scorer.prepare(images)
    scored = score_patients(meta, scorer.embeddings(batch), min_lesions=3)
    scored["probability_malignant"] = scorer.probabilities(batch)
    res = within_patient_metrics(scored)
    res["prob_top1_hit_rate"] = within_patient_metrics(scored, "probability_malignant")["top1_hit_rate"]
    return res


def run(params: Any, paths: Paths, *, bundle: Any = None) -> dict:
    """Embed, score and rank the lesions of every multi-lesion patient; plot, metrics, MLflow."""
    cfg = params.ugly_duckling
    out_dir, rep_dir = paths.stage(STAGE), paths.reports / STAGE
    clean = read_index(paths, "clean")
    if paths.index("preprocess").exists():
        pre = read_index(paths, "preprocess")
        cols = [c for c in ("source", "isic_id", "processed_path", "split") if c in pre]
        if "processed_path" in cols:
            clean = clean.merge(pre[cols], on=["source", "isic_id"], how="left", suffixes=("", "_pre"))
    # else: no preprocess index, raw files go through the bundle's preprocessing
    rows = select_patients(clean, cfg.min_lesions, cfg.max_patients, cfg.seed)
    ref = cfg.model if cfg.model else paths.models
    if bundle is None and is_uri(ref):
        from tasks import tracking  # a registered model: downloaded through mlflow

        bundle = tracking.load_bundle(ref, paths.root)
    bundle = bundle or load_bundle(ref, paths.root)
    scorer = Scorer(bundle)
    batch, ok, errors = load_images(rows, paths, scorer)
    rows = rows.iloc[ok].reset_index(drop=True)
    emb = scorer.embeddings(batch) if len(batch) else np.zeros((0, 1))
    scored = score_patients(rows, emb, cfg.min_lesions)
    scored["probability_malignant"] = scorer.probabilities(batch) if len(batch) else np.zeros(0)

    metrics: dict[str, Any] = {"images": int(len(scored)), "errors": len(errors), "min_lesions": cfg.min_lesions,
                               "embedding_dim": int(emb.shape[1]) if len(emb) else 0}
    metrics["real"] = within_patient_metrics(scored)
    metrics["real_probability"] = within_patient_metrics(scored, "probability_malignant")
    metrics["synthetic"] = evaluate_synthetic(scorer, cfg.synthetic_patients, cfg.synthetic_lesions, cfg.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    cols = [c for c in ("source", "isic_id", "patient_id", "lesion_id", "path", "target", "split") if c in scored]
    table = scored[cols + ["probability_malignant", *SCORE_COLUMNS]]
    write_table(table.sort_values(["patient_id", "ud_rank"]), out_dir / "scores.csv")
    write_index(scored, paths, STAGE)
    if errors:
        write_table(pd.DataFrame({"error": errors}), out_dir / "errors.csv")
    if len(scored) >= 3:
        xy = tsne_embedding(emb, cfg.tsne_perplexity, cfg.seed)
        plot_tsne(xy, scored, rep_dir / "tsne.png")
        write_table(scored[cols[:2] + ["patient_id", "target", "ud_rank"]].assign(tsne_x=xy[:, 0], tsne_y=xy[:, 1]),
                    rep_dir / "tsne.csv")
    else:  # DVC declares these plots: always write them, saying why they are empty
        write_table(pd.DataFrame(columns=[*cols[:2], "patient_id", "target", "ud_rank", "tsne_x", "tsne_y"]),
                    rep_dir / "tsne.csv")
        _empty_plot(rep_dir / "tsne.png", f"{len(scored)} scored image(s): too few for t-SNE")
    write_json(rep_dir / "metrics.json", metrics)
    if cfg.mlflow:
        from tasks import tracking

        tracked = tracking.log_stage_run(STAGE, {STAGE: cfg}, paths, metrics=metrics, experiment=cfg.experiment,
                                         artifacts=[rep_dir / f for f in ("metrics.json", "tsne.png")])
        metrics["mlflow_run_id"] = tracked["mlflow_run_id"]
    return {"images": metrics["images"], "patients": metrics["real"]["patients"],
            "auc_pooled": metrics["real"]["auc_pooled"], "top1_hit_rate": metrics["real"]["top1_hit_rate"],
            "synthetic_top1_hit_rate": metrics["synthetic"].get("top1_hit_rate"), "errors": len(errors)}
